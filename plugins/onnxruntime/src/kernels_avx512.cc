// AVX-512 (F/BW/VL/DQ) kernels: row-dot with dword expands, outer product for larger M.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "packed.h"

namespace ffsplit {
namespace avx512 {
#define FFS_VBMI2 0
#include "rowdot512.inc"
#include "outer.inc"
}  // namespace avx512
}  // namespace ffsplit
