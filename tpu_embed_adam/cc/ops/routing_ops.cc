// The ops of a multi-process TPU embedding step. Users do not build them: a
// graph pass (cc/graph/routing_pass.cc) puts them in place of TF's Recv and
// Send ops when a configuration spans several hosts, placed so that TF's
// runtime carries ids, rows and gradients between the worker processes.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tpu_embed_adam {

using tensorflow::shape_inference::InferenceContext;

REGISTER_OP("TpuEmbedAdamEnsureConfigured")
    .Attr("config: string")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::NoOutputs)
    .Doc(R"doc(
Installs `config` in this process's engine if it has none, else requires the
same one: runs before the enqueue, load and retrieve ops of a host that TF
gives no configuration.
)doc");

REGISTER_OP("TpuEmbedAdamRouteIds")
    .Output("ids: num_owners * int64")
    .Attr("num_owners: int >= 1")
    .Attr("config: string")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      for (int i = 0; i < c->num_outputs(); ++i) {
        c->set_output(i, c->Matrix(InferenceContext::kUnknownDim, 2));
      }
      return tensorflow::OkStatus();
    })
    .Doc(R"doc(
Takes the core's next enqueued batch (the core is the CPU device's id) and
outputs, for each host, the distinct (table id, local row) pairs of that
host's shards the batch reads, table-major.
)doc");

REGISTER_OP("TpuEmbedAdamGatherRows")
    .Input("ids: int64")
    .Output("rows: float")
    .Attr("config: string")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::UnknownShape)
    .Doc(R"doc(
Reads the rows named by `ids` ([n, 2] pairs) from this host's shards, as
one flat float32 vector.
)doc");

REGISTER_OP("TpuEmbedAdamCombineActivations")
    .Input("rows: num_owners * float")
    .Output("outputs: num_outputs * float")
    .Attr("num_owners: int >= 1")
    .Attr("num_outputs: int >= 1")
    .Attr("config: string")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::UnknownShape)
    .Doc(R"doc(
RecvTPUEmbeddingActivations' outputs, combined from the rows each host
returned for the batch the core's TpuEmbedAdamRouteIds took.
)doc");

REGISTER_OP("TpuEmbedAdamSplitGradients")
    .Input("gradients: N * float")
    .Output("ids: num_owners * int64")
    .Output("rows: num_owners * float")
    .Attr("N: int >= 1")
    .Attr("num_owners: int >= 1")
    .Attr("config: string")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      const int owners = c->num_outputs() / 2;
      for (int i = 0; i < owners; ++i) {
        c->set_output(i, c->Matrix(InferenceContext::kUnknownDim, 2));
        c->set_output(owners + i, c->Vector(InferenceContext::kUnknownDim));
      }
      return tensorflow::OkStatus();
    })
    .Doc(R"doc(
Backpropagates SendTPUEmbeddingGradients' `gradients` through the core's
batch and outputs, for each host, the (table id, local row) pairs of its
shards and their gradient rows: one row per distinct row (summed on this
core) with gradient accumulation, one per occurrence without.
)doc");

REGISTER_OP("TpuEmbedAdamApplyGradients")
    .Input("ids: num_cores * int64")
    .Input("rows: num_cores * float")
    .Input("learning_rates: NN * float")
    .Attr("num_cores: int >= 1")
    .Attr("NN: int >= 0 = 0")
    .Attr("config: string")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::NoOutputs)
    .Doc(R"doc(
Adds every core's gradient rows for this host's shards (in input order) to
their accumulators and applies one sparse Adam step per table shard.
)doc");

}  // namespace tpu_embed_adam
