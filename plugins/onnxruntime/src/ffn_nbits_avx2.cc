// AVX2 + FMA kernels of FusedFFNNBits (ffn_nbits.cc; the scalar ones there define what they compute).
//  dot_f: a block's codes decoded once to floats (c - z), dotted with every row of X, times the scale
//  dot_q: int8 X blocks, 8 neurons at a time (a tile, or 8 listed rows): 4 bits with
//         _mm256_maddubs_epi16 (unsigned codes x signed int8, no int16 saturation: 2 * 15 * 127 <
//         2^15; blocks >= 64 against X reordered even / odd so nibbles need no unpacking), 8 bits
//         (signed codes) as |c| x (q with c's sign) with maddubs (2 * 128 * 127 < 2^15); the 8
//         neurons' int32 block sums reduced together, zero points and scales applied as vectors
//  down_f / down_q: neuron-major light down; down_q takes the listed neurons in pairs, their codes
//         interleaved per output row and multiplied with _mm256_madd_epi16 by (qa_j, qa_j')
//  quant / act: the activation quantization and the level-4 activations (exp / erfc polynomials)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "ffn_nbits.h"

namespace ffsplit {
namespace {

float Hsum(__m256 a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// 16 4-bit codes (8 bytes, low nibble first) -> 16 uint8 in code order
inline __m128i Unpack16(const uint8_t* p) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm_unpacklo_epi8(_mm_and_si128(raw, m), _mm_and_si128(_mm_srli_epi16(raw, 4), m));
}

// 32 4-bit codes (16 bytes) -> 32 uint8 in code order
inline __m256i Unpack32(const uint8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, m), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m);
  return _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
}

// 16 codes of a block from index i as int32 (two halves of 8): 4 bits unsigned, 8 bits signed
inline void Codes16(const uint8_t* blk, int bits, int64_t i, __m256i& c0, __m256i& c1) {
  if (bits == 8) {
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + i));
    c0 = _mm256_cvtepi8_epi32(c);
    c1 = _mm256_cvtepi8_epi32(_mm_srli_si128(c, 8));
  } else {
    const __m128i c = Unpack16(blk + i / 2);
    c0 = _mm256_cvtepu8_epi32(c);
    c1 = _mm256_cvtepu8_epi32(_mm_srli_si128(c, 8));
  }
}

void DotF(const NbPart& p, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy, const int32_t* list,
          int64_t i0, int64_t i1) {
  alignas(32) float w[256];
  for (int64_t ii = i0; ii < i1; ++ii) {
    const int64_t n = list ? list[ii] : ii;
    for (int64_t r = 0; r < m; ++r) y[r * ldy + n] = 0.0f;
    for (int64_t b = 0; b < p.nb; ++b) {
      const size_t ix = static_cast<size_t>(p.Index(n, b));
      const uint8_t* blk = p.Blk(n, b);
      const __m256 vz = _mm256_set1_ps(static_cast<float>(p.z[ix]));
      for (int64_t i = 0; i < p.bs; i += 16) {
        __m256i c0, c1;
        Codes16(blk, p.bits, i, c0, c1);
        _mm256_store_ps(w + i, _mm256_sub_ps(_mm256_cvtepi32_ps(c0), vz));
        _mm256_store_ps(w + i + 8, _mm256_sub_ps(_mm256_cvtepi32_ps(c1), vz));
      }
      const float s = p.sc[ix];
      for (int64_t r = 0; r < m; ++r) {
        const float* xb = x + r * ldx + b * p.bs;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (int64_t i = 0; i < p.bs; i += 16) {
          a0 = _mm256_fmadd_ps(_mm256_load_ps(w + i), _mm256_loadu_ps(xb + i), a0);
          a1 = _mm256_fmadd_ps(_mm256_load_ps(w + i + 8), _mm256_loadu_ps(xb + i + 8), a1);
        }
        y[r * ldy + n] += s * Hsum(_mm256_add_ps(a0, a1));
      }
    }
  }
}

// lane t = the sum of the 8 int32 lanes of a[t]
inline __m256i Reduce8(const __m256i* a) {
  const __m256i h01 = _mm256_hadd_epi32(a[0], a[1]), h23 = _mm256_hadd_epi32(a[2], a[3]);
  const __m256i h45 = _mm256_hadd_epi32(a[4], a[5]), h67 = _mm256_hadd_epi32(a[6], a[7]);
  const __m256i q0 = _mm256_hadd_epi32(h01, h23), q1 = _mm256_hadd_epi32(h45, h67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(q0, q1, 0x20), _mm256_permute2x128_si256(q0, q1, 0x31));
}

