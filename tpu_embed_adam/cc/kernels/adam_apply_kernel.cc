// CPU kernel of TpuEmbedAdamApply: reads its optimization_parameters with the
// engine's reader (core/adam_config.h), validates every input, then runs the
// shared update of core/sparse_adam.h on the variables' buffers in place.
// training_op_helpers.h copies tensors on the CPU device's thread pool.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/kernels/training_op_helpers.h"
#include "tensorflow/core/platform/mutex.h"
#include "tpu_embed_adam/cc/core/adam_config.h"
#include "tpu_embed_adam/cc/core/huge_pages.h"
#include "tpu_embed_adam/cc/core/parallel_for.h"
#include "tpu_embed_adam/cc/core/slots.h"
#include "tpu_embed_adam/cc/core/sparse_adam.h"
#include "tpu_embed_adam/cc/kernels/engine_kernel.h"

namespace tpu_embed_adam {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::errors::FailedPrecondition;
using ::tensorflow::errors::InvalidArgument;
using CPUDevice = Eigen::ThreadPoolDevice;

constexpr int kVar = 0, kM = 1, kV = 2, kIds = 3, kGrads = 4, kLr = 5;

// Position of the first non-finite value, searched in parallel slices.
int64_t FindNonFiniteParallel(const float* values, int64_t n,
                              const ParallelFor& parallel_for) {
  constexpr int64_t kSlice = 1 << 16;
  std::atomic<int64_t> first{n};
  parallel_for((n + kSlice - 1) / kSlice, kSlice, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t begin = s * kSlice;
      if (begin >= first.load()) return;
      const int64_t len = std::min(kSlice, n - begin);
      const int64_t found = FindNonFinite(values + begin, len);
      if (found < 0) continue;
      int64_t expected = first.load();
      while (begin + found < expected &&
             !first.compare_exchange_weak(expected, begin + found)) {
      }
      return;
    }
  });
  return first.load() == n ? -1 : first.load();
}

