// ffsplit::FusedFFNNBits: one node per split FFN whose parts are dense float32 or MatMulNBits
// layout int8 / int4 (ffn_nbits.cc), and the packed layouts its kernels read.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "packed.h"

struct OrtCustomOp;

namespace ffsplit {

// One part W[N, K] (bits 4 or 8; bits 32: dense float32 [N, K]). Codes are stored as int values
// c with the zero point z such that W = (c - z) * s:
//  * bits 4: c = the uint4 code u, z = its zero point (8 when symmetric);
//  * bits 8: c = u - 128 stored as int8 (so that the AVX2 kernels multiply signed bytes without
//    widening), z = zero point - 128 (0 when symmetric).
// Layout (`tiled`, the default): neurons in tiles of 8, [ceil(N / 8)][nb][8][blob]: the 8 neurons'
// codes of one block are contiguous, so a tile is one sequential stream (rows past N are zero).
// Scales and zero points follow the same order ([tile][block][8]). Not tiled (the up rows of the
// gated light part with skipping, read only for live neurons): row-major [N][nb][blob] as the
// MatMulNBits B, scales / zero points [N][nb].
struct NbPart {
  int bits = 32;
  int64_t n = 0, k = 0;
  int64_t bs = 0, nb = 0, blob = 0;  // block size, blocks per row, bytes per block
  bool tiled = true;
  HugeVec<uint8_t> codes;            // + 64 bytes of padding
  std::vector<float> dense;          // bits 32: [N, K]
  std::vector<float> sc;             // scales
  std::vector<int8_t> z;             // zero points (see above)
  int64_t kpad() const { return bits == 32 ? k : nb * bs; }
  // position of (neuron n, block b) in sc / z, and times blob in codes
  int64_t Index(int64_t n, int64_t b) const { return tiled ? ((n >> 3) * nb + b) * 8 + (n & 7) : n * nb + b; }
  const uint8_t* Blk(int64_t n, int64_t b) const { return codes.data() + Index(n, b) * blob; }
  // the int code c of (n, block b, index i in the block)
  int Code(int64_t n, int64_t b, int64_t i) const {
    const uint8_t* blk = Blk(n, b);
    if (bits == 8) return static_cast<int8_t>(blk[i]);
    return (i & 1) ? blk[i / 2] >> 4 : blk[i / 2] & 15;
  }
  // the dequantized float32 weight (c - z) * s, as the reference computes it
  float At(int64_t row, int64_t col) const;
};

// The light down projection W[D, L] stored neuron-major: the output rows are cut into chunks of
// `rows` (a multiple of 32; one task each); within a chunk, neuron after neuron, each neuron's codes
// for the chunk's rows are contiguous (4 bits: per 16 rows 8 bytes, rows 0..7 in the low nibbles and
// 8..15 in the high ones, so that two neurons' codes interleave with byte unpacks; 8 bits: the int8
// code c as in NbPart). A task streams the segments of its active neurons; a skipped neuron costs no
// byte. The scales and zero points stay per (d, block of bs neurons), stored per chunk, block after
// block ([chunk][nb][rows]), so that a task reads them as one stream.
struct NbDown {
  int bits = 4;
  int64_t d = 0, l = 0, bs = 0, nb = 0;
  int64_t dpad = 0;                 // D rounded up to 32
  int64_t rows = 256;               // output rows per chunk
  std::vector<int64_t> chunk_off;   // byte offset of each chunk's segments
  HugeVec<uint8_t> codes;           // + 64 bytes of padding
  std::vector<float> scales;        // [chunks][nb][rows]
  std::vector<int8_t> z;            // [chunks][nb][rows] zero points (as NbPart)
  // position of (block b, row d) in scales / z, minus d: chunk c = d / rows
  int64_t SBase(int64_t c, int64_t b) const { return (c * nb + b) * rows - c * rows; }
  int64_t chunks() const { return (d + rows - 1) / rows; }
  // the segments of the chunk starting at row d0 (a multiple of rows): neuron j's codes at Of(j),
  // row d at d - d0
  struct Chunk {
    const uint8_t* base;
    int64_t seg;  // bytes per neuron
    const uint8_t* Of(int64_t j) const { return base + j * seg; }
  };
  Chunk ChunkOf(int64_t d0) const {
    const int64_t r = std::min(dpad, d0 + rows) - d0;
    return Chunk{codes.data() + chunk_off[static_cast<size_t>(d0 / rows)], bits == 8 ? r : r / 2};
  }
  const uint8_t* Seg(int64_t j, int64_t d0) const { return ChunkOf(d0).Of(j); }
  float At(int64_t row, int64_t j) const;
};

// The light up projection W[L, K] of an ungated FFN stored input-major (input_threshold > 0; read at
// decode): channel after channel, a channel's codes for every light neuron contiguous (`Row(k)`), so
// that a skipped channel's row is never read. lpad = L rounded up to 64 (zero codes past L).
// 8 bits: lpad bytes, the int8 code c of NbPart; 4 bits: lpad / 2 bytes, per 64 neurons 32 bytes:
// byte i holds neuron i in its low nibble and neuron 32 + i in its high one (so that the AVX2 kernels
// get 32 neurons in order from one mask / shift). Scales and zero points (as NbPart) per block of bs
// channels, neuron-contiguous: [nb][lpad].
struct NbIm {
  int bits = 4;
  int64_t l = 0, k = 0, bs = 0, nb = 0, lpad = 0;
  HugeVec<uint8_t> codes;  // + 64 bytes of padding
  std::vector<float> sc;
  std::vector<int8_t> z;
  int64_t RowBytes() const { return bits == 8 ? lpad : lpad / 2; }
  const uint8_t* Row(int64_t ch) const { return codes.data() + ch * RowBytes(); }
  int Code(int64_t ch, int64_t n) const {
    const uint8_t* r = Row(ch);
    if (bits == 8) return static_cast<int8_t>(r[n]);
    const int64_t g = n / 64, i = n % 64;
    const uint8_t byte = r[g * 32 + (i & 31)];
    return i < 32 ? byte & 15 : byte >> 4;
  }
};

// int8 activations of an integer product, per row r: q [kpad], per block scale s and code sum
// `sum` [nb]; eo (4 bits, block >= 64; else null): q with every 64 values reordered as the 32 even
// then the 32 odd ones (the low / high nibbles of 32 bytes of codes)
struct NbQ {
  const int8_t* q = nullptr;
  const int8_t* eo = nullptr;
  const float* s = nullptr;
  const int32_t* sum = nullptr;
};

// Kernels over the neurons list[i] (list null: neuron i) for i in [i0, i1), every row r < m:
// y[r * ldy + neuron]. A tiled part takes no list.
//   dot_f: exact float32 (x padded with zeros to kpad, row stride ldx)
//   dot_q: int8 activations (NbQ, row strides kpad and nb)
// Neuron-major down kernels for one activation row, output rows [d0, d1) (d0 a multiple of w.rows,
// d1 <= d0 + w.rows):
//   down_f: y[d] += sum over the listed neurons (ascending) of a[j] * w[d, j] (float, per block)
//   down_q: the same with qa (int8 per block of bs neurons, scales sa [nb]); acc: scratch of w.rows ints
//   quant: NbQuantize (same results)
//   act (null: none): s[i] = act(v[i]) by float32 formulas (kind: Act as int), for level 4; returns
//         how many indices it wrote to redo: those whose value must come from the float64 reference
//         (|v| >= 80 or non-finite; |s| < 1e-30 for non-relu; | |s| - thr | <= 1e-5 thr when thr > 0, so
//         that the skip decisions match the reference)
struct NbKernels {
  void (*dot_f)(const NbPart& p, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy, const int32_t* list,
                int64_t i0, int64_t i1);
  void (*dot_q)(const NbPart& p, const NbQ& qx, int64_t m, float* y, int64_t ldy, const int32_t* list, int64_t i0,
                int64_t i1);
  void (*down_f)(const NbDown& w, const float* a, const int32_t* list, int64_t count, int64_t d0, int64_t d1,
                 float* acc, float* y);
  void (*down_q)(const NbDown& w, const int8_t* qa, const float* sa, const int32_t* list, int64_t count,
                 int64_t d0, int64_t d1, int32_t* acc, float* y);
  void (*quant)(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t bs, int64_t kpad, int8_t* qx, float* xs,
                int32_t* xsum);
  int64_t (*act)(int kind, float thr, const float* v, float* s, int64_t n, int32_t* redo);
  // Input-major light up (NbIm) for one activation row, neurons [n0, n1) (n0 a multiple of 64), over
  // the kept channels ks[0..cnt) (ascending): y[n] = sum over blocks of the block scale times the
  // block's sum over kept channels of (c - z) * x (im_f: float32, x padded to the grid) or of
  // q * c - z * xsum (im_q: int8 x' per block, scales xs, code sums xsum). acc: scratch of
  // n1 - n0 + 64 values.
  void (*im_f)(const NbIm& w, const float* x, const int32_t* ks, int64_t cnt, int64_t n0, int64_t n1, float* acc,
               float* y);
  void (*im_q)(const NbIm& w, const int8_t* q, const float* xs, const int32_t* xsum, const int32_t* ks, int64_t cnt,
               int64_t n0, int64_t n1, int32_t* acc, float* y);
  // Dense float32 part (bits 32), neurons [i0, i1) for m rows (prefill); false: not taken (m too small),
  // the FusedFFN dense kernel runs instead. Null: none (scalar and AVX2).
  bool (*dense_rows)(const NbPart& p, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy, int64_t i0,
                     int64_t i1) = nullptr;
};
// The pair kernels under the AVX2 down_q / im_q (ffn_nbits_avx2.cc): acc += the int8 activations
// of pairs of neurons (down: listed light neurons js, their neuron-major codes of output rows
// [d0, de)) or of input channels (im: their input-major rows, neurons [n0, ne)) times their codes;
// 4 and 8 bits. An AVX-512 build swaps in wider ones (ffn_nbits_vnni.cc).
struct NbPairs {
  void (*im4)(const uint8_t* const* rows, const int8_t* qs, int np, int64_t n0, int64_t ne, int32_t* acc);
  void (*im8)(const uint8_t* const* rows, const int8_t* qs, int np, int64_t n0, int64_t ne, int32_t* acc);
  void (*down4)(const NbDown::Chunk& ch, const int32_t* js, const int8_t* qs, int n, int64_t d0, int64_t de,
                int32_t* acc);
  void (*down8)(const NbDown::Chunk& ch, const int32_t* js, const int8_t* qs, int n, int64_t d0, int64_t de,
                int32_t* acc);
};
const NbPairs& NbPairsAvx2();
// NbKernels::down_q / im_q of the AVX2 kernels over the given pair kernels
void NbDownQWith(const NbPairs& pk, const NbDown& w, const int8_t* qa, const float* sa, const int32_t* list,
                 int64_t count, int64_t d0, int64_t d1, int32_t* acc, float* y);
void NbImQWith(const NbPairs& pk, const NbIm& w, const int8_t* q, const float* xs, const int32_t* xsum,
               const int32_t* ks, int64_t cnt, int64_t n0, int64_t n1, int32_t* acc, float* y);

const NbKernels& NbKernelsScalar();
const NbKernels& NbKernelsAvx2();
// NbKernelsAvx2 with AVX-512 dot_q (VNNI), down_q and im_q (64-byte pair kernels) (ffn_nbits_vnni.cc;
// bit-identical outputs)
const NbKernels& NbKernelsAvx512Vnni();

// the int code c of output row d in one neuron's neuron-major codes
int DownCode(const uint8_t* c, int bits, int64_t d);

// Quantizes x [m][k] (row stride ldx) per block of bs to int8 (scale max|.| / 127, round to
// nearest even), zero-padded to kpad: qx [m][kpad], xs and xsum [m][kpad / bs].
void NbQuantize(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t bs, int64_t kpad, int8_t* qx, float* xs,
                int32_t* xsum);

const OrtCustomOp* FusedFFNNBitsCustomOp();

}  // namespace ffsplit
