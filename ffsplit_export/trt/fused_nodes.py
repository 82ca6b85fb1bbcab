"""TensorRT form of ``ffsplit::FusedFFNNBits``: two plugin nodes per FFN (pure Python + onnx; no tensorrt).

A ``tensorrt.plugin`` AOT implementation launches one kernel, and the fused FFN is two dependent
phases (every output needs every neuron's activation), so :func:`split_fused_ffn` rewrites each
``FusedFFNNBits`` node into ``FusedFFNNBitsUp`` (X, up and gate parts -> ``a[..., F]``) followed by
``FusedFFNNBitsDown`` (``a``, down parts -> Y), the kernels of :mod:`.fused_kernels`. TensorRT
plugins take a fixed list of inputs, so every optional input is present: an absent one becomes a
1-element dummy initializer and a ``has_*`` / ``*_zp`` attribute says it is absent. Byte arrays
(B, zero points) are given in the int32 view of :mod:`.layout` (same bytes), so the plugin sees
INT32 (packed) or FP32 (dense heavy) and never UINT8. ``threshold``, ``product_threshold`` and
``input_threshold`` (TEAL, ungated: the light up reads X with every |x| <= it zeroed) are FLOAT
attributes of the up node; the kernel receives their bit patterns as int32 arguments.

Where it applies: :func:`ffsplit_export.trt.engine.build_engine` (TensorRT's own ONNX parser).
ONNX Runtime's TensorRT EP cannot run these nodes (it resolves ``ffsplit`` ops through the CPU
library, which has no ``FusedFFNNBitsUp`` / ``Down``). Not run on hardware here.
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError

UP_OP = "FusedFFNNBitsUp"
DOWN_OP = "FusedFFNNBitsDown"
#: inputs of the up node after X (FusedFFNNBits inputs 1-7 and 15-21)
UP_INPUTS = (1, 2, 3, 4, 5, 6, 7, 15, 16, 17, 18, 19, 20, 21)
#: inputs of the down node after a (FusedFFNNBits inputs 8-14)
DOWN_INPUTS = (8, 9, 10, 11, 12, 13, 14)


def _attrs(node) -> dict:
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def node_attributes(
    attrs: dict, present: dict[int, bool], heavy_neurons: int, light_neurons: int
) -> tuple[dict, dict]:
    """(up, down) plugin node attributes from a FusedFFNNBits node's ``attrs`` and which of its
    inputs 1..21 are ``present``; H = rows of up heavy (0 when absent), L = rows of up light."""
    from ..ops._ffn import check_input_threshold, check_product_threshold, check_threshold

    if int(attrs.get("accuracy_level", 0) or 0) not in (0, 4):
        raise FormatError(f"FusedFFNNBits accuracy_level={attrs.get('accuracy_level')!r}; use 0 or 4")
    heavy = heavy_neurons > 0
    heavy_bits = int(attrs["heavy_bits"]) if heavy else 32
    skip = int(attrs.get("skip", 0) or 0)
    common = {
        "heavy_neurons": int(heavy_neurons),
        "light_neurons": int(light_neurons),
        "heavy_bits": heavy_bits,
        "light_bits": int(attrs["light_bits"]),
        "heavy_block_size": int(attrs.get("heavy_block_size") or 16) if heavy_bits != 32 else 16,
        "light_block_size": int(attrs["light_block_size"]),
        "heavy_zp": int(heavy and heavy_bits != 32 and present.get(3, False)),
        "light_zp": int(present.get(6, False)),
        "skip": skip,
    }
    gated = int(attrs.get("gated", 0) or 0)
    up = {
        **common,
        "gated": gated,
        "activation": str(attrs["activation"]),
        "threshold": check_threshold(float(attrs.get("threshold", 0.0) or 0.0), skip),
        "product_threshold": check_product_threshold(
            float(attrs.get("product_threshold", 0.0) or 0.0), skip, gated
        ),
        "input_threshold": check_input_threshold(
            float(attrs.get("input_threshold", 0.0) or 0.0), gated, skip
        ),
        "has_up_bias": int(present.get(7, False)),
        "has_gate_bias": int(gated and present.get(21, False)),
    }
    down = {**common, "has_down_bias": int(present.get(14, False))}
    return up, down


def kernel_specs_of(up: dict, down: dict, byte_elems: str = "u8"):
    """The (up, down) :class:`~.configs.KernelSpec` that the plugin nodes' attributes select."""
    from .configs import fused_ffn_kernel_specs

    return fused_ffn_kernel_specs(
        heavy_bits=up["heavy_bits"],
        light_bits=up["light_bits"],
        heavy_zp=bool(up["heavy_zp"]),
        light_zp=bool(up["light_zp"]),
        gated=bool(up["gated"]),
        activation=up["activation"],
        skip=bool(up["skip"]),
        up_bias=bool(up["has_up_bias"]),
        gate_bias=bool(up["has_gate_bias"]),
        down_bias=bool(down["has_down_bias"]),
        byte_elems=byte_elems,
    )