// The integer dot product of one neuron's block (codes c) with the int8 activations qb (eb: the
// even / odd order): int32 partial sums in 8 lanes. Kinds:
enum : int {
  kI4Eo = 0,  // 4 bits, block >= 64: low nibbles x even values, high x odd; int16 sums over the
              // block (<= 4 * 2 * 2 * 15 * 127 < 2^15 for blocks <= 256), one madd
  kI4B32,     // 4 bits, block 32: nibbles unpacked in code order
  kI4B16,     // 4 bits, block 16
  kI8,        // 8 bits (signed codes), block >= 32: |c| x (q with c's sign), no int16 saturation
              // (2 * 128 * 127 < 2^15)
  kI8B16,     // 8 bits, block 16
};
template <int KIND>
inline __m256i BlockDot(const uint8_t* c, const int8_t* qb, const int8_t* eb, int64_t bs) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (KIND == kI4Eo) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i s16 = _mm256_setzero_si256();
    for (int64_t i = 0; i < bs; i += 64) {
      const __m256i ve = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(eb + i));
      const __m256i vo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(eb + i + 32));
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i / 2));
      const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      s16 = _mm256_add_epi16(s16, _mm256_add_epi16(_mm256_maddubs_epi16(lo, ve), _mm256_maddubs_epi16(hi, vo)));
    }
    return _mm256_madd_epi16(s16, ones);
  } else if (KIND == kI4B32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(Unpack32(c), v), ones);
  } else if (KIND == kI4B16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb));
    const __m128i s = _mm_madd_epi16(_mm_maddubs_epi16(Unpack16(c), v), _mm_set1_epi16(1));
    return _mm256_inserti128_si256(_mm256_setzero_si256(), s, 0);
  } else if (KIND == kI8) {
    __m256i a = _mm256_setzero_si256();
    for (int64_t i = 0; i < bs; i += 32) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i));
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + i));
      a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(v, w)), ones));
    }
    return a;
  } else {
    const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c));
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb));
    const __m128i s = _mm_madd_epi16(_mm_maddubs_epi16(_mm_abs_epi8(w), _mm_sign_epi8(v, w)), _mm_set1_epi16(1));
    return _mm256_inserti128_si256(_mm256_setzero_si256(), s, 0);
  }
}

// bytes ahead of the codes being read that a tile prefetches (measured: 768..1536 equal, 0 or 4096
// slower on a 2-core EPYC streaming 21 MB of codes)
constexpr int64_t kTilePrefetch = 1024;

// 8 neurons of a tiled part (tile t) for one activation row: out[0..8) (float)
template <int KIND>
void Tile8(const NbPart& p, const int8_t* q, const int8_t* qeo, const float* xs, const int32_t* xsum, int64_t t,
           float* out) {
  const int64_t tb = 8 * p.blob;  // bytes of one tile block
  const uint8_t* base = p.codes.data() + t * p.nb * tb;
  const float* sc = p.sc.data() + t * p.nb * 8;
  const int8_t* zt = p.z.data() + t * p.nb * 8;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < p.nb; ++b, base += tb) {
    for (int64_t o = 0; o < tb; o += 64) _mm_prefetch(reinterpret_cast<const char*>(base + kTilePrefetch + o), _MM_HINT_T0);
    const int8_t* qb = q + b * p.bs;
    const int8_t* eb = qeo ? qeo + b * p.bs : nullptr;
    __m256i a[8];
    for (int u = 0; u < 8; ++u) a[u] = BlockDot<KIND>(base + u * p.blob, qb, eb, p.bs);
    __m256i s = Reduce8(a);
    const __m256i z = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zt + b * 8)));
    s = _mm256_sub_epi32(s, _mm256_mullo_epi32(z, _mm256_set1_epi32(xsum[b])));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(_mm256_loadu_ps(sc + b * 8), _mm256_set1_ps(xs[b])), acc);
  }
  _mm256_storeu_ps(out, acc);
}

// 8 neurons ns[0..8) of a row-major part for one activation row; next: the rows of the group after
// (prefetched block by block; null: none)
template <int KIND>
void Rows8(const NbPart& p, const int8_t* q, const int8_t* qeo, const float* xs, const int32_t* xsum,
           const int64_t* ns, const int64_t* next, float* out) {
  const uint8_t* rows[8];
  const uint8_t* nrows[8];
  for (int u = 0; u < 8; ++u) {
    rows[u] = p.codes.data() + ns[u] * p.nb * p.blob;
    nrows[u] = next ? p.codes.data() + next[u] * p.nb * p.blob : rows[u];
  }
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < p.nb; ++b) {
    if (next && (b * p.blob) % 64 == 0)  // once per cache line of the next group's rows
      for (int u = 0; u < 8; ++u)
        for (int64_t o = 0; o < std::max<int64_t>(p.blob, 64); o += 64)
          _mm_prefetch(reinterpret_cast<const char*>(nrows[u] + b * p.blob + o), _MM_HINT_T0);
    const int8_t* qb = q + b * p.bs;
    const int8_t* eb = qeo ? qeo + b * p.bs : nullptr;
    __m256i a[8];
    for (int u = 0; u < 8; ++u) a[u] = BlockDot<KIND>(rows[u] + b * p.blob, qb, eb, p.bs);
    __m256i s = Reduce8(a);
    alignas(32) float scv[8];
    alignas(32) int32_t zv[8];
    for (int u = 0; u < 8; ++u) {
      scv[u] = p.sc[static_cast<size_t>(ns[u] * p.nb + b)];
      zv[u] = p.z[static_cast<size_t>(ns[u] * p.nb + b)];
    }
    const __m256i z = _mm256_load_si256(reinterpret_cast<const __m256i*>(zv));
    s = _mm256_sub_epi32(s, _mm256_mullo_epi32(z, _mm256_set1_epi32(xsum[b])));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(_mm256_load_ps(scv), _mm256_set1_ps(xs[b])), acc);
  }
  _mm256_storeu_ps(out, acc);
}

