"""The model_fn that puts the software TPU embedding engine under TPUEstimator.

For TRAIN and EVAL it builds, inside the CPU graph, what TPUEstimator builds
around a TPU step: TF's own `TPUEmbedding` (one host, one core), the enqueue of
the embedding features (`_tpu_estimator_embedding.split_inputs`), the
activations handed to the feature columns in TPU mode, TF's dummy-variable
gradient capture and the Send of those gradients, and the variables named as
on a TPU (`get_full_variable_names`). The user's model_fn and optimizer then
train the dense variables only; the engine applies TPU Adam to the tables.

PREDICT and export keep TF's CPU lookups: a serving graph needs no engine, and
its `embedding_weights` variables have the names the tables are saved under.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import tensorflow as tf
from tensorflow.python.tpu import tpu_embedding as tf_tpu_embedding
from tensorflow.python.tpu import tpu_embedding_gradient, tpu_function
from tensorflow.python.util import function_utils
from tensorflow_estimator.python.estimator import model_fn as model_fn_lib
from tensorflow_estimator.python.estimator.tpu import _tpu_estimator_embedding as tf_tpu_est_emb
from tensorflow_estimator.python.estimator.tpu import util as tpu_util

from tpu_embed_adam.engine import load_tables_at_session_start, retrieve_touched_ops
from tpu_embed_adam.estimator._log import log_training
from tpu_embed_adam.estimator._placement import EnginePlacement
from tpu_embed_adam.estimator._sessions import EngineSaver, EngineSessionHook

_ModeKeys = model_fn_lib.ModeKeys


class EngineEmbeddingConfig(tf_tpu_est_emb.EmbeddingConfig):
    """TF's `EmbeddingConfig` for the software engine: one CPU host, or a cluster's workers.

    TF's builds `TPUEmbedding` with a master to query for TPUs; ours gives it
    the device configuration instead (`EnginePlacement`), everything else
    unchanged.
    """

    def __init__(
        self,
        spec: Any,
        train_batch_size: int,
        eval_batch_size: int | None,
        run_config: Any,
        placement: EnginePlacement | None = None,
    ):
        """Builds the configuration.

        Args:
          spec: the `EmbeddingConfigSpec`.
          train_batch_size: the batch size of TRAIN steps.
          eval_batch_size: the batch size of EVAL steps (None: none).
          run_config: the estimator's `RunConfig`.
          placement: where the engine runs (default: this process).
        """
        self.placement = placement or EnginePlacement(None)
        cores = self.placement.num_cores
        super().__init__(spec, train_batch_size, eval_batch_size, cores, cores, run_config)
        self.from_feature_columns = spec.feature_columns is not None

    def _create_tpu_embedding(self, mode: str) -> Any:
        if mode == _ModeKeys.TRAIN:
            batch_size, tpu_mode = self._train_batch_size, tf_tpu_embedding.TRAINING
            optimization_parameters = self._embedding_config_spec.optimization_parameters
        else:
            if self._eval_batch_size is None:
                raise ValueError(
                    "eval_batch_size: TPUEstimator(eval_batch_size=...) is needed to "
                    "evaluate with the CPU TPU embedding engine (it sizes its batches)."
                )
            batch_size, tpu_mode = self._eval_batch_size, tf_tpu_embedding.INFERENCE
            optimization_parameters = None
        spec = self._embedding_config_spec
        # TPUEmbedding's batch is every core's: the first core takes the
        # estimator's whole batch (EnginePlacement says why).
        return tf_tpu_embedding.TPUEmbedding(
            self._table_to_config_dict,
            self._feature_to_config_dict,
            batch_size * self.placement.num_cores,
            tpu_mode,
            master=None,
            optimization_parameters=optimization_parameters,
            pipeline_execution_with_tensor_core=spec.pipeline_execution_with_tensor_core,
            partition_strategy=self._partition_strategy,
            device_config=self.placement.device_config,
        )


class _SplitContext:
    """What `split_inputs` reads of TPUEstimator's context, for one CPU core."""

    # Unknown: a batch may be smaller than the configured one (the last one).
    batch_size_for_input_fn = None
    tensor_core_embedding_columns = None

    def __init__(self, embedding_config: EngineEmbeddingConfig):
        self.embedding_config = embedding_config


def call_user_model_fn(
    model_fn: Callable[..., Any], features: Any, labels: Any, mode: str, config: Any, params: Any
) -> Any:
    """Calls `model_fn` with the arguments it declares, as Estimator does.

    Raises:
      ValueError: `labels` were given to a model_fn that takes none.
    """
    args = function_utils.fn_args(model_fn)
    kwargs = {
        name: value
        for name, value in (("mode", mode), ("config", config), ("params", params))
        if name in args
    }
    if "labels" in args:
        kwargs["labels"] = labels
    elif labels is not None:
        raise ValueError("model_fn does not take labels, but input_fn returns labels.")
    return model_fn(features=features, **kwargs)


