// Shape helpers shared by the engine and the kernels: error text and sizes that
// must not overflow int64 (shapes come from configurations and tensors that
// users control).
#ifndef TPU_EMBED_ADAM_CC_CORE_SHAPE_UTIL_H_
#define TPU_EMBED_ADAM_CC_CORE_SHAPE_UTIL_H_

#include <cstdint>
#include <string>
#include <vector>

namespace tpu_embed_adam {

// "[2, 3]", for error messages.
std::string ShapeString(const std::vector<int64_t>& shape);

// The product of `dims`, or -1 when a dim is negative or the product
// overflows int64.
int64_t CheckedProduct(const std::vector<int64_t>& dims);

}  // namespace tpu_embed_adam

#endif  // TPU_EMBED_ADAM_CC_CORE_SHAPE_UTIL_H_
