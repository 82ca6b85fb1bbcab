// AVX-512 VBMI2 row-dot kernel: vpexpandb expands 64 packed int8 values by one mask word.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "packed.h"

namespace ffsplit {
namespace avx512vbmi2 {
#define FFS_VBMI2 1
#include "rowdot512.inc"
}  // namespace avx512vbmi2
}  // namespace ffsplit
