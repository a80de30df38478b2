// CPU kernels of the multi-process step's ops (cc/ops/routing_ops.cc): thin
// wrappers that hand tensors to the engine (engine_routed.cc).
#include <string>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tpu_embed_adam/cc/core/parallel_for.h"
#include "tpu_embed_adam/cc/engine/engine.h"
#include "tpu_embed_adam/cc/kernels/engine_kernel.h"
#include "tpu_embed_adam/cc/kernels/step_context.h"

namespace tpu_embed_adam {
namespace {

using engine::Engine;
using tensorflow::DEVICE_CPU;
using tensorflow::OpInputList;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;

// Pairs travel as [n, 2] int64 tensors.
Status CheckPairsShape(const char* what, int index, const Tensor& t) {
  if (t.dims() != 2 || t.dim_size(1) != 2) {
    return InvalidArgument(what, "[", index, "] must be [n, 2] (table, row) ",
                           "pairs; got ", t.shape().DebugString());
  }
  return tensorflow::OkStatus();
}

class EnsureConfiguredOp : public EngineKernel {
 public:
  using EngineKernel::EngineKernel;
  tensorflow::Status Run(OpKernelContext* ctx) override {
    TF_RETURN_IF_ERROR(Engine::Get().EnsureConfigured(config()));
    return tensorflow::OkStatus();
  }

};

class RouteIdsOp : public EngineKernel {
 public:
  using EngineKernel::EngineKernel;
  tensorflow::Status Run(OpKernelContext* ctx) override {
    const StepWait wait(ctx);
    TF_RETURN_IF_ERROR(wait.status());
    const auto allocate = [ctx](int owner, int64_t n, int64_t** data) {
      Tensor* out = nullptr;
      TF_RETURN_IF_ERROR(ctx->allocate_output(owner, TensorShape({n, 2}), &out));
      *data = out->flat<int64_t>().data();
      return tensorflow::OkStatus();
    };
    TF_RETURN_IF_ERROR(Engine::Get().RouteIds(config(), Task(ctx),
                                               DeviceCore(ctx), wait.wait(),
                                               num_outputs(), allocate));
    return tensorflow::OkStatus();
  }

};

class GatherRowsOp : public EngineKernel {
 public:
  using EngineKernel::EngineKernel;
  tensorflow::Status Run(OpKernelContext* ctx) override {
    const Tensor& ids = ctx->input(0);
    TF_RETURN_IF_ERROR(CheckPairsShape("ids", 0, ids));
    const auto allocate = [ctx](int64_t n, float** data) {
      Tensor* out = nullptr;
      TF_RETURN_IF_ERROR(ctx->allocate_output(0, TensorShape({n}), &out));
      *data = out->flat<float>().data();
      return tensorflow::OkStatus();
    };
    TF_RETURN_IF_ERROR(Engine::Get().GatherRows(config(), Task(ctx),
                                                 ids.flat<int64_t>().data(),
                                                 ids.dim_size(0), allocate));
    return tensorflow::OkStatus();
  }

};

class CombineActivationsOp : public EngineKernel {
 public:
  using EngineKernel::EngineKernel;
  tensorflow::Status Run(OpKernelContext* ctx) override {
    OpInputList rows;
    TF_RETURN_IF_ERROR(ctx->input_list("rows", &rows));
    std::vector<const float*> data;
    std::vector<int64_t> sizes;
    for (const Tensor& t : rows) {
      data.push_back(t.flat<float>().data());
      sizes.push_back(t.NumElements());
    }
    TF_RETURN_IF_ERROR(Engine::Get().CombineActivations(
                            config(), Task(ctx), DeviceCore(ctx), data, sizes,
                            num_outputs(), ActivationAllocator(ctx)));
    return tensorflow::OkStatus();
  }

};

class SplitGradientsOp : public EngineKernel {
 public:
  explicit SplitGradientsOp(OpKernelConstruction* ctx) : EngineKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_owners", &num_owners_));
  }
  tensorflow::Status Run(OpKernelContext* ctx) override {
    TF_RETURN_IF_ERROR(Engine::Get().EnsureConfigured(config()));
    std::vector<const float*> grads;
    std::vector<std::vector<int64_t>> shapes;
    TF_RETURN_IF_ERROR(ReadGradients(ctx, "gradients", &grads, &shapes));
    const StepWait wait(ctx);
    TF_RETURN_IF_ERROR(wait.status());
    const int owners = num_owners_;
    const auto allocate = [ctx, owners](int owner, int64_t n, int64_t floats,
                                        int64_t** ids, float** rows) {
      Tensor* out = nullptr;
      TF_RETURN_IF_ERROR(ctx->allocate_output(owner, TensorShape({n, 2}), &out));
      *ids = out->flat<int64_t>().data();
      TF_RETURN_IF_ERROR(
          ctx->allocate_output(owners + owner, TensorShape({floats}), &out));
      *rows = out->flat<float>().data();
      return tensorflow::OkStatus();
    };
    TF_RETURN_IF_ERROR(Engine::Get().SplitGradients(
                            Task(ctx), DeviceCore(ctx), grads, shapes,
                            num_owners_, wait.wait(), allocate));
    return tensorflow::OkStatus();
  }

 private:
  int num_owners_ = 0;
};

class ApplyGradientsOp : public EngineKernel {
 public:
  using EngineKernel::EngineKernel;
  tensorflow::Status Run(OpKernelContext* ctx) override {
    TF_RETURN_IF_ERROR(Engine::Get().EnsureConfigured(config()));
    OpInputList ids, rows;
    TF_RETURN_IF_ERROR(ctx->input_list("ids", &ids));
    TF_RETURN_IF_ERROR(ctx->input_list("rows", &rows));
    std::vector<Engine::Payload> payloads(ids.size());
    for (int i = 0; i < ids.size(); ++i) {
      TF_RETURN_IF_ERROR(CheckPairsShape("ids", i, ids[i]));
      if (!(rows[i].dims() == 1)) {
      return InvalidArgument("rows[", i, "] must be a vector; got ",
                                  rows[i].shape().DebugString());
    }
      payloads[i] = {ids[i].flat<int64_t>().data(), ids[i].dim_size(0),
                     rows[i].flat<float>().data(), rows[i].NumElements()};
    }
    std::vector<float> learning_rates;
    TF_RETURN_IF_ERROR(ReadLearningRates(ctx, &learning_rates));
    TF_RETURN_IF_ERROR(Engine::Get().ApplyGradients(Task(ctx), payloads,
                                                     learning_rates,
                                                     MakeParallelFor(ctx)));
    return tensorflow::OkStatus();
  }

};

REGISTER_KERNEL_BUILDER(Name("TpuEmbedAdamEnsureConfigured").Device(DEVICE_CPU),
                        EnsureConfiguredOp);
REGISTER_KERNEL_BUILDER(Name("TpuEmbedAdamRouteIds").Device(DEVICE_CPU),
                        RouteIdsOp);
REGISTER_KERNEL_BUILDER(Name("TpuEmbedAdamGatherRows").Device(DEVICE_CPU),
                        GatherRowsOp);
REGISTER_KERNEL_BUILDER(
    Name("TpuEmbedAdamCombineActivations").Device(DEVICE_CPU),
    CombineActivationsOp);
REGISTER_KERNEL_BUILDER(Name("TpuEmbedAdamSplitGradients").Device(DEVICE_CPU),
                        SplitGradientsOp);
REGISTER_KERNEL_BUILDER(Name("TpuEmbedAdamApplyGradients").Device(DEVICE_CPU),
                        ApplyGradientsOp);

}  // namespace
}  // namespace tpu_embed_adam
