// ONNX Runtime CPU custom-op library for the ffsplit domain (version 1).
//
// Ops (Y[..., N] = X[..., K] @ W.T in float32, weights decoded from packed inputs):
//   SparseMatMulInt8(X, mask:uint8[N,ceil(K/8)], values:int8[nnz], row_ptr:int64[N+1], scales:float[N])
//   SparseMatMulFP32(X, mask, values:float[nnz], row_ptr)
//   Sparse24MatMulInt8(X, values:int8[N,2G], meta:uint8[N,ceil(G/2)], scales:float[N])
//   SparseMatMulInt4(X, mask, values:uint8[ceil(nnz/2)] 4-bit codes, row_ptr, scales:float[groups]),
//     int attribute group_size (required, >= 8): a scale per group_size kept values of a row
//     (accuracy_level 4 is accepted and computed exactly)
//   FusedFFN(X, heavy/light up, down and gate parts...): a whole split FFN in one node; inputs,
//     attributes (activation, gated, skip, threshold) and reference in ffsplit_export/ops/_ffn.py,
//     kernel in ffn.cc
//   FusedFFNNBits(X, up/down/gate heavy and light parts as MatMulNBits inputs or dense float32...):
//     the FFN of the presets' int8 / int4 parts in one node (attributes heavy_bits, light_bits,
//     *_block_size, activation, gated, skip, threshold, accuracy_level); reference
//     fused_ffn_nbits_reference in ffsplit_export/ops/_ffn.py, kernel in ffn_nbits.cc
// RegisterCustomOps below adds exactly these six to the ffsplit domain (tests/test_docs.py checks
// this list against the registration and against ffsplit_export.ops).
// Optional int attribute accuracy_level (default 0 = exact fp32 compute); 4 lets the int8-weight ops
// quantize activations to int8 per row (as MatMulNBits accuracy_level 4): the VNNI kernels run when
// the CPU has them. FFSPLIT_ISA (other than auto) overrides the choice for tests and debugging.
// The layouts and their validity rules are those of ffsplit_export/formats/packing.py and
// ffsplit_export/ops/_spec.py (check_op_weights). Constant weights are validated and
// pre-packed once when the kernel is created; a malformed initializer fails session creation, and
// so does a node with a missing or omitted ("") input.
// Non-finite values (ffsplit_export/ops/_spec.py SEMANTICS): only non-zero weights multiply X
// (structural zeros are skipped, as in sparse BLAS), on every ISA path, M and accuracy level. The
// fast kernels keep their float32 order; any non-finite output is recomputed in float64 from the
// packed weight (dispatch.cc FixNonFinite), which also removes intermediate overflow (x * code
// before the scale), and rows of X holding NaN / inf are never quantized to int8.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT
#include <onnxruntime_lite_custom_op.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "ffn.h"
#include "ffn_nbits.h"
#include "packed.h"

