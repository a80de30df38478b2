#include "tpu_embed_adam/cc/engine/accumulator.h"

#include <algorithm>

namespace tpu_embed_adam {
namespace engine {

namespace {

// Fibonacci hashing: the top bits of the product are well mixed even for
// consecutive or strided ids.
inline uint64_t RowHash(int64_t local) {
  return static_cast<uint64_t>(local) * 0x9E3779B97F4A7C15ull;
}

// The open-addressing index's size for `rows` ids: a power of two, at least
// `current` (an index never shrinks) and twice `rows`.
size_t HashCapacity(size_t current, size_t rows) {
  size_t capacity = std::max<size_t>(64, current);
  while (capacity < 2 * rows) capacity *= 2;
  return capacity;
}

}  // namespace

void Accumulator::GrowIndex(size_t rows) {
  const size_t capacity =
      HashCapacity(direct_bound_ > 0 ? 0 : index.size(), rows);
  direct_bound_ = 0;
  index.assign(capacity, 0);
  const uint64_t mask = capacity - 1;
  const int shift = 64 - __builtin_ctzll(capacity);
  for (size_t p = 0; p < ids.size(); ++p) {
    uint64_t h = RowHash(ids[p]) >> shift;
    while (index[h] != 0) h = (h + 1) & mask;
    index[h] = p + 1;
  }
}

void Accumulator::DirectIndex(int64_t bound) {
  for (const int64_t id : ids) {
    if (id < 0 || id >= bound) return GrowIndex(ids.size());
  }
  direct_bound_ = bound;
  index.assign(bound, 0);
  for (size_t p = 0; p < ids.size(); ++p) index[ids[p]] = p + 1;
}

int64_t& Accumulator::Slot(int64_t local) {
  if (direct_bound_ > 0) {
    if (local >= 0 && local < direct_bound_) return index[local];
    // An id past the bound Reserve was told of: hashed from here on.
    GrowIndex(ids.size() + 1);
  }
  if (2 * (ids.size() + 1) > index.size()) GrowIndex(ids.size() + 1);
  const uint64_t mask = index.size() - 1;
  const int shift = 64 - __builtin_ctzll(index.size());
  for (uint64_t h = RowHash(local) >> shift;; h = (h + 1) & mask) {
    int64_t& slot = index[h];
    if (slot == 0 || ids[slot - 1] == local) return slot;
  }
}

std::pair<int64_t, bool> Accumulator::Place(int64_t dim, bool accumulate,
                                           int64_t local) {
  if (accumulate) {
    int64_t& slot = Slot(local);
    if (slot != 0) return {slot - 1, false};
    slot = ids.size() + 1;
  }
  ids.push_back(local);
  // Grow by a whole row: one size check per row.
  grads.resize(grads.size() + dim);
  return {static_cast<int64_t>(ids.size()) - 1, true};
}

void Accumulator::Add(int64_t dim, bool accumulate, int64_t local, float scale,
                      const float* g) {
  const auto [row, first] = Place(dim, accumulate, local);
  float* dst = grads.data() + row * dim;
  if (first) {
    // `0.0f +` is the sum's start, not a no-op: it turns -0 into +0 as
    // ApplySparseAdam's sum from zero does.
    for (int64_t j = 0; j < dim; ++j) dst[j] = 0.0f + scale * g[j];
  } else {
    for (int64_t j = 0; j < dim; ++j) dst[j] += scale * g[j];
  }
}

void Accumulator::Queue(int64_t dim, bool accumulate, int64_t local,
                        float scale, const float* g) {
  const auto [row, first] = Place(dim, accumulate, local);
  pending_.push_back({row, g, scale, first});
}

void Accumulator::Flush(int64_t dim, const ParallelFor& parallel_for) {
  const int64_t rows = ids.size();
  const int64_t adds = pending_.size();
  if (adds == 0) return;
  // A few row ranges, each worker reading every queued add and doing its
  // own: rereading the list costs far less than the rows' arithmetic.
  const int64_t parts = std::min<int64_t>(8, rows / 512 + 1);
  parallel_for(parts, 4 * dim * adds / parts + adds, [&](int64_t p0,
                                                        int64_t p1) {
    const int64_t begin = rows * p0 / parts, end = rows * p1 / parts;
    for (const Pending& a : pending_) {
      if (a.row < begin || a.row >= end) continue;
      float* dst = grads.data() + a.row * dim;
      if (a.first) {
        for (int64_t j = 0; j < dim; ++j) dst[j] = 0.0f + a.scale * a.g[j];
      } else {
        for (int64_t j = 0; j < dim; ++j) dst[j] += a.scale * a.g[j];
      }
    }
  });
  pending_.clear();
}

void Accumulator::Reserve(int64_t more, int64_t dim, bool accumulate,
                          int64_t id_bound) {
  const size_t rows = ids.size() + more;
  ids.reserve(rows);
  grads.reserve(rows * dim);
  pending_.reserve(pending_.size() + more);
  if (!accumulate) return;
  // Direct where it is no larger than the hashed index these rows need.
  if (id_bound > 0 && static_cast<size_t>(id_bound) <= HashCapacity(0, rows)) {
    if (direct_bound_ != id_bound) DirectIndex(id_bound);
  } else if (direct_bound_ > 0 || 2 * rows > index.size()) {
    GrowIndex(rows);
  }
}

void Accumulator::Append(const Accumulator& from) {
  ids.insert(ids.end(), from.ids.begin(), from.ids.end());
  grads.insert(grads.end(), from.grads.begin(), from.grads.end());
}

void Accumulator::Clear() {
  ids.clear();
  grads.clear();
  pending_.clear();
  std::fill(index.begin(), index.end(), 0);
}

}  // namespace engine
}  // namespace tpu_embed_adam
