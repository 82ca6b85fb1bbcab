// ffsplit::FusedFFNNBits (ONNX Runtime CPU kernel): a split FFN whose parts are dense float32 or
// MatMulNBits-layout int8 / int4, in one node.
//
// Inputs, attributes and semantics: ffsplit_export/ops/_ffn.py (NBITS_DOC, NBITS_SEMANTICS and the
// NumPy reference fused_ffn_nbits_reference). Every weight must be a constant initializer; the
// parts are validated and packed when the kernel is created:
//  * up / gate (heavy and light) and the down parts are stored per output neuron in tiles of 8
//    (ffn_nbits.h NbPart: a tile's codes of one block contiguous, so a tile is one sequential
//    stream; int8 codes stored signed), read by the dot kernels (ffn_nbits_avx2.cc, scalar below;
//    at level 4 on a CPU with AVX-512 VNNI ffn_nbits_vnni.cc's wider kernels, same outputs);
//    gated with skip=1 the light up rows stay one per neuron (MatMulNBits order): only live rows
//    are read;
//  * the light down part W[D, L] is re-stored neuron-major (NbDown: per chunk of output rows a
//    neuron's codes contiguous, same codes and scales; chunks as long as the threads allow, see
//    DownChunkRows) when skip=1, so a skipped light neuron's bytes are never read; with skip=0 it is
//    tiled like the others (every column is read anyway).
//  * input_threshold > 0 (ungated, skip=1; TEAL-style): the light up's input is X' (channels with
//    |x| <= input_threshold zeroed; level 4 quantizes X'). M > 1 (or a row holding NaN / inf): X' then
//    the tiled part as usual. M = 1: the light up is also stored input-major (NbIm, packed at session
//    creation only then; FFSPLIT_NBITS_UP=tiled turns it off for benchmarks) and only the kept
//    channels' rows are read, per block of channels summed (int8 x' times codes, in pairs of channels,
//    at level 4; float32 at level 0) and the block scale applied per neuron, in neuron ranges
//    (FFSPLIT_NBITS_IM_PIECES, default 2) run in the same ParallelFor as the heavy up pieces.
//    Measured (MPT shape, 2 layers, 1 thread, 50 % channels skipped): input-major 1.13-1.19 ms per
//    layer against 1.27-1.30 ms for zeroing and reading the tiled part whole.
// Each phase (up and gate products; live light up rows; down) is one ParallelFor over about 16
// pieces of equal bytes (heavy and light parts together); X and a are quantized once per phase.
// Prefill with M >= 256 rows: the rows in equal blocks of 86-128, one task each, all phases of a block
// on its thread (see Run); at level 4 with VNNI the products of M >= 64 rows are panel GEMMs (tiled
// int8 / int4 parts: ffn_nbits_vnni.cc Panels; dense float32 parts: DenseQ) and the activation runs in
// 16 lanes (Act16).
// accuracy_level 0: float32 compute ((u - z) * x summed per block, times the block scale).
// accuracy_level 4: the activations of each integer product (X for up / gate, a for down) are
// quantized to int8 per block of K (scale max|.| / 127), integer dot products with the codes, the
// zero point as sum(q * u) - z * sum(q). Rows of X (or of a) holding NaN / inf are computed at
// level 0. At level 4 the AVX2 path computes the activations by float32 formulas, values near the
// threshold (or zero, large, non-finite) again by the float64 reference, so the skip decisions are
// the reference's. Gated with skip (few rows): the gate first, then only the up rows of light
// neurons live in some row (CATS order). Non-finite outputs are recomputed in float64 by the reference's
// rules (as dispatch.cc FixNonFinite does for the matmul ops).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "ffn.h"
#include "ffn_attrs.h"
#include "ffn_nbits.h"

namespace ffsplit {

float NbPart::At(int64_t row, int64_t col) const {
  if (bits == 32) return dense[static_cast<size_t>(row * k + col)];
  const int64_t b = col / bs;
  const size_t ix = static_cast<size_t>(Index(row, b));
  return static_cast<float>(Code(row, b, col % bs) - z[ix]) * sc[ix];
}

int DownCode(const uint8_t* c, int bits, int64_t d) {
  if (bits == 8) return static_cast<int8_t>(c[d]);
  const int64_t g = d / 16, i = d % 16;
  const uint8_t byte = c[g * 8 + (i & 7)];
  return i < 8 ? byte & 15 : byte >> 4;
}

float NbDown::At(int64_t row, int64_t j) const {
  const int64_t c0 = row / rows * rows;
  const int u = DownCode(Seg(j, c0), bits, row - c0);
  const size_t sb = static_cast<size_t>(SBase(row / rows, j / bs) + row);
  return static_cast<float>(u - z[sb]) * scales[sb];
}

void NbQuantize(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t bs, int64_t kpad, int8_t* qx, float* xs,
                int32_t* xsum) {
  const int64_t nb = kpad / bs;
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * ldx;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * bs, k1 = std::min(k, k0 + bs);
      int8_t* q = qx + r * kpad + k0;
      float amax = 0.0f;
      for (int64_t i = k0; i < k1; ++i) amax = std::max(amax, std::fabs(xr[i]));
      for (int64_t i = k0; i < k1; ++i)
        if (std::isnan(xr[i])) amax = std::numeric_limits<float>::quiet_NaN();
      int32_t sum = 0;
      if (!std::isfinite(amax) || amax == 0.0f) {
        std::memset(q, 0, static_cast<size_t>(bs));
        xs[r * nb + b] = std::isfinite(amax) ? 0.0f : std::numeric_limits<float>::quiet_NaN();
      } else {
        const float scale = amax / 127.0f, inv = 1.0f / scale;
        for (int64_t i = k0; i < k0 + bs; ++i) {
          int v = 0;
          if (i < k1) v = static_cast<int>(std::nearbyintf(xr[i] * inv));
          v = std::max(-127, std::min(127, v));
          q[i - k0] = static_cast<int8_t>(v);
          sum += v;
        }
        xs[r * nb + b] = scale;
      }
      xsum[r * nb + b] = sum;
    }
  }
}

namespace {

// ------------------------------------------------------------------ scalar kernels

void DotFScalar(const NbPart& p, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy, const int32_t* list,
                int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t n = list ? list[i] : i;
    for (int64_t r = 0; r < m; ++r) {
      const float* xr = x + r * ldx;
      float acc = 0.0f;
      for (int64_t b = 0; b < p.nb; ++b) {
        const size_t ix = static_cast<size_t>(p.Index(n, b));
        const float z = static_cast<float>(p.z[ix]);
        float s = 0.0f;
        for (int64_t e = 0; e < p.bs; ++e) s += (static_cast<float>(p.Code(n, b, e)) - z) * xr[b * p.bs + e];
        acc += s * p.sc[ix];
      }
      y[r * ldy + n] = acc;
    }
  }
}

void DotQScalar(const NbPart& p, const NbQ& qx, int64_t m, float* y, int64_t ldy, const int32_t* list, int64_t i0,
                int64_t i1) {
  const int64_t kpad = p.nb * p.bs;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t n = list ? list[i] : i;
    for (int64_t r = 0; r < m; ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < p.nb; ++b) {
        const int8_t* q = qx.q + r * kpad + b * p.bs;
        int32_t s = 0;
        for (int64_t e = 0; e < p.bs; ++e) s += p.Code(n, b, e) * q[e];
        const size_t ix = static_cast<size_t>(p.Index(n, b));
        s -= p.z[ix] * qx.sum[r * p.nb + b];
        acc += p.sc[ix] * qx.s[r * p.nb + b] * static_cast<float>(s);
      }
      y[r * ldy + n] = acc;
    }
  }
}

inline int64_t DownEnd(const NbDown& w, int64_t d1) { return std::min(w.dpad, (d1 + 31) / 32 * 32); }

