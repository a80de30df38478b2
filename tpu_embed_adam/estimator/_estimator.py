"""`TPUEstimator` whose embedding tables train on the CPU TPU embedding engine.

The three methods below wrap TF's own (the constructor, the model_fn wrapper
and the export of a metagraph); `TPUEstimator` here is TF's class with them,
and `tpu_embed_adam.install()` puts the same methods on TF's class. With
`use_tpu=True` (a real TPU) or no `embedding_config_spec`, they defer to TF,
except that TF's `AdamParameters` in a spec become ours (`_spec`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from tensorflow.python.util import deprecation, tf_decorator
from tensorflow_estimator.python.estimator import model_fn as model_fn_lib
from tensorflow_estimator.python.estimator.tpu import tpu_estimator as tf_tpu_estimator

from tpu_embed_adam.estimator._checks import check_export, check_spec
from tpu_embed_adam.estimator._cluster import engine_cluster_of
from tpu_embed_adam.estimator._cluster_session import config_for_cluster, on_cluster
from tpu_embed_adam.estimator._log import warn_tpu_export_skipped
from tpu_embed_adam.estimator._model_fn import (
    EngineEmbeddingConfig,
    call_user_model_fn,
    engine_model_fn,
)
from tpu_embed_adam.estimator._placement import EnginePlacement
from tpu_embed_adam.estimator._sessions import ENGINE_CALLS
from tpu_embed_adam.estimator._spec import spec_with_our_adam

TF_TPU_ESTIMATOR = tf_tpu_estimator.TPUEstimator
# TF's __init__ is under TF's deprecation decorator, which logs the line that
# calls it: called from _init, that line would be in this module. _init
# carries the same decorator (same message: functools.wraps gives it TF's
# name) and calls TF's undecorated __init__, so the warning names the
# user's line, once.
_TF_UNDECORATED_INIT = tf_decorator.unwrap(TF_TPU_ESTIMATOR.__init__)[1]
# tensorflow_estimator's estimator_export deprecates every exported symbol so.
_TF_DEPRECATION_INSTRUCTIONS = "Use tf.keras instead."
_TF_AUGMENT = TF_TPU_ESTIMATOR._augment_model_fn
_TF_TRAIN = TF_TPU_ESTIMATOR.train
_TF_EVALUATE = TF_TPU_ESTIMATOR.evaluate
_TF_PREDICT = TF_TPU_ESTIMATOR.predict
_TF_ADD_META_GRAPH = TF_TPU_ESTIMATOR._add_meta_graph_for_mode
_TF_INIT_SIGNATURE = inspect.signature(_TF_UNDECORATED_INIT)
# The attribute that marks an estimator whose tables the engine serves.
_ENGINE_ATTR = "_tpu_embed_adam_engine"


@deprecation.deprecated(None, _TF_DEPRECATION_INSTRUCTIONS)
@functools.wraps(_TF_UNDECORATED_INIT)
def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    bound = _TF_INIT_SIGNATURE.bind(self, *args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    spec = arguments["embedding_config_spec"]
    if spec is None:
        _TF_UNDECORATED_INIT(*bound.args, **bound.kwargs)
        return
    if not arguments["use_tpu"]:
        check_spec(spec, arguments["train_batch_size"], arguments["eval_batch_size"])
        if arguments["config"] is not None:
            engine_cluster_of(arguments["config"])  # refusals before TF's constructor runs
        check_export(arguments["export_to_cpu"])
    # TF's own estimator (on a TPU too) names the slots only of parameters
    # that match the alias install() points at ours.
    spec = arguments["embedding_config_spec"] = spec_with_our_adam(spec)
    if arguments["use_tpu"]:
        _TF_UNDECORATED_INIT(*bound.args, **bound.kwargs)
        return
    # TF's constructor calls _augment_model_fn, which needs to know; the
    # RunConfig it completes comes after, so the config is built lazily.
    engine = (spec, arguments["train_batch_size"], arguments["eval_batch_size"])
    setattr(self, _ENGINE_ATTR, (*engine, EnginePlacement(None)))
    # TF refuses 'mod' on CPU because its CPU lookups would not match a
    # TPU's checkpoint layout; the engine shards exactly as a TPU does.
    arguments["embedding_config_spec"] = spec._replace(partition_strategy="div")
    _TF_UNDECORATED_INIT(*bound.args, **bound.kwargs)
    # The RunConfig TF completed (from TF_CONFIG when none was given).
    cluster = engine_cluster_of(self._config)
    if cluster is not None:
        self._config = config_for_cluster(self._config, cluster)
        self._session_config = self._config.session_config
    setattr(self, _ENGINE_ATTR, (*engine, EnginePlacement(cluster)))


def _augment_model_fn(
    self: Any, model_fn: Callable[..., Any], batch_axis: Any
) -> Callable[..., Any]:
    if getattr(self, _ENGINE_ATTR, None) is None:
        return _TF_AUGMENT(self, model_fn, batch_axis)
    is_export = [False]
    engine_config: list[EngineEmbeddingConfig] = []

    def model_fn_on_engine(features: Any, labels: Any, mode: str, config: Any, params: Any) -> Any:
        if is_export[0] or mode == model_fn_lib.ModeKeys.PREDICT:
            return call_user_model_fn(model_fn, features, labels, mode, config, params)
        if not engine_config:
            spec, train_batch_size, eval_batch_size, placement = getattr(self, _ENGINE_ATTR)
            engine_config.append(
                EngineEmbeddingConfig(
                    spec, train_batch_size, eval_batch_size, self.config, placement
                )
            )
        return engine_model_fn(model_fn, engine_config[0], features, labels, mode, config, params)

    tpu_model_fn = _TF_AUGMENT(self, model_fn_on_engine, batch_axis)

    def augmented(features: Any, labels: Any, mode: str, config: Any, params: Any) -> Any:
        # TF's model_fn reads and clears this flag: export builds its graph
        # without calling the input_fn.
        is_export[0] = not self._is_input_fn_invoked
        return tpu_model_fn(features, labels, mode, config, params)

    return augmented


def _engine_call(tf_method: Callable[..., Any]) -> Callable[..., Any]:
    """`tf_method` (train, evaluate) holding the engine, on the estimator's cluster."""

    @functools.wraps(tf_method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        engine = getattr(self, _ENGINE_ATTR, None)
        if engine is None:
            return tf_method(self, *args, **kwargs)
        # The engine serves one session between steps: estimators in other
        # threads wait (_sessions).
        with ENGINE_CALLS, on_cluster(engine[-1].cluster, self._session_config):
            return tf_method(self, *args, **kwargs)

    return call


_train = _engine_call(_TF_TRAIN)
_evaluate = _engine_call(_TF_EVALUATE)


@functools.wraps(_TF_PREDICT)
def _predict(self: Any, *args: Any, **kwargs: Any) -> Any:
    engine = getattr(self, _ENGINE_ATTR, None)
    if engine is None:
        yield from _TF_PREDICT(self, *args, **kwargs)
        return
    # PREDICT reads the tables on CPU, in the chief's sessions (no engine).
    with on_cluster(engine[-1].cluster, self._session_config):
        yield from _TF_PREDICT(self, *args, **kwargs)


def _add_meta_graph_for_mode(
    self: Any,
    builder: Any,
    input_receiver_fn_map: Any,
    checkpoint_path: str,
    save_variables: bool = True,
    mode: str = model_fn_lib.ModeKeys.PREDICT,
    export_tags: Any = None,
    check_variables: bool = True,
    strip_default_attrs: bool = True,
) -> None:
    arguments = {
        "builder": builder,
        "input_receiver_fn_map": input_receiver_fn_map,
        "checkpoint_path": checkpoint_path,
        "save_variables": save_variables,
        "mode": mode,
        "export_tags": export_tags,
        "check_variables": check_variables,
        "strip_default_attrs": strip_default_attrs,
    }
    if getattr(self, _ENGINE_ATTR, None) is None or not self._export_to_tpu:
        _TF_ADD_META_GRAPH(self, **arguments)
        return
    if mode == model_fn_lib.ModeKeys.PREDICT:
        warn_tpu_export_skipped()
    # What TF's own method does for the CPU graph; export_to_cpu is True
    # (check_export).
    super(TF_TPU_ESTIMATOR, self)._add_meta_graph_for_mode(**arguments)


class TPUEstimator(tf_tpu_estimator.TPUEstimator):  # type: ignore[misc]
    """TF's `TPUEstimator`; with `use_tpu=False`, the tables train with TPU Adam.

    Same arguments as `tf.compat.v1.estimator.tpu.TPUEstimator`. With
    `use_tpu=False` and an `embedding_config_spec`, every table of the spec
    lives in the software TPU embedding engine: TRAIN steps enqueue the
    embedding features, the feature columns read the engine's activations
    as on a TPU, and the engine applies the spec's `AdamParameters` (TF's or
    `tpu_embed_adam`'s) to the tables, while the model_fn's optimizer trains
    the dense variables only. EVAL reads the tables through the engine in
    inference mode; PREDICT and `export_saved_model` look them up on CPU from
    the same variables (the export writes the CPU serving graph only; with
    `export_to_tpu=True`, TF's default, it logs one warning saying why it
    skips the TPU one). Checkpoints hold the tables and the `Adam/m`,
    `Adam/v` slots under the names TPUEstimator uses on a TPU.
    `docs/estimator.md` has the details.

    Raises:
      ValueError: at construction, for a spec, column, batch size or export
        setting the engine cannot honour (not Adam, TensorCore or CPU-lookup
        columns, no `train_batch_size`, `export_to_cpu=False`), naming it.
    """

    __init__ = _init
    _augment_model_fn = _augment_model_fn
    _add_meta_graph_for_mode = _add_meta_graph_for_mode
    train = _train
    evaluate = _evaluate
    predict = _predict
