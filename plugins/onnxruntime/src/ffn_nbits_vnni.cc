// AVX-512 kernels of FusedFFNNBits at accuracy_level 4 (the rest is ffn_nbits_avx2.cc's):
//  * dot_q with VNNI: the int8-activation products of the tiled parts (every part read whole; with
//    M > 1, 4 rows (2 for blocks wider than 64 bytes) per read of a tile's codes) and of row-major
//    parts for listed neurons (the gated light up rows of live neurons with skipping);
//  * down_q, 4 bits (the neuron-major light down of kept neurons): 4 neurons' codes per int32 lane
//    multiplied with vpdpbusd, the sums of up to 256 output rows held in registers, the next block's
//    segments prefetched while one block is computed (DownQ below);
//  * im_q, 4 bits (the input-major light up of kept channels): the AVX2 pair kernel widened to
//    64-byte vectors (maddubs), 128 neurons per step, the AVX2 driver around it.
// All integer sums are exact and the float steps after them (zero point, scale, accumulation) are
// the AVX2 kernels', so the outputs are bit-identical to theirs.
//
// dot_q: the AVX2 kernel multiplies 32 bytes per instruction pair (maddubs + madd); vpdpbusd
// multiplies and accumulates 64 bytes per instruction into int32.
//
// A tiled part stores per block the 8 neurons' codes one after another (NbPart), blob bytes each.
// Two shapes of that block are read 64 bytes at a time:
//  * blob == 32 (4 bits at block 64, the presets' light part; 8 bits at block 32): one 64-byte load
//    holds two neurons' codes, multiplied by the block's 32 activation bytes broadcast to both halves;
//  * blob a multiple of 64 (4 bits at block 128, 256, ...; 8 bits at block 64, 128, ... and per
//    channel): one load holds 64 bytes of one neuron, multiplied by the matching activations.
// Row-major parts: the same with 8 row pointers (two 32-byte loads per 64 bytes when blob == 32).
// Tiled 4 bits at block 32 (blob 16: the fast preset's light part): four neurons per load (TilesB16).
// Other block shapes (4 bits at block 16, row-major 4 bits at block 32, 8 bits at block 16) go to
// the AVX2 kernel.
// 4 bits: codes are unsigned nibbles; against X in the even / odd order (NbQ::eo), low nibbles
// times the 32 even values, high nibbles times the 32 odd ones. For blob >= 64 two such 32-byte
// halves come from two 64-value steps, so the activations are first rearranged per 128 values as
// (even 0, even 1, odd 0, odd 1). 8 bits: codes are signed (c = u - 128); vpdpbusd takes unsigned
// bytes, so it multiplies c + 128 (c xor 0x80) and the block's 128 * sum(q) is subtracted with the
// zero point term.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
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

// lane u = the total of neuron u, from s[j] holding neuron 2j's 8 partial sums in its low 256 bits
// and neuron 2j + 1's in its high ones (12 instructions; LaneSums over the 8 halves takes about 25)
inline __m256i PairSums(const __m512i* s) {
  const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(s[0], s[1]), _mm512_unpackhi_epi32(s[0], s[1]));
  const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi32(s[2], s[3]), _mm512_unpackhi_epi32(s[2], s[3]));
  // per 128-bit lane: the lane's sums of s[0..3]; lanes 0, 1: neurons 0, 2, 4, 6; lanes 2, 3: 1, 3, 5, 7
  const __m512i c = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
  const __m512i d = _mm512_add_epi32(c, _mm512_shuffle_i32x4(c, c, _MM_SHUFFLE(2, 3, 0, 1)));
  const __m512i order = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 0, 8, 1, 9, 2, 10, 3, 11);
  return _mm512_castsi512_si256(_mm512_permutexvar_epi32(order, d));
}

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

// the int32 block sums (before zero points) of one block of 8 neurons, blob a multiple of 64 (blob
// 32: BlockPairs): y[u] for neuron u, 8 lanes each
template <int BITS, class C>
inline void BlockSums(const C& c, const int8_t* a, int64_t blob, __m256i* y) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
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

// A tile block with blob 32 (4 loads of 2 neurons) times R activation rows (row r at a + r * lda):
// s[r][j] = the partial sums of neurons 2j (low half) and 2j + 1 (high half)
template <int BITS, int R, class C>
inline void BlockPairs(const C& c, const int8_t* a, int64_t lda, __m512i (*s)[4]) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i ve[R], vo[R];
  for (int r = 0; r < R; ++r) {
    ve[r] = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + r * lda)));
    vo[r] = BITS == 4 ? _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + r * lda + 32)))
                      : ve[r];
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i w = c.Pair(j);
    const __m512i lo = BITS == 4 ? _mm512_and_si512(w, m4) : _mm512_xor_si512(w, flip);
    const __m512i hi = BITS == 4 ? _mm512_and_si512(_mm512_srli_epi16(w, 4), m4) : lo;
    for (int r = 0; r < R; ++r) {
      s[r][j] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, ve[r]);
      if (BITS == 4) s[r][j] = _mm512_dpbusd_epi32(s[r][j], hi, vo[r]);
    }
  }
}

// one block's 8 neuron sums (lane u: neuron u), zero points (zv) and scales (scv) applied, added to acc
template <int BITS>
inline __m256 AccumulateSums(__m256i sums, __m256i zv, __m256 scv, float xs, int32_t xsum, __m256 acc) {
  const __m256i z = _mm256_add_epi32(zv, _mm256_set1_epi32(BITS == 8 ? 128 : 0));
  const __m256i s = _mm256_sub_epi32(sums, _mm256_mullo_epi32(z, _mm256_set1_epi32(xsum)));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(scv, _mm256_set1_ps(xs)), acc);
}

