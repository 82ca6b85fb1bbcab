// ffsplit::FusedFFN: one node per split FFN (ffn.cc), and what it shares with the matmul ops.
#pragma once

#include <cstdint>
#include <vector>

#include "packed.h"

struct OrtCustomOp;

namespace ffsplit {

// The light down projection W[D, L] stored input-major: the output rows are cut into `chunks`
// ranges of `chunk_words` * 64 rows; within a chunk each light neuron j has one contiguous
// segment (its mask words over the chunk's rows, then its non-zero int8 codes), so a neuron whose
// activation is zero is skipped without reading a byte of it.
struct InputMajor {
  int64_t d = 0, l = 0;
  int64_t words = 0;        // ceil(D / 64)
  int64_t chunk_words = 0;  // mask words per (chunk, neuron) segment
  int64_t chunks = 0;
  HugeVec<uint8_t> blob;    // segments, chunk-major then neuron; + 64 bytes of padding
  std::vector<int64_t> off; // [chunks][l + 1] byte offsets of the segments in blob
  std::vector<float> scales;  // [D] per output row
  size_t bytes_of_neuron(int64_t j) const;
};

InputMajor ToInputMajor(const Packed& w, int64_t chunk_words);

// The kernels of the fused op for one ISA (ffn_avx2.cc; the scalar ones in ffn.cc).
struct FfnKernels {
  // y[r * ldy + n] = dot(w[n, :k], x[r, :k]) for n in [n0, n1), r < m
  void (*dense)(const float* w, int64_t k, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy,
                int64_t n0, int64_t n1);
  // acc[r * lda + (row - chunk start)] += sum over listed neurons of a[r, j] * code over chunk c
  // (rows of a with a[r, j] == 0 are skipped when skip is set); nrows <= 16
  void (*scatter)(const InputMajor& w, int64_t c, const float* a, int64_t lda_a, int64_t nrows,
                  const int32_t* neurons, int64_t count, bool skip, float* acc, int64_t ldacc);
};
const FfnKernels& FfnKernelsScalar();
const FfnKernels& FfnKernelsAvx2();

// Validates and pre-packs SparseMatMulInt8 inputs (mask, values, row_ptr, scales) of W[N, K]
// exactly as that op does (ffsplit_ort.cc). Throws std::invalid_argument naming the problem.
struct ConstInput {
  int32_t type = 0;  // ONNXTensorElementDataType
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t count = 0;
};
Packed PackSparseInt8(const ConstInput& mask, const ConstInput& values, const ConstInput& row_ptr,
                      const ConstInput& scales, int64_t k);

// The op's OrtCustomOp (registered in ffsplit_ort.cc).
const OrtCustomOp* FusedFFNCustomOp();

}  // namespace ffsplit
