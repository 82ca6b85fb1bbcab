// AVX-512 VNNI kernels (int8 weights, accuracy_level 4 or FFSPLIT_ISA=avx512vnni): activations are
// quantized per row to uint8 with zero point 128 and multiplied with vpdpbusd (64 multiply-adds per
// instruction). Not exact: see the tolerance in the tests (relative error ~1e-3 .. 1e-2).
//   RowDot (small M): weights expanded 64 columns at a time with vpexpandb, dotted with X rows.
//   Gemm (larger M): a group of weight rows is decoded to dense int8 in a small buffer (L1/L2), then
//   a register-blocked micro-kernel broadcasts 4 weights of a row (one dword) against 16 rows of X
//   stored as [k/4][m][4] bytes: NR rows of W x MV*16 rows of X in 24 zmm accumulators.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "packed.h"

namespace ffsplit {
namespace avx512vnni {
namespace {

constexpr int kPrefetch = 2048;  // bytes (3 KiB, 4 KiB: same within noise after the unrolling)

template <int MR>
void Rows(const Packed& p, const uint8_t* xq, const float* xs, int64_t kpad, float* y, int64_t mg, int64_t n0,
          int64_t n1) {
  const int8_t* vals = p.values_i8.data();
  constexpr int A = MR == 1 ? 4 : (MR == 2 ? 2 : 1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint64_t* mrow = p.mask.data() + n * p.words;
    const int8_t* v = vals + p.row_ptr[n];
    __m512i acc[MR][A];
    for (int r = 0; r < MR; ++r)
      for (int a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_si512();
    // one 64-column word: prefetch, expand, multiply into accumulator set a
    auto word = [&](int64_t wi, int a) {
      const uint64_t bits = mrow[wi];
      // software prefetch 2 KiB ahead of both streams: one core alone does not keep enough
      // misses in flight (measured 1 thread from DRAM, 16384 x 4096, s=0.75: 3.17 -> 2.08 ms;
      // 512 B: 2.6, 1 KiB: 2.27, 4 KiB: 2.15, 8 KiB: 2.27)
      _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetch, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(mrow + wi) + kPrefetch, _MM_HINT_T0);
      const __m512i e = _mm512_maskz_expand_epi8(bits, _mm512_loadu_si512(v));  // 64 bytes of padding
      v += __builtin_popcountll(bits);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const __m512i xv = _mm512_loadu_si512(xq + (mg + r) * kpad + wi * 64);
        acc[r][a] = _mm512_dpbusd_epi32(acc[r][a], xv, e);
      }
    };
    // unrolled by A so that every accumulator index is a constant: with acc[r][wi % A] GCC kept
    // the accumulators on the stack (a store-forwarding round trip per vpdpbusd)
    int64_t wi = 0;
    for (; wi + A <= p.words; wi += A) {
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) word(wi + a, a);
    }
    for (; wi < p.words; ++wi) word(wi, 0);
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

template <int NR, int MV>
void Micro(const int8_t* w, int64_t kpad, const uint8_t* xb, int64_t mbp, int64_t kq0, int64_t kq1,
           int32_t* out /* [NR][MV*16] */, bool first) {
  __m512i acc[NR][MV];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < MV; ++j) acc[r][j] = _mm512_setzero_si512();
  const int8_t* wk = w + kq0 * 4;
  const uint8_t* xk = xb + kq0 * mbp * 4;
  for (int64_t kq = kq0; kq < kq1; ++kq, wk += 4, xk += mbp * 4) {
    __m512i xv[MV];
#pragma GCC unroll 4
    for (int j = 0; j < MV; ++j) xv[j] = _mm512_loadu_si512(xk + 64 * j);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      int32_t wd;
      std::memcpy(&wd, wk + r * kpad, 4);
      const __m512i wb = _mm512_set1_epi32(wd);
#pragma GCC unroll 4
      for (int j = 0; j < MV; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], xv[j], wb);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < MV; ++j) {
      int32_t* o = out + (r * MV + j) * 16;
      _mm512_storeu_si512(o, first ? acc[r][j] : _mm512_add_epi32(acc[r][j], _mm512_loadu_si512(o)));
    }
}

template <int NR>
void MicroM(int mv, const int8_t* w, int64_t kpad, const uint8_t* xb, int64_t mbp, int64_t kq0, int64_t kq1,
            int32_t* out, bool first) {
  switch (mv) {
    case 1: return Micro<NR, 1>(w, kpad, xb, mbp, kq0, kq1, out, first);
    case 2: return Micro<NR, 2>(w, kpad, xb, mbp, kq0, kq1, out, first);
    case 3: return Micro<NR, 3>(w, kpad, xb, mbp, kq0, kq1, out, first);
    default: return Micro<NR, 4>(w, kpad, xb, mbp, kq0, kq1, out, first);
  }
}

void MicroNM(int nr, int mv, const int8_t* w, int64_t kpad, const uint8_t* xb, int64_t mbp, int64_t kq0,
             int64_t kq1, int32_t* out, bool first) {
  switch (nr) {
    case 1: return MicroM<1>(mv, w, kpad, xb, mbp, kq0, kq1, out, first);
    case 2: return MicroM<2>(mv, w, kpad, xb, mbp, kq0, kq1, out, first);
    case 3: return MicroM<3>(mv, w, kpad, xb, mbp, kq0, kq1, out, first);
    case 4: return MicroM<4>(mv, w, kpad, xb, mbp, kq0, kq1, out, first);
    case 5: return MicroM<5>(mv, w, kpad, xb, mbp, kq0, kq1, out, first);
    default: return MicroM<6>(mv, w, kpad, xb, mbp, kq0, kq1, out, first);
  }
}

}  // namespace

