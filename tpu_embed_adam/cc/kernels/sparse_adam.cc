// The update of sparse_adam.h. Results are bit-identical to
// tpu_embed_adam/reference.py: every float32 operation happens in the
// reference's order, nothing is fused into an FMA, and sqrt and division are
// the IEEE-exact instructions numpy uses.
//
// Plan of one step: hash-partition the input positions by row (parallel over
// input chunks), dedupe each partition with a small open-addressing table into
// groups of positions per distinct row kept in input order (parallel over
// partitions), then update the distinct rows in parallel, one fused pass over
// `dim` per row. Non-lazy mode sorts the distinct rows and streams the whole
// table in parallel row ranges, stepping absent runs of rows as flat spans.
#include "tpu_embed_adam/cc/kernels/sparse_adam.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <utility>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

// numpy rounds after every operation; left alone, GCC and Clang contract
// a * b + c into one FMA even in ISO mode, which changes the last bit.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace tpu_embed_adam {
namespace {

#if defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

// GCC vectorises std::sqrt only under -fno-math-errno, which TensorFlow's
// compile flags do not set, so the vector square root is spelt out. All of
// these instructions are correctly rounded, like std::sqrt.
inline Vec Sqrt(Vec x) {
#if defined(__AVX__)
  return _mm256_sqrt_ps(x);
#elif defined(__SSE2__)
  return _mm_sqrt_ps(x);
#elif defined(__aarch64__)
  return (Vec)vsqrtq_f32((float32x4_t)x);
#else
  for (int i = 0; i < kLanes; ++i) x[i] = std::sqrt(x[i]);
  return x;
#endif
}
inline float Sqrt(float x) { return std::sqrt(x); }

inline Vec Load(const float* p) {
  Vec x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
inline void Store(float* p, Vec x) { std::memcpy(p, &x, sizeof(x)); }

Vec Splat(float x) {
  Vec out;
  for (int i = 0; i < kLanes; ++i) out[i] = x;
  return out;
}

// The per-step constants, float32 values computed the way the reference
// computes them; T is float, or Vec for the same values in every lane.
template <typename T>
struct Consts {
  T lr, decay, b1, one_minus_b1, b2, one_minus_b2, eps_inside, eps_outside;
  T grad_min, grad_max, weight_min, weight_max;
};

Consts<Vec> Broadcast(const Consts<float>& c) {
  return {Splat(c.lr),           Splat(c.decay),       Splat(c.b1),
          Splat(c.one_minus_b1), Splat(c.b2),          Splat(c.one_minus_b2),
          Splat(c.eps_inside),   Splat(c.eps_outside), Splat(c.grad_min),
          Splat(c.grad_max),     Splat(c.weight_min),  Splat(c.weight_max)};
}

Consts<float> MakeConsts(const AdamConfig& cfg, float lr) {
  Consts<float> c;
  c.lr = lr;
  c.decay = cfg.multiply_weight_decay_factor_by_learning_rate
                ? cfg.weight_decay_factor * lr
                : cfg.weight_decay_factor;
  c.b1 = cfg.beta1;
  c.one_minus_b1 = 1.0f - cfg.beta1;
  c.b2 = cfg.beta2;
  c.one_minus_b2 = 1.0f - cfg.beta2;
  // sqrt(v + eps^2) + 0 and sqrt(v + 0) + eps are exactly the two reference
  // forms (v >= +0), so one branch-free formula serves both.
  c.eps_inside = cfg.sum_inside_sqrt ? cfg.epsilon * cfg.epsilon : 0.0f;
  c.eps_outside = cfg.sum_inside_sqrt ? 0.0f : cfg.epsilon;
  c.grad_min = cfg.clip_gradient_min;
  c.grad_max = cfg.clip_gradient_max;
  c.weight_min = cfg.clip_weight_min;
  c.weight_max = cfg.clip_weight_max;
  return c;
}

// Written as compare-and-select so that NaN passes through, as in np.clip.
template <typename T>
inline T Clip(T x, T lo, T hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

// One step on one float or one Vec of lanes (reference.adam_update's `step`).
template <typename T>
inline void Step(const Consts<T>& c, T g, T& w, T& m, T& v) {
  g = Clip(g, c.grad_min, c.grad_max);
  w = w - c.decay * w;
  m = c.b1 * m + c.one_minus_b1 * g;
  v = c.b2 * v + c.one_minus_b2 * g * g;
  w = w - c.lr * m / (Sqrt(v + c.eps_inside) + c.eps_outside);
  w = Clip(w, c.weight_min, c.weight_max);
}

// Steps `len` consecutive floats of w, m, v with gradient g, or with a zero
// gradient when kHasGrad is false (absent rows of non-lazy mode, which are
// contiguous runs of the table and so one flat span).
template <bool kHasGrad>
void StepSpan(const Consts<float>& c, const float* __restrict g,
              float* __restrict w, float* __restrict m, float* __restrict v,
              int64_t len) {
  const Consts<Vec> cv = Broadcast(c);
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    Vec gj = kHasGrad ? Load(g + j) : Vec{};
    Vec wj = Load(w + j), mj = Load(m + j), vj = Load(v + j);
    Step(cv, gj, wj, mj, vj);
    Store(w + j, wj);
    Store(m + j, mj);
    Store(v + j, vj);
  }
  for (; j < len; ++j) {
    Step(c, kHasGrad ? g[j] : 0.0f, w[j], m[j], v[j]);
  }
}

void AddTo(float* __restrict acc, const float* __restrict g, int64_t len) {
  for (int64_t j = 0; j < len; ++j) acc[j] += g[j];
}

// Input positions grouped by distinct row: group u is row `row[u]` and its
// positions are positions[begin[u], end[u]), in input order.
struct RowGroups {
  std::unique_ptr<int64_t[]> positions;
  std::vector<int64_t> row, begin, end;
};

// Fibonacci hashing: the top bits of the product are well mixed even for
// consecutive or strided ids.
inline uint64_t Hash(int64_t id) {
  return static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull;
}

// About this many positions per partition keeps each dedupe table in L2.
constexpr int64_t kPartitionTarget = 4096;
constexpr int kMaxPartitionBits = 8;

int PartitionBits(int64_t n) {
  int bits = 0;
  while (bits < kMaxPartitionBits && (n >> bits) > 2 * kPartitionTarget) {
    ++bits;
  }
  return bits;
}

template <typename Index>
RowGroups GroupByRow(const Index* ids, int64_t n, int64_t rows,
                     const ParallelFor& parallel_for) {
  const int pbits = PartitionBits(n);
  const int64_t num_parts = int64_t{1} << pbits;
  auto part_of = [pbits](int64_t id) -> int64_t {
    return pbits == 0 ? 0 : static_cast<int64_t>(Hash(id) >> (64 - pbits));
  };

  // Stage 1: scatter positions into partitions, partition-major and chunk by
  // chunk, so that each partition lists its positions in input order.
  std::unique_ptr<int64_t[]> part_pos(new int64_t[n]);
  std::vector<int64_t> part_begin(num_parts + 1, 0);
  if (num_parts == 1) {
    std::iota(part_pos.get(), part_pos.get() + n, int64_t{0});
  } else {
    const int64_t chunk = std::max<int64_t>(kPartitionTarget, (n + 63) / 64);
    const int64_t num_chunks = (n + chunk - 1) / chunk;
    std::vector<int64_t> cursor(num_chunks * num_parts, 0);
    parallel_for(num_chunks, chunk * 4, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* hist = &cursor[c * num_parts];
        for (int64_t i = c * chunk, e = std::min(n, i + chunk); i < e; ++i) {
          ++hist[part_of(ids[i])];
        }
      }
    });
    int64_t offset = 0;
    for (int64_t p = 0; p < num_parts; ++p) {
      part_begin[p] = offset;
      for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t count = cursor[c * num_parts + p];
        cursor[c * num_parts + p] = offset;
        offset += count;
      }
    }
    parallel_for(num_chunks, chunk * 4, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* next = &cursor[c * num_parts];
        for (int64_t i = c * chunk, e = std::min(n, i + chunk); i < e; ++i) {
          part_pos[next[part_of(ids[i])]++] = i;
        }
      }
    });
  }
  part_begin[num_parts] = n;

  // Stage 2: dedupe each partition. Partition p writes its groups into
  // [part_begin[p], part_begin[p] + distinct[p]) of the scratch arrays and
  // its grouped positions into positions[part_begin[p], part_begin[p + 1]).
  RowGroups groups;
  groups.positions.reset(new int64_t[n]);
  std::unique_ptr<int64_t[]> scratch_row(new int64_t[n]);
  std::unique_ptr<int64_t[]> scratch_end(new int64_t[n]);
  std::vector<int64_t> distinct(num_parts, 0);
  const int64_t cost_per_part = 40 * (n / num_parts + 1);
  parallel_for(num_parts, cost_per_part, [&](int64_t p0, int64_t p1) {
    std::vector<int64_t> slot_key, slot_group, group_of, count;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t base = part_begin[p];
      const int64_t size = part_begin[p + 1] - base;
      if (size == 0) continue;
      int sbits = 3;
      while ((int64_t{1} << sbits) < 2 * std::min(size, rows)) ++sbits;
      const uint64_t mask = (uint64_t{1} << sbits) - 1;
      slot_key.resize(mask + 1);
      slot_group.assign(mask + 1, -1);
      group_of.resize(size);
      count.clear();
      int64_t* group_row = &scratch_row[base];
      for (int64_t t = 0; t < size; ++t) {
        const int64_t id = static_cast<int64_t>(ids[part_pos[base + t]]);
        // The bits below the partition bits: the partition bits are equal
        // within a partition.
        uint64_t s = (Hash(id) << pbits) >> (64 - sbits);
        while (slot_group[s] >= 0 && slot_key[s] != id) s = (s + 1) & mask;
        if (slot_group[s] < 0) {
          slot_group[s] = static_cast<int64_t>(count.size());
          slot_key[s] = id;
          group_row[count.size()] = id;
          count.push_back(0);
        }
        ++count[slot_group[s]];
        group_of[t] = slot_group[s];
      }
      // Counts become cursors into positions, then ends once filled.
      int64_t offset = base;
      for (int64_t& c : count) {
        const int64_t size_g = c;
        c = offset;
        offset += size_g;
      }
      for (int64_t t = 0; t < size; ++t) {
        groups.positions[count[group_of[t]]++] = part_pos[base + t];
      }
      std::copy(count.begin(), count.end(), &scratch_end[base]);
      distinct[p] = static_cast<int64_t>(count.size());
    }
  });

  // Stage 3: compact the partitions' groups into one list.
  std::vector<int64_t> first(num_parts + 1, 0);
  for (int64_t p = 0; p < num_parts; ++p) first[p + 1] = first[p] + distinct[p];
  const int64_t total = first[num_parts];
  groups.row.resize(total);
  groups.begin.resize(total);
  groups.end.resize(total);
  for (int64_t p = 0; p < num_parts; ++p) {
    const int64_t base = part_begin[p];
    for (int64_t k = 0; k < distinct[p]; ++k) {
      const int64_t u = first[p] + k;
      groups.row[u] = scratch_row[base + k];
      groups.end[u] = scratch_end[base + k];
      groups.begin[u] = k == 0 ? base : scratch_end[base + k - 1];
    }
  }
  return groups;
}

