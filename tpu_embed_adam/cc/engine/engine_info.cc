// Engine::InfoJson: what `tpu_embed_adam.engine.info()` and
// `tpu-embed-adam info` show of a process's engine, as hand-written JSON
// (TF ships no JSON writer to custom ops).
#include <unistd.h>

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "tpu_embed_adam/cc/engine/engine.h"

namespace tpu_embed_adam {
namespace engine {

namespace {

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

}  // namespace

std::string Engine::InfoJson() {
  std::lock_guard<std::mutex> lock(mu_);
  const auto [hosts, cores] = config_ == nullptr
                                  ? std::pair<int64_t, int64_t>{1, 1}
                                  : std::pair<int64_t, int64_t>{
                                        config_->num_hosts,
                                        config_->cores_per_host};
  const size_t features = config_ == nullptr ? 0 : config_->features.size();
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
                                    ", \"rows_touched\": ",
                                    s.all_touched ? s.rows
                                                  : static_cast<int64_t>(
                                                        s.touched.size()),
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
      ", \"configured\": ", config_ == nullptr ? "false" : "true",
      ", \"num_hosts\": ", hosts, ", \"cores_per_host\": ", cores,
      ", \"num_features\": ", features,
      ", \"queued_batches\": ", queued, ", \"waiting\": ", waiting_,
      ", \"deferred_loads\": ",
      deferred_loads_.size(), ", \"bytes\": ", total,
      ", \"tables\": [", absl::StrJoin(tables, ", "), "]}");
}

}  // namespace engine
}  // namespace tpu_embed_adam
