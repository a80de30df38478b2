// The update of sparse_adam.h. Results are bit-identical to
// tpu_embed_adam/reference.py: every float32 operation happens in the
// reference's order, nothing is fused into an FMA, and sqrt and division are
// the IEEE-exact instructions numpy uses.
//
// Plan of one step: hash-partition the input positions by row (parallel over
// input chunks) and dedupe each partition with a small open-addressing table
// into groups, one per distinct row (parallel over partitions). With
// accumulation, one thread sums each group's gradients in one forward pass
// over the gradients while the others update the rows whose sums are
// complete, one fused pass over `dim` per row; without, list each group's
// positions and step the rows in parallel, once per occurrence. Non-lazy mode
// sums first, sorts the distinct rows and streams the whole table in parallel
// row ranges, stepping absent runs of rows as flat spans.
#include "tpu_embed_adam/cc/core/sparse_adam.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <thread>
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

// The distinct rows of one step's ids. Positions are hash-partitioned by id;
// partition p holds part_pos[part_begin[p], part_begin[p + 1]) in input order,
// and position part_pos[t] belongs to its partition's group local[t]. Groups
// are numbered partition by partition: group u = first[p] + local[t] is row
// row[u]. One Grouping per calling thread is reused from step to step, so its
// buffers keep their capacity (O(ids x dim), never O(table)): fresh buffers
// of this size page-fault on every step, which cost as much as the grouping.
struct Grouping {
  int pbits = 0;
  std::vector<int64_t> part_pos, part_begin, cursor, local, first;
  // Per group u: its row, and the positions of its first and last
  // occurrences.
  std::vector<int64_t> part_row, part_first_pos, part_last_pos;
  std::vector<int64_t> row, first_pos, last_pos;
  // Filled on demand: per-group gradient sums [groups, dim], the group of
  // each position, and the groups (and their rows) in the order their sums
  // complete; or the positions of each group,
  // positions[offset[u], offset[u + 1]), in input order.
  std::vector<float> sums;
  std::vector<int64_t> group_of, ready, ready_row;
  std::vector<int64_t> positions, offset;

