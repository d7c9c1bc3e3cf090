// Smallest and largest value of an integer index tensor, for the op layer's range checks on CPU tensors
// (reprokernels/_validation.py: check_index_range). torch.aminmax plus two scalar reads cost about 4 us a
// tensor; the indices of a call are small (a mapping, a row of task ids, a batch of token ids), so one pass
// here under one pybind11 call is cheaper than the launch of anything.
#include <algorithm>

#include "common.h"
#include "kernels.h"

namespace rkcpu {

int index_range(std::uintptr_t ptr, std::int32_t dtype, std::int64_t n0, std::int64_t n1, std::int64_t s0,
                std::int64_t s1, std::int64_t* lo, std::int64_t* hi) {
  if (ptr == 0 || dtype < 0 || dtype > 4 || n0 <= 0 || n1 <= 0) return 1;
  const void* base = reinterpret_cast<const void*>(ptr);
  std::int64_t mn = load_index(dtype, base, 0), mx = mn;
  for (std::int64_t i = 0; i < n0; ++i) {
    const std::int64_t row = i * s0;
    if (s1 == 1 && dtype == 0) {  // the common case: contiguous int64 rows, a loop the compiler vectorises
      const std::int64_t* r = static_cast<const std::int64_t*>(base) + row;
      for (std::int64_t j = 0; j < n1; ++j) {
        mn = std::min(mn, r[j]);
        mx = std::max(mx, r[j]);
      }
      continue;
    }
    for (std::int64_t j = 0; j < n1; ++j) {
      const std::int64_t v = load_index(dtype, base, row + j * s1);
      mn = std::min(mn, v);
      mx = std::max(mx, v);
    }
  }
  *lo = mn;
  *hi = mx;
  return 0;
}

bool index_within(std::uintptr_t ptr, std::int32_t dtype, std::int64_t n0, std::int64_t n1, std::int64_t s0,
                  std::int64_t s1, std::int64_t lo, std::int64_t hi) {
  if (n0 <= 0 || n1 <= 0) return true;
  std::int64_t mn = 0, mx = 0;
  return index_range(ptr, dtype, n0, n1, s0, s1, &mn, &mx) == 0 && mn >= lo && mx <= hi;
}

}  // namespace rkcpu