template <int KIND>
void DotQKind(const NbPart& p, const NbQ& qx, int64_t m, float* y, int64_t ldy, const int32_t* list, int64_t i0,
              int64_t i1) {
  const int64_t kpad = p.nb * p.bs;
  alignas(32) float out[8];
  if (p.tiled) {  // no list: neurons [i0, i1)
    for (int64_t t = i0 / 8; t * 8 < i1; ++t) {
      const int64_t lo = std::max(i0, t * 8), hi = std::min(i1, t * 8 + 8);
      for (int64_t r = 0; r < m; ++r) {
        Tile8<KIND>(p, qx.q + r * kpad, qx.eo ? qx.eo + r * kpad : nullptr, qx.s + r * p.nb, qx.sum + r * p.nb, t, out);
        for (int64_t n = lo; n < hi; ++n) y[r * ldy + n] = out[n - t * 8];
      }
    }
    return;
  }
  int64_t ns[8], nx[8];
  auto fill = [&](int64_t g, int64_t* dst) {  // the group of 8 starting at index g (last one repeated)
    const int64_t e = std::min(i1, g + 8);
    for (int u = 0; u < 8; ++u) {
      const int64_t i = std::min(g + u, e - 1);
      dst[u] = list ? list[i] : i;
    }
  };
  fill(i0, ns);
  for (int64_t g = i0; g < i1; g += 8) {
    const bool more = g + 8 < i1;
    if (more) fill(g + 8, nx);
    for (int64_t r = 0; r < m; ++r) {
      Rows8<KIND>(p, qx.q + r * kpad, qx.eo ? qx.eo + r * kpad : nullptr, qx.s + r * p.nb, qx.sum + r * p.nb, ns,
                  more && r == 0 ? nx : nullptr, out);
      for (int64_t u = 0; u < std::min<int64_t>(8, i1 - g); ++u) y[r * ldy + ns[u]] = out[u];
    }
    if (more) std::copy(nx, nx + 8, ns);
  }
}

void DotQ(const NbPart& p, const NbQ& qx, int64_t m, float* y, int64_t ldy, const int32_t* list, int64_t i0,
          int64_t i1) {
  if (p.bits == 4) {
    if (p.bs >= 64 && qx.eo)
      DotQKind<kI4Eo>(p, qx, m, y, ldy, list, i0, i1);
    else if (p.bs == 16)
      DotQKind<kI4B16>(p, qx, m, y, ldy, list, i0, i1);
    else if (p.bs == 32)
      DotQKind<kI4B32>(p, qx, m, y, ldy, list, i0, i1);
    else
      NbKernelsScalar().dot_q(p, qx, m, y, ldy, list, i0, i1);  // block >= 64 without the even / odd order
  } else if (p.bs == 16) {
    DotQKind<kI8B16>(p, qx, m, y, ldy, list, i0, i1);
  } else {
    DotQKind<kI8>(p, qx, m, y, ldy, list, i0, i1);
  }
}

inline int64_t DownEnd(const NbDown& w, int64_t d1) { return std::min(w.dpad, (d1 + 31) / 32 * 32); }

// 16 codes of a neuron-major row group (ffn_nbits.h NbDown) as int32: 8 bits: 16 signed bytes;
// 4 bits: 8 bytes, rows 0..7 in the low nibbles, 8..15 in the high ones
inline void DownCodes16(const uint8_t* c, int bits, int64_t d, __m256i& c0, __m256i& c1) {
  if (bits == 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + d));
    c0 = _mm256_cvtepi8_epi32(v);
    c1 = _mm256_cvtepi8_epi32(_mm_srli_si128(v, 8));
    return;
  }
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + d / 2));
  const __m128i m = _mm_set1_epi8(0x0F);
  c0 = _mm256_cvtepu8_epi32(_mm_and_si128(raw, m));
  c1 = _mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), m));
}

// 8 int8 zero points as float
inline __m256 Z8(const int8_t* z) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z))));
}

void DownF(const NbDown& w, const float* a, const int32_t* list, int64_t count, int64_t d0, int64_t d1, float* acc,
           float* y) {
  const int64_t de = DownEnd(w, d1), len = de - d0;
  const NbDown::Chunk ch = w.ChunkOf(d0);
  for (int64_t i = 0; i < count;) {
    const int64_t b = list[i] / w.bs;
    std::fill(acc, acc + len, 0.0f);
    const int8_t* z = w.z.data() + w.SBase(d0 / w.rows, b);
    for (; i < count && list[i] / w.bs == b; ++i) {
      const int64_t j = list[i];
      const __m256 av = _mm256_set1_ps(a[j]);
      const uint8_t* c = ch.Of(j);
      for (int64_t d = d0; d < de; d += 16) {
        __m256i c0, c1;
        DownCodes16(c, w.bits, d - d0, c0, c1);
        const __m256 f0 = _mm256_sub_ps(_mm256_cvtepi32_ps(c0), Z8(z + d));
        const __m256 f1 = _mm256_sub_ps(_mm256_cvtepi32_ps(c1), Z8(z + d + 8));
        float* ac = acc + (d - d0);
        _mm256_storeu_ps(ac, _mm256_fmadd_ps(av, f0, _mm256_loadu_ps(ac)));
        _mm256_storeu_ps(ac + 8, _mm256_fmadd_ps(av, f1, _mm256_loadu_ps(ac + 8)));
      }
    }
    const float* s = w.scales.data() + w.SBase(d0 / w.rows, b);
    int64_t d = d0;
    for (; d + 8 <= d1; d += 8)
      _mm256_storeu_ps(y + d, _mm256_fmadd_ps(_mm256_loadu_ps(s + d), _mm256_loadu_ps(acc + (d - d0)),
                                              _mm256_loadu_ps(y + d)));
    for (; d < d1; ++d) y[d] += s[d] * acc[d - d0];
  }
}

