"""The ONNX node convention of ``--target tensorrt`` (pure constants and helpers; no tensorrt).

What the readers of these nodes do, from their sources (not verified on hardware here):

- TensorRT's ONNX parser (onnx/onnx-tensorrt ``ModelImporter.cpp``, ``parseNode``) dispatches on
  ``op_type`` only; the node's domain is never read. A node carrying a ``plugin_namespace``
  attribute is looked up in the plugin registry first; otherwise an op type the parser has no
  importer for falls back to the plugin lookup (``FallbackPluginImporter``: name = op_type,
  version = string attribute ``plugin_version``, default "1", namespace = string attribute
  ``plugin_namespace``, default "").
- For a ``tensorrt.plugin`` (quickly deployable, "PLUGIN CREATOR_V3QUICK") creator the parser
  reads the node attribute ``aot`` (``importerUtils.cpp``, ``createPlugin`` for V3 creators:
  ``attrs.get<int>("aot", 0)``): present and non-zero -> ``kSTRICT_AOT``, present and zero ->
  ``kSTRICT_JIT``; absent -> the network flags ``PREFER_AOT/JIT_PYTHON_PLUGINS`` decide, else the
  creator picks whichever implementation exists. NVIDIA/TensorRT
  ``samples/python/quickly_deployable_plugins/README.md`` ("ONNX model with an AOT plugin")
  documents it as a bool attribute ``aot`` = True; ONNX has no bool attributes, onnx-graphsurgeon
  writes a Python bool as an INT attribute, and the parser reads an int: we write INT 1.
  ONNX Runtime's TensorRT EP sets neither network flag, so ``aot=1`` is what makes it use
  the ahead-of-time kernels (and never asks for a Python ``impl`` we do not define).
- ONNX Runtime's TensorRT EP (microsoft/onnxruntime
  ``onnxruntime/core/providers/tensorrt/tensorrt_execution_provider_custom_ops.cc``,
  ``CreateTensorRTCustomOpDomainList``) builds its ``trt.plugins`` custom-op domain from
  ``getPluginRegistry()->getPluginCreatorList()``, which returns ``IPluginCreator`` (V1) creators
  only; our ``tensorrt.plugin`` creators are V3QUICK and never appear there, so a
  ``trt.plugins::SparseMatMulInt8`` node fails ONNX Runtime's graph resolution ("not a registered
  function/op"). The default domain therefore stays ``ffsplit``: the CPU custom-op library gives
  ONNX Runtime the schemas (and the CPU fallback), and TensorRT ignores the domain.
  :func:`set_plugin_domain` rewrites a saved model to ``trt.plugins`` for runtimes that list V3
  creators there (e.g. a future ONNX Runtime, or tools such as NVIDIA ModelOpt that expect it).
"""

from __future__ import annotations

from ..errors import ConfigError
from ..ops._spec import DOMAIN as _FFSPLIT_DOMAIN
from ..ops._spec import (
    TRT_PLUGIN_AOT,
    TRT_PLUGIN_NAMESPACE,
    TRT_PLUGIN_VERSION,
    trt_node_attributes,  # noqa: F401 (re-exported; defined once there)
)

#: namespace of ``@trtp.register("ffsplit::<op>")``; also the ONNX node attribute
PLUGIN_NAMESPACE = TRT_PLUGIN_NAMESPACE
#: ``tensorrt.plugin`` creators register version "1"
PLUGIN_VERSION = TRT_PLUGIN_VERSION
#: INT attribute ``aot``: 1 = use the plugin's ``aot_impl`` (kSTRICT_AOT in the ONNX parser)
AOT = TRT_PLUGIN_AOT
#: default node domain (ONNX Runtime resolves it through the ffsplit CPU library)
NODE_DOMAIN = _FFSPLIT_DOMAIN
#: the domain ONNX Runtime's TensorRT EP registers for TensorRT plugins (V1 creators only)
ORT_TRT_DOMAIN = "trt.plugins"
DOMAINS = (NODE_DOMAIN, ORT_TRT_DOMAIN)


def trt_plugin_attributes() -> dict:
    """Attributes of every ``--target tensorrt`` plugin node, as ``onnx.helper.make_node`` takes them."""
    return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION, "aot": AOT}


def check_plugin_node(node) -> str | None:
    """Why ``node`` (an ``onnx.NodeProto`` of an ffsplit op) is not a valid TensorRT plugin node,
    or None when it is."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    want = {k: (v.encode() if isinstance(v, str) else v) for k, v in trt_plugin_attributes().items()}
    bad = {k: attrs.get(k) for k, v in want.items() if attrs.get(k) != v}
    if node.domain not in DOMAINS:
        return f"domain {node.domain!r} (want one of {list(DOMAINS)})"
    return f"attributes {bad} (want {want})" if bad else None


def set_plugin_domain(model, domain: str, op_types=None) -> int:
    """Move the plugin nodes of an ``onnx.ModelProto`` (also in subgraphs) to ``domain``
    (``ffsplit`` or ``trt.plugins``) and fix the opset imports; returns the nodes changed."""
    from onnx import helper

    from .configs import OP_TYPES
    from .layout import _graphs

    if domain not in DOMAINS:
        raise ConfigError(f"plugin node domain {domain!r} is not supported; use one of {list(DOMAINS)}")
    ops = set(op_types or OP_TYPES)
    changed = 0
    for g in _graphs(model.graph):
        for n in g.node:
            if n.op_type in ops and n.domain in DOMAINS and n.domain != domain:
                n.domain = domain
                changed += 1
    used = {n.domain for g in _graphs(model.graph) for n in g.node}
    keep = [o for o in model.opset_import if o.domain not in DOMAINS or o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    if domain in used and all(o.domain != domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return changed
