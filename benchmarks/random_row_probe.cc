// The random-row probe: what a lazy sparse Adam step's memory traffic costs
// with no arithmetic at all, the limit of that access pattern on this host.
//
// For the distinct rows of a step (the rows the fused kernel updates), each
// of three tables' rows is read and written back unchanged, as the kernel
// reads and writes the table, m and v; and every gradient row is read once,
// in order, as the kernel sums them. Work is split evenly over `threads`
// threads (the kernel runs on the intra-op pool, one thread per core), each
// taking a contiguous share of the rows and of the gradients and
// prefetching its rows `ahead` rows early, as the kernel does.
//
// Built by benchmarks/bench_update.py with g++ -O3 -mavx (not part of the
// package library) and called through ctypes; plain C entry points below.
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr int64_t kFloatsPerLine = 64 / sizeof(float);

struct Probe {
  int64_t rows = 0;
  int64_t dim = 0;
  float* tables[3] = {nullptr, nullptr, nullptr};
};

// Zeroed, 2 MB aligned, on transparent huge pages where the host gives them
// on request: the kernel's variables get huge pages too (core/huge_pages).
float* AllocateTable(int64_t floats) {
  const size_t bytes =
      (floats * sizeof(float) + kHugePage - 1) / kHugePage * kHugePage;
  void* data = std::aligned_alloc(kHugePage, bytes);
  if (data == nullptr) return nullptr;
  madvise(data, bytes, MADV_HUGEPAGE);
  std::memset(data, 0, bytes);
  return static_cast<float*>(data);
}

inline void Prefetch(const float* row, int64_t dim) {
  for (int64_t j = 0; j < dim; j += kFloatsPerLine) __builtin_prefetch(row + j);
}

// Loads and stores back each float of the row. The empty asm makes the
// compiler keep both: it may not assume the value unchanged in between.
inline void RewriteRow(float* row, int64_t dim) {
  int64_t j = 0;
  for (; j + 8 <= dim; j += 8) {
    __m256 x = _mm256_loadu_ps(row + j);
    asm volatile("" : "+x"(x));
    _mm256_storeu_ps(row + j, x);
  }
  for (; j < dim; ++j) {
    float x = row[j];
    asm volatile("" : "+x"(x));
    row[j] = x;
  }
}

inline void ReadRow(const float* row, int64_t dim) {
  int64_t j = 0;
  for (; j + 8 <= dim; j += 8) {
    __m256 x = _mm256_loadu_ps(row + j);
    asm volatile("" : : "x"(x));
  }
  for (; j < dim; ++j) {
    float x = row[j];
    asm volatile("" : : "x"(x));
  }
}

void Work(const Probe& p, const int64_t* ids, int64_t count,
          const float* grads, int64_t n, int ahead) {
  const int64_t dim = p.dim;
  for (int64_t i = 0; i < count; ++i) {
    if (ahead > 0 && i + ahead < count) {
      for (float* table : p.tables) Prefetch(table + ids[i + ahead] * dim, dim);
    }
    for (float* table : p.tables) RewriteRow(table + ids[i] * dim, dim);
  }
  for (int64_t i = 0; i < n; ++i) ReadRow(grads + i * dim, dim);
}

// Seconds of each of `passes` passes on `threads` threads: this one and
// threads - 1 started once, so that no pass includes starting a thread (or
// a thread that only waits: there may be no spare core). A pass runs from
// its start until the last thread ends it.
std::vector<double> TimedPasses(const Probe& p, const int64_t* ids,
                                int64_t count, const float* grads, int64_t n,
                                int threads, int ahead, int passes) {
  std::atomic<int> pass{-1};  // the pass the threads may start
  std::atomic<int> done{0};   // threads that ended the current pass
  const auto share = [&](int t) {
    const int64_t r0 = count * t / threads, r1 = count * (t + 1) / threads;
    const int64_t g0 = n * t / threads, g1 = n * (t + 1) / threads;
    Work(p, ids + r0, r1 - r0, grads + g0 * p.dim, g1 - g0, ahead);
    done.fetch_add(1, std::memory_order_acq_rel);
  };
  std::vector<std::thread> others;
  for (int t = 1; t < threads; ++t) {
    others.emplace_back([&, t] {
      for (int k = 0; k < passes; ++k) {
        while (pass.load(std::memory_order_acquire) < k) {
          std::this_thread::yield();
        }
        share(t);
      }
    });
  }
  std::vector<double> seconds;
  for (int k = 0; k < passes; ++k) {
    // Every thread has ended the previous pass.
    while (done.load(std::memory_order_acquire) < threads * k) {
      std::this_thread::yield();
    }
    const auto start = std::chrono::steady_clock::now();
    pass.store(k, std::memory_order_release);
    share(0);
    while (done.load(std::memory_order_acquire) < threads * (k + 1)) {
      std::this_thread::yield();
    }
    seconds.push_back(std::chrono::duration<double>(
                          std::chrono::steady_clock::now() - start)
                          .count());
  }
  for (std::thread& t : others) t.join();
  return seconds;
}

}  // namespace

extern "C" {

// Three zeroed tables of rows x dim floats; null if memory ran out.
void* probe_create(int64_t rows, int64_t dim) {
  auto* p = new Probe;
  p->rows = rows;
  p->dim = dim;
  for (float*& table : p->tables) {
    table = AllocateTable(rows * dim);
    if (table == nullptr) {
      for (float* t : p->tables) std::free(t);
      delete p;
      return nullptr;
    }
  }
  return p;
}

void probe_destroy(void* probe) {
  auto* p = static_cast<Probe*>(probe);
  for (float* table : p->tables) std::free(table);
  delete p;
}

// The median seconds of `repeats` passes after one unmeasured pass: `count`
// distinct rows `ids` (each in [0, rows)) of the three tables rewritten,
// and `n` gradient rows of `dim` floats at `grads` read.
double probe_run(void* probe, const int64_t* ids, int64_t count,
                 const float* grads, int64_t n, int threads, int ahead,
                 int repeats) {
  const Probe& p = *static_cast<Probe*>(probe);
  std::vector<double> seconds =
      TimedPasses(p, ids, count, grads, n, threads, ahead, repeats + 1);
  seconds.erase(seconds.begin());  // the first pass warms the caches
  std::sort(seconds.begin(), seconds.end());
  return seconds[seconds.size() / 2];
}

}  // extern "C"