  int64_t num_parts() const { return int64_t{1} << pbits; }
  int64_t groups() const { return first.back(); }
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
void GroupByRow(const Index* ids, int64_t n, int64_t rows,
                const ParallelFor& parallel_for, Grouping& gr) {
  const int pbits = gr.pbits = PartitionBits(n);
  const int64_t num_parts = gr.num_parts();
  auto part_of = [pbits](int64_t id) -> int64_t {
    return pbits == 0 ? 0 : static_cast<int64_t>(Hash(id) >> (64 - pbits));
  };

  // Stage 1: scatter positions into partitions, partition-major and chunk by
  // chunk, so that each partition lists its positions in input order.
  gr.part_pos.resize(n);
  gr.part_begin.assign(num_parts + 1, 0);
  if (num_parts == 1) {
    std::iota(gr.part_pos.begin(), gr.part_pos.end(), int64_t{0});
  } else {
    const int64_t chunk = std::max<int64_t>(kPartitionTarget, (n + 63) / 64);
    const int64_t num_chunks = (n + chunk - 1) / chunk;
    gr.cursor.assign(num_chunks * num_parts, 0);
    parallel_for(num_chunks, chunk * 4, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* hist = &gr.cursor[c * num_parts];
        for (int64_t i = c * chunk, e = std::min(n, i + chunk); i < e; ++i) {
          ++hist[part_of(ids[i])];
        }
      }
    });
    int64_t offset = 0;
    for (int64_t p = 0; p < num_parts; ++p) {
      gr.part_begin[p] = offset;
      for (int64_t c = 0; c < num_chunks; ++c) {
        int64_t& cur = gr.cursor[c * num_parts + p];
        const int64_t count = cur;
        cur = offset;
        offset += count;
      }
    }
    parallel_for(num_chunks, chunk * 4, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* next = &gr.cursor[c * num_parts];
        for (int64_t i = c * chunk, e = std::min(n, i + chunk); i < e; ++i) {
          gr.part_pos[next[part_of(ids[i])]++] = i;
        }
      }
    });
  }
  gr.part_begin[num_parts] = n;

  // Stage 2: dedupe each partition; its groups' rows go to
  // part_row[part_begin[p], part_begin[p] + distinct).
  gr.local.resize(n);
  gr.part_row.resize(n);
  gr.part_first_pos.resize(n);
  gr.part_last_pos.resize(n);
  std::vector<int64_t> distinct(num_parts, 0);
  const int64_t cost_per_part = 40 * (n / num_parts + 1);
  parallel_for(num_parts, cost_per_part, [&](int64_t p0, int64_t p1) {
    std::vector<int64_t> slot_key, slot_group;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t base = gr.part_begin[p];
      const int64_t size = gr.part_begin[p + 1] - base;
      if (size == 0) continue;
      int sbits = 3;
      while ((int64_t{1} << sbits) < 2 * std::min(size, rows)) ++sbits;
      const uint64_t mask = (uint64_t{1} << sbits) - 1;
      slot_key.resize(mask + 1);
      slot_group.assign(mask + 1, -1);
      int64_t count = 0;
      for (int64_t t = base; t < base + size; ++t) {
        const int64_t id = static_cast<int64_t>(ids[gr.part_pos[t]]);
        // The bits below the partition bits: the partition bits are equal
        // within a partition.
        uint64_t s = (Hash(id) << pbits) >> (64 - sbits);
        while (slot_group[s] >= 0 && slot_key[s] != id) s = (s + 1) & mask;
        if (slot_group[s] < 0) {
          slot_group[s] = count;
          slot_key[s] = id;
          gr.part_row[base + count] = id;
          gr.part_first_pos[base + count++] = gr.part_pos[t];
        }
        gr.local[t] = slot_group[s];
        gr.part_last_pos[base + slot_group[s]] = gr.part_pos[t];
      }
      distinct[p] = count;
    }
  });

  // Stage 3: number the groups and list their rows.
  gr.first.assign(num_parts + 1, 0);
  for (int64_t p = 0; p < num_parts; ++p) {
    gr.first[p + 1] = gr.first[p] + distinct[p];
  }
  gr.row.resize(gr.groups());
  gr.first_pos.resize(gr.groups());
  gr.last_pos.resize(gr.groups());
  for (int64_t p = 0; p < num_parts; ++p) {
    const int64_t base = gr.part_begin[p];
    std::copy_n(&gr.part_row[base], distinct[p], &gr.row[gr.first[p]]);
    std::copy_n(&gr.part_first_pos[base], distinct[p],
                &gr.first_pos[gr.first[p]]);
    std::copy_n(&gr.part_last_pos[base], distinct[p],
                &gr.last_pos[gr.first[p]]);
  }

  // Stage 4: the group of each position.
  gr.group_of.resize(n);
  parallel_for(num_parts, 4 * (n / num_parts + 1), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t t = gr.part_begin[p]; t < gr.part_begin[p + 1]; ++t) {
        gr.group_of[gr.part_pos[t]] = gr.first[p] + gr.local[t];
      }
    }
  });
}

// Rows of a sparse step are scattered over the table, so the hardware
// prefetcher sees only short streams and every row start misses; asking for
// rows several steps ahead keeps enough misses in flight to approach the
// memory bandwidth rather than its latency.
constexpr int64_t kRowsAhead = 4;
constexpr int64_t kGradsAhead = 8;
constexpr int64_t kSumsAhead = 8;

inline void PrefetchRow(const float* row, int64_t dim) {
  constexpr int64_t kFloatsPerLine = 64 / sizeof(float);
  for (int64_t j = 0; j < dim; j += kFloatsPerLine) __builtin_prefetch(row + j);
}

// Sums each group's gradients into gr.sums, from zero and in input order as
// the reference sums, and calls done(u) once group u's sum is complete. One
// thread reads the gradients in input order: a forward stream that the
// hardware prefetcher follows at full speed. Splitting it (each thread
// walking its partitions' positions, or its half of the columns) measured
// slower in total than one thread on the whole stream.
template <typename DoneFn>
void SumGradients(const float* grads, int64_t dim, Grouping& gr,
                  DoneFn done) {
  const int64_t n = gr.part_begin.back();
  gr.sums.resize(gr.groups() * dim);
  for (int64_t i = 0; i < n; ++i) {
    // Sum rows are scattered over the scratch: ask for a later one early.
    if (i + kSumsAhead < n) {
      PrefetchRow(&gr.sums[gr.group_of[i + kSumsAhead] * dim], dim);
    }
    const int64_t u = gr.group_of[i];
    float* sum = &gr.sums[u * dim];
    const float* g = grads + i * dim;
    if (gr.first_pos[u] == i) {
      // 0 + g: what adding to a zeroed row gives, in one pass.
      for (int64_t j = 0; j < dim; ++j) sum[j] = 0.0f + g[j];
    } else {
      AddTo(sum, g, dim);
    }
    if (gr.last_pos[u] == i) done(u);
  }
}

