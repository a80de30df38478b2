// The engine's half of a multi-process step: the ops that a graph pass puts
// in place of Recv and Send when a configuration spans several hosts (see
// the declarations in engine.h and docs/engine.md, "Training across
// processes"). The core's host keeps the batch and combines; each owner
// host looks rows up in, and applies gradients to, its own shards.
#include <algorithm>

#include "absl/container/flat_hash_map.h"
#include "tensorflow/core/platform/errors.h"
#include "tpu_embed_adam/cc/core/shape_util.h"
#include "tpu_embed_adam/cc/engine/activations.h"
#include "tpu_embed_adam/cc/engine/engine.h"

namespace tpu_embed_adam {
namespace engine {

namespace {

using tensorflow::Status;
using tensorflow::errors::FailedPrecondition;
using tensorflow::errors::InvalidArgument;

// A payload's pairs, checked against the configuration: the row range
// [begin[t], begin[t + 1]) belongs to table t (pairs come table-major) and
// its gradient floats start at float_begin[t].
struct TableRanges {
  std::vector<int64_t> begin, float_begin;
};

// Checks `n` (table, local row) pairs against shard `shard` of `tables`,
// requiring them grouped by ascending table id, and returns the ranges and
// the floats they span.
Status CheckPairs(const char* what,
                  const std::vector<std::shared_ptr<Table>>& tables,
                  int64_t shard, const int64_t* ids, int64_t n,
                  TableRanges* ranges, int64_t* floats) {
  const int64_t num_tables = tables.size();
  std::vector<int64_t> counts(num_tables, 0);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t table = ids[2 * r], local = ids[2 * r + 1];
    if (table < (r == 0 ? 0 : ids[2 * r - 2]) || table >= num_tables) {
      return InvalidArgument(what, ": pair ", r, " names table ", table,
                             "; pairs must name the ", num_tables,
                             " configured tables in ascending order");
    }
    const Table& t = *tables[table];
    const Shard& s = t.shards[shard];
    if (local < 0 || local >= s.rows) {
      return InvalidArgument(what, ": pair ", r, " names row ", local,
                             " of table '", t.name, "' shard ", shard,
                             ", which has ", s.rows, " rows");
    }
    if (!s.loaded) {
      return FailedPrecondition("table '", t.name, "' shard ", shard, " (",
                                s.rows, " x ", t.dim,
                                ") was never loaded in this process");
    }
    ++counts[table];
  }
  ranges->begin.assign(num_tables + 1, 0);
  ranges->float_begin.assign(num_tables + 1, 0);
  for (int64_t t = 0; t < num_tables; ++t) {
    ranges->begin[t + 1] = ranges->begin[t] + counts[t];
    ranges->float_begin[t + 1] =
        ranges->float_begin[t] + counts[t] * tables[t]->dim;
  }
  *floats = ranges->float_begin[num_tables];
  return tensorflow::OkStatus();
}

}  // namespace

Status Engine::RouteIds(const std::string& config, int64_t task, int64_t core,
                        const Wait& wait, int num_owners,
                        const AllocateIds& allocate) {
  std::unique_lock<std::mutex> lock(mu_);
  TF_RETURN_IF_ERROR(CheckConfigLocked(config));
  if (num_owners != config_->num_hosts) {
    return InvalidArgument("RouteIds has ", num_owners, " outputs; the ",
                           "configuration has ", config_->num_hosts, " hosts");
  }
  auto routing = std::make_shared<Routing>();
  TF_RETURN_IF_ERROR(TakeBatchLocked(
      lock, "RecvTPUEmbeddingActivations", task, core, wait,
      [&](const Batch& batch) {
        const size_t num_tables = tables_.size();
        // Distinct local rows per (owner, table), in first-seen order.
        std::vector<std::vector<int64_t>> rows(num_owners * num_tables);
        std::vector<absl::flat_hash_map<int64_t, int64_t>> seen(rows.size());
        routing->offsets.resize(config_->features.size());
        for (size_t i = 0; i < config_->features.size(); ++i) {
          const int table = config_->features[i].table_id;
          const std::vector<Entry>& entries = batch.features[i];
          std::vector<int64_t>& offsets = routing->offsets[i];
          offsets.resize(entries.size());
          for (size_t k = 0; k < entries.size(); ++k) {
            const size_t list = entries[k].shard * num_tables + table;
            const auto [it, added] =
                seen[list].try_emplace(entries[k].local, rows[list].size());
            if (added) rows[list].push_back(entries[k].local);
            offsets[k] = it->second;  // a position until made an offset
          }
        }
        // Each owner returns its rows table-major.
        std::vector<int64_t> base(rows.size());
        routing->owner_floats.assign(num_owners, 0);
        for (int o = 0; o < num_owners; ++o) {
          int64_t floats = 0;
          for (size_t t = 0; t < num_tables; ++t) {
            base[o * num_tables + t] = floats;
            floats += rows[o * num_tables + t].size() * tables_[t]->dim;
          }
          routing->owner_floats[o] = floats;
        }
        for (size_t i = 0; i < config_->features.size(); ++i) {
          const int table = config_->features[i].table_id;
          const int64_t dim = tables_[table]->dim;
          const std::vector<Entry>& entries = batch.features[i];
          for (size_t k = 0; k < entries.size(); ++k) {
            int64_t& offset = routing->offsets[i][k];
            offset = base[entries[k].shard * num_tables + table] + offset * dim;
          }
        }
        for (int o = 0; o < num_owners; ++o) {
          int64_t n = 0;
          for (size_t t = 0; t < num_tables; ++t) {
            n += rows[o * num_tables + t].size();
          }
          int64_t* out = nullptr;
          TF_RETURN_IF_ERROR(allocate(o, n, &out));
          for (size_t t = 0; t < num_tables; ++t) {
            for (int64_t local : rows[o * num_tables + t]) {
              *out++ = t;
              *out++ = local;
            }
          }
        }
        return tensorflow::OkStatus();
      }));
  cores_[CoreKey{task, core}].routing = std::move(routing);
  return tensorflow::OkStatus();
}

Status Engine::GatherRows(const std::string& config, int64_t task,
                          const int64_t* ids, int64_t n,
                          const AllocateFloats& allocate) {
  std::unique_lock<std::mutex> lock(mu_);
  TF_RETURN_IF_ERROR(CheckConfigLocked(config));
  TF_RETURN_IF_ERROR(CheckCoreLocked(task, 0));
  TableRanges ranges;
  int64_t floats = 0;
  TF_RETURN_IF_ERROR(
      CheckPairs("GatherRows", tables_, task, ids, n, &ranges, &floats));
  float* out = nullptr;
  TF_RETURN_IF_ERROR(allocate(floats, &out));
  const std::vector<std::shared_ptr<Table>> tables = tables_;
  lock.unlock();
  // Rows change only under their table's lock: each is copied whole, from
  // one step.
  for (size_t table = 0; table < tables.size(); ++table) {
    if (ranges.begin[table] == ranges.begin[table + 1]) continue;
    Table& t = *tables[table];
    std::lock_guard<std::mutex> table_lock(t.mu);
    const float* w = t.shards[task].w.data();
    float* dst = out + ranges.float_begin[table];
    for (int64_t r = ranges.begin[table]; r < ranges.begin[table + 1]; ++r) {
      const float* row = w + ids[2 * r + 1] * t.dim;
      dst = std::copy(row, row + t.dim, dst);
    }
  }
  return tensorflow::OkStatus();
}

Status Engine::CombineActivations(const std::string& config, int64_t task,
                                  int64_t core,
                                  const std::vector<const float*>& rows,
                                  const std::vector<int64_t>& row_sizes,
                                  int num_outputs,
                                  const AllocateOutput& allocate) {
  std::unique_lock<std::mutex> lock(mu_);
  TF_RETURN_IF_ERROR(CheckConfigLocked(config));
  TF_RETURN_IF_ERROR(CheckCoreLocked(task, core));
  if (num_outputs != static_cast<int>(config_->features.size())) {
    return InvalidArgument("RecvTPUEmbeddingActivations has ", num_outputs,
                           " outputs; the configuration has ",
                           config_->features.size(), " features");
  }
  auto it = cores_.find(CoreKey{task, core});
  if (it == cores_.end() || it->second.routing == nullptr) {
    return FailedPrecondition("CombineActivations on core ", core,
                              " of task ", task, ": no batch was routed ",
                              "(RouteIds runs first)");
  }
  const std::shared_ptr<const Batch> batch = it->second.received;
  const std::shared_ptr<const Routing> routing = it->second.routing;
  if (rows.size() != routing->owner_floats.size()) {
    return InvalidArgument("CombineActivations has rows from ", rows.size(),
                           " hosts; the configuration has ",
                           routing->owner_floats.size());
  }
  for (size_t o = 0; o < rows.size(); ++o) {
    if (row_sizes[o] != routing->owner_floats[o]) {
      return InvalidArgument("CombineActivations: the rows from host ", o,
                             " hold ", row_sizes[o], " floats; the batch ",
                             "routed to it needs ", routing->owner_floats[o]);
    }
  }
  std::vector<float*> outputs(config_->features.size());
  std::vector<int64_t> dims(config_->features.size()), slots(config_->features.size());
  for (size_t i = 0; i < config_->features.size(); ++i) {
    std::vector<int64_t> shape = config_->features[i].input_shape;
    dims[i] = tables_[config_->features[i].table_id]->dim;
    slots[i] = CheckedProduct(shape);  // fits: checked at install
    shape.push_back(dims[i]);
    TF_RETURN_IF_ERROR(allocate(i, shape, &outputs[i]));
  }
  lock.unlock();

  std::vector<uint8_t> written;
  for (size_t i = 0; i < batch->features.size(); ++i) {
    const std::vector<Entry>& entries = batch->features[i];
    const std::vector<int64_t>& offsets = routing->offsets[i];
    const auto row_of = [&](const Entry& e) {
      return rows[e.shard] + offsets[&e - entries.data()];
    };
    WriteActivations(entries, dims[i], slots[i], row_of, written, outputs[i]);
  }
  return tensorflow::OkStatus();
}

Status Engine::SplitGradients(int64_t task, int64_t core,
                              const std::vector<const float*>& grads,
                              const std::vector<std::vector<int64_t>>& shapes,
                              int num_owners, const Wait& wait,
                              const AllocatePayload& allocate) {
  std::unique_lock<std::mutex> lock(mu_);
  TF_RETURN_IF_ERROR(CheckConfigLocked(""));
  if (num_owners != config_->num_hosts) {
    return InvalidArgument("SplitGradients has ", num_owners, " owners; the ",
                           "configuration has ", config_->num_hosts, " hosts");
  }
  std::shared_ptr<const Batch> batch;
  TF_RETURN_IF_ERROR(TakeSendBatchLocked(
      lock, "SendTPUEmbeddingGradients", task, core, shapes, wait,
      /*local_rows=*/false, [](const Batch&) {}, &batch));
  const std::vector<std::shared_ptr<Table>> tables = tables_;
  // The configuration the batch was built under, shared, not copied.
  const std::shared_ptr<const EngineConfig> config = config_;
  const std::vector<Feature>& features = config->features;
  lock.unlock();

  // The core's own sum per row (what the owner's accumulator would form
  // from this core's rows), so that each row crosses the network once.
  const size_t num_tables = tables.size();
  std::vector<Accumulator> acc(num_owners * num_tables);
  for (size_t i = 0; i < features.size(); ++i) {
    const Table& t = *tables[features[i].table_id];
    for (const Entry& e : batch->features[i]) {
      acc[e.shard * num_tables + t.id].Add(t.dim, t.adam.gradient_accumulation,
                                           e.local, e.scale,
                                           grads[i] + e.slot * t.dim);
    }
  }
  for (int o = 0; o < num_owners; ++o) {
    int64_t n = 0, floats = 0;
    for (size_t t = 0; t < num_tables; ++t) {
      n += acc[o * num_tables + t].ids.size();
      floats += acc[o * num_tables + t].grads.size();
    }
    int64_t* ids = nullptr;
    float* out = nullptr;
    TF_RETURN_IF_ERROR(allocate(o, n, floats, &ids, &out));
    for (size_t t = 0; t < num_tables; ++t) {
      const Accumulator& a = acc[o * num_tables + t];
      for (int64_t local : a.ids) {
        *ids++ = t;
        *ids++ = local;
      }
      out = std::copy(a.grads.begin(), a.grads.end(), out);
    }
  }
  return tensorflow::OkStatus();
}

Status Engine::ApplyGradients(int64_t task,
                              const std::vector<Payload>& payloads,
                              const std::vector<float>& learning_rates,
                              const ParallelFor& parallel_for) {
  std::unique_lock<std::mutex> lock(mu_);
  TF_RETURN_IF_ERROR(CheckConfigLocked(""));
  TF_RETURN_IF_ERROR(CheckCoreLocked(task, 0));
  if (!config_->training) {
    return FailedPrecondition("ApplyGradients on task ", task, ": the TPU ",
                              "embedding configuration is in INFERENCE mode");
  }
  TF_RETURN_IF_ERROR(CheckLearningRatesLocked(learning_rates));
  std::vector<TableRanges> ranges(payloads.size());
  for (size_t p = 0; p < payloads.size(); ++p) {
    int64_t floats = 0;
    TF_RETURN_IF_ERROR(CheckPairs("ApplyGradients", tables_, task,
                                  payloads[p].ids, payloads[p].rows,
                                  &ranges[p], &floats));
    if (floats != payloads[p].floats) {
      return InvalidArgument("ApplyGradients: payload ", p, " has ",
                             payloads[p].rows, " rows of ", floats,
                             " floats in all, but ", payloads[p].floats,
                             " gradient floats");
    }
  }
  // A single-process step still open in this process goes first.
  ApplyStepLocked(parallel_for);
  const std::vector<std::shared_ptr<Table>> tables = tables_;
  lock.unlock();

  for (const auto& tp : tables) {
    Table& t = *tp;
    const float lr = t.dynamic_lr_tag >= 0 ? learning_rates[t.dynamic_lr_tag]
                                           : t.constant_lr;
    std::lock_guard<std::mutex> table_lock(t.mu);
    Shard& s = t.shards[task];
    // Payload p is core p's rows (in core order), already summed per row
    // by SplitGradients.
    for (size_t p = 0; p < payloads.size(); ++p) {
      const float* g = payloads[p].grads + ranges[p].float_begin[t.id];
      for (int64_t r = ranges[p].begin[t.id]; r < ranges[p].begin[t.id + 1];
           ++r, g += t.dim) {
        s.SentBy(p).Add(t.dim, /*accumulate=*/false, payloads[p].ids[2 * r + 1],
                        1.0f, g);
      }
    }
    StepShard(t, lr, parallel_for, s);
  }
  return tensorflow::OkStatus();
}

}  // namespace engine
}  // namespace tpu_embed_adam
