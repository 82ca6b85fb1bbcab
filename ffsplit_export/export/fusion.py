"""Post-export fusion of the graph around the FFN for ``--target ort-cpu`` (ONNX Runtime contrib ops).

optimum's TorchScript export spells RMSNorm as Pow/ReduceMean/Add/Sqrt/Div/Mul, rotary embeddings
as Slice/Neg/Concat/Mul/Add, and attention with a KV cache as Concat/Unsqueeze/Expand/Reshape
(repeat_kv)/Transpose/MatMul/Add(mask)/Softmax/IsNaN/Where/MatMul: per layer, per token, dozens
of small kernels. This pass rewrites them into ONNX Runtime's fused CPU kernels:

* RMSNorm -> ``SimplifiedLayerNormalization``; residual Add + RMSNorm ->
  ``SkipSimplifiedLayerNormalization``; rotate-half RoPE -> ``RotaryEmbedding``: ONNX Runtime's own
  fusions (``onnxruntime.transformers``), applied one by one (never its whole ``optimize_model``,
  whose GPT-2 attention fusion would change the KV-cache layout);
* attention with a KV cache (llama-style: rotary, grouped KV heads) -> ``GroupQueryAttention`` with
  the rotary inside (``do_rotary``), fed by ``seqlens_k`` / ``total_sequence_length`` computed from
  ``attention_mask``. The graph's inputs and outputs keep their names and shapes (past and present
  KV in BNSH, as optimum writes them), so ``ORTModelForCausalLM``, the genai config and the
  validation see the same interface. This one is ours, written on ONNX Runtime's ``Fusion`` base
  class: neither onnxscript's ``ort_fusions`` (written for the dynamo exporter's graphs; 0 matches
  here) nor ONNX Runtime's ``FusionRotaryAttention`` match optimum's TorchScript attention. The
  ``RotaryEmbedding`` nodes it absorbs do not remain, so a llama file counts 0 of them.

What stays as exported: GPT-2 / OPT-style attention (scale computed from shapes, no rotary), MPT
(ALiBi), Whisper and T5 attention (no rotary; T5's RMSNorm does fuse), and any file with control
flow (optimum's merged seq2seq decoders): ONNX Runtime's fusions walk the main graph only.

Our ``ffsplit`` domain nodes and ``MatMulNBits`` are never matched or changed; the pass checks that
after fusing. The fused attention assumes what GroupQueryAttention assumes: every row's valid tokens
are contiguous from position 0 (no left padding); optimum's batched ``generate`` pads on the left,
so batched generation of prompts of different lengths needs the unfused graph
(``--no-fuse-attention``).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ExportError

logger = logging.getLogger(__name__)

FUSED_OPS = (
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RotaryEmbedding",
    "GroupQueryAttention",
)
_KEEP_DOMAINS = ("ffsplit",)
_KEEP_OPS = ("MatMulNBits", "GatherBlockQuantized")


def _untouchable(graph) -> list[tuple]:
    """The nodes the pass must leave as they are: ours and the quantized matmuls / gathers."""
    return sorted(
        (
            n.domain,
            n.op_type,
            tuple(n.input[1:]),  # the weights (input 0, the activation, may be renamed by a fusion)
            tuple(sorted((a.name, a.SerializeToString(deterministic=True)) for a in n.attribute)),
        )
        for n in graph.node
        if n.domain in _KEEP_DOMAINS or n.op_type in _KEEP_OPS
    )


def _interface(graph) -> tuple:
    def sig(vs):
        return [(v.name, v.type.SerializeToString(deterministic=True)) for v in vs]

    return sig(graph.input), sig(graph.output)


def _const_scalar(model, name: str) -> float | None:
    v = model.get_constant_value(name)
    if v is None:
        return None
    v = np.asarray(v)
    return float(v.reshape(-1)[0]) if v.size == 1 else None


def _reaches(model, name: str, target: str, output_name_to_node: dict, limit: int = 100_000) -> bool:
    """Whether value ``name`` is computed from graph input ``target`` (breadth-first, bounded)."""
    seen, todo = set(), [name]
    while todo and len(seen) < limit:
        v = todo.pop()
        if v == target:
            return True
        if v in seen:
            continue
        seen.add(v)
        node = output_name_to_node.get(v)
        if node is not None:
            todo.extend(i for i in node.input if i)
    return False


def _group_query_attention_fusion(model, num_heads: int, kv_num_heads: int):
    """A :class:`onnxruntime.transformers.fusion_base.Fusion` that writes GroupQueryAttention."""
    from onnxruntime.transformers.fusion_base import Fusion

    class FusionGroupQueryAttention(Fusion):
        def __init__(self):
            super().__init__(model, "GroupQueryAttention", "Softmax", "llama-style, rotary inside")
            self.lengths: tuple[str, str] | None = None
            self.reasons: Counter = Counter()

        def _reject(self, why: str) -> None:
            self.reasons[why] += 1
            logger.debug("GroupQueryAttention fusion: %s", why)

        def _lengths(self) -> tuple[str, str]:
            """``seqlens_k`` (int32 [B], total - 1) and ``total_sequence_length`` (int32 scalar)."""
            if self.lengths is None:
                m = self.model
                one = "ffsplit_gqa/one_i64"
                axis = "ffsplit_gqa/axis1_i64"
                m.add_initializer(numpy_helper.from_array(np.array(1, np.int64), one), self.this_graph_name)
                m.add_initializer(
                    numpy_helper.from_array(np.array([1], np.int64), axis), self.this_graph_name
                )
                names = [
                    f"ffsplit_gqa/{s}"
                    for s in ("mask_sum", "seqlens_i64", "seqlens_k", "mask_shape", "total_i64", "total")
                ]
                self.nodes_to_add += [
                    helper.make_node(
                        "ReduceSum", ["attention_mask", axis], [names[0]], keepdims=0, name=names[0]
                    ),
                    helper.make_node("Sub", [names[0], one], [names[1]], name=names[1]),
                    helper.make_node("Cast", [names[1]], [names[2]], to=TensorProto.INT32, name=names[2]),
                    helper.make_node("Shape", ["attention_mask"], [names[3]], name=names[3]),
                    helper.make_node("Gather", [names[3], one], [names[4]], axis=0, name=names[4]),
                    helper.make_node("Cast", [names[4]], [names[5]], to=TensorProto.INT32, name=names[5]),
                ]
                for n in self.nodes_to_add[-6:]:
                    self.node_name_to_graph_name[n.name] = self.this_graph_name
                self.lengths = (names[2], names[5])
            return self.lengths

        def _kv_source(self, node, index: int, out_map) -> tuple | None:
            """From the K (or V) operand of an attention MatMul back to the present-cache Concat.

            Accepts optimum's repeat_kv (Unsqueeze/Expand/Reshape) when kv heads < heads, or none.
            """
            m = self.model
            for path in (["Reshape", "Expand", "Unsqueeze", "Concat"], ["Concat"]):
                nodes = m.match_parent_path(node, path, [index] + [0] * (len(path) - 1), out_map)
                if nodes is not None:
                    return nodes
            return None

        def _projection(self, node, out_map) -> str | None:
            """``X`` of Transpose(0,2,1,3)(Reshape(X, [.., .., -1 or N, H])): the [B, S, N*H] input."""
            m = self.model
            nodes = m.match_parent_path(node, ["Transpose", "Reshape"], [0, 0], out_map)
            if nodes is None or list(helper.get_attribute_value(nodes[0].attribute[0])) != [0, 2, 1, 3]:
                return None
            return nodes[1].input[0]

        def fuse(self, softmax, input_name_to_nodes, output_name_to_node):
            m, out_map, in_map = self.model, output_name_to_node, input_name_to_nodes
            if "attention_mask" not in {i.name for i in m.model.graph.input}:
                return self._reject("no attention_mask input")
            # softmax -> [IsNaN/Where guard] -> MatMul(probs, V) -> Transpose(0,2,1,3) -> Reshape
            probs = softmax
            kids = in_map.get(softmax.output[0], [])
            where = [k for k in kids if k.op_type == "Where"]
            if len(kids) == 2 and len(where) == 1 and {k.op_type for k in kids} == {"IsNaN", "Where"}:
                probs = where[0]
                kids = in_map.get(probs.output[0], [])
            if len(kids) != 1 or kids[0].op_type != "MatMul" or kids[0].input[0] != probs.output[0]:
                return self._reject("softmax not followed by MatMul(probs, V)")
            pv = kids[0]
            tail = in_map.get(pv.output[0], [])
            if len(tail) != 1 or tail[0].op_type != "Transpose":
                return self._reject("no Transpose after MatMul(probs, V)")
            out_t = tail[0]
            if list(helper.get_attribute_value(out_t.attribute[0])) != [0, 2, 1, 3]:
                return self._reject("output Transpose is not (0,2,1,3)")
            tail = in_map.get(out_t.output[0], [])
            if len(tail) != 1 or tail[0].op_type != "Reshape":
                return self._reject("no Reshape to [B, S, N*H] after the output Transpose")
            out_r = tail[0]
            # scores = MatMul(Mul(q_rot, cq), Mul(Transpose(0,1,3,2)(K), ck)) [+ mask]
            parent = m.get_parent(softmax, 0, out_map)
            mask_add = None
            if parent is not None and parent.op_type == "Add":
                mask_add, parent = parent, m.get_parent(parent, 0, out_map)
                if not _reaches(m, mask_add.input[1], "attention_mask", out_map):
                    return self._reject("the additive mask is not built from attention_mask")
            if parent is None or parent.op_type != "MatMul":
                return self._reject("softmax input is not MatMul(q, k^T)")
            qk = parent
            q_mul = m.match_parent(qk, "Mul", 0, out_map)
            k_mul = m.match_parent(qk, "Mul", 1, out_map)
            if q_mul is None or k_mul is None:
                return self._reject("q / k are not scaled by Mul")
            cq, ck = _const_scalar(m, q_mul.input[1]), _const_scalar(m, k_mul.input[1])
            if cq is None or ck is None:
                return self._reject("q / k scale is not a constant scalar")
            q_rot = m.match_parent(q_mul, "RotaryEmbedding", 0, out_map)
            k_t = m.match_parent(k_mul, "Transpose", 0, out_map)
            if (
                q_rot is None
                or k_t is None
                or list(helper.get_attribute_value(k_t.attribute[0])) != [0, 1, 3, 2]
            ):
                return self._reject("q is not RotaryEmbedding output or k is not transposed (0,1,3,2)")
            k_nodes = self._kv_source(k_t, 0, out_map)
            v_nodes = self._kv_source(pv, 1, out_map)
            if k_nodes is None or v_nodes is None:
                return self._reject("K / V do not come from a past/present Concat")
            k_cat, v_cat = k_nodes[-1], v_nodes[-1]
            graph_outputs = {o.name for o in m.model.graph.output}
            graph_inputs = {i.name for i in m.model.graph.input}
            if (
                k_cat.output[0] not in graph_outputs
                or v_cat.output[0] not in graph_outputs
                or k_cat.input[0] not in graph_inputs
                or v_cat.input[0] not in graph_inputs
            ):
                return self._reject("the K / V Concat is not past input -> present output")
            k_rot = m.match_parent(k_cat, "RotaryEmbedding", 1, out_map)
            if k_rot is None:
                return self._reject("new K is not a RotaryEmbedding output")
            if list(k_rot.input[1:]) != list(q_rot.input[1:]):
                return self._reject("q and k rotary use different positions or caches")
            if any(
                helper.get_attribute_value(a)
                for a in list(q_rot.attribute) + list(k_rot.attribute)
                if a.name == "interleaved"
            ):
                return self._reject("interleaved rotary")
            q_in = self._projection(q_rot, out_map)
            k_in = self._projection(k_rot, out_map)
            v_t = m.match_parent(v_cat, "Transpose", 1, out_map)
            v_in = self._projection(v_cat, out_map) if v_t is None else None
            if v_t is not None:
                v_r = m.match_parent(v_t, "Reshape", 0, out_map)
                if v_r is None or list(helper.get_attribute_value(v_t.attribute[0])) != [0, 2, 1, 3]:
                    return self._reject("V is not Transpose(0,2,1,3)(Reshape(v_proj))")
                v_in = v_r.input[0]
            if q_in is None or k_in is None or v_in is None:
                return self._reject("q / k / v are not [B, S, N*H] projections reshaped per head")
            pos, cos, sin = q_rot.input[1:4]
            seqlens_k, total = self._lengths()
            name = m.create_node_name("GroupQueryAttention", "ffsplit_gqa/GroupQueryAttention")
            gqa = helper.make_node(
                "GroupQueryAttention",
                [q_in, k_in, v_in, k_cat.input[0], v_cat.input[0], seqlens_k, total, cos, sin, pos],
                [out_r.output[0], k_cat.output[0], v_cat.output[0]],
                name=name,
                domain="com.microsoft",
                num_heads=num_heads,
                kv_num_heads=kv_num_heads,
                do_rotary=1,
                rotary_interleaved=0,
                scale=float(cq * ck),
            )
            self.nodes_to_add.append(gqa)
            self.node_name_to_graph_name[name] = self.this_graph_name
            # what only this attention used goes; shared shape arithmetic is pruned afterwards
            self.nodes_to_remove += [
                out_r,
                out_t,
                pv,
                softmax,
                qk,
                q_mul,
                k_mul,
                k_t,
                q_rot,
                k_rot,
                k_cat,
                v_cat,
            ]
            self.nodes_to_remove += [n for n in (probs, mask_add) if n is not None and n is not softmax]
            self.nodes_to_remove += [k for k in in_map.get(softmax.output[0], []) if k.op_type == "IsNaN"]
            self.nodes_to_remove += k_nodes[:-1] + v_nodes[:-1]
            self.increase_counter("GroupQueryAttention")

    return FusionGroupQueryAttention()


def _remove_identity_casts(model) -> int:
    """Drop Cast nodes whose input already has the target type (types from ONNX shape inference).

    ONNX Runtime's own ``remove_useless_cast_nodes`` uses symbolic shape inference, which stops at
    our ffsplit nodes; onnx's inference carries their output types (set at export) through.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model.model)
    except Exception as e:  # onnx raises its own error types; no types, no removal
        logger.debug("onnx shape inference failed (%s): Cast nodes kept", e)
        return 0
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    outputs = {o.name for o in model.model.graph.output}
    removed = 0
    for node in [n for n in model.model.graph.node if n.op_type == "Cast"]:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if to is None or types.get(node.input[0]) != to or node.output[0] in outputs:
            continue
        model.replace_input_of_all_nodes(node.output[0], node.input[0])
        model.remove_node(node)
        removed += 1
    return removed


