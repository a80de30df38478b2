// One enqueued batch, reduced to what the lookup and its gradient need: for
// every feature, (activation slot, global id, scale) triples, where the scale
// folds the id's weight and its slot's combiner together. Recv then computes
// activation[slot] += scale * row(id) and Send gradient(id) = scale *
// grad[slot], so both directions share one description of the combiner.
#ifndef TPU_EMBED_ADAM_CC_ENGINE_BATCH_H_
#define TPU_EMBED_ADAM_CC_ENGINE_BATCH_H_

#include <cstdint>
#include <string>
#include <vector>

#include "tensorflow/core/platform/status.h"

namespace tpu_embed_adam {
namespace engine {

// How an enqueue op says which sample each id belongs to.
enum class Layout {
  kDense,          // one id per activation slot, row-major
  kRowSplits,      // [batch + 1] row splits
  kSampleIndices,  // [n, index_cols] sparse indices
};

// One feature of an enqueue op, converted to plain types by the kernel.
struct FeatureInput {
  Layout layout = Layout::kDense;
  std::vector<int64_t> index;  // row splits or row-major sample indices
  int64_t index_cols = 0;
  std::vector<int64_t> ids;
  std::vector<float> weights;  // empty: every weight is 1
  std::string combiner = "sum";  // set by the engine from the op's list
  int table_id = -1;                 // the op's table_ids entry, -1 if none
  int64_t max_sequence_length = -1;  // the op's entry, -1 if none
};

struct Entry {
  int64_t slot;  // flat index into the feature's input_shape
  int64_t id;    // global row id
  float scale;
  // Where the id lives (shard of its table, row within the shard): set by
  // the engine at enqueue, so that Recv and Send locate each id only once.
  int32_t shard = 0;
  int64_t local = 0;
};

struct Batch {
  std::vector<std::vector<Entry>> features;
  bool training = true;
};

// Validates `in` against a feature of shape `input_shape` over a table of
// `vocabulary_size` rows and fills `out`. Ids past a sequence feature's
// length are dropped (the TPU truncates sequences); everything else out of
// range is an InvalidArgument that starts with `what`.
tensorflow::Status BuildEntries(const std::string& what,
                                const std::vector<int64_t>& input_shape,
                                int64_t vocabulary_size,
                                const FeatureInput& in,
                                std::vector<Entry>* out);

}  // namespace engine
}  // namespace tpu_embed_adam

#endif  // TPU_EMBED_ADAM_CC_ENGINE_BATCH_H_