void DownFScalar(const NbDown& w, const float* a, const int32_t* list, int64_t count, int64_t d0, int64_t d1,
                 float* acc, float* y) {
  const int64_t de = DownEnd(w, d1), len = de - d0;
  const NbDown::Chunk ch = w.ChunkOf(d0);
  for (int64_t i = 0; i < count;) {
    const int64_t b = list[i] / w.bs;
    std::fill(acc, acc + len, 0.0f);
    const int8_t* z = w.z.data() + w.SBase(d0 / w.rows, b);
    for (; i < count && list[i] / w.bs == b; ++i) {
      const int64_t j = list[i];
      const float av = a[j];
      const uint8_t* c = ch.Of(j);
      for (int64_t d = d0; d < de; ++d)
        acc[d - d0] += av * static_cast<float>(DownCode(c, w.bits, d - d0) - z[d]);
    }
    const float* s = w.scales.data() + w.SBase(d0 / w.rows, b);
    for (int64_t d = d0; d < d1; ++d) y[d] += s[d] * acc[d - d0];
  }
}

void DownQScalar(const NbDown& w, const int8_t* qa, const float* sa, const int32_t* list, int64_t count, int64_t d0,
                 int64_t d1, int32_t* acc, float* y) {
  const int64_t de = DownEnd(w, d1), len = de - d0;
  const NbDown::Chunk ch = w.ChunkOf(d0);
  for (int64_t i = 0; i < count;) {
    const int64_t b = list[i] / w.bs;
    std::fill(acc, acc + len, 0);
    int32_t sumq = 0;
    for (; i < count && list[i] / w.bs == b; ++i) {
      const int64_t j = list[i];
      const int q = qa[j];
      if (!q) continue;
      sumq += q;
      const uint8_t* c = ch.Of(j);
      for (int64_t d = d0; d < de; ++d) acc[d - d0] += q * DownCode(c, w.bits, d - d0);
    }
    const float* s = w.scales.data() + w.SBase(d0 / w.rows, b);
    const int8_t* z = w.z.data() + w.SBase(d0 / w.rows, b);
    const float sab = sa[b];
    for (int64_t d = d0; d < d1; ++d) y[d] += s[d] * sab * static_cast<float>(acc[d - d0] - z[d] * sumq);
  }
}

}  // namespace

void ImFScalar(const NbIm& w, const float* x, const int32_t* ks, int64_t cnt, int64_t n0, int64_t n1, float* acc,
               float* y) {
  const int64_t len = n1 - n0;
  for (int64_t i = 0; i < cnt;) {
    const int64_t b = ks[i] / w.bs;
    std::fill(acc, acc + len, 0.0f);
    float xsum = 0.0f;
    for (; i < cnt && ks[i] / w.bs == b; ++i) {
      const int64_t k = ks[i];
      const float xv = x[k];
      xsum += xv;
      for (int64_t n = n0; n < n1; ++n) acc[n - n0] += static_cast<float>(w.Code(k, n)) * xv;
    }
    const float* s = w.sc.data() + b * w.lpad;
    const int8_t* z = w.z.data() + b * w.lpad;
    for (int64_t n = n0; n < n1; ++n) y[n] += s[n] * (acc[n - n0] - static_cast<float>(z[n]) * xsum);
  }
}

void ImQScalar(const NbIm& w, const int8_t* q, const float* xs, const int32_t* xsum, const int32_t* ks, int64_t cnt,
               int64_t n0, int64_t n1, int32_t* acc, float* y) {
  const int64_t len = n1 - n0;
  for (int64_t i = 0; i < cnt;) {
    const int64_t b = ks[i] / w.bs;
    std::fill(acc, acc + len, 0);
    for (; i < cnt && ks[i] / w.bs == b; ++i) {
      const int64_t k = ks[i];
      const int qv = q[k];
      if (!qv) continue;
      for (int64_t n = n0; n < n1; ++n) acc[n - n0] += qv * w.Code(k, n);
    }
    const float* s = w.sc.data() + b * w.lpad;
    const int8_t* z = w.z.data() + b * w.lpad;
    for (int64_t n = n0; n < n1; ++n) y[n] += s[n] * xs[b] * static_cast<float>(acc[n - n0] - z[n] * xsum[b]);
  }
}

const NbKernels& NbKernelsScalar() {
  static const NbKernels k{DotFScalar, DotQScalar, DownFScalar, DownQScalar, NbQuantize, nullptr, ImFScalar, ImQScalar};
  return k;
}

