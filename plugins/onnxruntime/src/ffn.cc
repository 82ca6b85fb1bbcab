// ffsplit::FusedFFN (ONNX Runtime CPU kernel): the whole split FFN in one node.
//
// Inputs, attributes and semantics: ffsplit_export/ops/_ffn.py (the NumPy reference). The heavy
// parts are dense float32; the light parts are SparseMatMulInt8 inputs, validated and packed by
// the same code as that op. Up / gate light products reuse the matmul kernels and dispatch
// (MatMul in dispatch.cc, every ISA path); the light down projection is re-stored input-major
// (InputMajor in ffn.h) so that with skip=1 a light neuron whose activation is exactly zero costs
// no byte of its down column. Every weight must be a constant initializer (packed at session
// creation). Exact float32 compute; a non-finite output is recomputed in float64 by the
// reference's rules (as dispatch.cc FixNonFinite does for the matmul ops).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "ffn.h"
#include "ffn_attrs.h"

namespace ffsplit {

size_t InputMajor::bytes_of_neuron(int64_t j) const {
  size_t n = 0;
  for (int64_t c = 0; c < chunks; ++c) n += static_cast<size_t>(off[c * (l + 1) + j + 1] - off[c * (l + 1) + j]);
  return n;
}

InputMajor ToInputMajor(const Packed& p, int64_t chunk_words) {
  InputMajor w;
  w.d = p.n;
  w.l = p.words * 64;  // refined by the caller (the op's L); segments exist for every neuron < l
  w.words = (w.d + 63) / 64;
  w.chunk_words = std::max<int64_t>(1, std::min<int64_t>(chunk_words, std::max<int64_t>(w.words, 1)));
  w.chunks = w.words ? (w.words + w.chunk_words - 1) / w.chunk_words : 0;
  w.scales = p.scales;
  return w;
}

namespace {

// ------------------------------------------------------------------ input-major packing

// Fills w (d, l, chunk geometry set) from the row-major packed W[D, L].
void FillInputMajor(InputMajor& w, const Packed& p) {
  const int64_t l = w.l, cw = w.chunk_words, rows_per_chunk = cw * 64;
  std::vector<int64_t> cnt(static_cast<size_t>(w.chunks * l), 0);
  for (int64_t d = 0; d < p.n; ++d) {
    const int64_t c = d / rows_per_chunk;
    for (int64_t wi = 0; wi < p.words; ++wi) {
      uint64_t bits = p.mask[static_cast<size_t>(d * p.words + wi)];
      while (bits) {
        const int64_t j = wi * 64 + __builtin_ctzll(bits);
        bits &= bits - 1;
        ++cnt[static_cast<size_t>(c * l + j)];
      }
    }
  }
  w.off.assign(static_cast<size_t>(w.chunks * (l + 1)), 0);
  int64_t pos = 0;
  for (int64_t c = 0; c < w.chunks; ++c) {
    for (int64_t j = 0; j < l; ++j) {
      w.off[static_cast<size_t>(c * (l + 1) + j)] = pos;
      pos += cw * 8 + (cnt[static_cast<size_t>(c * l + j)] + 7) / 8 * 8;
    }
    w.off[static_cast<size_t>(c * (l + 1) + l)] = pos;
  }
  w.blob.assign(static_cast<size_t>(pos) + 64, 0);
  std::vector<int64_t> fill(static_cast<size_t>(w.chunks * l), 0);
  for (int64_t d = 0; d < p.n; ++d) {
    const int64_t c = d / rows_per_chunk, bit = d % rows_per_chunk;
    int64_t vi = p.row_ptr[static_cast<size_t>(d)];
    for (int64_t wi = 0; wi < p.words; ++wi) {
      uint64_t bits = p.mask[static_cast<size_t>(d * p.words + wi)];
      while (bits) {
        const int64_t j = wi * 64 + __builtin_ctzll(bits);
        bits &= bits - 1;
        uint8_t* seg = w.blob.data() + w.off[static_cast<size_t>(c * (l + 1) + j)];
        uint64_t word;
        std::memcpy(&word, seg + (bit / 64) * 8, 8);
        word |= uint64_t{1} << (bit % 64);
        std::memcpy(seg + (bit / 64) * 8, &word, 8);
        int64_t& f = fill[static_cast<size_t>(c * l + j)];
        seg[cw * 8 + f] = static_cast<uint8_t>(p.values_i8[static_cast<size_t>(vi)]);
        ++f;
        ++vi;
      }
    }
  }
}

// ------------------------------------------------------------------ scalar kernels

void DenseScalar(const float* w, int64_t k, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy,
                 int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t r = 0; r < m; ++r) {
      float s = 0.0f;
      for (int64_t i = 0; i < k; ++i) s += w[n * k + i] * x[r * ldx + i];
      y[r * ldy + n] = s;
    }
}

void ScatterScalar(const InputMajor& w, int64_t c, const float* a, int64_t lda, int64_t nrows,
                   const int32_t* neurons, int64_t count, bool skip, float* acc, int64_t ldacc) {
  const int64_t cw = w.chunk_words;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t j = neurons[i];
    const uint8_t* seg = w.blob.data() + w.off[static_cast<size_t>(c * (w.l + 1) + j)];
    const int8_t* v = reinterpret_cast<const int8_t*>(seg + cw * 8);
    for (int64_t wi = 0; wi < cw; ++wi) {
      uint64_t bits;
      std::memcpy(&bits, seg + wi * 8, 8);
      while (bits) {
        const int64_t col = wi * 64 + __builtin_ctzll(bits);
        bits &= bits - 1;
        const float code = static_cast<float>(*v++);
        for (int64_t r = 0; r < nrows; ++r) {
          const float av = a[r * lda + j];
          if (skip && av == 0.0f) continue;
          acc[r * ldacc + col] += av * code;
        }
      }
    }
  }
}

}  // namespace

