// Reads TF's OptimizationParameters into the AdamConfig of sparse_adam.h: the
// one C++ reader of the Adam fields, used by the engine (a table's parameters
// in a TPUEmbeddingConfiguration) and by the fused op (its serialized
// `optimization_parameters` attr). The fields and their meaning are those of
// tpu_embed_adam.AdamParameters (tpu_embed_adam/params.py and proto.py).
#ifndef TPU_EMBED_ADAM_CC_CORE_ADAM_CONFIG_H_
#define TPU_EMBED_ADAM_CC_CORE_ADAM_CONFIG_H_

#include <string>

#include "tensorflow/core/platform/status.h"
#include "tensorflow/core/protobuf/tpu/optimization_parameters.pb.h"
#include "tpu_embed_adam/cc/core/sparse_adam.h"

namespace tpu_embed_adam {

// The name of the field set in `p`'s `parameters` oneof ("adam",
// "stochastic_gradient_descent", ...), or "none"; for error messages.
std::string OptimizerName(const tensorflow::tpu::OptimizationParameters& p);

// Checks the Adam fields of `p` and fills `*cfg` from them. Values that would
// train silently wrong are refused with InvalidArgument (message without a
// prefix; callers add the table or op they belong to): another optimizer,
// betas outside [0, 1), an epsilon that is not positive and finite or that
// vanishes in float32, a negative or non-finite weight decay, clipping limits
// that are NaN or crossed. Unset limits are +-infinity. The learning rate is
// not read: the engine reads it per table, the fused op takes it as an input.
tensorflow::Status AdamConfigFromProto(
    const tensorflow::tpu::OptimizationParameters& p, AdamConfig* cfg);

// Parses a serialized OptimizationParameters (TF's, or tpu_embed_adam's,
// byte-identical) and reads it with AdamConfigFromProto.
tensorflow::Status AdamConfigFromSerialized(const std::string& serialized,
                                            AdamConfig* cfg);

}  // namespace tpu_embed_adam

#endif  // TPU_EMBED_ADAM_CC_CORE_ADAM_CONFIG_H_
