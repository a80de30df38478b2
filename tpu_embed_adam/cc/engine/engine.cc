#include "tpu_embed_adam/cc/engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "tensorflow/core/platform/errors.h"
#include "tensorflow/core/protobuf/tpu/tpu_embedding_configuration.pb.h"

namespace tpu_embed_adam {
namespace engine {

namespace {

using tensorflow::Status;
using tensorflow::errors::FailedPrecondition;
using tensorflow::errors::InvalidArgument;
namespace tpu = tensorflow::tpu;

constexpr float kInf = std::numeric_limits<float>::infinity();

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string Canonical(const tpu::TPUEmbeddingConfiguration& proto) {
  std::string out;
  google::protobuf::io::StringOutputStream stream(&out);
  google::protobuf::io::CodedOutputStream coded(&stream);
  coded.SetSerializationDeterministic(true);
  proto.SerializeToCodedStream(&coded);
  coded.Trim();
  return out;
}

Status Parse(const std::string& serialized,
             tpu::TPUEmbeddingConfiguration* proto) {
  if (!proto->ParseFromString(serialized)) {
    return InvalidArgument("config is not a serialized ",
                           "TPUEmbeddingConfiguration");
  }
  return tensorflow::OkStatus();
}

// The proto's oneof name of the table's optimizer, for the error message.
std::string OptimizerName(const tpu::OptimizationParameters& p) {
  const auto* oneof =
      tpu::OptimizationParameters::descriptor()->FindOneofByName("parameters");
  const auto* field = p.GetReflection()->GetOneofFieldDescriptor(p, oneof);
  return field == nullptr ? "none" : field->name();
}

Status TableFromProto(const tpu::TPUEmbeddingConfiguration_TableDescriptor& d,
                      int id, int64_t num_shards, Table* t) {
  const auto& p = d.optimization_parameters();
  if (d.name().empty()) {
    return InvalidArgument("table ", id, " has no name");
  }
  if (d.vocabulary_size() <= 0 || d.dimension() <= 0) {
    return InvalidArgument("table '", d.name(), "': vocabulary_size ",
                           d.vocabulary_size(), " and dimension ",
                           d.dimension(), " must be positive");
  }
  if (!p.has_adam()) {
    return InvalidArgument("table '", d.name(), "' uses optimizer '",
                           OptimizerName(p),
                           "'; the engine supports only Adam");
  }
  t->name = d.name();
  t->id = id;
  // As TF's TPUEmbedding does: at least one row per shard, the extra shards
  // holding dummy rows that no valid id reaches.
  t->vocabulary_size = std::max<int64_t>(d.vocabulary_size(), num_shards);
  t->dim = d.dimension();
  if (p.learning_rate().has_dynamic()) {
    t->dynamic_lr_tag = p.learning_rate().dynamic().tag();
  } else {
    t->constant_lr = p.learning_rate().constant();
  }
  AdamConfig& a = t->adam;
  a.beta1 = p.adam().beta1();
  a.beta2 = p.adam().beta2();
  a.epsilon = p.adam().epsilon();
  a.lazy = !p.adam().use_non_lazy_adam();
  a.sum_inside_sqrt = p.adam().use_sum_inside_sqrt();
  a.gradient_accumulation =
      p.gradient_accumulation_status() != tpu::GradientAccumulationStatus::DISABLED;
  const auto& gc = p.gradient_clipping_limits();
  a.clip_gradient_min = gc.has_lower() ? gc.lower().value() : -kInf;
  a.clip_gradient_max = gc.has_upper() ? gc.upper().value() : kInf;
  const auto& wc = p.clipping_limits();
  a.clip_weight_min = wc.has_lower() ? wc.lower().value() : -kInf;
  a.clip_weight_max = wc.has_upper() ? wc.upper().value() : kInf;
  a.weight_decay_factor = p.weight_decay_factor();
  a.multiply_weight_decay_factor_by_learning_rate =
      p.multiply_weight_decay_factor_by_learning_rate();

  t->shards.resize(num_shards);
  const int64_t base = t->vocabulary_size / num_shards;
  const int64_t extra = t->vocabulary_size % num_shards;
  for (int64_t s = 0; s < num_shards; ++s) {
    t->shards[s].rows = base + (s < extra ? 1 : 0);
  }
  return tensorflow::OkStatus();
}

int64_t Product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

RowLocation Locate(const Table& t, int64_t id) {
  const int64_t shards = t.shards.size();
  if (t.mod_sharding) return {static_cast<int>(id % shards), id / shards};
  const int64_t base = t.vocabulary_size / shards;
  const int64_t extra = t.vocabulary_size % shards;
  const int64_t big = extra * (base + 1);  // ids in the larger shards
  if (id < big) return {static_cast<int>(id / (base + 1)), id % (base + 1)};
  return {static_cast<int>(extra + (id - big) / base), (id - big) % base};
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
    if (canonical_config_.empty()) {
      return FailedPrecondition(
          "the TPU embedding engine is not configured: run ",
          "ConfigureTPUEmbedding, or an op carrying the config attr, first");
    }
    return tensorflow::OkStatus();
  }
  if (canonical_config_.empty()) return InstallLocked(serialized);
  tpu::TPUEmbeddingConfiguration proto;
  TF_RETURN_IF_ERROR(Parse(serialized, &proto));
  if (Canonical(proto) != canonical_config_) {
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
  if (!canonical_config_.empty()) {
    tpu::TPUEmbeddingConfiguration proto;
    TF_RETURN_IF_ERROR(Parse(serialized, &proto));
    if (Canonical(proto) == canonical_config_) return tensorflow::OkStatus();
  }
  return InstallLocked(serialized);
}

Status Engine::InstallLocked(const std::string& serialized) {
  tpu::TPUEmbeddingConfiguration proto;
  TF_RETURN_IF_ERROR(Parse(serialized, &proto));
  const int64_t hosts = std::max<int64_t>(1, proto.num_hosts());
  std::vector<std::shared_ptr<Table>> tables;
  std::map<std::string, int> ids;
  for (int i = 0; i < proto.table_descriptor_size(); ++i) {
    auto t = std::make_shared<Table>();
    TF_RETURN_IF_ERROR(TableFromProto(proto.table_descriptor(i), i, hosts, t.get()));
    if (!ids.emplace(t->name, i).second) {
      return InvalidArgument("table name '", t->name, "' appears twice");
    }
    tables.push_back(std::move(t));
  }
  std::vector<Feature> features;
  for (const auto& fd : proto.feature_descriptor()) {
    Feature f{fd.table_id(), {fd.input_shape().begin(), fd.input_shape().end()}};
    features.push_back(std::move(f));
  }
  // Configurations without feature descriptors count features per table.
  if (features.empty()) {
    for (int i = 0; i < proto.table_descriptor_size(); ++i) {
      for (int k = 0; k < proto.table_descriptor(i).num_features(); ++k) {
        features.push_back({i, {proto.batch_size_per_tensor_core()}});
      }
    }
  }
  for (size_t i = 0; i < features.size(); ++i) {
    const Feature& f = features[i];
    if (f.table_id < 0 || f.table_id >= static_cast<int>(tables.size())) {
      return InvalidArgument("feature ", i, " names table id ", f.table_id,
                             " of ", tables.size(), " tables");
    }
    const bool positive = std::all_of(f.input_shape.begin(),
                                      f.input_shape.end(),
                                      [](int64_t d) { return d > 0; });
    if (f.input_shape.empty() || f.input_shape.size() > 2 || !positive) {
      return InvalidArgument("feature ", i, " (table '",
                             tables[f.table_id]->name, "'): input_shape ",
                             ShapeString(f.input_shape),
                             " must be [batch] or [batch, max_sequence_length]");
    }
  }
  // Loads that ran before any configuration: all valid, or none applied.
  std::vector<std::unique_ptr<DeferredLoad>> deferred;
  deferred.swap(deferred_loads_);
  ClearLocked();
  num_hosts_ = hosts;
  cores_per_host_ = std::max<int64_t>(1, proto.num_tensor_cores() / hosts);
  for (auto& t : tables) {
    t->mod_sharding =
        proto.sharding_strategy() == tpu::TPUEmbeddingConfiguration::MOD;
  }
  training_mode_ =
      proto.mode() != tpu::TPUEmbeddingConfiguration::INFERENCE;
  tables_ = std::move(tables);
  table_ids_ = std::move(ids);
  features_ = std::move(features);
  canonical_config_ = Canonical(proto);
  for (const auto& d : deferred) {
    const Status s = LoadLocked(d->request);
    if (!s.ok()) {
      ClearLocked();
      return Status(s.code(),
                    absl::StrCat("a load op that ran before the ",
                                 "configuration: ", s.message()));
    }
  }
  return tensorflow::OkStatus();
}

bool Engine::IsConfigured() {
  std::lock_guard<std::mutex> lock(mu_);
  return !canonical_config_.empty();
}

void Engine::Reset() {
  std::lock_guard<std::mutex> lock(mu_);
  ClearLocked();
}

void Engine::ClearLocked() {
  // Kernels that already hold a table keep it alive through their
  // shared_ptr; nothing they write is visible after the reset.
  canonical_config_.clear();
  tables_.clear();
  table_ids_.clear();
  features_.clear();
  cores_.clear();
  training_cores_.clear();
  sent_.clear();
  step_learning_rates_.clear();
  deferred_loads_.clear();
  num_hosts_ = 1;
  cores_per_host_ = 1;
  training_mode_ = true;
}

Status Engine::ResolveShard(const std::string& config, int64_t table_id,
                            const std::string& table_name, int64_t num_shards,
                            int64_t shard_id, ShardRef* out) {
  std::lock_guard<std::mutex> lock(mu_);
  TF_RETURN_IF_ERROR(CheckConfigLocked(config));
  return ResolveShardLocked(table_id, table_name, num_shards, shard_id, out);
}

Status Engine::ResolveShardLocked(int64_t table_id,
                                  const std::string& table_name,
                                  int64_t num_shards, int64_t shard_id,
                                  ShardRef* out) {
  int id = -1;
  if (!table_name.empty()) {
    auto it = table_ids_.find(table_name);
    if (it == table_ids_.end()) {
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
  if (num_shards != num_hosts_) {
    return InvalidArgument("table '", t->name, "': num_shards ", num_shards,
                           " differs from the configuration's num_hosts ",
                           num_hosts_);
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

Status Engine::Load(const std::string& config, const LoadRequest& req) {
  std::lock_guard<std::mutex> lock(mu_);
  if (config.empty() && canonical_config_.empty()) {
    auto deferred = std::make_unique<DeferredLoad>();
    deferred->request = req;
    for (int i = 0; i < 3; ++i) {
      int64_t n = 1;
      for (int64_t d : req.shapes[i]) n *= d;
      deferred->copies[i].assign(req.data[i], req.data[i] + n);
      deferred->request.data[i] = deferred->copies[i].data();
    }
    deferred_loads_.push_back(std::move(deferred));
    return tensorflow::OkStatus();
  }
  TF_RETURN_IF_ERROR(CheckConfigLocked(config));
  return LoadLocked(req);
}

Status Engine::LoadLocked(const LoadRequest& req) {
  static constexpr const char* kNames[3] = {"parameters", "momenta",
                                            "velocities"};
  ShardRef ref;
  TF_RETURN_IF_ERROR(ResolveShardLocked(req.table_id, req.table_name,
                                        req.num_shards, req.shard_id, &ref));
  Table& t = *ref.table;
  const std::vector<int64_t> expected{ref.rows, t.dim};
  for (int i = 0; i < 3; ++i) {
    if (req.shapes[i] != expected) {
      return InvalidArgument("LoadTPUEmbeddingADAMParameters: table '", t.name,
                             "' shard ", ref.shard, " is ",
                             ShapeString(expected), " but ", kNames[i], " is ",
                             ShapeString(req.shapes[i]));
    }
  }
  std::lock_guard<std::mutex> table_lock(t.mu);
  Shard& s = t.shards[ref.shard];
  const int64_t n = s.rows * t.dim;
  s.w.assign(req.data[0], req.data[0] + n);
  s.m.assign(req.data[1], req.data[1] + n);
  s.v.assign(req.data[2], req.data[2] + n);
  s.loaded = true;
  return tensorflow::OkStatus();
}

Status Engine::Retrieve(const ShardRef& ref, float* w, float* m, float* v) {
  Table& t = *ref.table;
  std::lock_guard<std::mutex> lock(t.mu);
  const Shard& s = t.shards[ref.shard];
  if (!s.loaded) {
    return FailedPrecondition("table '", t.name, "' shard ", ref.shard,
                              " (", s.rows, " x ", t.dim,
                              ") was never loaded in this process");
  }
  std::copy(s.w.begin(), s.w.end(), w);
  std::copy(s.m.begin(), s.m.end(), m);
  std::copy(s.v.begin(), s.v.end(), v);
  return tensorflow::OkStatus();
}

Status Engine::CheckCoreLocked(int64_t task, int64_t core) const {
  if (task < 0 || task >= num_hosts_ || core < 0 || core >= cores_per_host_) {
    return InvalidArgument("core ", core, " of task ", task,
                           " is outside the configuration's ", num_hosts_,
                           " hosts x ", cores_per_host_, " cores per host");
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
  if (inputs.size() != features_.size()) {
    return InvalidArgument("enqueue has ", inputs.size(), " features; the ",
                           "configuration has ", features_.size());
  }
  Batch batch;
  if (mode_override == "unspecified" || mode_override.empty()) {
    batch.training = training_mode_;
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
  const bool per_feature = combiners.size() == inputs.size();
  if (!combiners.empty() && !per_feature && combiners.size() != tables_.size()) {
    return InvalidArgument("enqueue has ", combiners.size(), " combiners for ",
                           inputs.size(), " features and ", tables_.size(),
                           " tables");
  }
  batch.features.resize(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Feature& f = features_[i];
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
  }
  const CoreKey key{task, core};
  if (batch.training) training_cores_.insert(key);
  cores_[key].queued.push_back(std::move(batch));
  lock.unlock();
  enqueued_.notify_all();
  return tensorflow::OkStatus();
}

Status Engine::ActivationShapes(const std::string& config,
                                std::vector<std::vector<int64_t>>* shapes) {
  std::lock_guard<std::mutex> lock(mu_);
  TF_RETURN_IF_ERROR(CheckConfigLocked(config));
  shapes->clear();
  for (const Feature& f : features_) {
    shapes->push_back(f.input_shape);
    shapes->back().push_back(tables_[f.table_id]->dim);
  }
  return tensorflow::OkStatus();
}

Status Engine::Recv(int64_t task, int64_t core, int64_t timeout_ms,
                    const std::vector<float*>& outputs) {
  std::unique_lock<std::mutex> lock(mu_);
  TF_RETURN_IF_ERROR(CheckConfigLocked(""));
  TF_RETURN_IF_ERROR(CheckCoreLocked(task, core));
  if (outputs.size() != features_.size()) {
    return InvalidArgument("Recv has ", outputs.size(), " outputs; the ",
                           "configuration has ", features_.size(), " features");
  }
  const CoreKey key{task, core};
  // The enqueue of the same step may still be running on another thread.
  enqueued_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] {
    auto it = cores_.find(key);
    return it != cores_.end() && !it->second.queued.empty();
  });
  auto it = cores_.find(key);
  if (it == cores_.end() || it->second.queued.empty()) {
    return FailedPrecondition("RecvTPUEmbeddingActivations on core ", core,
                              " of task ", task, ": nothing was enqueued ",
                              "for this core");
  }
  const Batch& front = it->second.queued.front();
  std::vector<std::shared_ptr<Table>> tables(features_.size());
  for (size_t i = 0; i < features_.size(); ++i) {
    tables[i] = tables_[features_[i].table_id];
    Table& t = *tables[i];
    std::lock_guard<std::mutex> table_lock(t.mu);
    for (const Entry& e : front.features[i]) {
      const int shard = Locate(t, e.id).shard;
      if (!t.shards[shard].loaded) {
        return FailedPrecondition("table '", t.name, "' shard ", shard,
                                  " (id ", e.id, " of feature ", i,
                                  ") was never loaded in this process");
      }
    }
  }
  auto batch = std::make_shared<const Batch>(std::move(it->second.queued.front()));
  it->second.queued.pop_front();
  it->second.received = batch;
  std::vector<int64_t> slots(features_.size());
  for (size_t i = 0; i < features_.size(); ++i) {
    slots[i] = Product(features_[i].input_shape);
  }
  lock.unlock();

  // Rows change only under their table's lock, so every activation is built
  // from whole rows of one step.
  for (size_t i = 0; i < batch->features.size(); ++i) {
    Table& t = *tables[i];
    float* out = outputs[i];
    std::fill(out, out + slots[i] * t.dim, 0.0f);
    std::lock_guard<std::mutex> table_lock(t.mu);
    for (const Entry& e : batch->features[i]) {
      const RowLocation loc = Locate(t, e.id);
      const float* row = t.shards[loc.shard].w.data() + loc.local * t.dim;
      float* dst = out + e.slot * t.dim;
      for (int64_t j = 0; j < t.dim; ++j) dst[j] += e.scale * row[j];
    }
  }
  return tensorflow::OkStatus();
}

Status Engine::Send(int64_t task, int64_t core,
                    const std::vector<const float*>& grads,
                    const std::vector<std::vector<int64_t>>& shapes,
                    const std::vector<float>& learning_rates,
                    const ParallelFor& parallel_for) {
  std::lock_guard<std::mutex> lock(mu_);
  TF_RETURN_IF_ERROR(CheckConfigLocked(""));
  TF_RETURN_IF_ERROR(CheckCoreLocked(task, core));
  const CoreKey key{task, core};
  auto it = cores_.find(key);
  if (it == cores_.end() || it->second.received == nullptr) {
    return FailedPrecondition("SendTPUEmbeddingGradients on core ", core,
                              " of task ", task, ": no batch awaits ",
                              "gradients (enqueue, then Recv, then Send)");
  }
  const Batch& batch = *it->second.received;
  if (!batch.training) {
    return FailedPrecondition("SendTPUEmbeddingGradients on core ", core,
                              " of task ", task, ": the batch was enqueued ",
                              "for inference");
  }
  if (grads.size() != features_.size()) {
    return InvalidArgument("Send has ", grads.size(), " gradients; the ",
                           "configuration has ", features_.size(),
                           " features");
  }
  for (size_t i = 0; i < features_.size(); ++i) {
    const Table& t = *tables_[features_[i].table_id];
    std::vector<int64_t> expected = features_[i].input_shape;
    expected.push_back(t.dim);
    if (shapes[i] != expected) {
      return InvalidArgument("gradient ", i, " (table '", t.name,
                             "') has shape ", ShapeString(shapes[i]),
                             "; its activation has shape ",
                             ShapeString(expected));
    }
  }
  for (const auto& t : tables_) {
    if (t->dynamic_lr_tag >= static_cast<int64_t>(learning_rates.size())) {
      return InvalidArgument("table '", t->name, "' uses dynamic learning ",
                             "rate tag ", t->dynamic_lr_tag, " but Send got ",
                             learning_rates.size(), " learning_rates");
    }
  }
  // A core sending twice before the others finished the step closes that
  // step first, so no core's gradients ever count twice in one update.
  if (sent_.count(key)) ApplyStepLocked(parallel_for);
  for (size_t i = 0; i < features_.size(); ++i) {
    Table& t = *tables_[features_[i].table_id];
    std::lock_guard<std::mutex> table_lock(t.mu);
    for (const Entry& e : batch.features[i]) {
      const RowLocation loc = Locate(t, e.id);
      Shard& s = t.shards[loc.shard];
      const float* g = grads[i] + e.slot * t.dim;
      s.acc_ids.push_back(loc.local);
      // Grow by a whole row, then fill: one size check per row, and a loop
      // the compiler vectorises.
      const size_t offset = s.acc_grads.size();
      s.acc_grads.resize(offset + t.dim);
      float* dst = s.acc_grads.data() + offset;
      for (int64_t j = 0; j < t.dim; ++j) dst[j] = e.scale * g[j];
    }
  }
  it->second.received.reset();
  sent_.insert(key);
  step_learning_rates_ = learning_rates;
  if (std::includes(sent_.begin(), sent_.end(), training_cores_.begin(),
                    training_cores_.end())) {
    ApplyStepLocked(parallel_for);
  }
  return tensorflow::OkStatus();
}

void Engine::ApplyStepLocked(const ParallelFor& parallel_for) {
  for (const auto& tp : tables_) {
    Table& t = *tp;
    const float lr = t.dynamic_lr_tag >= 0
                         ? step_learning_rates_[t.dynamic_lr_tag]
                         : t.constant_lr;
    std::lock_guard<std::mutex> table_lock(t.mu);
    for (Shard& s : t.shards) {
      // Non-lazy Adam steps every row of a table each step, sent or not.
      if (!s.loaded || (t.adam.lazy && s.acc_ids.empty())) continue;
      const TableShard shard{s.w.data(), s.m.data(), s.v.data(), s.rows, t.dim};
      ApplySparseAdam<int64_t>(t.adam, lr, shard, s.acc_ids.data(),
                               s.acc_grads.data(), s.acc_ids.size(),
                               parallel_for);
      s.acc_ids.clear();
      s.acc_grads.clear();
    }
  }
  sent_.clear();
}

std::string Engine::InfoJson() {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t queued = 0;
  for (const auto& [key, core] : cores_) queued += core.queued.size();
  int64_t total = 0;
  std::vector<std::string> tables;
  for (const auto& tp : tables_) {
    Table& t = *tp;
    std::lock_guard<std::mutex> table_lock(t.mu);
    int64_t bytes = 0;
    std::vector<std::string> shards;
    for (size_t i = 0; i < t.shards.size(); ++i) {
      const Shard& s = t.shards[i];
      const int64_t b = (s.w.size() + s.m.size() + s.v.size() +
                         s.acc_grads.size()) * sizeof(float) +
                        s.acc_ids.size() * sizeof(int64_t);
      bytes += b;
      shards.push_back(absl::StrCat("{\"shard\": ", i, ", \"rows\": ", s.rows,
                                    ", \"loaded\": ",
                                    s.loaded ? "true" : "false",
                                    ", \"bytes\": ", b, "}"));
    }
    total += bytes;
    tables.push_back(absl::StrCat(
        "{\"name\": ", JsonString(t.name), ", \"id\": ", t.id,
        ", \"vocabulary_size\": ", t.vocabulary_size, ", \"dimension\": ",
        t.dim, ", \"sharding\": \"", t.mod_sharding ? "mod" : "div",
        "\", \"num_shards\": ", t.shards.size(), ", \"bytes\": ", bytes,
        ", \"shards\": [", absl::StrJoin(shards, ", "), "]}"));
  }
  return absl::StrCat(
      "{\"configured\": ", canonical_config_.empty() ? "false" : "true",
      ", \"num_hosts\": ", num_hosts_, ", \"cores_per_host\": ",
      cores_per_host_, ", \"num_features\": ", features_.size(),
      ", \"queued_batches\": ", queued, ", \"deferred_loads\": ",
      deferred_loads_.size(), ", \"bytes\": ", total,
      ", \"tables\": [", absl::StrJoin(tables, ", "), "]}");
}

}  // namespace engine
}  // namespace tpu_embed_adam