namespace {

bool Bad(float v) { return !std::isfinite(v); }

struct NbPar final : Parallel {
  explicit NbPar(OrtKernelContext* ctx) : ctx_(ctx) {}
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

// the tasks one after another on the calling thread (inside a task of ORT's pool)
struct SerialPar final : Parallel {
  void For(size_t total, void (*fn)(void*, size_t), void* data) const override {
    for (size_t i = 0; i < total; ++i) fn(data, i);
  }
};

// true when some value of v[0..n) is NaN or infinite (one vectorizable pass)
bool AnyBad(const float* v, int64_t n) {
  bool any = false;
  for (int64_t i = 0; i < n; ++i) any |= !(std::fabs(v[i]) <= std::numeric_limits<float>::max());
  return any;
}

const char* const kNames[] = {"X",
                              "up_heavy_B", "up_heavy_scales", "up_heavy_zero_points",
                              "up_light_B", "up_light_scales", "up_light_zero_points",
                              "up_bias",
                              "down_heavy_B", "down_heavy_scales", "down_heavy_zero_points",
                              "down_light_B", "down_light_scales", "down_light_zero_points",
                              "down_bias",
                              "gate_heavy_B", "gate_heavy_scales", "gate_heavy_zero_points",
                              "gate_light_B", "gate_light_scales", "gate_light_zero_points",
                              "gate_bias"};
constexpr size_t kInputs = 22;

bool Pow2Block(int64_t v) { return v >= 16 && v <= 256 && (v & (v - 1)) == 0; }

// the float64 dot product of one part row with x (dense semantics over k < K)
float ExactRow(const NbPart& p, const float* x, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < p.k; ++i) s += static_cast<double>(x[i]) * static_cast<double>(p.At(n, i));
  return static_cast<float>(s);
}

class NbKernel {
 public:
  NbKernel(const OrtApi& api, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    const FfnAttrs attrs = ReadFfnAttrs(api, info, "FusedFFNNBits");
    name_ = attrs.name;
    act_ = attrs.act;
    gated_ = attrs.gated;
    skip_ = attrs.skip;
    thr_ = attrs.threshold;
    if (OrtStatus* st = api.KernelInfoGetAttribute_float(info, "product_threshold", &pthr_)) {
      api.ReleaseStatus(st);
      pthr_ = 0.0f;
    }
    if (!std::isfinite(pthr_) || pthr_ < 0.0f)
      Fail("product_threshold must be a finite float >= 0, got " + std::to_string(pthr_));
    if (pthr_ > 0.0f && !(gated_ && skip_))
      Fail("product_threshold > 0 needs gated=1 and skip=1 (it skips light neurons by |act(gate) * up|)");
    {
      float t = 0.0f;
      if (OrtStatus* st = api.KernelInfoGetAttribute_float(info, "input_threshold", &t)) {
        api.ReleaseStatus(st);
        t = 0.0f;
      }
      if (!std::isfinite(t) || t < 0.0f)
        Fail("input_threshold must be a finite float >= 0, got " + std::to_string(t));
      if (t > 0.0f && (gated_ || !skip_))
        Fail("input_threshold=" + std::to_string(t) +
             " needs gated=0 and skip=1 (it skips the input channels of an ungated FFN's light up projection); "
             "set input_threshold=0 otherwise");
      tin_ = t;
    }
    hbits_ = static_cast<int>(FfnIntAttr(api, info, "heavy_bits", -1));
    lbits_ = static_cast<int>(FfnIntAttr(api, info, "light_bits", -1));
    if (hbits_ != 4 && hbits_ != 8 && hbits_ != 32)
      Fail("the int attribute heavy_bits must be 4, 8 or 32 (dense float32), got " +
           (hbits_ == -1 ? std::string("none") : std::to_string(hbits_)));
    if (lbits_ != 4 && lbits_ != 8)
      Fail("the int attribute light_bits must be 4 or 8, got " +
           (lbits_ == -1 ? std::string("none") : std::to_string(lbits_)));
    hbs_ = FfnIntAttr(api, info, "heavy_block_size", 0);
    lbs_ = FfnIntAttr(api, info, "light_block_size", 0);
    if (!Pow2Block(lbs_)) Fail("light_block_size must be a power of two in 16..256, got " + std::to_string(lbs_));
    level_ = FfnIntAttr(api, info, "accuracy_level", 0);
    if (level_ != 0 && level_ != 4)
      Fail("accuracy_level must be 0 (exact float32) or 4 (int8 activations), got " + std::to_string(level_));

    const size_t count = ki.GetInputCount();
    if (count > kInputs) Fail("takes at most 22 inputs, got " + std::to_string(count));
    std::vector<ConstInput> in(kInputs);
    std::vector<bool> has(kInputs, false);
    for (size_t i = 0; i < count; ++i) {
      std::string nm;
      try {
        nm = ki.GetInputName(i);
      } catch (...) {
        nm.clear();
      }
      if (nm.empty()) continue;
      has[i] = true;
      if (i == 0) continue;
      int is_const = 0;
      Ort::ConstValue v = ki.GetTensorConstantInput(i, &is_const);
      if (!is_const)
        Fail(std::string("input ") + kNames[i] + " must be a constant initializer (weights are packed once)");
      auto ti = v.GetTensorTypeAndShapeInfo();
      in[i].type = ti.GetElementType();
      in[i].shape = ti.GetShape();
      in[i].count = static_cast<int64_t>(ti.GetElementCount());
      in[i].data = v.GetTensorRawData();
      for (int64_t dim : in[i].shape)
        if (dim < 0 || dim >= (int64_t{1} << 31)) Fail(std::string(kNames[i]) + " has a dimension out of range [0, 2^31)");
    }
    if (!has[0]) Fail("input X is omitted; it is required");
    if (!gated_)
      for (size_t i = 15; i < kInputs; ++i)
        if (has[i]) Fail(std::string("input ") + kNames[i] + " is given with gated=0; set gated=1 or leave it out");
    for (size_t i : {size_t{4}, size_t{5}, size_t{11}, size_t{12}})
      if (!has[i]) Fail(std::string("input ") + kNames[i] + " is required");
    if (gated_)
      for (size_t i : {size_t{18}, size_t{19}})
        if (!has[i]) Fail(std::string("input ") + kNames[i] + " is required with gated=1");
    const bool heavy = has[1];
    if (heavy && hbits_ != 32 && !Pow2Block(hbs_))
      Fail("heavy_block_size must be a power of two in 16..256 for heavy_bits " + std::to_string(hbits_) + ", got " +
           std::to_string(hbs_));
    for (size_t i : {size_t{8}, size_t{15}})
      if (heavy != has[i] && (i != 15 || gated_))
        Fail(std::string("input ") + kNames[i] + (heavy ? " is required (up heavy is given)" : " is given but up heavy is absent (H = 0)"));
    // D from the down light part (rows), L from the up light part (rows), H from the up heavy part
    if (in[11].shape.size() < 2 || in[4].shape.empty()) Fail("down_light_B / up_light_B must be 3-D (MatMulNBits B)");
    d_ = in[11].shape[0];
    l_ = in[4].shape[0];
    h_ = heavy ? (in[1].shape.empty() ? -1 : in[1].shape[0]) : 0;
    if (d_ <= 0) Fail("down_light_B has D = 0 rows; the model width must be positive");
    if (h_ < 0) Fail("up_heavy_B must be 2-D (bits 32) or 3-D");
    f_ = h_ + l_;
    // gated with skipping: the light up rows are read for live neurons only (row-major, not tiled)
    Load(up_l_, in, has, 4, l_, d_, lbits_, lbs_, "up light", !(gated_ && skip_));
    Load(down_l_rows_, in, has, 11, d_, l_, lbits_, lbs_, "down light");
    if (heavy) {
      Load(up_h_, in, has, 1, h_, d_, hbits_, hbs_, "up heavy");
      Load(down_h_, in, has, 8, d_, h_, hbits_, hbs_, "down heavy");
    }
    if (gated_) {
      Load(gate_l_, in, has, 18, l_, d_, lbits_, lbs_, "gate light");
      if (heavy) Load(gate_h_, in, has, 15, h_, d_, hbits_, hbs_, "gate heavy");
    }
    Bias(in, has, 7, f_, up_b_);
    Bias(in, has, 14, d_, down_b_);
    if (gated_) Bias(in, has, 21, f_, gate_b_);
    up_l_finite_ = true;
    for (float s : up_l_.sc) up_l_finite_ &= std::isfinite(s);
    for (int64_t j = h_; j < f_; ++j) up_l_finite_ &= std::isfinite(up_b_[static_cast<size_t>(j)]);
    // The light down, tiled (read whole; skipped neurons have a = 0 and contribute exactly 0) and,
    // with skip=1, also neuron-major (a skipped neuron's column is never read). A call reads the
    // neuron-major copy when at most kNmMaxKept of the light neurons are kept; between that and all
    // kept, which layout is faster depends on the machine (samples/bench_fused_ffn_nbits.py
    // --layers, weights streamed from DRAM, 50 % skipped, 1 thread): on a 2-core EPYC the tiled down
    // read whole was 1.16x faster than neuron-major reading half the bytes, on a 2-core Xeon
    // neuron-major was 1.09x faster. So single-row calls (decode) time both: the first 2 * kTune
    // alternate the layouts, then the one with the lower median is kept (DownTuner; its choice is
    // appended to the file FFSPLIT_NBITS_TUNE_LOG names, if set when the session is created). Only
    // neuron-major when skip=1 and a down scale is non-finite (0 * NaN would reach y) or with
    // FFSPLIT_NBITS_DOWN=neurons; only tiled with FFSPLIT_NBITS_DOWN=rows (benchmark overrides).
    bool down_finite = true;
    for (float s : down_l_rows_.sc) down_finite &= std::isfinite(s);
    const std::string layout = std::getenv("FFSPLIT_NBITS_DOWN") ? std::getenv("FFSPLIT_NBITS_DOWN") : "";
    has_nm_ = layout == "neurons" || (skip_ && (layout != "rows" || !down_finite));
    has_rows_ = layout != "neurons" && !(skip_ && !down_finite);
    if (has_nm_) down_l_ = ToNeuronMajor(down_l_rows_);
    if (has_nm_ && has_rows_) {
      tuner_ = std::make_unique<DownTuner>();
      if (const char* log = std::getenv("FFSPLIT_NBITS_TUNE_LOG")) tuner_->log = log;
    }
    // input_threshold > 0: the light up also input-major (decode reads only the kept channels' rows),
    // unless a light up scale is non-finite (0 * NaN must reach the output: the tiled path then) or
    // FFSPLIT_NBITS_UP=tiled (benchmark override: zero the channels and read the tiled part whole)
    {
      bool up_sc_finite = true;
      for (float sc : up_l_.sc) up_sc_finite &= std::isfinite(sc);
      const char* up_layout = std::getenv("FFSPLIT_NBITS_UP");
      has_im_ = tin_ > 0.0f && up_sc_finite && !(up_layout && std::string(up_layout) == "tiled");
      if (has_im_) up_im_ = ToInputMajor(up_l_);
    }
    if (!has_rows_) down_l_rows_ = NbPart();
    try {
      isa_ = SelectIsa(level_ == 4);  // auto: avx512vnni at level 4 where the CPU has it
    } catch (const std::exception& e) {
      Fail(e.what());
    }
    nk_ = isa_ == Isa::kScalar ? &NbKernelsScalar()
          : isa_ == Isa::kAvx512Vnni ? &NbKernelsAvx512Vnni()
                                     : &NbKernelsAvx2();
    fk_ = isa_ == Isa::kScalar ? &FfnKernelsScalar() : &FfnKernelsAvx2();
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    return FfnCompute(context, d_, name_,
                      [&](const float* x, float* y, int64_t m) { Run(x, y, m, NbPar(context)); });
  }