const FfnKernels& FfnKernelsScalar() {
  static const FfnKernels k{DenseScalar, ScatterScalar};
  return k;
}

namespace {

bool NonFinite(float v) { return !std::isfinite(v); }

// float64 dot products for the non-finite recompute (dense semantics: every term multiplies)
float ExactDense(const float* w, const float* x, int64_t k) {
  double s = 0.0;
  for (int64_t i = 0; i < k; ++i) s += static_cast<double>(w[i]) * static_cast<double>(x[i]);
  return static_cast<float>(s);
}

// one output of the SparseMatMulInt8 contract in float64 (the non-finite recompute of RowsOf)
float ExactSparseRow(const Packed& p, const float* xr, int64_t n) {
  const uint64_t* mrow = p.mask.data() + n * p.words;
  int64_t vi = p.row_ptr[static_cast<size_t>(n)];
  const double s = p.scales[static_cast<size_t>(n)];
  double acc = 0.0;
  for (int64_t w = 0; w < p.words; ++w) {
    uint64_t bits = mrow[w];
    while (bits) {
      const int64_t col = w * 64 + __builtin_ctzll(bits);
      bits &= bits - 1;
      acc += static_cast<double>(xr[col]) * (static_cast<double>(p.values_i8[static_cast<size_t>(vi)]) * s);
      ++vi;
    }
  }
  return static_cast<float>(acc);
}

// y[r * p.n + n] for the light rows n in [n0, n1) with the ISA's row-dot kernel, non-finite
// outputs recomputed exactly (as dispatch.cc does for the whole matrix)
void RowsOf(const Packed& p, const float* x, float* y, int64_t m, int64_t k, int64_t n0, int64_t n1, Isa isa) {
  switch (isa) {
    case Isa::kAvx512Vnni:
    case Isa::kAvx512Vbmi2: avx512vbmi2::RowDot(p, x, y, m, k, n0, n1); break;
    case Isa::kAvx512: avx512::RowDot(p, x, y, m, k, n0, n1); break;
    case Isa::kAvx2: avx2::RowDot(p, x, y, m, k, n0, n1); break;
    default: scalar::Rows(p, x, y, m, k, n0, n1); break;
  }
  for (int64_t r = 0; r < m; ++r)
    for (int64_t n = n0; n < n1; ++n)
      if (!std::isfinite(y[r * p.n + n])) y[r * p.n + n] = ExactSparseRow(p, x + r * k, n);
}

// the light down output d of one activation row a_l[L], by the reference's rules
float ExactLightDown(const InputMajor& w, const float* a_l, int64_t d, bool skip) {
  const int64_t cw = w.chunk_words, c = d / (cw * 64), p = d % (cw * 64), wi = p / 64, bit = p % 64;
  const double s = w.scales[static_cast<size_t>(d)];
  double acc = 0.0;
  for (int64_t j = 0; j < w.l; ++j) {
    if (skip && a_l[j] == 0.0f) continue;
    const uint8_t* seg = w.blob.data() + w.off[static_cast<size_t>(c * (w.l + 1) + j)];
    uint64_t word;
    std::memcpy(&word, seg + wi * 8, 8);
    if (!((word >> bit) & 1)) continue;
    int64_t idx = __builtin_popcountll(word & ((uint64_t{1} << bit) - 1));
    for (int64_t q = 0; q < wi; ++q) {
      uint64_t m;
      std::memcpy(&m, seg + q * 8, 8);
      idx += __builtin_popcountll(m);
    }
    const int8_t code = static_cast<int8_t>(seg[cw * 8 + idx]);
    acc += static_cast<double>(a_l[j]) * (static_cast<double>(code) * s);
  }
  return static_cast<float>(acc);
}

struct OrtPar final : Parallel {
  explicit OrtPar(OrtKernelContext* ctx) : ctx_(ctx) {}
  void For(size_t total, void (*fn)(void*, size_t), void* data) const override {
    if (total == 0) return;
    if (total == 1) return fn(data, 0);
    Ort::KernelContext(ctx_).ParallelFor(fn, total, 0, data);
  }
  OrtKernelContext* ctx_;
};

template <class F>
void ParFor(const Parallel& par, size_t n, F& f) {
  par.For(n, [](void* d, size_t i) { (*static_cast<F*>(d))(i); }, &f);
}

const char* const kInputNames[] = {"X",          "up_heavy",     "up_bias",     "up_mask",     "up_values",
                                   "up_row_ptr", "up_scales",    "down_heavy",  "down_mask",   "down_values",
                                   "down_row_ptr", "down_scales", "down_bias",  "gate_heavy",  "gate_bias",
                                   "gate_mask",  "gate_values",  "gate_row_ptr", "gate_scales"};

struct Proj {  // up or gate: heavy dense [H, D], bias [F], light packed [L, D]
  std::vector<float> heavy;
  std::vector<float> bias;
  Packed light;
};

class FusedFFNKernel {
 public:
  FusedFFNKernel(const OrtApi& api, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    const FfnAttrs attrs = ReadFfnAttrs(api, info, "FusedFFN");
    name_ = attrs.name;
    act_ = attrs.act;
    gated_ = attrs.gated;
    skip_ = attrs.skip;
    threshold_ = attrs.threshold;
    const size_t want = gated_ ? 19 : 13;
    if (ki.GetInputCount() != want)
      Fail(std::string("with gated=") + (gated_ ? "1" : "0") + " the op takes " + std::to_string(want) + " inputs, got " +
           std::to_string(ki.GetInputCount()));
    std::vector<ConstInput> in(want);
    std::vector<Ort::ConstValue> keep;
    for (size_t i = 0; i < want; ++i) {
      std::string nm;
      try {
        nm = ki.GetInputName(i);
      } catch (...) {
        nm.clear();
      }
      if (nm.empty()) Fail(std::string("input ") + kInputNames[i] + " is omitted (empty name); it is required");
      if (i == 0) continue;
      int is_const = 0;
      Ort::ConstValue v = ki.GetTensorConstantInput(i, &is_const);
      if (!is_const)
        Fail(std::string("input ") + kInputNames[i] + " must be a constant initializer (weights are packed once)");
      auto ti = v.GetTensorTypeAndShapeInfo();
      in[i].type = ti.GetElementType();
      in[i].shape = ti.GetShape();
      in[i].count = static_cast<int64_t>(ti.GetElementCount());
      in[i].data = v.GetTensorRawData();
      for (int64_t dim : in[i].shape)
        if (dim < 0 || dim >= (int64_t{1} << 31))
          Fail(std::string(kInputNames[i]) + " has a dimension out of range [0, 2^31)");
    }
    try {
      // up_heavy fixes H and D
      const ConstInput& uh = in[1];
      if (uh.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || uh.shape.size() != 2)
        Fail("up_heavy must be float32 [H, D]");
      h_ = uh.shape[0];
      d_ = uh.shape[1];
      if (d_ == 0) Fail("up_heavy has D = 0 columns; the model width must be positive");
      LoadProj(up_, in, 1, "up");
      l_ = up_.light.n;
      f_ = h_ + l_;
      CheckBias(in[2], f_, "up_bias");
      up_.bias.assign(static_cast<const float*>(in[2].data), static_cast<const float*>(in[2].data) + f_);
      if (gated_) {
        const ConstInput& gh = in[13];
        if (gh.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || gh.shape != std::vector<int64_t>{h_, d_})
          Fail("gate_heavy must be float32 [H, D] = [" + std::to_string(h_) + ", " + std::to_string(d_) + "]");
        LoadProj(gate_, in, 13, "gate");
        if (gate_.light.n != l_)
          Fail("the gate light weight has " + std::to_string(gate_.light.n) + " rows, up has " + std::to_string(l_));
        CheckBias(in[14], f_, "gate_bias");
        gate_.bias.assign(static_cast<const float*>(in[14].data), static_cast<const float*>(in[14].data) + f_);
      }
      const ConstInput& dh = in[7];
      if (dh.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || dh.shape != std::vector<int64_t>{d_, h_})
        Fail("down_heavy must be float32 [D, H] = [" + std::to_string(d_) + ", " + std::to_string(h_) + "]");
      down_heavy_.assign(static_cast<const float*>(dh.data), static_cast<const float*>(dh.data) + d_ * h_);
      Packed dl = PackSparseInt8(in[8], in[9], in[10], in[11], l_);
      if (dl.n != d_) Fail("the down light weight has " + std::to_string(dl.n) + " rows; D = " + std::to_string(d_));
      CheckBias(in[12], d_, "down_bias");
      down_bias_.assign(static_cast<const float*>(in[12].data), static_cast<const float*>(in[12].data) + d_);
      // skip=1: input-major (a silent neuron's column is never read); skip=0: the row-major packing
      // and the matmul kernels (measured faster when every column is read anyway)
      down_ = ToInputMajor(dl, ChunkWords(d_));
      down_.l = l_;
      if (skip_)
        FillInputMajor(down_, dl);
      else
        down_rows_ = std::move(dl);
    } catch (const Ort::Exception&) {
      throw;
    } catch (const std::exception& e) {
      Fail(std::string("malformed input: ") + e.what());
    }
    try {
      isa_ = SelectIsa(false);
    } catch (const std::exception& e) {
      Fail(e.what());
    }
    if (isa_ == Isa::kAvx512Vnni) isa_ = Isa::kAvx512Vbmi2;  // exact float32: no int8 activations
    kern_ = isa_ == Isa::kScalar ? &FfnKernelsScalar() : &FfnKernelsAvx2();
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    return FfnCompute(context, d_, name_,
                      [&](const float* x, float* y, int64_t m) { Run(x, y, m, OrtPar(context)); });
  }