namespace ffsplit {
namespace {

using Shape = std::vector<int64_t>;

std::string ShapeStr(const Shape& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

const char* TypeStr(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    default: return "other";
  }
}

struct View {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  Shape shape;
  const void* data = nullptr;
  int64_t count = 0;
  template <typename T>
  const T* as() const { return static_cast<const T*>(data); }
};

struct Invalid : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

[[noreturn]] void Fail(const std::string& msg) { throw Invalid(msg); }

void ExpectType(const View& v, ONNXTensorElementDataType t, const char* name) {
  if (v.type != t)
    Fail(std::string(name) + " must be " + TypeStr(t) + ", got " + TypeStr(v.type));
}

// a >= 0, b > 0; no overflow for a near INT64_MAX (K of an empty X can be anything)
int64_t CeilDiv(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// Every dimension of a packed weight must be below 2^31: the kernels index with products of two
// of them in int64, and no real layer comes near (this also keeps N + 1 and K = 8 * bytes exact).
constexpr int64_t kMaxDim = (int64_t{1} << 31) - 1;

void CheckDims(const View& v, const char* name) {
  for (int64_t d : v.shape)
    if (d < 0 || d > kMaxDim)
      Fail(std::string(name) + " has a dimension of " + std::to_string(d) + " (shape " + ShapeStr(v.shape) +
           "); packed weight dimensions must be below 2^31");
  if (v.count > 0 && v.data == nullptr) Fail(std::string(name) + " has no data");
}

enum class Kind { kSparseInt8, kSparseFp32, kNm24Int8, kSparseInt4 };

const char* KindName(Kind k) {
  switch (k) {
    case Kind::kSparseInt8: return "SparseMatMulInt8";
    case Kind::kSparseFp32: return "SparseMatMulFP32";
    case Kind::kSparseInt4: return "SparseMatMulInt4";
    default: return "Sparse24MatMulInt8";
  }
}

// The validated, pre-packed weight plus what the run-time K check needs.
struct Prepared {
  Packed packed;
  int64_t disk_cols = 0;  // bitmask: mask bytes per row; 2:4: G groups per row
  int64_t kneed = 0;      // bitmask: 1 + last set bit; 2:4: 1 + last non-zero column
};

void CheckScales(const View& scales, int64_t n) {
  ExpectType(scales, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "scales");
  if (scales.shape.size() != 1 || scales.shape[0] != n)
    Fail("scales must be float32 [N]=" + std::to_string(n) + ", got shape " + ShapeStr(scales.shape));
}

void InitPacked(Packed& p, int64_t n, int64_t cols, bool int8) {
  p.n = n;
  p.words = CeilDiv(cols, 64);
  p.int8 = int8;
  p.mask.assign(static_cast<size_t>(n * p.words), 0);
  p.row_ptr.assign(static_cast<size_t>(n + 1), 0);
  p.scales.assign(static_cast<size_t>(n), 1.0f);
  if (int8) p.rowsum.assign(static_cast<size_t>(n), 0);
}

void FinishPacked(Packed& p) {
  if (p.int8) {
    p.values_i8.resize(static_cast<size_t>(p.nnz()) + 64, 0);
  } else {
    p.values_f32.resize(static_cast<size_t>(p.nnz()) + 16, 0.0f);
  }
}

// Bitmask layout (SparseMatMulInt8 / SparseMatMulFP32). k < 0: K not known yet.
Prepared PrepareBitmask(const View& mask, const View& values, const View& row_ptr, const View* scales,
                        bool int8, int64_t k) {
  ExpectType(mask, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "mask");
  CheckDims(mask, "mask");
  CheckDims(values, "values");
  CheckDims(row_ptr, "row_ptr");
  if (scales) CheckDims(*scales, "scales");
  if (mask.shape.size() != 2)
    Fail("mask must be uint8 [N, ceil(K/8)], got shape " + ShapeStr(mask.shape));
  const int64_t n = mask.shape[0], kb = mask.shape[1];
  if (k >= 0 && kb != CeilDiv(k, 8))
    Fail("mask has " + std::to_string(kb) + " bytes per row; K=" + std::to_string(k) + " needs " +
         std::to_string(CeilDiv(k, 8)));
  ExpectType(row_ptr, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, "row_ptr");
  if (row_ptr.shape.size() != 1 || row_ptr.shape[0] != n + 1)
    Fail("row_ptr must be int64 [N+1]=" + std::to_string(n + 1) + ", got shape " + ShapeStr(row_ptr.shape));
  if (values.shape.size() != 1) Fail("values must be 1-D, got shape " + ShapeStr(values.shape));
  ExpectType(values, int8 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "values");
  if (scales) CheckScales(*scales, n);

  const uint8_t* mb = mask.as<uint8_t>();
  const int64_t* rp = row_ptr.as<int64_t>();
  const int64_t nvals = values.shape[0];
  // kneed: 1 + the last set bit over all rows (bits past K must be zero)
  int64_t kneed = 0;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t b = kb - 1; b >= 0; --b) {
      const uint8_t byte = mb[r * kb + b];
      if (byte) {
        kneed = std::max<int64_t>(kneed, b * 8 + (31 - __builtin_clz(byte)) + 1);
        break;
      }
    }
  }
  if (k >= 0 && kneed > k) Fail("mask has bits set past column K=" + std::to_string(k) + "; they must be zero");
  // row_ptr must equal the running popcount (this also bounds every values read below)
  bool ok = (n + 1 >= 1) && rp[0] == 0;
  int64_t total = 0;
  for (int64_t r = 0; ok && r < n; ++r) {
    int64_t cnt = 0;
    for (int64_t b = 0; b < kb; ++b) cnt += __builtin_popcount(mb[r * kb + b]);
    total += cnt;
    if (rp[r + 1] != total) ok = false;
  }
  if (ok && rp[n] != nvals) ok = false;
  if (!ok)
    Fail("row_ptr does not match the mask: row_ptr[0] must be 0, row_ptr[n+1]-row_ptr[n] the popcount of "
         "row n, row_ptr[N] = len(values) = " + std::to_string(nvals));

