// SparseMatMulInt4: the work split over ORT's intra-op pool, the scalar path and the contract's
// float64 recomputation of non-finite outputs.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "packed.h"

namespace ffsplit {
namespace {

// code i of a row whose codes start at nib (byte aligned)
inline int Code(const uint8_t* nib, int64_t i) {
  const int u = (nib[i >> 1] >> (4 * (i & 1))) & 0x0F;
  return (u ^ 8) - 8;
}

// One output in float64 by the op contract (ffsplit_export/ops/_spec.py SEMANTICS): the sum over
// the row's non-zero codes of x * code * (its group's scale), IEEE NaN / inf propagation, no
// intermediate overflow.
float ExactOne4(const Packed4& p, const float* xr, int64_t n) {
  const uint64_t* mrow = p.mask.data() + n * p.words;
  const uint8_t* nib = p.nib.data() + p.nib_off[static_cast<size_t>(n)];
  const float* sc = p.scales.data() + p.group_ptr[static_cast<size_t>(n)];
  int64_t vi = 0;
  double acc = 0.0;
  for (int64_t w = 0; w < p.words; ++w) {
    uint64_t bits = mrow[w];
    while (bits) {
      const int64_t col = w * 64 + __builtin_ctzll(bits);
      bits &= bits - 1;
      const int c = Code(nib, vi);
      if (c != 0) acc += static_cast<double>(xr[col]) * (c * static_cast<double>(sc[vi / p.group_size]));
      ++vi;
    }
  }
  return static_cast<float>(acc);
}

bool NonFinite(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return (u & 0x7f800000u) == 0x7f800000u;
}

void FixNonFinite4(const Packed4& p, const float* x, float* y, int64_t k, int64_t m, int64_t n0, int64_t n1) {
  for (int64_t r = 0; r < m; ++r) {
    float* yr = y + r * p.n;
    for (int64_t n = n0; n < n1; ++n)
      if (NonFinite(yr[n])) yr[n] = ExactOne4(p, x + r * k, n);
  }
}

struct Job4 {
  const Packed4* p;
  const float* x;
  float* y;
  int64_t m, k, rows_per_task;
  Isa isa;
};

void RunRows4(void* data, size_t task) {
  const Job4& j = *static_cast<const Job4*>(data);
  const int64_t n0 = static_cast<int64_t>(task) * j.rows_per_task;
  const int64_t n1 = std::min(j.p->n, n0 + j.rows_per_task);
  if (j.isa == Isa::kScalar)
    scalar::RowsInt4(*j.p, j.x, j.y, j.m, j.k, n0, n1);
  else
    avx2::RowDotInt4(*j.p, j.x, j.y, j.m, j.k, n0, n1);  // every ISA above scalar has AVX2
  FixNonFinite4(*j.p, j.x, j.y, j.k, j.m, n0, n1);
}

}  // namespace

void MatMulInt4(const Packed4& p, const float* x, float* y, int64_t m, int64_t k, Isa isa, const Parallel& par) {
  Job4 job{&p, x, y, m, k, 16, isa};
  const int64_t tasks = (p.n + job.rows_per_task - 1) / job.rows_per_task;
  par.For(static_cast<size_t>(tasks), RunRows4, &job);
}

namespace scalar {

void RowsInt4(const Packed4& p, const float* x, float* y, int64_t m, int64_t k, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint64_t* mrow = p.mask.data() + n * p.words;
    const uint8_t* nib = p.nib.data() + p.nib_off[static_cast<size_t>(n)];
    const float* sc = p.scales.data() + p.group_ptr[static_cast<size_t>(n)];
    for (int64_t r = 0; r < m; ++r) {
      const float* xr = x + r * k;
      float acc = 0.0f, gacc = 0.0f;
      int64_t vi = 0, left = p.group_size;
      const float* s = sc;
      for (int64_t w = 0; w < p.words; ++w) {
        uint64_t bits = mrow[w];
        while (bits) {
          const int64_t col = w * 64 + __builtin_ctzll(bits);
          bits &= bits - 1;
          gacc += xr[col] * static_cast<float>(Code(nib, vi));
          ++vi;
          if (--left == 0) {  // group complete: scale its sum
            acc += gacc * *s++;
            gacc = 0.0f;
            left = p.group_size;
          }
        }
      }
      if (left != p.group_size) acc += gacc * *s;
      y[r * p.n + n] = acc;
    }
  }
}

}  // namespace scalar
}  // namespace ffsplit