// the same from the 8 neurons' partial sums (y[u]: 8 lanes of neuron u)
template <int BITS>
inline __m256 Accumulate(const __m256i* y, __m256i zv, __m256 scv, float xs, int32_t xsum, __m256 acc) {
  return AccumulateSums<BITS>(LaneSums(y), zv, scv, xs, xsum, acc);
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
    const __m256i z = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zt + b * 8)));
    if (PAIRS) {
      __m512i s[4];
      BlockPairs<BITS, 1>(TileBlock{base, p.blob}, a + b * p.bs, 0, &s);
      acc = AccumulateSums<BITS>(PairSums(s), z, _mm256_loadu_ps(sc + b * 8), xs[b], xsum[b], acc);
      continue;
    }
    __m256i y[8];
    BlockSums<BITS>(TileBlock{base, p.blob}, a + b * p.bs, p.blob, y);
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
    __m256i sums;
    if (PAIRS) {
      __m512i ps[4];
      BlockPairs<BITS, 1>(RowBlocks{cur}, a + b * p.bs, 0, &ps);
      sums = PairSums(ps);
    } else {
      __m256i y[8];
      BlockSums<BITS>(RowBlocks{cur}, a + b * p.bs, p.blob, y);
      sums = LaneSums(y);
    }
    alignas(32) float scv[8];
    alignas(32) int32_t zv[8];
    for (int u = 0; u < 8; ++u) {
      scv[u] = p.sc[static_cast<size_t>(p.Index(ns[u], b))];
      zv[u] = p.z[static_cast<size_t>(p.Index(ns[u], b))];
    }
    acc = AccumulateSums<BITS>(sums, _mm256_load_si256(reinterpret_cast<const __m256i*>(zv)), _mm256_load_ps(scv), xs[b],
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

// BlockSums for R activation rows (row r at a + r * lda) from one read of the codes, blob a multiple
// of 64 (blob 32 is BlockPairs): each 64-byte load is unpacked once and multiplied by every row's
// activations (prefill: M > 1). y[r][u] as BlockSums' y[u] for row r.
template <int BITS, int R>
inline void BlockSumsRows(const uint8_t* c, const int8_t* a, int64_t lda, int64_t blob, __m256i (*y)[8]) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i s[R][8];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < 8; ++u) s[r][u] = _mm512_setzero_si512();
  for (int64_t o = 0; o < blob; o += 64) {
    for (int u = 0; u < 8; ++u) {
      const __m512i w = _mm512_loadu_si512(c + u * blob + o);
      if (BITS == 4) {
        const __m512i lo = _mm512_and_si512(w, m4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
        for (int r = 0; r < R; ++r) {
          s[r][u] = _mm512_dpbusd_epi32(s[r][u], lo, _mm512_loadu_si512(a + r * lda + 2 * o));
          s[r][u] = _mm512_dpbusd_epi32(s[r][u], hi, _mm512_loadu_si512(a + r * lda + 2 * o + 64));
        }
      } else {
        const __m512i wf = _mm512_xor_si512(w, flip);
        for (int r = 0; r < R; ++r) s[r][u] = _mm512_dpbusd_epi32(s[r][u], wf, _mm512_loadu_si512(a + r * lda + o));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < 8; ++u) y[r][u] = _mm256_add_epi32(Lo(s[r][u]), Hi(s[r][u]));
}

// Tile8 for R activation rows at once (row r: a + r * kpad, xs / xsum + r * nb): out[r][0..8)
template <int BITS, bool PAIRS, int R>
void Tile8Rows(const NbPart& p, const int8_t* a, const float* xs, const int32_t* xsum, int64_t t, float (*out)[8]) {
  const int64_t tb = 8 * p.blob, kpad = p.nb * p.bs;
  const uint8_t* base = p.codes.data() + t * p.nb * tb;
  const float* sc = p.sc.data() + t * p.nb * 8;
  const int8_t* zt = p.z.data() + t * p.nb * 8;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < p.nb; ++b, base += tb) {
    for (int64_t o = 0; o < tb; o += 64) _mm_prefetch(reinterpret_cast<const char*>(base + kPrefetch + o), _MM_HINT_T0);
    const __m256i z = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zt + b * 8)));
    const __m256 scv = _mm256_loadu_ps(sc + b * 8);
    if (PAIRS) {
      __m512i ps[R][4];
      BlockPairs<BITS, R>(TileBlock{base, p.blob}, a + b * p.bs, kpad, ps);
      for (int r = 0; r < R; ++r)
        acc[r] = AccumulateSums<BITS>(PairSums(ps[r]), z, scv, xs[r * p.nb + b], xsum[r * p.nb + b], acc[r]);
      continue;
    }
    __m256i y[R][8];
    BlockSumsRows<BITS, R>(base, a + b * p.bs, kpad, p.blob, y);
    for (int r = 0; r < R; ++r)
      acc[r] = Accumulate<BITS>(y[r], z, scv, xs[r * p.nb + b], xsum[r * p.nb + b], acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out[r], acc[r]);
}

// the rows of a tiled part, R at a time where M allows (each tile's codes read once per R rows;
// the same sums and float steps per row as one at a time)
template <int BITS, bool PAIRS>
void Tiles(const NbPart& p, const int8_t* a, const NbQ& qx, int64_t m, float* y, int64_t ldy, int64_t i0,
           int64_t i1) {
  constexpr int R = PAIRS ? 4 : 2;  // PAIRS: 4 rows' activations in registers; else 8 R accumulators
  const int64_t kpad = p.nb * p.bs;
  alignas(32) float out[R][8];
  for (int64_t t = i0 / 8; t * 8 < i1; ++t) {
    const int64_t lo = std::max(i0, t * 8), hi = std::min(i1, t * 8 + 8);
    int64_t r = 0;
    for (; r + R <= m; r += R) {
      Tile8Rows<BITS, PAIRS, R>(p, a + r * kpad, qx.s + r * p.nb, qx.sum + r * p.nb, t, out);
      for (int q = 0; q < R; ++q)
        for (int64_t n = lo; n < hi; ++n) y[(r + q) * ldy + n] = out[q][n - t * 8];
    }
    for (; r < m; ++r) {
      Tile8<BITS, PAIRS>(p, a + r * kpad, qx.s + r * p.nb, qx.sum + r * p.nb, t, out[0]);
      for (int64_t n = lo; n < hi; ++n) y[r * ldy + n] = out[0][n - t * 8];
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

// 4 bits at block 32 (blob 16: the fast preset's light part), tiled: one 64-byte load holds 4
// neurons' codes of a block (one per 128-bit lane), multiplied by the block's 16 even and 16 odd
// activations (a: per 32 values the 16 even then the 16 odd ones) broadcast to the 4 lanes; each
// lane's 4 sums are added within the lane and the 8 neurons' totals gathered into one vector. R
// activation rows per read of the codes (row r at a + r * kpad). out[r][0..8).
template <int R>
void Tile8B16(const NbPart& p, const int8_t* a, const float* xs, const int32_t* xsum, int64_t t, float (*out)[8]) {
  constexpr int64_t tb = 8 * 16;
  const int64_t kpad = p.nb * p.bs;
  const uint8_t* base = p.codes.data() + t * p.nb * tb;
  const float* sc = p.sc.data() + t * p.nb * 8;
  const int8_t* zt = p.z.data() + t * p.nb * 8;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i first = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < p.nb; ++b, base += tb) {
    for (int64_t o = 0; o < tb; o += 64) _mm_prefetch(reinterpret_cast<const char*>(base + kPrefetch + o), _MM_HINT_T0);
    const __m512i w0 = _mm512_loadu_si512(base), w1 = _mm512_loadu_si512(base + 64);
    const __m512i lo0 = _mm512_and_si512(w0, m4), hi0 = _mm512_and_si512(_mm512_srli_epi16(w0, 4), m4);
    const __m512i lo1 = _mm512_and_si512(w1, m4), hi1 = _mm512_and_si512(_mm512_srli_epi16(w1, 4), m4);
    const __m256i z = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zt + b * 8)));
    const __m256 scv = _mm256_loadu_ps(sc + b * 8);
    for (int r = 0; r < R; ++r) {
      const int8_t* ar = a + r * kpad + b * 32;
      const __m512i ve = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ar)));
      const __m512i vo = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ar + 16)));
      __m512i s0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo0, ve), hi0, vo);
      __m512i s1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo1, ve), hi1, vo);
      s0 = _mm512_add_epi32(s0, _mm512_shuffle_epi32(s0, _MM_PERM_BADC));  // (0+2, 1+3, ..) per lane
      s0 = _mm512_add_epi32(s0, _mm512_shuffle_epi32(s0, _MM_PERM_CDAB));  // lane total in each
      s1 = _mm512_add_epi32(s1, _mm512_shuffle_epi32(s1, _MM_PERM_BADC));
      s1 = _mm512_add_epi32(s1, _mm512_shuffle_epi32(s1, _MM_PERM_CDAB));
      const __m256i sums = _mm512_castsi512_si256(_mm512_permutex2var_epi32(s0, first, s1));
      acc[r] = AccumulateSums<4>(sums, z, scv, xs[r * p.nb + b], xsum[r * p.nb + b], acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out[r], acc[r]);
}