  Prepared out;
  out.disk_cols = kb;
  out.kneed = kneed;
  Packed& p = out.packed;
  InitPacked(p, n, kb * 8, int8);
  if (scales && n > 0) std::memcpy(p.scales.data(), scales->data, static_cast<size_t>(n) * sizeof(float));
  HugeVec<int8_t> vi8;
  HugeVec<float> vf;
  int64_t nnz = 0;
  for (int64_t r = 0; r < n; ++r) {
    int64_t src = rp[r];
    uint64_t* mrow = p.mask.data() + (r * p.words);
    int32_t rsum = 0;
    for (int64_t b = 0; b < kb; ++b) {
      uint32_t byte = mb[r * kb + b];
      while (byte) {
        const int bit = __builtin_ctz(byte);
        byte &= byte - 1;
        const int64_t col = b * 8 + bit;
        bool nz;
        if (int8) {
          const int8_t v = values.as<int8_t>()[src];
          nz = v != 0;
          if (nz) {
            vi8.push_back(v);
            rsum += v;
          }
        } else {
          const float v = values.as<float>()[src];
          nz = v != 0.0f;
          if (nz) vf.push_back(v);
        }
        ++src;
        if (nz) {
          mrow[col >> 6] |= uint64_t{1} << (col & 63);
          ++nnz;
        }
      }
    }
    p.row_ptr[static_cast<size_t>(r + 1)] = nnz;
    if (int8) p.rowsum[static_cast<size_t>(r)] = rsum;
  }
  if (int8) p.values_i8 = std::move(vi8); else p.values_f32 = std::move(vf);
  FinishPacked(p);
  int64_t kin = 0;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t w = p.words - 1; w >= 0; --w)
      if (uint64_t m = p.mask[static_cast<size_t>(r * p.words + w)]) {
        kin = std::max<int64_t>(kin, w * 64 + 64 - __builtin_clzll(m));
        break;
      }
  p.kneed = kin;
  return out;
}

// 2:4 layout (Sparse24MatMulInt8).
Prepared PrepareNm24(const View& values, const View& meta, const View& scales, int64_t k) {
  ExpectType(values, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, "values");
  CheckDims(values, "values");
  CheckDims(meta, "meta");
  CheckDims(scales, "scales");
  if (values.shape.size() != 2 || values.shape[1] % 2 != 0)
    Fail("2:4 values must be int8 [N, 2*ceil(K/4)], got shape " + ShapeStr(values.shape));
  const int64_t n = values.shape[0], g = values.shape[1] / 2;
  if (k >= 0 && g != CeilDiv(k, 4))
    Fail("2:4 values must be [N, " + std::to_string(2 * CeilDiv(k, 4)) + "] for K=" + std::to_string(k) +
         ", got " + ShapeStr(values.shape));
  ExpectType(meta, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "meta");
  const int64_t mcols = CeilDiv(g, 2);
  if (meta.shape.size() != 2 || meta.shape[0] != n || meta.shape[1] != mcols)
    Fail("2:4 meta must be uint8 [N, " + std::to_string(mcols) + "], got shape " + ShapeStr(meta.shape));
  CheckScales(scales, n);
  const uint8_t* mt = meta.as<uint8_t>();
  const int8_t* vals = values.as<int8_t>();
  int64_t kneed = 0;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t gi = 0; gi < g; ++gi) {
      const uint8_t nib = (mt[r * mcols + gi / 2] >> (4 * (gi % 2))) & 0x0F;
      const int i0 = nib & 3, i1 = (nib >> 2) & 3;
      if (i0 >= i1) Fail("2:4 meta: the two indices of a group must be increasing (i0 < i1)");
      if (vals[r * 2 * g + 2 * gi]) kneed = std::max<int64_t>(kneed, gi * 4 + i0 + 1);
      if (vals[r * 2 * g + 2 * gi + 1]) kneed = std::max<int64_t>(kneed, gi * 4 + i1 + 1);
    }
  }
  if (k >= 0 && kneed > k)
    Fail("2:4 values: entries at padded columns >= K=" + std::to_string(k) + " must be zero");
  if (g % 2 && mcols)
    for (int64_t r = 0; r < n; ++r)
      if (mt[r * mcols + mcols - 1] >> 4) Fail("2:4 meta: the unused high nibble of the last byte must be zero");

  Prepared out;
  out.disk_cols = g;
  out.kneed = kneed;
  Packed& p = out.packed;
  InitPacked(p, n, g * 4, true);
  if (n > 0) std::memcpy(p.scales.data(), scales.data, static_cast<size_t>(n) * sizeof(float));
  HugeVec<int8_t> vi8;
  vi8.reserve(static_cast<size_t>(n * g * 2));
  int64_t nnz = 0;
  for (int64_t r = 0; r < n; ++r) {
    uint64_t* mrow = p.mask.data() + (r * p.words);
    int32_t rsum = 0;
    for (int64_t gi = 0; gi < g; ++gi) {
      const uint8_t nib = (mt[r * mcols + gi / 2] >> (4 * (gi % 2))) & 0x0F;
      const int idx[2] = {nib & 3, (nib >> 2) & 3};
      for (int j = 0; j < 2; ++j) {
        const int8_t v = vals[r * 2 * g + 2 * gi + j];
        if (!v) continue;
        const int64_t col = gi * 4 + idx[j];
        mrow[col >> 6] |= uint64_t{1} << (col & 63);
        vi8.push_back(v);
        rsum += v;
        ++nnz;
      }
    }
    p.row_ptr[static_cast<size_t>(r + 1)] = nnz;
    p.rowsum[static_cast<size_t>(r)] = rsum;
  }
  p.values_i8 = std::move(vi8);
  FinishPacked(p);
  p.kneed = kneed;
  return out;
}

