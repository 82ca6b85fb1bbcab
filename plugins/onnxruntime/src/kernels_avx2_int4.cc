// AVX2 + FMA row-dot of SparseMatMulInt4 (exact float32 path). Per mask byte (8 columns): the
// next 8 codes of the nibble stream are split into bytes, moved to their set lanes with a pshufb
// table (offset by one for an odd start), sign-extended and multiplied by a per-lane scale (the
// current group's, or the next group's for the lanes past a group boundary: at most one boundary
// per byte since group_size >= 8). Up to 4 rows of X share each decoded byte.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "packed.h"

namespace ffsplit {
namespace avx2 {
namespace {

struct Tables4 {
  alignas(16) uint8_t shuf[256][16];  // lane i <- rank of bit i among the set bits (0x80: not set)
  alignas(32) int32_t rank[256][8];   // rank of bit i among the set bits (-1: not set)
  alignas(32) int32_t lane[256][8];   // -1 where the bit is set
  Tables4() {
    for (int b = 0; b < 256; ++b) {
      int c = 0;
      std::memset(shuf[b], 0x80, 16);
      for (int i = 0; i < 8; ++i) {
        const bool set = (b >> i) & 1;
        shuf[b][i] = set ? static_cast<uint8_t>(c) : 0x80;
        rank[b][i] = set ? c : -1;
        lane[b][i] = set ? -1 : 0;
        c += set;
      }
    }
  }
};
const Tables4& T4() {
  static const Tables4 t;
  return t;
}
using T4Lane = Tables4;
const T4Lane& T4L() { return T4(); }

template <int MR>
void Rows(const Packed4& p, const float* x, float* y, int64_t k, int64_t mg, int64_t n0, int64_t n1) {
  const Tables4& t = T4();
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i eight = _mm_set1_epi8(8);
  const int64_t gs = p.group_size;
  for (int64_t n = n0; n < n1; ++n) {
    const uint64_t* mrow = p.mask.data() + n * p.words;
    int64_t cur = 2 * p.nib_off[n];  // code index in the nibble stream (rows start at a byte)
    const float* sc = p.scales.data() + p.group_ptr[n];
    int64_t nb = gs;  // codes of this row before the next group starts
    int64_t rel = 0;  // codes of this row so far
    __m256 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t wi = 0; wi < p.words; ++wi) {
      uint64_t bits = mrow[wi];
      if (!bits) continue;
      // unrolled: acc[r][j & 1] stays in registers (a run-time index put them on the stack)
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j, bits >>= 8) {
        const unsigned b = bits & 0xFF;
        if (!b) continue;
        const int pc = __builtin_popcount(b);
        // 8 bytes = 16 codes from code (cur & ~1); the stream carries 16 bytes of padding
        const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.nib.data() + (cur >> 1)));
        const __m128i lo = _mm_and_si128(v, low4);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
        const __m128i codes = _mm_unpacklo_epi8(lo, hi);
        const __m128i idx = _mm_add_epi8(_mm_load_si128(reinterpret_cast<const __m128i*>(t.shuf[b])),
                                         _mm_set1_epi8(static_cast<char>(cur & 1)));
        __m128i e = _mm_shuffle_epi8(codes, idx);         // unset lanes: 0 (index >= 0x80)
        e = _mm_sub_epi8(_mm_xor_si128(e, eight), eight);  // sign-extend the 4-bit codes
        __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(e));
        __m256 s = _mm256_broadcast_ss(sc);
        if (rel + pc > nb) {  // lanes of rank >= nb - rel belong to the next group
          const __m256i rk = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.rank[b]));
          const __m256i next = _mm256_cmpgt_epi32(rk, _mm256_set1_epi32(static_cast<int>(nb - rel - 1)));
          s = _mm256_blendv_ps(s, _mm256_broadcast_ss(sc + 1), _mm256_castsi256_ps(next));
        }
        w = _mm256_mul_ps(w, s);
        cur += pc;
        rel += pc;
        if (rel >= nb) {
          ++sc;
          nb += gs;
        }
        const __m256i lm = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.lane[b]));
        for (int r = 0; r < MR; ++r) {
          const float* xr = x + (mg + r) * k + wi * 64 + j * 8;
          const __m256 xv = _mm256_maskload_ps(xr, lm);  // masked lanes are not read: nothing past K
          acc[r][j & 1] = _mm256_fmadd_ps(w, xv, acc[r][j & 1]);
        }
      }
    }
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_add_ps(acc[r][0], acc[r][1]);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      y[(mg + r) * p.n + n] = _mm_cvtss_f32(h);
    }
  }
}