// Lists each group's positions in input order (for stepping per occurrence).
void ListPositions(const ParallelFor& parallel_for, Grouping& gr) {
  const int64_t n = gr.part_begin.back();
  gr.positions.resize(n);
  gr.offset.resize(gr.groups() + 1);
  gr.offset.back() = n;
  parallel_for(gr.num_parts(), 8 * (n / gr.num_parts() + 1),
               [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      // Counts become cursors into positions.
      int64_t* cursor = &gr.offset[gr.first[p]];
      const int64_t groups = gr.first[p + 1] - gr.first[p];
      std::fill(cursor, cursor + groups, 0);
      for (int64_t t = gr.part_begin[p]; t < gr.part_begin[p + 1]; ++t) {
        ++cursor[gr.local[t]];
      }
      int64_t offset = gr.part_begin[p];
      for (int64_t k = 0; k < groups; ++k) {
        const int64_t size = cursor[k];
        cursor[k] = offset;
        offset += size;
      }
      for (int64_t t = gr.part_begin[p]; t < gr.part_begin[p + 1]; ++t) {
        gr.positions[cursor[gr.local[t]]++] = gr.part_pos[t];
      }
      // Each cursor now sits at the next group's start: shift back.
      std::copy_backward(cursor, cursor + groups - 1, cursor + groups);
      if (groups > 0) cursor[0] = gr.part_begin[p];
    }
  });
}

// Calls step(u, w, m, v) for the groups [u0, u1) with their rows' pointers,
// prefetching the rows of later groups.
template <typename StepFn>
void ForEachGroupRow(const TableShard& shard, const int64_t* row, int64_t u0,
                     int64_t u1, StepFn step) {
  const int64_t dim = shard.dim;
  int64_t fetched = u0;
  for (int64_t u = u0; u < u1; ++u) {
    for (const int64_t stop = std::min(u1, u + kRowsAhead); fetched < stop;
         ++fetched) {
      const int64_t offset = row[fetched] * dim;
      PrefetchRow(shard.w + offset, dim);
      PrefetchRow(shard.m + offset, dim);
      PrefetchRow(shard.v + offset, dim);
    }
    const int64_t offset = row[u] * dim;
    step(u, shard.w + offset, shard.m + offset, shard.v + offset);
  }
}

