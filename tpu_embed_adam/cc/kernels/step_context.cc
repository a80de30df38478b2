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

}  // namespace tpu_embed_adam
