#include "tpu_embed_adam/cc/core/adam_config.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/str_join.h"
#include "google/protobuf/unknown_field_set.h"
#include "tensorflow/core/platform/errors.h"

namespace tpu_embed_adam {

namespace {

namespace tpu = ::tensorflow::tpu;
using ::tensorflow::Status;
using ::tensorflow::errors::InvalidArgument;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kSmallestNormal = std::numeric_limits<float>::min();

// Where `msg` and its set submessages hold fields their types do not know:
// "path.number" each, as tpu_embed_adam/proto.py names them.
void UnknownFields(const google::protobuf::Message& msg, const std::string& path,
                   std::vector<std::string>* out) {
  const auto* reflection = msg.GetReflection();
  const auto& unknown = reflection->GetUnknownFields(msg);
  for (int i = 0; i < unknown.field_count(); ++i) {
    out->push_back(absl::StrCat(path, unknown.field(i).number()));
  }
  std::vector<const google::protobuf::FieldDescriptor*> fields;
  reflection->ListFields(msg, &fields);
  for (const auto* field : fields) {
    if (field->cpp_type() == google::protobuf::FieldDescriptor::CPPTYPE_MESSAGE &&
        !field->is_repeated()) {
      UnknownFields(reflection->GetMessage(msg, field),
                    absl::StrCat(path, field->name(), "."), out);
    }
  }
}

// Comparisons read the bits: TF's threads flush subnormals to zero, so a
// float compare would see a subnormal as 0 where Python (the rule's other
// reader, tpu_embed_adam/params.py) sees its value.
uint32_t Bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}
bool IsZero(float x) { return (Bits(x) & 0x7fffffffu) == 0; }
bool IsNegative(float x) { return std::signbit(x) && !IsZero(x); }
bool IsPositive(float x) { return !std::signbit(x) && !IsZero(x); }
bool IsSubnormal(float x) {
  return !IsZero(x) && (Bits(x) & 0x7f800000u) == 0;
}
// The order of finite floats as integers: sign-magnitude to two's complement.
int64_t OrderKey(float x) {
  const int64_t magnitude = Bits(x) & 0x7fffffffu;
  return std::signbit(x) ? -magnitude : magnitude;
}

// "Argument `name` must be finite in float32; received: v." for a NaN or
// infinite value, as params.py's `_real`.
Status Finite(const char* name, float value, bool bound = false) {
  if (std::isfinite(value)) return tensorflow::OkStatus();
  return InvalidArgument("Argument `", name, "` must be finite in float32",
                         bound ? " (use None for no bound)" : "",
                         "; received: ", value, ".");
}

}  // namespace

std::string OptimizerName(const tpu::OptimizationParameters& p) {
  const auto* oneof =
      tpu::OptimizationParameters::descriptor()->FindOneofByName("parameters");
  const auto* field = p.GetReflection()->GetOneofFieldDescriptor(p, oneof);
  return field == nullptr ? "none" : field->name();
}

