// Internal pre-packed weight layout shared by all three ffsplit ops, and the kernel entry points.
//
// Every op's weight W[N, K] is converted once (at session creation) into the same layout:
//   mask    uint64 [N, words]  bit (k % 64) of word k / 64 set where W[n, k] != 0 (stored zeros dropped)
//   values  int8 or float [nnz] + 64 bytes of zero padding, row after row, by column
//   row_ptr int64 [N + 1]
//   scales  float [N] (1 for the fp32 op)
// Bitmask and 2:4 weights both map onto it: a 2:4 group is a nibble of mask bits.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include <sys/mman.h>

namespace ffsplit {

// Allocator of the streamed weight arrays: blocks of 2 MiB and more are 2 MiB aligned and advised
// as transparent huge pages (THP is often "madvise" only), so that decoding from DRAM takes fewer
// TLB misses and the prefetches run across 4 KiB boundaries without page walks.
template <typename T>
struct HugeAlloc {
  using value_type = T;
  HugeAlloc() = default;
  template <typename U>
  HugeAlloc(const HugeAlloc<U>&) {}
  T* allocate(size_t n) {
    const size_t bytes = n * sizeof(T);
    constexpr size_t kHuge = size_t{2} << 20;
    if (bytes < kHuge) {
      if (void* p = std::malloc(bytes ? bytes : 1)) return static_cast<T*>(p);
      throw std::bad_alloc();
    }
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = std::aligned_alloc(kHuge, rounded);
    if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(p, rounded, MADV_HUGEPAGE);  // advisory: failure only costs speed
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const HugeAlloc<U>&) const { return true; }
  template <typename U>
  bool operator!=(const HugeAlloc<U>&) const { return false; }
};
template <typename T>
using HugeVec = std::vector<T, HugeAlloc<T>>;

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vbmi2 = 3, kAvx512Vnni = 4 };

const char* IsaName(Isa isa);
bool IsaSupported(Isa isa);
// FFSPLIT_ISA (scalar|avx2|avx512|avx512vbmi2|avx512vnni|auto; a test/debug override) or, unset or
// auto, the best path of this CPU: the int8-activation VNNI path when int8_activations (the op's
// accuracy_level is 4 and its weights are int8) and the CPU has it, else the best exact fp32 path.
// Throws std::invalid_argument on an unknown or unsupported value.
Isa SelectIsa(bool int8_activations = false);

struct Packed {
  int64_t n = 0;       // rows (output channels)
  int64_t words = 0;   // uint64 mask words per row
  int64_t kneed = 0;   // 1 + the largest column holding a non-zero (K must be >= this)
  bool int8 = true;    // values are int8 (else float)
  HugeVec<uint64_t> mask;
  std::vector<int64_t> row_ptr;
  HugeVec<int8_t> values_i8;  // nnz + 64 padding
  HugeVec<float> values_f32;  // nnz + 16 padding
  std::vector<float> scales;
  std::vector<int32_t> rowsum;    // int8 only: sum of the row's values (VNNI zero-point correction)

  int64_t nnz() const { return row_ptr.empty() ? 0 : row_ptr.back(); }
  size_t bytes_read_per_pass() const {  // what a pass over the weights reads
    return mask.size() * 8 + static_cast<size_t>(nnz()) * (int8 ? 1 : 4) + scales.size() * 4 +
           row_ptr.size() * 8;
  }
};

// Runs fn(i) for i in [0, total) on ORT's intra-op pool (a thin wrapper over KernelContext_ParallelFor).
struct Parallel {
  virtual ~Parallel() = default;
  virtual void For(size_t total, void (*fn)(void*, size_t), void* data) const = 0;
};

// Y[M, N] = X[M, K] @ W.T for the rows of the packed weight. K >= p.kneed is checked by the caller.
void MatMul(const Packed& p, const float* x, float* y, int64_t m, int64_t k, Isa isa, const Parallel& par);

