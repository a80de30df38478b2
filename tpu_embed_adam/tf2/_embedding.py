"""`TPUEmbedding`: TF2's mid-level TPU embedding API, training on CPU with TPU Adam.

The class is TF's `tf.tpu.experimental.embedding.TPUEmbedding`, subclassed:
TF's constructor, configuration checks, output-shape rules, variables and
checkpoint (object graph, keys, slot names, TF's registered saver) are TF's
own. Off a TPU, TF's `enqueue`, `dequeue` and `apply_gradients` raise; here
they keep the enqueued ids, look them up in the table variables, and step
the rows with `apply_adam` (the fused kernel) from each table's ids and their
gradients. Under a `TPUStrategy` every method is TF's.

`tpu_embed_adam.install()` puts `build`, `enqueue`, `dequeue` and
`apply_gradients` from here on TF's class, so TF's own `TPUEmbedding` made
outside a `TPUStrategy` behaves the same way; those methods therefore keep
their state on the object lazily and call TF's originals by reference,
never through `super()`.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
from tensorflow.python.tpu import tpu_embedding_v2
from tensorflow.python.util import nest

from tpu_embed_adam.ops.apply import apply_adam
from tpu_embed_adam.tf2._checks import (
    check_gradient,
    check_slots,
    check_strategy,
    check_structure,
    check_tables,
)
from tpu_embed_adam.tf2._inputs import check_input, feature_batch, with_id_checks
from tpu_embed_adam.tf2._lookup import activations, id_gradients
from tpu_embed_adam.tf2._optimizers import TableOptimizer, as_tf2_optimizer, table_optimizer
from tpu_embed_adam.tf2._queue import BatchQueue, Pending

__all__ = ["CPU_METHODS", "TF_TPU_EMBEDDING", "WARN_UNAPPLIED_ATTR", "TPUEmbedding"]

TF_TPU_EMBEDDING = tpu_embedding_v2.TPUEmbedding
# The methods install() puts on TF's class; TF's originals, taken before.
CPU_METHODS = ("build", "enqueue", "dequeue", "apply_gradients")
_TF_METHODS = {name: TF_TPU_EMBEDDING.__dict__[name] for name in CPU_METHODS}
# The attribute that holds the CPU state: a plain object, which the
# checkpoint's object graph (AutoTrackable tracks dicts and lists) ignores.
_STATE_ATTR = "_tpu_embed_adam_cpu"
# A class attribute: False where training batches that get no
# apply_gradients are expected (BatchQueue's warning is then noise).
WARN_UNAPPLIED_ATTR = "_tpu_embed_adam_warn_unapplied"


class _CpuState:
    """What the CPU methods keep on an embedding object."""

    def __init__(self, tables: list[Any], warn_unapplied: bool) -> None:
        self.queue = BatchQueue(warn_unapplied)
        self._tables = tables
        self._optimizers: dict[str, TableOptimizer | None] | None = None
        self._slots_checked = False

    def optimizers(self) -> dict[str, TableOptimizer | None]:
        """Each table's optimizer by name; read once, on the first training use."""
        if self._optimizers is None:
            self._optimizers = {table.name: table_optimizer(table) for table in self._tables}
        return self._optimizers

    def check_slots_once(self, variables: dict[str, dict[str, Any]]) -> None:
        """`check_slots` of the built variables, at the first training enqueue."""
        if not self._slots_checked:
            check_slots(self._tables, variables)
            self._slots_checked = True

    def trainers(self) -> dict[str, TableOptimizer]:
        """As `optimizers`, for training: every table must have one.

        Raises:
          ValueError: a table without an optimizer.
        """
        result = {}
        for name, optimizer in self.optimizers().items():
            if optimizer is None:
                raise ValueError(
                    f"Table {name!r} has no optimizer, so it cannot train: give "
                    "TPUEmbedding (or its TableConfig) a tf.tpu.experimental.embedding.Adam, "
                    "or enqueue with training=False."
                )
            result[name] = optimizer
        return result


def _state(embedding: Any) -> _CpuState:
    state = getattr(embedding, _STATE_ATTR, None)
    if state is None:
        check_strategy(embedding._strategy)
        check_tables(embedding._table_config)
        state = _CpuState(embedding._table_config, getattr(embedding, WARN_UNAPPLIED_ATTR, True))
        setattr(embedding, _STATE_ATTR, state)
    return state


def _variable(embedding: Any, table: Any, slot: str) -> Any:
    return embedding._variables[table.name][slot]


