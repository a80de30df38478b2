// Our own ops around the software TPU embedding engine; TF's TPU embedding
// ops keep TF's own definitions and only gain CPU kernels.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"

namespace tpu_embed_adam {

REGISTER_OP("TpuEmbedAdamEngineReset")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::NoOutputs)
    .Doc(R"doc(
Clears the process's TPU embedding engine: configuration, tables, slots and
queued batches, as tpu.shutdown_system does on a TPU.
)doc");

REGISTER_OP("TpuEmbedAdamEngineInfo")
    .Output("info: string")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::ScalarShape)
    .Doc(R"doc(
Describes the process's TPU embedding engine as a JSON object: whether it is
configured, hosts, cores per host, features, queued batches, bytes held, and
per table its id, vocabulary size, dimension, sharding and shards (rows,
whether loaded here, steps applied since the shard's last load or retrieve,
bytes).
)doc");

}  // namespace tpu_embed_adam
