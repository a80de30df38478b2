"""Bad configurations and inputs: clear errors naming the feature and argument, nothing written."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from _tf2_helpers import E, feature, numpy_state, table

import tpu_embed_adam
from tpu_embed_adam import AdamParameters, DynamicLearningRate


def _config(**table_kwargs):
    users = table("users", 10, 2, **table_kwargs)
    items = table("items", 8, 2, combiner="sum")
    return {
        "user": feature(users, "user"),
        "item": feature(items, "item"),
        "seq": feature(items, "seq", max_sequence_length=2),
    }


def _features(user=(1, 2), item=((3,), (4, 5)), seq=((1,), ())):
    return {
        "user": tf.constant(user, tf.int64),
        "item": tf.ragged.constant(item, tf.int64),
        "seq": tf.ragged.constant(seq, tf.int64, ragged_rank=1),
    }


def _embedding(**kwargs):
    return tpu_embed_adam.TPUEmbedding(_config(**kwargs), E.Adam(0.1))


def _tables(embedding):
    return {name: numpy_state(embedding, name) for name in ("users", "items")}


def _assert_unchanged(embedding, before):
    for name, state in before.items():
        for x, y in zip(numpy_state(embedding, name), state, strict=True):
            np.testing.assert_array_equal(x, y)


# Construction.


@pytest.mark.parametrize(
    "optimizer",
    [E.SGD(0.1), E.Adagrad(0.1), E.FTRL(0.1), E.AdagradMomentum(0.1)],
    ids=lambda o: type(o).__name__,
)
def test_other_optimizers_are_refused_at_construction(optimizer):
    with pytest.raises(
        ValueError, match=rf"Table '\w+' has optimizer {type(optimizer).__name__}.*embedding\.Adam"
    ):
        tpu_embed_adam.TPUEmbedding(_config(), optimizer)


def test_a_tables_own_optimizer_is_checked_too():
    with pytest.raises(ValueError, match="Table 'users' has optimizer SGD"):
        tpu_embed_adam.TPUEmbedding(_config(optimizer=E.SGD(0.1)), E.Adam(0.1))


def test_adam_values_our_parameters_refuse_name_the_table():
    with pytest.raises(ValueError, match=r"Table '\w+'.*epsilon. vanishes"):
        tpu_embed_adam.TPUEmbedding(_config(), E.Adam(0.1, epsilon=1e-23))
    with pytest.raises(ValueError, match="dynamic learning rate"):
        tpu_embed_adam.TPUEmbedding(_config(), AdamParameters(DynamicLearningRate(0)))


def test_several_replicas_and_quantization_are_refused():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope(), pytest.raises(ValueError, match="MirroredStrategy"):
        tpu_embed_adam.TPUEmbedding(_config(), E.Adam(0.1))
    quantized = _config(quantization_config=E.QuantizationConfig(4, -1.0, 1.0))
    with pytest.raises(ValueError, match="Table 'users' has a quantization_config"):
        tpu_embed_adam.TPUEmbedding(quantized, E.Adam(0.1))


# enqueue.


@pytest.mark.parametrize(
    ("features", "error", "match"),
    [
        ({"user": tf.constant([1])}, ValueError, "argument `features` must have the structure"),
        ([tf.constant([1])] * 3, TypeError, "argument `features` must have the structure"),
        (
            {**_features(), "user": np.array([1, 2])},
            TypeError,
            r"feature 'user' \(argument `features`\) must be a tf.Tensor",
        ),
        (
            {**_features(), "user": tf.constant([1.0, 2.0])},
            TypeError,
            "feature 'user'.*int32 or int64 ids; received float32",
        ),
        (
            {**_features(), "item": tf.ragged.constant([[[1]]])},
            ValueError,
            "feature 'item'.*RaggedTensor of rank 2",
        ),
        ({**_features(), "user": tf.constant([[1, 2]])}, ValueError, "last dimension as 1"),
    ],
    ids=["missing_key", "list", "numpy", "float_ids", "ragged_rank3", "dense_rank2"],
)
def test_enqueue_refuses_features_that_do_not_match(features, error, match):
    embedding = _embedding()
    with pytest.raises(error, match=match):
        embedding.enqueue(features)
    with pytest.raises(RuntimeError, match="nothing enqueued eagerly"):
        embedding.dequeue()


@pytest.mark.parametrize(
    ("weights", "error", "match"),
    [
        (
            {"user": tf.constant([1.0, 1.0]), "item": None, "seq": None},
            ValueError,
            r"feature 'user' \(argument `weights`\) is given for a dense input",
        ),
        (
            {"user": None, "item": tf.SparseTensor([[0, 0]], [1.0], [2, 2]), "seq": None},
            TypeError,
            "feature 'item'.*must be a RaggedTensor like its input",
        ),
        (
            {"user": None, "item": tf.ragged.constant([[1], [1, 2]]), "seq": None},
            TypeError,
            "feature 'item'.*must hold floats",
        ),
        (
            {"user": None, "item": None, "seq": tf.ragged.constant([[1.0], []])},
            ValueError,
            "feature 'seq'.*sequence feature",
        ),
        ({"user": None}, ValueError, "argument `weights` must have the structure"),
    ],
    ids=["dense", "type", "int", "sequence", "structure"],
)
def test_enqueue_refuses_bad_weights(weights, error, match):
    with pytest.raises(error, match=match):
        _embedding().enqueue(_features(), weights)


def test_enqueue_refuses_a_shape_other_than_before_and_a_non_bool_training():
    embedding = _embedding()
    embedding.enqueue(_features(), training=False)
    with pytest.raises(ValueError, match="Inconsistent shape founded for input feature user"):
        embedding.enqueue(_features(user=(1, 2, 3)), training=False)
    with pytest.raises(TypeError, match="`training` must be a Python bool"):
        embedding.enqueue(_features(), training=tf.constant(True))


@pytest.mark.parametrize("bad", [10, -1])
def test_ids_out_of_range_raise_eagerly_naming_feature_and_table(bad):
    embedding = _embedding()
    before = _tables(embedding)
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"feature `item` \(argument `features`\) has an id outside \[0, 8\).*table `items`",
    ):
        embedding.enqueue(_features(item=((3,), (4, bad))))
    with pytest.raises(RuntimeError, match="nothing enqueued"):
        embedding.dequeue()
    _assert_unchanged(embedding, before)


def test_ids_out_of_range_in_a_tf_function_write_no_table():
    embedding = _embedding()
    before = _tables(embedding)

    @tf.function
    def step(features):
        embedding.enqueue(features, training=True)
        activations = embedding.dequeue()
        embedding.apply_gradients(activations)

    with pytest.raises(tf.errors.InvalidArgumentError, match="feature `seq`.*table `items`"):
        step(_features(seq=((1,), (9,))))  # users' ids are fine: they must not step either
    _assert_unchanged(embedding, before)
    # Ids past the sequence length are dropped before the check.
    step(_features(seq=((1,), (2, 3, 99))))


# dequeue and apply_gradients.


def test_dequeue_and_apply_need_a_batch_of_their_own():
    embedding = _embedding()
    with pytest.raises(RuntimeError, match="dequeue: nothing enqueued eagerly"):
        embedding.dequeue()
    with pytest.raises(RuntimeError, match="apply_gradients: nothing enqueued eagerly"):
        embedding.apply_gradients(None)
    embedding.enqueue(_features(), training=False)
    activations = embedding.dequeue()
    with pytest.raises(RuntimeError, match="dequeued already"):
        embedding.dequeue()
    with pytest.raises(RuntimeError, match="had training=False"):
        embedding.apply_gradients(activations)
    embedding.enqueue(_features(), training=True)
    embedding.apply_gradients(embedding.dequeue())
    with pytest.raises(RuntimeError, match="applied already"):
        embedding.apply_gradients(activations)


def test_an_eager_batch_is_not_dequeued_inside_a_tf_function():
    embedding = _embedding()
    embedding.enqueue(_features(), training=False)
    with pytest.raises(RuntimeError, match="nothing enqueued inside this tf.function"):
        tf.function(embedding.dequeue)()


def _good_gradients(embedding):
    return {k: tf.ones_like(v) for k, v in embedding.dequeue().items()}


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda g: {"user": g["user"]}, ValueError, "argument `gradients` must have the structure"),
        (
            lambda g: {**g, "user": tf.ones([3, 2])},
            ValueError,
            r"feature 'user' \(argument `gradients`\) must have the shape of its "
            r"activations \[2, 2\]",
        ),
        (
            lambda g: {**g, "seq": tf.ones([2, 2], tf.float64)},
            TypeError,
            "feature 'seq'.*float32; received float64",
        ),
        (
            lambda g: {**g, "item": np.ones([2, 2], np.float32)},
            ValueError,
            "feature 'item'.*must be a tf.Tensor or None; received ndarray",
        ),
        (
            lambda g: {**g, "item": tf.IndexedSlices(tf.ones([1, 2]), [0], [2, 2])},
            ValueError,
            "tf.convert_to_tensor makes it one",
        ),
    ],
    ids=["structure", "shape", "dtype", "numpy", "indexed_slices"],
)
def test_bad_gradients_raise_and_write_nothing(change, error, match):
    embedding = _embedding()
    before = _tables(embedding)
    embedding.enqueue(_features(), training=True)
    gradients = _good_gradients(embedding)
    with pytest.raises(error, match=match):
        embedding.apply_gradients(change(gradients))
    _assert_unchanged(embedding, before)
    embedding.apply_gradients(gradients)  # the batch is still there to train on


def test_slots_of_the_wrong_dtype_are_refused_before_any_step():
    def int_slots(table_variable, names, initializers):
        # TF's slot initializers give int32 zeros unless asked for a dtype.
        pairs = zip(names, initializers, strict=True)
        return {name: tf.Variable(init(table_variable.shape)) for name, init in pairs}

    embedding = tpu_embed_adam.TPUEmbedding(
        _config(), E.Adam(0.1, slot_variable_creation_fn=int_slots)
    )
    with pytest.raises(TypeError, match="Table '\\w+': `momenta` must be a float32 tf.Variable"):
        embedding.enqueue(_features(), training=True)
