#include "tpu_embed_adam/cc/engine/batch.h"

#include <cmath>
#include <map>

#include "absl/strings/str_cat.h"
#include "tensorflow/core/platform/errors.h"
#include "tpu_embed_adam/cc/core/shape_util.h"

namespace tpu_embed_adam {
namespace engine {

namespace {

using tensorflow::Status;
using tensorflow::errors::InvalidArgument;

// Slot of the id at `pos` in a sample, or -1 when a sequence feature's
// length cuts it off.
int64_t SequenceSlot(const std::vector<int64_t>& shape, int64_t sample,
                     int64_t pos) {
  if (shape.size() == 1) return sample;
  return pos < shape[1] ? sample * shape[1] + pos : -1;
}

}  // namespace

Status BuildEntries(const std::string& what,
                    const std::vector<int64_t>& input_shape,
                    int64_t vocabulary_size, const FeatureInput& in,
                    std::vector<Entry>* out) {
  const int64_t n = in.ids.size();
  const int rank = input_shape.size();
  // The configuration guarantees a positive product; a bad one must not
  // size the buffers below.
  const int64_t slots = CheckedProduct(input_shape);
  if (rank < 1 || rank > 2 || slots <= 0) {
    return InvalidArgument(what, ": input_shape ", ShapeString(input_shape),
                           " is not [batch] or [batch, max_sequence_length]");
  }
  if (in.max_sequence_length >= 0) {
    const int64_t configured = rank == 2 ? input_shape[1] : 0;
    if (in.max_sequence_length != configured) {
      return InvalidArgument(what, ": max_sequence_lengths entry ",
                             in.max_sequence_length, " but the configuration ",
                             "gives input_shape ", ShapeString(input_shape));
    }
  }
  if (!in.weights.empty() && static_cast<int64_t>(in.weights.size()) != n) {
    return InvalidArgument(what, ": aggregation_weights has ",
                           in.weights.size(), " values for ", n,
                           " embedding_indices (give none or one per id)");
  }
  // A NaN or Inf weight would poison its slot's activation and, through the
  // combiner's denominator, every other id of the slot.
  for (size_t i = 0; i < in.weights.size(); ++i) {
    if (!std::isfinite(in.weights[i])) {
      return InvalidArgument(what, ": aggregation_weights[", i, "] = ",
                             in.weights[i], " is not finite");
    }
  }
  if (in.combiner != "sum" && in.combiner != "mean" && in.combiner != "sqrtn") {
    return InvalidArgument(what, ": combiner '", in.combiner,
                           "' is not 'sum', 'mean' or 'sqrtn'");
  }
  std::vector<int64_t> slot_of(n);
  switch (in.layout) {
    case Layout::kDense:
      // A sparse feature with no ids in the whole batch arrives without
      // sample indices too; a TPU gives its samples zero activations.
      if (n != slots && n != 0) {
        return InvalidArgument(what, ": ", n, " embedding_indices without ",
                               "sample indices; input_shape ",
                               ShapeString(input_shape), " needs ", slots);
      }
      for (int64_t i = 0; i < n; ++i) slot_of[i] = i;
      break;
    case Layout::kRowSplits: {
      const auto& s = in.index;
      const bool ok_shape = static_cast<int64_t>(s.size()) == input_shape[0] + 1;
      if (!ok_shape || s.front() != 0 || s.back() != n) {
        return InvalidArgument(what, ": row splits of size ", s.size(),
                               " must have batch + 1 = ", input_shape[0] + 1,
                               " entries from 0 to ", n);
      }
      // Every split bounds the slot_of writes below: check them all first.
      for (int64_t b = 0; b < input_shape[0]; ++b) {
        if (s[b + 1] < s[b] || s[b + 1] > n) {
          return InvalidArgument(what, ": row splits must be non-decreasing ",
                                 "within [0, ", n, "]; entry ", b + 1, " is ",
                                 s[b + 1], " after ", s[b]);
        }
      }
      for (int64_t b = 0; b < input_shape[0]; ++b) {
        for (int64_t i = s[b]; i < s[b + 1]; ++i) {
          slot_of[i] = SequenceSlot(input_shape, b, i - s[b]);
        }
      }
      break;
    }
    case Layout::kSampleIndices: {
      const int64_t cols = in.index_cols;
      // Divides rather than multiplies: n * cols may overflow.
      const int64_t size = in.index.size();
      if (cols < 1 || size % cols != 0 || size / cols != n) {
        return InvalidArgument(what, ": sample indices of ", in.index.size(),
                               " values with ", cols, " columns for ", n,
                               " embedding_indices");
      }
      // A [batch] feature's ids are (sample) or (sample, position in the
      // bag); a third column would address a dimension the feature does not
      // have. Sequence features take TF's [sample, position, ...] indices.
      if (rank == 1 && cols > 2) {
        return InvalidArgument(what, ": sample indices have ", cols,
                               " columns; input_shape ",
                               ShapeString(input_shape),
                               " takes 1 (sample) or 2 (sample, position)");
      }
      // Without a position column, a sequence id's position is its rank
      // among its sample's ids, as for row splits.
      std::map<int64_t, int64_t> seen;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t* row = &in.index[i * cols];
        if (row[0] < 0 || row[0] >= input_shape[0]) {
          return InvalidArgument(what, ": sample index ", row[0], " at ", i,
                                 " is outside the batch [0, ", input_shape[0],
                                 ")");
        }
        int64_t pos = 0;
        if (rank == 2) {
          pos = cols >= 2 ? row[1] : seen[row[0]]++;
          if (pos < 0) {
            return InvalidArgument(what, ": sequence position ", pos, " at ",
                                   i, " is negative");
          }
        }
        slot_of[i] = SequenceSlot(input_shape, row[0], pos);
      }
      break;
    }
  }

  // Only ids that reach a slot must be rows: a TPU drops the ids past a
  // sequence feature's length before it looks anything up.
  for (int64_t i = 0; i < n; ++i) {
    if (slot_of[i] >= 0 && (in.ids[i] < 0 || in.ids[i] >= vocabulary_size)) {
      return InvalidArgument(what, ": embedding_indices[", i, "] = ",
                             in.ids[i], " is outside the vocabulary [0, ",
                             vocabulary_size, ")");
    }
  }

  // Combiner denominators per slot; a zero one yields a zero activation.
  // The combiner is read once, not per id.
  const bool sum = in.combiner == "sum", mean = in.combiner == "mean";
  std::vector<double> denom(sum ? 0 : slots, 0.0);
  auto weight = [&](int64_t i) { return in.weights.empty() ? 1.0f : in.weights[i]; };
  if (!sum) {
    for (int64_t i = 0; i < n; ++i) {
      if (slot_of[i] < 0) continue;
      const double w = weight(i);
      denom[slot_of[i]] += mean ? w : w * w;
    }
    if (!mean) {
      for (double& d : denom) d = std::sqrt(d);
    }
  }
  out->clear();
  out->reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (slot_of[i] < 0) continue;
    float scale = weight(i);
    if (!sum) {
      const double d = denom[slot_of[i]];
      scale = d == 0.0 ? 0.0f : static_cast<float>(scale / d);
    }
    out->push_back({slot_of[i], in.ids[i], scale});
  }
  return tensorflow::OkStatus();
}

}  // namespace engine
}  // namespace tpu_embed_adam