 private:
  [[noreturn]] void Fail(const std::string& msg) const {
    throw Ort::Exception(name_ + ": " + msg, ORT_INVALID_ARGUMENT);
  }
  static int64_t ChunkWords(int64_t d) {
    const int64_t words = (d + 63) / 64;
    return std::max<int64_t>(1, (words + 3) / 4);  // 4 chunks of output rows: enough tasks for a few threads
  }
  void CheckBias(const ConstInput& b, int64_t n, const char* name) const {
    if (b.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || b.shape != std::vector<int64_t>{n})
      Fail(std::string(name) + " must be float32 [" + std::to_string(n) + "]");
  }
  void LoadProj(Proj& p, const std::vector<ConstInput>& in, size_t at, const char* name) {
    const ConstInput& hv = in[at];
    p.heavy.assign(static_cast<const float*>(hv.data), static_cast<const float*>(hv.data) + h_ * d_);
    const size_t lb = at == 1 ? 3 : 15;
    try {
      p.light = PackSparseInt8(in[lb], in[lb + 1], in[lb + 2], in[lb + 3], d_);
    } catch (const std::exception& e) {
      Fail(std::string(name) + " light weight: " + e.what());
    }
  }

  // u[M, F] = concat(x @ heavy.T, light(x)) + bias
  // rows: when given, only these light rows (ascending) are computed (the others of ul / u are unused)
  void Project(const Proj& p, const float* x, float* u, float* ul, int64_t m, const Parallel& par,
               const std::vector<int32_t>* rows = nullptr) const {
    if (l_ > 0 && rows == nullptr) MatMul(p.light, x, ul, m, d_, isa_, par);
    if (l_ > 0 && rows != nullptr && !rows->empty()) {
      constexpr size_t kPer = 64;  // listed rows per task; contiguous runs go to the kernel together
      const size_t count = rows->size();
      auto light = [&](size_t t) {
        const size_t i0 = t * kPer, i1 = std::min(count, i0 + kPer);
        for (size_t i = i0; i < i1;) {
          size_t e = i + 1;
          while (e < i1 && (*rows)[e] == (*rows)[e - 1] + 1) ++e;
          RowsOf(p.light, x, ul, m, d_, (*rows)[i], (*rows)[e - 1] + 1, isa_);
          i = e;
        }
      };
      ParFor(par, (count + kPer - 1) / kPer, light);
    }
    constexpr int64_t kRows = 32;
    const int64_t tasks = (h_ + kRows - 1) / kRows;
    auto heavy = [&](size_t t) {
      const int64_t n0 = static_cast<int64_t>(t) * kRows, n1 = std::min(h_, n0 + kRows);
      kern_->dense(p.heavy.data(), d_, x, d_, m, u, f_, n0, n1);
      for (int64_t r = 0; r < m; ++r)
        for (int64_t n = n0; n < n1; ++n)
          if (NonFinite(u[r * f_ + n])) u[r * f_ + n] = ExactDense(p.heavy.data() + n * d_, x + r * d_, d_);
    };
    ParFor(par, static_cast<size_t>(tasks), heavy);
    for (int64_t r = 0; r < m; ++r) {
      float* ur = u + r * f_;
      if (l_ > 0) std::memcpy(ur + h_, ul + r * l_, static_cast<size_t>(l_) * sizeof(float));
      for (int64_t n = 0; n < f_; ++n) ur[n] += p.bias[static_cast<size_t>(n)];
    }
  }

