// ISA selection and the work split of MatMul over ORT's intra-op thread pool.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "packed.h"

namespace ffsplit {

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Vbmi2: return "avx512vbmi2";
    case Isa::kAvx512Vnni: return "avx512vnni";
  }
  return "?";
}

bool IsaSupported(Isa isa) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return avx2;
    case Isa::kAvx512: return avx512;
    case Isa::kAvx512Vbmi2: return avx512 && __builtin_cpu_supports("avx512vbmi2");
    case Isa::kAvx512Vnni:
      return avx512 && __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512vnni");
  }
  return false;
}

Isa SelectIsa(bool int8_activations) {
  const char* env = std::getenv("FFSPLIT_ISA");
  std::string want = env ? env : "";
  if (want.empty() || want == "auto") {
    // int8 activations only where the op allows it (accuracy_level 4), else the best exact path
    if (int8_activations && IsaSupported(Isa::kAvx512Vnni)) return Isa::kAvx512Vnni;
    for (Isa isa : {Isa::kAvx512Vbmi2, Isa::kAvx512, Isa::kAvx2})
      if (IsaSupported(isa)) return isa;
    return Isa::kScalar;
  }
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Vbmi2, Isa::kAvx512Vnni}) {
    if (want == IsaName(isa)) {
      if (!IsaSupported(isa))
        throw std::invalid_argument("FFSPLIT_ISA=" + want +
                                    " is not supported by this CPU; unset it or use scalar|avx2|avx512|"
                                    "avx512vbmi2|avx512vnni|auto");
      return isa;
    }
  }
  throw std::invalid_argument("unknown FFSPLIT_ISA=" + want +
                              "; use one of scalar, avx2, avx512, avx512vbmi2, avx512vnni, auto");
}