 private:
  [[noreturn]] void Fail(const std::string& msg) const { throw Ort::Exception(name_ + ": " + msg, ORT_INVALID_ARGUMENT); }
  static std::string Shape(const std::vector<int64_t>& s) {
    std::string o = "[";
    for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
    return o + "]";
  }

  void Bias(const std::vector<ConstInput>& in, const std::vector<bool>& has, size_t i, int64_t n,
            std::vector<float>& out) const {
    if (!has[i]) {
      out.assign(static_cast<size_t>(n), 0.0f);
      return;
    }
    if (in[i].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || in[i].shape != std::vector<int64_t>{n})
      Fail(std::string(kNames[i]) + " must be float32 [" + std::to_string(n) + "], got shape " + Shape(in[i].shape));
    const float* p = static_cast<const float*>(in[i].data);
    out.assign(p, p + n);
  }

  // validates and packs one part (inputs at, at+1, at+2) of W[n, k] (NbPart: tiled unless `tiled` is false)
  void Load(NbPart& p, const std::vector<ConstInput>& in, const std::vector<bool>& has, size_t at, int64_t n,
            int64_t k, int bits, int64_t bs, const char* name, bool tiled = true) const {
    const ConstInput& b = in[at];
    const std::string nm(name);
    p.bits = bits;
    p.n = n;
    p.k = k;
    if (bits == 32) {
      if (b.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || b.shape != std::vector<int64_t>{n, k})
        Fail(nm + " B must be float32 [" + std::to_string(n) + ", " + std::to_string(k) + "] (bits 32), got shape " +
             Shape(b.shape));
      if (has[at + 1] || has[at + 2]) Fail(nm + ": a dense float32 part (bits 32) takes no scales / zero_points");
      const float* d = static_cast<const float*>(b.data);
      p.dense.assign(d, d + n * k);
      return;
    }
    p.bs = bs;
    p.nb = (k + bs - 1) / bs;
    p.blob = bs * bits / 8;
    p.tiled = tiled;
    if (b.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || b.shape != std::vector<int64_t>{n, p.nb, p.blob})
      Fail(nm + " B must be uint8 [" + std::to_string(n) + ", " + std::to_string(p.nb) + ", " + std::to_string(p.blob) +
           "] (K=" + std::to_string(k) + ", bits=" + std::to_string(bits) + ", block_size=" + std::to_string(bs) +
           "), got shape " + Shape(b.shape));
    const ConstInput& s = in[at + 1];
    if (!has[at + 1] || s.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || s.shape != std::vector<int64_t>{n * p.nb})
      Fail(nm + " scales must be float32 [" + std::to_string(n * p.nb) + "] (N * n_blocks)" +
           (has[at + 1] ? ", got shape " + Shape(s.shape) : std::string(", absent")));
    const int64_t per_row = (p.nb * bits + 7) / 8;
    if (has[at + 2]) {
      const ConstInput& z = in[at + 2];
      if (z.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || z.shape != std::vector<int64_t>{n * per_row})
        Fail(nm + " zero_points must be uint8 [" + std::to_string(n * per_row) +
             "] (N * ceil(n_blocks * bits / 8), packed like B), got shape " + Shape(z.shape));
    }
    const uint8_t* bd = static_cast<const uint8_t*>(b.data);
    const float* sd = static_cast<const float*>(s.data);
    const uint8_t* zd = has[at + 2] ? static_cast<const uint8_t*>(in[at + 2].data) : nullptr;
    const int64_t rows = tiled ? (n + 7) / 8 * 8 : n;  // tiles padded with zero rows
    p.codes.assign(static_cast<size_t>(rows * p.nb * p.blob + 64), 0);
    p.sc.assign(static_cast<size_t>(rows * p.nb), 0.0f);
    p.z.assign(static_cast<size_t>(rows * p.nb), 0);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t bb = 0; bb < p.nb; ++bb) {
        const int64_t ix = p.Index(r, bb);
        uint8_t* dst = p.codes.data() + ix * p.blob;
        const uint8_t* src = bd + (r * p.nb + bb) * p.blob;
        int zp = 1 << (bits - 1);
        if (zd) {
          const uint8_t byte = zd[r * per_row + (bits == 8 ? bb : bb / 2)];
          zp = bits == 8 ? byte : ((bb & 1) ? byte >> 4 : byte & 15);
        }
        if (bits == 8) {  // c = u - 128 as int8, z - 128
          for (int64_t e = 0; e < p.blob; ++e) dst[e] = static_cast<uint8_t>(src[e] ^ 0x80);
          zp -= 128;
        } else {
          std::memcpy(dst, src, static_cast<size_t>(p.blob));
        }
        p.z[static_cast<size_t>(ix)] = static_cast<int8_t>(zp);
        p.sc[static_cast<size_t>(ix)] = sd[r * p.nb + bb];
      }
  }

  // Chunk rows of the neuron-major light down (one task each at decode): D / max(2, cores), a
  // multiple of 64, at most 1024. A chunk of R rows stores a neuron's codes of those rows as one
  // segment of R / 2 bytes (4 bits), and the longer the segments the faster a random half of them
  // is read: on the 2-core Xeon, 0.70 of the sequential speed for 128-byte pieces, 0.79 for 512-byte
  // ones, 0.86 for 1 KB (samples/memprobe/scattered_reads.py, 1 thread), so 2 chunks there; with
  // more cores, more and shorter chunks keep every thread busy. The rows do not change any output
  // (each row sums its blocks in the same order). FFSPLIT_NBITS_DOWN_ROWS=R overrides (tests,
  // benchmarks).
  static int64_t DownChunkRows(int64_t d) {
    const int64_t dpad = (d + 31) / 32 * 32;
    int64_t rows = 0;
    if (const char* e = std::getenv("FFSPLIT_NBITS_DOWN_ROWS")) rows = std::atoll(e) / 64 * 64;
    if (rows <= 0) {
      const int64_t cores = std::max<int64_t>(2, std::thread::hardware_concurrency());
      rows = std::min<int64_t>(1024, ((d + cores - 1) / cores + 63) / 64 * 64);
    }
    return std::min(dpad, std::max<int64_t>(64, rows));
  }

  static NbIm ToInputMajor(const NbPart& p) {
    NbIm w;
    w.bits = p.bits;
    w.l = p.n;
    w.k = p.k;
    w.bs = p.bs;
    w.nb = p.nb;
    w.lpad = (p.n + 63) / 64 * 64;
    w.codes.assign(static_cast<size_t>(p.kpad() * w.RowBytes() + 64), 0);
    w.sc.assign(static_cast<size_t>(w.nb * w.lpad), 0.0f);
    w.z.assign(static_cast<size_t>(w.nb * w.lpad), 0);
    for (int64_t n = 0; n < p.n; ++n) {
      for (int64_t b = 0; b < p.nb; ++b) {
        const size_t ix = static_cast<size_t>(p.Index(n, b));
        w.sc[static_cast<size_t>(b * w.lpad + n)] = p.sc[ix];
        w.z[static_cast<size_t>(b * w.lpad + n)] = p.z[ix];
      }
      for (int64_t k = 0; k < p.k; ++k) {
        const int c = p.Code(n, k / p.bs, k % p.bs);
        uint8_t* row = const_cast<uint8_t*>(w.Row(k));
        if (w.bits == 8) {
          row[n] = static_cast<uint8_t>(c);
        } else {  // per 64 neurons 32 bytes: neuron i low nibble, 32 + i high nibble
          const int64_t g = n / 64, i = n % 64;
          uint8_t& byte = row[g * 32 + (i & 31)];
          byte = static_cast<uint8_t>(byte | (c << (i < 32 ? 0 : 4)));
        }
      }
    }
    return w;
  }

