#include "tpu_embed_adam/cc/core/shape_util.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tpu_embed_adam {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

int64_t CheckedProduct(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (int64_t d : dims) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return -1;
  }
  return n;
}

}  // namespace tpu_embed_adam
