#include "tpu_embed_adam/cc/core/parallel_for.h"

#include <functional>

#include "tensorflow/core/lib/core/threadpool.h"

namespace tpu_embed_adam {

ParallelFor MakeParallelFor(tensorflow::OpKernelContext* ctx) {
  tensorflow::thread::ThreadPool* pool =
      ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [pool](int64_t total, int64_t cost_per_unit,
                const std::function<void(int64_t, int64_t)>& fn) {
    pool->ParallelFor(total, cost_per_unit, fn);
  };
}

}  // namespace tpu_embed_adam
