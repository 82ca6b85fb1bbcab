// AVX-512 VNNI dot_q of FusedFFNNBits (accuracy_level 4): the int8-activation products of the tiled
// parts (every part read whole) and of row-major parts for listed neurons (the gated light up rows
// of live neurons with skipping). The AVX2 kernel (ffn_nbits_avx2.cc) multiplies 32 bytes per instruction pair
// (maddubs + madd); here vpdpbusd multiplies and accumulates 64 bytes per instruction into int32.
// The integer block sums are exact in both, and the float steps after them (zero point, scale,
// accumulation) are the AVX2 kernel's, so the outputs are bit-identical to it.
//
// A tiled part stores per block the 8 neurons' codes one after another (NbPart), blob bytes each.
// Two shapes of that block are read 64 bytes at a time:
//  * blob == 32 (4 bits at block 64, the presets' light part; 8 bits at block 32): one 64-byte load
//    holds two neurons' codes, multiplied by the block's 32 activation bytes broadcast to both halves;
//  * blob a multiple of 64 (4 bits at block 128, 256, ...; 8 bits at block 64, 128, ... and per
//    channel): one load holds 64 bytes of one neuron, multiplied by the matching activations.
// Row-major parts: the same with 8 row pointers (two 32-byte loads per 64 bytes when blob == 32).
// Other block shapes (4 bits at block 16 / 32, 8 bits at block 16) go to the AVX2 kernel.
// 4 bits: codes are unsigned nibbles; against X in the even / odd order (NbQ::eo), low nibbles
// times the 32 even values, high nibbles times the 32 odd ones. For blob >= 64 two such 32-byte
// halves come from two 64-value steps, so the activations are first rearranged per 128 values as
// (even 0, even 1, odd 0, odd 1). 8 bits: codes are signed (c = u - 128); vpdpbusd takes unsigned
// bytes, so it multiplies c + 128 (c xor 0x80) and the block's 128 * sum(q) is subtracted with the
// zero point term.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "ffn_nbits.h"

namespace ffsplit {
namespace {

constexpr int64_t kPrefetch = 1024;  // bytes ahead of the tile being read (as the AVX2 kernel)

// out lane u = the sum of the 8 int32 lanes of v[u]
inline __m256i LaneSums(const __m256i* v) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  // a = (u0..3 low halves, u0..3 high halves), b likewise for u4..7
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

inline __m256i Lo(__m512i v) { return _mm512_castsi512_si256(v); }
inline __m256i Hi(__m512i v) { return _mm512_extracti64x4_epi64(v, 1); }

// Where the 8 neurons' codes of one block are: a tile block (contiguous, blob bytes each) or 8
// rows of a row-major part (one pointer each, already at the block)
struct TileBlock {
  const uint8_t* c;
  int64_t blob;
  const uint8_t* At(int u, int64_t o) const { return c + u * blob + o; }
  __m512i Pair(int j) const { return _mm512_loadu_si512(c + 64 * j); }  // neurons 2j, 2j + 1 (blob 32)
};
struct RowBlocks {
  const uint8_t* const* c;
  const uint8_t* At(int u, int64_t o) const { return c[u] + o; }
  __m512i Pair(int j) const {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c[2 * j]))),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c[2 * j + 1])), 1);
  }
};

// the int32 block sums (before zero points) of one block of 8 neurons: y[u] for neuron u, 8 lanes each
template <int BITS, bool PAIRS, class C>
inline void BlockSums(const C& c, const int8_t* a, int64_t blob, __m256i* y) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  if (PAIRS) {  // load j: neurons 2j and 2j + 1, one 32-byte cell each
    const __m512i ve = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
    const __m512i vo = BITS == 4 ? _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32)))
                                 : ve;
    for (int j = 0; j < 4; ++j) {
      const __m512i w = c.Pair(j);
      __m512i s;
      if (BITS == 4) {
        s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w, m4), ve);
        s = _mm512_dpbusd_epi32(s, _mm512_and_si512(_mm512_srli_epi16(w, 4), m4), vo);
      } else {
        s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(w, flip), ve);
      }
      y[2 * j] = Lo(s);
      y[2 * j + 1] = Hi(s);
    }
    return;
  }
  __m512i s[8];
  for (int u = 0; u < 8; ++u) s[u] = _mm512_setzero_si512();
  for (int64_t o = 0; o < blob; o += 64) {  // 64 code bytes of each neuron: 128 (4 bits) / 64 values
    if (BITS == 4) {
      const __m512i ve = _mm512_loadu_si512(a + 2 * o), vo = _mm512_loadu_si512(a + 2 * o + 64);
      for (int u = 0; u < 8; ++u) {
        const __m512i w = _mm512_loadu_si512(c.At(u, o));
        s[u] = _mm512_dpbusd_epi32(s[u], _mm512_and_si512(w, m4), ve);
        s[u] = _mm512_dpbusd_epi32(s[u], _mm512_and_si512(_mm512_srli_epi16(w, 4), m4), vo);
      }
    } else {
      const __m512i v = _mm512_loadu_si512(a + o);
      for (int u = 0; u < 8; ++u)
        s[u] = _mm512_dpbusd_epi32(s[u], _mm512_xor_si512(_mm512_loadu_si512(c.At(u, o)), flip), v);
    }
  }
  for (int u = 0; u < 8; ++u) y[u] = _mm256_add_epi32(Lo(s[u]), Hi(s[u]));
}