// a tiled 4-bit part at block 32: the activations rearranged per 32 values as 16 even, 16 odd
// (two byte shuffles), then 4 rows at a time where M allows
void TilesB16(const NbPart& p, const NbQ& qx, int64_t m, float* y, int64_t ldy, int64_t i0, int64_t i1) {
  const int64_t kpad = p.nb * p.bs, n = m * kpad;
  thread_local std::vector<int8_t> eo;
  if (static_cast<int64_t>(eo.size()) < n) eo.resize(static_cast<size_t>(n));
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12,
                                         14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t o = 0; o < n; o += 32) {  // per 16 values even / odd, then the two lanes' halves paired
    const __m256i v = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx.q + o)), split);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(eo.data() + o), _mm256_permute4x64_epi64(v, 0xD8));
  }
  alignas(32) float out[4][8];
  for (int64_t t = i0 / 8; t * 8 < i1; ++t) {
    const int64_t lo = std::max(i0, t * 8), hi = std::min(i1, t * 8 + 8);
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) {
      Tile8B16<4>(p, eo.data() + r * kpad, qx.s + r * p.nb, qx.sum + r * p.nb, t, out);
      for (int q = 0; q < 4; ++q)
        for (int64_t k = lo; k < hi; ++k) y[(r + q) * ldy + k] = out[q][k - t * 8];
    }
    for (; r < m; ++r) {
      Tile8B16<1>(p, eo.data() + r * kpad, qx.s + r * p.nb, qx.sum + r * p.nb, t, out);
      for (int64_t k = lo; k < hi; ++k) y[r * ldy + k] = out[0][k - t * 8];
    }
  }
}

// out[L] = (a.L, b.L, c.L, d.L): the 128-bit lanes of four vectors transposed
inline void Transpose4(__m512i a, __m512i b, __m512i c, __m512i d, __m512i* out) {
  const __m512i t0 = _mm512_shuffle_i32x4(a, b, 0x44), t1 = _mm512_shuffle_i32x4(a, b, 0xEE);
  const __m512i t2 = _mm512_shuffle_i32x4(c, d, 0x44), t3 = _mm512_shuffle_i32x4(c, d, 0xEE);
  out[0] = _mm512_shuffle_i32x4(t0, t2, 0x88);
  out[1] = _mm512_shuffle_i32x4(t0, t2, 0xDD);
  out[2] = _mm512_shuffle_i32x4(t1, t3, 0x88);
  out[3] = _mm512_shuffle_i32x4(t1, t3, 0xDD);
}

// out[c] lane n = r[n] lane c: a 16 x 16 transpose of 32-bit lanes (32-bit and 64-bit unpacks, then
// Transpose4 of the 128-bit lanes)
inline void Transpose16(const __m512i* r, __m512i* out) {
  __m512i t[16], s[16];
  for (int i = 0; i < 8; ++i) {  // t[2i] lane L: rows 2i, 2i + 1 of columns 4L, 4L + 1; t[2i + 1]: 4L + 2, 4L + 3
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int j = 0; j < 4; ++j) {  // s[4 c + j] lane L: rows 4j..4j+3 of column 4L + c
    s[0 + j] = _mm512_unpacklo_epi64(t[4 * j], t[4 * j + 2]);
    s[4 + j] = _mm512_unpackhi_epi64(t[4 * j], t[4 * j + 2]);
    s[8 + j] = _mm512_unpacklo_epi64(t[4 * j + 1], t[4 * j + 3]);
    s[12 + j] = _mm512_unpackhi_epi64(t[4 * j + 1], t[4 * j + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    __m512i o[4];  // o[L]: column 4L + c
    Transpose4(s[4 * c], s[4 * c + 1], s[4 * c + 2], s[4 * c + 3], o);
    for (int L = 0; L < 4; ++L) out[4 * L + c] = o[L];
  }
}

// Prefill (M >= kPanelMinRows, tiled parts): the row loops above read a tile's codes once per 2-4
// activation rows and reload the activations for every neuron, so at large M (Whisper's encoder: 1500
// frames) they lose to a GEMM. Here the part's neurons are taken 32 at a time (a panel): the panel's
// codes are unpacked once into a thread-local buffer in "4 inputs x 32 neurons" order (per 4
// consecutive inputs of a block, each neuron's 4 codes as the bytes of one int32 lane: 4 bits the
// unsigned nibbles, 8 bits c xor 0x80), then every activation row is multiplied against it, MR = 6 rows
// x 32 neurons of int32 block sums in registers, the row's 4 int8 activations broadcast (vpdpbusd).
// The integer block sums are the tile kernels' and the float steps per block the same lane-wise
// (AccumulateSums: sum - z * sum(q), times scale * xs, added in block order): bit-identical.
constexpr int64_t kPanelMinRows = 64;
constexpr int kPanelRows = 6;

struct Panel {
  int64_t nb = 0, q4 = 0;     // blocks, groups of 4 inputs per block
  std::vector<int32_t> codes; // [nb][q4][32]
  std::vector<float> sc;      // [nb][32]
  std::vector<int32_t> z;     // [nb][32] zero points (+ 128 for 8 bits), 0 past N
};

// The codes of neuron n for the panel's groups [g0, g0 + 16) (groups of 4 inputs, block after block;
// `groups` in all) as 16 int32 lanes: 4 bits the 4 nibbles as bytes (inputs in order), 8 bits c xor
// 0x80; zero past the last group.
inline __m512i GroupWords(const NbPart& p, int64_t n, int64_t g0, int64_t groups, int64_t q4) {
  const int64_t gb = p.bits == 4 ? 2 : 4;  // code bytes per group
  const int64_t cnt = std::min<int64_t>(16, groups - g0);
  const __mmask16 km = static_cast<__mmask16>((1u << cnt) - 1);
  alignas(64) uint8_t buf[64];
  const uint8_t* src;
  if (g0 % q4 + cnt <= q4) {  // within one block
    src = p.Blk(n, g0 / q4) + (g0 % q4) * gb;
  } else {  // blocks of fewer than 16 groups (block 16 / 32): gathered block by block
    for (int64_t g = g0; g < g0 + cnt;) {
      const int64_t take = std::min(q4 - g % q4, g0 + cnt - g);
      std::memcpy(buf + (g - g0) * gb, p.Blk(n, g / q4) + (g % q4) * gb, static_cast<size_t>(take * gb));
      g += take;
    }
    src = buf;
  }
  if (p.bits == 8) return _mm512_xor_si512(_mm512_maskz_loadu_epi32(km, src), _mm512_set1_epi8(static_cast<char>(0x80)));
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(km, src));
  const __m512i m4 = _mm512_set1_epi32(0xF);
  return _mm512_or_si512(
      _mm512_or_si512(_mm512_and_si512(v, m4), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(v, 4), m4), 8)),
      _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(v, 8), m4), 16),
                      _mm512_slli_epi32(_mm512_srli_epi32(v, 12), 24)));
}

