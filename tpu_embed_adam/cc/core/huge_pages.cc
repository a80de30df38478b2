#include "tpu_embed_adam/cc/core/huge_pages.h"

#include <cstdint>
#include <fstream>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// glibc's headers may predate the kernel's constant (uapi, stable since 6.1);
// an older kernel answers EINVAL, which AdviseHugePages treats as a refusal.
#if defined(__linux__) && !defined(MADV_COLLAPSE)
#define MADV_COLLAPSE 25
#endif

namespace tpu_embed_adam {
namespace {

// "always [madvise] never": the bracketed word is the mode. MADV_COLLAPSE
// would collapse even under "never", which an administrator chose.
bool HugePagesAllowed() {
  static const bool allowed = [] {
    std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string line;
    return std::getline(f, line) && line.find("[never]") == std::string::npos;
  }();
  return allowed;
}

}  // namespace

bool AdviseHugePages(void* data, size_t bytes, bool collapse) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < kHugePageMinBytes || !HugePagesAllowed()) return false;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last <= first) return false;
  void* start = reinterpret_cast<void*>(first);
  if (madvise(start, last - first, MADV_HUGEPAGE) != 0) return false;
  return collapse && madvise(start, last - first, MADV_COLLAPSE) == 0;
#else
  (void)data;
  (void)bytes;
  (void)collapse;
  return false;
#endif
}

}  // namespace tpu_embed_adam
