// The arrays of a table under TPU Adam, in the one order every op, buffer
// and checkpoint holds them: the parameters, then the first and second
// moments. Python's counterpart is tpu_embed_adam/slots.py.
#ifndef TPU_EMBED_ADAM_CC_CORE_SLOTS_H_
#define TPU_EMBED_ADAM_CC_CORE_SLOTS_H_

namespace tpu_embed_adam {

inline constexpr int kAdamArrays = 3;
// As TF's Load/RetrieveTPUEmbeddingADAMParameters ops name them.
inline constexpr const char* kLoadArrayNames[kAdamArrays] = {
    "parameters", "momenta", "velocities"};
// As the fused op (TpuEmbedAdamApply) names its variable inputs.
inline constexpr const char* kApplyVariableNames[kAdamArrays] = {"var", "m",
                                                                 "v"};

}  // namespace tpu_embed_adam

#endif  // TPU_EMBED_ADAM_CC_CORE_SLOTS_H_
