// Transparent huge pages for arrays whose rows are touched at random (tables
// and Adam slots): with 4 KB pages nearly every scattered row costs a TLB miss
// and a page walk (two-dimensional under a hypervisor); 2 MB pages make the
// TLB cover gigabytes.
#ifndef TPU_EMBED_ADAM_CC_CORE_HUGE_PAGES_H_
#define TPU_EMBED_ADAM_CC_CORE_HUGE_PAGES_H_

#include <cstddef>

namespace tpu_embed_adam {

// Arrays smaller than this stay as they are: 4 KB pages of a few megabytes
// fit the TLB, and a collapse would cost more than it saves.
constexpr size_t kHugePageMinBytes = size_t{8} << 20;

// Asks the kernel to back the whole 2 MB pages inside [data, data + bytes)
// with huge pages (MADV_HUGEPAGE), and with `collapse` also to move the pages
// already there into huge pages now (MADV_COLLAPSE, Linux 6.1+; a copy of the
// range, about 0.5-2 ms per MB here). Only a hint, and contents are unchanged:
// does nothing where transparent huge pages are "never", off Linux, for
// arrays under kHugePageMinBytes, and when the kernel refuses (older kernels,
// no free huge pages). Returns whether the range was collapsed.
bool AdviseHugePages(void* data, size_t bytes, bool collapse);

}  // namespace tpu_embed_adam

#endif  // TPU_EMBED_ADAM_CC_CORE_HUGE_PAGES_H_