def engine_model_fn(
    model_fn: Callable[..., Any],
    embedding_config: EngineEmbeddingConfig,
    features: Any,
    labels: Any,
    mode: str,
    config: Any,
    params: Any,
) -> Any:
    """Runs `model_fn` for TRAIN or EVAL with its embeddings served by the engine.

    Args:
      model_fn: the user's model_fn.
      embedding_config: the estimator's `EngineEmbeddingConfig`.
      features: the input_fn's features (the embedding features are consumed).
      labels: the input_fn's labels.
      mode: `ModeKeys.TRAIN` or `ModeKeys.EVAL`.
      config: the `RunConfig` passed on to `model_fn`.
      params: the params passed on to `model_fn`.

    Returns:
      The model_fn's spec; for TRAIN with the Send of the embedding
      gradients in its train_op, and after every `iterations_per_loop`
      steps the copy of the rows trained into the table variables. The
      graph's local init op loads the tables, and (TRAIN) its saver
      retrieves them in full before each save. Its hooks get an
      `EngineSessionHook`, which takes the engine back from sessions that
      ran in between (an evaluation during training).
    """
    training = mode == _ModeKeys.TRAIN
    emb = embedding_config.get_tpu_embedding(mode)
    embedding_config.tpu_embedding = emb
    features = dict(features)
    batch, static_batch = _batch_of(
        features, emb, "train_batch_size" if training else "eval_batch_size"
    )
    # The step's learning rates read the global step before this step's
    # update increments it.
    global_step = tf.compat.v1.train.get_or_create_global_step()
    step = tf.identity(global_step)
    check = tf.debugging.assert_less_equal(
        batch,
        tf.constant(emb.batch_size_per_core, batch.dtype),
        message=(
            f"{'train' if training else 'eval'}_batch_size is {emb.batch_size_per_core}, "
            "the engine's batch; the input_fn gave a larger batch"
        ),
    )
    features, labels, enqueue_datas_list = tf_tpu_est_emb.split_inputs(
        _SplitContext(embedding_config), features, labels
    )
    placement = embedding_config.placement
    with tf.control_dependencies([check, step]):
        enqueue_ops = emb.generate_enqueue_ops(
            placement.enqueue_datas_on_core(enqueue_datas_list)
        )
    with tf.control_dependencies(enqueue_ops), placement.on_core():
        activations = emb.get_activations()
    init_ops = []
    if training:
        dummies, dummies_init = tpu_embedding_gradient.create_dummy_table_variables(emb)
        init_ops.append(dummies_init)
        activations = tpu_embedding_gradient.hook_dummy_table_variables_to_activations(
            emb, activations, dummies
        )
    # The engine's batch is the configured one; a smaller batch is padded
    # with empty samples, which the model never sees (and whose gradients
    # are zero). A batch known to be whole is not sliced: the slice would
    # copy every activation, and its gradient copy them back.
    if static_batch != emb.batch_size_per_core:
        activations = {name: value[:batch] for name, value in activations.items()}
    features.update(activations)

    # The columns read the activations in TPU mode. Every op of the model_fn
    # waits for the step's read of the global step, so that its increment
    # (by the model_fn's optimizer) never races with it.
    with tpu_function.tpu_shard_context(1), tf.control_dependencies([step]):
        spec = call_user_model_fn(model_fn, features, labels, mode, config, params)

    names, slot_names = None, None
    if embedding_config.from_feature_columns:
        names, slot_names = tf_tpu_est_emb.get_full_variable_names(
            tf.compat.v1.get_default_graph(), emb.table_to_config_dict, emb.optimization_parameters
        )
    variables_and_ops = emb.create_variables_and_ops(names, slot_names)
    devices = placement.configure_devices
    load_tables_at_session_start(emb.config_proto, variables_and_ops.load_ops, init_ops, devices)
    if not training:
        hook = EngineSessionHook(emb.config_proto, variables_and_ops.load_ops, [], devices)
        return _with_hook(spec, "evaluation_hooks", hook)
    log_training(emb, names)
    hook = EngineSessionHook(
        emb.config_proto,
        variables_and_ops.load_ops,
        retrieve_touched_ops(variables_and_ops),
        devices,
    )

    gradients = tpu_embedding_gradient.get_gradients_through_dummy_table_variables(emb)
    multiplier = embedding_config.get_grad_multiplier()
    if multiplier is not None:
        gradients = collections.OrderedDict((k, v * multiplier) for k, v in gradients.items())
    # On a TPU a Send whose activations never reached the loss still follows
    # its enqueue; here the enqueue must run first even if TF prunes the Recv.
    with tf.control_dependencies(enqueue_ops), placement.on_core():
        send = emb.generate_send_gradients_op(gradients, step)
    with tf.control_dependencies([send]):
        refresh = _refresh_after_each_loop(variables_and_ops, step, config)
    _use_retrieving_saver(hook, variables_and_ops.retrieve_ops(), config)
    spec = _without_own_saver(spec)._replace(train_op=tf.group(spec.train_op, send, refresh))
    return _with_hook(spec, "training_hooks", hook)