// Lazy mode with accumulation: one worker sums the gradients (SumGradients)
// and queues each group as its sum completes; the others step queued rows
// meanwhile (the sum alone takes about half the step), and the summing worker
// joins them when done. The others wait only for a summing worker that has
// started, so the step completes whatever order, and on whichever threads,
// ParallelFor runs the workers.
void StepAsSummed(const Consts<float>& c, const TableShard& shard,
                  const float* grads, const ParallelFor& parallel_for,
                  Grouping& gr) {
  const int64_t dim = shard.dim;
  const int64_t total = gr.groups();
  gr.ready.resize(total);
  gr.ready_row.resize(total);
  // ready[0, published) may be stepped; claimed counts those taken.
  std::atomic<int64_t> published{0}, claimed{0};
  enum { kNotStarted, kSumming, kDone };
  std::atomic<int> summer{kNotStarted};
  // Groups are published and claimed this many at a time.
  constexpr int64_t kBatch = 16;
  // Claims queued groups a batch at a time and steps them, waiting for more
  // while the summing worker runs. A worker that finds the summing one not
  // started gives it a short while, then leaves: ParallelFor may run both on
  // this thread, after this one.
  auto step_queued = [&]() {
    constexpr int kStartYields = 100;
    for (int yields = 0;;) {
      int64_t k = claimed.load(std::memory_order_relaxed);
      if (k >= total) return;
      const int64_t avail = published.load(std::memory_order_acquire);
      if (k >= avail) {
        const int state = summer.load(std::memory_order_acquire);
        if (state == kDone) continue;
        if (state == kNotStarted && ++yields > kStartYields) return;
        std::this_thread::yield();
        continue;
      }
      const int64_t end = std::min(avail, k + kBatch);
      if (!claimed.compare_exchange_weak(k, end)) continue;
      ForEachGroupRow(shard, gr.ready_row.data(), k, end,
                      [&](int64_t j, float* w, float* m, float* v) {
                        StepSpan<true>(c, &gr.sums[gr.ready[j] * dim], w, m,
                                       v, dim);
                      });
    }
  };
  const int64_t n = gr.part_begin.back();
  // Workers beyond the threads available start late and find little or
  // nothing left to claim.
  const int64_t workers = std::min<int64_t>(8, 1 + total / 1024);
  parallel_for(workers, 4 * dim * (n + total), [&](int64_t w0, int64_t w1) {
    if (w0 == 0) {
      summer.store(kSumming, std::memory_order_release);
      int64_t queued = 0;
      SumGradients(grads, dim, gr, [&](int64_t u) {
        gr.ready[queued] = u;
        gr.ready_row[queued] = gr.row[u];
        if (++queued % kBatch == 0) {
          published.store(queued, std::memory_order_release);
        }
      });
      published.store(queued, std::memory_order_release);
      summer.store(kDone, std::memory_order_release);
    }
    step_queued();
  });
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
  // Concurrent steps (on other variables) run on other calling threads, so
  // the scratch is per calling thread; binding it to a C++ reference makes
  // the lambdas that pool threads run use this thread's instance. It keeps
  // its capacity (O(ids x dim) of the largest step) for the thread's life.
  thread_local Grouping scratch;
  Grouping& gr = scratch;
  GroupByRow(ids, n, shard.rows, parallel_for, gr);
  const int64_t total = gr.groups();
  const int64_t* row = gr.row.data();

  if (!cfg.gradient_accumulation) {
    ListPositions(parallel_for, gr);
    const int64_t* pos = gr.positions.data();
    const int64_t* offset = gr.offset.data();
    const int64_t cost = dim * (4 * n / std::max<int64_t>(total, 1) + 20);
    parallel_for(total, cost, [&](int64_t u0, int64_t u1) {
      // The groups' positions are contiguous: one flat sequence of gradient
      // rows to prefetch along.
      int64_t fetched = offset[u0];
      ForEachGroupRow(
          shard, row, u0, u1, [&](int64_t u, float* w, float* m, float* v) {
            for (int64_t k = offset[u]; k < offset[u + 1]; ++k) {
              for (const int64_t stop = std::min(offset[u1], k + kGradsAhead);
                   fetched < stop; ++fetched) {
                PrefetchRow(grads + pos[fetched] * dim, dim);
              }
              StepSpan<true>(c, grads + pos[k] * dim, w, m, v, dim);
            }
          });
    });
    return;
  }

  if (!stream_table) {
    StepAsSummed(c, shard, grads, parallel_for, gr);
    return;
  }

  // Non-lazy: present rows in table order, so each range of the table finds
  // its present rows by binary search and steps the runs between them flat.
  SumGradients(grads, dim, gr, [](int64_t) {});
  const float* sums = gr.sums.data();
  std::vector<std::pair<int64_t, int64_t>> present(total);
  for (int64_t u = 0; u < total; ++u) present[u] = {row[u], u};
  std::sort(present.begin(), present.end());
  parallel_for(shard.rows, dim * 20, [&](int64_t r0, int64_t r1) {
    auto it = std::lower_bound(present.begin(), present.end(),
                               std::make_pair(r0, int64_t{0}));
    int64_t r = r0;
    while (r < r1) {
      const int64_t next =
          (it != present.end() && it->first < r1) ? it->first : r1;
      const int64_t offset = r * dim;
      float* w = shard.w + offset;
      float* m = shard.m + offset;
      float* v = shard.v + offset;
      if (next > r) {
        StepSpan<false>(c, nullptr, w, m, v, (next - r) * dim);
        r = next;
      } else {
        StepSpan<true>(c, sums + it->second * dim, w, m, v, dim);
        ++it;
        ++r;
      }
    }
  });
}

void ApplySparseAdamToSums(const AdamConfig& cfg, float lr,
                           const TableShard& shard, const int64_t* ids,
                           const float* sums, int64_t n,
                           const ParallelFor& parallel_for) {
  const Consts<float> c = MakeConsts(cfg, lr);
  const int64_t dim = shard.dim;
  if (dim == 0 || n == 0) return;
  // About 20 cycles per float: three rows read and written at random.
  parallel_for(n, 20 * dim, [&](int64_t u0, int64_t u1) {
    ForEachGroupRow(shard, ids, u0, u1,
                    [&](int64_t u, float* w, float* m, float* v) {
                      StepSpan<true>(c, sums + u * dim, w, m, v, dim);
                    });
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
