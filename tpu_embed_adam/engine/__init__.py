"""A software TPU embedding engine: TF's own `TPUEmbedding` graph on CPU.

Importing `tpu_embed_adam` registers CPU kernels for TF's TPU embedding ops
(`ConfigureTPUEmbedding`, `ConfigureDistributedTPU`,
`Load/RetrieveTPUEmbedding{ADAM,StochasticGradientDescent}Parameters`, the
`EnqueueTPUEmbedding*Batch` ops, `RecvTPUEmbeddingActivations`,
`SendTPUEmbeddingGradients`, `TPUEmbeddingActivations`, and
`CrossReplicaSum` for one replica). The tables, their Adam slots and the hidden
gradient accumulator then live in this process, and each training step
applies TPU sparse Adam (`tpu_embed_adam.reference.adam_update`).

The five lines that train a TF v1 `TPUEmbedding` graph on CPU (one host,
one core; the rest is TF's own code, unchanged)::

    import tpu_embed_adam  # 1. registers the CPU kernels
    emb = tpu_embedding.TPUEmbedding(tables, features, batch_size, tpu_embedding.TRAINING,
        master=None, optimization_parameters=tpu_embedding.AdamParameters(0.01),  # 2.
        device_config=tpu_embedding.DeviceConfig(1, 1, "/job:localhost"))  # no TPU lookup
    ops = emb.create_variables_and_ops()  # 3. variables, load and retrieve ops
    sess.run(ops.load_ops()); sess.run(emb.generate_enqueue_ops([batch]))  # 4. each step
    sess.run(emb.generate_send_gradients_op(grads))  # 5. grads of get_activations()

then `sess.run(ops.retrieve_ops())` before saving, or save with
`RetrievingSaver(ops.retrieve_ops())`, which retrieves before every save;
`retrieve_touched_ops(ops)` brings the variables up to date between saves at
a cost that follows the rows trained (what TPUEstimator runs after every loop).
A `tf.compat.v1.train.Saver` save, or a `Checkpoint` write, while this process's engine holds tables
trained since their last retrieve logs a warning naming them
(`warn_unretrieved_saves(False)` turns it off; `unretrieved_tables()` lists
them).
Several hosts (a cluster of `tf.distribute.Server` workers) and several
cores per host (logical CPU devices, one per core) are described in
`docs/engine.md`; TPUEstimator on CPU in `docs/estimator.md`.

State is per process and survives sessions and graphs: the first op that
carries a configuration installs it, later ops must carry the same one (or
none), and `reset()` (or `tpu.shutdown_system()`) clears everything.
"""

from tpu_embed_adam.engine._save_check import unretrieved_tables, warn_unretrieved_saves
from tpu_embed_adam.engine._session import (
    RetrievingSaver,
    configure_ops,
    load_tables_at_session_start,
    retrieve_touched_ops,
)
from tpu_embed_adam.engine._state import info, reset, tables

__all__ = [
    "RetrievingSaver",
    "configure_ops",
    "info",
    "load_tables_at_session_start",
    "reset",
    "retrieve_touched_ops",
    "tables",
    "unretrieved_tables",
    "warn_unretrieved_saves",
]