// acc[d - d0] (int32) += sum over the pairs of sum_j qa_j * code[d, j], for d in [d0, de), the
// neurons js[0..n) (n <= 16, even; a missing partner has q = 0 and repeats the neuron)
template <int BITS>
void PairsSlab(const NbDown::Chunk& ch, const int32_t* js, const int8_t* qs, int n, int64_t d0, int64_t de, int32_t* acc) {
  const uint8_t* ptr[16];
  for (int k = 0; k < n; ++k) ptr[k] = ch.Of(js[k]);
  __m256i qq[8];
  for (int k = 0; k < n; k += 2) {
    if (BITS == 4)  // signed int8 pairs (q1, q2) for maddubs
      qq[k / 2] = _mm256_set1_epi16(static_cast<int16_t>((static_cast<uint16_t>(static_cast<uint8_t>(qs[k]))) |
                                                         (static_cast<uint16_t>(static_cast<uint8_t>(qs[k + 1])) << 8)));
    else  // int16 pairs (q1, q2) for madd
      qq[k / 2] = _mm256_set1_epi32(static_cast<int32_t>((static_cast<uint32_t>(qs[k]) & 0xFFFF) |
                                                         (static_cast<uint32_t>(qs[k + 1]) << 16)));
  }
  const __m128i m = _mm_set1_epi8(0x0F);
  int64_t d = d0;
  if (BITS == 4) {
    // 64 rows per step: 32 bytes of each neuron (16 rows per 8 bytes: low nibbles rows 0..7, high
    // 8..15); unpacks within 128-bit lanes give the (j1, j2) pairs of rows {0..7, 32..39},
    // {8..15, 40..47}, {16..23, 48..55}, {24..31, 56..63}
    const __m256i m8 = _mm256_set1_epi8(0x0F);
    for (; d + 64 <= de; d += 64) {
      __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
      for (int k = 0; k < n; k += 2) {
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ptr[k] + (d - d0) / 2));
        const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ptr[k + 1] + (d - d0) / 2));
        const __m256i lo1 = _mm256_and_si256(v1, m8), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m8);
        const __m256i lo2 = _mm256_and_si256(v2, m8), hi2 = _mm256_and_si256(_mm256_srli_epi16(v2, 4), m8);
        s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(lo1, lo2), qq[k / 2]));
        s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(hi1, hi2), qq[k / 2]));
        s2 = _mm256_add_epi16(s2, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(lo1, lo2), qq[k / 2]));
        s3 = _mm256_add_epi16(s3, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(hi1, hi2), qq[k / 2]));
      }
      int32_t* a0 = acc + (d - d0);
      const __m256i* parts[4] = {&s0, &s1, &s2, &s3};
      for (int g = 0; g < 4; ++g) {  // rows 8g..8g+7 (low lane) and 32+8g.. (high lane)
        __m256i* lo = reinterpret_cast<__m256i*>(a0 + 8 * g);
        __m256i* hi = reinterpret_cast<__m256i*>(a0 + 32 + 8 * g);
        _mm256_storeu_si256(lo, _mm256_add_epi32(_mm256_loadu_si256(lo), _mm256_cvtepi16_epi32(_mm256_castsi256_si128(*parts[g]))));
        _mm256_storeu_si256(hi, _mm256_add_epi32(_mm256_loadu_si256(hi), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(*parts[g], 1))));
      }
    }
  }
  for (; d < de; d += 16) {
    __m256i* ac = reinterpret_cast<__m256i*>(acc + (d - d0));
    if (BITS == 4) {
      __m256i s16 = _mm256_setzero_si256();  // <= 8 pairs * 2 * 15 * 127 < 2^15
      for (int k = 0; k < n; k += 2) {
        const __m128i v = _mm_unpacklo_epi64(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(ptr[k] + (d - d0) / 2)),
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(ptr[k + 1] + (d - d0) / 2)));
        const __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
        // (j1, j2) code pairs for rows 0..7 (from the low nibbles) and 8..15 (high nibbles)
        const __m128i p0 = _mm_unpacklo_epi8(lo, _mm_srli_si128(lo, 8));
        const __m128i p1 = _mm_unpacklo_epi8(hi, _mm_srli_si128(hi, 8));
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_set_m128i(p1, p0), qq[k / 2]));
      }
      const __m256i w0 = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s16));
      const __m256i w1 = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s16, 1));
      _mm256_storeu_si256(ac, _mm256_add_epi32(_mm256_loadu_si256(ac), w0));
      _mm256_storeu_si256(ac + 1, _mm256_add_epi32(_mm256_loadu_si256(ac + 1), w1));
    } else {
      __m256i s0 = _mm256_setzero_si256(), s1 = s0;
      for (int k = 0; k < n; k += 2) {
        const __m128i a1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ptr[k] + (d - d0)));
        const __m128i a2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ptr[k + 1] + (d - d0)));
        s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a1, a2)), qq[k / 2]));
        s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpackhi_epi8(a1, a2)), qq[k / 2]));
      }
      _mm256_storeu_si256(ac, _mm256_add_epi32(_mm256_loadu_si256(ac), s0));
      _mm256_storeu_si256(ac + 1, _mm256_add_epi32(_mm256_loadu_si256(ac + 1), s1));
    }
  }
}

}  // namespace

