// ffsplit::FusedFFNNBits: one node per split FFN whose parts are dense float32 or MatMulNBits
// layout int8 / int4 (ffn_nbits.cc), and the packed layouts its kernels read.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "packed.h"

struct OrtCustomOp;

namespace ffsplit {

// One part W[N, K] stored row-major per output neuron: the MatMulNBits B as given (codes of row n,
// block after block; 4 bits: low nibble first), with its scales and zero points unpacked per
// (n, block). bits 32: dense float32 [N, K].
struct NbPart {
  int bits = 32;
  int64_t n = 0, k = 0;
  int64_t bs = 0, nb = 0, blob = 0;  // block size, blocks per row, bytes per block
  HugeVec<uint8_t> codes;            // [N][nb][blob] + 64 bytes of padding
  std::vector<float> dense;          // bits 32: [N, K]
  std::vector<float> scales;         // [N * nb]
  std::vector<float> zf;             // [N * nb] zero points (float)
  std::vector<int32_t> zi;           // [N * nb] zero points
  std::vector<float> scales_t;       // [ceil(N / 8)][nb][8]: per tile of 8 neurons, block after block
  std::vector<int32_t> zi_t;         // same layout
  int64_t kpad() const { return bits == 32 ? k : nb * bs; }
  // the dequantized float32 weight (u - z) * s, as the reference computes it
  float At(int64_t row, int64_t col) const;
  size_t bytes() const { return codes.size() + dense.size() * 4 + scales.size() * 4; }
};

// The light down projection W[D, L] stored neuron-major: the output rows are cut into chunks of
// kDownRows (one task each); within a chunk, neuron after neuron, each neuron's codes for the
// chunk's rows are contiguous (4 bits: per 16 rows 8 bytes, rows 0..7 in the low nibbles and 8..15
// in the high ones, so that two neurons' codes interleave with byte unpacks). A task streams the
// segments of its active neurons; a skipped neuron costs no byte. The scales and zero points stay
// per (d, block of bs neurons), stored block-major over d.
constexpr int64_t kDownRows = 256;
struct NbDown {
  int bits = 4;
  int64_t d = 0, l = 0, bs = 0, nb = 0;
  int64_t dpad = 0;                 // D rounded up to 32
  std::vector<int64_t> chunk_off;   // byte offset of each chunk's segments
  HugeVec<uint8_t> codes;           // + 64 bytes of padding
  std::vector<float> scales;        // [nb][dpad]
  std::vector<float> zf;            // [nb][dpad]
  // neuron j's codes for the chunk starting at row d0 (a multiple of kDownRows); row d at d - d0
  const uint8_t* Seg(int64_t j, int64_t d0) const {
    const int64_t rows = std::min(dpad, d0 + kDownRows) - d0;
    return codes.data() + chunk_off[static_cast<size_t>(d0 / kDownRows)] + j * (bits == 8 ? rows : rows / 2);
  }
  float At(int64_t row, int64_t j) const;
};

// Row-major kernels: y[r * ldy + n] for n in [n0, n1), r < m.
//   dot_f: exact float32 (x padded with zeros to kpad, row stride ldx)
//   dot_q: int8 activations qx [m][kpad] with per (row, block) scale xs and code sum xsum [m][nb];
//          qeo (4 bits, block >= 64; else null): qx with every 64 values reordered as the 32 even
//          then the 32 odd ones (the low / high nibbles of 32 bytes of B)
// Neuron-major down kernels for one activation row, output rows [d0, d1) (d0 a multiple of kDownRows, d1 <= d0 + kDownRows):
//   down_f: y[d] += sum over the listed neurons (ascending) of a[j] * w[d, j] (float, per block)
//   down_q: the same with qa (int8 per block of bs neurons, scales sa [nb]); acc: scratch of dpad ints
struct NbKernels {
  void (*dot_f)(const NbPart& p, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy, int64_t n0,
                int64_t n1);
  void (*dot_q)(const NbPart& p, const int8_t* qx, const int8_t* qeo, const float* xs, const int32_t* xsum,
                int64_t m, float* y, int64_t ldy, int64_t n0, int64_t n1);
  void (*down_f)(const NbDown& w, const float* a, const int32_t* list, int64_t count, int64_t d0, int64_t d1,
                 float* acc, float* y);
  void (*down_q)(const NbDown& w, const int8_t* qa, const float* sa, const int32_t* list, int64_t count,
                 int64_t d0, int64_t d1, int32_t* acc, float* y);
};
const NbKernels& NbKernelsScalar();
const NbKernels& NbKernelsAvx2();

// code of output row d in one neuron's neuron-major codes
int DownCode(const uint8_t* c, int bits, int64_t d);

// Quantizes x [m][k] (row stride ldx) per block of bs to int8 (scale max|.| / 127, round to
// nearest even), zero-padded to kpad: qx [m][kpad], xs and xsum [m][kpad / bs].
void NbQuantize(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t bs, int64_t kpad, int8_t* qx, float* xs,
                int32_t* xsum);

const OrtCustomOp* FusedFFNNBitsCustomOp();

}  // namespace ffsplit
