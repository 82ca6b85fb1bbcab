// AVX2 + FMA kernels: row-dot with a 256-entry shuffle table per mask byte (no expand
// instruction before AVX-512), outer product for larger M.
#include <immintrin.h>

#include <cstring>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "packed.h"

namespace ffsplit {
namespace avx2 {
namespace {

struct Tables {
  alignas(16) uint8_t shuf[256][16];  // pshufb: packed int8 -> 8 expanded lanes (0x80 = zero)
  alignas(32) int32_t perm[256][8];   // vpermps: packed fp32 -> 8 expanded lanes
  alignas(32) int32_t lane[256][8];   // -1 where the bit is set
  Tables() {
    for (int b = 0; b < 256; ++b) {
      int c = 0;
      std::memset(shuf[b], 0x80, 16);
      for (int i = 0; i < 8; ++i) {
        const bool set = (b >> i) & 1;
        shuf[b][i] = set ? static_cast<uint8_t>(c) : 0x80;
        perm[b][i] = set ? c : 0;
        lane[b][i] = set ? -1 : 0;
        c += set;
      }
    }
  }
};
const Tables& T() {
  static const Tables t;
  return t;
}

template <int MR, bool INT8>
void RowDotRows(const Packed& p, const float* x, float* y, int64_t k, int64_t mg, int64_t n0, int64_t n1) {
  const Tables& t = T();
  for (int64_t n = n0; n < n1; ++n) {
    const uint64_t* mrow = p.mask.data() + n * p.words;
    int64_t cur = p.row_ptr[n];
    __m256 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t wi = 0; wi < p.words; ++wi) {
      uint64_t bits = mrow[wi];
      if (!bits) continue;
      for (int j = 0; j < 8; ++j, bits >>= 8) {
        const unsigned b = bits & 0xFF;
        if (!b) continue;
        __m256 w;
        if (INT8) {
          // reads 8 bytes: the packed values carry 64 bytes of padding
          const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.values_i8.data() + cur));
          const __m128i e = _mm_shuffle_epi8(v, _mm_load_si128(reinterpret_cast<const __m128i*>(t.shuf[b])));
          w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e));
        } else {
          const __m256 v = _mm256_loadu_ps(p.values_f32.data() + cur);  // 16 floats of padding
          const __m256i lm = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.lane[b]));
          w = _mm256_and_ps(_mm256_permutevar8x32_ps(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.perm[b]))),
                            _mm256_castsi256_ps(lm));
        }
        cur += __builtin_popcount(b);
        const __m256i lm = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.lane[b]));
        for (int r = 0; r < MR; ++r) {
          const float* xr = x + (mg + r) * k + wi * 64 + j * 8;
          const __m256 xv = _mm256_maskload_ps(xr, lm);  // masked lanes are not read: nothing past K
          acc[r][j & 1] = _mm256_fmadd_ps(w, xv, acc[r][j & 1]);
        }
      }
    }
    const float s = p.scales[n];
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_add_ps(acc[r][0], acc[r][1]);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      y[(mg + r) * p.n + n] = _mm_cvtss_f32(h) * s;
    }
  }
}

template <bool INT8>
void RowDotT(const Packed& p, const float* x, float* y, int64_t m, int64_t k, int64_t n0, int64_t n1) {
  int64_t mg = 0;
  for (; mg + 4 <= m; mg += 4) RowDotRows<4, INT8>(p, x, y, k, mg, n0, n1);
  switch (m - mg) {
    case 3: RowDotRows<3, INT8>(p, x, y, k, mg, n0, n1); break;
    case 2: RowDotRows<2, INT8>(p, x, y, k, mg, n0, n1); break;
    case 1: RowDotRows<1, INT8>(p, x, y, k, mg, n0, n1); break;
    default: break;
  }
}

}  // namespace

void RowDot(const Packed& p, const float* x, float* y, int64_t m, int64_t k, int64_t n0, int64_t n1) {
  if (p.int8)
    RowDotT<true>(p, x, y, m, k, n0, n1);
  else
    RowDotT<false>(p, x, y, m, k, n0, n1);
}

#include "outer.inc"

}  // namespace avx2
}  // namespace ffsplit
