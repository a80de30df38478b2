// The software TPU embedding engine: what a TPU keeps in its embedding memory
// (tables, Adam slots, the gradient accumulator) and its per-core queues of
// enqueued batches, held in the process that runs TF's TPU embedding ops.
//
// One engine per process. It is configured from a serialized
// TPUEmbeddingConfiguration by whichever op brings one first; later ops must
// bring the same configuration (or none). Configure (ConfigureTPUEmbedding,
// ConfigureDistributedTPU) alone may replace a different configuration, as a
// TPU's initialize_system does.
// TpuEmbedAdamEngineReset and ShutdownDistributedTPU clear everything.
//
// Each table is split into `num_hosts` shards (TF's Load/Retrieve ops move one
// shard each). A shard exists in this process once a Load op has run here, so
// in a cluster of one worker process per host each process holds the shards
// that its host's load ops brought. Cores are (task, core) pairs: the task of
// the device that runs the op and the core within the host (the enqueue op's
// device_ordinal, or the CPU device id for Recv and Send).
//
// Locking: `mu_` guards the configuration and the queues; each table has its
// own mutex guarding its shards' rows. `mu_` is always taken before a table's.
// A shard's `loaded` flag is written under both, so either lock reads it.
#ifndef TPU_EMBED_ADAM_CC_ENGINE_ENGINE_H_
#define TPU_EMBED_ADAM_CC_ENGINE_ENGINE_H_

#include <atomic>
#include <cstdint>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "tensorflow/core/platform/status.h"
#include "tpu_embed_adam/cc/engine/batch.h"
#include "tpu_embed_adam/cc/engine/config.h"
#include "tpu_embed_adam/cc/engine/table.h"

namespace tpu_embed_adam {
namespace engine {

// A shard named by a Load or Retrieve op, resolved against the configuration.
struct ShardRef {
  std::shared_ptr<Table> table;
  int shard = 0;
  int64_t rows = 0;
};

using CoreKey = std::pair<int64_t, int64_t>;  // (task, core within the host)

// How an op waits for its core's batch: at most `timeout_ms`, and no longer
// than until `*cancelled` is set (by the op's cancellation callback, which
// then calls Engine::WakeWaiters).
struct Wait {
  int64_t timeout_ms = 0;
  const std::atomic<bool>* cancelled = nullptr;
};

// A Load op's request, as the kernel received it: NumArrays(optimizer)
// entries of `shapes` and `data` are set.
struct LoadRequest {
  Optimizer optimizer = Optimizer::kAdam;
  int64_t table_id = -1;
  std::string table_name;
  int64_t num_shards = 0;
  int64_t shard_id = 0;
  std::vector<int64_t> shapes[3];  // parameters, then the slots
  const float* data[3] = {nullptr, nullptr, nullptr};
};

class Engine {
 public:
  static Engine& Get();

  // Installs `serialized` if nothing is configured; otherwise requires it to
  // equal the installed configuration. An empty string requires a
  // configuration to be installed already.
  tensorflow::Status EnsureConfigured(const std::string& serialized);
  // ConfigureTPUEmbedding: the same as EnsureConfigured for an identical
  // configuration (so one configure op per host is harmless); a different one
  // replaces the engine's whole state.
  tensorflow::Status Configure(const std::string& serialized);
  bool IsConfigured();
  void Reset();
  // The configuration's hosts and cores per host (1 and 1 when none is
  // installed): the shape of the "TPU" system ConfigureDistributedTPU reports.
  std::pair<int64_t, int64_t> HostsAndCores();

