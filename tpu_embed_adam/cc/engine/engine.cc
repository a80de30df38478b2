#include "tpu_embed_adam/cc/engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>

#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "tensorflow/core/platform/errors.h"
#include "tensorflow/core/protobuf/tpu/tpu_embedding_configuration.pb.h"
#include "tpu_embed_adam/cc/core/adam_config.h"
#include "tpu_embed_adam/cc/core/huge_pages.h"
#include "tpu_embed_adam/cc/engine/activations.h"
#include "tpu_embed_adam/cc/core/shape_util.h"

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

// Bounds on what a configuration or an input may make the engine allocate
// (docs/engine.md, "Limits"): each is far above any TPU system or model, and
// refusing past it turns an allocation that would kill the process into an
// error naming the field.
constexpr int64_t kMaxHosts = 4096;
constexpr int64_t kMaxCoresPerHost = 256;
constexpr int64_t kMaxFeatures = 65536;
constexpr int64_t kMaxShards = int64_t{1} << 20;  // tables x hosts
constexpr int64_t kMaxFeatureSlots = int64_t{1} << 24;         // batch x sequence
constexpr int64_t kMaxActivationElements = int64_t{1} << 30;  // slots x dimension
constexpr int64_t kMaxBatchGradientElements = int64_t{1} << 31;  // ids x dimension
constexpr size_t kMaxQueuedBatches = 1024;  // per core, enqueued and not received

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

