// Combining one feature's rows into its activation, shared by the
// single-process lookup (rows read from the table) and the multi-process
// one (rows the owners sent back).
#ifndef TPU_EMBED_ADAM_CC_ENGINE_ACTIVATIONS_H_
#define TPU_EMBED_ADAM_CC_ENGINE_ACTIVATIONS_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tpu_embed_adam/cc/core/sparse_adam.h"
#include "tpu_embed_adam/cc/engine/batch.h"

namespace tpu_embed_adam {
namespace engine {

// Entries ahead whose row the combine prefetches.
constexpr size_t kPrefetchDistance = 8;

// Writes activation[slot] = sum over `entries[0, count)` of scale *
// row_of(entry) into `out` ([slots, dim]) for the slots [slot_begin,
// slot_end), which hold every entry's slot. Each slot's first entry writes
// 0 + scale * row (the same float as adding to a zeroed slot), later ones
// add to it, and only slots no entry reached are zeroed: one pass over the
// output. `written` is scratch indexed by slot.
template <typename RowOf>
void WriteActivationSlots(const Entry* entries, size_t count, int64_t dim,
                          int64_t slot_begin, int64_t slot_end,
                          const RowOf& row_of, uint8_t* written, float* out) {
  std::fill(written + slot_begin, written + slot_end, 0);
  for (size_t k = 0; k < count; ++k) {
    // The rows are scattered over the table: ask for a later one early.
    if (k + kPrefetchDistance < count) {
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
  for (int64_t slot = slot_begin; slot < slot_end; ++slot) {
    if (!written[slot]) std::fill(out + slot * dim, out + (slot + 1) * dim, 0.0f);
  }
}

// All of one feature's activations, `out` [slots, dim]; `written` is
// scratch space.
template <typename RowOf>
void WriteActivations(const std::vector<Entry>& entries, int64_t dim,
                      int64_t slots, const RowOf& row_of,
                      std::vector<uint8_t>& written, float* out) {
  written.resize(slots);
  WriteActivationSlots(entries.data(), entries.size(), dim, 0, slots, row_of,
                       written.data(), out);
}

// WriteActivations on the workers of `parallel_for`, each taking a range of
// slots, when the entries are in slot order (their order within a slot, so
// every float, is the serial one); otherwise on this thread. `written`
// holds `slots` bytes: nothing here allocates.
template <typename RowOf>
void WriteActivationsParallel(const std::vector<Entry>& entries, int64_t dim,
                              int64_t slots, const RowOf& row_of,
                              uint8_t* written, float* out,
                              const ParallelFor& parallel_for) {
  const auto before = [](const Entry& e, int64_t slot) {
    return e.slot < slot;
  };
  const Entry* begin = entries.data();
  const Entry* end = begin + entries.size();
  const bool in_slot_order =
      std::is_sorted(begin, end, [](const Entry& a, const Entry& b) {
        return a.slot < b.slot;
      });
  if (!in_slot_order) {
    WriteActivationSlots(begin, entries.size(), dim, 0, slots, row_of, written,
                         out);
    return;
  }
  // About 4 cycles per float of each entry's row, and the slot's zeroing.
  const int64_t cost =
      dim * (4 * static_cast<int64_t>(entries.size()) / slots + 1);
  parallel_for(slots, cost, [&](int64_t s0, int64_t s1) {
    const Entry* first = std::lower_bound(begin, end, s0, before);
    const Entry* last = std::lower_bound(first, end, s1, before);
    WriteActivationSlots(first, last - first, dim, s0, s1, row_of, written,
                         out);
  });
}

}  // namespace engine
}  // namespace tpu_embed_adam

#endif  // TPU_EMBED_ADAM_CC_ENGINE_ACTIVATIONS_H_