  // Resolves the shard that the `optimizer`'s Load or Retrieve op names;
  // InvalidArgument if the table is configured with another optimizer.
  tensorflow::Status ResolveShard(Optimizer optimizer,
                                  const std::string& config, int64_t table_id,
                                  const std::string& table_name,
                                  int64_t num_shards, int64_t shard_id,
                                  ShardRef* out);
  // Validates the request against the configuration and copies it into the
  // shard, after closing any open step (so that the step's gradients are not
  // applied to the rows the load brings). TF puts the config on one load op
  // only, and in a cluster another may run first: a load without config
  // before any configuration is kept (copied, up to kMaxDeferredLoads) and
  // applied, or rejected, when the configuration arrives.
  tensorflow::Status Load(const std::string& config, const LoadRequest& req,
                          const ParallelFor& parallel_for);
  // Closes any open step (its gradients belong in what is retrieved), then
  // copies the shard's NumArrays(table optimizer) arrays into `out`;
  // FailedPrecondition if it was never loaded here.
  tensorflow::Status Retrieve(const ShardRef& ref, float* const out[3],
                              const ParallelFor& parallel_for);
  // Allocates n local row ids and NumArrays(optimizer) arrays of n rows.
  using AllocateTouched =
      std::function<tensorflow::Status(int64_t n, int64_t** ids,
                                       float* out[3])>;
  // As Retrieve, but copies out only the rows that steps changed since the
  // shard's last Load or Retrieve (every row after a non-lazy step), with
  // their local ids: writing them into the variables Retrieve fills brings
  // those up to date at a cost that follows the rows trained.
  tensorflow::Status RetrieveTouched(const ShardRef& ref,
                                     const AllocateTouched& allocate,
                                     const ParallelFor& parallel_for);
  // As RetrieveTouched, but writes each of those rows straight into its own
  // row of `into`: NumArrays(table optimizer) arrays of the shard's shape,
  // the buffers of the variables that Retrieve fills. No rows in between,
  // and the copies run on the workers of `parallel_for`.
  tensorflow::Status RetrieveTouchedInto(const ShardRef& ref,
                                         float* const into[3],
                                         const ParallelFor& parallel_for);

  // Validates every feature of one enqueue op and queues the batch for the
  // core; nothing is queued if any feature is bad. `combiners` holds one
  // combiner per feature, or one per table, or none (all "sum").
  tensorflow::Status Enqueue(int64_t task, int64_t core,
                             std::vector<FeatureInput> inputs,
                             const std::vector<std::string>& combiners,
                             const std::string& mode_override);

  // Allocates Recv's output `index` of `shape` (input_shape + [dim]) and
  // returns its buffer.
  using AllocateOutput = std::function<tensorflow::Status(
      int index, const std::vector<int64_t>& shape, float** data)>;
  // Checks `config`, pops the core's oldest batch (waiting up to wait
  // for one), allocates the `num_outputs` outputs through `allocate` and
  // writes the combined activations into them. Shapes, allocation and the
  // pop happen in one hold of the engine's lock, so a concurrent reset
  // cannot leave buffers sized for another configuration. The combine runs
  // on the workers of `parallel_for`.
  tensorflow::Status Recv(const std::string& config, int64_t task,
                          int64_t core, const Wait& wait, int num_outputs,
                          const AllocateOutput& allocate,
                          const ParallelFor& parallel_for);
  // Backpropagates `grads` through the batch the core last received into the
  // tables' accumulators; when no core that has not sent in this step still
  // holds a training batch, applies one ApplySparseAdam per table shard.
  // A core with no received batch (TF pruned its Recv) sends into its oldest
  // queued batch instead, waiting up to wait for one as Recv does.
  // Refused for an INFERENCE configuration.
  tensorflow::Status Send(int64_t task, int64_t core,
                          const std::vector<const float*>& grads,
                          const std::vector<std::vector<int64_t>>& shapes,
                          const std::vector<float>& learning_rates,
                          const Wait& wait, const ParallelFor& parallel_for);

  // The multi-process step (docs/engine.md, "Training across processes").
  // A graph pass (cc/graph/routing_pass.cc) replaces each Recv with
  // RouteIds on its core, GatherRows on every owner host and
  // CombineActivations on the core, and each step's Sends with
  // SplitGradients on every core and ApplyGradients on every owner; TF's
  // runtime carries the tensors between them. Rows travel as [n, 2] int64
  // (table id, local row) pairs and flat float32 rows, table-major.

