"""install() / uninstall() / installed(): TF's public alias, reversibly."""

import subprocess
import sys

import pytest
import tensorflow as tf
from tensorflow.python.tpu import tpu_embedding as tf_tpu_embedding

import tpu_embed_adam


def _alias():
    return tf.compat.v1.tpu.experimental.AdamParameters


def test_import_alone_does_not_patch():
    code = (
        "import tensorflow as tf, tpu_embed_adam\n"
        "from tensorflow.python.tpu import tpu_embedding as te\n"
        "assert tf.compat.v1.tpu.experimental.AdamParameters is te.AdamParameters\n"
        "print('clean')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "clean"


def test_install_uninstall_round_trip():
    assert _alias() is tf_tpu_embedding.AdamParameters
    tpu_embed_adam.install()
    try:
        assert _alias() is tpu_embed_adam.AdamParameters
        import tensorflow.compat.v1 as tf_v1

        assert tf_v1.tpu.experimental.AdamParameters is tpu_embed_adam.AdamParameters
        tpu_embed_adam.install()  # Idempotent.
        params = _alias()(0.1)
        assert isinstance(params, tf_tpu_embedding.AdamParameters)
    finally:
        tpu_embed_adam.uninstall()
    assert _alias() is tf_tpu_embedding.AdamParameters
    tpu_embed_adam.uninstall()  # A no-op when not installed.
    assert _alias() is tf_tpu_embedding.AdamParameters


def test_installed_context_manager_restores_even_on_error():
    with pytest.raises(KeyError, match="boom"):
        with tpu_embed_adam.installed():
            assert _alias() is tpu_embed_adam.AdamParameters
            raise KeyError("boom")
    assert _alias() is tf_tpu_embedding.AdamParameters


def test_nested_installed_keeps_outer_install():
    tpu_embed_adam.install()
    try:
        with tpu_embed_adam.installed():
            pass
        assert _alias() is tpu_embed_adam.AdamParameters
    finally:
        tpu_embed_adam.uninstall()


def test_install_puts_every_engine_method_on_tf_estimator_and_uninstall_restores():
    from tpu_embed_adam.estimator import TPUEstimator
    from tpu_embed_adam.patch import ENGINE_METHODS

    tf_class = TPUEstimator.__mro__[1]
    before = {name: tf_class.__dict__[name] for name in ENGINE_METHODS}
    assert "_add_meta_graph_for_mode" in ENGINE_METHODS
    with tpu_embed_adam.installed():
        for name in ENGINE_METHODS:
            assert tf_class.__dict__[name] is TPUEstimator.__dict__[name], name
    assert {name: tf_class.__dict__[name] for name in ENGINE_METHODS} == before