// unpacks neurons [n0, n0 + 32) of the tiled part p (those past the last tile: zero codes and scales):
// per 16 neurons and 16 groups, each neuron's 16 group words in a register, then Transpose16 so that
// each group's 16 neurons are stored as one vector
void FillPanel(const NbPart& p, int64_t n0, Panel& pn) {
  pn.nb = p.nb;
  pn.q4 = p.bs / 4;
  const int64_t groups = p.nb * pn.q4;
  pn.codes.resize(static_cast<size_t>(groups * 32));
  pn.sc.assign(static_cast<size_t>(p.nb * 32), 0.0f);
  pn.z.assign(static_cast<size_t>(p.nb * 32), 0);
  const int64_t tiles = (p.n + 7) / 8;
  for (int64_t u = 0; u < 32 && (n0 + u) / 8 < tiles; ++u)
    for (int64_t b = 0; b < p.nb; ++b) {
      const int64_t i = p.Index(n0 + u, b);
      pn.sc[static_cast<size_t>(b * 32 + u)] = p.sc[static_cast<size_t>(i)];
      pn.z[static_cast<size_t>(b * 32 + u)] = p.z[static_cast<size_t>(i)] + (p.bits == 8 ? 128 : 0);
    }
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int64_t cnt = std::min<int64_t>(16, groups - g0);
    for (int h = 0; h < 2; ++h) {
      __m512i r[16];
      for (int u = 0; u < 16; ++u) {
        const int64_t n = n0 + 16 * h + u;
        r[u] = n / 8 < tiles ? GroupWords(p, n, g0, groups, pn.q4) : _mm512_setzero_si512();
      }
      __m512i out[16];  // out[c]: group g0 + c of the 16 neurons
      Transpose16(r, out);
      for (int c = 0; c < cnt; ++c) _mm512_storeu_si512(pn.codes.data() + (g0 + c) * 32 + 16 * h, out[c]);
    }
  }
}

