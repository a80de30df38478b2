"""`tpu_embed_adam.tfrs.TPUEmbedding`: TFRS's layer, trained on CPU by its own Adam.

Skipped without `tensorflow-recommenders` (`pip install --no-deps
tensorflow-recommenders==0.7.3`). The model's output is sum(activations *
mix) and its loss y * output with y = +-1, so each id's gradient is
+-mix / batch, dyadic: sums are exact in any order, and the expected tables
are `reference.adam_update` exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tpu_embed_adam import AdamParameters, reference

tfrs = pytest.importorskip("tensorflow_recommenders")
from tpu_embed_adam.tfrs import TPUEmbedding  # noqa: E402

E = tf.tpu.experimental.embedding
_B, _STEPS, _DIM = 8, 4, 3
_MIX = np.array([0.5, -0.25, 1.0], np.float32)


def _feature_config(items_optimizer=None):
    start = np.arange(36, dtype=np.float32).reshape(12, 3) / 16
    items = E.TableConfig(
        12,
        _DIM,
        name="items",
        initializer=tf.constant_initializer(start),
        optimizer=items_optimizer,
    )
    users = E.TableConfig(10, _DIM, name="users", initializer=tf.constant_initializer(-start[:10]))
    return {
        "item": E.FeatureConfig(items, name="item"),
        "history": E.FeatureConfig(items, name="history"),
        "user": E.FeatureConfig(users, name="user"),
    }


def _model(layer_class, optimizer, items_optimizer=None):
    config = _feature_config(items_optimizer)
    layer = layer_class(config, optimizer)
    inputs = {k: tf.keras.Input([], dtype=tf.int64, name=k) for k in config}
    activations = layer(inputs)
    dense = tf.keras.layers.Dense(1, kernel_initializer="ones", name="dense")
    summed = sum(activations[k] for k in config) * _MIX
    output = tf.reduce_sum(summed, axis=1) + dense(tf.ones_like(summed))[:, 0] * 0.0
    model = tf.keras.Model(inputs, output)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss=lambda y, p: y * p)
    return model, layer


def _data(seed=1):
    rng = np.random.default_rng(seed)
    ids = {
        "item": rng.integers(0, 6, _B * _STEPS),
        "history": rng.integers(0, 6, _B * _STEPS),
        "user": rng.integers(0, 10, _B * _STEPS),
    }
    return ids, rng.choice([-1.0, 1.0], _B * _STEPS).astype(np.float32)


def _tables(layer):
    return {config.name: variable.numpy() for config, variable in layer.embedding_tables.items()}


def _expected(start, ids, signs, params):
    states = {name: (t, np.zeros_like(t), np.zeros_like(t)) for name, t in start.items()}
    for step in range(_STEPS):
        rows = slice(step * _B, (step + 1) * _B)
        grads = (signs[rows, None] * _MIX / _B).astype(np.float32)
        states["items"] = reference.adam_update(
            *states["items"],
            np.concatenate([ids["history"][rows], ids["item"][rows]]),
            np.concatenate([grads, grads]),
            params["items"],
        )
        states["users"] = reference.adam_update(
            *states["users"], ids["user"][rows], grads, params["users"]
        )
    return states


@pytest.mark.parametrize("layer_optimizer", ["tf2", "keras_legacy", "string"])
def test_fit_trains_the_tables_with_the_layers_own_adam(layer_optimizer):
    optimizer = {
        "tf2": E.Adam(0.05, beta_2=0.99),
        "keras_legacy": tf.keras.optimizers.legacy.Adam(0.05),  # TFRS translates it
        "string": "adam",
    }[layer_optimizer]
    items_adam = E.Adam(0.2, lazy_adam=False)
    model, layer = _model(TPUEmbedding, optimizer, items_adam)
    start = _tables(layer)
    ids, signs = _data()
    model.fit(ids, signs, batch_size=_B, epochs=1, shuffle=False, verbose=0)
    users = {
        "tf2": AdamParameters(0.05, beta2=0.99, epsilon=1e-7),
        "keras_legacy": AdamParameters(0.05, epsilon=1e-7),
        "string": AdamParameters(0.001, epsilon=1e-7),
    }[layer_optimizer]
    params = {"items": AdamParameters.from_tpu_embedding_v2(items_adam), "users": users}
    expected = _expected(start, ids, signs, params)
    for name, table in _tables(layer).items():
        np.testing.assert_array_equal(table, expected[name][0])
    assert [v.name for v in model.trainable_variables if "items" in v.name] == []


def test_tfrs_own_layer_on_cpu_trains_with_keras_adam_instead():
    model, layer = _model(tfrs.layers.embedding.TPUEmbedding, E.Adam(0.05))
    start = _tables(layer)
    ids, signs = _data()
    model.fit(ids, signs, batch_size=_B, epochs=1, shuffle=False, verbose=0)
    params = {
        "items": AdamParameters(0.05, epsilon=1e-7),
        "users": AdamParameters(0.05, epsilon=1e-7),
    }
    expected = _expected(start, ids, signs, params)
    assert np.abs(_tables(layer)["users"] - expected["users"][0]).max() > 1e-3


def test_evaluate_and_predict_take_any_batch_size():
    model, _ = _model(TPUEmbedding, E.Adam(0.05))
    ids, signs = _data()
    model.fit(ids, signs, batch_size=_B, epochs=1, shuffle=False, verbose=0)
    assert model.predict(ids, batch_size=5, verbose=0).shape == (_B * _STEPS,)
    assert np.isfinite(model.evaluate(ids, signs, batch_size=3, verbose=0))


def test_checkpoint_restores_into_tfrs_own_layer(tmp_path):
    model, layer = _model(TPUEmbedding, E.Adam(0.05))
    ids, signs = _data()
    model.fit(ids, signs, batch_size=_B, epochs=1, shuffle=False, verbose=0)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    served, served_layer = _model(tfrs.layers.embedding.TPUEmbedding, E.Adam(0.05))
    tf.train.Checkpoint(model=served).restore(path).expect_partial()
    for name, table in _tables(layer).items():
        np.testing.assert_array_equal(_tables(served_layer)[name], table)
    np.testing.assert_array_equal(served.predict(ids, verbose=0), model.predict(ids, verbose=0))


def test_other_optimizers_are_refused():
    with pytest.raises(ValueError, match="optimizer SGD.*embedding.Adam"):
        TPUEmbedding(_feature_config(), "sgd")