def node_arrays(inputs: list, heavy_bits: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(up, down) input arrays after X / a: FusedFFNNBits inputs 1..21 (None = absent) with byte
    arrays in the int32 view and 1-element dummies for the absent ones."""
    from .layout import bytes_as_int32_rows

    ins = list(inputs) + [None] * (21 - len(inputs))

    def one(i):
        a = ins[i - 1]
        pos = (i - 1) % 7  # 0..2: heavy B/s/z, 3..5: light B/s/z, 6: bias (every group of 7)
        byte = pos in (2, 5) or (pos in (0, 3) and not (pos == 0 and heavy_bits == 32))
        if a is None:
            return np.zeros(1, np.int32 if byte else np.float32)
        a = np.asarray(a)
        if byte:
            if a.dtype != np.uint8:
                raise FormatError(f"FusedFFNNBits input {i} must be uint8 (packed), got {a.dtype}")
            return bytes_as_int32_rows(a)
        if a.dtype != np.float32:
            raise FormatError(f"FusedFFNNBits input {i} must be float32, got {a.dtype}")
        return a

    return [one(i) for i in UP_INPUTS], [one(i) for i in DOWN_INPUTS]


def split_fused_ffn(model) -> int:
    """Rewrite every ``FusedFFNNBits`` node of an ``onnx.ModelProto`` (main graph; its weights must
    be initializers) into the two plugin nodes, in place; returns the number of nodes split."""
    from onnx import helper, numpy_helper

    from ..ops._spec import DOMAIN
    from .onnx_nodes import trt_plugin_attributes

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes, dropped, split = [], set(), 0
    for node in graph.node:
        if node.op_type != "FusedFFNNBits" or node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        names = list(node.input[1:]) + [""] * (21 - len(node.input[1:]))
        missing = [n for n in names if n and n not in inits]
        if missing:
            raise FormatError(
                f"node {node.name or node.op_type}: weights must be initializers, missing {missing}"
            )
        arrays = [numpy_helper.to_array(inits[n]) if n else None for n in names]
        h = arrays[0].shape[0] if arrays[0] is not None else 0
        if arrays[3] is None:
            raise FormatError(f"node {node.name or node.op_type}: the up light part (input 4) is required")
        present = {i + 1: a is not None for i, a in enumerate(arrays)}
        up_attrs, down_attrs = node_attributes(_attrs(node), present, h, arrays[3].shape[0])
        up_arr, down_arr = node_arrays(arrays, up_attrs["heavy_bits"])
        tag = node.name or f"ffn{split}"

        def add(prefix, idx, arr, tag=tag):
            name = f"{tag}__trt_{prefix}{idx}"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
            return name

        up_in = [node.input[0]] + [add("in", i, a) for i, a in zip(UP_INPUTS, up_arr)]
        down_in = [f"{tag}__trt_a"] + [add("in", i, a) for i, a in zip(DOWN_INPUTS, down_arr)]
        plugin = trt_plugin_attributes()
        new_nodes.append(helper.make_node(UP_OP, up_in, [f"{tag}__trt_a"], name=f"{tag}_up", domain=DOMAIN,
                                          **plugin, **up_attrs))  # fmt: skip
        new_nodes.append(helper.make_node(DOWN_OP, down_in, list(node.output), name=f"{tag}_down", domain=DOMAIN,
                                          **plugin, **down_attrs))  # fmt: skip
        dropped.update(n for n in names if n)
        split += 1
    if split:
        del graph.node[:]
        graph.node.extend(new_nodes)
        used = {i for n in graph.node for i in n.input}
        keep = [t for t in graph.initializer if t.name not in dropped or t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return split