void NbDownQWith(const NbPairs& pk, const NbDown& w, const int8_t* qa, const float* sa, const int32_t* list,
                 int64_t count, int64_t d0, int64_t d1, int32_t* acc, float* y) {
  const int64_t de = DownEnd(w, d1), len = de - d0;
  const int64_t seg = w.bits == 8 ? len : len / 2;  // bytes of a neuron's segment read here
  const NbDown::Chunk ch = w.ChunkOf(d0);
  constexpr int64_t kAhead = 16;
  for (int64_t i = 0; i < std::min(count, kAhead); ++i) {
    const uint8_t* nx = ch.Of(list[i]);
    for (int64_t o = 0; o < seg; o += 64) _mm_prefetch(reinterpret_cast<const char*>(nx + o), _MM_HINT_T0);
  }
  const int64_t c = d0 / w.rows;
  for (int64_t i = 0; i < count;) {
    const int64_t b = list[i] / w.bs, jend = (b + 1) * w.bs;
    {  // this block's scales and zero points (one stream per chunk), read after its neurons
      const char* sp = reinterpret_cast<const char*>(w.scales.data() + w.SBase(c, b) + d0);
      const char* zp = reinterpret_cast<const char*>(w.z.data() + w.SBase(c, b) + d0);
      for (int64_t o = 0; o < len * 4; o += 64) _mm_prefetch(sp + o, _MM_HINT_T0);
      for (int64_t o = 0; o < len; o += 64) _mm_prefetch(zp + o, _MM_HINT_T0);
    }
    std::fill(acc, acc + len, 0);
    int32_t sumq = 0;
    // the block's neurons with a non-zero code, 16 at a time (8 pairs)
    int32_t js[16];
    int8_t qs[16];
    int n = 0;
    auto flush = [&]() {
      if (n & 1) {
        js[n] = js[n - 1];
        qs[n] = 0;
        ++n;
      }
      if (w.bits == 4)
        pk.down4(ch, js, qs, n, d0, de, acc);
      else
        pk.down8(ch, js, qs, n, d0, de, acc);
      n = 0;
    };
    for (; i < count && list[i] < jend; ++i) {
      if (i + kAhead < count) {  // the segments of the neuron kAhead further in the list
        const uint8_t* nx = ch.Of(list[i + kAhead]);
        for (int64_t o = 0; o < seg; o += 64) _mm_prefetch(reinterpret_cast<const char*>(nx + o), _MM_HINT_T0);
      }
      const int8_t q = qa[list[i]];
      if (!q) continue;
      sumq += q;
      js[n] = list[i];
      qs[n] = q;
      if (++n == 16) flush();
    }
    if (n) flush();
    const float* s = w.scales.data() + w.SBase(d0 / w.rows, b);
    const int8_t* z = w.z.data() + w.SBase(d0 / w.rows, b);
    const __m256 vsa = _mm256_set1_ps(sa[b]);
    const __m256i vq = _mm256_set1_epi32(sumq);
    int64_t d = d0;
    for (; d + 8 <= d1; d += 8) {
      const __m256i zi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z + d)));
      const __m256i t = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + (d - d0))),
                                         _mm256_mullo_epi32(zi, vq));  // acc - z * sum q (exact)
      _mm256_storeu_ps(y + d, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(s + d), vsa), _mm256_cvtepi32_ps(t),
                                              _mm256_loadu_ps(y + d)));
    }
    for (; d < d1; ++d) y[d] += s[d] * sa[b] * static_cast<float>(acc[d - d0] - z[d] * sumq);
  }
}

