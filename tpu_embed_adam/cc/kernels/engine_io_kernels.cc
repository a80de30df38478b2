// CPU kernels for TF's per-step TPU embedding ops: the four enqueue ops,
// RecvTPUEmbeddingActivations and SendTPUEmbeddingGradients.
//
// A core is (task, core within the host): see step_context.h.
#include <cstdlib>
#include <string>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tpu_embed_adam/cc/engine/engine.h"
#include "tpu_embed_adam/cc/core/parallel_for.h"
#include "tpu_embed_adam/cc/kernels/engine_kernel.h"
#include "tpu_embed_adam/cc/kernels/step_context.h"

namespace tpu_embed_adam {
namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpInputList;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::errors::InvalidArgument;
using engine::Engine;
using engine::FeatureInput;
using engine::Layout;

// Index and id inputs may be int32 or int64, weights float or double; the
// engine keeps one type of each.
std::vector<int64_t> ToInt64(const Tensor& t) {
  std::vector<int64_t> out(t.NumElements());
  if (t.dtype() == tensorflow::DT_INT32) {
    const auto in = t.flat<int32_t>();
    for (int64_t i = 0; i < in.size(); ++i) out[i] = in(i);
  } else {
    const auto in = t.flat<int64_t>();
    for (int64_t i = 0; i < in.size(); ++i) out[i] = in(i);
  }
  return out;
}

std::vector<float> ToFloat(const Tensor& t) {
  std::vector<float> out(t.NumElements());
  if (t.dtype() == tensorflow::DT_DOUBLE) {
    const auto in = t.flat<double>();
    for (int64_t i = 0; i < in.size(); ++i) out[i] = in(i);
  } else {
    const auto in = t.flat<float>();
    std::copy(in.data(), in.data() + in.size(), out.data());
  }
  return out;
}

// kInteger is EnqueueTPUEmbeddingIntegerBatch: one int32 id per sample for
// every feature in configuration order, no weights, no combiners.
enum class EnqueueKind { kSparse, kRagged, kArbitrary, kInteger };

template <EnqueueKind kKind>
class EnqueueOp : public EngineKernel {
 public:
  explicit EnqueueOp(OpKernelConstruction* ctx) : EngineKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("device_ordinal", &device_ordinal_));
    if (kKind == EnqueueKind::kInteger) return;
    // -1 (TF's default) means the core of the device the op runs on.
    OP_REQUIRES(ctx, device_ordinal_ >= -1,
                InvalidArgument("device_ordinal ", device_ordinal_,
                                " must be a core (>= 0), or -1 for the op's ",
                                "device"));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("combiners", &combiners_));
    if (kKind == EnqueueKind::kArbitrary) return;
    std::vector<int64_t> num_features;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("table_ids", &table_ids_));
    for (const int32_t id : table_ids_) {
      OP_REQUIRES(ctx, id >= 0,
                  InvalidArgument("Argument `table_ids` must hold table ids ",
                                  ">= 0, one per feature; received: ", id,
                                  "."));
    }
    OP_REQUIRES_OK(ctx, ctx->GetAttr("max_sequence_lengths", &max_seq_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_features", &num_features));
    for (int64_t n : num_features) {
      OP_REQUIRES(ctx, n == 1,
                  tensorflow::errors::Unimplemented(
                      "num_features entries other than 1 are not supported; "
                      "got ", n));
    }
  }

  Status Run(OpKernelContext* ctx) override {
    std::vector<FeatureInput> inputs;
    if (kKind == EnqueueKind::kInteger) {
      TF_RETURN_IF_ERROR(ReadIntegerBatch(ctx, &inputs));
    } else {
      TF_RETURN_IF_ERROR(ReadFeatures(ctx, &inputs));
    }
    const Tensor& mode = ctx->input(ctx->num_inputs() - 1);
    if (mode.NumElements() != 1) {
      return InvalidArgument("mode_override must be a scalar; got ",
                             mode.shape().DebugString());
    }
    const int64_t core =
        device_ordinal_ >= 0 ? device_ordinal_ : DeviceCore(ctx);
    return Engine::Get().Enqueue(
        Task(ctx), core, std::move(inputs), combiners_,
        std::string(mode.flat<tensorflow::tstring>()(0)));
  }

 private:
  static constexpr const char* kIndexName =
      kKind == EnqueueKind::kSparse   ? "sample_indices"
      : kKind == EnqueueKind::kRagged ? "sample_splits"
                                      : "sample_indices_or_row_splits";

  static Status ReadIntegerBatch(OpKernelContext* ctx,
                                 std::vector<FeatureInput>* inputs) {
    OpInputList batch;
    TF_RETURN_IF_ERROR(ctx->input_list("batch", &batch));
    inputs->resize(batch.size());
    for (int i = 0; i < batch.size(); ++i) {
      if (batch[i].dims() != 1) {
        return InvalidArgument("feature ", i, ": batch must be rank 1 (one ",
                               "id per sample); got ",
                               batch[i].shape().DebugString());
      }
      (*inputs)[i].ids = ToInt64(batch[i]);
    }
    return tensorflow::OkStatus();
  }

  Status ReadFeatures(OpKernelContext* ctx,
                      std::vector<FeatureInput>* inputs) const {
    OpInputList index, ids, weights;
    TF_RETURN_IF_ERROR(ctx->input_list(kIndexName, &index));
    TF_RETURN_IF_ERROR(ctx->input_list("embedding_indices", &ids));
    TF_RETURN_IF_ERROR(ctx->input_list("aggregation_weights", &weights));
    const int n = ids.size();
    if (kKind != EnqueueKind::kArbitrary) {
      if (static_cast<int>(table_ids_.size()) != n) {
        return InvalidArgument("table_ids has ", table_ids_.size(),
                               " entries for ", n, " features");
      }
      if (!max_seq_.empty() && static_cast<int>(max_seq_.size()) != n) {
        return InvalidArgument("max_sequence_lengths has ", max_seq_.size(),
                               " entries for ", n, " features");
      }
    }
    inputs->resize(n);
    for (int i = 0; i < n; ++i) {
      FeatureInput& in = (*inputs)[i];
      if (ids[i].dims() != 1 || weights[i].dims() != 1) {
        return InvalidArgument("feature ", i, ": embedding_indices ",
                               ids[i].shape().DebugString(),
                               " and aggregation_weights ",
                               weights[i].shape().DebugString(),
                               " must be rank 1");
      }
      TF_RETURN_IF_ERROR(ReadIndex(i, index[i], &in));
      in.ids = ToInt64(ids[i]);
      in.weights = ToFloat(weights[i]);
      if (kKind != EnqueueKind::kArbitrary) {
        in.table_id = table_ids_[i];
        if (!max_seq_.empty()) in.max_sequence_length = max_seq_[i];
      }
    }
    return tensorflow::OkStatus();
  }

  // An empty index means one id per activation slot. Otherwise the ragged op
  // takes row splits, the sparse op sample indices ([n] or [n, k]), and the
  // arbitrary op either, told apart by rank.
  static Status ReadIndex(int i, const Tensor& t, FeatureInput* in) {
    if (t.NumElements() == 0) {
      in->layout = Layout::kDense;
      return tensorflow::OkStatus();
    }
    const bool splits = kKind == EnqueueKind::kRagged ||
                        (kKind == EnqueueKind::kArbitrary && t.dims() == 1);
    if (splits) {
      if (t.dims() != 1) {
        return InvalidArgument("feature ", i, ": row splits must be rank 1; ",
                               "got ", t.shape().DebugString());
      }
      in->layout = Layout::kRowSplits;
    } else {
      const bool rank_ok =
          t.dims() == 2 || (kKind == EnqueueKind::kSparse && t.dims() == 1);
      if (!rank_ok) {
        return InvalidArgument("feature ", i, ": sample indices must be ",
                               "[n, k]; got ", t.shape().DebugString());
      }
      in->layout = Layout::kSampleIndices;
      in->index_cols = t.dims() == 2 ? t.dim_size(1) : 1;
    }
    in->index = ToInt64(t);
    return tensorflow::OkStatus();
  }

  int64_t device_ordinal_;
  std::vector<std::string> combiners_;
  std::vector<int32_t> table_ids_;
  std::vector<int32_t> max_seq_;
};

