"""The kernel library loader: it never raises, and the fused wrapper explains a
missing library. Runs with and without a built library (only the test of the
loaded module needs one)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tpu_embed_adam import AdamParameters, _library
from tpu_embed_adam.ops.fused import fused_apply_adam


def _reset_loader(monkeypatch, package_dir):
    monkeypatch.setattr(_library, "_PACKAGE_DIR", package_dir)
    monkeypatch.setattr(_library, "_attempted", False)
    monkeypatch.setattr(_library, "_module", None)
    monkeypatch.setattr(_library, "_error", None)


@pytest.mark.skipif(
    _library.load_library() is None, reason=f"kernel library not built: {_library.load_error()}"
)
def test_loader_caches_the_module():
    assert _library.load_library() is _library.load_library()
    assert _library.load_error() is None
    assert hasattr(_library.load_library(), "tpu_embed_adam_apply")


def test_missing_library(monkeypatch, tmp_path):
    _reset_loader(monkeypatch, tmp_path)
    assert _library.load_library() is None
    assert "no _tpu_embed_adam_ops" in _library.load_error()
    import tensorflow as tf

    variables = [tf.Variable(tf.zeros([6, 4])) for _ in range(3)]
    with pytest.raises(RuntimeError, match="make lib"):
        fused_apply_adam(
            *variables, np.array([0, 2, 5]), np.ones([3, 4], np.float32), AdamParameters(0.05)
        )


def test_broken_library(monkeypatch, tmp_path):
    (tmp_path / "_tpu_embed_adam_ops.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not elf")
    _reset_loader(monkeypatch, tmp_path)
    assert _library.load_library() is None
    assert re.search(r"_tpu_embed_adam_ops\.cpython.*\.so: \w+", _library.load_error())
