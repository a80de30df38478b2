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

REGISTER_OP("TpuEmbedAdamParseConfig")
    .Input("config: string")
    .Output("canonical: string")
    .SetShapeFn(tensorflow::shape_inference::ScalarShape)
    .Doc(R"doc(
Parses and checks a serialized TPUEmbeddingConfiguration as the engine's
configure does (cc/engine/config.h), without touching the engine: the
configuration's canonical serialization, or the error configuring it would
give. For the fuzzer and for tools that check a configuration ahead of time.
)doc");

REGISTER_OP("TpuEmbedAdamRetrieveTouched")
    .Output("ids: int64")
    .Output("parameters: float32")
    .Output("momenta: float32")
    .Output("velocities: float32")
    .Attr("table_id: int = -1")
    .Attr("table_name: string = \"\"")
    .Attr("num_shards: int")
    .Attr("shard_id: int")
    .Attr("config: string = \"\"")
    .SetIsStateful()
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->Vector(c->UnknownDim()));
      for (int i = 1; i < 4; ++i) c->set_output(i, c->UnknownShapeOfRank(2));
      return tensorflow::OkStatus();
    })
    .Doc(R"doc(
As RetrieveTPUEmbeddingADAMParameters, but only the rows of the shard that
training steps changed since its last load or retrieve (every row after a
non-lazy step): their local row ids (ascending is not promised) and those
rows of the parameters and both Adam slots. Scattering them into the
variables that the full retrieve fills brings those up to date.
)doc");

REGISTER_OP("TpuEmbedAdamRetrieveTouchedInto")
    .Input("parameters: resource")
    .Input("momenta: resource")
    .Input("velocities: resource")
    .Attr("table_id: int = -1")
    .Attr("table_name: string = \"\"")
    .Attr("num_shards: int")
    .Attr("shard_id: int")
    .Attr("config: string = \"\"")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::NoOutputs)
    .Doc(R"doc(
TpuEmbedAdamRetrieveTouched followed by a scatter of its rows into the
shard's three float32 variables (resource handles, each of the shard's
shape), in one op: the engine writes each trained row straight into the
variables' buffers, in parallel. The variables then equal what
RetrieveTPUEmbeddingADAMParameters would give, if they did at the shard's
last load or retrieve.
)doc");

}  // namespace tpu_embed_adam
