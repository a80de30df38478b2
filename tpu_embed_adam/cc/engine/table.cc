#include "tpu_embed_adam/cc/engine/table.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "tpu_embed_adam/cc/core/slots.h"

namespace tpu_embed_adam {
namespace engine {

namespace {

// The optimizer's part of TF's Load/Retrieve op names.
const char* OpInfix(Optimizer optimizer) {
  return optimizer == Optimizer::kAdam ? "ADAM" : "StochasticGradientDescent";
}

}  // namespace

int NumArrays(Optimizer optimizer) {
  return optimizer == Optimizer::kAdam ? kAdamArrays : 1;
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
  // One host (every single-process run): no divisions, once per id.
  if (shards == 1) return {0, id};
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

void Shard::MarkTouched(const int64_t* ids, int64_t n) {
  if (all_touched) return;
  if (touched_mark.empty()) touched_mark.assign(rows, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (!touched_mark[ids[i]]) {
      touched_mark[ids[i]] = 1;
      touched.push_back(ids[i]);
    }
  }
}

void Shard::MarkRetrieved() {
  steps_since_retrieve = 0;
  // Clearing only the marked rows keeps the cost at the rows touched.
  if (touched.size() * 8 < touched_mark.size()) {
    for (const int64_t r : touched) touched_mark[r] = 0;
  } else {
    std::fill(touched_mark.begin(), touched_mark.end(), 0);
  }
  touched.clear();
  all_touched = false;
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
    if (t.adam.lazy && t.adam.gradient_accumulation && cores.size() == 1) {
      // One core's rows are distinct sums: no grouping needed.
      ApplySparseAdamToSums(t.adam, lr, shard, rows->ids.data(),
                            rows->grads.data(), rows->ids.size(),
                            parallel_for);
    } else {
      ApplySparseAdam<int64_t>(t.adam, lr, shard, rows->ids.data(),
                               rows->grads.data(), rows->ids.size(),
                               parallel_for);
    }
    ++s.steps_since_retrieve;
    if (t.adam.lazy) {
      s.MarkTouched(rows->ids.data(), rows->ids.size());
    } else {
      s.all_touched = true;
    }
  }
  for (Accumulator& a : s.sent) a.Clear();
}

}  // namespace engine
}  // namespace tpu_embed_adam