// one block's 8 sums, zero points (zv) and scales (scv) applied, added to acc
template <int BITS>
inline __m256 Accumulate(const __m256i* y, __m256i zv, __m256 scv, float xs, int32_t xsum, __m256 acc) {
  const __m256i z = _mm256_add_epi32(zv, _mm256_set1_epi32(BITS == 8 ? 128 : 0));
  const __m256i s = _mm256_sub_epi32(LaneSums(y), _mm256_mullo_epi32(z, _mm256_set1_epi32(xsum)));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(scv, _mm256_set1_ps(xs)), acc);
}

// 8 neurons of tile t for one activation row (a: q for 8 bits; for 4 bits eo, or its 128-value
// rearrangement when blob >= 64): out[0..8)
template <int BITS, bool PAIRS>
void Tile8(const NbPart& p, const int8_t* a, const float* xs, const int32_t* xsum, int64_t t, float* out) {
  const int64_t tb = 8 * p.blob;
  const uint8_t* base = p.codes.data() + t * p.nb * tb;
  const float* sc = p.sc.data() + t * p.nb * 8;
  const int8_t* zt = p.z.data() + t * p.nb * 8;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < p.nb; ++b, base += tb) {
    for (int64_t o = 0; o < tb; o += 64) _mm_prefetch(reinterpret_cast<const char*>(base + kPrefetch + o), _MM_HINT_T0);
    __m256i y[8];
    BlockSums<BITS, PAIRS>(TileBlock{base, p.blob}, a + b * p.bs, p.blob, y);
    const __m256i z = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zt + b * 8)));
    acc = Accumulate<BITS>(y, z, _mm256_loadu_ps(sc + b * 8), xs[b], xsum[b], acc);
  }
  _mm256_storeu_ps(out, acc);
}

// 8 listed neurons ns[0..8) of a row-major part for one activation row; next: the group after (its
// rows prefetched block by block, as the AVX2 kernel; null: none)
template <int BITS, bool PAIRS>
void Rows8(const NbPart& p, const int8_t* a, const float* xs, const int32_t* xsum, const int64_t* ns,
           const int64_t* next, float* out) {
  const uint8_t* cur[8];
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < p.nb; ++b) {
    for (int u = 0; u < 8; ++u) cur[u] = p.Blk(ns[u], b);
    if (next && (b * p.blob) % 64 == 0)  // once per cache line of the next group's rows
      for (int u = 0; u < 8; ++u)
        for (int64_t o = 0; o < std::max<int64_t>(p.blob, 64); o += 64)
          _mm_prefetch(reinterpret_cast<const char*>(p.Blk(next[u], b) + o), _MM_HINT_T0);
    __m256i y[8];
    BlockSums<BITS, PAIRS>(RowBlocks{cur}, a + b * p.bs, p.blob, y);
    alignas(32) float scv[8];
    alignas(32) int32_t zv[8];
    for (int u = 0; u < 8; ++u) {
      scv[u] = p.sc[static_cast<size_t>(p.Index(ns[u], b))];
      zv[u] = p.z[static_cast<size_t>(p.Index(ns[u], b))];
    }
    acc = Accumulate<BITS>(y, _mm256_load_si256(reinterpret_cast<const __m256i*>(zv)), _mm256_load_ps(scv), xs[b],
                           xsum[b], acc);
  }
  _mm256_storeu_ps(out, acc);
}

