#include "tpu_embed_adam/cc/kernels/engine_kernel.h"

#include <new>
#include <stdexcept>

#include "tensorflow/core/framework/node_def_util.h"
#include "tensorflow/core/framework/tensor.h"

namespace tpu_embed_adam {

namespace {

// The bytes of the op's tensor inputs: what it was asked to process, the
// size an out-of-memory message can name (std::bad_alloc carries none).
int64_t InputBytes(tensorflow::OpKernelContext* ctx) {
  int64_t bytes = 0;
  for (int i = 0; i < ctx->num_inputs(); ++i) {
    if (ctx->input_dtype(i) != tensorflow::DT_RESOURCE) {
      bytes += ctx->input(i).TotalBytes();
    }
  }
  return bytes;
}

}  // namespace

EngineKernel::EngineKernel(tensorflow::OpKernelConstruction* ctx)
    : OpKernel(ctx) {
  tensorflow::TryGetNodeAttr(def(), "config", &config_);
}

void EngineKernel::Compute(tensorflow::OpKernelContext* ctx) {
  tensorflow::Status status;
  // length_error: a std::vector asked for more than max_size().
  try {
    status = Run(ctx);
  } catch (const std::bad_alloc&) {
    status = tensorflow::errors::ResourceExhausted(
        name(), " (", type_string(), "): out of memory while processing ",
        InputBytes(ctx), " bytes of inputs (an allocation failed); nothing ",
        "was changed");
  } catch (const std::length_error& e) {
    status = tensorflow::errors::ResourceExhausted(
        name(), " (", type_string(), "): an allocation beyond any size was ",
        "asked for (", e.what(), ") while processing ", InputBytes(ctx),
        " bytes of inputs; nothing was changed");
  }
  OP_REQUIRES_OK(ctx, status);
}

}  // namespace tpu_embed_adam
