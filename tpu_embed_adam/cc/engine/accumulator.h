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
#include <vector>

namespace tpu_embed_adam {
namespace engine {

struct Accumulator {
  std::vector<int64_t> ids;
  std::vector<float> grads;  // ids.size() rows of the table's dimension
  // Open-addressing index of `ids` (1 + position; 0 is an empty slot), a
  // power of two at least twice ids' size; all zeros when empty. Used only
  // with accumulation.
  std::vector<int64_t> index;

  // Adds scale * g (dim floats) to the row of `local`: a local id's first
  // row is 0 + scale * g and later ones add to it with accumulation;
  // without, every call appends a row.
  void Add(int64_t dim, bool accumulate, int64_t local, float scale,
           const float* g);
  // Makes room for `more` Add calls (rows of `dim` floats), so that they
  // allocate nothing: a failed allocation happens here, before any row is
  // added.
  void Reserve(int64_t more, int64_t dim, bool accumulate);
  // Appends `from`'s rows as rows of their own (the index is not updated:
  // for a list handed to ApplySparseAdam, not for further Adds).
  void Append(const Accumulator& from);
  // Empties the accumulator, keeping its capacity for the next step.
  void Clear();
  int64_t Bytes() const {
    return grads.size() * sizeof(float) + ids.size() * sizeof(int64_t);
  }

 private:
  // Resizes and refills the index for at least `rows` ids.
  void GrowIndex(size_t rows);
};

}  // namespace engine
}  // namespace tpu_embed_adam

#endif  // TPU_EMBED_ADAM_CC_ENGINE_ACCUMULATOR_H_