namespace {

constexpr int64_t kRowDotMaxM = 16;  // below: row-dot (weights decoded once, reused by <= 4 rows of X)
constexpr int64_t kMaxMBlock = 64;    // outer product: columns of X per block (4 zmm accumulators)
constexpr int64_t kGemmI8MinM = 16;   // int8 activations: dense-tile VNNI GEMM from this M

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
std::unique_ptr<T[], AlignedFree> AlignedAlloc(size_t count) {
  const size_t bytes = std::max<size_t>(64, (count * sizeof(T) + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  return std::unique_ptr<T[], AlignedFree>(static_cast<T*>(p));
}

struct Job {
  const Packed* p;
  const float* x;
  float* y;
  int64_t m, k, rows_per_task, row_tasks;
  Isa isa;
  // outer product
  const float* xt;
  int64_t mblk, mbp;
  // vnni
  const uint8_t* xq;
  const float* xs;
  int64_t kpad;
};

// One output in float64, the op contract's semantics (ffsplit_export/ops/_spec.py): the sum over
// the row's non-zero weights of x * w, w = code * scale (int8) or the value (fp32), with IEEE
// NaN / inf propagation and no intermediate overflow (float32 products and sums fit in a double).
float ExactOne(const Packed& p, const float* xr, int64_t n) {
  const uint64_t* mrow = p.mask.data() + (n * p.words);
  int64_t vi = p.row_ptr[static_cast<size_t>(n)];
  const double s = p.scales[static_cast<size_t>(n)];
  double acc = 0.0;
  for (int64_t w = 0; w < p.words; ++w) {
    uint64_t bits = mrow[w];
    while (bits) {
      const int64_t col = w * 64 + __builtin_ctzll(bits);
      bits &= bits - 1;
      const double v = p.int8 ? static_cast<double>(p.values_i8[static_cast<size_t>(vi)]) * s
                              : static_cast<double>(p.values_f32[static_cast<size_t>(vi)]);
      acc += static_cast<double>(xr[col]) * v;
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

// The fast kernels accumulate in float32 (int8 ops: x * code, scaled at the end) and may skip or
// not skip structural zeros (a whole-word load multiplies 0 by X); their result is exact in
// kind (finite or not) except where X holds NaN / inf or a float32 sum overflows. So every
// non-finite output is recomputed in float64 by the contract: a NaN or inf then comes out only
// where a non-zero weight meets it (or a scale / value is non-finite, or the exact sum
// overflows float32). Free on the hot path: one pass over the task's outputs, in cache.
void FixNonFinite(const Packed& p, const float* x, float* y, int64_t k, int64_t m0, int64_t m1, int64_t n0,
                  int64_t n1) {
  for (int64_t r = m0; r < m1; ++r) {
    float* yr = y + r * p.n;
    bool any = false;
    for (int64_t n = n0; n < n1; ++n) any |= NonFinite(yr[n]);
    if (!any) continue;
    for (int64_t n = n0; n < n1; ++n)
      if (NonFinite(yr[n])) yr[n] = ExactOne(p, x + r * k, n);
  }
}

// Rows of X holding a NaN or inf get a NaN activation scale on the int8-activation path, so that
// all their outputs are recomputed by FixNonFinite instead of being quantized (NaN would become 0).
void MarkNonFiniteRows(const float* x, int64_t m, int64_t k, float* xs) {
  for (int64_t r = 0; r < m; ++r) {
    const uint32_t* xr = reinterpret_cast<const uint32_t*>(x + r * k);
    uint32_t bad = 0;
    for (int64_t i = 0; i < k; ++i) bad |= (xr[i] & 0x7f800000u) == 0x7f800000u;
    if (bad) xs[r] = std::numeric_limits<float>::quiet_NaN();
  }
}

void RunRowDot(void* data, size_t task) {
  const Job& j = *static_cast<const Job*>(data);
  const int64_t n0 = static_cast<int64_t>(task) * j.rows_per_task;
  const int64_t n1 = std::min(j.p->n, n0 + j.rows_per_task);
  switch (j.isa) {
    case Isa::kAvx512Vnni:
      if (j.xq)
        avx512vnni::RowDot(*j.p, j.xq, j.xs, j.kpad, j.y, j.m, n0, n1);
      else
        avx512vbmi2::RowDot(*j.p, j.x, j.y, j.m, j.k, n0, n1);
      break;
    case Isa::kAvx512Vbmi2: avx512vbmi2::RowDot(*j.p, j.x, j.y, j.m, j.k, n0, n1); break;
    case Isa::kAvx512: avx512::RowDot(*j.p, j.x, j.y, j.m, j.k, n0, n1); break;
    case Isa::kAvx2: avx2::RowDot(*j.p, j.x, j.y, j.m, j.k, n0, n1); break;
    default: scalar::Rows(*j.p, j.x, j.y, j.m, j.k, n0, n1); break;
  }
  FixNonFinite(*j.p, j.x, j.y, j.k, 0, j.m, n0, n1);
}

void RunGemmI8(void* data, size_t task) {
  const Job& j = *static_cast<const Job*>(data);
  const int64_t n0 = static_cast<int64_t>(task) * j.rows_per_task;
  const int64_t n1 = std::min(j.p->n, n0 + j.rows_per_task);
  avx512vnni::Gemm(*j.p, j.xq, j.xs, j.kpad, j.y, 0, j.m, j.mbp, n0, n1);
  FixNonFinite(*j.p, j.x, j.y, j.k, 0, j.m, n0, n1);
}

void RunOuter(void* data, size_t task) {
  const Job& j = *static_cast<const Job*>(data);
  const int64_t b = static_cast<int64_t>(task) / j.row_tasks;
  const int64_t rt = static_cast<int64_t>(task) % j.row_tasks;
  const int64_t n0 = rt * j.rows_per_task;
  const int64_t n1 = std::min(j.p->n, n0 + j.rows_per_task);
  const int64_t m0 = b * j.mblk;
  const int64_t mb = std::min(j.mblk, j.m - m0);
  const float* xt = j.xt + b * j.k * j.mbp;
  if (j.isa == Isa::kAvx2)
    avx2::Outer(*j.p, xt, j.y, j.mbp, m0, mb, j.k, n0, n1);
  else
    avx512::Outer(*j.p, xt, j.y, j.mbp, m0, mb, j.k, n0, n1);
  FixNonFinite(*j.p, j.x, j.y, j.k, m0, m0 + mb, n0, n1);
}

}  // namespace

void MatMul(const Packed& p, const float* x, float* y, int64_t m, int64_t k, Isa isa, const Parallel& par) {
  Job job{};
  job.p = &p;
  job.x = x;
  job.y = y;
  job.m = m;
  job.k = k;
  job.isa = isa;
  // int32 sums cannot overflow; K = 0 (an empty sum, y = 0) takes the float paths
  const bool int8_act = isa == Isa::kAvx512Vnni && p.int8 && k > 0 && k <= 65536;
  if (int8_act && m >= kGemmI8MinM) {
    // int8 activations, larger M: X quantized per row, transposed by dwords ([k/4][mbp][4]), and
    // multiplied with dense-decoded tiles of W (weights decoded once per call)
    job.kpad = p.words * 64;
    job.mbp = (m + 15) / 16 * 16;
    auto xq = AlignedAlloc<uint8_t>(static_cast<size_t>(m * job.kpad));
    std::vector<float> xs(static_cast<size_t>(m));
    avx512vnni::Quantize(x, m, k, job.kpad, xq.get(), xs.data());
    MarkNonFiniteRows(x, m, k, xs.data());
    auto xt = AlignedAlloc<uint8_t>(static_cast<size_t>(job.kpad * job.mbp));
    const int64_t kq = job.kpad / 4;
    uint32_t* dst = reinterpret_cast<uint32_t*>(xt.get());
    for (int64_t r = 0; r < job.mbp; ++r) {
      if (r < m) {
        const uint8_t* src = xq.get() + r * job.kpad;
        for (int64_t q = 0; q < kq; ++q) std::memcpy(dst + q * job.mbp + r, src + 4 * q, 4);
      } else {
        for (int64_t q = 0; q < kq; ++q) dst[q * job.mbp + r] = 0x80808080u;
      }
    }
    job.xq = xt.get();
    job.xs = xs.data();
    job.rows_per_task = 48;
    const int64_t tasks = (p.n + job.rows_per_task - 1) / job.rows_per_task;
    par.For(static_cast<size_t>(tasks), RunGemmI8, &job);
    return;
  }
  if (isa == Isa::kScalar || m < kRowDotMaxM) {
    std::unique_ptr<uint8_t[], AlignedFree> xq;
    std::vector<float> xs;
    if (int8_act) {
      // per-row symmetric scale, uint8 codes with zero point 128; padded to whole mask words
      job.kpad = p.words * 64;
      xq = AlignedAlloc<uint8_t>(static_cast<size_t>(m * job.kpad));
      xs.resize(static_cast<size_t>(m));
      avx512vnni::Quantize(x, m, k, job.kpad, xq.get(), xs.data());
      MarkNonFiniteRows(x, m, k, xs.data());
      job.xq = xq.get();
      job.xs = xs.data();
    }
    job.rows_per_task = 16;
    const int64_t tasks = (p.n + job.rows_per_task - 1) / job.rows_per_task;
    par.For(static_cast<size_t>(tasks), RunRowDot, &job);
    return;
  }
  // outer product: X transposed per block of columns, zero padded to 16
  const int64_t nblk = (m + kMaxMBlock - 1) / kMaxMBlock;
  job.mblk = (m + nblk - 1) / nblk;
  job.mbp = (job.mblk + 15) / 16 * 16;
  auto xt = AlignedAlloc<float>(static_cast<size_t>(nblk * k * job.mbp));
  for (int64_t b = 0; b < nblk; ++b) {
    float* xb = xt.get() + b * k * job.mbp;
    const int64_t m0 = b * job.mblk, mb = std::min(job.mblk, m - m0);
    for (int64_t kk = 0; kk < k; ++kk) {
      float* row = xb + kk * job.mbp;
      for (int64_t i = 0; i < mb; ++i) row[i] = x[(m0 + i) * k + kk];
      for (int64_t i = mb; i < job.mbp; ++i) row[i] = 0.0f;
    }
  }
  job.xt = xt.get();
  job.rows_per_task = p.n >= 512 ? 64 : 16;
  job.row_tasks = (p.n + job.rows_per_task - 1) / job.rows_per_task;
  par.For(static_cast<size_t>(nblk * job.row_tasks), RunOuter, &job);
}

namespace scalar {

// Portable reference path: per output element, walk the row's set bits.
void Rows(const Packed& p, const float* x, float* y, int64_t m, int64_t k, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint64_t* mrow = p.mask.data() + (n * p.words);
    const int64_t v0 = p.row_ptr[static_cast<size_t>(n)];
    const float scale = p.scales[static_cast<size_t>(n)];
    for (int64_t r = 0; r < m; ++r) {
      const float* xr = x + r * k;
      float acc = 0.0f;
      int64_t vi = v0;
      for (int64_t w = 0; w < p.words; ++w) {
        uint64_t bits = mrow[w];
        while (bits) {
          const int64_t col = w * 64 + __builtin_ctzll(bits);
          bits &= bits - 1;
          const float v = p.int8 ? static_cast<float>(p.values_i8[static_cast<size_t>(vi)])
                                 : p.values_f32[static_cast<size_t>(vi)];
          acc += xr[col] * v;
          ++vi;
        }
      }
      y[r * p.n + n] = acc * scale;
    }
  }
}

}  // namespace scalar
}  // namespace ffsplit