// Bitmask int4 layout (SparseMatMulInt4); the rules of ffsplit_export/formats/packing.py check_sparse_int4.
struct Prepared4 {
  Packed4 packed;
  int64_t disk_cols = 0;  // mask bytes per row
  int64_t kneed = 0;      // 1 + last set bit
};

Prepared4 PrepareInt4(const View& mask, const View& values, const View& row_ptr, const View& scales, int64_t gs,
                      int64_t k) {
  ExpectType(mask, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "mask");
  CheckDims(mask, "mask");
  CheckDims(values, "values");
  CheckDims(row_ptr, "row_ptr");
  CheckDims(scales, "scales");
  if (mask.shape.size() != 2) Fail("mask must be uint8 [N, ceil(K/8)], got shape " + ShapeStr(mask.shape));
  const int64_t n = mask.shape[0], kb = mask.shape[1];
  if (k >= 0 && kb != CeilDiv(k, 8))
    Fail("mask has " + std::to_string(kb) + " bytes per row; K=" + std::to_string(k) + " needs " +
         std::to_string(CeilDiv(k, 8)));
  ExpectType(row_ptr, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, "row_ptr");
  if (row_ptr.shape.size() != 1 || row_ptr.shape[0] != n + 1)
    Fail("row_ptr must be int64 [N+1]=" + std::to_string(n + 1) + ", got shape " + ShapeStr(row_ptr.shape));
  ExpectType(values, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "values");
  if (values.shape.size() != 1) Fail("values must be uint8 [ceil(nnz/2)], got shape " + ShapeStr(values.shape));
  ExpectType(scales, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "scales");
  if (scales.shape.size() != 1) Fail("scales must be float32 [groups], got shape " + ShapeStr(scales.shape));
  const uint8_t* mb = mask.as<uint8_t>();
  const int64_t* rp = row_ptr.as<int64_t>();
  int64_t kneed = 0;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t b = kb - 1; b >= 0; --b)
      if (const uint8_t byte = mb[r * kb + b]) {
        kneed = std::max<int64_t>(kneed, b * 8 + (31 - __builtin_clz(byte)) + 1);
        break;
      }
  if (k >= 0 && kneed > k) Fail("mask has bits set past column K=" + std::to_string(k) + "; they must be zero");
  // row_ptr = running popcount (bounds every code read); groups = sum of ceil(count / group_size)
  bool ok = rp[0] == 0;
  int64_t total = 0, groups = 0;
  for (int64_t r = 0; ok && r < n; ++r) {
    int64_t cnt = 0;
    for (int64_t b = 0; b < kb; ++b) cnt += __builtin_popcount(mb[r * kb + b]);
    total += cnt;
    groups += cnt / gs + (cnt % gs != 0);
    if (rp[r + 1] != total) ok = false;
  }
  if (!ok)
    Fail("row_ptr does not match the mask: row_ptr[0] must be 0, row_ptr[n+1]-row_ptr[n] the popcount of row n");
  const int64_t nbytes = total / 2 + (total % 2);
  if (values.shape[0] != nbytes)
    Fail("sparse-int4 values hold " + std::to_string(values.shape[0]) + " bytes; row_ptr[N]=" +
         std::to_string(total) + " codes need " + std::to_string(nbytes));
  if ((total % 2) && (values.as<uint8_t>()[nbytes - 1] >> 4))
    Fail("sparse-int4 values: the unused high nibble of the last byte must be zero");
  if (scales.shape[0] != groups)
    Fail("sparse-int4 scales must be float32 [" + std::to_string(groups) + "] (ceil(count/" + std::to_string(gs) +
         ") per row), got shape " + ShapeStr(scales.shape));

  Prepared4 out;
  out.disk_cols = kb;
  out.kneed = kneed;
  Packed4& p = out.packed;
  p.n = n;
  p.words = CeilDiv(kb * 8, 64);
  p.kneed = kneed;
  p.group_size = gs;
  p.mask.assign(static_cast<size_t>(n * p.words), 0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t b = 0; b < kb; ++b)
      p.mask[static_cast<size_t>(r * p.words + b / 8)] |= static_cast<uint64_t>(mb[r * kb + b]) << (8 * (b % 8));
  p.row_ptr.assign(rp, rp + n + 1);
  p.nib_off.assign(static_cast<size_t>(n + 1), 0);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t cnt = rp[r + 1] - rp[r];
    p.nib_off[static_cast<size_t>(r + 1)] = p.nib_off[static_cast<size_t>(r)] + (cnt + 7) / 8 * 4;
  }
  p.nib.assign(static_cast<size_t>(p.nib_off[static_cast<size_t>(n)]) + 32, 0);
  const uint8_t* src = values.as<uint8_t>();
  for (int64_t r = 0; r < n; ++r) {  // re-align every row's codes to a byte boundary
    uint8_t* dst = p.nib.data() + p.nib_off[static_cast<size_t>(r)];
    for (int64_t i = 0, g = rp[r]; g < rp[r + 1]; ++i, ++g) {
      const uint8_t code = (src[g >> 1] >> (4 * (g & 1))) & 0x0F;
      dst[i >> 1] |= static_cast<uint8_t>(code << (4 * (i & 1)));
    }
  }
  p.scales.assign(static_cast<size_t>(groups), 0.0f);
  if (groups > 0) std::memcpy(p.scales.data(), scales.data, static_cast<size_t>(groups) * sizeof(float));
  p.group_ptr.assign(static_cast<size_t>(n + 1), 0);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t cnt = rp[r + 1] - rp[r];
    p.group_ptr[static_cast<size_t>(r + 1)] = p.group_ptr[static_cast<size_t>(r)] + cnt / gs + (cnt % gs != 0);
  }
  return out;
}

