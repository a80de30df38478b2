// Where a per-step TPU embedding op runs and how long it waits: shared by
// the kernels of TF's Recv/Send/enqueue ops and of the multi-process step.
//
// A core is (task, core within the host). The task is the task of the device
// that runs the op (0 for /job:localhost); the core is the enqueue op's
// device_ordinal, and for the ops of a core's step the id of the CPU device
// they run on, so several cores per host are several logical CPU devices.
#ifndef TPU_EMBED_ADAM_CC_KERNELS_STEP_CONTEXT_H_
#define TPU_EMBED_ADAM_CC_KERNELS_STEP_CONTEXT_H_

#include <atomic>
#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/cancellation.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tpu_embed_adam/cc/engine/engine.h"

namespace tpu_embed_adam {

int64_t Task(tensorflow::OpKernelContext* ctx);
int64_t DeviceCore(tensorflow::OpKernelContext* ctx);

// How an op of a core's step waits for its batch (Recv, and a Send whose
// Recv TF pruned): at most TPU_EMBED_ADAM_RECV_TIMEOUT_MS (default 60 s),
// and no longer than its step lives: a RunOptions timeout, a closed session
// or a failed peer cancels the step, and the wait ends with Cancelled. Lives
// for the op's engine call (the callback is removed when it is destroyed).
class StepWait {
 public:
  explicit StepWait(tensorflow::OpKernelContext* ctx);
  ~StepWait();
  StepWait(const StepWait&) = delete;
  StepWait& operator=(const StepWait&) = delete;

  // The timeout variable's parse error, or Cancelled if the step was
  // cancelled before the wait began.
  const tensorflow::Status& status() const { return status_; }
  const engine::Wait& wait() const { return wait_; }

 private:
  tensorflow::CancellationManager* manager_ = nullptr;
  tensorflow::CancellationToken token_ = 0;
  bool registered_ = false;
  std::atomic<bool> cancelled_{false};
  engine::Wait wait_;
  tensorflow::Status status_;
};

// Allocates the op's activation outputs (Recv's, and the multi-process
// combine's) for the engine.
engine::Engine::AllocateOutput ActivationAllocator(
    tensorflow::OpKernelContext* ctx);

// The gradient list of a Send (or of its multi-process split): data and
// shapes, as the engine takes them.
tensorflow::Status ReadGradients(tensorflow::OpKernelContext* ctx,
                                 const char* name,
                                 std::vector<const float*>* grads,
                                 std::vector<std::vector<int64_t>>* shapes);

// The `learning_rates` list input, one scalar each.
tensorflow::Status ReadLearningRates(tensorflow::OpKernelContext* ctx,
                                     std::vector<float>* learning_rates);

}  // namespace tpu_embed_adam

#endif  // TPU_EMBED_ADAM_CC_KERNELS_STEP_CONTEXT_H_
