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

Where it applies: ``export --target tensorrt`` with fused FFNs (after ONNX Runtime validated the
graph before the split; :func:`plugin_reference_ops` then checks the split graph on CPU) and
:func:`ffsplit_export.trt.engine.build_engine` (TensorRT's own ONNX parser).
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


def _subgraphs(node):
    from onnx import AttributeProto

    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.g
        elif a.type == AttributeProto.GRAPHS:
            yield from a.graphs


def _constants(graph, outer: dict) -> dict:
    """name -> (graph, producer: initializer or Constant / Identity node) of the constant values
    visible in ``graph``: ``outer``'s, then its initializers, Constant nodes with a ``value``
    tensor, and Identity nodes of those (how the exporter writes weights it de-duplicated)."""
    found = dict(outer)
    for t in graph.initializer:
        found[t.name] = (graph, t)
    for n in graph.node:
        if (
            n.op_type == "Constant"
            and n.domain in ("", "ai.onnx")
            and [a.name for a in n.attribute] == ["value"]
        ):
            found[n.output[0]] = (graph, n)
    from .layout import follow_identities

    return follow_identities(graph.node, found)


def _array(entry) -> np.ndarray:
    from onnx import numpy_helper

    _, producer = entry
    tensor = producer.attribute[0].t if hasattr(producer, "op_type") else producer
    return numpy_helper.to_array(tensor)


def split_fused_ffn(model) -> int:
    """Rewrite every ``FusedFFNNBits`` node of an ``onnx.ModelProto`` (main graph and If / Loop /
    Scan bodies) into the two plugin nodes, in place; returns the number of nodes split.

    A node's weights may be initializers or Constant nodes (what ``torch.onnx`` writes), of its
    graph or an enclosing one, possibly behind Identity nodes; the plugin nodes' inputs become
    initializers of the node's graph, and the original weights are removed where nothing else
    reads them. External data must be loaded (``onnx.load(..., load_external_data=True)``)."""
    from ..ops._spec import DOMAIN

    state = {"split": 0, "weights": {}}
    _split_graph(model.graph, {}, state, DOMAIN)
    if state["split"]:
        _drop_unused(model.graph, state["weights"])
    return state["split"]


def _split_graph(graph, outer: dict, state: dict, domain: str) -> None:
    from onnx import helper, numpy_helper

    from .onnx_nodes import trt_plugin_attributes

    consts = _constants(graph, outer)
    new_nodes = []
    for node in graph.node:
        for sub in _subgraphs(node):
            _split_graph(sub, consts, state, domain)
        if node.op_type != "FusedFFNNBits" or node.domain != domain:
            new_nodes.append(node)
            continue
        names = list(node.input[1:]) + [""] * (21 - len(node.input[1:]))
        missing = [n for n in names if n and n not in consts]
        if missing:
            raise FormatError(
                f"node {node.name or node.op_type}: weights must be initializers or Constant nodes, missing {missing}"
            )
        arrays = [_array(consts[n]) if n else None for n in names]
        h = arrays[0].shape[0] if arrays[0] is not None else 0
        if arrays[3] is None:
            raise FormatError(f"node {node.name or node.op_type}: the up light part (input 4) is required")
        present = {i + 1: a is not None for i, a in enumerate(arrays)}
        up_attrs, down_attrs = node_attributes(_attrs(node), present, h, arrays[3].shape[0])
        up_arr, down_arr = node_arrays(arrays, up_attrs["heavy_bits"])
        tag = f"{node.name or 'ffn'}__trt{state['split']}"

        def add(idx, arr, tag=tag):
            name = f"{tag}_in{idx}"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
            return name

        up_in = [node.input[0]] + [add(i, a) for i, a in zip(UP_INPUTS, up_arr)]
        down_in = [f"{tag}_a"] + [add(i, a) for i, a in zip(DOWN_INPUTS, down_arr)]
        plugin = trt_plugin_attributes()
        new_nodes.append(helper.make_node(UP_OP, up_in, [f"{tag}_a"], name=f"{tag}_up", domain=domain,
                                          **plugin, **up_attrs))  # fmt: skip
        new_nodes.append(helper.make_node(DOWN_OP, down_in, list(node.output), name=f"{tag}_down",
                                          domain=domain, **plugin, **down_attrs))  # fmt: skip
        for n in names:
            if n:
                state["weights"][n] = consts[n]
        state["split"] += 1
    if len(new_nodes) != len(graph.node) or any(a is not b for a, b in zip(new_nodes, graph.node)):
        del graph.node[:]
        graph.node.extend(new_nodes)


def _drop_unused(graph, weights: dict) -> None:
    """Remove the split nodes' original weights (initializers, Constant and Identity nodes) that no
    node of any graph reads any more."""
    from ..export.validate import all_nodes

    while True:
        used = {i for n in all_nodes(graph) for i in n.input}
        graphs = [graph, *(g for n in all_nodes(graph) for g in _subgraphs(n))]
        used |= {o.name for g in graphs for o in g.output}
        gone = {n for n in weights if n not in used}
        dropped, sources = 0, []
        for g in graphs:
            keep = [t for t in g.initializer if t.name not in gone]
            nodes = []
            for n in g.node:
                if n.op_type in ("Constant", "Identity") and n.output[0] in gone:
                    sources += list(n.input)  # an Identity's source may now be unread too
                else:
                    nodes.append(n)
            dropped += len(g.initializer) - len(keep) + len(g.node) - len(nodes)
            if len(keep) != len(g.initializer):
                del g.initializer[:]
                g.initializer.extend(keep)
                inputs = [i for i in g.input if i.name not in gone]  # IR < 4 lists initializers as inputs
                if len(inputs) != len(g.input):
                    del g.input[:]
                    g.input.extend(inputs)
            if len(nodes) != len(g.node):
                del g.node[:]
                g.node.extend(nodes)
        for n in gone:
            weights.pop(n, None)
        weights.update(dict.fromkeys(sources))
        if not dropped:
            return


# ------------------------------------------------------------ the plugin nodes' NumPy semantics


def _node_inputs(arrays: list, indices: tuple, attrs: dict, d: int) -> list:
    """FusedFFNNBits inputs 1..21 (None = absent) from one plugin node's arrays after X / a: the
    dummies dropped (the ``has_*`` / ``*_zp`` attributes and H say which), the int32 byte views back
    to uint8 in the MatMulNBits shapes (K = ``d`` for up / gate, H or L for down)."""
    ins: list = [None] * 21
    h, n_light = int(attrs["heavy_neurons"]), int(attrs["light_neurons"])
    for i, a in zip(indices, arrays):
        pos = (i - 1) % 7  # 0..2: heavy B/s/z, 3..5: light B/s/z, 6: bias
        heavy = pos < 3
        bits = int(attrs["heavy_bits"] if heavy else attrs["light_bits"])
        bs = int(attrs["heavy_block_size"] if heavy else attrs["light_block_size"])
        k = d if i < 8 or i > 14 else (h if heavy else n_light)
        if pos == 6:
            flag = {7: "has_up_bias", 14: "has_down_bias", 21: "has_gate_bias"}[i]
            ins[i - 1] = np.asarray(a, np.float32) if int(attrs.get(flag, 0)) else None
            continue
        if (heavy and h == 0) or (i > 14 and not int(attrs.get("gated", 0))):
            continue
        if pos % 3 == 2 and not int(attrs["heavy_zp" if heavy else "light_zp"]):
            continue
        a = np.asarray(a)
        if bits == 32:
            ins[i - 1] = a if pos % 3 == 0 else None
            continue
        nb = -(-k // bs)
        rows = a.shape[0] if pos % 3 == 0 else None
        if pos % 3 == 0:  # B: [N, nb, blob] bytes, each row padded to whole int32 words
            ins[i - 1] = np.ascontiguousarray(a).view(np.uint8).reshape(rows, nb, -1)[:, :, : bs * bits // 8]
        elif pos % 3 == 1:
            ins[i - 1] = np.asarray(a, np.float32)
        else:  # zero points: [N * ceil(nb * bits / 8)] bytes, padded to whole int32 words
            n_rows = ins[i - 3].shape[0]
            ins[i - 1] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)[: n_rows * -(-nb * bits // 8)]
    return ins


def _kinds(attrs: dict) -> dict:
    return {
        "h": int(attrs["heavy_neurons"]),
        "heavy_bits": int(attrs["heavy_bits"]),
        "heavy_block_size": int(attrs["heavy_block_size"]) if int(attrs["heavy_bits"]) != 32 else 0,
        "light_bits": int(attrs["light_bits"]),
        "light_block_size": int(attrs["light_block_size"]),
    }


def plugin_reference_ops(domain: str | None = None) -> list[type]:
    """``FusedFFNNBitsUp`` / ``FusedFFNNBitsDown`` as ``onnx.reference`` OpRun classes: the two
    phases of :func:`ffsplit_export.ops._ffn.fused_ffn_nbits_reference` (up writes ``a`` with the
    skipped light neurons' ``a`` = 0, down leaves out the light neurons whose ``a`` is 0), so a split
    graph can be checked on CPU without TensorRT (the Triton kernels are checked against the same
    reference in the interpreter)."""
    from onnx.reference.op_run import OpRun

    from ..ops._ffn import nbits_down_phase, nbits_up_phase
    from ..ops._spec import DOMAIN

    def attrs_of(self) -> dict:
        return {a.name: getattr(self, a.name) for a in self.onnx_node.attribute}

    def run_up(self, x, *arrays, **_kw):
        at = attrs_of(self)
        act = at["activation"].decode() if isinstance(at["activation"], bytes) else at["activation"]
        d = x.shape[-1]
        ins = _node_inputs(list(arrays), UP_INPUTS, at, d)
        thresholds = tuple(
            float(at.get(k) or 0.0) for k in ("threshold", "product_threshold", "input_threshold")
        )
        a, _ = nbits_up_phase(
            np.asarray(x, np.float32).reshape(-1, d), ins, activation_kind=act, gated=int(at["gated"]),
            skip=int(at["skip"]), thresholds=thresholds, **_kinds(at),
        )  # fmt: skip
        return (a.reshape(*x.shape[:-1], a.shape[1]),)

    def run_down(self, a, *arrays, **_kw):
        at = attrs_of(self)
        kinds = _kinds(at)
        d = np.asarray(arrays[3]).shape[0]  # down light B / W rows
        ins = _node_inputs(list(arrays), DOWN_INPUTS, at, d)
        a2 = np.asarray(a, np.float32).reshape(-1, a.shape[-1])
        skipped = (
            a2[:, kinds["h"] :] == 0
            if int(at["skip"])
            else np.zeros((a2.shape[0], a2.shape[1] - kinds["h"]), bool)
        )
        y = nbits_down_phase(a2, skipped, ins, d=d, **kinds)
        return (y.reshape(*a.shape[:-1], d),)

    dom = domain or DOMAIN
    return [
        type(UP_OP, (OpRun,), {"op_domain": dom, "_run": run_up}),
        type(DOWN_OP, (OpRun,), {"op_domain": dom, "_run": run_down}),
    ]