// `inference`: the configuration's mode is INFERENCE, for which TF's
// TPUEmbedding configures stochastic gradient descent (nothing trains).
Status TableFromProto(const tpu::TPUEmbeddingConfiguration_TableDescriptor& d,
                      int id, int64_t num_shards, bool inference, Table* t) {
  const auto& p = d.optimization_parameters();
  if (d.name().empty()) {
    return InvalidArgument("table ", id, " has no name");
  }
  if (d.vocabulary_size() <= 0 || d.dimension() <= 0) {
    return InvalidArgument("table '", d.name(), "': vocabulary_size ",
                           d.vocabulary_size(), " and dimension ",
                           d.dimension(), " must be positive");
  }
  if (p.has_adam()) {
    t->optimizer = Optimizer::kAdam;
  } else if (inference && p.has_stochastic_gradient_descent()) {
    t->optimizer = Optimizer::kSgd;
  } else if (inference) {
    return InvalidArgument("table '", d.name(), "' uses optimizer '",
                           OptimizerName(p), "'; in INFERENCE mode the ",
                           "engine supports stochastic_gradient_descent ",
                           "(what TF's TPUEmbedding configures) and Adam");
  } else {
    return InvalidArgument("table '", d.name(), "' uses optimizer '",
                           OptimizerName(p),
                           "'; the engine supports only Adam");
  }
  if (CheckedProduct({d.vocabulary_size(), d.dimension()}) < 0) {
    return InvalidArgument("table '", d.name(), "': vocabulary_size ",
                           d.vocabulary_size(), " x dimension ", d.dimension(),
                           " overflows int64");
  }
  // Out-of-range values would silently train with a zero learning rate or
  // produce NaNs in every row: refuse them here, naming the table.
  const auto bad = [&](const auto&... what) {
    return InvalidArgument("table '", d.name(), "': ", what...);
  };
  switch (p.learning_rate().learning_rate_case()) {
    case tpu::LearningRate::kConstant:
      if (!(p.learning_rate().constant() > 0.0f) ||
          !std::isfinite(p.learning_rate().constant())) {
        return bad("learning_rate constant ", p.learning_rate().constant(),
                   " must be positive and finite");
      }
      break;
    case tpu::LearningRate::kDynamic:
      if (p.learning_rate().dynamic().tag() < 0) {
        return bad("dynamic learning rate tag ",
                   p.learning_rate().dynamic().tag(), " is negative");
      }
      break;
    case tpu::LearningRate::LEARNING_RATE_NOT_SET:
      return bad("learning_rate sets neither constant nor dynamic");
  }
  if (t->optimizer == Optimizer::kAdam) {
    // An SGD table (INFERENCE mode) trains nothing: its AdamConfig stays unset.
    const Status read = AdamConfigFromProto(p, &t->adam);
    if (!read.ok()) return bad(read.message());
  }
  t->name = d.name();
  t->id = id;
  t->vocabulary_size = d.vocabulary_size();
  // As TF's TPUEmbedding does: at least one row per shard, the extra shards
  // holding dummy rows that no valid id reaches.
  t->padded_vocabulary_size =
      std::max<int64_t>(d.vocabulary_size(), num_shards);
  t->dim = d.dimension();
  if (p.learning_rate().has_dynamic()) {
    t->dynamic_lr_tag = p.learning_rate().dynamic().tag();
  } else {
    t->constant_lr = p.learning_rate().constant();
  }

  t->shards.resize(num_shards);
  const int64_t base = t->padded_vocabulary_size / num_shards;
  const int64_t extra = t->padded_vocabulary_size % num_shards;
  for (int64_t s = 0; s < num_shards; ++s) {
    t->shards[s].rows = base + (s < extra ? 1 : 0);
  }
  return tensorflow::OkStatus();
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

// The system-wide fields: everything sized by them (shards per table, cores)
// is bounded, and enums must name a known value.
Status CheckSystem(const tpu::TPUEmbeddingConfiguration& proto) {
  // 0 is proto3's "unset": one host, as before any multi-host configuration.
  const int64_t hosts = proto.num_hosts() == 0 ? 1 : proto.num_hosts();
  if (hosts < 1 || hosts > kMaxHosts) {
    return InvalidArgument("num_hosts ", proto.num_hosts(),
                           " is outside [1, ", kMaxHosts, "]");
  }
  const int64_t cores = proto.num_tensor_cores();
  if (cores < hosts || cores > hosts * kMaxCoresPerHost || cores % hosts != 0) {
    return InvalidArgument("num_tensor_cores ", cores, " must be num_hosts (",
                           hosts, ") times a cores-per-host count in [1, ",
                           kMaxCoresPerHost, "]");
  }
  if (!tpu::TPUEmbeddingConfiguration::ShardingStrategy_IsValid(
          proto.sharding_strategy())) {
    return InvalidArgument("sharding_strategy ", proto.sharding_strategy(),
                           " is neither DIV_DEFAULT (0) nor MOD (1)");
  }
  if (!tpu::TPUEmbeddingConfiguration::Mode_IsValid(proto.mode())) {
    return InvalidArgument("mode ", proto.mode(), " is not a known mode");
  }
  // Every table holds one (empty until loaded) shard per host.
  const int64_t shards = proto.table_descriptor_size() * hosts;
  if (shards > kMaxShards) {
    return InvalidArgument(proto.table_descriptor_size(), " tables x num_hosts ",
                           hosts, " = ", shards, " shards; at most ",
                           kMaxShards, " are supported");
  }
  int64_t features = proto.feature_descriptor_size();
  if (features == 0) {
    for (const auto& t : proto.table_descriptor()) {
      if (t.num_features() < 0) {
        return InvalidArgument("table '", t.name(), "': num_features ",
                               t.num_features(), " is negative");
      }
      features += t.num_features();
    }
  }
  if (features > kMaxFeatures) {
    return InvalidArgument("the configuration has ", features,
                           " features; at most ", kMaxFeatures,
                           " are supported");
  }
  return tensorflow::OkStatus();
}

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
  TF_RETURN_IF_ERROR(CheckSystem(proto));
  const int64_t hosts = std::max<int64_t>(1, proto.num_hosts());
  const bool inference =
      proto.mode() == tpu::TPUEmbeddingConfiguration::INFERENCE;
  std::vector<std::shared_ptr<Table>> tables;
  std::map<std::string, int> ids;
  for (int i = 0; i < proto.table_descriptor_size(); ++i) {
    auto t = std::make_shared<Table>();
    TF_RETURN_IF_ERROR(TableFromProto(proto.table_descriptor(i), i, hosts,
                                      inference, t.get()));
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
    std::vector<int64_t> activation = f.input_shape;
    activation.push_back(tables[f.table_id]->dim);
    // Every enqueue sizes per-slot buffers by the input shape, every Recv
    // allocates the activation: both bounded, so neither can exhaust memory.
    const int64_t slots = CheckedProduct(f.input_shape);
    const int64_t elements = CheckedProduct(activation);
    if (f.input_shape.empty() || f.input_shape.size() > 2 || !positive ||
        slots > kMaxFeatureSlots || elements < 0 ||
        elements > kMaxActivationElements) {
      return InvalidArgument("feature ", i, " (table '",
                             tables[f.table_id]->name, "'): input_shape ",
                             ShapeString(f.input_shape),
                             " must be [batch] or [batch, max_sequence_length] ",
                             "of positive sizes, with at most ",
                             kMaxFeatureSlots, " slots and ",
                             kMaxActivationElements,
                             " activation elements (slots x dimension)");
    }
  }
  // Loads that ran before any configuration: all valid, or none applied.
  std::vector<std::unique_ptr<DeferredLoad>> deferred;
  deferred.swap(deferred_loads_);
  ClearLocked();
  num_hosts_ = hosts;
  cores_per_host_ = proto.num_tensor_cores() / hosts;
  for (auto& t : tables) {
    t->mod_sharding =
        proto.sharding_strategy() == tpu::TPUEmbeddingConfiguration::MOD;
  }
  training_mode_ = !inference;
  tables_ = std::move(tables);
  table_ids_ = std::move(ids);
  features_ = std::move(features);
  canonical_config_ = Canonical(proto);
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
  return !canonical_config_.empty();
}

