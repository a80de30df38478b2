// The scaffolding every kernel of the package shares: the op's `config` attr
// (where it has one) and a Compute that turns an allocation failure anywhere
// in the op's work into ResourceExhausted, naming the op and the bytes it
// was given, instead of letting std::bad_alloc kill the process.
#ifndef TPU_EMBED_ADAM_CC_KERNELS_ENGINE_KERNEL_H_
#define TPU_EMBED_ADAM_CC_KERNELS_ENGINE_KERNEL_H_

#include <string>

#include "tensorflow/core/framework/op_kernel.h"

namespace tpu_embed_adam {

class EngineKernel : public tensorflow::OpKernel {
 public:
  explicit EngineKernel(tensorflow::OpKernelConstruction* ctx);
  void Compute(tensorflow::OpKernelContext* ctx) final;

 protected:
  // The op's work. Whatever it changed must be unchanged when it returns an
  // error (the engine's and the fused update's contract); an allocation
  // that fails must come before the first write.
  virtual tensorflow::Status Run(tensorflow::OpKernelContext* ctx) = 0;

  // The serialized TPUEmbeddingConfiguration of the op's `config` attr; ""
  // for none (or an op without the attr).
  const std::string& config() const { return config_; }

 private:
  std::string config_;
};

}  // namespace tpu_embed_adam

#endif  // TPU_EMBED_ADAM_CC_KERNELS_ENGINE_KERNEL_H_