View ViewOf(const Ort::ConstValue& v) {
  View out;
  auto info = v.GetTensorTypeAndShapeInfo();
  out.type = info.GetElementType();
  out.shape = info.GetShape();
  out.count = static_cast<int64_t>(info.GetElementCount());
  out.data = v.GetTensorRawData();
  return out;
}

template <typename T>
View ViewOf(const Ort::Custom::Tensor<T>& t, ONNXTensorElementDataType type) {
  View out;
  out.type = type;
  out.shape = t.Shape();
  out.count = t.NumberOfElement();
  out.data = t.DataRaw();
  return out;
}

Prepared PrepareFromViews(Kind kind, const std::vector<View>& w, int64_t k) {
  switch (kind) {
    case Kind::kSparseInt8: return PrepareBitmask(w[0], w[1], w[2], &w[3], true, k);
    case Kind::kSparseFp32: return PrepareBitmask(w[0], w[1], w[2], nullptr, false, k);
    default: return PrepareNm24(w[0], w[1], w[2], k);
  }
}

struct OrtParallel final : Parallel {
  explicit OrtParallel(OrtKernelContext* ctx) : ctx_(ctx) {}
  void For(size_t total, void (*fn)(void*, size_t), void* data) const override {
    if (total == 0) return;
    if (total == 1) {
      fn(data, 0);
      return;
    }
    Ort::KernelContext(ctx_).ParallelFor(fn, total, 0, data);
  }
  OrtKernelContext* ctx_;
};

const char* const kInputsSparseInt8[] = {"X", "mask", "values", "row_ptr", "scales"};
const char* const kInputsSparseFp32[] = {"X", "mask", "values", "row_ptr"};
const char* const kInputsNm24Int8[] = {"X", "values", "meta", "scales"};
const char* const kInputsSparseInt4[] = {"X", "mask", "values", "row_ptr", "scales"};

std::string JoinNames(const char* const* names, size_t count) {
  std::string out;
  for (size_t i = 0; i < count; ++i) out += (i ? ", " : "") + std::string(names[i]);
  return out;
}