void Engine::Reset() {
  std::lock_guard<std::mutex> lock(mu_);
  ClearLocked();
}

std::pair<int64_t, int64_t> Engine::HostsAndCores() {
  std::lock_guard<std::mutex> lock(mu_);
  return {num_hosts_, cores_per_host_};
}

void Engine::ClearLocked() {
  // Kernels that already hold a table keep it alive through their
  // shared_ptr; nothing they write is visible after the reset.
  canonical_config_.clear();
  tables_.clear();
  table_ids_.clear();
  features_.clear();
  cores_.clear();
  sent_.clear();
  step_learning_rates_.clear();
  deferred_loads_.clear();
  num_hosts_ = 1;
  cores_per_host_ = 1;
  training_mode_ = true;
  ++generation_;
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
  // Another optimizer's op would read or write the wrong number of arrays.
  if (t->optimizer != optimizer) {
    return InvalidArgument("table '", t->name, "' is configured for ",
                           LoadOpName(t->optimizer), " and ",
                           RetrieveOpName(t->optimizer), ", not ",
                           LoadOpName(optimizer), " / ",
                           RetrieveOpName(optimizer));
  }
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

Status Engine::Load(const std::string& config, const LoadRequest& req,
                    const ParallelFor& parallel_for) {
  std::lock_guard<std::mutex> lock(mu_);
  if (config.empty() && canonical_config_.empty()) {
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
  static constexpr const char* kNames[3] = {"parameters", "momenta",
                                            "velocities"};
  TF_RETURN_IF_ERROR(ResolveShardLocked(req.optimizer, req.table_id,
                                        req.table_name, req.num_shards,
                                        req.shard_id, ref));
  const Table& t = *ref->table;
  const std::vector<int64_t> expected{ref->rows, t.dim};
  for (int i = 0; i < NumArrays(req.optimizer); ++i) {
    if (req.shapes[i] != expected) {
      return InvalidArgument(LoadOpName(req.optimizer), ": table '", t.name,
                             "' shard ", ref->shard, " is ",
                             ShapeString(expected), " but ", kNames[i], " is ",
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
                             "' shard ", ref->shard, ": ", kNames[i], "[",
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
  for (int i = 0; i < NumArrays(t.optimizer); ++i) {
    ReserveShardArray(*arrays[i], n);
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
  // Its gradients could never be sent (Send refuses inference mode), and the
  // batch would hold every later step open.
  if (batch.training && !training_mode_) {
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
    int64_t core, int64_t timeout_ms,
    const std::function<Status(const Batch&)>& use) {
  TF_RETURN_IF_ERROR(CheckCoreLocked(task, core));
  Core* c = nullptr;
  TF_RETURN_IF_ERROR(AwaitBatchLocked(lock, op, CoreKey{task, core},
                                      timeout_ms,
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

Status Engine::Recv(const std::string& config, int64_t task, int64_t core,
                    int64_t timeout_ms, int num_outputs,
                    const AllocateOutput& allocate) {
  std::unique_lock<std::mutex> lock(mu_);
  TF_RETURN_IF_ERROR(CheckConfigLocked(config));
  if (num_outputs != static_cast<int>(features_.size())) {
    return InvalidArgument("RecvTPUEmbeddingActivations has ", num_outputs,
                           " outputs; the configuration has ",
                           features_.size(), " features");
  }
  std::vector<std::shared_ptr<Table>> tables(features_.size());
  std::vector<float*> outputs(features_.size());
  std::vector<int64_t> sizes(features_.size());
  TF_RETURN_IF_ERROR(TakeBatchLocked(
      lock, "RecvTPUEmbeddingActivations", task, core, timeout_ms,
      [&](const Batch& batch) {
        TF_RETURN_IF_ERROR(CheckRowsLoadedLocked(batch));
        for (size_t i = 0; i < features_.size(); ++i) {
          tables[i] = tables_[features_[i].table_id];
          std::vector<int64_t> shape = features_[i].input_shape;
          shape.push_back(tables[i]->dim);
          sizes[i] = CheckedProduct(shape);  // fits: checked at install
          TF_RETURN_IF_ERROR(allocate(i, shape, &outputs[i]));
        }
        return tensorflow::OkStatus();
      }));
  const std::shared_ptr<const Batch> batch = cores_[CoreKey{task, core}].received;
  lock.unlock();

  // Rows change only under their table's lock, so every activation is built
  // from whole rows of one step.
  std::vector<uint8_t> written;
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
                                int64_t timeout_ms, const char* missing,
                                Core** core) {
  const uint64_t generation = generation_;
  // The enqueue of the same step may still be running on another thread.
  enqueued_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] {
    if (generation_ != generation) return true;
    auto it = cores_.find(key);
    return it != cores_.end() && !it->second.queued.empty();
  });
  // The wait released the lock: the caller's checks hold only for the same
  // configuration.
  if (generation_ != generation) {
    return tensorflow::errors::Aborted(
        op, " on core ", key.second, " of task ", key.first,
        ": the engine was reset or reconfigured while it waited for a batch");
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
  for (size_t i = 0; i < features_.size(); ++i) {
    // `loaded` changes only under mu_ too, so reading it needs no table lock.
    const Table& t = *tables_[features_[i].table_id];
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
    int64_t timeout_ms, bool local_rows,
    std::shared_ptr<const Batch>* batch) {
  TF_RETURN_IF_ERROR(CheckConfigLocked(""));
  TF_RETURN_IF_ERROR(CheckCoreLocked(task, core));
  if (!training_mode_) {
    return FailedPrecondition(op, " on core ", core, " of task ", task,
                              ": the TPU embedding configuration is in ",
                              "INFERENCE mode, which trains nothing; ",
                              "configure a TRAINING one");
  }
  if (shapes.size() != features_.size()) {
    return InvalidArgument("Send has ", shapes.size(), " gradients; the ",
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
    *batch = std::move(c->received);
    c->received.reset();
    c->routing.reset();
  } else {
    // TF prunes Recv from a step whose loss is linear in the activations
    // (their gradient does not depend on them); a TPU's Send still pairs
    // with the core's next batch, so take it as Recv would have.
    TF_RETURN_IF_ERROR(AwaitBatchLocked(
        lock, op, key, timeout_ms,
        "no batch awaits gradients (nothing was received or enqueued for "
        "this core)",
        &c));
    TF_RETURN_IF_ERROR(check_training(c->queued.front()));
    if (local_rows) TF_RETURN_IF_ERROR(CheckRowsLoadedLocked(c->queued.front()));
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
                    int64_t timeout_ms, const ParallelFor& parallel_for) {
  std::unique_lock<std::mutex> lock(mu_);
  TF_RETURN_IF_ERROR(CheckLearningRatesLocked(learning_rates));
  std::shared_ptr<const Batch> batch;
  TF_RETURN_IF_ERROR(TakeSendBatchLocked(lock, "SendTPUEmbeddingGradients",
                                         task, core, shapes, timeout_ms,
                                         /*local_rows=*/true, &batch));
  const CoreKey key{task, core};
  // A core sending twice before the others finished the step closes that
  // step first, so no core's gradients ever count twice in one update.
  if (sent_.count(key)) ApplyStepLocked(parallel_for);
  const size_t position = task * cores_per_host_ + core;
  for (size_t i = 0; i < features_.size(); ++i) {
    Table& t = *tables_[features_[i].table_id];
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
      const int64_t b =
          (s.w.size() + s.m.size() + s.v.size()) * sizeof(float) +
          s.SentBytes();
      bytes += b;
      shards.push_back(absl::StrCat("{\"shard\": ", i, ", \"rows\": ", s.rows,
                                    ", \"loaded\": ",
                                    s.loaded ? "true" : "false",
                                    ", \"steps_since_retrieve\": ",
                                    s.steps_since_retrieve,
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
      "{\"pid\": ", static_cast<int64_t>(getpid()),
      ", \"configured\": ", canonical_config_.empty() ? "false" : "true",
      ", \"num_hosts\": ", num_hosts_, ", \"cores_per_host\": ",
      cores_per_host_, ", \"num_features\": ", features_.size(),
      ", \"queued_batches\": ", queued, ", \"deferred_loads\": ",
      deferred_loads_.size(), ", \"bytes\": ", total,
      ", \"tables\": [", absl::StrJoin(tables, ", "), "]}");
}

}  // namespace engine
}  // namespace tpu_embed_adam