  // Allocates output `owner` as n (table, local row) pairs.
  using AllocateIds =
      std::function<tensorflow::Status(int owner, int64_t n, int64_t** data)>;
  // Pops the core's oldest batch as Recv does (waiting up to wait),
  // keeps it as the core's received batch, and writes for each of the
  // `num_owners` hosts the distinct rows of its shards that the batch reads.
  tensorflow::Status RouteIds(const std::string& config, int64_t task,
                              int64_t core, const Wait& wait, int num_owners,
                              const AllocateIds& allocate);
  // Copies the rows named by `ids` (n pairs) from this process's shard
  // `task` of each table into a buffer of their total floats.
  using AllocateFloats =
      std::function<tensorflow::Status(int64_t n, float** data)>;
  tensorflow::Status GatherRows(const std::string& config, int64_t task,
                                const int64_t* ids, int64_t n,
                                const AllocateFloats& allocate);
  // Writes the activations of the core's batch taken by RouteIds from the
  // rows each owner returned: rows[o] holds row_sizes[o] floats.
  tensorflow::Status CombineActivations(
      const std::string& config, int64_t task, int64_t core,
      const std::vector<const float*>& rows,
      const std::vector<int64_t>& row_sizes, int num_outputs,
      const AllocateOutput& allocate);
  // Allocates owner `owner`'s payload: n (table, local row) pairs and their
  // `floats` gradient floats.
  using AllocatePayload = std::function<tensorflow::Status(
      int owner, int64_t n, int64_t floats, int64_t** ids, float** grads)>;
  // Backpropagates `grads` through the core's batch (as Send does, taking
  // the oldest queued one if TF pruned the lookup) and writes, per owner,
  // the gradient rows of its shards: with accumulation one row per distinct
  // row, summed in entry order; without, one per occurrence.
  tensorflow::Status SplitGradients(
      int64_t task, int64_t core, const std::vector<const float*>& grads,
      const std::vector<std::vector<int64_t>>& shapes, int num_owners,
      const Wait& wait, const AllocatePayload& allocate);
  // One core's payload for this owner, as SplitGradients wrote it.
  struct Payload {
    const int64_t* ids = nullptr;
    int64_t rows = 0;
    const float* grads = nullptr;
    int64_t floats = 0;
  };
  // Accumulates every core's payload into shard `task` of each table, in
  // the order given, and applies one Adam step per table shard.
  tensorflow::Status ApplyGradients(int64_t task,
                                    const std::vector<Payload>& payloads,
                                    const std::vector<float>& learning_rates,
                                    const ParallelFor& parallel_for);

  // Wakes every op waiting for a batch, so that it rechecks its Wait's
  // `cancelled` flag.
  void WakeWaiters();

  // Tables, shards, rows and bytes held, as a JSON object.
  std::string InfoJson();

 private:
  // For each feature and entry of a routed batch, the offset of its row in
  // the floats its owner (the entry's shard) returns; and per owner, that
  // buffer's size.
  struct Routing {
    std::vector<std::vector<int64_t>> offsets;
    std::vector<int64_t> owner_floats;
  };

  struct Core {
    std::deque<Batch> queued;
    std::shared_ptr<const Batch> received;  // awaiting Send
    // Set with `received` by RouteIds: where each entry's row is in the
    // rows its owner returns.
    std::shared_ptr<const Routing> routing;
    // Training batches queued or received and not yet sent: while the core
    // has not sent in the open step, these keep the step open.
    int64_t training_batches = 0;
  };

  struct DeferredLoad {
    LoadRequest request;  // data[] points into `copies`
    std::vector<float> copies[3];
  };