class TPUEmbedding(tpu_embedding_v2.TPUEmbedding):
    """TF's `tf.tpu.experimental.embedding.TPUEmbedding`, training on CPU with TPU Adam.

    Same constructor and methods as TF's class; off a TPU (the default
    strategy or a `OneDeviceStrategy`), `enqueue`, `dequeue` and
    `apply_gradients` run TF's documented training and evaluation loops,
    eagerly or in a `tf.function`: the lookups equal TF's
    `TPUEmbeddingForServing`, and the tables step by the TPU's embedding Adam
    (`tpu_embed_adam.reference.adam_update`, run by `apply_adam`), with
    several features of a table summed per row. `tf.train.Checkpoint` writes
    what TF's class writes. See docs/tf2.md.

    Example:
      >>> table = tf.tpu.experimental.embedding.TableConfig(100, 4, name="t")
      >>> embedding = TPUEmbedding(
      ...     {"f": tf.tpu.experimental.embedding.FeatureConfig(table, name="f")},
      ...     tf.tpu.experimental.embedding.Adam(0.1))
      >>> embedding.enqueue({"f": tf.constant([1, 2, 2])}, training=True)
      >>> with tf.GradientTape() as tape:
      ...     activations = embedding.dequeue()
      ...     tape.watch(activations)
      ...     loss = tf.reduce_sum(activations["f"])
      >>> embedding.apply_gradients(tape.gradient(loss, activations))
    """

    def __init__(
        self,
        feature_config: Any,
        optimizer: Any,
        pipeline_execution_with_tensor_core: bool = False,
    ):
        """Creates the embedding, as TF's constructor does, and checks it can train on CPU.

        Args:
          feature_config: a nested structure of
            `tf.tpu.experimental.embedding.FeatureConfig`.
          optimizer: a `tf.tpu.experimental.embedding.Adam` (or an
            `AdamParameters`, converted to one) for the tables without their
            own; None for no training (no slot variables).
          pipeline_execution_with_tensor_core: TF's flag; on CPU every lookup
            sees every update before it, as with False (docs/tf2.md).

        Raises:
          ValueError: TF's errors; off a TPU also another optimizer than Adam
            (SGD, Adagrad, FTRL), Adam values `AdamParameters` refuses, a
            strategy with several replicas, or a table's quantization_config.
        """
        for feature in nest.flatten(feature_config):
            table = getattr(feature, "table", None)
            if table is not None:
                table.optimizer = as_tf2_optimizer(table.optimizer)
        super().__init__(
            feature_config, as_tf2_optimizer(optimizer), pipeline_execution_with_tensor_core
        )
        if not self._using_tpu:
            _state(self).optimizers()

    @tf.autograph.experimental.do_not_convert
    def build(
        self, per_replica_input_shapes: Any = None, per_replica_batch_size: Any = None
    ) -> None:
        """Creates the tables and slots; records output shapes if given (TF's rules).

        Args:
          per_replica_input_shapes: the features' input shapes, as TF's; may
            be None on CPU, where `enqueue` reads them from its inputs.
          per_replica_batch_size: deprecated in TF; the batch size.

        Raises:
          ValueError: shapes inconsistent with the feature config (TF's check).
        """
        if self._using_tpu:
            return _TF_METHODS["build"](self, per_replica_input_shapes, per_replica_batch_size)
        if self._built:
            return None
        if per_replica_input_shapes is not None or per_replica_batch_size is not None:
            self._get_and_update_output_shapes_from_input(
                per_replica_input_shapes, per_replica_batch_size
            )
        return _TF_METHODS["build"](self)

    @tf.autograph.experimental.do_not_convert
    def enqueue(
        self,
        features: Any,
        weights: Any = None,
        training: bool = True,
        name: str | None = None,
        device: str | None = None,
    ) -> None:
        """Keeps a batch of ids for the next `dequeue` and `apply_gradients`.

        Args:
          features: a nested structure of int32/int64 `tf.Tensor`s,
            `tf.SparseTensor`s or `tf.RaggedTensor`s, as `feature_config`.
          weights: None, or the features' float weights (None entries allowed).
          training: whether `apply_gradients` will follow (a Python bool).
          name: a name scope for the ops.
          device: unused on CPU (one replica).

        Raises:
          ValueError: features or weights not of `feature_config`'s structure,
            a weight for a dense or sequence feature, shapes against the
            output shapes (TF's checks), or training without an Adam per table.
          TypeError: inputs of another type or dtype, a non-bool `training`, or
            (training) slots that are not float32 variables of the table's shape.
          tf.errors.InvalidArgumentError: eagerly, an id outside its table (in
            a tf.function, when the step runs, before any table is touched).
        """
        if self._using_tpu:
            return _TF_METHODS["enqueue"](self, features, weights, training, name, device)
        state = _state(self)
        if not isinstance(training, bool):
            raise TypeError(
                "TPUEmbedding.enqueue: argument `training` must be a Python bool on CPU; "
                f"received {type(training).__name__}."
            )
        check_structure("enqueue", "features", features, self._feature_config)
        flat_inputs = nest.flatten(features)
        flat_weights = [None] * len(flat_inputs)
        if weights is not None:
            check_structure("enqueue", "weights", weights, self._feature_config)
            flat_weights = nest.flatten(weights)
        configs = nest.flatten_with_joined_string_paths(self._feature_config)
        for (path, feature), inp, weight in zip(configs, flat_inputs, flat_weights, strict=True):
            check_input(path, feature, inp, weight)
        if training:
            state.trainers()
        if self._verify_output_shapes_on_enqueue:
            shapes = self._get_input_shapes(features, per_replica=True, in_tpu_context=False)
            self._get_and_update_output_shapes_from_input(shapes)
        else:
            self._check_output_shapes_fully_defined()
        self._maybe_build()
        if training:
            state.check_slots_once(self._variables)
        with tf.name_scope(name or "tpu_embedding_enqueue"):
            batches = [
                feature_batch(path, feature, inp, weight, shape)
                for (path, feature), inp, weight, shape in zip(
                    configs, flat_inputs, flat_weights, self._output_shapes, strict=True
                )
            ]
            state.queue.put(Pending(tuple(with_id_checks(batches)), features, training))
        return None

    @tf.autograph.experimental.do_not_convert
    def dequeue(self, name: str | None = None) -> Any:
        """Returns the activations of the batch enqueued last, as `feature_config`.

        Args:
          name: a name scope for the ops.

        Returns:
          The enqueued features' structure (that of `feature_config`) of
          float32 tensors of shape output_shape + [dim].

        Raises:
          RuntimeError: nothing enqueued here, or this batch dequeued already.
        """
        if self._using_tpu:
            return _TF_METHODS["dequeue"](self, name)
        pending = _state(self).queue.for_dequeue()
        with tf.name_scope(name or "tpu_embedding_dequeue"):
            result = [
                activations(batch, _variable(self, batch.table, "parameters"))
                for batch in pending.batches
            ]
        return nest.pack_sequence_as(pending.structure, result)

    @tf.autograph.experimental.do_not_convert
    def apply_gradients(self, gradients: Any, name: str | None = None) -> None:
        """Steps the tables' rows of the batch enqueued last with TPU Adam.

        The ids' gradients of all features of a table go to one `apply_adam`
        call, features in `feature_config`'s order, so a row's gradients are
        summed (with gradient accumulation) as on a TPU; callable learning
        rates are called here, each once.

        Args:
          gradients: the activations' gradients, as `feature_config`; a None
            entry is a zero gradient (its rows still step with lazy Adam).
          name: a name scope for the ops.

        Raises:
          RuntimeError: no training batch enqueued here, or it was applied.
          ValueError: gradients not of `feature_config`'s structure, not
            tensors, or of another shape than their activations.
          TypeError: gradients that are not float32.
        """
        if self._using_tpu:
            return _TF_METHODS["apply_gradients"](self, gradients, name)
        state = _state(self)
        pending = state.queue.for_update()
        trainers = state.trainers()
        check_structure("apply_gradients", "gradients", gradients, self._feature_config)
        flat_gradients = nest.flatten(gradients)
        for batch, gradient in zip(pending.batches, flat_gradients, strict=True):
            check_gradient(batch.path, gradient, batch.shape)
        with tf.name_scope(name or "tpu_embedding_apply_gradients"):
            # Every rate is read before any table steps: one that raises
            # (eagerly) leaves all tables as they were.
            rates: dict[Any, tf.Tensor] = {}
            for trainer in trainers.values():
                if trainer.learning_rate is not None and trainer.learning_rate not in rates:
                    rates[trainer.learning_rate] = tf.cast(trainer.learning_rate(), tf.float32)
            for table in self._table_config:
                trainer = trainers[table.name]
                mine = [
                    (batch, gradient)
                    for batch, gradient in zip(pending.batches, flat_gradients, strict=True)
                    if batch.table is table
                ]
                ids = [batch.ids for batch, _ in mine]
                if len({i.dtype for i in ids}) > 1:
                    ids = [tf.cast(i, tf.int64) for i in ids]
                apply_adam(
                    _variable(self, table, "parameters"),
                    _variable(self, table, "momenta"),
                    _variable(self, table, "velocities"),
                    tf.concat(ids, axis=0),
                    tf.concat([id_gradients(b, g) for b, g in mine], axis=0),
                    trainer.params,
                    learning_rate=rates.get(trainer.learning_rate),
                )
        pending.applied = True
        return None