namespace scalar {
void Rows(const Packed& p, const float* x, float* y, int64_t m, int64_t k, int64_t n0, int64_t n1);
}
namespace avx2 {
void RowDot(const Packed& p, const float* x, float* y, int64_t m, int64_t k, int64_t n0, int64_t n1);
void Outer(const Packed& p, const float* xt, float* y, int64_t mbp, int64_t m0, int64_t mb, int64_t k,
           int64_t n0, int64_t n1);
}  // namespace avx2
namespace avx512 {
void RowDot(const Packed& p, const float* x, float* y, int64_t m, int64_t k, int64_t n0, int64_t n1);
void Outer(const Packed& p, const float* xt, float* y, int64_t mbp, int64_t m0, int64_t mb, int64_t k,
           int64_t n0, int64_t n1);
}  // namespace avx512
namespace avx512vbmi2 {
void RowDot(const Packed& p, const float* x, float* y, int64_t m, int64_t k, int64_t n0, int64_t n1);
}
namespace avx512vnni {
// xq: uint8 [M, kpad] activations quantized with zero point 128, xs: their per-row scales.
void RowDot(const Packed& p, const uint8_t* xq, const float* xs, int64_t kpad, float* y, int64_t m,
            int64_t n0, int64_t n1);
// xq [m, kpad] (kpad a multiple of 64 >= k; padding = the zero point), xs [m]
void Quantize(const float* x, int64_t m, int64_t k, int64_t kpad, uint8_t* xq, float* xs);
// xt: uint8 [kpad/4][mbp][4] (X rows m0 .. m0+mb transposed by dwords, mbp a multiple of 16)
void Gemm(const Packed& p, const uint8_t* xt, const float* xs, int64_t kpad, float* y, int64_t m0, int64_t mb,
          int64_t mbp, int64_t n0, int64_t n1);
}

// SparseMatMulInt4's pre-packed weight: the on-disk layout (ffsplit_export/formats/packing.py,
// "bitmask sparse int4") with the mask widened to uint64 words and every row's codes starting at a
// byte boundary, zero-padded to a multiple of 8 codes (4 bytes).
// Stored zero codes stay in the mask (they keep the group of every later code in place); the
// kernels multiply them (0 * x) and FixNonFinite recomputes any non-finite output by the contract.
struct Packed4 {
  int64_t n = 0;           // rows
  int64_t words = 0;       // uint64 mask words per row
  int64_t kneed = 0;       // 1 + the last set mask bit
  int64_t group_size = 32; // kept values per scale (>= 8: one group boundary per 8 codes at most)
  HugeVec<uint64_t> mask;  // [N, words]
  std::vector<int64_t> row_ptr;    // [N + 1]: row n has row_ptr[n+1] - row_ptr[n] codes
  std::vector<int64_t> nib_off;    // [N + 1]: byte offset of row n's codes in nib
  HugeVec<uint8_t> nib;            // rows of ceil(count / 8) * 4 bytes of codes + 32 bytes of zero padding
  std::vector<float> scales;       // [groups]
  std::vector<int64_t> group_ptr;  // [N + 1]: scales[group_ptr[n] ..] are row n's

  int64_t nnz() const { return row_ptr.empty() ? 0 : row_ptr.back(); }
};

// Y[M, N] = X[M, K] @ W.T (exact float32 path on every ISA; AVX2 code for every ISA above scalar).
void MatMulInt4(const Packed4& p, const float* x, float* y, int64_t m, int64_t k, Isa isa, const Parallel& par);

namespace scalar {
void RowsInt4(const Packed4& p, const float* x, float* y, int64_t m, int64_t k, int64_t n0, int64_t n1);
}
namespace avx2 {
void RowDotInt4(const Packed4& p, const float* x, float* y, int64_t m, int64_t k, int64_t n0, int64_t n1);
}

}  // namespace ffsplit
