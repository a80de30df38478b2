// A table as the engine holds it: its configuration, its shards (rows, Adam
// slots, gradient accumulator, rows trained since the last retrieve), where
// each id lives, and one step's update of a shard. Shared by the
// single-process step and the owner's half of a multi-process one.
#ifndef TPU_EMBED_ADAM_CC_ENGINE_TABLE_H_
#define TPU_EMBED_ADAM_CC_ENGINE_TABLE_H_

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "tpu_embed_adam/cc/core/sparse_adam.h"
#include "tpu_embed_adam/cc/engine/accumulator.h"
#include "tpu_embed_adam/cc/engine/config.h"

namespace tpu_embed_adam {
namespace engine {

// How many arrays the optimizer's Load/Retrieve ops move: the parameters,
// then the slots (Adam: momenta, velocities).
int NumArrays(Optimizer optimizer);
// "LoadTPUEmbeddingADAMParameters" and the like, for error messages.
std::string LoadOpName(Optimizer optimizer);
std::string RetrieveOpName(Optimizer optimizer);

// One shard of a table with its Adam slots (empty for an SGD table) and the
// step's gradient rows.
struct Shard {
  int64_t rows = 0;
  bool loaded = false;
  // Steps applied since the last Load or Retrieve of this shard: while > 0,
  // the TF variables that Retrieve fills hold older rows than the engine.
  int64_t steps_since_retrieve = 0;
  std::vector<float> w, m, v;
  // The rows those steps changed, each once in the order first stepped, so
  // that bringing the variables up to date costs the rows trained, not the
  // shard; `all_touched` once a non-lazy step changed every row.
  std::vector<int64_t> touched;
  std::vector<uint8_t> touched_mark;  // per row; sized on first use
  bool all_touched = false;
  // The step's gradient rows by sending core, in core order (host-major),
  // each summed per row with the table's gradient accumulation (see
  // Accumulator). Kept apart so that the step's sum is the same floats
  // whatever order the cores send in.
  std::vector<Accumulator> sent;

  // The rows core `core` (its position in core order) sends this step.
  Accumulator& SentBy(size_t core) {
    if (sent.size() <= core) sent.resize(core + 1);
    return sent[core];
  }
  int64_t SentBytes() const;
  // Marks as touched the `n` local rows of `ids` (repeats allowed).
  void MarkTouched(const int64_t* ids, int64_t n);
  // After a Load or Retrieve: the variables hold the shard as it is.
  void MarkRetrieved();
};

// A table's state: its configuration (immutable, from the EngineConfig)
// and its shards.
struct Table : TableSpec {
  explicit Table(const TableSpec& spec) : TableSpec(spec) {
    shards.resize(shard_rows.size());
    for (size_t s = 0; s < shards.size(); ++s) shards[s].rows = shard_rows[s];
  }
  std::mutex mu;
  std::vector<Shard> shards;
};

// Where one global id lives.
struct RowLocation {
  int shard;
  int64_t local;
};

RowLocation Locate(const Table& t, int64_t id);

// Applies the step sent to `s` (a shard of `t`, under t.mu) with learning
// rate `lr` and clears the sent rows: the cores' rows, in core order, go to
// one ApplySparseAdam, whose sum per row (from zero, in input order) adds
// the cores' sums in core order. Lazy Adam skips a shard that got no
// gradient; non-lazy Adam steps every row of a loaded shard.
void StepShard(const Table& t, float lr, const ParallelFor& parallel_for,
               Shard& s);

}  // namespace engine
}  // namespace tpu_embed_adam

#endif  // TPU_EMBED_ADAM_CC_ENGINE_TABLE_H_