// Rows of a sparse step are scattered over the table, so the hardware
// prefetcher sees one short stream per row and every row start misses; asking
// for rows a few groups ahead overlaps those misses.
constexpr int64_t kPrefetchAhead = 4;

inline void PrefetchRow(const float* row, int64_t dim) {
  constexpr int64_t kFloatsPerLine = 64 / sizeof(float);
  for (int64_t j = 0; j < dim; j += kFloatsPerLine) __builtin_prefetch(row + j);
}

void PrefetchGroup(const TableShard& shard, const float* grads,
                   const RowGroups& groups, int64_t u) {
  const int64_t dim = shard.dim;
  const int64_t offset = groups.row[u] * dim;
  PrefetchRow(shard.w + offset, dim);
  PrefetchRow(shard.m + offset, dim);
  PrefetchRow(shard.v + offset, dim);
  PrefetchRow(grads + groups.positions[groups.begin[u]] * dim, dim);
}

// Updates the row of group u: one step with the float32 sum of its
// gradients (accumulation on), or one step per occurrence in input order.
void StepGroup(const AdamConfig& cfg, const Consts<float>& c,
               const TableShard& shard, const float* grads,
               const RowGroups& groups, int64_t u, std::vector<float>& acc) {
  const int64_t dim = shard.dim;
  const int64_t offset = groups.row[u] * dim;
  float* w = shard.w + offset;
  float* m = shard.m + offset;
  float* v = shard.v + offset;
  const int64_t* pos = groups.positions.get();
  const int64_t b = groups.begin[u], e = groups.end[u];
  if (!cfg.gradient_accumulation) {
    for (int64_t k = b; k < e; ++k) {
      if (k + kPrefetchAhead < e) PrefetchRow(grads + pos[k + kPrefetchAhead] * dim, dim);
      StepSpan<true>(c, grads + pos[k] * dim, w, m, v, dim);
    }
    return;
  }
  const float* g = grads + pos[b] * dim;
  if (e - b > 1) {
    // Summed from zero in input order, as the reference sums.
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k = b; k < e; ++k) {
      if (k + kPrefetchAhead < e) PrefetchRow(grads + pos[k + kPrefetchAhead] * dim, dim);
      AddTo(acc.data(), grads + pos[k] * dim, dim);
    }
    g = acc.data();
  }
  StepSpan<true>(c, g, w, m, v, dim);
}

}  // namespace