def fuse_graph(
    src: str | Path,
    dst: str | Path,
    *,
    num_heads: int | None = None,
    kv_num_heads: int | None = None,
    max_positions: int | None = None,
    attention: bool = True,
) -> dict:
    """Fuse norms, rotary and attention of the ONNX file ``src`` into ``dst``; returns the counts.

    ``num_heads`` / ``kv_num_heads`` (from the model config) enable the attention fusion;
    ``max_positions`` trims the rotary cos/sin caches ONNX Runtime's fusion sizes at 131072 rows.
    Raises :class:`ExportError` if the graph's inputs/outputs or our quantized nodes would change.
    """
    from onnxruntime.transformers.fusion_rotary_attention import FusionRotaryEmbeddings
    from onnxruntime.transformers.fusion_simplified_layernorm import (
        FusionSimplifiedLayerNormalization,
        FusionSkipSimplifiedLayerNormalization,
    )
    from onnxruntime.transformers.onnx_model import OnnxModel

    src, dst = Path(src), Path(dst)
    proto = onnx.load(str(src), load_external_data=True)
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in proto.graph.node
        for a in n.attribute
    ):
        # optimum's merged seq2seq decoders (If with two subgraphs): ONNX Runtime's fusions walk the
        # main graph only and would cut the branches' outputs; such a file stays as exported
        if src.resolve() != dst.resolve():
            onnx.save_model(proto, str(dst))
        return {"skipped": "control-flow subgraphs (If/Loop): not fused"}
    external = any(
        t.data_location == TensorProto.EXTERNAL
        for t in onnx.load(str(src), load_external_data=False).graph.initializer
    )
    before_iface, before_keep = _interface(proto.graph), _untouchable(proto.graph)
    before = Counter(n.op_type for n in proto.graph.node)
    model = OnnxModel(proto)
    stats: dict = {}
    # optimum's RMSNorm casts float32 to float32 around the norm; the norm fusion expects them gone
    _remove_identity_casts(model)
    FusionSimplifiedLayerNormalization(model).apply()
    model.prune_graph()
    skip = FusionSkipSimplifiedLayerNormalization(model)  # checks the residual Add's shapes ...
    if skip.shape_infer_helper is None:
        # ... by symbolic shape inference, which stops at our ffsplit nodes (no schema): then the
        # Add's two computed inputs are taken as [B, S, hidden] (a transformer residual) unchecked;
        # the export's validation runs the result

        class Unchecked(FusionSkipSimplifiedLayerNormalization):
            def __init__(self):
                super(FusionSkipSimplifiedLayerNormalization, self).__init__(  # the plain SkipLayerNorm one
                    model,
                    "SkipSimplifiedLayerNormalization",
                    "SimplifiedLayerNormalization",
                    shape_infer=False,
                )

        skip = Unchecked()
        stats["skip_norm_shapes"] = "unchecked (symbolic shape inference stops at custom ops)"
    skip.apply()
    model.prune_graph()
    FusionRotaryEmbeddings(model).apply()
    model.prune_graph()
    reasons: dict = {}
    if attention and num_heads and kv_num_heads:
        gqa = _group_query_attention_fusion(model, int(num_heads), int(kv_num_heads))
        gqa.apply()
        reasons = dict(gqa.reasons)
        model.prune_graph()
    model.remove_unused_constant()
    model.topological_sort()
    if max_positions:
        for name in ("cos_cache", "sin_cache"):
            init = model.get_initializer(name)
            if init is not None and init.dims[0] > max_positions:
                arr = numpy_helper.to_array(init)[: int(max_positions)]
                init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))
    out = model.model
    after = Counter(n.op_type for n in out.graph.node)
    if _interface(out.graph) != before_iface:
        raise ExportError(
            f"{src.name}: the fusion pass changed the graph's inputs/outputs; this is a bug, "
            "export with --no-fuse-attention"
        )
    if _untouchable(out.graph) != before_keep:
        raise ExportError(
            f"{src.name}: the fusion pass changed ffsplit / MatMulNBits nodes; this is a bug, "
            "export with --no-fuse-attention"
        )
    stats = {**{op: after.get(op, 0) - before.get(op, 0) for op in FUSED_OPS}, **stats}
    stats.update(nodes_before=sum(before.values()), nodes_after=sum(after.values()))
    if reasons:
        stats["attention_not_fused"] = reasons
    if not any(stats[op] for op in FUSED_OPS):  # nothing matched: the file stays as exported
        stats["nodes_after"] = stats["nodes_before"]
        if src.resolve() != dst.resolve():
            onnx.save_model(onnx.load(str(src), load_external_data=True), str(dst))
        return stats
    dst.parent.mkdir(parents=True, exist_ok=True)
    if external or out.ByteSize() > 2**31 - 2**26:
        data = dst.name + "_data"
        if (dst.parent / data).exists():
            (dst.parent / data).unlink()
        onnx.save_model(
            out, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data
        )
    else:
        onnx.save_model(out, str(dst))
    return stats
