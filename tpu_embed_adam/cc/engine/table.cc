#include "tpu_embed_adam/cc/engine/table.h"

#include "absl/strings/str_cat.h"

namespace tpu_embed_adam {
namespace engine {

namespace {

// The optimizer's part of TF's Load/Retrieve op names.
const char* OpInfix(Optimizer optimizer) {
  return optimizer == Optimizer::kAdam ? "ADAM" : "StochasticGradientDescent";
}

}  // namespace

int NumArrays(Optimizer optimizer) {
  return optimizer == Optimizer::kAdam ? 3 : 1;
}

std::string LoadOpName(Optimizer optimizer) {
  return absl::StrCat("LoadTPUEmbedding", OpInfix(optimizer), "Parameters");
}

std::string RetrieveOpName(Optimizer optimizer) {
  return absl::StrCat("RetrieveTPUEmbedding", OpInfix(optimizer),
                      "Parameters");
}

RowLocation Locate(const Table& t, int64_t id) {
  const int64_t shards = t.shards.size();
  if (t.mod_sharding) return {static_cast<int>(id % shards), id / shards};
  const int64_t base = t.padded_vocabulary_size / shards;
  const int64_t extra = t.padded_vocabulary_size % shards;
  const int64_t big = extra * (base + 1);  // ids in the larger shards
  if (id < big) return {static_cast<int>(id / (base + 1)), id % (base + 1)};
  return {static_cast<int>(extra + (id - big) / base), (id - big) % base};
}

int64_t Shard::SentBytes() const {
  int64_t bytes = 0;
  for (const Accumulator& a : sent) bytes += a.Bytes();
  return bytes;
}

void StepShard(const Table& t, float lr, const ParallelFor& parallel_for,
               Shard& s) {
  std::vector<const Accumulator*> cores;
  for (const Accumulator& a : s.sent) {
    if (!a.ids.empty()) cores.push_back(&a);
  }
  // Non-lazy Adam steps every row of a table each step, sent or not.
  if (s.loaded && !(t.adam.lazy && cores.empty())) {
    Accumulator merged;
    const Accumulator* rows = cores.size() == 1 ? cores[0] : &merged;
    if (cores.size() > 1) {
      for (const Accumulator* a : cores) merged.Append(*a);
    }
    const TableShard shard{s.w.data(), s.m.data(), s.v.data(), s.rows, t.dim};
    ApplySparseAdam<int64_t>(t.adam, lr, shard, rows->ids.data(),
                             rows->grads.data(), rows->ids.size(),
                             parallel_for);
    ++s.steps_since_retrieve;
  }
  for (Accumulator& a : s.sent) a.Clear();
}

}  // namespace engine
}  // namespace tpu_embed_adam