  void Run(const float* x, float* y, int64_t m, const Parallel& par) const {
    std::vector<float> u(static_cast<size_t>(m * f_)), ul(static_cast<size_t>(m * l_)), g;
    const float thr = threshold_;
    // gated, thresholds, few rows (decode): CATS order. The gate first; a light neuron silent
    // (|act(gate)| <= threshold) in every row costs neither its up row nor its down column.
    constexpr int64_t kCatsMaxM = 4;
    const bool cats = gated_ && thr > 0.0f && l_ > 0 && m <= kCatsMaxM;
    std::vector<float> sl;
    if (gated_) {
      g.resize(static_cast<size_t>(m * f_));
      Project(gate_, x, g.data(), ul.data(), m, par);
    }
    if (cats) {
      sl.resize(static_cast<size_t>(m * l_));
      std::vector<uint8_t> live(static_cast<size_t>(l_), 0);
      constexpr int64_t kNeurons = 1024;
      auto silence = [&](size_t t) {
        const int64_t j0 = static_cast<int64_t>(t) * kNeurons, j1 = std::min(l_, j0 + kNeurons);
        for (int64_t r = 0; r < m; ++r)
          for (int64_t j = j0; j < j1; ++j) {
            const float sv = static_cast<float>(ActOf(act_, g[static_cast<size_t>(r * f_ + h_ + j)]));
            sl[static_cast<size_t>(r * l_ + j)] = sv;
            if (!(std::fabs(sv) <= thr)) live[static_cast<size_t>(j)] = 1;
          }
      };
      ParFor(par, static_cast<size_t>((l_ + kNeurons - 1) / kNeurons), silence);
      std::vector<int32_t> rows;
      for (int64_t j = 0; j < l_; ++j)
        if (live[static_cast<size_t>(j)]) rows.push_back(static_cast<int32_t>(j));
      Project(up_, x, u.data(), ul.data(), m, par, &rows);
    } else {
      Project(up_, x, u.data(), ul.data(), m, par);
    }
    // activation (in place in u), in parallel blocks
    const int64_t total = m * f_;
    constexpr int64_t kBlock = 2048;
    float* ud = u.data();
    const float* gd = g.data();
    const float* sd = sl.data();
    auto act = [&](size_t t) {
      const int64_t i0 = static_cast<int64_t>(t) * kBlock, i1 = std::min(total, i0 + kBlock);
      // calibrated skipping (thr > 0): a light neuron with |act(gate)| or |act(up)| <= thr is silent
      if (cats) {  // light: act(gate) from the silence pass; an unread up row is never multiplied
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t r = i / f_, n = i % f_;
          if (n < h_) {
            ud[i] = static_cast<float>(ActOf(act_, gd[i])) * ud[i];
          } else {
            const float s = sd[r * l_ + n - h_];
            ud[i] = std::fabs(s) <= thr ? 0.0f : s * ud[i];
          }
        }
      } else if (gated_) {
        for (int64_t i = i0; i < i1; ++i) {
          const float s = static_cast<float>(ActOf(act_, gd[i]));
          ud[i] = thr > 0.0f && i % f_ >= h_ && std::fabs(s) <= thr ? 0.0f : s * ud[i];
        }
      } else {
        for (int64_t i = i0; i < i1; ++i) {
          const float s = static_cast<float>(ActOf(act_, ud[i]));
          ud[i] = thr > 0.0f && i % f_ >= h_ && std::fabs(s) <= thr ? 0.0f : s;
        }
      }
    };
    ParFor(par, static_cast<size_t>((total + kBlock - 1) / kBlock), act);
    // skip=0: the light down product with the matmul kernels (row-major packing)
    std::vector<float> yl_all;
    if (!skip_ && l_ > 0) {
      std::vector<float> al(static_cast<size_t>(m * l_));
      for (int64_t r = 0; r < m; ++r)
        std::memcpy(al.data() + r * l_, ud + r * f_ + h_, static_cast<size_t>(l_) * sizeof(float));
      yl_all.resize(static_cast<size_t>(m * d_));
      MatMul(down_rows_, al.data(), yl_all.data(), m, l_, isa_, par);
    }
    // skip=1: light neurons to visit per block of 16 rows
    constexpr int64_t kRowBlock = 16;
    const int64_t nblocks = (m + kRowBlock - 1) / kRowBlock;
    std::vector<std::vector<int32_t>> active(static_cast<size_t>(skip_ ? nblocks : 0));
    for (int64_t b = 0; b < static_cast<int64_t>(active.size()); ++b) {
      auto& list = active[static_cast<size_t>(b)];
      const int64_t r0 = b * kRowBlock, r1 = std::min(m, r0 + kRowBlock);
      for (int64_t j = 0; j < l_; ++j) {
        bool any = !skip_;
        for (int64_t r = r0; r < r1 && !any; ++r) any = ud[r * f_ + h_ + j] != 0.0f;
        if (any) list.push_back(static_cast<int32_t>(j));
      }
    }
    // down: one task per chunk of output rows (light scatter + heavy dot + bias)
    const int64_t cw64 = down_.chunk_words * 64;
    auto down = [&](size_t t) {
      const int64_t c = static_cast<int64_t>(t);
      const int64_t d0 = c * cw64, d1 = std::min(d_, d0 + cw64);
      std::vector<float> acc(static_cast<size_t>(kRowBlock * cw64)), yh(static_cast<size_t>(kRowBlock * cw64));
      for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t r0 = b * kRowBlock, nr = std::min(m, r0 + kRowBlock) - r0;
        std::fill(acc.begin(), acc.end(), 0.0f);
        if (skip_ && l_ > 0 && !active[static_cast<size_t>(b)].empty()) {
          const auto& list = active[static_cast<size_t>(b)];
          kern_->scatter(down_, c, ud + r0 * f_ + h_, f_, nr, list.data(), static_cast<int64_t>(list.size()), skip_,
                         acc.data(), cw64);
        }
        if (h_ > 0) kern_->dense(down_heavy_.data(), h_, ud + r0 * f_, f_, nr, yh.data() - d0, cw64, d0, d1);
        for (int64_t r = 0; r < nr; ++r) {
          float* yr = y + (r0 + r) * d_;
          for (int64_t d = d0; d < d1; ++d) {
            const float hv = h_ > 0 ? yh[static_cast<size_t>(r * cw64 + d - d0)] : 0.0f;
            const float lv = !skip_ ? (l_ > 0 ? yl_all[static_cast<size_t>((r0 + r) * d_ + d)] : 0.0f)
                                    : acc[static_cast<size_t>(r * cw64 + d - d0)] * down_.scales[static_cast<size_t>(d)];
            float out = (hv + lv) + down_bias_[static_cast<size_t>(d)];
            if (NonFinite(out)) {
              const float* ar = ud + (r0 + r) * f_;
              const float he = h_ > 0 ? ExactDense(down_heavy_.data() + d * h_, ar, h_) : 0.0f;
              // skip=0: the matmul kernels already recomputed their non-finite outputs exactly
              const float le = l_ == 0 ? 0.0f : skip_ ? ExactLightDown(down_, ar + h_, d, true) : lv;
              out = (he + le) + down_bias_[static_cast<size_t>(d)];
            }
            yr[d] = out;
          }
        }
      }
    };
    ParFor(par, static_cast<size_t>(down_.chunks), down);
  }

  std::string name_;
  Act act_ = Act::kRelu;
  bool gated_ = false, skip_ = false;
  float threshold_ = 0.0f;  // skip=1: light neurons with |act| <= threshold_ are skipped too
  int64_t h_ = 0, l_ = 0, d_ = 0, f_ = 0;
  Proj up_, gate_;
  std::vector<float> down_heavy_, down_bias_;
  InputMajor down_;      // skip=1
  Packed down_rows_;     // skip=0
  Isa isa_ = Isa::kScalar;
  const FfnKernels* kern_ = nullptr;
};

struct FusedFFNOp : Ort::CustomOpBase<FusedFFNOp, FusedFFNKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new FusedFFNKernel(api, info);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, (std::string("ffsplit::FusedFFN: ") + e.what()).c_str());
    }
  }
  const char* GetName() const { return "FusedFFN"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 19; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case 3: case 8: case 15: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case 4: case 9: case 16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
      case 5: case 10: case 17: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < 13 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) {
    // Y has X's shape; its last dim is D = up_heavy's columns (known even when X's is not: two
    // unknown dims would make a following Reshape's inference fail)
    if (ctx.GetInputCount() < 2) return nullptr;
    auto shape = ctx.GetInputShape(0);
    if (shape.empty()) return nullptr;  // rank unknown (a scalar X fails at run time)
    const auto w = ctx.GetInputShape(1);
    if (w.size() == 2 && w[1].IsInt() && w[1].AsInt() >= 0) shape.back() = w[1];
    Ort::Status st = ctx.SetOutputShape(0, shape);
    return st.release();
  }
};

}  // namespace

const OrtCustomOp* FusedFFNCustomOp() {
  static const FusedFFNOp op;
  return &op;
}

}  // namespace ffsplit
