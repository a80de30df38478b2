// CPU kernels for TF ops that TPU programs (TPUEstimator's model functions,
// tf.compat.v1.tpu.CrossShardOptimizer) put into the per-core computation,
// so that such a program runs on CPU as one replica (use_tpu=False plus the
// software embedding engine).
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"

namespace tpu_embed_adam {
namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::errors::InvalidArgument;

// TPUEmbeddingActivations(embedding_variable, sliced_activations): the
// forward pass is sliced_activations itself. The op exists for its gradient:
// TF's Python gradient function stores the gradient w.r.t. the activations
// in a graph collection, which get_gradients_through_dummy_table_variables
// hands to SendTPUEmbeddingGradients.
class EmbeddingActivationsOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    ctx->set_output(0, ctx->input(1));
  }
};

// CrossReplicaSum over groups of one replica is the identity, and a CPU run
// is one replica (TPUEstimator with use_tpu=False). Groups of several
// replicas would need the other replicas' values, which this process does
// not have: refuse them rather than return a partial sum.
class CrossReplicaSumOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    const Tensor& groups = ctx->input(1);
    OP_REQUIRES(ctx,
                groups.dims() == 2 && groups.dim_size(0) > 0 &&
                    groups.dim_size(1) > 0,
                InvalidArgument("CrossReplicaSum: group_assignment must be "
                                "[num_groups, group_size] with both positive; "
                                "got ",
                                groups.shape().DebugString()));
    OP_REQUIRES(ctx, groups.dim_size(1) == 1,
                tensorflow::errors::Unimplemented(
                    "CrossReplicaSum: group_assignment has groups of size ",
                    groups.dim_size(1),
                    "; the CPU kernel supports only one replica per CPU run "
                    "(groups of size 1)"));
    ctx->set_output(0, ctx->input(0));
  }
};

REGISTER_KERNEL_BUILDER(Name("TPUEmbeddingActivations").Device(DEVICE_CPU),
                        EmbeddingActivationsOp);

#define REGISTER_CROSS_REPLICA_SUM(T)                                   \
  REGISTER_KERNEL_BUILDER(                                              \
      Name("CrossReplicaSum").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
      CrossReplicaSumOp);
// Every type the op allows.
TF_CALL_half(REGISTER_CROSS_REPLICA_SUM);
TF_CALL_bfloat16(REGISTER_CROSS_REPLICA_SUM);
TF_CALL_float(REGISTER_CROSS_REPLICA_SUM);
TF_CALL_double(REGISTER_CROSS_REPLICA_SUM);
TF_CALL_int32(REGISTER_CROSS_REPLICA_SUM);
TF_CALL_uint32(REGISTER_CROSS_REPLICA_SUM);
#undef REGISTER_CROSS_REPLICA_SUM

}  // namespace
}  // namespace tpu_embed_adam