namespace {

// NbQuantize with vectors: the same max |x|, scale, products x * (1 / scale) and round to nearest
// even (cvtps_epi32 in the default rounding mode, as nearbyintf), so the same codes. Blocks that are
// partial (k not a multiple of bs) or hold NaN go to the scalar function.
void Quant(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t bs, int64_t kpad, int8_t* qx, float* xs,
           int32_t* xsum) {
  const int64_t nb = kpad / bs;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * ldx;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * bs;
      int8_t* q = qx + r * kpad + k0;
      if (bs < 16 || k0 + bs > k) {
        NbQuantize(xr + k0, ldx, 1, std::max<int64_t>(0, std::min(bs, k - k0)), bs, bs, q, xs + r * nb + b,
                   xsum + r * nb + b);
        continue;
      }
      __m256 mx = _mm256_setzero_ps(), un = _mm256_setzero_ps();
      for (int64_t i = 0; i < bs; i += 8) {
        const __m256 v = _mm256_loadu_ps(xr + k0 + i);
        mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
        un = _mm256_or_ps(un, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float amax = _mm_cvtss_f32(h);
      if (_mm256_movemask_ps(un) || !(amax < std::numeric_limits<float>::infinity())) {
        NbQuantize(xr + k0, ldx, 1, bs, bs, bs, q, xs + r * nb + b, xsum + r * nb + b);
        continue;
      }
      if (amax == 0.0f) {
        std::memset(q, 0, static_cast<size_t>(bs));
        xs[r * nb + b] = 0.0f;
        xsum[r * nb + b] = 0;
        continue;
      }
      const float scale = amax / 127.0f;
      const __m256 inv = _mm256_set1_ps(1.0f / scale);
      __m256i sum = _mm256_setzero_si256();
      for (int64_t i = 0; i < bs; i += 16) {
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k0 + i), inv));
        __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k0 + i + 8), inv));
        a = _mm256_max_epi32(lo, _mm256_min_epi32(hi, a));
        c = _mm256_max_epi32(lo, _mm256_min_epi32(hi, c));
        sum = _mm256_add_epi32(sum, _mm256_add_epi32(a, c));
        const __m256i p16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xD8);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i),
                         _mm_packs_epi16(_mm256_castsi256_si128(p16), _mm256_extracti128_si256(p16, 1)));
      }
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      xs[r * nb + b] = scale;
      xsum[r * nb + b] = _mm_cvtsi128_si32(s4);
    }
  }
}

namespace v8 {  // the 8-lane vector functions of act_math.inc
using V = __m256;
inline V Set1(float a) { return _mm256_set1_ps(a); }
inline V Add(V a, V b) { return _mm256_add_ps(a, b); }
inline V Sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V Div(V a, V b) { return _mm256_div_ps(a, b); }
inline V Fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V Fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
inline V Min(V a, V b) { return _mm256_min_ps(a, b); }
inline V Max(V a, V b) { return _mm256_max_ps(a, b); }
inline V Round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V Abs(V a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }
inline V SignBlend(V a, V b, V m) { return _mm256_blendv_ps(a, b, m); }
inline V Pow2(V n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#include "act_math.inc"
}  // namespace v8

int64_t ActF(int kind, float thr, const float* v, float* s, int64_t n, int32_t* redo) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 lim = _mm256_set1_ps(80.0f), vthr = _mm256_set1_ps(thr), tol = _mm256_set1_ps(1e-5f * thr);
  int64_t count = 0;
  auto one = [&](__m256 x) {
    switch (kind) {
      case 0: return v8::Act<0>(x);
      case 1: return v8::Act<1>(x);
      case 2: return v8::Act<2>(x);
      default: return v8::Act<3>(x);
    }
  };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(v + i);
    const __m256 a = one(x);
    _mm256_storeu_ps(s + i, a);
    __m256 bad = _mm256_cmp_ps(_mm256_and_ps(x, absmask), lim, _CMP_NLT_UQ);  // |v| >= 80 or NaN
    if (kind != 0)  // (near) zero: the reference's exact zeros are skipped
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(a, absmask), _mm256_set1_ps(1e-30f), _CMP_LT_OQ));
    if (thr > 0.0f)
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(_mm256_sub_ps(_mm256_and_ps(a, absmask), vthr), absmask), tol,
                                            _CMP_LE_OQ));
    int bits = _mm256_movemask_ps(bad);
    while (bits) {
      redo[count++] = static_cast<int32_t>(i + __builtin_ctz(bits));
      bits &= bits - 1;
    }
  }
  for (; i < n; ++i) redo[count++] = static_cast<int32_t>(i);  // the tail: by the reference
  return count;
}

// ------------------------------------------------------------------ input-major light up (NbIm)

// bytes ahead of the codes being read that the input-major kernels prefetch in each kept row
constexpr int64_t kImAhead = 256;

// the end of the neurons a task computes, rounded up to whole groups of 64 (within lpad)
inline int64_t ImEnd(const NbIm& w, int64_t n1) { return std::min(w.lpad, (n1 + 63) / 64 * 64); }

// y[n] += s[b, n] * (acc[n - n0] - z[b, n] * zsum) for n in [n0, n1) (float acc)
inline void ImFinishF(const NbIm& w, int64_t b, float zsum, const float* acc, int64_t n0, int64_t n1, float* y) {
  const float* s = w.sc.data() + b * w.lpad;
  const int8_t* z = w.z.data() + b * w.lpad;
  const __m256 vz = _mm256_set1_ps(zsum);
  int64_t n = n0;
  for (; n + 8 <= n1; n += 8) {
    const __m256 t = _mm256_fnmadd_ps(Z8(z + n), vz, _mm256_loadu_ps(acc + (n - n0)));
    _mm256_storeu_ps(y + n, _mm256_fmadd_ps(_mm256_loadu_ps(s + n), t, _mm256_loadu_ps(y + n)));
  }
  for (; n < n1; ++n) y[n] += s[n] * (acc[n - n0] - static_cast<float>(z[n]) * zsum);
}

