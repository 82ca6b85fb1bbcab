// AVX-512 VNNI row-dot kernel (opt-in, FFSPLIT_ISA=avx512vnni, int8 weights only): activations
// are quantized per row to uint8 with zero point 128, weights are expanded with vpexpandb and
// multiplied with vpdpbusd (64 multiply-adds per instruction). Not exact: see the tolerance in
// the tests (relative error ~1e-3 .. 1e-2).
#include <immintrin.h>

#include "packed.h"

namespace ffsplit {
namespace avx512vnni {
namespace {

template <int MR>
void Rows(const Packed& p, const uint8_t* xq, const float* xs, int64_t kpad, float* y, int64_t mg, int64_t n0,
          int64_t n1) {
  const int8_t* vals = p.values_i8.data();
  constexpr int A = MR == 1 ? 2 : 1;
  for (int64_t n = n0; n < n1; ++n) {
    const uint64_t* mrow = p.mask.data() + n * p.words;
    const int8_t* v = vals + p.row_ptr[n];
    __m512i acc[MR][A];
    for (int r = 0; r < MR; ++r)
      for (int a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_si512();
    for (int64_t wi = 0; wi < p.words; ++wi) {
      const uint64_t bits = mrow[wi];
      if (!bits) continue;
      const __m512i e = _mm512_maskz_expand_epi8(bits, _mm512_loadu_si512(v));  // 64 bytes of padding
      v += __builtin_popcountll(bits);
      for (int r = 0; r < MR; ++r) {
        const __m512i xv = _mm512_loadu_si512(xq + (mg + r) * kpad + wi * 64);
        acc[r][wi % A] = _mm512_dpbusd_epi32(acc[r][wi % A], xv, e);
      }
    }
    const float s = p.scales[n];
    const int64_t corr = 128 * static_cast<int64_t>(p.rowsum[n]);
    for (int r = 0; r < MR; ++r) {
      __m512i t = acc[r][0];
      for (int a = 1; a < A; ++a) t = _mm512_add_epi32(t, acc[r][a]);
      const int64_t dot = static_cast<int64_t>(_mm512_reduce_add_epi32(t)) - corr;
      y[(mg + r) * p.n + n] = static_cast<float>(dot) * xs[mg + r] * s;
    }
  }
}

}  // namespace

void RowDot(const Packed& p, const uint8_t* xq, const float* xs, int64_t kpad, float* y, int64_t m, int64_t n0,
            int64_t n1) {
  int64_t mg = 0;
  for (; mg + 4 <= m; mg += 4) Rows<4>(p, xq, xs, kpad, y, mg, n0, n1);
  switch (m - mg) {
    case 3: Rows<3>(p, xq, xs, kpad, y, mg, n0, n1); break;
    case 2: Rows<2>(p, xq, xs, kpad, y, mg, n0, n1); break;
    case 1: Rows<1>(p, xq, xs, kpad, y, mg, n0, n1); break;
    default: break;
  }
}

}  // namespace avx512vnni
}  // namespace ffsplit
