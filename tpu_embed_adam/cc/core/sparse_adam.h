// The TPU sparse Adam update on raw float buffers: the one C++ copy of the
// maths, shared by the fused op (TpuEmbedAdamApply) and the software embedding
// engine. The formula and every rule are stated once, in
// tpu_embed_adam/reference.py and docs/semantics.md; this file implements them.
#ifndef TPU_EMBED_ADAM_CC_CORE_SPARSE_ADAM_H_
#define TPU_EMBED_ADAM_CC_CORE_SPARSE_ADAM_H_

#include <cstdint>
#include <functional>
#include <limits>

namespace tpu_embed_adam {

// Hyper-parameters of one table's update, as AdamConfigFromProto (adam_config.h)
// reads them from TF's OptimizationParameters.
// Unset clipping bounds are +-infinity; no weight decay is a factor of 0.
struct AdamConfig {
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float epsilon = 1e-8f;
  bool lazy = true;
  bool sum_inside_sqrt = true;
  bool gradient_accumulation = true;
  float clip_weight_min = -std::numeric_limits<float>::infinity();
  float clip_weight_max = std::numeric_limits<float>::infinity();
  float weight_decay_factor = 0.0f;
  bool multiply_weight_decay_factor_by_learning_rate = false;
  float clip_gradient_min = -std::numeric_limits<float>::infinity();
  float clip_gradient_max = std::numeric_limits<float>::infinity();
};

// One table (or one shard of it) and its slots, each row-major [rows, dim].
struct TableShard {
  float* w;
  float* m;
  float* v;
  int64_t rows;
  int64_t dim;
};

// Runs fn(begin, end) over disjoint ranges covering [0, total), possibly in
// parallel; cost_per_unit is a rough cycle count per unit (as in TF's Shard).
using ParallelFor =
    std::function<void(int64_t total, int64_t cost_per_unit,
                       const std::function<void(int64_t, int64_t)>& fn)>;

// Returns the position of the first id outside [0, rows), or -1 if all are in
// range. Callers check this before ApplySparseAdam so that nothing is written
// on bad input.
template <typename Index>
int64_t FindOutOfRange(const Index* ids, int64_t n, int64_t rows);

// Returns the position of the first non-finite value in values[0, n), or -1.
int64_t FindNonFinite(const float* values, int64_t n);

// Applies one step of TPU sparse Adam to `shard` in place.
//   ids:   [n] row numbers local to the shard, all in [0, shard.rows);
//          duplicates allowed.
//   grads: [n, shard.dim] one gradient row per id.
//   lr:    the learning rate of this step (constant or dynamic).
// Lazy mode touches only the rows in `ids` and allocates O(n); non-lazy mode
// streams every row of the shard once (absent rows see a zero gradient).
// Without gradient accumulation each occurrence steps its row, in input
// order, and absent rows never move, whatever cfg.lazy says (as the
// reference). Results are bit-identical to reference.adam_update.
template <typename Index>
void ApplySparseAdam(const AdamConfig& cfg, float lr, const TableShard& shard,
                     const Index* ids, const float* grads, int64_t n,
                     const ParallelFor& parallel_for);

// ApplySparseAdam, lazy with gradient accumulation, for `n` distinct ids
// whose gradient rows are already summed: row i is the sum from +0 of id
// i's gradients, as the engine's accumulator forms it, so never -0 and
// never a signalling NaN. ApplySparseAdam's own sum, 0 + row, is then the
// row itself, and the result is ApplySparseAdam's bit for bit, without its
// grouping and its one-thread pass over the gradients: the rows are stepped
// in parallel.
void ApplySparseAdamToSums(const AdamConfig& cfg, float lr,
                           const TableShard& shard, const int64_t* ids,
                           const float* sums, int64_t n,
                           const ParallelFor& parallel_for);

}  // namespace tpu_embed_adam

#endif  // TPU_EMBED_ADAM_CC_CORE_SPARSE_ADAM_H_
