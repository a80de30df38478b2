// One step's (local id, gradient row) pairs of one core for one table shard
// (on the sending core of a multi-process step: for the rows one owner will
// get), handed to ApplySparseAdam when the step completes.
//
// With accumulation it holds one row per distinct local id, in the order the
// ids first arrive, each the sum from zero of that id's gradient rows in
// arrival order: the sum ApplySparseAdam would form from one row per
// occurrence, bit for bit (a sum started from +0 is never -0, so the
// update's own 0 + row returns the row unchanged). Without, it keeps one row
// per occurrence.
#ifndef TPU_EMBED_ADAM_CC_ENGINE_ACCUMULATOR_H_
#define TPU_EMBED_ADAM_CC_ENGINE_ACCUMULATOR_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "tpu_embed_adam/cc/core/sparse_adam.h"

namespace tpu_embed_adam {
namespace engine {

// An allocator whose resize leaves new floats uninitialised: every row is
// written whole before it is read, so zeroing it first would only cost a
// pass over memory.
template <typename T>
struct UninitializedAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = UninitializedAllocator<U>;
  };
  template <typename U>
  void construct(U* p) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

using Floats = std::vector<float, UninitializedAllocator<float>>;

struct Accumulator {
  std::vector<int64_t> ids;
  Floats grads;  // ids.size() rows of the table's dimension
  // Index of `ids` (1 + position; 0 is an empty slot); all zeros when
  // empty. Used only with accumulation. Open addressing, a power of two at
  // least twice ids' size; or, when Reserve says the local ids are fewer
  // than such a table's slots, direct: slot `local` (no hashing, no probes,
  // and a smaller array to miss in: a small table's many repeats).
  std::vector<int64_t> index;

  // Adds scale * g (dim floats) to the row of `local`: a local id's first
  // row is 0 + scale * g and later ones add to it with accumulation;
  // without, every call appends a row.
  void Add(int64_t dim, bool accumulate, int64_t local, float scale,
           const float* g);
  // Add in two phases, for a step's many rows: Queue finds or makes the
  // row of `local` now, in call order, and notes the add; Flush does the
  // arithmetic of every queued add on the workers of `parallel_for`, each
  // worker a range of rows with their adds in call order, so every row is
  // the float Add would make. `g` must stay valid until Flush.
  void Queue(int64_t dim, bool accumulate, int64_t local, float scale,
             const float* g);
  void Flush(int64_t dim, const ParallelFor& parallel_for);
  // Makes room for `more` Add or Queue calls (rows of `dim` floats), so that
  // they and Flush allocate nothing: a failed allocation happens here,
  // before any row is added. `id_bound` > 0: every local id to come is below
  // it (the shard's rows), which lets the index be direct.
  void Reserve(int64_t more, int64_t dim, bool accumulate,
               int64_t id_bound = 0);
  // Appends `from`'s rows as rows of their own (the index is not updated:
  // for a list handed to ApplySparseAdam, not for further Adds).
  void Append(const Accumulator& from);
  // Empties the accumulator, keeping its capacity for the next step.
  void Clear();
  int64_t Bytes() const {
    return grads.size() * sizeof(float) + ids.size() * sizeof(int64_t);
  }

 private:
  // A queued add: scale * g into row `row`, which it starts (0 + scale * g)
  // if `first`.
  struct Pending {
    int64_t row;
    const float* g;
    float scale;
    bool first;
  };

  // The row of `local` (appending it if new, or always without
  // accumulation, its floats not yet written), and whether it is new.
  std::pair<int64_t, bool> Place(int64_t dim, bool accumulate, int64_t local);
  // Resizes and refills the index for at least `rows` ids, hashed.
  void GrowIndex(size_t rows);
  // Makes the index direct over local ids below `bound`, refilled (hashed
  // if an id already held is not below it).
  void DirectIndex(int64_t bound);
  // The index slot of `local`: its row's (1 + position), or the empty slot
  // where it goes.
  int64_t& Slot(int64_t local);

  std::vector<Pending> pending_;
  // > 0: the index is direct over local ids below it.
  int64_t direct_bound_ = 0;
};

}  // namespace engine
}  // namespace tpu_embed_adam

#endif  // TPU_EMBED_ADAM_CC_ENGINE_ACCUMULATOR_H_