void Quantize(const float* x, int64_t m, int64_t k, int64_t kpad, uint8_t* xq, float* xs) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    __m512 mx = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) mx = _mm512_max_ps(mx, _mm512_andnot_ps(sign, _mm512_loadu_ps(xr + i)));
    if (i < k) {
      const __mmask16 t = static_cast<__mmask16>((1u << (k - i)) - 1);
      mx = _mm512_max_ps(mx, _mm512_andnot_ps(sign, _mm512_maskz_loadu_ps(t, xr + i)));
    }
    const float amax = _mm512_reduce_max_ps(mx);
    const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
    const __m512 inv = _mm512_set1_ps(1.0f / s);
    const __m512i zp = _mm512_set1_epi32(128);
    uint8_t* q = xq + r * kpad;
    // same rounding as lrintf (round to nearest even, the default MXCSR mode)
    for (i = 0; i + 16 <= k; i += 16) {
      const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + i), inv)), zp);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(v));
    }
    if (i < k) {
      const __mmask16 t = static_cast<__mmask16>((1u << (k - i)) - 1);
      const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(t, xr + i), inv)), zp);
      _mm512_mask_cvtepi32_storeu_epi8(q + i, t, v);
    }
    std::memset(q + k, 128, static_cast<size_t>(kpad - k));
    xs[r] = s;
  }
}

// xt: uint8 [kpad/4][mbp][4], rows m0 .. m0+mb of the quantized X (rows past mb hold anything).
void Gemm(const Packed& p, const uint8_t* xt, const float* xs, int64_t kpad, float* y, int64_t m0, int64_t mb,
          int64_t mbp, int64_t n0, int64_t n1) {
  constexpr int kNR = 6;
  // K chunk: the X slice of a chunk (mbp * kc bytes) stays in L2 while the rows of the task walk it
  // (M=256, K=7373, 1 thread: 128 KiB 17.0, 256 KiB 17.0, 512 KiB 17.9, 1 MiB 18.6 ms)
  const int64_t kq_total = kpad / 4;
  const int64_t kq_chunk = std::max<int64_t>(16, std::min<int64_t>(kq_total, (256 * 1024) / (mbp * 4)));
  thread_local std::vector<int8_t> wbuf;
  thread_local std::vector<int32_t> accbuf;
  const int64_t rows = n1 - n0;
  wbuf.resize(static_cast<size_t>(rows * kpad));
  accbuf.resize(static_cast<size_t>(rows * mbp));
  // decode the task's rows to dense int8 once
  const int8_t* vals = p.values_i8.data();
  for (int64_t n = n0; n < n1; ++n) {
    const uint64_t* mrow = p.mask.data() + n * p.words;
    const int8_t* v = vals + p.row_ptr[n];
    int8_t* dst = wbuf.data() + (n - n0) * kpad;
    for (int64_t wi = 0; wi < p.words; ++wi) {
      const uint64_t bits = mrow[wi];
      _mm512_storeu_si512(dst + wi * 64, _mm512_maskz_expand_epi8(bits, _mm512_loadu_si512(v)));
      v += __builtin_popcountll(bits);
    }
  }
  const int mv_all = static_cast<int>(mbp / 16);
  for (int64_t kq0 = 0; kq0 < kq_total; kq0 += kq_chunk) {
    const int64_t kq1 = std::min(kq_total, kq0 + kq_chunk);
    for (int64_t r0 = 0; r0 < rows; r0 += kNR) {
      const int nr = static_cast<int>(std::min<int64_t>(kNR, rows - r0));
      for (int mv0 = 0; mv0 < mv_all; mv0 += 4) {
        const int mv = std::min(4, mv_all - mv0);
        // out: [nr][mv*16] at accbuf[r0 * mbp + mv0 * 16 * nr]: a private slice per (r0, mv0)
        int32_t* out = accbuf.data() + r0 * mbp + static_cast<int64_t>(mv0) * 16 * nr;
        MicroNM(nr, mv, wbuf.data() + r0 * kpad, kpad, xt + mv0 * 64, mbp, kq0, kq1, out, kq0 == 0);
      }
    }
  }
  for (int64_t r0 = 0; r0 < rows; r0 += kNR) {
    const int nr = static_cast<int>(std::min<int64_t>(kNR, rows - r0));
    for (int mv0 = 0; mv0 < mv_all; mv0 += 4) {
      const int mv = std::min(4, mv_all - mv0);
      const int32_t* out = accbuf.data() + r0 * mbp + static_cast<int64_t>(mv0) * 16 * nr;
      for (int r = 0; r < nr; ++r) {
        const int64_t n = n0 + r0 + r;
        const float s = p.scales[n];
        const int32_t corr = 128 * p.rowsum[n];
        for (int i = 0; i < mv * 16; ++i) {
          const int64_t mi = mv0 * 16 + i;
          if (mi >= mb) break;
          y[(m0 + mi) * p.n + n] = static_cast<float>(out[r * mv * 16 + i] - corr) * xs[m0 + mi] * s;
        }
      }
    }
  }
}

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