// The rules and their order are those of AdamParameters.from_tf_proto
// (tpu_embed_adam/proto.py, then params.py's validation), and each message
// names the argument as it does: tests/test_rule_set.py runs both on the
// same inputs and requires the same verdict and argument.
Status AdamConfigFromProto(const tpu::OptimizationParameters& p,
                           AdamConfig* cfg) {
  if (!p.has_adam()) {
    return InvalidArgument("Argument `message` configures the '",
                           OptimizerName(p), "' optimizer, not 'adam'.");
  }
  std::vector<std::string> unknown;
  UnknownFields(p, "", &unknown);
  if (!unknown.empty()) {
    std::sort(unknown.begin(), unknown.end());
    unknown.erase(std::unique(unknown.begin(), unknown.end()), unknown.end());
    return InvalidArgument(
        "Argument `message` has fields that ", p.GetDescriptor()->full_name(),
        " does not know (field numbers, by path): ",
        absl::StrJoin(unknown, ", "),
        "; refused rather than dropped, since they may change the update.");
  }
  if (p.simulated_quantization().enabled()) {
    return InvalidArgument(
        "Argument `simulated_quantization` is not supported: the engine and ",
        "apply_adam do not quantize activations; remove it or set enabled: "
        "false.");
  }
  const auto& lr = p.learning_rate();
  if (lr.learning_rate_case() == tpu::LearningRate::LEARNING_RATE_NOT_SET) {
    return InvalidArgument(
        "Argument `message` has no learning_rate (constant or dynamic).");
  }
  if (lr.has_dynamic() && lr.dynamic().tag() < 0) {
    return InvalidArgument("Argument `tag` must be in [0, 2**31); received: ",
                           lr.dynamic().tag(), ".");
  }
  const int status = p.gradient_accumulation_status();
  if (!tpu::GradientAccumulationStatus::Status_IsValid(status)) {
    return InvalidArgument(
        "Argument `message` has an unknown gradient_accumulation_status ",
        status, ".");
  }
  const int hot_id = p.hot_id_replication_configuration().status();
  if (!tpu::HotIdReplicationConfiguration::Status_IsValid(hot_id)) {
    return InvalidArgument(
        "Argument `message` has an unknown ",
        "hot_id_replication_configuration.status ", hot_id, ".");
  }
  const int packing = p.low_dimensional_packing_status();
  if (!tpu::LowDimensionalPackingStatus::Status_IsValid(packing)) {
    return InvalidArgument("Argument `message` has an unknown ",
                           "low_dimensional_packing_status ", packing, ".");
  }
  if (lr.has_constant()) {
    const float rate = lr.constant();
    TF_RETURN_IF_ERROR(Finite("learning_rate", rate));
    if (!IsPositive(rate)) {
      return InvalidArgument("Argument `learning_rate` must be > 0; received: ",
                             rate, ".");
    }
    if (IsSubnormal(rate)) {
      return InvalidArgument(
          "Argument `learning_rate` must be a normal float32, at least ",
          kSmallestNormal, "; received: ", rate, ".");
    }
  }
  const auto& adam = p.adam();
  for (const auto& [name, value] :
       {std::pair<const char*, float>{"beta1", adam.beta1()},
        {"beta2", adam.beta2()}}) {
    TF_RETURN_IF_ERROR(Finite(name, value));
    if (IsNegative(value) || !(value < 1.0f)) {
      return InvalidArgument("Argument `", name,
                             "` must be >= 0 and < 1 (also in float32); ",
                             "received: ", value, ".");
    }
  }
  TF_RETURN_IF_ERROR(Finite("epsilon", adam.epsilon()));
  if (!IsPositive(adam.epsilon())) {
    return InvalidArgument(
        "Argument `epsilon` must be > 0 (also in float32); received: ",
        adam.epsilon(), ".");
  }
  // The update divides by sqrt(v + epsilon^2) or sqrt(v) + epsilon: a term
  // that underflows, or is subnormal and flushed to zero by TF's threads,
  // turns a row with v = m = 0 into NaN.
  const float eps_term = adam.use_sum_inside_sqrt()
                             ? adam.epsilon() * adam.epsilon()
                             : adam.epsilon();
  if (!(eps_term >= kSmallestNormal)) {
    return InvalidArgument(
        "Argument `epsilon` vanishes in float32: with sum_inside_sqrt=",
        adam.use_sum_inside_sqrt() ? "True, epsilon^2" : "False, epsilon",
        " must be at least ", kSmallestNormal, "; received: ", adam.epsilon(),
        ".");
  }
  // Unset limits are no limits; a set one must be a number.
  const auto bound = [](const tpu::ClippingLimits& limits, bool upper) {
    if (upper) return limits.has_upper() ? limits.upper().value() : kInf;
    return limits.has_lower() ? limits.lower().value() : -kInf;
  };
  const float clip[4] = {bound(p.clipping_limits(), false),
                         bound(p.clipping_limits(), true),
                         bound(p.gradient_clipping_limits(), false),
                         bound(p.gradient_clipping_limits(), true)};
  const bool set[4] = {p.clipping_limits().has_lower(),
                       p.clipping_limits().has_upper(),
                       p.gradient_clipping_limits().has_lower(),
                       p.gradient_clipping_limits().has_upper()};
  static constexpr const char* kClipNames[4] = {
      "clip_weight_min", "clip_weight_max", "clip_gradient_min",
      "clip_gradient_max"};
  for (int i = 0; i < 4; ++i) {
    if (set[i]) TF_RETURN_IF_ERROR(Finite(kClipNames[i], clip[i], true));
  }
  for (int i = 0; i < 4; i += 2) {
    if (OrderKey(clip[i]) > OrderKey(clip[i + 1])) {
      return InvalidArgument("Argument `", kClipNames[i], "` must be <= `",
                             kClipNames[i + 1], "`; received: ", clip[i],
                             " > ", clip[i + 1], ".");
    }
  }
  const float decay = p.weight_decay_factor();
  TF_RETURN_IF_ERROR(Finite("weight_decay_factor", decay));
  if (IsNegative(decay)) {
    return InvalidArgument(
        "Argument `weight_decay_factor` must be >= 0; received: ", decay, ".");
  }
  if (p.multiply_weight_decay_factor_by_learning_rate() && IsZero(decay)) {
    return InvalidArgument(
        "Argument `multiply_weight_decay_factor_by_learning_rate` is True but ",
        "`weight_decay_factor` is None (or 0); set a weight decay factor or ",
        "leave the flag unset.");
  }
  const bool accumulate =
      status != tpu::GradientAccumulationStatus::DISABLED;
  if (!accumulate && adam.use_non_lazy_adam()) {
    return InvalidArgument(
        "Argument `lazy_adam` is False, which needs ",
        "`use_gradient_accumulation=True`; received: ",
        "use_gradient_accumulation=False.");
  }
  if (!accumulate && (set[2] || set[3])) {
    return InvalidArgument(
        "Arguments `clip_gradient_min`/`clip_gradient_max` need ",
        "`use_gradient_accumulation=True`; received: ",
        "use_gradient_accumulation=False.");
  }
  AdamConfig& a = *cfg;
  a.beta1 = adam.beta1();
  a.beta2 = adam.beta2();
  a.epsilon = adam.epsilon();
  a.lazy = !adam.use_non_lazy_adam();
  a.sum_inside_sqrt = adam.use_sum_inside_sqrt();
  a.gradient_accumulation = accumulate;
  a.clip_weight_min = clip[0];
  a.clip_weight_max = clip[1];
  a.clip_gradient_min = clip[2];
  a.clip_gradient_max = clip[3];
  a.weight_decay_factor = decay;
  a.multiply_weight_decay_factor_by_learning_rate =
      p.multiply_weight_decay_factor_by_learning_rate();
  return tensorflow::OkStatus();
}

tensorflow::Status AdamConfigFromSerialized(const std::string& serialized,
                                            AdamConfig* cfg) {
  tpu::OptimizationParameters p;
  if (!p.ParseFromString(serialized)) {
    return InvalidArgument(
        "Argument `message`: bytes do not parse as ",
        tpu::OptimizationParameters::descriptor()->full_name(), ".");
  }
  return AdamConfigFromProto(p, cfg);
}

}  // namespace tpu_embed_adam