// State shared by the three op kernels.
class Kernel {
 public:
  Kernel(Kind kind, const OrtKernelInfo* info_ptr) : kind_(kind) {
    Ort::ConstKernelInfo info(info_ptr);
    try {
      name_ = std::string("ffsplit::") + KindName(kind) + " (node '" + info.GetNodeName() + "')";
    } catch (...) {
      name_ = std::string("ffsplit::") + KindName(kind);
    }
    // accuracy_level (optional int, 0 default): 4 lets int8-weight ops quantize activations to
    // int8 per row (as MatMulNBits accuracy_level 4); anything else computes exactly in fp32
    int64_t level = 0;
    if (OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info_ptr, "accuracy_level", &level)) {
      Ort::GetApi().ReleaseStatus(st);  // absent
      level = 0;
    }
    if (level < 0 || level > 4)
      throw Ort::Exception(name_ + ": accuracy_level must be 0..4 (4 = int8 activations allowed), got " +
                               std::to_string(level),
                           ORT_INVALID_ARGUMENT);
    accuracy_level_ = level;
    try {
      isa_ = SelectIsa(level == 4 && kind != Kind::kSparseFp32 && kind != Kind::kSparseInt4);
    } catch (const std::exception& e) {
      throw Ort::Exception(name_ + ": " + e.what(), ORT_INVALID_ARGUMENT);
    }
    // every input is required: the lite API declares them optional, so ONNX Runtime accepts a
    // node with fewer inputs or with an input given as "" (omitted); refuse both here, at session
    // creation, instead of running on a missing tensor
    const size_t want_in = (kind == Kind::kSparseInt8 || kind == Kind::kSparseInt4) ? 5 : 4;
    const char* const* in_names = kind == Kind::kSparseInt8   ? kInputsSparseInt8
                                  : kind == Kind::kSparseFp32 ? kInputsSparseFp32
                                  : kind == Kind::kSparseInt4 ? kInputsSparseInt4
                                                              : kInputsNm24Int8;
    if (kind == Kind::kSparseInt4) {
      // group_size (required int): kept values per scale, >= 8 (one group boundary per mask byte)
      int64_t gs = 0;
      if (OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info_ptr, "group_size", &gs)) {
        Ort::GetApi().ReleaseStatus(st);
        throw Ort::Exception(name_ + ": the int attribute group_size is required (kept values per scale, e.g. 32)",
                             ORT_INVALID_ARGUMENT);
      }
      if (gs < 8 || gs > kMaxDim)
        throw Ort::Exception(name_ + ": group_size must be >= 8 (and below 2^31), got " + std::to_string(gs),
                             ORT_INVALID_ARGUMENT);
      group_size_ = gs;
    }
    if (info.GetInputCount() != want_in)
      throw Ort::Exception(name_ + ": takes " + std::to_string(want_in) + " inputs (" + JoinNames(in_names, want_in) +
                               "), got " + std::to_string(info.GetInputCount()),
                           ORT_INVALID_ARGUMENT);
    for (size_t i = 0; i < want_in; ++i) {
      std::string in_name;
      try {
        in_name = info.GetInputName(i);
      } catch (...) {
        in_name.clear();
      }
      if (in_name.empty())
        throw Ort::Exception(name_ + ": input " + std::to_string(i) + " (" + in_names[i] +
                                 ") is omitted (empty name); every input of this op is required",
                             ORT_INVALID_ARGUMENT);
    }
    int64_t k = -1;
    try {
      auto shape = info.GetInputTypeInfo(0).GetTensorTypeAndShapeInfo().GetShape();
      if (!shape.empty() && shape.back() >= 0) k = shape.back();
    } catch (...) {
      k = -1;
    }
    const size_t n_in = info.GetInputCount();
    std::vector<View> views;
    bool all_const = n_in > 1;
    std::vector<Ort::ConstValue> keep;
    for (size_t i = 1; i < n_in; ++i) {
      int is_const = 0;
      Ort::ConstValue v = info.GetTensorConstantInput(i, &is_const);
      if (!is_const) {
        all_const = false;
        break;
      }
      views.push_back(ViewOf(v));
    }
    if (all_const) {
      try {
        if (kind == Kind::kSparseInt4)
          prepared4_ = PrepareInt4(views[0], views[1], views[2], views[3], group_size_, k);
        else
          prepared_ = PrepareFromViews(kind, views, k);
      } catch (const Invalid& e) {
        throw Ort::Exception(name_ + ": malformed packed weight: " + e.what(), ORT_INVALID_ARGUMENT);
      }
    }
  }

  // X, the weight inputs as views (used only when not pre-packed), Y.
  Ort::Status Run(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                  const std::vector<View>& weights, Ort::Custom::Tensor<float>& Y) const {
    try {
      const Shape xs = X.Shape();
      if (xs.empty()) return Ort::Status((name_ + ": X must have rank >= 1, got a scalar").c_str(), ORT_INVALID_ARGUMENT);
      const int64_t k = xs.back();
      int64_t m = 1;
      for (size_t i = 0; i + 1 < xs.size(); ++i)
        if (xs[i] < 0 || __builtin_mul_overflow(m, xs[i], &m))
          return Ort::Status((name_ + ": X shape " + ShapeStr(xs) + " has too many rows").c_str(), ORT_INVALID_ARGUMENT);
      if (k < 0) return Ort::Status((name_ + ": X shape " + ShapeStr(xs) + " is invalid").c_str(), ORT_INVALID_ARGUMENT);
      if (m > 0 && k > 0 && X.Data() == nullptr)
        return Ort::Status((name_ + ": X has no data").c_str(), ORT_INVALID_ARGUMENT);
      if (kind_ == Kind::kSparseInt4) return RunInt4(ctx, X, weights, Y, xs, m, k);
      std::optional<Prepared> local;
      const Prepared* prep = prepared_ ? &*prepared_ : nullptr;
      if (!prep) {
        try {
          local = PrepareFromViews(kind_, weights, k);
        } catch (const Invalid& e) {
          return Ort::Status((name_ + ": malformed packed weight: " + e.what()).c_str(), ORT_INVALID_ARGUMENT);
        }
        prep = &*local;
      }
      const bool nm24 = kind_ == Kind::kNm24Int8;
      const int64_t want = nm24 ? CeilDiv(k, 4) : CeilDiv(k, 8);
      if (want != prep->disk_cols || k < prep->kneed) {
        std::string msg = name_ + ": X has K=" + std::to_string(k) + " columns but the packed weight was made for ";
        msg += nm24 ? "2*ceil(K/4)=" + std::to_string(2 * prep->disk_cols) + " values per row"
                    : "ceil(K/8)=" + std::to_string(prep->disk_cols) + " mask bytes per row";
        if (k < prep->kneed) msg += " with columns up to " + std::to_string(prep->kneed - 1) + " in use";
        return Ort::Status(msg.c_str(), ORT_INVALID_ARGUMENT);
      }
      Shape ys = xs;
      ys.back() = prep->packed.n;
      float* y = Y.Allocate(ys);
      if (m == 0 || prep->packed.n == 0) return Ort::Status(nullptr);
      MatMul(prep->packed, X.Data(), y, m, k, isa_, OrtParallel(ctx));
      return Ort::Status(nullptr);
    } catch (const Ort::Exception& e) {
      return Ort::Status((name_ + ": " + e.what()).c_str(), e.GetOrtErrorCode());
    } catch (const std::exception& e) {
      return Ort::Status((name_ + ": " + e.what()).c_str(), ORT_RUNTIME_EXCEPTION);
    }
  }

  Ort::Status RunInt4(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X, const std::vector<View>& weights,
                      Ort::Custom::Tensor<float>& Y, const Shape& xs, int64_t m, int64_t k) const {
    std::optional<Prepared4> local;
    const Prepared4* prep = prepared4_ ? &*prepared4_ : nullptr;
    if (!prep) {
      try {
        local = PrepareInt4(weights[0], weights[1], weights[2], weights[3], group_size_, k);
      } catch (const Invalid& e) {
        return Ort::Status((name_ + ": malformed packed weight: " + e.what()).c_str(), ORT_INVALID_ARGUMENT);
      }
      prep = &*local;
    }
    if (CeilDiv(k, 8) != prep->disk_cols || k < prep->kneed) {
      std::string msg = name_ + ": X has K=" + std::to_string(k) +
                        " columns but the packed weight was made for ceil(K/8)=" + std::to_string(prep->disk_cols) +
                        " mask bytes per row";
      if (k < prep->kneed) msg += " with columns up to " + std::to_string(prep->kneed - 1) + " in use";
      return Ort::Status(msg.c_str(), ORT_INVALID_ARGUMENT);
    }
    Shape ys = xs;
    ys.back() = prep->packed.n;
    float* y = Y.Allocate(ys);
    if (m == 0 || prep->packed.n == 0) return Ort::Status(nullptr);
    MatMulInt4(prep->packed, X.Data(), y, m, k, isa_, OrtParallel(ctx));
    return Ort::Status(nullptr);
  }

  static Ort::Status InferShape(Ort::ShapeInferContext& ctx) {
    if (ctx.GetInputCount() < 2) return Ort::Status(nullptr);
    auto x = ctx.GetInputShape(0);
    const auto& w = ctx.GetInputShape(1);
    if (x.empty() || w.size() != 2) return Ort::Status(nullptr);
    x.back() = w[0];
    return ctx.SetOutputShape(0, x);
  }

 private:
  Kind kind_;
  std::string name_;
  Isa isa_ = Isa::kScalar;
  int64_t accuracy_level_ = 0;
  int64_t group_size_ = 0;
  std::optional<Prepared> prepared_;
  std::optional<Prepared4> prepared4_;
};

