"""A tour of `tpu_embed_adam.AdamParameters`: build, validate, serialize, use.

Run with `.venv/bin/python examples/params_tour.py` (after `make venv`).
"""

from absl import app, logging

import tpu_embed_adam
from tpu_embed_adam import AdamParameters


def main(argv: list[str]) -> None:
    del argv
    params = AdamParameters(0.05, clip_gradient_max=1.0, weight_decay_factor=1e-4)
    logging.info("built:      %r", params)
    try:
        AdamParameters(0.05, clip_weight_min=1.0, clip_weight_max=-1.0)
    except ValueError as e:
        logging.info("rejected:   %s", e)
    logging.info("json:       %s", params.to_json())
    wire = params.to_proto().SerializeToString()
    logging.info("proto:      %d bytes, same as TF's: %s", len(wire),
                 wire == params.to_tf_proto().SerializeToString())
    assert AdamParameters.from_proto(wire) == params

    import tensorflow as tf

    column = tf.compat.v1.tpu.experimental.embedding_column(
        tf.compat.v1.feature_column.categorical_column_with_identity("ids", 1000), dimension=16
    )
    spec = tf.compat.v1.estimator.tpu.experimental.EmbeddingConfigSpec(
        feature_columns=[column], optimization_parameters=params
    )
    logging.info("EmbeddingConfigSpec accepted it: %s", spec.optimization_parameters is params)
    with tpu_embed_adam.installed():
        logging.info("installed:  tf.compat.v1.tpu.experimental.AdamParameters is ours: %s",
                     tf.compat.v1.tpu.experimental.AdamParameters is AdamParameters)
    print(f"tour ok: {params!r}")


if __name__ == "__main__":
    app.run(main)
