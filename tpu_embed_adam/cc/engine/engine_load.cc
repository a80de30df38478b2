// The engine's Load and Retrieve: moving a table shard between TF's variables
// and the engine (engine.h), including loads that run before any
// configuration (deferred until one arrives) and the retrieve of only the
// rows trained since the last one.
#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "tensorflow/core/platform/errors.h"
#include "tpu_embed_adam/cc/core/huge_pages.h"
#include "tpu_embed_adam/cc/core/shape_util.h"
#include "tpu_embed_adam/cc/core/slots.h"
#include "tpu_embed_adam/cc/core/sparse_adam.h"
#include "tpu_embed_adam/cc/engine/engine.h"

namespace tpu_embed_adam {
namespace engine {

namespace {

using tensorflow::Status;
using tensorflow::errors::FailedPrecondition;
using tensorflow::errors::InvalidArgument;

// Loads that may wait for a configuration: more than TF's load ops of any
// realistic model (one per table and host), so that a stream of loads without
// a configuration fails instead of copying without bound.
constexpr size_t kMaxDeferredLoads = 4096;

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

Status Engine::RetrieveTouchedInto(const ShardRef& ref, float* const into[3],
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
  const float* arrays[3] = {s.w.data(), s.m.data(), s.v.data()};
  const int count = NumArrays(t.optimizer);
  const int64_t dim = t.dim;
  const auto copy_rows = [&](int64_t first, int64_t rows) {
    for (int a = 0; a < count; ++a) {
      std::copy_n(arrays[a] + first * dim, rows * dim, into[a] + first * dim);
    }
  };
  if (s.all_touched) {
    parallel_for(s.rows, count * dim,
                 [&](int64_t r0, int64_t r1) { copy_rows(r0, r1 - r0); });
  } else {
    const int64_t* touched = s.touched.data();
    // Rows at random in both arrays: a miss each, so about 40 cycles a float.
    parallel_for(s.touched.size(), 40 * count * dim,
                 [&](int64_t i0, int64_t i1) {
                   for (int64_t i = i0; i < i1; ++i) copy_rows(touched[i], 1);
                 });
  }
  s.MarkRetrieved();
  return tensorflow::OkStatus();
}

}  // namespace engine
}  // namespace tpu_embed_adam