def _with_hook(spec: Any, field: str, hook: EngineSessionHook) -> Any:
    """`spec` with `hook` added to its `training_hooks` or `evaluation_hooks`."""
    return spec._replace(**{field: (*(getattr(spec, field) or ()), hook)})


def _refresh_after_each_loop(variables_and_ops: Any, step: tf.Tensor, config: Any) -> tf.Operation:
    """Brings the table variables up to date after every `iterations_per_loop` steps.

    On a TPU the train op retrieves the tables after each loop, so hooks and
    an `evaluate` in the same process read trained rows. Here each step is
    its own run; the loop ends when the global step after this one is a
    multiple of the count, and only the rows trained since the last retrieve
    are copied. A loop measured in time ends after every step.
    """
    loop = tpu_util.parse_iterations_per_loop(config.tpu_config.iterations_per_loop)
    every = loop.value if loop.unit == "count" else 1

    def refresh() -> tf.Operation:
        return tf.group(*retrieve_touched_ops(variables_and_ops))

    if every == 1:
        return refresh()
    loop_ends = tf.equal(tf.math.floormod(step + 1, every), 0)
    return tf.cond(loop_ends, refresh, tf.no_op, name="tpu_embed_adam_refresh_tables")


def _batch_of(features: dict[str, Any], emb: Any, argument: str) -> tuple[Any, int | None]:
    """The batch size of this step's inputs, from the first embedding feature.

    Returns:
      The batch size as a scalar int64 tensor, and as an int where the
      feature's shape gives it statically (else None).

    Raises:
      ValueError: an embedding feature is missing or neither a SparseTensor
        nor a Tensor, or the batch is statically larger than the engine's.
    """
    # TF's split_inputs would fail on these later, naming no feature.
    for name in emb.feature_to_config_dict:
        if name not in features:
            raise ValueError(
                f"The input_fn's features have no {name!r}, an embedding feature of "
                f"embedding_config_spec; they have {sorted(features)}."
            )
        if not isinstance(features[name], (tf.Tensor, tf.sparse.SparseTensor)):
            raise ValueError(
                f"The input_fn's feature {name!r} is a {type(features[name]).__name__}; "
                "TPUEstimator enqueues an embedding feature as a SparseTensor or a dense "
                "Tensor of ids."
            )
    feature = features[next(iter(emb.feature_to_config_dict))]
    static = tf.compat.dimension_value(feature.shape[0])
    if static is not None and static > emb.batch_size_per_core:
        raise ValueError(
            f"{argument} is {emb.batch_size_per_core}, the engine's batch; the input_fn "
            f"gives batches of {static}."
        )
    if isinstance(feature, tf.sparse.SparseTensor):
        return feature.dense_shape[0], static
    return tf.shape(feature, out_type=tf.int64)[0], static


def _use_retrieving_saver(hook: EngineSessionHook, retrieve_ops: list[Any], config: Any) -> None:
    """Makes the Estimator's default saver retrieve the tables before it saves.

    Estimator builds its default saver only when the SAVERS collection is
    empty; ours (a `RetrievingSaver` that first takes the engine back for
    the session of `hook`), with the same settings, goes there first.
    """
    savers = tf.compat.v1.GraphKeys.SAVERS
    if tf.compat.v1.get_collection(savers):
        raise ValueError(
            "A saver is already in the SAVERS collection: with the CPU TPU embedding "
            "engine, TPUEstimator saves with tpu_embed_adam's RetrievingSaver, which "
            "copies the tables out of the engine first; remove the other saver."
        )
    tf.compat.v1.add_to_collection(
        savers,
        EngineSaver(
            hook,
            retrieve_ops,
            sharded=True,
            max_to_keep=config.keep_checkpoint_max,
            keep_checkpoint_every_n_hours=config.keep_checkpoint_every_n_hours,
            defer_build=True,
            save_relative_paths=True,
        ),
    )


def _check_scaffold(scaffold: Any) -> Any:
    if scaffold is not None and scaffold.saver is not None:
        raise ValueError(
            "The model_fn's scaffold has a saver: with the CPU TPU embedding engine, "
            "TPUEstimator saves with tpu_embed_adam.engine.RetrievingSaver, which copies "
            "the tables out of the engine first; leave Scaffold(saver=...) unset."
        )
    return scaffold


def _without_own_saver(spec: Any) -> Any:
    """Refuses a spec whose scaffold brings a saver, which would save stale tables."""
    if isinstance(spec, model_fn_lib.EstimatorSpec):
        _check_scaffold(spec.scaffold)
        return spec
    scaffold_fn = spec.scaffold_fn
    if scaffold_fn is None:
        return spec
    return spec._replace(scaffold_fn=lambda: _check_scaffold(scaffold_fn()))