// acc[n - n0] += sum over the channels r[0..4) of x[r] * c[r, n], n in [n0, ne) (float)
template <int BITS>
inline void ImSlabF(const NbIm& w, const uint8_t* const* rows, const float* xv, int nr, int64_t n0, int64_t ne,
                    float* acc) {
  __m256 vx[4];
  for (int u = 0; u < 4; ++u) vx[u] = _mm256_set1_ps(u < nr ? xv[u] : 0.0f);
  const uint8_t* r[4];
  for (int u = 0; u < 4; ++u) r[u] = rows[u < nr ? u : 0];
  if (BITS == 8) {
    for (int64_t n = n0; n < ne; n += 8) {
      __m256 a = _mm256_loadu_ps(acc + (n - n0));
      for (int u = 0; u < 4; ++u) {
        const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r[u] + n))));
        a = _mm256_fmadd_ps(c, vx[u], a);
      }
      _mm256_storeu_ps(acc + (n - n0), a);
    }
    return;
  }
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int64_t n = n0; n < ne; n += 64) {
    __m256i lo[4], hi[4];
    for (int u = 0; u < 4; ++u) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r[u] + n / 2));
      lo[u] = _mm256_and_si256(v, m4);
      hi[u] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    }
    for (int g = 0; g < 8; ++g) {  // neurons n + 8g .. n + 8g + 7
      float* ap = acc + (n - n0) + 8 * g;
      __m256 a = _mm256_loadu_ps(ap);
      for (int u = 0; u < 4; ++u) {
        const __m256i src = g < 4 ? lo[u] : hi[u];
        const int part = g & 3;  // 8 bytes at 8 * part
        const __m128i h = part < 2 ? _mm256_castsi256_si128(src) : _mm256_extracti128_si256(src, 1);
        const __m128i e = (part & 1) ? _mm_srli_si128(h, 8) : h;
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(e)), vx[u], a);
      }
      _mm256_storeu_ps(ap, a);
    }
  }
}

void ImF(const NbIm& w, const float* x, const int32_t* ks, int64_t cnt, int64_t n0, int64_t n1, float* acc, float* y) {
  const int64_t ne = ImEnd(w, n1);
  for (int64_t i = 0; i < cnt;) {
    const int64_t b = ks[i] / w.bs;
    std::fill(acc, acc + (ne - n0), 0.0f);
    float xsum = 0.0f;
    while (i < cnt && ks[i] / w.bs == b) {
      const uint8_t* rows[4];
      float xv[4];
      int nr = 0;
      for (; nr < 4 && i < cnt && ks[i] / w.bs == b; ++i, ++nr) {
        rows[nr] = w.Row(ks[i]);
        xv[nr] = x[ks[i]];
        xsum += xv[nr];
      }
      if (w.bits == 8)
        ImSlabF<8>(w, rows, xv, nr, n0, ne, acc);
      else
        ImSlabF<4>(w, rows, xv, nr, n0, ne, acc);
    }
    ImFinishF(w, b, xsum, acc, n0, n1, y);
  }
}

// acc[n - n0] (int32) += sum over the channel pairs of q1 * c[r1, n] + q2 * c[r2, n], n in [n0, ne);
// np pairs (<= 8; a missing partner has q = 0 and repeats the row)
template <int BITS>
inline void ImPairs(const uint8_t* const* rows, const int8_t* qs, int np, int64_t n0, int64_t ne, int32_t* acc) {
  __m256i qq[8];
  for (int k = 0; k < np; ++k) {
    if (BITS == 4)  // (q1, q2) byte pairs for maddubs (unsigned codes x signed q)
      qq[k] = _mm256_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(static_cast<uint8_t>(qs[2 * k])) |
                                                     (static_cast<uint16_t>(static_cast<uint8_t>(qs[2 * k + 1])) << 8)));
    else  // int16 pairs for madd
      qq[k] = _mm256_set1_epi32(static_cast<int32_t>((static_cast<uint32_t>(qs[2 * k]) & 0xFFFF) |
                                                     (static_cast<uint32_t>(qs[2 * k + 1]) << 16)));
  }
  if (BITS == 4) {
    // per 64 neurons: lo nibbles = neurons 0..31, hi = 32..63; unpacks within 128-bit lanes pair the
    // two channels' codes of neurons {0..7 | 16..23}, {8..15 | 24..31} (and + 32 for hi); int16 sums
    // <= 8 pairs * 2 * 15 * 127 < 2^15
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t n = n0; n < ne; n += 64) {
      if ((n / 2) % 64 == 0)  // once per cache line of the rows: kImAhead bytes further
        for (int k = 0; k < 2 * np; ++k)
          _mm_prefetch(reinterpret_cast<const char*>(rows[k] + n / 2 + kImAhead), _MM_HINT_T0);
      __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
      for (int k = 0; k < np; ++k) {
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[2 * k] + n / 2));
        const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[2 * k + 1] + n / 2));
        const __m256i lo1 = _mm256_and_si256(v1, m4), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
        const __m256i lo2 = _mm256_and_si256(v2, m4), hi2 = _mm256_and_si256(_mm256_srli_epi16(v2, 4), m4);
        s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(lo1, lo2), qq[k]));
        s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(lo1, lo2), qq[k]));
        s2 = _mm256_add_epi16(s2, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(hi1, hi2), qq[k]));
        s3 = _mm256_add_epi16(s3, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(hi1, hi2), qq[k]));
      }
      int32_t* a = acc + (n - n0);
      // (vector, first neuron of its low lane; the high lane's is + 16)
      const __m256i* parts[4] = {&s0, &s1, &s2, &s3};
      const int first[4] = {0, 8, 32, 40};
      for (int g = 0; g < 4; ++g) {
        __m256i* lo = reinterpret_cast<__m256i*>(a + first[g]);
        __m256i* hi = reinterpret_cast<__m256i*>(a + first[g] + 16);
        _mm256_storeu_si256(lo, _mm256_add_epi32(_mm256_loadu_si256(lo), _mm256_cvtepi16_epi32(_mm256_castsi256_si128(*parts[g]))));
        _mm256_storeu_si256(hi, _mm256_add_epi32(_mm256_loadu_si256(hi), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(*parts[g], 1))));
      }
    }
    return;
  }
  for (int64_t n = n0; n < ne; n += 16) {
    if (n % 64 == 0)
      for (int k = 0; k < 2 * np; ++k)
        _mm_prefetch(reinterpret_cast<const char*>(rows[k] + n + kImAhead), _MM_HINT_T0);
    __m256i s0 = _mm256_setzero_si256(), s1 = s0;
    for (int k = 0; k < np; ++k) {
      const __m128i a1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[2 * k] + n));
      const __m128i a2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[2 * k + 1] + n));
      s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a1, a2)), qq[k]));
      s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpackhi_epi8(a1, a2)), qq[k]));
    }
    __m256i* ac = reinterpret_cast<__m256i*>(acc + (n - n0));
    _mm256_storeu_si256(ac, _mm256_add_epi32(_mm256_loadu_si256(ac), s0));
    _mm256_storeu_si256(ac + 1, _mm256_add_epi32(_mm256_loadu_si256(ac + 1), s1));
  }
}

}  // namespace

