// The ParallelFor that ApplySparseAdam takes, over the CPU device's worker
// pool of the kernel that runs it; shared by every kernel that updates rows.
#ifndef TPU_EMBED_ADAM_CC_CORE_PARALLEL_FOR_H_
#define TPU_EMBED_ADAM_CC_CORE_PARALLEL_FOR_H_

#include "tensorflow/core/framework/op_kernel.h"
#include "tpu_embed_adam/cc/core/sparse_adam.h"

namespace tpu_embed_adam {

ParallelFor MakeParallelFor(tensorflow::OpKernelContext* ctx);

}  // namespace tpu_embed_adam

#endif  // TPU_EMBED_ADAM_CC_CORE_PARALLEL_FOR_H_
