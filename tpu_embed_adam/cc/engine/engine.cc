#include "tpu_embed_adam/cc/engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "tensorflow/core/platform/errors.h"
#include "tensorflow/core/protobuf/tpu/tpu_embedding_configuration.pb.h"
#include "tpu_embed_adam/cc/core/adam_config.h"
#include "tpu_embed_adam/cc/engine/activations.h"
#include "tpu_embed_adam/cc/engine/config.h"
#include "tpu_embed_adam/cc/core/shape_util.h"

namespace tpu_embed_adam {
namespace engine {

namespace {

using tensorflow::Status;
using tensorflow::errors::FailedPrecondition;
using tensorflow::errors::InvalidArgument;
namespace tpu = tensorflow::tpu;

// Bounds on what an input may make the engine allocate (docs/engine.md,
// "Limits"); the configuration's are in config.h.
constexpr int64_t kMaxBatchGradientElements = int64_t{1} << 31;  // ids x dimension
constexpr size_t kMaxQueuedBatches = 1024;  // per core, enqueued and not received

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
                    const AllocateOutput& allocate,
                    const ParallelFor& parallel_for) {
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
        written.resize(max_slots);
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
    WriteActivationsParallel(batch->features[i], t.dim, sizes[i] / t.dim,
                             row_of, written.data(), outputs[i], parallel_for);
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
  // Each gradient row finds its accumulator row here, in feature and entry
  // order; the arithmetic then runs in parallel over those rows.
  for (size_t i = 0; i < config_->features.size(); ++i) {
    Table& t = *tables_[config_->features[i].table_id];
    std::lock_guard<std::mutex> table_lock(t.mu);
    const bool accumulate = t.adam.gradient_accumulation;
    for (const Entry& e : batch->features[i]) {
      t.shards[e.shard].SentBy(position).Queue(
          t.dim, accumulate, e.local, e.scale, grads[i] + e.slot * t.dim);
    }
  }
  for (const auto& table : tables_) {
    std::lock_guard<std::mutex> table_lock(table->mu);
    for (Shard& s : table->shards) {
      if (s.sent.size() > position) {
        s.sent[position].Flush(table->dim, parallel_for);
      }
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
                                           t.adam.gradient_accumulation,
                                           t.shards[s].rows);
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