  static NbDown ToNeuronMajor(const NbPart& p) {
    NbDown w;
    w.bits = p.bits;
    w.d = p.n;
    w.l = p.k;
    w.bs = p.bs;
    w.nb = p.nb;
    w.dpad = (w.d + 31) / 32 * 32;
    w.rows = DownChunkRows(w.d);
    int64_t off = 0;
    for (int64_t c0 = 0; c0 < w.dpad; c0 += w.rows) {
      w.chunk_off.push_back(off);
      const int64_t rows = std::min(w.dpad, c0 + w.rows) - c0;
      off += w.l * (w.bits == 8 ? rows : rows / 2);
    }
    w.codes.assign(static_cast<size_t>(off + 64), 0);
    w.scales.assign(static_cast<size_t>(w.chunks() * w.nb * w.rows + 32), 0.0f);
    w.z.assign(static_cast<size_t>(w.chunks() * w.nb * w.rows + 32), 0);
    for (int64_t d = 0; d < w.d; ++d) {
      for (int64_t b = 0; b < w.nb; ++b) {
        const size_t ix = static_cast<size_t>(p.Index(d, b));
        const size_t o = static_cast<size_t>(w.SBase(d / w.rows, b) + d);
        w.scales[o] = p.sc[ix];
        w.z[o] = p.z[ix];
      }
      for (int64_t j = 0; j < w.l; ++j) {
        const int c = p.Code(d, j / p.bs, j % p.bs);
        const int64_t c0 = d / w.rows * w.rows, dr = d - c0;
        uint8_t* seg = const_cast<uint8_t*>(w.Seg(j, c0));
        if (w.bits == 8)
          seg[dr] = static_cast<uint8_t>(c);
        else  // per 16 rows: 8 bytes, rows 0..7 in the low nibbles, 8..15 in the high ones
          seg[(dr / 16) * 8 + (dr & 7)] = static_cast<uint8_t>(seg[(dr / 16) * 8 + (dr & 7)] | (c << ((dr & 8) ? 4 : 0)));
      }
    }
    return w;
  }

  // int8 activations of one block size (level 4), once per product input
  struct Quant {
    std::vector<int8_t> q, eo;
    std::vector<float> s;
    std::vector<int32_t> sum;
    NbQ in() const { return NbQ{q.data(), eo.empty() ? nullptr : eo.data(), s.data(), sum.data()}; }
  };
  static bool NeedEo(const NbPart& p) { return p.bits == 4 && p.bs >= 64; }
  // x [m][k] (row stride ldx) per block of bs, zero-padded to kpad; eo: also the even / odd order
  void QuantizeX(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t bs, int64_t kpad, bool eo,
                 Quant& out) const {
    const int64_t nb = kpad / bs;
    out.q.assign(static_cast<size_t>(m * kpad), 0);
    out.s.assign(static_cast<size_t>(m * nb), 0.0f);
    out.sum.assign(static_cast<size_t>(m * nb), 0);
    nk_->quant(x, ldx, m, k, bs, kpad, out.q.data(), out.s.data(), out.sum.data());
    out.eo.clear();
    if (eo) {  // the even / odd order of the AVX2 int4 kernels (kpad is a multiple of 64)
      out.eo.resize(out.q.size());
      for (int64_t g = 0; g < m * kpad; g += 64)
        for (int64_t i = 0; i < 32; ++i) {
          out.eo[static_cast<size_t>(g + i)] = out.q[static_cast<size_t>(g + 2 * i)];
          out.eo[static_cast<size_t>(g + 32 + i)] = out.q[static_cast<size_t>(g + 2 * i + 1)];
        }
    }
  }
  bool Int8(const NbPart& p) const { return level_ == 4 && p.bits != 32; }

  // One piece of work: part p's neurons list[i] (list null: neuron i) for i in [i0, i1), every row
  // r < m: out[r * ldo + neuron]; q: the int8 input (level 4) or null (float32)
  struct Piece {
    const NbPart* p;
    const Quant* q;
    float* out;
    int64_t ldo;
    const int32_t* list;
    int64_t i0, i1;
    const float* x = nullptr;  // the product's input (null: the phase's)
  };

  // xp: the product's float input [m][ldx] (zero-padded to the part's kpad); rows flagged bad
  // (non-finite) are computed in float32; non-finite outputs again in float64 (reference rules)
  void Dot(const Piece& w, const float* xp, int64_t ldx, const std::vector<uint8_t>& bad, int64_t m) const {
    const NbPart& p = *w.p;
    if (w.i1 <= w.i0) return;
    if (p.bits == 32) {
      if (w.list) {
        for (int64_t i = w.i0; i < w.i1; ++i) fk_->dense(p.dense.data(), p.k, xp, ldx, m, w.out, w.ldo, w.list[i], w.list[i] + 1);
      } else if (!(nk_->dense_rows && nk_->dense_rows(p, xp, ldx, m, w.out, w.ldo, w.i0, w.i1))) {
        fk_->dense(p.dense.data(), p.k, xp, ldx, m, w.out, w.ldo, w.i0, w.i1);
      }
    } else if (w.q) {
      nk_->dot_q(p, w.q->in(), m, w.out, w.ldo, w.list, w.i0, w.i1);
      for (int64_t r = 0; r < m; ++r)
        if (bad[static_cast<size_t>(r)]) nk_->dot_f(p, xp + r * ldx, ldx, 1, w.out + r * w.ldo, w.ldo, w.list, w.i0, w.i1);
    } else {
      nk_->dot_f(p, xp, ldx, m, w.out, w.ldo, w.list, w.i0, w.i1);
    }
    for (int64_t r = 0; r < m; ++r) {
      if (!w.list && !AnyBad(w.out + r * w.ldo + w.i0, w.i1 - w.i0)) continue;
      for (int64_t i = w.i0; i < w.i1; ++i) {
        const int64_t n = w.list ? w.list[i] : i;
        float& o = w.out[r * w.ldo + n];
        if (Bad(o)) o = ExactRow(p, xp + r * ldx, n);
      }
    }
  }

  // bytes a pass over one neuron of p reads
  static int64_t RowBytes(const NbPart& p) { return p.bits == 32 ? p.k * 4 : p.nb * (p.blob + 5); }
  // cuts p's neurons (or the list's entries) into pieces of about `target` bytes, whole tiles (or
  // groups of 8 listed rows)
  static void Cut(std::vector<Piece>& out, const NbPart& p, const Quant* q, float* o, int64_t ldo,
                  const std::vector<int32_t>* list, int64_t target) {
    const int64_t count = list ? static_cast<int64_t>(list->size()) : p.n;
    if (count <= 0) return;
    const int64_t pieces = std::max<int64_t>(1, (count * RowBytes(p) + target / 2) / target);
    const int64_t step = ((count + pieces - 1) / pieces + 7) / 8 * 8;  // whole groups of 8 neurons
    for (int64_t i0 = 0; i0 < count; i0 += step)
      out.push_back(Piece{&p, q, o, ldo, list ? list->data() : nullptr, i0, std::min(count, i0 + step)});
  }
  static constexpr int64_t kPieces = 16;  // pieces per phase (equal bytes; threads take them in turn)
  static int64_t Target(std::initializer_list<const NbPart*> parts, int64_t list_rows = -1) {
    int64_t total = 0;
    for (const NbPart* p : parts)
      if (p) total += (list_rows >= 0 && p->n ? list_rows : p->n) * RowBytes(*p);
    return std::max<int64_t>(int64_t{16} << 10, total / kPieces);
  }
  void RunPieces(const std::vector<Piece>& pieces, const float* xp, int64_t ldx, const std::vector<uint8_t>& bad,
                 int64_t m, const Parallel& par) const {
    auto task = [&](size_t t) { Dot(pieces[t], pieces[t].x ? pieces[t].x : xp, ldx, bad, m); };
    ParFor(par, pieces.size(), task);
  }

