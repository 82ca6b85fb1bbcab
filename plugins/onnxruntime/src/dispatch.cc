// ISA selection and the work split of MatMul over ORT's intra-op thread pool.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
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

Isa SelectIsa() {
  const char* env = std::getenv("FFSPLIT_ISA");
  std::string want = env ? env : "";
  if (want.empty() || want == "auto") {
    // best exact-fp32 path; the int8-activation VNNI path is opt-in only
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

struct Job {
  const Packed* p;
  const float* x;
  float* y;
  int64_t m, k, rows_per_task;
  Isa isa;
};

void RunScalar(void* data, size_t task) {
  const Job& j = *static_cast<const Job*>(data);
  const int64_t n0 = static_cast<int64_t>(task) * j.rows_per_task;
  const int64_t n1 = std::min(j.p->n, n0 + j.rows_per_task);
  scalar::Rows(*j.p, j.x, j.y, j.m, j.k, n0, n1);
}

}  // namespace

void MatMul(const Packed& p, const float* x, float* y, int64_t m, int64_t k, Isa isa, const Parallel& par) {
  Job job{&p, x, y, m, k, 16, isa};
  const int64_t tasks = (p.n + job.rows_per_task - 1) / job.rows_per_task;
  par.For(static_cast<size_t>(tasks), RunScalar, &job);
}

namespace scalar {

// Portable reference path: per output element, walk the row's set bits.
void Rows(const Packed& p, const float* x, float* y, int64_t m, int64_t k, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint64_t* mrow = &p.mask[static_cast<size_t>(n * p.words)];
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
