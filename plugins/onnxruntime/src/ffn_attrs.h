// What the two fused FFN kernels (ffn.cc: FusedFFN, ffn_nbits.cc: FusedFFNNBits) read alike: the
// node's name for messages, the activation and the gated / skip / threshold attributes (the
// contracts: ffsplit_export/ops/_ffn.py). Include after onnxruntime_cxx_api.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace ffsplit {

enum class Act { kRelu, kGelu, kGeluTanh, kSilu };

// the activation in float64, by the reference's formulas (relu keeps NaN)
inline double ActOf(Act act, double v) {
  switch (act) {
    case Act::kRelu: return v > 0.0 ? v : (std::isnan(v) ? v : 0.0);
    case Act::kGelu: return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    case Act::kGeluTanh: return 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
    default: return v / (1.0 + std::exp(-v));
  }
}

// an int attribute, dflt when the node does not set it
inline int64_t FfnIntAttr(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t dflt) {
  int64_t v = dflt;
  if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, &v)) {
    api.ReleaseStatus(st);
    v = dflt;
  }
  return v;
}

struct FfnAttrs {
  std::string name;  // "ffsplit::<op> (node '<node name>')": the prefix of every message
  Act act = Act::kRelu;
  bool gated = false, skip = false;
  float threshold = 0.0f;
};

// The shared attributes of a fused FFN node of op type `op`; a bad value throws
// Ort::Exception(ORT_INVALID_ARGUMENT) naming the node, the value and what to use instead.
inline FfnAttrs ReadFfnAttrs(const OrtApi& api, const OrtKernelInfo* info, const char* op) {
  FfnAttrs a;
  Ort::ConstKernelInfo ki(info);
  try {
    a.name = std::string("ffsplit::") + op + " (node '" + ki.GetNodeName() + "')";
  } catch (...) {
    a.name = std::string("ffsplit::") + op;
  }
  auto fail = [&a](const std::string& msg) { throw Ort::Exception(a.name + ": " + msg, ORT_INVALID_ARGUMENT); };
  std::string act;
  try {
    act = ki.GetAttribute<std::string>("activation");
  } catch (...) {
    fail("the string attribute 'activation' is required (relu, gelu, gelu_tanh, silu)");
  }
  if (act == "relu") a.act = Act::kRelu;
  else if (act == "gelu") a.act = Act::kGelu;
  else if (act == "gelu_tanh") a.act = Act::kGeluTanh;
  else if (act == "silu") a.act = Act::kSilu;
  else fail("activation '" + act + "' is not supported; use relu, gelu, gelu_tanh or silu");
  const int64_t gated = FfnIntAttr(api, info, "gated", 0), skip = FfnIntAttr(api, info, "skip", 0);
  if (gated != 0 && gated != 1) fail("gated must be 0 or 1, got " + std::to_string(gated));
  if (skip != 0 && skip != 1)
    fail("skip must be 0 (compute all) or 1 (skip silent light neurons), got " + std::to_string(skip));
  a.gated = gated == 1;
  a.skip = skip == 1;
  float t = 0.0f;
  if (OrtStatus* st = api.KernelInfoGetAttribute_float(info, "threshold", &t)) {
    api.ReleaseStatus(st);
    t = 0.0f;
  }
  if (!std::isfinite(t) || t < 0.0f) fail("threshold must be a finite float >= 0, got " + std::to_string(t));
  if (t > 0.0f && !a.skip) fail("threshold > 0 needs skip=1 (thresholds skip light neurons)");
  a.threshold = t;
  return a;
}

// The compute both fused FFN kernels share: X float32 [..., d] -> Y of X's shape, run(x, y, m) on
// its m rows; a bad X or an exception becomes an ORT_INVALID_ARGUMENT status prefixed by `name`.
template <class Run>
OrtStatusPtr FfnCompute(OrtKernelContext* context, int64_t d, const std::string& name, Run&& run) {
  auto status = [&name](const std::string& msg) {
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, (name + ": " + msg).c_str());
  };
  try {
    Ort::KernelContext ctx(context);
    auto xv = ctx.GetInput(0);
    auto xi = xv.GetTensorTypeAndShapeInfo();
    if (xi.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return status("X must be float32");
    const std::vector<int64_t> xs = xi.GetShape();
    if (xs.empty()) return status("X must have rank >= 1, got a scalar");
    if (xs.back() != d)
      return status("X has " + std::to_string(xs.back()) + " columns; the FFN's model width is " + std::to_string(d));
    int64_t m = 1;
    for (size_t i = 0; i + 1 < xs.size(); ++i)
      if (xs[i] < 0 || __builtin_mul_overflow(m, xs[i], &m)) return status("X has too many rows");
    auto yv = ctx.GetOutput(0, xs);
    float* y = yv.GetTensorMutableData<float>();
    if (m == 0) return nullptr;
    run(xv.GetTensorData<float>(), y, m);
    return nullptr;
  } catch (const std::exception& e) {
    return status(e.what());
  }
}

}  // namespace ffsplit