  // Prefill (m >= kSplitRows): the rows in ceil(m / kRowBlock) blocks of equal size (86..128 rows),
  // one task each, every phase of a block on its thread (quantization, products, activation, down).
  // Otherwise the row-wise work outside the products (serial per phase) bounds the speed-up with
  // threads. A row's result is the same as in any call of >= 64 rows (the kernels' prefill paths).
  static constexpr int64_t kRowBlock = 128, kSplitRows = 2 * kRowBlock;
  void Run(const float* x, float* y, int64_t m, const Parallel& par) const {
    if (m >= kSplitRows) {
      const SerialPar serial;
      const int64_t blocks = (m + kRowBlock - 1) / kRowBlock, rows = (m + blocks - 1) / blocks;
      auto block = [&](size_t t) {
        const int64_t r0 = static_cast<int64_t>(t) * rows;
        if (r0 < m) Run(x + r0 * d_, y + r0 * d_, std::min(rows, m - r0), serial);
      };
      ParFor(par, static_cast<size_t>(blocks), block);
      return;
    }
    // X padded to the widest block grid of the up / gate parts
    int64_t ldx = d_;
    for (const NbPart* p : {&up_h_, &up_l_, &gate_h_, &gate_l_}) ldx = std::max(ldx, p->kpad());
    std::vector<float> xp(static_cast<size_t>(m * ldx), 0.0f);
    std::vector<uint8_t> bad(static_cast<size_t>(m), 0);
    for (int64_t r = 0; r < m; ++r) {
      std::memcpy(xp.data() + r * ldx, x + r * d_, static_cast<size_t>(d_) * sizeof(float));
      bool b = false;
      for (int64_t i = 0; i < d_; ++i) b |= Bad(x[r * d_ + i]);
      bad[static_cast<size_t>(r)] = b;
    }
    // input_threshold: the light up's input X' (channels with |x| <= input_threshold zeroed; NaN kept)
    const bool tin = tin_ > 0.0f;
    std::vector<float> xl;
    if (tin) {
      xl = xp;
      for (float& v : xl) v = std::fabs(v) <= tin_ ? 0.0f : v;
    }
    const float* xlp = tin ? xl.data() : xp.data();
    // decode: the light up from the input-major copy, over the kept channels only
    const bool im = tin && has_im_ && m == 1 && !bad[0];
    // int8 X (level 4): once per block size of the up / gate parts
    Quant qh, ql;
    const bool hq = h_ > 0 && Int8(up_h_), lq = level_ == 4;
    const bool share = hq && lq && up_h_.bs == up_l_.bs && !tin;
    if (hq) QuantizeX(xp.data(), ldx, m, d_, up_h_.bs, up_h_.kpad(), NeedEo(up_h_) || (share && NeedEo(up_l_)), qh);
    if (lq && !share) QuantizeX(xlp, ldx, m, d_, up_l_.bs, up_l_.kpad(), NeedEo(up_l_) && !im, ql);
    const Quant* qhp = hq ? &qh : nullptr;
    const Quant* qlp = lq ? (share ? &qh : &ql) : nullptr;

    std::vector<float> u(static_cast<size_t>(m * f_), 0.0f), g;
    if (gated_) g.assign(static_cast<size_t>(m * f_), 0.0f);
    const float thr = threshold();
    constexpr int64_t kCatsMaxM = 4;
    const bool cats = gated_ && skip_ && l_ > 0 && m <= kCatsMaxM;
    const NbPart* hp = h_ > 0 ? &up_h_ : nullptr;
    std::vector<Piece> pieces;
    {  // phase 1: every product that does not wait for a skip decision
      const int64_t target = Target({hp, cats || im ? nullptr : &up_l_, gated_ && hp ? &gate_h_ : nullptr, gated_ ? &gate_l_ : nullptr});
      if (h_ > 0) Cut(pieces, up_h_, qhp, u.data(), f_, nullptr, target);
      if (!cats && !im) {
        const size_t first = pieces.size();
        Cut(pieces, up_l_, qlp, u.data() + h_, f_, nullptr, target);
        for (size_t i = first; i < pieces.size(); ++i) pieces[i].x = xlp;
      }
      if (gated_) {
        if (h_ > 0) Cut(pieces, gate_h_, qhp, g.data(), f_, nullptr, target);
        Cut(pieces, gate_l_, qlp, g.data() + h_, f_, nullptr, target);
      }
      if (im) {
        RunWithInputMajor(pieces, xp.data(), xlp, ldx, bad, qlp, u.data() + h_, par);
      } else {
        RunPieces(pieces, xp.data(), ldx, bad, m, par);
      }
    }
    if (gated_)
      for (int64_t r = 0; r < m; ++r)
        for (int64_t n = 0; n < f_; ++n) g[static_cast<size_t>(r * f_ + n)] += gate_b_[static_cast<size_t>(n)];
    // s = act(gate) (gated) or act(up); cats: the light part first (it decides the live up rows)
    std::vector<float> sv(static_cast<size_t>(m * f_));
    std::vector<int32_t> redo;
    const std::vector<float>& pre = gated_ ? g : u;
    std::vector<uint8_t> silent;  // cats: [m][L]
    if (cats) {
      silent.assign(static_cast<size_t>(m * l_), 0);
      std::vector<int32_t> live(static_cast<size_t>(l_));
      for (int64_t r = 0; r < m; ++r) Activate(pre.data() + r * f_ + h_, sv.data() + r * f_ + h_, l_, redo);
      // branch-free: the decisions are data-dependent (about a coin flip each at 50 % skipped)
      std::vector<uint8_t> any(static_cast<size_t>(l_), 0);
      for (int64_t r = 0; r < m; ++r) {
        const float* sr = sv.data() + r * f_ + h_;
        uint8_t* qr = silent.data() + r * l_;
        // exact zero act(gate): a = 0 * u = 0 unless u is non-finite (X row or scales non-finite)
        const bool zero_ok = !bad[static_cast<size_t>(r)] && up_l_finite_;
        for (int64_t j = 0; j < l_; ++j) {
          const float s = sr[j];
          const bool quiet = ((thr > 0.0f) & (std::fabs(s) <= thr)) | ((s == 0.0f) & zero_ok);
          qr[j] = quiet;
          any[static_cast<size_t>(j)] |= !quiet;
        }
      }
      int64_t nlive = 0;
      for (int64_t j = 0; j < l_; ++j) {
        live[static_cast<size_t>(nlive)] = static_cast<int32_t>(j);
        nlive += any[static_cast<size_t>(j)];
      }
      live.resize(static_cast<size_t>(nlive));
      pieces.clear();
      Cut(pieces, up_l_, qlp, u.data() + h_, f_, &live, Target({&up_l_}, static_cast<int64_t>(live.size())));
      RunPieces(pieces, xp.data(), ldx, bad, m, par);
    }
    for (int64_t r = 0; r < m; ++r) {
      float* ur = u.data() + r * f_;
      for (int64_t n = 0; n < f_; ++n) ur[n] += up_b_[static_cast<size_t>(n)];
      Activate(pre.data() + r * f_, sv.data() + r * f_, cats ? h_ : f_, redo);  // cats: light done above
    }
    // a (in place in u)
    for (int64_t r = 0; r < m; ++r) {
      float* ur = u.data() + r * f_;
      const float* sr = sv.data() + r * f_;
      if (gated_)
        for (int64_t n = 0; n < h_; ++n) ur[n] *= sr[n];
      else
        std::memcpy(ur, sr, static_cast<size_t>(h_) * sizeof(float));
      if (cats) {
        const uint8_t* sil = silent.data() + r * l_;
        for (int64_t n = h_; n < f_; ++n) ur[n] = sil[n - h_] ? 0.0f : Product(pre[static_cast<size_t>(r * f_ + n)], sr[n], ur[n]);
      } else if (gated_) {
        for (int64_t n = h_; n < f_; ++n)
          ur[n] = thr > 0.0f && std::fabs(sr[n]) <= thr ? 0.0f : Product(pre[static_cast<size_t>(r * f_ + n)], sr[n], ur[n]);
      } else {
        for (int64_t n = h_; n < f_; ++n) ur[n] = thr > 0.0f && std::fabs(sr[n]) <= thr ? 0.0f : sr[n];
      }
    }
    Down(u.data(), y, m, par);
  }

