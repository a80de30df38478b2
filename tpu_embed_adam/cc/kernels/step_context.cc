#include "tpu_embed_adam/cc/kernels/step_context.h"

#include <cstdlib>
#include <string>

namespace tpu_embed_adam {

int64_t Task(tensorflow::OpKernelContext* ctx) {
  const auto& name = ctx->device()->parsed_name();
  return name.has_task ? name.task : 0;
}

int64_t DeviceCore(tensorflow::OpKernelContext* ctx) {
  const auto& name = ctx->device()->parsed_name();
  return name.has_id ? name.id : 0;
}

// How long Recv (and a Send whose Recv TF pruned) waits for its core's
// batch: the enqueue of the same step may run concurrently in the same
// Session.run, and on a loaded host it can lag by seconds. A TPU's Recv blocks until the batch arrives; a long bound keeps
// that behaviour while a program that never enqueues still gets an error.
// Parsed strictly: atoll's silent 0 for "abc" or 1 for "1e9" would turn a
// typo into a Recv that fails at once or waits for ages.
namespace {

tensorflow::Status RecvTimeoutMs(int64_t* timeout_ms) {
  constexpr int64_t kMaxRecvTimeoutMs = 86400000;  // one day
  static constexpr char kVar[] = "TPU_EMBED_ADAM_RECV_TIMEOUT_MS";
  const char* env = std::getenv(kVar);
  if (env == nullptr) {
    *timeout_ms = 60000;
    return tensorflow::OkStatus();
  }
  const std::string text(env);
  int64_t value = 0;
  bool ok = !text.empty() && text.size() <= 9;  // 9 digits cannot overflow
  for (char c : text) {
    ok = ok && c >= '0' && c <= '9';
    value = value * 10 + (c - '0');
  }
  if (!ok || value < 1 || value > kMaxRecvTimeoutMs) {
    return tensorflow::errors::InvalidArgument(
        kVar, "='", text, "' must be a whole number of milliseconds in [1, ",
        kMaxRecvTimeoutMs, "]");
  }
  *timeout_ms = value;
  return tensorflow::OkStatus();
}

}  // namespace

StepWait::StepWait(tensorflow::OpKernelContext* ctx) {
  status_ = RecvTimeoutMs(&wait_.timeout_ms);
  wait_.cancelled = &cancelled_;
  manager_ = ctx->cancellation_manager();
  if (!status_.ok() || manager_ == nullptr) return;
  token_ = manager_->get_cancellation_token();
  registered_ = manager_->RegisterCallback(token_, [this] {
    cancelled_ = true;
    engine::Engine::Get().WakeWaiters();
  });
  if (!registered_) {
    status_ = tensorflow::errors::Cancelled(
        ctx->op_kernel().name(), ": the step was cancelled before it ran");
  }
}

StepWait::~StepWait() {
  // Waits for a callback that is running: it must not outlive `this`.
  if (registered_) manager_->DeregisterCallback(token_);
}

engine::Engine::AllocateOutput ActivationAllocator(
    tensorflow::OpKernelContext* ctx) {
  return [ctx](int index, const std::vector<int64_t>& shape, float** data) {
    tensorflow::Tensor* out = nullptr;
    TF_RETURN_IF_ERROR(
        ctx->allocate_output(index, tensorflow::TensorShape(shape), &out));
    *data = out->flat<float>().data();
    return tensorflow::OkStatus();
  };
}

tensorflow::Status ReadGradients(tensorflow::OpKernelContext* ctx,
                                 const char* name,
                                 std::vector<const float*>* grads,
                                 std::vector<std::vector<int64_t>>* shapes) {
  tensorflow::OpInputList inputs;
  TF_RETURN_IF_ERROR(ctx->input_list(name, &inputs));
  for (const tensorflow::Tensor& g : inputs) {
    grads->push_back(g.flat<float>().data());
    const auto dims = g.shape().dim_sizes();
    shapes->emplace_back(dims.begin(), dims.end());
  }
  return tensorflow::OkStatus();
}

tensorflow::Status ReadLearningRates(tensorflow::OpKernelContext* ctx,
                                     std::vector<float>* learning_rates) {
  tensorflow::OpInputList rates;
  TF_RETURN_IF_ERROR(ctx->input_list("learning_rates", &rates));
  for (int i = 0; i < rates.size(); ++i) {
    if (rates[i].NumElements() != 1) {
      return tensorflow::errors::InvalidArgument(
          "learning_rates[", i, "] must hold one value; got ",
          rates[i].shape().DebugString());
    }
    learning_rates->push_back(rates[i].flat<float>()(0));
  }
  return tensorflow::OkStatus();
}

}  // namespace tpu_embed_adam