void NbImQWith(const NbPairs& pk, const NbIm& w, const int8_t* q, const float* xs, const int32_t* xsum,
               const int32_t* ks, int64_t cnt, int64_t n0, int64_t n1, int32_t* acc, float* y) {
  const int64_t ne = ImEnd(w, n1);
  for (int64_t i = 0; i < cnt;) {
    const int64_t b = ks[i] / w.bs;
    std::fill(acc, acc + (ne - n0), 0);
    const uint8_t* rows[16];
    int8_t qs[16];
    int nr = 0;
    auto flush = [&]() {
      if (nr & 1) {
        rows[nr] = rows[nr - 1];
        qs[nr] = 0;
        ++nr;
      }
      if (w.bits == 4)
        pk.im4(rows, qs, nr / 2, n0, ne, acc);
      else
        pk.im8(rows, qs, nr / 2, n0, ne, acc);
      nr = 0;
    };
    for (; i < cnt && ks[i] / w.bs == b; ++i) {
      const int8_t qv = q[ks[i]];
      if (!qv) continue;  // a zero code contributes nothing: its row is not read either
      rows[nr] = w.Row(ks[i]);
      qs[nr] = qv;
      if (++nr == 16) flush();
    }
    if (nr) flush();
    const float* s = w.sc.data() + b * w.lpad;
    const int8_t* z = w.z.data() + b * w.lpad;
    const __m256 vs = _mm256_set1_ps(xs[b]);
    const __m256i vq = _mm256_set1_epi32(xsum[b]);
    int64_t n = n0;
    for (; n + 8 <= n1; n += 8) {
      const __m256i zi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z + n)));
      const __m256i t = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + (n - n0))),
                                         _mm256_mullo_epi32(zi, vq));
      _mm256_storeu_ps(y + n, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(s + n), vs), _mm256_cvtepi32_ps(t),
                                              _mm256_loadu_ps(y + n)));
    }
    for (; n < n1; ++n) y[n] += s[n] * xs[b] * static_cast<float>(acc[n - n0] - z[n] * xsum[b]);
  }
}

const NbPairs& NbPairsAvx2() {
  static const NbPairs k{ImPairs<4>, ImPairs<8>, PairsSlab<4>, PairsSlab<8>};
  return k;
}

namespace {

void DownQ(const NbDown& w, const int8_t* qa, const float* sa, const int32_t* list, int64_t count, int64_t d0,
           int64_t d1, int32_t* acc, float* y) {
  NbDownQWith(NbPairsAvx2(), w, qa, sa, list, count, d0, d1, acc, y);
}

void ImQ(const NbIm& w, const int8_t* q, const float* xs, const int32_t* xsum, const int32_t* ks, int64_t cnt,
         int64_t n0, int64_t n1, int32_t* acc, float* y) {
  NbImQWith(NbPairsAvx2(), w, q, xs, xsum, ks, cnt, n0, n1, acc, y);
}

}  // namespace

const NbKernels& NbKernelsAvx2() {
  static const NbKernels k{DotF, DotQ, DownF, DownQ, Quant, ActF, ImF, ImQ};
  return k;
}

}  // namespace ffsplit