// rows [r0, r0 + MR) times the panel: out[r * ldy + n] for the panel's neurons n in [0, cnt)
template <int MR>
void PanelRows(const Panel& pn, const int8_t* q, int64_t kpad, const float* xs, const int32_t* xsum, int64_t nb,
               float* out, int64_t ldy, int64_t cnt) {
  __m512 facc[MR][2];
  for (int r = 0; r < MR; ++r) facc[r][0] = facc[r][1] = _mm512_setzero_ps();
  const int64_t bs = pn.q4 * 4;
  for (int64_t b = 0; b < pn.nb; ++b) {
    __m512i s[MR][2];
    for (int r = 0; r < MR; ++r) s[r][0] = s[r][1] = _mm512_setzero_si512();
    const int32_t* cp = pn.codes.data() + b * pn.q4 * 32;
    const int8_t* qb = q + b * bs;
    for (int64_t j = 0; j < pn.q4; ++j, cp += 32) {
      const __m512i w0 = _mm512_loadu_si512(cp), w1 = _mm512_loadu_si512(cp + 16);
      for (int r = 0; r < MR; ++r) {
        int32_t a4;
        std::memcpy(&a4, qb + r * kpad + 4 * j, 4);
        const __m512i a = _mm512_set1_epi32(a4);
        s[r][0] = _mm512_dpbusd_epi32(s[r][0], w0, a);
        s[r][1] = _mm512_dpbusd_epi32(s[r][1], w1, a);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m512i zv = _mm512_loadu_si512(pn.z.data() + b * 32 + 16 * h);
      const __m512 scv = _mm512_loadu_ps(pn.sc.data() + b * 32 + 16 * h);
      for (int r = 0; r < MR; ++r) {
        const __m512i t = _mm512_sub_epi32(s[r][h], _mm512_mullo_epi32(zv, _mm512_set1_epi32(xsum[r * nb + b])));
        facc[r][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(scv, _mm512_set1_ps(xs[r * nb + b])), facc[r][h]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    if (cnt >= 32) {
      _mm512_storeu_ps(out + r * ldy, facc[r][0]);
      _mm512_storeu_ps(out + r * ldy + 16, facc[r][1]);
    } else {
      const __mmask16 k0 = static_cast<__mmask16>(cnt >= 16 ? 0xFFFF : (1u << cnt) - 1);
      const __mmask16 k1 = static_cast<__mmask16>(cnt <= 16 ? 0 : (1u << (cnt - 16)) - 1);
      _mm512_mask_storeu_ps(out + r * ldy, k0, facc[r][0]);
      _mm512_mask_storeu_ps(out + r * ldy + 16, k1, facc[r][1]);
    }
  }
}

// neurons [i0, i1) (i0 a multiple of 8) of a tiled part for m rows, panel by panel
void Panels(const NbPart& p, const NbQ& qx, int64_t m, float* y, int64_t ldy, int64_t i0, int64_t i1) {
  thread_local Panel pn;
  const int64_t kpad = p.nb * p.bs;
  for (int64_t n0 = i0; n0 < i1; n0 += 32) {
    FillPanel(p, n0, pn);
    const int64_t cnt = std::min<int64_t>(32, i1 - n0);
    int64_t r = 0;
    for (; r + kPanelRows <= m; r += kPanelRows)
      PanelRows<kPanelRows>(pn, qx.q + r * kpad, kpad, qx.s + r * p.nb, qx.sum + r * p.nb, p.nb, y + r * ldy + n0, ldy, cnt);
    const float* xs = qx.s + r * p.nb;
    const int32_t* xsum = qx.sum + r * p.nb;
    float* out = y + r * ldy + n0;
    const int8_t* q = qx.q + r * kpad;
    switch (m - r) {
      case 5: PanelRows<5>(pn, q, kpad, xs, xsum, p.nb, out, ldy, cnt); break;
      case 4: PanelRows<4>(pn, q, kpad, xs, xsum, p.nb, out, ldy, cnt); break;
      case 3: PanelRows<3>(pn, q, kpad, xs, xsum, p.nb, out, ldy, cnt); break;
      case 2: PanelRows<2>(pn, q, kpad, xs, xsum, p.nb, out, ldy, cnt); break;
      case 1: PanelRows<1>(pn, q, kpad, xs, xsum, p.nb, out, ldy, cnt); break;
      default: break;
    }
  }
}

// Dense float32 parts (bits 32, accurate's heavy part) at M >= kPanelMinRows: the same panel scheme
// in float32: 32 neurons' rows transposed (Transpose16) into [K][32], then 6 rows x 32 neurons of
// sums in registers, x[r][k] broadcast, one FMA per input in input order (the one-row kernel sums in
// 4 x 8 lanes instead: the results differ by float32 rounding, not by more; heavy neurons are never
// skipped, so no skip decision depends on it).
void FillDense(const NbPart& p, int64_t n0, std::vector<float>& w) {
  const int64_t k = p.k, kp = (k + 15) / 16 * 16;
  w.resize(static_cast<size_t>(kp * 32));
  for (int h = 0; h < 2; ++h)
    for (int64_t k0 = 0; k0 < kp; k0 += 16) {
      const int64_t cnt = std::min<int64_t>(16, k - k0);
      const __mmask16 km = static_cast<__mmask16>(cnt > 0 ? (1u << cnt) - 1 : 0);
      __m512i r[16], out[16];
      for (int u = 0; u < 16; ++u) {
        const int64_t n = n0 + 16 * h + u;
        r[u] = n < p.n ? _mm512_maskz_loadu_epi32(km, p.dense.data() + n * k + k0) : _mm512_setzero_si512();
      }
      Transpose16(r, out);
      for (int c = 0; c < 16; ++c) _mm512_storeu_si512(w.data() + (k0 + c) * 32 + 16 * h, out[c]);
    }
}

constexpr int64_t kDenseChunk = 16;  // inputs per partial sum (blocked summation)

template <int MR>
void DenseRows(const float* w, int64_t k, const float* x, int64_t ldx, float* out, int64_t ldy, int64_t cnt) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t i0 = 0; i0 < k; i0 += kDenseChunk) {  // per chunk a fresh partial sum, then added
    __m512 part[MR][2];
    for (int r = 0; r < MR; ++r) part[r][0] = part[r][1] = _mm512_setzero_ps();
    const int64_t i1 = std::min(k, i0 + kDenseChunk);
    for (int64_t i = i0; i < i1; ++i, w += 32) {
      const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
      for (int r = 0; r < MR; ++r) {
        const __m512 a = _mm512_set1_ps(x[r * ldx + i]);
        part[r][0] = _mm512_fmadd_ps(w0, a, part[r][0]);
        part[r][1] = _mm512_fmadd_ps(w1, a, part[r][1]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      acc[r][0] = _mm512_add_ps(acc[r][0], part[r][0]);
      acc[r][1] = _mm512_add_ps(acc[r][1], part[r][1]);
    }
  }
  const __mmask16 k0 = static_cast<__mmask16>(cnt >= 16 ? 0xFFFF : (1u << cnt) - 1);
  const __mmask16 k1 = static_cast<__mmask16>(cnt >= 32 ? 0xFFFF : cnt <= 16 ? 0 : (1u << (cnt - 16)) - 1);
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(out + r * ldy, k0, acc[r][0]);
    _mm512_mask_storeu_ps(out + r * ldy + 16, k1, acc[r][1]);
  }
}

void DenseQ(const NbPart& p, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy, int64_t i0, int64_t i1) {
  thread_local std::vector<float> w;
  for (int64_t n0 = i0; n0 < i1; n0 += 32) {
    FillDense(p, n0, w);
    const int64_t cnt = std::min<int64_t>(32, i1 - n0);
    int64_t r = 0;
    for (; r + kPanelRows <= m; r += kPanelRows) DenseRows<kPanelRows>(w.data(), p.k, x + r * ldx, ldx, y + r * ldy + n0, ldy, cnt);
    const float* xr = x + r * ldx;
    float* out = y + r * ldy + n0;
    switch (m - r) {
      case 5: DenseRows<5>(w.data(), p.k, xr, ldx, out, ldy, cnt); break;
      case 4: DenseRows<4>(w.data(), p.k, xr, ldx, out, ldy, cnt); break;
      case 3: DenseRows<3>(w.data(), p.k, xr, ldx, out, ldy, cnt); break;
      case 2: DenseRows<2>(w.data(), p.k, xr, ldx, out, ldy, cnt); break;
      case 1: DenseRows<1>(w.data(), p.k, xr, ldx, out, ldy, cnt); break;
      default: break;
    }
  }
}

// NbKernels::dense_rows: neurons [i0, i1) of a dense part for m rows, or false (the caller's kernel)
bool DenseRowsQ(const NbPart& p, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy, int64_t i0, int64_t i1) {
  if (m < kPanelMinRows) return false;
  DenseQ(p, x, ldx, m, y, ldy, i0, i1);
  return true;
}

void DotQ(const NbPart& p, const NbQ& qx, int64_t m, float* y, int64_t ldy, const int32_t* list, int64_t i0,
          int64_t i1) {
  if (p.tiled && !list && m >= kPanelMinRows && (p.bits == 4 || p.bits == 8) && p.bs % 4 == 0 &&
      p.blob * (8 / p.bits) == p.bs) {
    Panels(p, qx, m, y, ldy, i0, i1);
    return;
  }
  if (p.bits == 4 && p.blob == 16 && p.tiled && !qx.eo) {
    TilesB16(p, qx, m, y, ldy, i0, i1);
    return;
  }
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

// (q1, q2) byte pairs broadcast, for maddubs (unsigned codes x signed q)
inline __m512i BytePair(int8_t a, int8_t b) {
  return _mm512_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(static_cast<uint8_t>(a)) |
                                                (static_cast<uint16_t>(static_cast<uint8_t>(b)) << 8)));
}

// acc[i + o] += the int16 sums of part g's 128-bit lane L, for the output offsets o = first[g] + off[L]
inline void AddLanes(const __m512i* parts, const int* first, const int* off, int32_t* acc) {
  for (int g = 0; g < 4; ++g)
    for (int l = 0; l < 4; ++l) {
      __m256i* a = reinterpret_cast<__m256i*>(acc + first[g] + off[l]);
      const __m128i v = _mm512_extracti32x4_epi32(parts[g], 0);
      const __m128i w = l == 0 ? v
                        : l == 1 ? _mm512_extracti32x4_epi32(parts[g], 1)
                        : l == 2 ? _mm512_extracti32x4_epi32(parts[g], 2)
                                 : _mm512_extracti32x4_epi32(parts[g], 3);
      _mm256_storeu_si256(a, _mm256_add_epi32(_mm256_loadu_si256(a), _mm256_cvtepi16_epi32(w)));
    }
}

// The 4-bit pair kernels with 64-byte vectors (AVX-512BW maddubs; twice the AVX2 kernel's width,
// the same int16 bound: <= 8 pairs * 2 * 15 * 127 < 2^15), the tail by the AVX2 kernel.
// Neuron-major light down: 128 output rows per step (64 bytes of each neuron; per 16 rows 8 bytes,
// low nibbles rows 0..7, high 8..15): byte unpacks within 128-bit lane L pair the two neurons' codes
// of rows 32 L + {0..7 | 8..15 | 16..23 | 24..31}.
void Down4(const NbDown::Chunk& ch, const int32_t* js, const int8_t* qs, int n, int64_t d0, int64_t de, int32_t* acc) {
  const uint8_t* ptr[16];
  for (int k = 0; k < n; ++k) ptr[k] = ch.Of(js[k]);
  __m512i qq[8];
  for (int k = 0; k < n; k += 2) qq[k / 2] = BytePair(qs[k], qs[k + 1]);
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  static const int first[4] = {0, 8, 16, 24}, off[4] = {0, 32, 64, 96};
  int64_t d = d0;
  for (; d + 128 <= de; d += 128) {
    __m512i s[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int k = 0; k < n; k += 2) {
      const __m512i v1 = _mm512_loadu_si512(ptr[k] + (d - d0) / 2), v2 = _mm512_loadu_si512(ptr[k + 1] + (d - d0) / 2);
      const __m512i lo1 = _mm512_and_si512(v1, m4), hi1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4);
      const __m512i lo2 = _mm512_and_si512(v2, m4), hi2 = _mm512_and_si512(_mm512_srli_epi16(v2, 4), m4);
      s[0] = _mm512_add_epi16(s[0], _mm512_maddubs_epi16(_mm512_unpacklo_epi8(lo1, lo2), qq[k / 2]));
      s[1] = _mm512_add_epi16(s[1], _mm512_maddubs_epi16(_mm512_unpacklo_epi8(hi1, hi2), qq[k / 2]));
      s[2] = _mm512_add_epi16(s[2], _mm512_maddubs_epi16(_mm512_unpackhi_epi8(lo1, lo2), qq[k / 2]));
      s[3] = _mm512_add_epi16(s[3], _mm512_maddubs_epi16(_mm512_unpackhi_epi8(hi1, hi2), qq[k / 2]));
    }
    AddLanes(s, first, off, acc + (d - d0));
  }
  if (d < de)  // the rest (a multiple of 32 rows) from row d: the chunk's segments advanced to it
    NbPairsAvx2().down4(NbDown::Chunk{ch.base + (d - d0) / 2, ch.seg}, js, qs, n, d, de, acc + (d - d0));
}

// Input-major light up: 128 neurons per step (64 bytes of each channel's row; per 64 neurons 32
// bytes, low nibbles neurons 0..31, high 32..63): lane L holds neurons {0, 16, 64, 80}[L] + {0..15,
// 32..47}; byte unpacks pair the two channels' codes of neurons base + {0..7 | 8..15 | 32..39 | 40..47}.
void Im4(const uint8_t* const* rows, const int8_t* qs, int np, int64_t n0, int64_t ne, int32_t* acc) {
  __m512i qq[8];
  for (int k = 0; k < np; ++k) qq[k] = BytePair(qs[2 * k], qs[2 * k + 1]);
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  static const int first[4] = {0, 8, 32, 40}, off[4] = {0, 16, 64, 80};
  int64_t n = n0;
  for (; n + 128 <= ne; n += 128) {
    for (int k = 0; k < 2 * np; ++k)  // the next step's cache lines of each row
      _mm_prefetch(reinterpret_cast<const char*>(rows[k] + n / 2 + 256), _MM_HINT_T0);
    __m512i s[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int k = 0; k < np; ++k) {
      const __m512i v1 = _mm512_loadu_si512(rows[2 * k] + n / 2), v2 = _mm512_loadu_si512(rows[2 * k + 1] + n / 2);
      const __m512i lo1 = _mm512_and_si512(v1, m4), hi1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4);
      const __m512i lo2 = _mm512_and_si512(v2, m4), hi2 = _mm512_and_si512(_mm512_srli_epi16(v2, 4), m4);
      s[0] = _mm512_add_epi16(s[0], _mm512_maddubs_epi16(_mm512_unpacklo_epi8(lo1, lo2), qq[k]));
      s[1] = _mm512_add_epi16(s[1], _mm512_maddubs_epi16(_mm512_unpackhi_epi8(lo1, lo2), qq[k]));
      s[2] = _mm512_add_epi16(s[2], _mm512_maddubs_epi16(_mm512_unpacklo_epi8(hi1, hi2), qq[k]));
      s[3] = _mm512_add_epi16(s[3], _mm512_maddubs_epi16(_mm512_unpackhi_epi8(hi1, hi2), qq[k]));
    }
    AddLanes(s, first, off, acc + (n - n0));
  }
  if (n < ne) NbPairsAvx2().im4(rows, qs, np, n, ne, acc + (n - n0));
}

