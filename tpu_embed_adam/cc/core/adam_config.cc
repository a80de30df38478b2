#include "tpu_embed_adam/cc/core/adam_config.h"

#include <cmath>
#include <limits>
#include <utility>

#include "tensorflow/core/platform/errors.h"

namespace tpu_embed_adam {

namespace {

namespace tpu = ::tensorflow::tpu;
using ::tensorflow::errors::InvalidArgument;

constexpr float kInf = std::numeric_limits<float>::infinity();

}  // namespace

std::string OptimizerName(const tpu::OptimizationParameters& p) {
  const auto* oneof =
      tpu::OptimizationParameters::descriptor()->FindOneofByName("parameters");
  const auto* field = p.GetReflection()->GetOneofFieldDescriptor(p, oneof);
  return field == nullptr ? "none" : field->name();
}

tensorflow::Status AdamConfigFromProto(const tpu::OptimizationParameters& p,
                                       AdamConfig* cfg) {
  if (!p.has_adam()) {
    return InvalidArgument("optimizer is '", OptimizerName(p),
                           "', not adam");
  }
  const auto& adam = p.adam();
  for (const auto& [name, value] :
       {std::pair<const char*, float>{"beta1", adam.beta1()},
        {"beta2", adam.beta2()}}) {
    // Written so that NaN fails too.
    if (!(value >= 0.0f && value < 1.0f)) {
      return InvalidArgument("Adam ", name, " ", value, " is outside [0, 1)");
    }
  }
  if (!(adam.epsilon() > 0.0f) || !std::isfinite(adam.epsilon())) {
    return InvalidArgument("Adam epsilon ", adam.epsilon(),
                           " must be positive and finite");
  }
  // The update divides by sqrt(v + epsilon^2) or sqrt(v) + epsilon: a term
  // that underflows, or is subnormal and flushed to zero by TF's threads,
  // turns a row with v = m = 0 into NaN.
  const float eps_term = adam.use_sum_inside_sqrt()
                             ? adam.epsilon() * adam.epsilon()
                             : adam.epsilon();
  if (!(eps_term >= std::numeric_limits<float>::min())) {
    return InvalidArgument(
        "Adam epsilon ", adam.epsilon(), " vanishes in float32 (",
        adam.use_sum_inside_sqrt() ? "epsilon^2" : "epsilon",
        " must be at least ", std::numeric_limits<float>::min(), ")");
  }
  if (!(p.weight_decay_factor() >= 0.0f) ||
      !std::isfinite(p.weight_decay_factor())) {
    return InvalidArgument("weight_decay_factor ", p.weight_decay_factor(),
                           " must be non-negative and finite");
  }
  // Infinite limits mean "no limit"; NaN or crossed limits mean nothing.
  float bounds[2][2];
  int i = 0;
  for (const auto& [name, limits] :
       {std::pair<const char*, const tpu::ClippingLimits*>{
            "gradient_clipping_limits", &p.gradient_clipping_limits()},
        {"clipping_limits", &p.clipping_limits()}}) {
    const float lo = limits->has_lower() ? limits->lower().value() : -kInf;
    const float hi = limits->has_upper() ? limits->upper().value() : kInf;
    if (std::isnan(lo) || std::isnan(hi) || lo > hi) {
      return InvalidArgument(name, " [", lo, ", ", hi, "] is not an interval");
    }
    bounds[i][0] = lo;
    bounds[i][1] = hi;
    ++i;
  }
  AdamConfig& a = *cfg;
  a.beta1 = adam.beta1();
  a.beta2 = adam.beta2();
  a.epsilon = adam.epsilon();
  a.lazy = !adam.use_non_lazy_adam();
  a.sum_inside_sqrt = adam.use_sum_inside_sqrt();
  a.gradient_accumulation = p.gradient_accumulation_status() !=
                            tpu::GradientAccumulationStatus::DISABLED;
  a.clip_gradient_min = bounds[0][0];
  a.clip_gradient_max = bounds[0][1];
  a.clip_weight_min = bounds[1][0];
  a.clip_weight_max = bounds[1][1];
  a.weight_decay_factor = p.weight_decay_factor();
  a.multiply_weight_decay_factor_by_learning_rate =
      p.multiply_weight_decay_factor_by_learning_rate();
  return tensorflow::OkStatus();
}

tensorflow::Status AdamConfigFromSerialized(const std::string& serialized,
                                            AdamConfig* cfg) {
  tpu::OptimizationParameters p;
  if (!p.ParseFromString(serialized)) {
    return InvalidArgument("not a serialized OptimizationParameters");
  }
  return AdamConfigFromProto(p, cfg);
}

}  // namespace tpu_embed_adam