using Ort::Custom::Tensor;

struct SparseMatMulInt8 {
  SparseMatMulInt8(const OrtApi*, const OrtKernelInfo* info) : k_(Kind::kSparseInt8, info) {}
  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<uint8_t>& mask,
                      const Tensor<int8_t>& values, const Tensor<int64_t>& row_ptr, const Tensor<float>& scales,
                      Tensor<float>& y) {
    std::vector<View> w = {
        ViewOf(mask, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8), ViewOf(values, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8),
        ViewOf(row_ptr, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64), ViewOf(scales, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)};
    return k_.Run(ctx, x, w, y);
  }
  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx) { return Kernel::InferShape(ctx); }
  Kernel k_;
};

struct SparseMatMulFP32 {
  SparseMatMulFP32(const OrtApi*, const OrtKernelInfo* info) : k_(Kind::kSparseFp32, info) {}
  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<uint8_t>& mask,
                      const Tensor<float>& values, const Tensor<int64_t>& row_ptr, Tensor<float>& y) {
    std::vector<View> w = {ViewOf(mask, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8),
                           ViewOf(values, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
                           ViewOf(row_ptr, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64)};
    return k_.Run(ctx, x, w, y);
  }
  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx) { return Kernel::InferShape(ctx); }
  Kernel k_;
};