const NbPairs& Pairs512() {
  static const NbPairs k{Im4, NbPairsAvx2().im8, Down4, NbPairsAvx2().down8};
  return k;
}

// The neuron-major light down, 4 bits, with the sums in registers: 4 kept neurons per step, their
// codes of 128 output rows (64 bytes each; per 16 rows 8 bytes, rows 0..7 in the low nibbles) put
// side by side per row (two byte and two 16-bit unpacks: int32 lane = the 4 neurons' codes of one
// row) and multiplied by the 4 int8 activations with vpdpbusd. U units of 128 rows at a time (8
// accumulators each): in 128-bit lane L, accumulator 0 / 1 / 4 / 5 holds rows 32 L + 0..3 / 4..7 /
// 8..11 / 12..15 and 2 / 3 / 6 / 7 the same + 16, so a lane transpose gives 16 rows in order.
// The integer sums equal the pair kernels' and the float steps are theirs (bit-identical).
template <int U, bool HALF, class P>
inline void DownUnits(const uint8_t* const* ptr, const int32_t* quads, int64_t n, int64_t off, P& pf, __m512i* rows) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512i a[8 * U];
  for (int t = 0; t < 8 * U; ++t) a[t] = _mm512_setzero_si512();
  for (int64_t k = 0; k < n; k += 4) {
    const __m512i qv = _mm512_set1_epi32(quads[k / 4]);
    pf.Step();
    for (int u = 0; u < U; ++u) {
      __m512i lo[4], hi[4];
      for (int v = 0; v < 4; ++v) {
        const __m512i c = HALF ? _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ptr[k + v] + off)))
                               : _mm512_loadu_si512(ptr[k + v] + off + 64 * u);
        lo[v] = _mm512_and_si512(c, m4);
        hi[v] = _mm512_and_si512(_mm512_srli_epi16(c, 4), m4);
      }
      __m512i* s = a + 8 * u;
      for (int h = 0; h < 2; ++h) {  // low nibbles (rows + 0), high (+ 8)
        const __m512i* c = h ? hi : lo;
        const __m512i p0 = _mm512_unpacklo_epi8(c[0], c[1]), p1 = _mm512_unpacklo_epi8(c[2], c[3]);
        const __m512i p2 = _mm512_unpackhi_epi8(c[0], c[1]), p3 = _mm512_unpackhi_epi8(c[2], c[3]);
        s[4 * h + 0] = _mm512_dpbusd_epi32(s[4 * h + 0], _mm512_unpacklo_epi16(p0, p1), qv);
        s[4 * h + 1] = _mm512_dpbusd_epi32(s[4 * h + 1], _mm512_unpackhi_epi16(p0, p1), qv);
        s[4 * h + 2] = _mm512_dpbusd_epi32(s[4 * h + 2], _mm512_unpacklo_epi16(p2, p3), qv);
        s[4 * h + 3] = _mm512_dpbusd_epi32(s[4 * h + 3], _mm512_unpackhi_epi16(p2, p3), qv);
      }
    }
  }
  for (int u = 0; u < U; ++u) {  // rows[8 u + 2 L] = rows 128 u + 32 L + 0..15, [8 u + 2 L + 1] = + 16..31
    const __m512i* s = a + 8 * u;
    __m512i x[4], z[4];
    Transpose4(s[0], s[1], s[4], s[5], x);
    Transpose4(s[2], s[3], s[6], s[7], z);
    for (int l = 0; l < 4; ++l) {
      rows[8 * u + 2 * l] = x[l];
      rows[8 * u + 2 * l + 1] = z[l];
    }
  }
}

