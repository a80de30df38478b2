// Our own ops (prefix TpuEmbedAdam). Kernels live in cc/kernels/.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tpu_embed_adam/cc/core/slots.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tpu_embed_adam {
namespace {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Fails graph construction early on shapes known to be wrong; the kernel
// checks again at run time with the values.
Status ApplyShapeFn(InferenceContext* c) {
  // The variables' shapes come from the handles' data where the graph has it
  // (resource inputs themselves are scalars).
  ShapeHandle table = c->UnknownShape();
  for (int i = 0; i < 3; ++i) {
    const auto* handle_data = c->input_handle_shapes_and_types(i);
    if (handle_data == nullptr || handle_data->size() != 1) continue;
    ShapeHandle shape = (*handle_data)[0].shape;
    if (!c->RankKnown(shape)) continue;
    if (c->Rank(shape) != 2) {
      return tensorflow::errors::InvalidArgument(
          kApplyVariableNames[i], " must be a matrix [rows, dim]; got shape ",
          c->DebugString(shape));
    }
    if (!c->Merge(table, shape, &table).ok()) {
      return tensorflow::errors::InvalidArgument(
          kApplyVariableNames[i], " must have the shape of var ", c->DebugString(table),
          "; got ", c->DebugString(shape));
    }
  }
  ShapeHandle ids, grads, lr;
  if (!c->WithRank(c->input(3), 1, &ids).ok()) {
    return tensorflow::errors::InvalidArgument(
        "ids must be a vector; got shape ", c->DebugString(c->input(3)));
  }
  if (!c->WithRank(c->input(4), 2, &grads).ok()) {
    return tensorflow::errors::InvalidArgument(
        "grads must be a matrix [num_ids, dim]; got shape ",
        c->DebugString(c->input(4)));
  }
  if (!c->WithRank(c->input(5), 0, &lr).ok()) {
    return tensorflow::errors::InvalidArgument(
        "learning_rate must be a scalar; got shape ",
        c->DebugString(c->input(5)));
  }
  DimensionHandle unused;
  if (!c->Merge(c->Dim(ids, 0), c->Dim(grads, 0), &unused).ok()) {
    return tensorflow::errors::InvalidArgument(
        "grads must have one row per id: ids has shape ", c->DebugString(ids),
        ", grads has shape ", c->DebugString(grads));
  }
  if (c->RankKnown(table) &&
      !c->Merge(c->Dim(table, 1), c->Dim(grads, 1), &unused).ok()) {
    return tensorflow::errors::InvalidArgument(
        "grads must have the dim of var ", c->DebugString(table),
        "; got shape ", c->DebugString(grads));
  }
  return tensorflow::OkStatus();
}

}  // namespace

// One step of TPU embedding sparse Adam on resource variables, in place. The
// hyper-parameters are a serialized tensorflow.tpu.OptimizationParameters
// (AdamParameters.to_tf_proto()), read as the engine reads a table's; the
// rules are in tpu_embed_adam/reference.py and docs/semantics.md.
REGISTER_OP("TpuEmbedAdamApply")
    .Input("var: resource")
    .Input("m: resource")
    .Input("v: resource")
    .Input("ids: Tindices")
    .Input("grads: float")
    .Input("learning_rate: float")
    .Attr("Tindices: {int32, int64}")
    .Attr("optimization_parameters: string")
    .Attr("check_numerics: bool = false")
    .SetIsStateful()
    .SetShapeFn(ApplyShapeFn)
    .Doc(R"doc(
Applies one step of TPU embedding sparse Adam to var, m and v in place.

var: [rows, dim] float32 table.
m: [rows, dim] float32 first-moment slot.
v: [rows, dim] float32 second-moment slot.
ids: [n] row ids in [0, rows), duplicates allowed.
grads: [n, dim] one gradient row per id.
learning_rate: scalar learning rate of this step (it overrides the
  learning_rate of optimization_parameters, which may be dynamic).
optimization_parameters: a serialized tensorflow.tpu.OptimizationParameters
  with Adam set; its learning rate is not read.
check_numerics: if true, a non-finite gradient or learning rate is an error
  raised before any write.
)doc");

}  // namespace tpu_embed_adam