struct Sparse24MatMulInt8 {
  Sparse24MatMulInt8(const OrtApi*, const OrtKernelInfo* info) : k_(Kind::kNm24Int8, info) {}
  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<int8_t>& values,
                      const Tensor<uint8_t>& meta, const Tensor<float>& scales, Tensor<float>& y) {
    std::vector<View> w = {ViewOf(values, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8),
                           ViewOf(meta, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8),
                           ViewOf(scales, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)};
    return k_.Run(ctx, x, w, y);
  }
  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx) { return Kernel::InferShape(ctx); }
  Kernel k_;
};

struct SparseMatMulInt4 {
  SparseMatMulInt4(const OrtApi*, const OrtKernelInfo* info) : k_(Kind::kSparseInt4, info) {}
  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<float>& x, const Tensor<uint8_t>& mask,
                      const Tensor<uint8_t>& values, const Tensor<int64_t>& row_ptr, const Tensor<float>& scales,
                      Tensor<float>& y) {
    std::vector<View> w = {
        ViewOf(mask, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8), ViewOf(values, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8),
        ViewOf(row_ptr, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64), ViewOf(scales, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)};
    return k_.Run(ctx, x, w, y);
  }
  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx) { return Kernel::InferShape(ctx); }
  Kernel k_;
};

// The lite struct op, with kernel creation going through CreateKernelV2 so that a malformed
// weight becomes an OrtStatus (a clean session-creation error) instead of an exception that
// crosses the C ABI.
template <typename Op>
struct SafeOp : Ort::Custom::OrtLiteCustomStruct<Op> {
  explicit SafeOp(const char* name) : Ort::Custom::OrtLiteCustomStruct<Op>(name, "CPUExecutionProvider") {
    OrtCustomOp::CreateKernelV2 = [](const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                     void** kernel) -> OrtStatusPtr {
      try {
        *kernel = op->CreateKernel(op, api, info);
        return nullptr;
      } catch (const Ort::Exception& e) {
        return api->CreateStatus(e.GetOrtErrorCode(), e.what());
      } catch (const std::exception& e) {
        return api->CreateStatus(ORT_FAIL, e.what());
      }
    };
  }
};

}  // namespace

// For FusedFFN (ffn.cc): its sparse int8 inputs get the SparseMatMulInt8 validation and packing.
Packed PackSparseInt8(const ConstInput& mask, const ConstInput& values, const ConstInput& row_ptr,
                      const ConstInput& scales, int64_t k) {
  auto view = [](const ConstInput& c) {
    View v;
    v.type = static_cast<ONNXTensorElementDataType>(c.type);
    v.shape = c.shape;
    v.data = c.data;
    v.count = c.count;
    return v;
  };
  const View s = view(scales);
  return PrepareBitmask(view(mask), view(values), view(row_ptr), &s, true, k).packed;
}

}  // namespace ffsplit

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) return nullptr;  // cannot even report: the runtime is older than API version ORT_API_VERSION
  Ort::InitApi(api);
  using namespace ffsplit;
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> ops[] = {
      std::unique_ptr<Ort::Custom::OrtLiteCustomOp>(new SafeOp<SparseMatMulInt8>("SparseMatMulInt8")),
      std::unique_ptr<Ort::Custom::OrtLiteCustomOp>(new SafeOp<SparseMatMulFP32>("SparseMatMulFP32")),
      std::unique_ptr<Ort::Custom::OrtLiteCustomOp>(new SafeOp<Sparse24MatMulInt8>("Sparse24MatMulInt8")),
      std::unique_ptr<Ort::Custom::OrtLiteCustomOp>(new SafeOp<SparseMatMulInt4>("SparseMatMulInt4")),
  };
  // One domain object for the life of the process: ORT keeps pointers to it in every session.
  static std::mutex mu;
  static std::vector<Ort::CustomOpDomain> domains;
  try {
    std::lock_guard<std::mutex> lock(mu);
    Ort::CustomOpDomain domain{"ffsplit"};
    for (auto& op : ops) domain.Add(op.get());
    domain.Add(FusedFFNCustomOp());
    domain.Add(FusedFFNNBitsCustomOp());
    Ort::UnownedSessionOptions so(options);
    so.Add(domain);
    domains.push_back(std::move(domain));
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