void DownQ(const NbDown& w, const int8_t* qa, const float* sa, const int32_t* list, int64_t count, int64_t d0,
           int64_t d1, int32_t* acc, float* y) {
  const int64_t de = std::min(w.dpad, (d1 + 31) / 32 * 32), len = de - d0;
  if (w.bits != 4 || len % 64) {
    NbDownQWith(Pairs512(), w, qa, sa, list, count, d0, d1, acc, y);
    return;
  }
  const NbDown::Chunk ch = w.ChunkOf(d0);
  const int64_t seg = len / 2, c = d0 / w.rows;
  // the kept neurons with a non-zero code, per block of bs: their segments, 4 codes per quad
  thread_local std::vector<const uint8_t*> ptr;
  thread_local std::vector<int32_t> quads, bstart, blk, sumq;
  ptr.clear();
  quads.clear();
  bstart.clear();
  blk.clear();
  sumq.clear();
  uint32_t quad = 0;
  for (int64_t i = 0; i < count;) {
    const int64_t b = list[i] / w.bs, jend = (b + 1) * w.bs;
    const size_t first = ptr.size();
    int32_t sq = 0;
    for (; i < count && list[i] < jend; ++i) {
      const int8_t q = qa[list[i]];
      if (!q) continue;
      sq += q;
      const size_t k = ptr.size() - first;
      quad |= static_cast<uint32_t>(static_cast<uint8_t>(q)) << (8 * (k & 3));
      ptr.push_back(ch.Of(list[i]));
      if ((k & 3) == 3) {
        quads.push_back(static_cast<int32_t>(quad));
        quad = 0;
      }
    }
    if (ptr.size() == first) continue;
    while ((ptr.size() - first) & 3) ptr.push_back(ptr.back());  // code 0 for the repeats
    if (quad) quads.push_back(static_cast<int32_t>(quad));
    else if (quads.size() * 4 < ptr.size()) quads.push_back(0);
    quad = 0;
    bstart.push_back(static_cast<int32_t>(first));
    blk.push_back(static_cast<int32_t>(b));
    sumq.push_back(sq);
  }
  bstart.push_back(static_cast<int32_t>(ptr.size()));
  // The next block's segments, scales and zero points are prefetched (to L2) while this block is
  // computed, a few cache lines per group of 4 neurons, so that the reads overlap the arithmetic
  // (prefetching a block's lines all at once stalls on the fill buffers and overlaps nothing).
  struct Prefetch {
    const uint8_t* const* ptr = nullptr;  // neurons [k, k1) of the block ahead, seg bytes each
    int64_t k = 0, k1 = 0, seg = 0, o = 0;
    const char* extra[2] = {nullptr, nullptr};  // its scales and zero points
    int64_t extra_len[2] = {0, 0}, eo = 0;
    int per = 0;
    void Line(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
    void Step() {
      for (int i = 0; i < per; ++i) {
        if (k < k1) {
          Line(ptr[k] + o);
          if ((o += 64) >= seg) o = 0, ++k;
        } else if (eo < extra_len[0] + extra_len[1]) {
          Line(eo < extra_len[0] ? extra[0] + eo : extra[1] + (eo - extra_len[0]));
          eo += 64;
        } else {
          return;
        }
      }
    }
  };
  const size_t nblk = bstart.size() - 1;
  auto ahead = [&](size_t g) {  // the Prefetch of block g (none past the last)
    Prefetch p;
    if (g >= nblk) return p;
    p.ptr = ptr.data();
    p.k = bstart[g];
    p.k1 = bstart[g + 1];
    p.seg = seg;
    p.extra[0] = reinterpret_cast<const char*>(w.scales.data() + w.SBase(c, blk[g]) + d0);
    p.extra[1] = reinterpret_cast<const char*>(w.z.data() + w.SBase(c, blk[g]) + d0);
    p.extra_len[0] = len * 4;
    p.extra_len[1] = len;
    return p;
  };
  if (nblk) {  // the first block now
    Prefetch p = ahead(0);
    p.per = 1 << 30;
    p.Step();
  }
  const int64_t dv = d0 + (d1 - d0) / 8 * 8;  // rows [d0, dv) by vectors of 8 / 16, the rest as the AVX2 tail
  for (size_t g = 0; g < nblk; ++g) {
    const int64_t k0 = bstart[g], k1 = bstart[g + 1], b = blk[g];
    Prefetch pf = ahead(g + 1);
    const int64_t steps = (k1 - k0) / 4 * ((len + 255) / 256 + (len % 256 > 128));
    const int64_t lines = (pf.k1 - pf.k) * ((seg + 63) / 64) + (len * 5 + 63) / 64;
    pf.per = static_cast<int>(lines / std::max<int64_t>(1, steps) + 1);
    const float* s = w.scales.data() + w.SBase(c, b);
    const int8_t* z = w.z.data() + w.SBase(c, b);
    const __m512 vsa = _mm512_set1_ps(sa[b]);
    const __m512i vq = _mm512_set1_epi32(sumq[g]);
    for (int64_t r = 0; r < len;) {
      __m512i out[16];
      const int64_t step = len - r >= 256 ? 256 : len - r >= 128 ? 128 : 64;
      if (step == 256)
        DownUnits<2, false>(ptr.data() + k0, quads.data() + k0 / 4, k1 - k0, r / 2, pf, out);
      else if (step == 128)
        DownUnits<1, false>(ptr.data() + k0, quads.data() + k0 / 4, k1 - k0, r / 2, pf, out);
      else  // the last 64 rows: 32 bytes of each neuron, the vectors' upper halves zero
        DownUnits<1, true>(ptr.data() + k0, quads.data() + k0 / 4, k1 - k0, r / 2, pf, out);
      for (int t = 0; t < step / 16; ++t) {
        const int64_t d = d0 + r + 16 * t;
        if (dv < d1 && d <= dv && dv < d + 16) _mm512_storeu_si512(acc + (d - d0), out[t]);  // the tail's sums
        if (d >= dv) break;
        const __mmask16 m = d + 16 <= dv ? 0xFFFF : static_cast<__mmask16>((1u << (dv - d)) - 1);
        const __m512i zi = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, z + d));
        const __m512i v = _mm512_sub_epi32(out[t], _mm512_mullo_epi32(zi, vq));  // acc - z * sum q (exact)
        const __m512 yv = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + d), vsa), _mm512_cvtepi32_ps(v),
                                          _mm512_maskz_loadu_ps(m, y + d));
        _mm512_mask_storeu_ps(y + d, m, yv);
      }
      r += step;
    }
    for (int64_t d = dv; d < d1; ++d)
      y[d] += s[d] * sa[b] * static_cast<float>(acc[d - d0] - z[d] * sumq[g]);
  }
}