  float threshold() const { return thr_; }

  // a light neuron's a = act(gate) * up (float32); with product_threshold, 0 when |a| <= pthr_ (its
  // down column is then not read). The float32 activation formulas of level 4 may differ from the
  // reference's rounding by an ulp, so products within 1e-5 of the threshold are recomputed from the
  // float64 activation: both levels skip the same neurons.
  float Product(float g, float s, float u) const {
    float a = s * u;
    if (pthr_ <= 0.0f) return a;
    if (level_ == 4 && nk_->act && std::fabs(std::fabs(a) - pthr_) <= 1e-5f * pthr_)
      a = static_cast<float>(ActOf(act_, g)) * u;
    return std::fabs(a) <= pthr_ ? 0.0f : a;
  }

  // phase 1 at decode with input skipping: the pieces (heavy up) and the input-major light up
  // (neuron ranges, multiples of 64, one task each) in one ParallelFor; yl: the light up outputs
  void RunWithInputMajor(const std::vector<Piece>& pieces, const float* xp, const float* xl, int64_t ldx,
                         const std::vector<uint8_t>& bad, const Quant* ql, float* yl, const Parallel& par) const {
    std::vector<int32_t> ks(static_cast<size_t>(d_));
    int64_t cnt = 0;
    for (int64_t k = 0; k < d_; ++k) {  // branch-free (data-dependent)
      ks[static_cast<size_t>(cnt)] = static_cast<int32_t>(k);
      cnt += xl[k] != 0.0f;
    }
    const int64_t ranges = std::max<int64_t>(1, std::min(ImPieces(), (l_ + 63) / 64));
    const int64_t step = ((l_ + ranges - 1) / ranges + 63) / 64 * 64;
    const size_t np = pieces.size();
    auto task = [&](size_t t) {
      if (t < np) return Dot(pieces[t], pieces[t].x ? pieces[t].x : xp, ldx, bad, 1);
      const int64_t n0 = static_cast<int64_t>(t - np) * step, n1 = std::min(l_, n0 + step);
      if (n0 >= n1) return;
      if (ql) {
        std::vector<int32_t> acc(static_cast<size_t>(n1 - n0 + 64));
        nk_->im_q(up_im_, ql->q.data(), ql->s.data(), ql->sum.data(), ks.data(), cnt, n0, n1, acc.data(), yl);
      } else {
        std::vector<float> acc(static_cast<size_t>(n1 - n0 + 64));
        nk_->im_f(up_im_, xl, ks.data(), cnt, n0, n1, acc.data(), yl);
      }
      for (int64_t n = n0; n < n1; ++n)
        if (Bad(yl[n])) yl[n] = ExactRow(up_l_, xl, n);
    };
    ParFor(par, np + static_cast<size_t>((l_ + step - 1) / step), task);
  }
  // neuron ranges of the input-major light up (FFSPLIT_NBITS_IM_PIECES overrides, for benchmarks)
  static int64_t ImPieces() {
    const char* e = std::getenv("FFSPLIT_NBITS_IM_PIECES");
    const int64_t v = e ? std::atoll(e) : 0;
    return v > 0 ? v : kImPieces;
  }
  static constexpr int64_t kImPieces = 2;

  // s[i] = act(v[i]) (float32) for n values: the float64 reference's; at level 4 with a vector kernel
  // its float32 formulas, the values it flags (near the threshold, zeros, large or non-finite) again
  // by the reference, so that the same neurons are skipped
  void Activate(const float* v, float* s, int64_t n, std::vector<int32_t>& redo) const {
    if (level_ == 4 && nk_->act) {
      redo.resize(static_cast<size_t>(std::max<int64_t>(n, 1)));
      const int64_t c = nk_->act(static_cast<int>(act_), skip_ ? thr_ : 0.0f, v, s, n, redo.data());
      for (int64_t i = 0; i < c; ++i) s[redo[static_cast<size_t>(i)]] = static_cast<float>(ActOf(act_, v[redo[static_cast<size_t>(i)]]));
      return;
    }
    for (int64_t i = 0; i < n; ++i) s[i] = static_cast<float>(ActOf(act_, v[i]));
  }

