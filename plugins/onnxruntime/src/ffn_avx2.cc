// AVX2 + FMA kernels of FusedFFN (ffn.cc): dense row-dot for the heavy parts, and the input-major
// scatter of the light down projection (a 256-entry pshufb table expands 8 packed int8 codes).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "ffn.h"

namespace ffsplit {
namespace {

struct Shuf {
  alignas(16) uint8_t t[256][16];  // packed int8 -> 8 lanes (0x80 = zero lane)
  Shuf() {
    for (int b = 0; b < 256; ++b) {
      std::memset(t[b], 0x80, 16);
      int c = 0;
      for (int i = 0; i < 8; ++i)
        if ((b >> i) & 1) t[b][i] = static_cast<uint8_t>(c++);
    }
  }
};
const Shuf& S() {
  static const Shuf s;
  return s;
}

float Hsum(__m256 a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// y[r, n] for R rows of x against one weight row wr (its loads shared by the rows); each row's sum in
// the order of the one-row loop (4 accumulators over steps of 32, then 8, then the scalar tail), so a
// row's result does not depend on how many rows are computed with it
template <int R>
inline void DenseRows(const float* wr, int64_t k, const float* x, int64_t ldx, float* y, int64_t ldy) {
  __m256 a[R][4];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32)
    for (int j = 0; j < 4; ++j) {
      const __m256 wv = _mm256_loadu_ps(wr + i + 8 * j);
      for (int r = 0; r < R; ++r) a[r][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * ldx + i + 8 * j), a[r][j]);
    }
  for (; i + 8 <= k; i += 8) {
    const __m256 wv = _mm256_loadu_ps(wr + i);
    for (int r = 0; r < R; ++r) a[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * ldx + i), a[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    const float* xr = x + r * ldx;
    float s = Hsum(_mm256_add_ps(_mm256_add_ps(a[r][0], a[r][1]), _mm256_add_ps(a[r][2], a[r][3])));
    for (int64_t t = i; t < k; ++t) s += wr[t] * xr[t];
    y[r * ldy] = s;
  }
}

void Dense(const float* w, int64_t k, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy, int64_t n0,
           int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * k;
    if (n + 1 < n1) _mm_prefetch(reinterpret_cast<const char*>(wr + k), _MM_HINT_T0);
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) DenseRows<4>(wr, k, x + r * ldx, ldx, y + r * ldy + n, ldy);
    for (; r < m; ++r) DenseRows<1>(wr, k, x + r * ldx, ldx, y + r * ldy + n, ldy);
  }
}

template <bool SKIP>
void ScatterT(const InputMajor& w, int64_t c, const float* a, int64_t lda, int64_t nrows, const int32_t* neurons,
              int64_t count, float* acc, int64_t ldacc) {
  const Shuf& t = S();
  const int64_t cw = w.chunk_words;
  const int64_t* off = w.off.data() + c * (w.l + 1);
  const uint8_t* blob = w.blob.data();
  float av[16];
  int64_t rr[16];
  for (int64_t i = 0; i < count; ++i) {
    const int64_t j = neurons[i];
    if (i + 1 < count) {
      const uint8_t* nx = blob + off[neurons[i + 1]];
      const int64_t len = off[neurons[i + 1] + 1] - off[neurons[i + 1]];
      for (int64_t o = 0; o < len; o += 64) _mm_prefetch(reinterpret_cast<const char*>(nx + o), _MM_HINT_T0);
    }
    int nr = 0;
    for (int64_t r = 0; r < nrows; ++r) {
      const float v = a[r * lda + j];
      if (SKIP && v == 0.0f) continue;
      av[nr] = v;
      rr[nr] = r;
      ++nr;
    }
    if (!nr) continue;
    const uint8_t* seg = blob + off[j];
    const int8_t* v = reinterpret_cast<const int8_t*>(seg + cw * 8);
    for (int64_t wi = 0; wi < cw; ++wi) {
      uint64_t bits;
      std::memcpy(&bits, seg + wi * 8, 8);
      if (!bits) continue;
      for (int b = 0; b < 8; ++b, bits >>= 8) {
        const unsigned byte = bits & 0xFF;
        if (!byte) continue;
        const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(v));  // 64 bytes of padding
        const __m128i e = _mm_shuffle_epi8(raw, _mm_load_si128(reinterpret_cast<const __m128i*>(t.t[byte])));
        const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e));
        v += __builtin_popcount(byte);
        for (int q = 0; q < nr; ++q) {
          float* dst = acc + rr[q] * ldacc + wi * 64 + b * 8;
          _mm256_storeu_ps(dst, _mm256_fmadd_ps(_mm256_set1_ps(av[q]), wv, _mm256_loadu_ps(dst)));
        }
      }
    }
  }
}

void Scatter(const InputMajor& w, int64_t c, const float* a, int64_t lda, int64_t nrows, const int32_t* neurons,
             int64_t count, bool skip, float* acc, int64_t ldacc) {
  if (skip)
    ScatterT<true>(w, c, a, lda, nrows, neurons, count, acc, ldacc);
  else
    ScatterT<false>(w, c, a, lda, nrows, neurons, count, acc, ldacc);
}

}  // namespace

const FfnKernels& FfnKernelsAvx2() {
  static const FfnKernels k{Dense, Scatter};
  return k;
}

}  // namespace ffsplit
