#include "tpu_embed_adam/cc/engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "tensorflow/core/platform/errors.h"
#include "tensorflow/core/protobuf/tpu/tpu_embedding_configuration.pb.h"
#include "tpu_embed_adam/cc/core/adam_config.h"
#include "tpu_embed_adam/cc/core/huge_pages.h"
#include "tpu_embed_adam/cc/engine/activations.h"
#include "tpu_embed_adam/cc/engine/config.h"
#include "tpu_embed_adam/cc/core/shape_util.h"
#include "tpu_embed_adam/cc/core/slots.h"

namespace tpu_embed_adam {
namespace engine {

namespace {

using tensorflow::Status;
using tensorflow::errors::FailedPrecondition;
using tensorflow::errors::InvalidArgument;
namespace tpu = tensorflow::tpu;

// Loads that may wait for a configuration: more than TF's load ops of any
// realistic model (one per table and host), so that a stream of loads without
// a configuration fails instead of copying without bound.
constexpr size_t kMaxDeferredLoads = 4096;

// Bounds on what an input may make the engine allocate (docs/engine.md,
// "Limits"); the configuration's are in config.h.
constexpr int64_t kMaxBatchGradientElements = int64_t{1} << 31;  // ids x dimension
constexpr size_t kMaxQueuedBatches = 1024;  // per core, enqueued and not received

// Sizes `a` for n floats, backed by huge pages where the host allows
// (core/huge_pages.h): lookups and updates touch rows scattered over the
// whole shard. Advised before the caller's first write, so the pages come
// huge at fault time and need no collapse. Contents are the caller's to
// write.
void ReserveShardArray(std::vector<float>& a, size_t n) {
  if (a.capacity() < n) {
    std::vector<float>().swap(a);
    a.reserve(n);
  }
  AdviseHugePages(a.data(), n * sizeof(float), /*collapse=*/false);
}

}  // namespace

Engine& Engine::Get() {
  // Never destroyed: kernels may still run while the process exits.
  static Engine* engine = new Engine;
  return *engine;
}

Status Engine::EnsureConfigured(const std::string& serialized) {
  std::lock_guard<std::mutex> lock(mu_);
  return CheckConfigLocked(serialized);
}

Status Engine::CheckConfigLocked(const std::string& serialized) {
  if (serialized.empty()) {
    if (config_ == nullptr) {
      return FailedPrecondition(
          "the TPU embedding engine is not configured: run ",
          "ConfigureTPUEmbedding, or an op carrying the config attr, first");
    }
    return tensorflow::OkStatus();
  }
  if (config_ == nullptr) return InstallLocked(serialized);
  std::string canonical;
  TF_RETURN_IF_ERROR(CanonicalConfig(serialized, &canonical));
  if (canonical != config_->canonical) {
    return FailedPrecondition(
        "config differs from the TPUEmbeddingConfiguration the engine holds; ",
        "reset the engine (tpu_embed_adam.engine.reset()) or run ",
        "ConfigureTPUEmbedding with the new config to replace it");
  }
  return tensorflow::OkStatus();
}

Status Engine::Configure(const std::string& serialized) {
  std::lock_guard<std::mutex> lock(mu_);
  if (serialized.empty()) {
    return InvalidArgument("ConfigureTPUEmbedding needs a non-empty config");
  }
  if (config_ != nullptr) {
    std::string canonical;
    TF_RETURN_IF_ERROR(CanonicalConfig(serialized, &canonical));
    if (canonical == config_->canonical) return tensorflow::OkStatus();
  }
  return InstallLocked(serialized);
}

Status Engine::InstallLocked(const std::string& serialized) {
  std::shared_ptr<const EngineConfig> config;
  TF_RETURN_IF_ERROR(ParseEngineConfig(serialized, &config));
  // Loads that ran before any configuration: all valid, or none applied.
  std::vector<std::unique_ptr<DeferredLoad>> deferred;
  deferred.swap(deferred_loads_);
  ClearLocked();
  for (const TableSpec& spec : config->tables) {
    tables_.push_back(std::make_shared<Table>(spec));
  }
  config_ = std::move(config);
  std::vector<ShardRef> refs(deferred.size());
  for (size_t i = 0; i < deferred.size(); ++i) {
    const Status s = CheckLoadLocked(deferred[i]->request, &refs[i]);
    if (!s.ok()) {
      ClearLocked();
      return Status(s.code(),
                    absl::StrCat("a load op that ran before the ",
                                 "configuration: ", s.message()));
    }
  }
  for (size_t i = 0; i < deferred.size(); ++i) {
    WriteLoadLocked(refs[i], deferred[i]->request);
  }
  return tensorflow::OkStatus();
}

bool Engine::IsConfigured() {
  std::lock_guard<std::mutex> lock(mu_);
  return config_ != nullptr;
}

void Engine::Reset() {
  std::lock_guard<std::mutex> lock(mu_);
  ClearLocked();
}

std::pair<int64_t, int64_t> Engine::HostsAndCores() {
  std::lock_guard<std::mutex> lock(mu_);
  if (config_ == nullptr) return {1, 1};
  return {config_->num_hosts, config_->cores_per_host};
}

void Engine::ClearLocked() {
  // Kernels that already hold a table keep it alive through their
  // shared_ptr; nothing they write is visible after the reset.
  config_.reset();
  tables_.clear();
  cores_.clear();
  sent_.clear();
  step_learning_rates_.clear();
  deferred_loads_.clear();
  ++generation_;
  // Every op waiting for a batch sees the new generation and fails at once.
  enqueued_.notify_all();
}

Status Engine::ResolveShard(Optimizer optimizer, const std::string& config,
                            int64_t table_id, const std::string& table_name,
                            int64_t num_shards, int64_t shard_id,
                            ShardRef* out) {
  std::lock_guard<std::mutex> lock(mu_);
  TF_RETURN_IF_ERROR(CheckConfigLocked(config));
  return ResolveShardLocked(optimizer, table_id, table_name, num_shards,
                            shard_id, out);
}

Status Engine::ResolveShardLocked(Optimizer optimizer, int64_t table_id,
                                  const std::string& table_name,
                                  int64_t num_shards, int64_t shard_id,
                                  ShardRef* out) {
  int id = -1;
  if (!table_name.empty()) {
    auto it = config_->table_ids.find(table_name);
    if (it == config_->table_ids.end()) {
      std::vector<std::string> names;
      for (const auto& t : tables_) names.push_back(t->name);
      return InvalidArgument("unknown table_name '", table_name,
                             "'; configured tables: ",
                             absl::StrJoin(names, ", "));
    }
    id = it->second;
    if (table_id >= 0 && table_id != id) {
      return InvalidArgument("table_name '", table_name, "' is table id ", id,
                             ", not table_id ", table_id);
    }
  } else if (table_id >= 0 && table_id < static_cast<int64_t>(tables_.size())) {
    id = table_id;
  } else {
    return InvalidArgument("table_id ", table_id, " names none of the ",
                           tables_.size(), " configured tables");
  }
  const auto& t = tables_[id];
  // Another optimizer's op would read or write the wrong number of arrays.
  if (t->optimizer != optimizer) {
    return InvalidArgument("table '", t->name, "' is configured for ",
                           LoadOpName(t->optimizer), " and ",
                           RetrieveOpName(t->optimizer), ", not ",
                           LoadOpName(optimizer), " / ",
                           RetrieveOpName(optimizer));
  }
  if (num_shards != config_->num_hosts) {
    return InvalidArgument("table '", t->name, "': num_shards ", num_shards,
                           " differs from the configuration's num_hosts ",
                           config_->num_hosts);
  }
  if (shard_id < 0 || shard_id >= num_shards) {
    return InvalidArgument("table '", t->name, "': shard_id ", shard_id,
                           " is outside [0, ", num_shards, ")");
  }
  out->table = t;
  out->shard = shard_id;
  out->rows = t->shards[shard_id].rows;
  return tensorflow::OkStatus();
}

Status Engine::Load(const std::string& config, const LoadRequest& req,
                    const ParallelFor& parallel_for) {
  std::lock_guard<std::mutex> lock(mu_);
  if (config.empty() && config_ == nullptr) {
    if (deferred_loads_.size() >= kMaxDeferredLoads) {
      return tensorflow::errors::ResourceExhausted(
          LoadOpName(req.optimizer), ": ", deferred_loads_.size(),
          " loads already wait for a configuration (the limit); run ",
          "ConfigureTPUEmbedding, or give a load op the config attr");
    }
    auto deferred = std::make_unique<DeferredLoad>();
    deferred->request = req;
    for (int i = 0; i < NumArrays(req.optimizer); ++i) {
      // The shapes are a tensor's: their product is its element count.
      const int64_t n = CheckedProduct(req.shapes[i]);
      deferred->copies[i].assign(req.data[i], req.data[i] + n);
      deferred->request.data[i] = deferred->copies[i].data();
    }
    deferred_loads_.push_back(std::move(deferred));
    return tensorflow::OkStatus();
  }
  TF_RETURN_IF_ERROR(CheckConfigLocked(config));
  ShardRef ref;
  TF_RETURN_IF_ERROR(CheckLoadLocked(req, &ref));
  ApplyStepLocked(parallel_for);
  WriteLoadLocked(ref, req);
  return tensorflow::OkStatus();
}

Status Engine::CheckLoadLocked(const LoadRequest& req, ShardRef* ref) {
  TF_RETURN_IF_ERROR(ResolveShardLocked(req.optimizer, req.table_id,
                                        req.table_name, req.num_shards,
                                        req.shard_id, ref));
  const Table& t = *ref->table;
  const std::vector<int64_t> expected{ref->rows, t.dim};
  for (int i = 0; i < NumArrays(req.optimizer); ++i) {
    if (req.shapes[i] != expected) {
      return InvalidArgument(LoadOpName(req.optimizer), ": table '", t.name,
                             "' shard ", ref->shard, " is ",
                             ShapeString(expected), " but ", kLoadArrayNames[i], " is ",
                             ShapeString(req.shapes[i]));
    }
  }
  // Rows the update could never recover from: NaN or Inf weights and moments
  // spread through every step, a negative velocity puts a negative number
  // under the square root.
  const int64_t n = ref->rows * t.dim;
  for (int i = 0; i < NumArrays(req.optimizer); ++i) {
    const float* data = req.data[i];
    int64_t at = FindNonFinite(data, n);
    if (at < 0 && i == 2) {
      at = std::find_if(data, data + n, [](float x) { return x < 0.0f; }) - data;
      if (at == n) at = -1;
    }
    if (at >= 0) {
      return InvalidArgument(LoadOpName(req.optimizer), ": table '", t.name,
                             "' shard ", ref->shard, ": ", kLoadArrayNames[i], "[",
                             at / t.dim, ", ", at % t.dim, "] = ", data[at],
                             i == 2 ? " must be finite and >= 0"
                                    : " must be finite");
    }
  }
  return tensorflow::OkStatus();
}

void Engine::WriteLoadLocked(const ShardRef& ref, const LoadRequest& req) {
  Table& t = *ref.table;
  std::lock_guard<std::mutex> table_lock(t.mu);
  Shard& s = t.shards[ref.shard];
  const int64_t n = s.rows * t.dim;  // fits: TableFromProto checked vocab x dim
  std::vector<float>* arrays[3] = {&s.w, &s.m, &s.v};
  const int count = NumArrays(t.optimizer);
  // Every allocation before the first write: an allocation that fails
  // (std::bad_alloc, ResourceExhausted at the kernel) leaves the shard as
  // it was. Only a first load allocates (a shard's size never changes).
  std::vector<float> fresh[3];
  for (int i = 0; i < count; ++i) {
    if (arrays[i]->capacity() < static_cast<size_t>(n)) {
      ReserveShardArray(fresh[i], n);
    }
  }
  for (int i = 0; i < count; ++i) {
    if (fresh[i].capacity() != 0) arrays[i]->swap(fresh[i]);
    arrays[i]->assign(req.data[i], req.data[i] + n);
  }
  s.loaded = true;
  s.MarkRetrieved();
}

Status Engine::Retrieve(const ShardRef& ref, float* const out[3],
                        const ParallelFor& parallel_for) {
  std::lock_guard<std::mutex> lock(mu_);
  ApplyStepLocked(parallel_for);
  Table& t = *ref.table;
  std::lock_guard<std::mutex> table_lock(t.mu);
  Shard& s = t.shards[ref.shard];
  if (!s.loaded) {
    return FailedPrecondition("table '", t.name, "' shard ", ref.shard,
                              " (", s.rows, " x ", t.dim,
                              ") was never loaded in this process");
  }
  const std::vector<float>* arrays[3] = {&s.w, &s.m, &s.v};
  for (int i = 0; i < NumArrays(t.optimizer); ++i) {
    std::copy(arrays[i]->begin(), arrays[i]->end(), out[i]);
  }
  s.MarkRetrieved();
  return tensorflow::OkStatus();
}

Status Engine::RetrieveTouched(const ShardRef& ref,
                               const AllocateTouched& allocate,
                               const ParallelFor& parallel_for) {
  std::lock_guard<std::mutex> lock(mu_);
  ApplyStepLocked(parallel_for);
  Table& t = *ref.table;
  std::lock_guard<std::mutex> table_lock(t.mu);
  Shard& s = t.shards[ref.shard];
  if (!s.loaded) {
    return FailedPrecondition("table '", t.name, "' shard ", ref.shard,
                              " (", s.rows, " x ", t.dim,
                              ") was never loaded in this process");
  }
  const int64_t n = s.all_touched ? s.rows : s.touched.size();
  int64_t* ids = nullptr;
  float* out[3] = {nullptr, nullptr, nullptr};
  TF_RETURN_IF_ERROR(allocate(n, &ids, out));
  const std::vector<float>* arrays[3] = {&s.w, &s.m, &s.v};
  for (int64_t i = 0; i < n; ++i) {
    ids[i] = s.all_touched ? i : s.touched[i];
    for (int a = 0; a < NumArrays(t.optimizer); ++a) {
      const float* row = arrays[a]->data() + ids[i] * t.dim;
      std::copy(row, row + t.dim, out[a] + i * t.dim);
    }
  }
  s.MarkRetrieved();
  return tensorflow::OkStatus();
}

Status Engine::CheckCoreLocked(int64_t task, int64_t core) const {
  const int64_t hosts = config_->num_hosts, cores = config_->cores_per_host;
  if (task < 0 || task >= hosts || core < 0 || core >= cores) {
    return InvalidArgument("core ", core, " of task ", task,
                           " is outside the configuration's ", hosts,
                           " hosts x ", cores, " cores per host");
  }
  return tensorflow::OkStatus();
}

Status Engine::Enqueue(int64_t task, int64_t core,
                       std::vector<FeatureInput> inputs,
                       const std::vector<std::string>& combiners,
                       const std::string& mode_override) {
  std::unique_lock<std::mutex> lock(mu_);
  TF_RETURN_IF_ERROR(CheckConfigLocked(""));
  TF_RETURN_IF_ERROR(CheckCoreLocked(task, core));
  if (inputs.size() != config_->features.size()) {
    return InvalidArgument("enqueue has ", inputs.size(), " features; the ",
                           "configuration has ", config_->features.size());
  }
  Batch batch;
  if (mode_override == "unspecified" || mode_override.empty()) {
    batch.training = config_->training;
  } else if (mode_override == "inference") {
    batch.training = false;
  } else if (mode_override == "training" || mode_override == "train" ||
             mode_override == "backward_pass_only") {
    // TF's op definitions say "training"; its tpu_ops wrappers say "train".
    batch.training = true;
  } else {
    return InvalidArgument("mode_override '", mode_override, "' is not one ",
                           "of unspecified, inference, training (or train), ",
                           "backward_pass_only");
  }
  // Its gradients could never be sent (Send refuses inference mode), and the
  // batch would hold every later step open.
  if (batch.training && !config_->training) {
    return InvalidArgument("mode_override '", mode_override, "' asks for ",
                           "training, but the configuration is in INFERENCE ",
                           "mode");
  }
  const bool per_feature = combiners.size() == inputs.size();
  if (!combiners.empty() && !per_feature && combiners.size() != tables_.size()) {
    return InvalidArgument("enqueue has ", combiners.size(), " combiners for ",
                           inputs.size(), " features and ", tables_.size(),
                           " tables");
  }
  batch.features.resize(inputs.size());
  int64_t gradient_elements = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Feature& f = config_->features[i];
    const Table& t = *tables_[f.table_id];
    if (inputs[i].table_id >= 0 && inputs[i].table_id != f.table_id) {
      return InvalidArgument("feature ", i, ": table_ids entry ",
                             inputs[i].table_id, " but the configuration ",
                             "maps it to table ", f.table_id, " ('", t.name,
                             "')");
    }
    if (!combiners.empty()) {
      inputs[i].combiner = combiners[per_feature ? i : f.table_id];
    }
    TF_RETURN_IF_ERROR(BuildEntries(
        absl::StrCat("feature ", i, " (table '", t.name, "')"), f.input_shape,
        t.vocabulary_size, inputs[i], &batch.features[i]));
    // Sharding is fixed by the configuration, which outlives the batch (a
    // reset or reconfiguration clears the queues).
    for (Entry& e : batch.features[i]) {
      const RowLocation loc = Locate(t, e.id);
      e.shard = loc.shard;
      e.local = loc.local;
    }
    // Send grows the accumulator by one gradient row per id.
    gradient_elements += static_cast<int64_t>(batch.features[i].size()) * t.dim;
    if (gradient_elements > kMaxBatchGradientElements) {
      return tensorflow::errors::ResourceExhausted(
          "feature ", i, " (table '", t.name, "'): the batch's ",
          "embedding_indices x dimension reach ", gradient_elements,
          " gradient elements; at most ", kMaxBatchGradientElements,
          " per enqueue");
    }
  }
  Core& c = cores_[CoreKey{task, core}];
  if (c.queued.size() >= kMaxQueuedBatches) {
    return tensorflow::errors::ResourceExhausted(
        "core ", core, " of task ", task, " already has ", c.queued.size(),
        " batches enqueued and not received (the limit); run ",
        "RecvTPUEmbeddingActivations");
  }
  if (batch.training) ++c.training_batches;
  c.queued.push_back(std::move(batch));
  lock.unlock();
  enqueued_.notify_all();
  return tensorflow::OkStatus();
}

Status Engine::TakeBatchLocked(
    std::unique_lock<std::mutex>& lock, const char* op, int64_t task,
    int64_t core, const Wait& wait,
    const std::function<Status(const Batch&)>& use) {
  TF_RETURN_IF_ERROR(CheckCoreLocked(task, core));
  Core* c = nullptr;
  TF_RETURN_IF_ERROR(AwaitBatchLocked(lock, op, CoreKey{task, core},
                                      wait,
                                      "nothing was enqueued for this core",
                                      &c));
  TF_RETURN_IF_ERROR(use(c->queued.front()));
  auto batch = std::make_shared<const Batch>(std::move(c->queued.front()));
  c->queued.pop_front();
  // A received batch that was never sent drops out of the step.
  if (c->received != nullptr && c->received->training) --c->training_batches;
  c->received = std::move(batch);
  c->routing.reset();
  return tensorflow::OkStatus();
}

void Engine::WakeWaiters() {
  std::lock_guard<std::mutex> lock(mu_);
  enqueued_.notify_all();
}

Status Engine::Recv(const std::string& config, int64_t task, int64_t core,
                    const Wait& wait, int num_outputs,
                    const AllocateOutput& allocate) {
  std::unique_lock<std::mutex> lock(mu_);
  TF_RETURN_IF_ERROR(CheckConfigLocked(config));
  if (num_outputs != static_cast<int>(config_->features.size())) {
    return InvalidArgument("RecvTPUEmbeddingActivations has ", num_outputs,
                           " outputs; the configuration has ",
                           config_->features.size(), " features");
  }
  std::vector<std::shared_ptr<Table>> tables(config_->features.size());
  std::vector<float*> outputs(config_->features.size());
  std::vector<int64_t> sizes(config_->features.size());
  std::vector<uint8_t> written;
  TF_RETURN_IF_ERROR(TakeBatchLocked(
      lock, "RecvTPUEmbeddingActivations", task, core, wait,
      [&](const Batch& batch) {
        TF_RETURN_IF_ERROR(CheckRowsLoadedLocked(batch));
        int64_t max_slots = 0;
        for (size_t i = 0; i < config_->features.size(); ++i) {
          tables[i] = tables_[config_->features[i].table_id];
          std::vector<int64_t> shape = config_->features[i].input_shape;
          max_slots = std::max(max_slots, CheckedProduct(shape));
          shape.push_back(tables[i]->dim);
          sizes[i] = CheckedProduct(shape);  // fits: checked at install
          TF_RETURN_IF_ERROR(allocate(i, shape, &outputs[i]));
        }
        // Allocated before the batch is taken, so that a failure takes
        // nothing.
        written.reserve(max_slots);
        return tensorflow::OkStatus();
      }));
  const std::shared_ptr<const Batch> batch = cores_[CoreKey{task, core}].received;
  lock.unlock();

  // Rows change only under their table's lock, so every activation is built
  // from whole rows of one step.
  for (size_t i = 0; i < batch->features.size(); ++i) {
    Table& t = *tables[i];
    std::lock_guard<std::mutex> table_lock(t.mu);
    const auto row_of = [&t](const Entry& e) {
      return t.shards[e.shard].w.data() + e.local * t.dim;
    };
    WriteActivations(batch->features[i], t.dim, sizes[i] / t.dim, row_of,
                     written, outputs[i]);
  }
  return tensorflow::OkStatus();
}

Status Engine::AwaitBatchLocked(std::unique_lock<std::mutex>& lock,
                                const char* op, const CoreKey& key,
                                const Wait& wait, const char* missing,
                                Core** core) {
  const uint64_t generation = generation_;
  const auto cancelled = [&wait] {
    return wait.cancelled != nullptr && wait.cancelled->load();
  };
  // The enqueue of the same step may still be running on another thread.
  ++waiting_;
  enqueued_.wait_for(lock, std::chrono::milliseconds(wait.timeout_ms), [&] {
    if (generation_ != generation || cancelled()) return true;
    auto it = cores_.find(key);
    return it != cores_.end() && !it->second.queued.empty();
  });
  --waiting_;
  // The wait released the lock: the caller's checks hold only for the same
  // configuration.
  if (generation_ != generation) {
    return tensorflow::errors::Aborted(
        op, " on core ", key.second, " of task ", key.first,
        ": the engine was reset or reconfigured while it waited for a batch");
  }
  if (cancelled()) {
    return tensorflow::errors::Cancelled(
        op, " on core ", key.second, " of task ", key.first, ": the step was ",
        "cancelled (a RunOptions timeout, a closed session or a failed peer) ",
        "while it waited for a batch");
  }
  auto it = cores_.find(key);
  if (it == cores_.end() || it->second.queued.empty()) {
    return FailedPrecondition(op, " on core ", key.second, " of task ",
                              key.first, ": ", missing);
  }
  *core = &it->second;
  return tensorflow::OkStatus();
}

Status Engine::CheckRowsLoadedLocked(const Batch& batch) const {
  for (size_t i = 0; i < config_->features.size(); ++i) {
    // `loaded` changes only under mu_ too, so reading it needs no table lock.
    const Table& t = *tables_[config_->features[i].table_id];
    for (const Entry& e : batch.features[i]) {
      if (!t.shards[e.shard].loaded) {
        return FailedPrecondition("table '", t.name, "' shard ", e.shard,
                                  " (id ", e.id, " of feature ", i,
                                  ") was never loaded in this process");
      }
    }
  }
  return tensorflow::OkStatus();
}

Status Engine::TakeSendBatchLocked(
    std::unique_lock<std::mutex>& lock, const char* op, int64_t task,
    int64_t core, const std::vector<std::vector<int64_t>>& shapes,
    const Wait& wait, bool local_rows,
    const std::function<void(const Batch&)>& prepare,
    std::shared_ptr<const Batch>* batch) {
  TF_RETURN_IF_ERROR(CheckConfigLocked(""));
  TF_RETURN_IF_ERROR(CheckCoreLocked(task, core));
  if (!config_->training) {
    return FailedPrecondition(op, " on core ", core, " of task ", task,
                              ": the TPU embedding configuration is in ",
                              "INFERENCE mode, which trains nothing; ",
                              "configure a TRAINING one");
  }
  if (shapes.size() != config_->features.size()) {
    return InvalidArgument("Send has ", shapes.size(), " gradients; the ",
                           "configuration has ", config_->features.size(),
                           " features");
  }
  for (size_t i = 0; i < config_->features.size(); ++i) {
    const Table& t = *tables_[config_->features[i].table_id];
    std::vector<int64_t> expected = config_->features[i].input_shape;
    expected.push_back(t.dim);
    if (shapes[i] != expected) {
      return InvalidArgument("gradient ", i, " (table '", t.name,
                             "') has shape ", ShapeString(shapes[i]),
                             "; its activation has shape ",
                             ShapeString(expected));
    }
  }
  const CoreKey key{task, core};
  auto it = cores_.find(key);
  Core* c = it == cores_.end() ? nullptr : &it->second;
  const auto check_training = [&](const Batch& b) {
    return b.training ? tensorflow::OkStatus()
                      : FailedPrecondition(op, " on core ", core, " of task ",
                                           task, ": the batch was enqueued ",
                                           "for inference");
  };
  if (c != nullptr && c->received != nullptr) {
    TF_RETURN_IF_ERROR(check_training(*c->received));
    prepare(*c->received);
    *batch = std::move(c->received);
    c->received.reset();
    c->routing.reset();
  } else {
    // TF prunes Recv from a step whose loss is linear in the activations
    // (their gradient does not depend on them); a TPU's Send still pairs
    // with the core's next batch, so take it as Recv would have.
    TF_RETURN_IF_ERROR(AwaitBatchLocked(
        lock, op, key, wait,
        "no batch awaits gradients (nothing was received or enqueued for "
        "this core)",
        &c));
    TF_RETURN_IF_ERROR(check_training(c->queued.front()));
    if (local_rows) TF_RETURN_IF_ERROR(CheckRowsLoadedLocked(c->queued.front()));
    prepare(c->queued.front());
    *batch = std::make_shared<const Batch>(std::move(c->queued.front()));
    c->queued.pop_front();
  }
  --c->training_batches;
  return tensorflow::OkStatus();
}

Status Engine::Send(int64_t task, int64_t core,
                    const std::vector<const float*>& grads,
                    const std::vector<std::vector<int64_t>>& shapes,
                    const std::vector<float>& learning_rates,
                    const Wait& wait, const ParallelFor& parallel_for) {
  std::unique_lock<std::mutex> lock(mu_);
  TF_RETURN_IF_ERROR(CheckLearningRatesLocked(learning_rates));
  const CoreKey key{task, core};
  // A core sending twice before the others finished the step closes that
  // step first, so no core's gradients ever count twice in one update.
  if (sent_.count(key)) ApplyStepLocked(parallel_for);
  const size_t position = task * config_->cores_per_host + core;
  std::shared_ptr<const Batch> batch;
  TF_RETURN_IF_ERROR(TakeSendBatchLocked(
      lock, "SendTPUEmbeddingGradients", task, core, shapes, wait,
      /*local_rows=*/true,
      [&](const Batch& b) { ReserveSentLocked(b, position); }, &batch));
  for (size_t i = 0; i < config_->features.size(); ++i) {
    Table& t = *tables_[config_->features[i].table_id];
    std::lock_guard<std::mutex> table_lock(t.mu);
    const bool accumulate = t.adam.gradient_accumulation;
    for (const Entry& e : batch->features[i]) {
      t.shards[e.shard].SentBy(position).Add(t.dim, accumulate, e.local,
                                             e.scale, grads[i] + e.slot * t.dim);
    }
  }
  sent_.insert(key);
  step_learning_rates_ = learning_rates;
  if (!StepOutstandingLocked()) ApplyStepLocked(parallel_for);
  return tensorflow::OkStatus();
}

void Engine::ReserveSentLocked(const Batch& batch, size_t position) {
  for (size_t i = 0; i < config_->features.size(); ++i) {
    Table& t = *tables_[config_->features[i].table_id];
    std::vector<int64_t> per_shard(t.shards.size(), 0);
    for (const Entry& e : batch.features[i]) ++per_shard[e.shard];
    std::lock_guard<std::mutex> table_lock(t.mu);
    for (size_t s = 0; s < t.shards.size(); ++s) {
      if (per_shard[s] == 0) continue;
      t.shards[s].SentBy(position).Reserve(per_shard[s], t.dim,
                                           t.adam.gradient_accumulation);
    }
  }
}

Status Engine::CheckLearningRatesLocked(
    const std::vector<float>& rates) const {
  for (const auto& t : tables_) {
    const int64_t tag = t->dynamic_lr_tag;
    if (tag < 0) continue;
    if (tag >= static_cast<int64_t>(rates.size())) {
      return InvalidArgument("table '", t->name, "' uses dynamic learning ",
                             "rate tag ", tag, " but Send got ", rates.size(),
                             " learning_rates");
    }
    // 0 stays valid: warm-up schedules start there. A negative rate would
    // ascend and a NaN one poison every touched row.
    if (!(std::isfinite(rates[tag]) && rates[tag] >= 0.0f)) {
      return InvalidArgument("Argument `learning_rates[", tag, "]` (table '",
                             t->name, "') must be finite and >= 0; ",
                             "received: ", rates[tag],
                             ". Nothing was applied.");
    }
  }
  return tensorflow::OkStatus();
}

bool Engine::StepOutstandingLocked() const {
  for (const auto& [key, core] : cores_) {
    if (core.training_batches > 0 && sent_.count(key) == 0) return true;
  }
  return false;
}

void Engine::ApplyStepLocked(const ParallelFor& parallel_for) {
  if (sent_.empty()) return;
  for (const auto& tp : tables_) {
    Table& t = *tp;
    const float lr = t.dynamic_lr_tag >= 0
                         ? step_learning_rates_[t.dynamic_lr_tag]
                         : t.constant_lr;
    std::lock_guard<std::mutex> table_lock(t.mu);
    for (Shard& s : t.shards) StepShard(t, lr, parallel_for, s);
  }
  sent_.clear();
}

}  // namespace engine
}  // namespace tpu_embed_adam