class RecvOp : public EngineKernel {
 public:
  using EngineKernel::EngineKernel;
  Status Run(OpKernelContext* ctx) override {
    const StepWait wait(ctx);
    TF_RETURN_IF_ERROR(wait.status());
    return Engine::Get().Recv(config(), Task(ctx), DeviceCore(ctx), wait.wait(),
                              num_outputs(), ActivationAllocator(ctx),
                              MakeParallelFor(ctx));
  }
};

class SendOp : public EngineKernel {
 public:
  using EngineKernel::EngineKernel;
  Status Run(OpKernelContext* ctx) override {
    TF_RETURN_IF_ERROR(Engine::Get().EnsureConfigured(config()));
    std::vector<const float*> grads;
    std::vector<std::vector<int64_t>> shapes;
    TF_RETURN_IF_ERROR(ReadGradients(ctx, "inputs", &grads, &shapes));
    std::vector<float> learning_rates;
    TF_RETURN_IF_ERROR(ReadLearningRates(ctx, &learning_rates));
    const StepWait wait(ctx);
    TF_RETURN_IF_ERROR(wait.status());
    return Engine::Get().Send(Task(ctx), DeviceCore(ctx), grads, shapes,
                              learning_rates, wait.wait(), MakeParallelFor(ctx));
  }
};

REGISTER_KERNEL_BUILDER(
    Name("EnqueueTPUEmbeddingSparseTensorBatch").Device(DEVICE_CPU),
    EnqueueOp<EnqueueKind::kSparse>);
REGISTER_KERNEL_BUILDER(
    Name("EnqueueTPUEmbeddingRaggedTensorBatch").Device(DEVICE_CPU),
    EnqueueOp<EnqueueKind::kRagged>);
REGISTER_KERNEL_BUILDER(
    Name("EnqueueTPUEmbeddingArbitraryTensorBatch").Device(DEVICE_CPU),
    EnqueueOp<EnqueueKind::kArbitrary>);
REGISTER_KERNEL_BUILDER(
    Name("EnqueueTPUEmbeddingIntegerBatch").Device(DEVICE_CPU),
    EnqueueOp<EnqueueKind::kInteger>);
REGISTER_KERNEL_BUILDER(Name("RecvTPUEmbeddingActivations").Device(DEVICE_CPU),
                        RecvOp);
REGISTER_KERNEL_BUILDER(Name("SendTPUEmbeddingGradients").Device(DEVICE_CPU),
                        SendOp);

}  // namespace
}  // namespace tpu_embed_adam
