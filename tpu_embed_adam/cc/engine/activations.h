// Combining one feature's rows into its activation, shared by the
// single-process lookup (rows read from the table) and the multi-process
// one (rows the owners sent back).
#ifndef TPU_EMBED_ADAM_CC_ENGINE_ACTIVATIONS_H_
#define TPU_EMBED_ADAM_CC_ENGINE_ACTIVATIONS_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tpu_embed_adam/cc/engine/batch.h"

namespace tpu_embed_adam {
namespace engine {

// Entries ahead whose row the combine prefetches.
constexpr size_t kPrefetchDistance = 8;

// Writes activation[slot] = sum over the feature's entries of scale *
// row_of(entry) into `out` ([slots, dim]). Each slot's first entry writes
// 0 + scale * row (the same float as adding to a zeroed slot), later ones
// add to it, and only slots no entry reached are zeroed: one pass over the
// output. `written` is scratch space.
template <typename RowOf>
void WriteActivations(const std::vector<Entry>& entries, int64_t dim,
                      int64_t slots, const RowOf& row_of,
                      std::vector<uint8_t>& written, float* out) {
  written.assign(slots, 0);
  for (size_t k = 0; k < entries.size(); ++k) {
    // The rows are scattered over the table: ask for a later one early.
    if (k + kPrefetchDistance < entries.size()) {
      const float* ahead = row_of(entries[k + kPrefetchDistance]);
      for (int64_t j = 0; j < dim; j += 16) __builtin_prefetch(ahead + j);
    }
    const Entry& e = entries[k];
    const float* row = row_of(e);
    const float scale = e.scale;
    float* dst = out + e.slot * dim;
    if (written[e.slot]) {
      for (int64_t j = 0; j < dim; ++j) dst[j] += scale * row[j];
    } else {
      written[e.slot] = 1;
      for (int64_t j = 0; j < dim; ++j) dst[j] = 0.0f + scale * row[j];
    }
  }
  for (int64_t slot = 0; slot < slots; ++slot) {
    if (!written[slot]) std::fill(out + slot * dim, out + (slot + 1) * dim, 0.0f);
  }
}

}  // namespace engine
}  // namespace tpu_embed_adam

#endif  // TPU_EMBED_ADAM_CC_ENGINE_ACTIVATIONS_H_