  // Waits for the core's oldest batch as Recv does, runs `use` on it, and
  // only if that succeeds pops it into the core's `received` (dropping an
  // unsent one from the step), so that a failed lookup changes nothing.
  tensorflow::Status TakeBatchLocked(
      std::unique_lock<std::mutex>& lock, const char* op, int64_t task,
      int64_t core, const Wait& wait,
      const std::function<tensorflow::Status(const Batch&)>& use);
  // Send's and SplitGradients' checks, then the core's received batch (or,
  // with none, its oldest queued one, whose rows must be loaded here if
  // `local_rows`), taken out of the core.
  // `prepare` runs on the batch before it is taken: what it allocates
  // (a failure throws) comes before any change.
  tensorflow::Status TakeSendBatchLocked(
      std::unique_lock<std::mutex>& lock, const char* op, int64_t task,
      int64_t core, const std::vector<std::vector<int64_t>>& shapes,
      const Wait& wait, bool local_rows,
      const std::function<void(const Batch&)>& prepare,
      std::shared_ptr<const Batch>* batch);
  // Makes room in the accumulators that the core at `position` (in core
  // order) adds `batch`'s gradient rows to.
  void ReserveSentLocked(const Batch& batch, size_t position);
  tensorflow::Status InstallLocked(const std::string& serialized);
  tensorflow::Status ResolveShardLocked(Optimizer optimizer, int64_t table_id,
                                        const std::string& table_name,
                                        int64_t num_shards, int64_t shard_id,
                                        ShardRef* out);
  // Validates a load; `ref` names the shard it writes.
  tensorflow::Status CheckLoadLocked(const LoadRequest& req, ShardRef* ref);
  void WriteLoadLocked(const ShardRef& ref, const LoadRequest& req);
  tensorflow::Status CheckConfigLocked(const std::string& serialized);
  void ClearLocked();
  tensorflow::Status CheckCoreLocked(int64_t task, int64_t core) const;
  // Waits, releasing `lock`, up to wait for a batch in the queue of
  // core `key` and returns that core. Aborted if the engine was reset or
  // reconfigured meanwhile, Cancelled if the op was; FailedPrecondition
  // "`op` on core ...: `missing`" if no batch came.
  tensorflow::Status AwaitBatchLocked(std::unique_lock<std::mutex>& lock,
                                      const char* op, const CoreKey& key,
                                      const Wait& wait, const char* missing,
                                      Core** core);
  // FailedPrecondition naming the first id of `batch` whose shard was never
  // loaded here.
  tensorflow::Status CheckRowsLoadedLocked(const Batch& batch) const;
  // InvalidArgument naming a table whose dynamic learning rate tag has no
  // entry in `rates` (the learning rates a step brought), or whose rate is
  // negative, NaN or infinite.
  tensorflow::Status CheckLearningRatesLocked(
      const std::vector<float>& rates) const;
  // Whether a core that has not sent in the open step still holds a
  // training batch, i.e. the step must wait for its gradients.
  bool StepOutstandingLocked() const;
  // Runs the accumulated step on every table and clears the accumulators;
  // nothing when no core has sent since the last step.
  void ApplyStepLocked(const ParallelFor& parallel_for);

  std::mutex mu_;
  std::condition_variable enqueued_;
  std::shared_ptr<const EngineConfig> config_;  // null: none installed
  std::vector<std::shared_ptr<Table>> tables_;  // config_->tables' state
  std::map<CoreKey, Core> cores_;
  // The step barrier: cores that have sent gradients in the step now
  // accumulating (see StepOutstandingLocked for the cores it waits for).
  std::set<CoreKey> sent_;
  // Bumped by every reset or reconfiguration: a Recv that waited across one
  // fails instead of mixing two configurations.
  uint64_t generation_ = 0;
  int64_t waiting_ = 0;  // ops waiting for a batch now (InfoJson's "waiting")
  std::vector<float> step_learning_rates_;
  std::vector<std::unique_ptr<DeferredLoad>> deferred_loads_;
};

}  // namespace engine
}  // namespace tpu_embed_adam

#endif  // TPU_EMBED_ADAM_CC_ENGINE_ENGINE_H_