namespace v16 {  // the 16-lane vector functions of act_math.inc
using V = __m512;
inline V Set1(float a) { return _mm512_set1_ps(a); }
inline V Add(V a, V b) { return _mm512_add_ps(a, b); }
inline V Sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V Div(V a, V b) { return _mm512_div_ps(a, b); }
inline V Fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V Fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
inline V Min(V a, V b) { return _mm512_min_ps(a, b); }
inline V Max(V a, V b) { return _mm512_max_ps(a, b); }
inline V Round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V Abs(V a) { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7FFFFFFF))); }
inline V SignBlend(V a, V b, V m) { return _mm512_mask_blend_ps(_mm512_movepi32_mask(_mm512_castps_si512(m)), a, b); }
inline V Pow2(V n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
#include "act_math.inc"
}  // namespace v16

// NbKernels::act with 16 lanes (the AVX2 kernel's formulas and redo rules, bit-identical values; at
// prefill the activation is a large share of the op's time)
template <int KIND>
int64_t Act16(float thr, const float* v, float* s, int64_t n, int32_t* redo) {
  const __m512 lim = _mm512_set1_ps(80.0f), vthr = _mm512_set1_ps(thr), tol = _mm512_set1_ps(1e-5f * thr);
  int64_t count = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    const __m512 a = v16::Act<KIND>(x);
    _mm512_storeu_ps(s + i, a);
    __mmask16 bad = _mm512_cmp_ps_mask(v16::Abs(x), lim, _CMP_NLT_UQ);  // |v| >= 80 or NaN
    if (KIND != 0)  // (near) zero: the reference's exact zeros are skipped
      bad |= _mm512_cmp_ps_mask(v16::Abs(a), _mm512_set1_ps(1e-30f), _CMP_LT_OQ);
    if (thr > 0.0f) bad |= _mm512_cmp_ps_mask(v16::Abs(_mm512_sub_ps(v16::Abs(a), vthr)), tol, _CMP_LE_OQ);
    unsigned bits = bad;
    while (bits) {
      redo[count++] = static_cast<int32_t>(i + __builtin_ctz(bits));
      bits &= bits - 1;
    }
  }
  if (i < n) {  // the last 8..15 values: the AVX2 kernel (its own tail by the reference)
    const int64_t c = NbKernelsAvx2().act(KIND, thr, v + i, s + i, n - i, redo + count);
    for (int64_t j = 0; j < c; ++j) redo[count + j] += static_cast<int32_t>(i);
    count += c;
  }
  return count;
}

int64_t ActQ(int kind, float thr, const float* v, float* s, int64_t n, int32_t* redo) {
  switch (kind) {
    case 0: return Act16<0>(thr, v, s, n, redo);
    case 1: return Act16<1>(thr, v, s, n, redo);
    case 2: return Act16<2>(thr, v, s, n, redo);
    default: return Act16<3>(thr, v, s, n, redo);
  }
}

void ImQ(const NbIm& w, const int8_t* q, const float* xs, const int32_t* xsum, const int32_t* ks, int64_t cnt,
         int64_t n0, int64_t n1, int32_t* acc, float* y) {
  NbImQWith(Pairs512(), w, q, xs, xsum, ks, cnt, n0, n1, acc, y);
}

}  // namespace

const NbKernels& NbKernelsAvx512Vnni() {
  static const NbKernels k = [] {
    NbKernels v = NbKernelsAvx2();
    v.dot_q = DotQ;
    v.down_q = DownQ;
    v.im_q = ImQ;
    v.dense_rows = DenseRowsQ;
    v.act = ActQ;
    return v;
  }();
  return k;
}

}  // namespace ffsplit