struct TablesC {
  alignas(32) int32_t perm[256][8];  // vpermps: the set lanes of b first, in order
  TablesC() {
    for (int b = 0; b < 256; ++b) {
      int c = 0;
      for (int i = 0; i < 8; ++i) perm[b][i] = 0;
      for (int i = 0; i < 8; ++i)
        if ((b >> i) & 1) perm[b][c++] = i;
    }
  }
};
const TablesC& TC() {
  static const TablesC t;
  return t;
}

// 8 codes of a row (4 bytes, low nibble first) as floats
inline __m256 Decode8(const uint8_t* src) {
  int32_t raw;
  std::memcpy(&raw, src, 4);
  const __m128i dup = _mm_shuffle_epi8(_mm_cvtsi32_si128(raw), _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1,
                                                                             -1, -1, -1, -1));
  const __m256i e = _mm256_cvtepu8_epi32(dup);
  const __m256i top = _mm256_sllv_epi32(e, _mm256_setr_epi32(28, 24, 28, 24, 28, 24, 28, 24));
  return _mm256_cvtepi32_ps(_mm256_srai_epi32(top, 28));
}

// One row of X at a time (decode, M < 4): the row's kept activations are first compressed into a
// contiguous buffer (vpermps by mask byte), then multiplied with the codes 8 at a time, one scale
// per group of group_size (a multiple of 8) codes. No per-lane scale and no data-dependent branch.
void CompressRows(const Packed4& p, const float* xr, float* yr, int64_t k, int64_t n0, int64_t n1, float* buf) {
  const TablesC& t = TC();
  const T4Lane& tl = T4L();
  const int64_t chunks_per_group = p.group_size / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint64_t* mrow = p.mask.data() + n * p.words;
    int64_t rel = 0;
    for (int64_t wi = 0; wi < p.words; ++wi) {
      uint64_t bits = mrow[wi];
      if (!bits) continue;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j, bits >>= 8) {
        const unsigned b = bits & 0xFF;
        const int64_t col = wi * 64 + j * 8;
        const __m256 xv =
            col + 8 <= k ? _mm256_loadu_ps(xr + col)
                         : _mm256_maskload_ps(xr + col, _mm256_load_si256(reinterpret_cast<const __m256i*>(tl.lane[b])));
        const __m256 c = _mm256_permutevar8x32_ps(xv, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.perm[b])));
        _mm256_storeu_ps(buf + rel, c);
        rel += __builtin_popcount(b);
      }
    }
    _mm256_storeu_ps(buf + rel, _mm256_setzero_ps());  // the padded codes past the row's end meet zeros
    const int64_t chunks = (rel + 7) / 8;
    const uint8_t* codes = p.nib.data() + p.nib_off[n];
    const float* sc = p.scales.data() + p.group_ptr[n];
    __m256 total = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++sc) {
      const int64_t cend = std::min(chunks, c + chunks_per_group);
      __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
      for (; c + 1 < cend; c += 2) {
        sum0 = _mm256_fmadd_ps(Decode8(codes + 4 * c), _mm256_loadu_ps(buf + 8 * c), sum0);
        sum1 = _mm256_fmadd_ps(Decode8(codes + 4 * c + 4), _mm256_loadu_ps(buf + 8 * c + 8), sum1);
      }
      if (c < cend) {
        sum0 = _mm256_fmadd_ps(Decode8(codes + 4 * c), _mm256_loadu_ps(buf + 8 * c), sum0);
        ++c;
      }
      total = _mm256_fmadd_ps(_mm256_add_ps(sum0, sum1), _mm256_broadcast_ss(sc), total);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    yr[n] = _mm_cvtss_f32(h);
  }
}

}  // namespace

void RowDotInt4(const Packed4& p, const float* x, float* y, int64_t m, int64_t k, int64_t n0, int64_t n1) {
  if (m < 4 && p.group_size % 8 == 0) {
    thread_local std::vector<float> buf;
    if (buf.size() < static_cast<size_t>(p.words * 64 + 16)) buf.resize(static_cast<size_t>(p.words * 64 + 16));
    for (int64_t r = 0; r < m; ++r) CompressRows(p, x + r * k, y + r * p.n, k, n0, n1, buf.data());
    return;
  }
  int64_t mg = 0;
  for (; mg + 4 <= m; mg += 4) Rows<4>(p, x, y, k, mg, n0, n1);
  switch (m - mg) {
    case 3: Rows<3>(p, x, y, k, mg, n0, n1); break;
    case 2: Rows<2>(p, x, y, k, mg, n0, n1); break;
    case 1: Rows<1>(p, x, y, k, mg, n0, n1); break;
    default: break;
  }
}

}  // namespace avx2
}  // namespace ffsplit
