// The engine's configuration as one immutable value: hosts, cores per host,
// mode, tables and features, parsed and checked once from TF's serialized
// TPUEmbeddingConfiguration. Everything after the parse trusts it: the
// engine holds a shared_ptr<const EngineConfig> and hands the same snapshot
// to every op of a step, including the multi-process path.
#ifndef TPU_EMBED_ADAM_CC_ENGINE_CONFIG_H_
#define TPU_EMBED_ADAM_CC_ENGINE_CONFIG_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tensorflow/core/platform/status.h"
#include "tpu_embed_adam/cc/core/sparse_adam.h"

namespace tpu_embed_adam {
namespace engine {

// Bounds on what a configuration may make the engine allocate
// (docs/engine.md, "Limits"): each is far above any TPU system or model, and
// refusing past it turns an allocation that would kill the process into an
// error naming the field.
constexpr int64_t kMaxHosts = 4096;
constexpr int64_t kMaxCoresPerHost = 256;
constexpr int64_t kMaxFeatures = 65536;
constexpr int64_t kMaxShards = int64_t{1} << 20;  // tables x hosts
constexpr int64_t kMaxFeatureSlots = int64_t{1} << 24;         // batch x sequence
constexpr int64_t kMaxActivationElements = int64_t{1} << 30;  // slots x dimension

// Which of TF's optimizers a table uses, i.e. which Load/Retrieve ops move
// it. Training needs Adam; TF's INFERENCE mode configures every table with
// stochastic gradient descent, whose state is the table alone.
enum class Optimizer { kAdam, kSgd };

// One table as configured.
struct TableSpec {
  std::string name;
  int id = 0;  // position in the configuration (TF's name-sorted order)
  int64_t vocabulary_size = 0;  // valid ids are below it
  // At least one row per shard (TF pads small tables with dummy rows): the
  // size that sharding splits.
  int64_t padded_vocabulary_size = 0;
  int64_t dim = 0;
  bool mod_sharding = false;  // else div: contiguous blocks
  Optimizer optimizer = Optimizer::kAdam;
  AdamConfig adam;  // unset for an SGD table
  float constant_lr = 0.0f;
  int dynamic_lr_tag = -1;  // index into Send's learning_rates, or -1
  std::vector<int64_t> shard_rows;  // one entry per host
};

struct Feature {
  int table_id = 0;
  std::vector<int64_t> input_shape;
};

struct EngineConfig {
  int64_t num_hosts = 1;
  int64_t cores_per_host = 1;
  bool training = true;  // the mode: TRAINING, else INFERENCE
  std::vector<TableSpec> tables;
  std::map<std::string, int> table_ids;  // by name
  std::vector<Feature> features;
  // The configuration's deterministic serialization: two serializations
  // configure the same engine iff their canonical forms are equal.
  std::string canonical;
};

// Parses and checks `serialized`; InvalidArgument naming the field for
// anything the engine cannot serve exactly (docs/engine.md).
tensorflow::Status ParseEngineConfig(const std::string& serialized,
                                     std::shared_ptr<const EngineConfig>* out);

// The canonical form of `serialized`, without checking more than that it
// parses: enough to compare a later op's config with the installed one.
tensorflow::Status CanonicalConfig(const std::string& serialized,
                                   std::string* out);

}  // namespace engine
}  // namespace tpu_embed_adam

#endif  // TPU_EMBED_ADAM_CC_ENGINE_CONFIG_H_
