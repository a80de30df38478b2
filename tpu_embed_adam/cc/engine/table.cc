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

void StepShard(const Table& t, float lr, const ParallelFor& parallel_for,
               Shard& s) {
  // Non-lazy Adam steps every row of a table each step, sent or not.
  if (!s.loaded || (t.adam.lazy && s.acc.ids.empty())) return;
  const TableShard shard{s.w.data(), s.m.data(), s.v.data(), s.rows, t.dim};
  // With accumulation the accumulator's ids are distinct and their rows
  // already summed (see Accumulator): for lazy Adam, stepping each row once
  // with its sum (ApplySparseAdam's per-occurrence mode) is the accumulated
  // update bit for bit (its own sum would be 0 + row, the row itself),
  // without a second, serial pass over the gradients.
  AdamConfig cfg = t.adam;
  if (cfg.lazy) cfg.gradient_accumulation = false;
  ApplySparseAdam<int64_t>(cfg, lr, shard, s.acc.ids.data(),
                           s.acc.grads.data(), s.acc.ids.size(), parallel_for);
  s.acc.Clear();
  ++s.steps_since_retrieve;
}

}  // namespace engine
}  // namespace tpu_embed_adam
