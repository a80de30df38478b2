"""The kernel library loader: it never raises, and the fused wrapper explains a
missing library. Runs with and without a built library (only the test of the
loaded module needs one)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from _ops_helpers import params_of, random_state

from tpu_embed_adam.ops import loader
from tpu_embed_adam.ops.fused import fused_apply_adam


def _reset_loader(monkeypatch, package_dir):
    monkeypatch.setattr(loader, "_PACKAGE_DIR", package_dir)
    monkeypatch.setattr(loader, "_attempted", False)
    monkeypatch.setattr(loader, "_module", None)
    monkeypatch.setattr(loader, "_error", None)


@pytest.mark.skipif(
    loader.load_library() is None, reason=f"kernel library not built: {loader.load_error()}"
)
def test_loader_caches_the_module():
    assert loader.load_library() is loader.load_library()
    assert loader.load_error() is None
    assert hasattr(loader.load_library(), "tpu_embed_adam_apply")


def test_missing_library(monkeypatch, tmp_path):
    _reset_loader(monkeypatch, tmp_path)
    assert loader.load_library() is None
    assert "no _tpu_embed_adam_ops" in loader.load_error()
    import tensorflow as tf

    variables = [tf.Variable(x) for x in random_state(1, 6, 4)]
    with pytest.raises(RuntimeError, match="make lib"):
        fused_apply_adam(*variables, np.array([0, 2, 5]), np.ones([3, 4], np.float32), params_of())


def test_broken_library(monkeypatch, tmp_path):
    (tmp_path / "_tpu_embed_adam_ops.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not elf")
    _reset_loader(monkeypatch, tmp_path)
    assert loader.load_library() is None
    assert re.search(r"_tpu_embed_adam_ops\.cpython.*\.so: \w+", loader.load_error())
