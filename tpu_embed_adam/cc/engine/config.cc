#include "tpu_embed_adam/cc/engine/config.h"

#include <algorithm>
#include <cmath>

#include "tensorflow/core/platform/errors.h"
#include "tensorflow/core/protobuf/tpu/tpu_embedding_configuration.pb.h"
#include "tpu_embed_adam/cc/core/adam_config.h"
#include "tpu_embed_adam/cc/core/shape_util.h"

namespace tpu_embed_adam {
namespace engine {

namespace {

using tensorflow::Status;
using tensorflow::errors::InvalidArgument;
namespace tpu = tensorflow::tpu;

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
                      int id, int64_t num_shards, bool inference,
                      TableSpec* t) {
  const auto& p = d.optimization_parameters();
  if (d.name().empty()) {
    return InvalidArgument("table ", id, " has no name");
  }
  // Names travel through C strings (TF's attrs, checkpoint keys, logs).
  if (d.name().find('\0') != std::string::npos) {
    return InvalidArgument("Argument `name` of table ", id,
                           " must not contain a NUL character");
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
    return InvalidArgument("table '", d.name(), "': Argument `message` ",
                           "configures the '", OptimizerName(p),
                           "' optimizer, not 'adam' (the engine trains only ",
                           "Adam)");
  }
  if (CheckedProduct({d.vocabulary_size(), d.dimension()}) < 0) {
    return InvalidArgument("table '", d.name(), "': vocabulary_size ",
                           d.vocabulary_size(), " x dimension ", d.dimension(),
                           " overflows int64");
  }
  const auto bad = [&](const auto&... what) {
    return InvalidArgument("table '", d.name(), "': ", what...);
  };
  if (t->optimizer == Optimizer::kAdam) {
    // The same rules, and the same messages, as AdamParameters.from_tf_proto.
    const Status read = AdamConfigFromProto(p, &t->adam);
    if (!read.ok()) return bad(read.message());
  } else if (!p.has_learning_rate()) {
    // An SGD table (INFERENCE mode) trains nothing: only its rate's
    // presence is TF's to require.
    return bad("Argument `message` has no learning_rate (constant or dynamic).");
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

  const int64_t base = t->padded_vocabulary_size / num_shards;
  const int64_t extra = t->padded_vocabulary_size % num_shards;
  for (int64_t s = 0; s < num_shards; ++s) {
    t->shard_rows.push_back(base + (s < extra ? 1 : 0));
  }
  return tensorflow::OkStatus();
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
  if (!tpu::TPUEmbeddingConfiguration::Mode_IsValid(proto.mode()) ||
      proto.mode() == tpu::TPUEmbeddingConfiguration::UNSPECIFIED) {
    return InvalidArgument("Argument `mode` must be TRAINING or INFERENCE ",
                           "(TF's TPUEmbedding sets one); received: ",
                           proto.mode(), ".");
  }
  if (proto.table_descriptor_size() == 0) {
    return InvalidArgument("Argument `table_descriptor` must hold at least ",
                           "one table; received: none.");
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

}  // namespace

Status CanonicalConfig(const std::string& serialized, std::string* out) {
  tpu::TPUEmbeddingConfiguration proto;
  TF_RETURN_IF_ERROR(Parse(serialized, &proto));
  *out = Canonical(proto);
  return tensorflow::OkStatus();
}

Status ParseEngineConfig(const std::string& serialized,
                         std::shared_ptr<const EngineConfig>* out) {
  tpu::TPUEmbeddingConfiguration proto;
  TF_RETURN_IF_ERROR(Parse(serialized, &proto));
  TF_RETURN_IF_ERROR(CheckSystem(proto));
  auto config = std::make_shared<EngineConfig>();
  const int64_t hosts = std::max<int64_t>(1, proto.num_hosts());
  const bool inference =
      proto.mode() == tpu::TPUEmbeddingConfiguration::INFERENCE;
  const bool mod =
      proto.sharding_strategy() == tpu::TPUEmbeddingConfiguration::MOD;
  std::vector<TableSpec>& tables = config->tables;
  for (int i = 0; i < proto.table_descriptor_size(); ++i) {
    TableSpec t;
    TF_RETURN_IF_ERROR(
        TableFromProto(proto.table_descriptor(i), i, hosts, inference, &t));
    t.mod_sharding = mod;
    if (!config->table_ids.emplace(t.name, i).second) {
      return InvalidArgument("table name '", t.name, "' appears twice");
    }
    tables.push_back(std::move(t));
  }
  std::vector<Feature>& features = config->features;
  for (const auto& fd : proto.feature_descriptor()) {
    features.push_back(
        {fd.table_id(), {fd.input_shape().begin(), fd.input_shape().end()}});
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
    activation.push_back(tables[f.table_id].dim);
    // Every enqueue sizes per-slot buffers by the input shape, every Recv
    // allocates the activation: both bounded, so neither can exhaust memory.
    const int64_t slots = CheckedProduct(f.input_shape);
    const int64_t elements = CheckedProduct(activation);
    if (f.input_shape.empty() || f.input_shape.size() > 2 || !positive ||
        slots > kMaxFeatureSlots || elements < 0 ||
        elements > kMaxActivationElements) {
      return InvalidArgument("feature ", i, " (table '",
                             tables[f.table_id].name, "'): input_shape ",
                             ShapeString(f.input_shape),
                             " must be [batch] or [batch, max_sequence_length] ",
                             "of positive sizes, with at most ",
                             kMaxFeatureSlots, " slots and ",
                             kMaxActivationElements,
                             " activation elements (slots x dimension)");
    }
  }
  config->num_hosts = hosts;
  config->cores_per_host = proto.num_tensor_cores() / hosts;
  config->training = !inference;
  config->canonical = Canonical(proto);
  *out = std::move(config);
  return tensorflow::OkStatus();
}

}  // namespace engine
}  // namespace tpu_embed_adam