template <typename Index>
class TpuEmbedAdamApplyOp : public EngineKernel {
 public:
  explicit TpuEmbedAdamApplyOp(OpKernelConstruction* ctx)
      : EngineKernel(ctx) {
    std::string serialized;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("optimization_parameters", &serialized));
    const tensorflow::Status read = AdamConfigFromSerialized(serialized, &cfg_);
    OP_REQUIRES(ctx, read.ok(),
                InvalidArgument("optimization_parameters: ", read.message()));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("check_numerics", &check_numerics_));
  }

  tensorflow::Status Run(OpKernelContext* ctx) override {
    // The copy-on-read helpers below copy a shared buffer as float, which is
    // only sound for initialised float variables: check those first.
    for (int i : {kVar, kM, kV}) {
      tensorflow::core::RefCountPtr<tensorflow::Var> var;
      const tensorflow::Status found = tensorflow::LookupResource(
          ctx, tensorflow::HandleFromInput(ctx, i), &var);
      if (!(found.ok())) {
      return FailedPrecondition(kApplyVariableNames[i],
                                     " not found: uninitialized or deleted (",
                                     found.message(), ")");
    }
      if (!(var->is_initialized)) {
      return FailedPrecondition(kApplyVariableNames[i],
                                     " is not initialized: variable ",
                                     tensorflow::HandleFromInput(ctx, i).name());
    }
      if (!(var->tensor()->dtype() == tensorflow::DT_FLOAT)) {
      return InvalidArgument(kApplyVariableNames[i], " must be float32; got ",
                                  tensorflow::DataTypeString(
                                      var->tensor()->dtype()));
    }
    }

    // Exclusive locks for the whole step keep concurrent calls from
    // interleaving within a row; sparse mode switches the variables to
    // copy-on-read, so readers copy and the buffers may be written in place.
    auto locks = tensorflow::MaybeLockVariableInputMutexesInOrder<CPUDevice,
                                                                  float>(
        ctx, /*do_lock=*/true, /*sparse=*/true, {kVar, kM, kV});
    Tensor tables[3];
    for (int i : {kVar, kM, kV}) {
      TF_RETURN_IF_ERROR(tensorflow::GetInputTensorFromVariable<CPUDevice,
                                                                 float>(
                              ctx, i, /*lock_held=*/true, /*sparse=*/true,
                              &tables[i]));
    }
    const Tensor& var = tables[kVar];
    const Tensor& ids = ctx->input(kIds);
    const Tensor& grads = ctx->input(kGrads);
    const Tensor& lr_tensor = ctx->input(kLr);

    if (!(var.dims() == 2)) {
      return InvalidArgument("var must be a matrix [rows, dim]; got shape ",
                                var.shape().DebugString());
    }
    for (int i : {kM, kV}) {
      if (!(tables[i].shape() == var.shape())) {
      return InvalidArgument(kApplyVariableNames[i], " must have the shape of var ",
                                  var.shape().DebugString(), "; got ",
                                  tables[i].shape().DebugString());
    }
    }
    if (var.data() == tables[kM].data() || var.data() == tables[kV].data() ||
        tables[kM].data() == tables[kV].data()) {
      return InvalidArgument("var, m and v must be three distinct variables");
    }
    if (!(ids.dims() == 1)) {
      return InvalidArgument("ids must be a vector; got shape ",
                                ids.shape().DebugString());
    }
    if (!(grads.dims() == 2)) {
      return InvalidArgument("grads must be a matrix [num_ids, dim]; got "
                                "shape ",
                                grads.shape().DebugString());
    }
    if (!(grads.dim_size(0) == ids.dim_size(0))) {
      return InvalidArgument("grads must have one row per id: ids has "
                                "shape ",
                                ids.shape().DebugString(),
                                ", grads has shape ",
                                grads.shape().DebugString());
    }
    if (!(grads.dim_size(1) == var.dim_size(1))) {
      return InvalidArgument("grads must have the dim of var ",
                                var.shape().DebugString(), "; got shape ",
                                grads.shape().DebugString());
    }
    if (!(tensorflow::TensorShapeUtils::IsScalar(lr_tensor.shape()))) {
      return InvalidArgument("learning_rate must be a scalar; got shape ",
                                lr_tensor.shape().DebugString());
    }

    const int64_t rows = var.dim_size(0);
    const int64_t dim = var.dim_size(1);
    const int64_t n = ids.dim_size(0);
    const Index* ids_data = ids.flat<Index>().data();
    const float* grads_data = grads.flat<float>().data();
    const float lr = lr_tensor.scalar<float>()();
    const ParallelFor parallel_for = MakeParallelFor(ctx);

    const int64_t bad = FindOutOfRange(ids_data, n, rows);
    if (!(bad < 0)) {
      return InvalidArgument("ids[", bad, "] = ",
                                bad < 0 ? 0 : static_cast<int64_t>(ids_data[bad]),
                                " is out of range [0, ", rows,
                                ") of var with shape ",
                                var.shape().DebugString());
    }
    if (check_numerics_) {
      if (!(std::isfinite(lr))) {
      return InvalidArgument("learning_rate = ", lr,
                                  " is not finite (check_numerics=True)");
    }
      const int64_t at = FindNonFiniteParallel(grads_data, n * dim, parallel_for);
      if (!(at < 0)) {
      return InvalidArgument("grads[", at / std::max<int64_t>(dim, 1),
                                  ", ", at % std::max<int64_t>(dim, 1), "] = ",
                                  at < 0 ? 0.0f : grads_data[at],
                                  " is not finite (check_numerics=True)");
    }
    }

    AdviseHugePagesOnce(tables);
    const TableShard shard{tables[kVar].flat<float>().data(),
                           tables[kM].flat<float>().data(),
                           tables[kV].flat<float>().data(), rows, dim};
    ApplySparseAdam<Index>(cfg_, lr, shard, ids_data, grads_data, n,
                           parallel_for);
    return tensorflow::OkStatus();
  }

 private:
  // Asks for huge pages under each new buffer of var, m and v (rows are
  // updated at random: core/huge_pages.h). TF allocated and wrote them
  // already, so only a collapse moves them; each input is collapsed at most
  // once per kernel, so a program that gives a variable a new buffer every
  // step pays that copy once, not every step. Called with the variables
  // locked: nothing else writes them meanwhile.
  void AdviseHugePagesOnce(Tensor* tables) {
    tensorflow::mutex_lock lock(advise_mu_);
    for (int i : {kVar, kM, kV}) {
      const char* data = tables[i].tensor_data().data();
      if (data == advised_[i]) continue;
      advised_[i] = data;
      const size_t bytes = tables[i].TotalBytes();
      AdviseHugePages(const_cast<char*>(data), bytes, !collapsed_[i]);
      collapsed_[i] = collapsed_[i] || bytes >= kHugePageMinBytes;
    }
  }

  AdamConfig cfg_;
  bool check_numerics_ = false;
  tensorflow::mutex advise_mu_;
  const char* advised_[3] TF_GUARDED_BY(advise_mu_) = {};
  bool collapsed_[3] TF_GUARDED_BY(advise_mu_) = {};
};

REGISTER_KERNEL_BUILDER(Name("TpuEmbedAdamApply")
                            .Device(tensorflow::DEVICE_CPU)
                            .TypeConstraint<int32_t>("Tindices"),
                        TpuEmbedAdamApplyOp<int32_t>);
REGISTER_KERNEL_BUILDER(Name("TpuEmbedAdamApply")
                            .Device(tensorflow::DEVICE_CPU)
                            .TypeConstraint<int64_t>("Tindices"),
                        TpuEmbedAdamApplyOp<int64_t>);

}  // namespace
}  // namespace tpu_embed_adam