  void Down(const float* a, float* y, int64_t m, const Parallel& par) const {
    // a_h, a_l padded to their block grids; rows of a holding NaN / inf are computed at level 0
    const int64_t kh = h_ > 0 ? down_h_.kpad() : 0;
    const int64_t kl = has_rows_ ? down_l_rows_.kpad() : l_;
    // the layout this call reads: neuron-major when few light neurons are kept (or the only one)
    bool nm = has_nm_;
    int timed = -1;  // the layout this call times for the tuner (single rows, until it has chosen)
    if (has_nm_ && has_rows_) {
      int64_t kept = 0;
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < l_; ++j) kept += a[r * f_ + h_ + j] != 0.0f;
      nm = static_cast<double>(kept) <= kNmMaxKept * static_cast<double>(m * l_);
      if (!nm && m == 1) {
        const int c = tuner_->choice.load(std::memory_order_relaxed);
        if (c >= 0) {
          nm = c == 1;
        } else {
          timed = tuner_->Next();
          nm = timed == 1;
        }
      }
    }
    // records this call's time when it returns (either path)
    struct Timer {
      DownTuner* t;
      int layout;
      std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
      ~Timer() {
        if (layout >= 0)
          t->Add(layout, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
    } timer{tuner_.get(), timed};
    std::vector<float> ah(static_cast<size_t>(m * std::max<int64_t>(kh, 1)), 0.0f),
        al(static_cast<size_t>(m * std::max<int64_t>(kl, 1)), 0.0f);
    std::vector<uint8_t> bad(static_cast<size_t>(m), 0);
    for (int64_t r = 0; r < m; ++r) {
      if (h_ > 0) std::memcpy(ah.data() + r * kh, a + r * f_, static_cast<size_t>(h_) * sizeof(float));
      if (l_ > 0) std::memcpy(al.data() + r * kl, a + r * f_ + h_, static_cast<size_t>(l_) * sizeof(float));
      bool b = false;
      for (int64_t n = 0; n < f_; ++n) b |= Bad(a[r * f_ + n]);
      bad[static_cast<size_t>(r)] = b;
    }
    Quant qh, ql;
    const bool hq = h_ > 0 && Int8(down_h_), lq = level_ == 4 && l_ > 0;
    if (hq) QuantizeX(ah.data(), kh, m, h_, down_h_.bs, kh, NeedEo(down_h_), qh);
    std::vector<int8_t> qa;
    std::vector<float> sa;
    if (lq) {
      if (nm) {
        const int64_t kp = down_l_.nb * down_l_.bs;
        qa.assign(static_cast<size_t>(m * kp), 0);
        sa.assign(static_cast<size_t>(m * down_l_.nb), 0.0f);
        std::vector<int32_t> sums(static_cast<size_t>(m * down_l_.nb));
        nk_->quant(al.data(), kl, m, l_, down_l_.bs, kp, qa.data(), sa.data(), sums.data());
      } else {
        QuantizeX(al.data(), kl, m, l_, down_l_rows_.bs, kl, NeedEo(down_l_rows_), ql);
      }
    }
    std::vector<float> yh(static_cast<size_t>(m * d_), 0.0f), yl(static_cast<size_t>(m * d_), 0.0f);
    // y rows [d0, d1) of every activation row: heavy + light + bias
    auto finish = [&](int64_t d0, int64_t d1) {
      for (int64_t r = 0; r < m; ++r) {
        const float* ar = al.data() + r * kl;
        for (int64_t d = d0; d < d1; ++d) {
          const size_t i = static_cast<size_t>(r * d_ + d);
          float lv = yl[i];
          if (nm && Bad(lv)) lv = ExactLight(ar, d);
          y[i] = (yh[i] + lv) + down_b_[static_cast<size_t>(d)];
        }
      }
    };
    if (!nm) {
      // pieces of output rows, whole tiles, heavy and light together
      const int64_t bytes = (h_ > 0 ? RowBytes(down_h_) : 0) + RowBytes(down_l_rows_);
      const int64_t pieces = std::max<int64_t>(1, std::min(kPieces, d_ * bytes / (int64_t{16} << 10)));
      const int64_t step = ((d_ + pieces - 1) / pieces + 7) / 8 * 8;
      auto task = [&](size_t t) {
        const int64_t d0 = static_cast<int64_t>(t) * step, d1 = std::min(d_, d0 + step);
        if (h_ > 0) Dot(Piece{&down_h_, hq ? &qh : nullptr, yh.data(), d_, nullptr, d0, d1}, ah.data(), kh, bad, m);
        Dot(Piece{&down_l_rows_, lq ? &ql : nullptr, yl.data(), d_, nullptr, d0, d1}, al.data(), kl, bad, m);
        finish(d0, d1);
      };
      ParFor(par, static_cast<size_t>((d_ + step - 1) / step), task);
      return;
    }
    // neuron-major: the light neurons of each row that are not skipped (skip=1: a != 0; else all)
    std::vector<std::vector<int32_t>> lists(static_cast<size_t>(m));
    for (int64_t r = 0; r < m; ++r) {
      auto& list = lists[static_cast<size_t>(r)];
      list.resize(static_cast<size_t>(l_));
      const float* ar = al.data() + r * kl;
      int64_t cnt = 0;
      for (int64_t j = 0; j < l_; ++j) {  // branch-free (data-dependent)
        list[static_cast<size_t>(cnt)] = static_cast<int32_t>(j);
        cnt += !skip_ | (ar[j] != 0.0f);
      }
      list.resize(static_cast<size_t>(cnt));
    }
    const int64_t rows = down_l_.rows;
    auto task = [&](size_t t) {
      const int64_t d0 = static_cast<int64_t>(t) * rows, d1 = std::min(d_, d0 + rows);
      std::vector<float> facc(static_cast<size_t>(rows));
      std::vector<int32_t> iacc(static_cast<size_t>(rows));
      if (h_ > 0) Dot(Piece{&down_h_, hq ? &qh : nullptr, yh.data(), d_, nullptr, d0, d1}, ah.data(), kh, bad, m);
      for (int64_t r = 0; r < m; ++r) {
        float* ylr = yl.data() + r * d_;
        const auto& list = lists[static_cast<size_t>(r)];
        const int64_t cnt = static_cast<int64_t>(list.size());
        if (lq && !bad[static_cast<size_t>(r)])
          nk_->down_q(down_l_, qa.data() + r * down_l_.nb * down_l_.bs, sa.data() + r * down_l_.nb, list.data(), cnt,
                      d0, d1, iacc.data(), ylr);
        else
          nk_->down_f(down_l_, al.data() + r * kl, list.data(), cnt, d0, d1, facc.data(), ylr);
      }
      finish(d0, d1);
    };
    ParFor(par, static_cast<size_t>(down_l_.chunks()), task);
  }

  // one light down output in float64 over the neurons not skipped (skip=1: a != 0; else all)
  float ExactLight(const float* al, int64_t d) const {
    double s = 0.0;
    for (int64_t j = 0; j < l_; ++j)
      if (!skip_ || al[j] != 0.0f) s += static_cast<double>(al[j]) * static_cast<double>(down_l_.At(d, j));
    return static_cast<float>(s);
  }

  std::string name_;
  Act act_ = Act::kRelu;
  bool gated_ = false, skip_ = false, up_l_finite_ = true, has_rows_ = true, has_nm_ = false;
  static constexpr double kNmMaxKept = 0.3;  // neuron-major at most this kept: see the constructor
  // Chooses the light down's layout for single-row calls by timing both (see the constructor): calls
  // alternate rows (0) / neuron-major (1); the first kWarm of each are dropped, then after kTune more
  // of each the layout with the lower median is kept. Thread-safe (a session may run concurrently).
  struct DownTuner {
    static constexpr int kWarm = 2, kTune = 8;
    std::mutex mu;
    std::vector<double> ms[2];
    int calls[2] = {0, 0};
    std::atomic<int> choice{-1};
    std::string log;
    int Next() {
      std::lock_guard<std::mutex> g(mu);
      return calls[0] <= calls[1] ? 0 : 1;
    }
    static double Median(std::vector<double> v) {
      std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
      return v[v.size() / 2];
    }
    void Add(int layout, double t) {
      std::lock_guard<std::mutex> g(mu);
      if (choice.load() >= 0) return;
      if (++calls[layout] > kWarm) ms[layout].push_back(t);
      if (ms[0].size() < static_cast<size_t>(kTune) || ms[1].size() < static_cast<size_t>(kTune)) return;
      const double rows = Median(ms[0]), nm = Median(ms[1]);
      choice.store(nm < rows ? 1 : 0);
      if (!log.empty()) {
        if (FILE* f = std::fopen(log.c_str(), "a")) {
          std::fprintf(f, "down=%s rows_ms=%.4f neurons_ms=%.4f\n", nm < rows ? "neurons" : "rows", rows, nm);
          std::fclose(f);
        }
      }
    }
  };
  std::unique_ptr<DownTuner> tuner_;
  float thr_ = 0.0f, pthr_ = 0.0f, tin_ = 0.0f;  // threshold (|act(gate)| or |act(up)|), on |act(gate) * up|, input_threshold
  bool has_im_ = false;  // up_im_ packed
  NbIm up_im_;
  int hbits_ = 32, lbits_ = 4;
  int64_t hbs_ = 0, lbs_ = 0, level_ = 0;
  int64_t h_ = 0, l_ = 0, d_ = 0, f_ = 0;
  NbPart up_h_, up_l_, gate_h_, gate_l_, down_h_, down_l_rows_;
  NbDown down_l_;
  std::vector<float> up_b_, gate_b_, down_b_;
  Isa isa_ = Isa::kScalar;
  const NbKernels* nk_ = nullptr;
  const FfnKernels* fk_ = nullptr;
};

struct FusedFFNNBitsOp : Ort::CustomOpBase<FusedFFNNBitsOp, NbKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new NbKernel(api, info);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, (std::string("ffsplit::FusedFFNNBits: ") + e.what()).c_str());
    }
  }
  const char* GetName() const { return "FusedFFNNBits"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return kInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case 0: case 2: case 5: case 7: case 9: case 12: case 14: case 16: case 19: case 21:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      case 3: case 6: case 10: case 13: case 17: case 20: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // B: uint8 codes or float32 (bits 32)
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    // presence is checked at kernel creation with messages naming the input
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  static OrtStatusPtr InferOutputShape(Ort::ShapeInferContext& ctx) {
    // Y has X's shape; its last dim is D = down_light_B's rows
    if (ctx.GetInputCount() < 12) return nullptr;
    auto shape = ctx.GetInputShape(0);
    if (shape.empty()) return nullptr;
    const auto w = ctx.GetInputShape(11);
    if (!w.empty() && w[0].IsInt() && w[0].AsInt() > 0) shape.back() = w[0];
    Ort::Status st = ctx.SetOutputShape(0, shape);
    return st.release();
  }
};

}  // namespace

const OrtCustomOp* FusedFFNNBitsCustomOp() {
  static const FusedFFNNBitsOp op;
  return &op;
}

}  // namespace ffsplit