// the neurons list[i] (list null: i) for i in [i0, i1), 8 at a time (the last group's last repeated)
template <int BITS, bool PAIRS>
void Listed(const NbPart& p, const int8_t* a, const NbQ& qx, int64_t m, float* y, int64_t ldy, const int32_t* list,
            int64_t i0, int64_t i1) {
  const int64_t kpad = p.nb * p.bs;
  alignas(32) float out[8];
  int64_t group[2][8];
  auto fill = [&](int64_t g, int64_t* dst) {
    for (int u = 0; u < 8; ++u) {
      const int64_t i = std::min(g + u, std::min(i1, g + 8) - 1);
      dst[u] = list ? list[i] : i;
    }
  };
  fill(i0, group[0]);
  for (int64_t g = i0, k = 0; g < i1; g += 8, k ^= 1) {
    const bool more = g + 8 < i1;
    if (more) fill(g + 8, group[k ^ 1]);
    for (int64_t r = 0; r < m; ++r) {
      Rows8<BITS, PAIRS>(p, a + r * kpad, qx.s + r * p.nb, qx.sum + r * p.nb, group[k],
                         more && r == 0 ? group[k ^ 1] : nullptr, out);
      for (int64_t u = 0; u < std::min<int64_t>(8, i1 - g); ++u) y[r * ldy + group[k][u]] = out[u];
    }
  }
}

template <int BITS, bool PAIRS>
void Tiles(const NbPart& p, const int8_t* a, const NbQ& qx, int64_t m, float* y, int64_t ldy, int64_t i0,
           int64_t i1) {
  const int64_t kpad = p.nb * p.bs;
  alignas(32) float out[8];
  for (int64_t t = i0 / 8; t * 8 < i1; ++t) {
    const int64_t lo = std::max(i0, t * 8), hi = std::min(i1, t * 8 + 8);
    for (int64_t r = 0; r < m; ++r) {
      Tile8<BITS, PAIRS>(p, a + r * kpad, qx.s + r * p.nb, qx.sum + r * p.nb, t, out);
      for (int64_t n = lo; n < hi; ++n) y[r * ldy + n] = out[n - t * 8];
    }
  }
}

template <int BITS, bool PAIRS>
void Run(const NbPart& p, const int8_t* a, const NbQ& qx, int64_t m, float* y, int64_t ldy, const int32_t* list,
         int64_t i0, int64_t i1) {
  if (p.tiled)  // no list: neurons [i0, i1)
    Tiles<BITS, PAIRS>(p, a, qx, m, y, ldy, i0, i1);
  else
    Listed<BITS, PAIRS>(p, a, qx, m, y, ldy, list, i0, i1);
}

void DotQ(const NbPart& p, const NbQ& qx, int64_t m, float* y, int64_t ldy, const int32_t* list, int64_t i0,
          int64_t i1) {
  const bool pairs = p.blob == 32, whole = p.blob % 64 == 0;
  if (p.bits == 32 || (p.bits == 4 && !qx.eo) || !(pairs || whole)) {
    NbKernelsAvx2().dot_q(p, qx, m, y, ldy, list, i0, i1);
    return;
  }
  if (p.bits == 8) {
    if (pairs)
      Run<8, true>(p, qx.q, qx, m, y, ldy, list, i0, i1);
    else
      Run<8, false>(p, qx.q, qx, m, y, ldy, list, i0, i1);
    return;
  }
  if (pairs) {
    Run<4, true>(p, qx.eo, qx, m, y, ldy, list, i0, i1);
    return;
  }
  // blob >= 64: per 128 values (e0, o0, e1, o1) -> (e0, e1, o0, o1), 32 bytes each
  const int64_t n = m * p.nb * p.bs;
  thread_local std::vector<int8_t> re;
  if (static_cast<int64_t>(re.size()) < n) re.resize(static_cast<size_t>(n));
  for (int64_t o = 0; o < n; o += 128) {
    const __m256i e0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.eo + o));
    const __m256i o0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.eo + o + 32));
    const __m256i e1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.eo + o + 64));
    const __m256i o1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.eo + o + 96));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(re.data() + o), e0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(re.data() + o + 32), e1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(re.data() + o + 64), o0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(re.data() + o + 96), o1);
  }
  Run<4, false>(p, re.data(), qx, m, y, ldy, list, i0, i1);
}

}  // namespace

const NbKernels& NbKernelsAvx512Vnni() {
  static const NbKernels k = [] {
    NbKernels v = NbKernelsAvx2();
    v.dot_q = DotQ;
    return v;
  }();
  return k;
}

}  // namespace ffsplit