template <typename Index>
int64_t FindOutOfRange(const Index* ids, int64_t n, int64_t rows) {
  // Branch-free scans of blocks vectorise; only a bad block is searched.
  constexpr int64_t kBlock = 1024;
  const uint64_t limit = static_cast<uint64_t>(rows);
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    bool bad = false;
    for (int64_t i = b; i < e; ++i) {
      // Negative ids wrap to huge unsigned values.
      bad |= static_cast<uint64_t>(static_cast<int64_t>(ids[i])) >= limit;
    }
    if (!bad) continue;
    for (int64_t i = b; i < e; ++i) {
      if (static_cast<uint64_t>(static_cast<int64_t>(ids[i])) >= limit) return i;
    }
  }
  return -1;
}

int64_t FindNonFinite(const float* values, int64_t n) {
  constexpr int64_t kBlock = 4096;
  constexpr float kMax = std::numeric_limits<float>::max();
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    bool bad = false;
    // False for NaN and +-inf alike.
    for (int64_t i = b; i < e; ++i) bad |= !(std::fabs(values[i]) <= kMax);
    if (!bad) continue;
    for (int64_t i = b; i < e; ++i) {
      if (!(std::fabs(values[i]) <= kMax)) return i;
    }
  }
  return -1;
}

template <typename Index>
void ApplySparseAdam(const AdamConfig& cfg, float lr, const TableShard& shard,
                     const Index* ids, const float* grads, int64_t n,
                     const ParallelFor& parallel_for) {
  const Consts<float> c = MakeConsts(cfg, lr);
  const int64_t dim = shard.dim;
  // Without accumulation the reference steps per occurrence only, whatever
  // lazy_adam says (TF forbids that combination with non-lazy Adam).
  const bool stream_table = !cfg.lazy && cfg.gradient_accumulation;
  if (dim == 0 || (n == 0 && !stream_table)) return;
  const RowGroups groups = GroupByRow(ids, n, shard.rows, parallel_for);
  const int64_t total = static_cast<int64_t>(groups.row.size());

  if (!stream_table) {
    const int64_t cost = dim * (4 * n / std::max<int64_t>(total, 1) + 20);
    parallel_for(total, cost, [&](int64_t u0, int64_t u1) {
      std::vector<float> acc(dim);
      for (int64_t u = u0; u < u1; ++u) {
        if (u + kPrefetchAhead < u1) {
          PrefetchGroup(shard, grads, groups, u + kPrefetchAhead);
        }
        StepGroup(cfg, c, shard, grads, groups, u, acc);
      }
    });
    return;
  }

  // Non-lazy: present rows in table order, so each range of the table finds
  // its present rows by binary search and steps the runs between them flat.
  std::vector<std::pair<int64_t, int64_t>> present(total);
  for (int64_t u = 0; u < total; ++u) present[u] = {groups.row[u], u};
  std::sort(present.begin(), present.end());
  const int64_t cost = dim * (4 * n / std::max<int64_t>(shard.rows, 1) + 20);
  parallel_for(shard.rows, cost, [&](int64_t r0, int64_t r1) {
    std::vector<float> acc(dim);
    auto it = std::lower_bound(present.begin(), present.end(),
                               std::make_pair(r0, int64_t{0}));
    int64_t r = r0;
    while (r < r1) {
      const int64_t next = (it != present.end() && it->first < r1) ? it->first : r1;
      if (next > r) {
        const int64_t offset = r * dim;
        StepSpan<false>(c, nullptr, shard.w + offset, shard.m + offset,
                        shard.v + offset, (next - r) * dim);
        r = next;
      }
      if (r < r1) {
        StepGroup(cfg, c, shard, grads, groups, it->second, acc);
        ++it;
        ++r;
      }
    }
  });
}

template int64_t FindOutOfRange<int32_t>(const int32_t*, int64_t, int64_t);
template int64_t FindOutOfRange<int64_t>(const int64_t*, int64_t, int64_t);
template void ApplySparseAdam<int32_t>(const AdamConfig&, float,
                                       const TableShard&, const int32_t*,
                                       const float*, int64_t,
                                       const ParallelFor&);
template void ApplySparseAdam<int64_t>(const AdamConfig&, float,
                                       const TableShard&, const int64_t*,
                                       const float*, int64_t,
                                       const ParallelFor&);

}  // namespace tpu_embed_adam
