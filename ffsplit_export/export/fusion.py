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
  the rotary inside (``do_rotary``), fed by ``seqlens_k`` / ``total_sequence_length`` computed
  once from ``attention_mask``; a left-padded prompt row (optimum's batched ``generate``) is turned
  into the right-padded row the kernel expects and its logits back (see ``_lengths``), so padded
  batches compute what the unfused graph computes. The graph's inputs and
  outputs keep their names and shapes (past and present KV in BNSH, as optimum writes them), so
  ``ORTModelForCausalLM``, the genai config and the validation see the same interface. This one is
  ours, written on ONNX Runtime's ``Fusion`` base class: neither onnxscript's ``ort_fusions``
  (written for the dynamo exporter's graphs; 0 matches here) nor ONNX Runtime's
  ``FusionRotaryAttention`` match optimum's TorchScript attention. The ``RotaryEmbedding`` nodes it
  absorbs do not remain, so a llama file counts 0 of them. Past the rotary cache's end
  (``max_position_embeddings``) ONNX Runtime's kernel stops with an error
  (``cos_cache dimension 0 shall not be less than total_sequence_length``);
* Q/K/V ``MatMulNBits`` (same input and settings) -> one ``MatMulNBits`` with the weights stacked
  along N, feeding the attention's packed QKV input (as ONNX Runtime GenAI's builder does);
* our split FFN with ``MatMulNBits`` heavy and light parts, which optimum writes as
  ``Concat(gate_h, gate_l) -> act``, ``* Concat(up_h, up_l)``, two ``Slice`` -> ``down_h`` /
  ``down_l`` -> ``Add``: each part on its own, ``act(gate) * up -> down`` (elementwise, so the same
  numbers), its gate and up stacked into one ``MatMulNBits`` + ``Split``.

What stays as exported: GPT-2 / OPT-style attention (scale computed from shapes, no rotary), MPT
(ALiBi), Whisper and T5 attention (no rotary; T5's RMSNorm does fuse), FFNs whose parts are our
``ffsplit`` nodes, and any file with control flow (optimum's merged seq2seq decoders): ONNX
Runtime's fusions walk the main graph only.

Our ``ffsplit`` domain nodes and ``GatherBlockQuantized`` are never matched or changed, and every
``MatMulNBits`` either stays as it is or sits, weights byte for byte and settings unchanged, in one
stacked node: the pass checks all of it after fusing (``_nbits_changes``) and raises otherwise.
"""

from __future__ import annotations

import copy
import hashlib
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
_GQA = "ffsplit_gqa/"  # the prefix of the attention fusion's nodes and values
_KEEP_DOMAINS = ("ffsplit",)
_KEEP_OPS = ("GatherBlockQuantized",)  # MatMulNBits: kept or stacked, see _nbits_changes


def _weights(node) -> tuple:
    """A node's weight inputs: all but the activation (input 0; a gather's indices, input 1), which a
    fusion may rename (the attention fusion feeds the embedding re-ordered ``input_ids``)."""
    if node.op_type == "GatherBlockQuantized":
        return (node.input[0], *node.input[2:])
    return tuple(node.input[1:])


def _untouchable(graph) -> list[tuple]:
    """The nodes the pass must leave as they are: ours and the quantized gathers."""
    return sorted(
        (
            n.domain,
            n.op_type,
            _weights(n),
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
            self.lengths: tuple[str, ...] | None = None
            self.positions: str | None = None
            self.reasons: Counter = Counter()

        def _reject(self, why: str) -> None:
            self.reasons[why] += 1
            logger.debug("GroupQueryAttention fusion: %s", why)

        def _lengths(self, position_ids: str) -> tuple[str, str, str]:
            """``seqlens_k``, ``total_sequence_length`` and the (re-ordered) ``position_ids``.

            GroupQueryAttention takes row b's tokens at cache columns 0..seqlens_k[b] (padding, if
            any, on the right); optimum pads on the left. So the graph turns each row of a
            left-padded prompt around before the layers and back after them: the S new tokens of
            row b are rotated left by its leading padded columns L_b (``input_ids`` and
            ``position_ids``, one GatherElements each), the attention then sees right padding
            (``seqlens_k`` = valid tokens - 1, as the kernel expects), and ``logits`` are rotated
            back (:func:`_unroll_logits`). Decode steps (and unpadded prompts) have L_b = 0: the
            rotations are identities. The cache of a left-padded row holds its tokens from column 0
            (the kernel's layout), where optimum's graph keeps them after the padding; only this
            graph reads it. No attention bias: ONNX Runtime's kernel runs measurably slower with one.
            """
            if self.lengths is None:
                m, g = self.model, self.this_graph_name
                p = _GQA
                consts = {
                    "zero_i64": np.array(0, np.int64),
                    "one_i64": np.array(1, np.int64),
                    "idx1": np.array([1], np.int64),
                }
                for k, v in consts.items():
                    m.add_initializer(numpy_helper.from_array(v, p + k), g)
                outside = ("attention_mask", position_ids, "input_ids")

                def node(op, inputs, name, **kw):
                    """A node named and written ``p + name``; inputs not from outside are ours too."""
                    ins = [i if i in outside else p + i for i in inputs]
                    n = helper.make_node(op, ins, [p + name], name=p + name, **kw)
                    self.nodes_to_add.append(n)
                    self.node_name_to_graph_name[n.name] = g

                node("ReduceSum", ["attention_mask", "idx1"], "mask_sum", keepdims=0)
                node("Sub", ["mask_sum", "one_i64"], "seqlens_i64")
                node("Cast", ["seqlens_i64"], "seqlens_k", to=TensorProto.INT32)  # [B]
                node("Shape", ["attention_mask"], "mask_shape")  # [B, T]
                node("Gather", ["mask_shape", "one_i64"], "total_i64", axis=0)
                node("Cast", ["total_i64"], "total", to=TensorProto.INT32)
                # the rotation: L_b = leading zeros of the new columns' mask (ArgMax: the first 1)
                node("Gather", ["mask_shape", "zero_i64"], "batch_i64", axis=0)
                node("Gather", ["mask_shape", "idx1"], "total_1d", axis=0)
                # S from input_ids, not total - past: with ONNX Runtime GenAI's shared past/present
                # buffer (past_present_share_buffer) the past input is max_length long
                node("Shape", ["input_ids"], "ids_shape")
                node("Gather", ["ids_shape", "one_i64"], "new_i64", axis=0)  # S
                node("Gather", ["ids_shape", "idx1"], "new_1d", axis=0)
                node("Sub", ["total_1d", "new_1d"], "start_1d")
                node("Slice", ["attention_mask", "start_1d", "total_1d", "idx1"], "mask_new")  # [B, S]
                node("Cast", ["mask_new"], "mask_new_i32", to=TensorProto.INT32)
                node("ArgMax", ["mask_new_i32"], "lead", axis=1, keepdims=1)  # [B, 1]
                node("Range", ["zero_i64", "new_i64", "one_i64"], "columns")  # [S]
                node("Add", ["columns", "lead"], "fwd_sum")
                node("Mod", ["fwd_sum", "new_i64"], "fwd")  # [B, S]: new column s reads s + L_b
                node("Sub", ["columns", "lead"], "inv_diff")
                node("Add", ["inv_diff", "new_i64"], "inv_sum")
                node("Mod", ["inv_sum", "new_i64"], "inv")  # [B, S]: output s reads s - L_b
                node("Range", ["zero_i64", "batch_i64", "one_i64"], "rows")
                node("Unsqueeze", ["rows", "idx1"], "rows_b1")
                node("Mul", ["rows_b1", "new_i64"], "row_starts")
                node("Add", ["row_starts", "inv"], "inv_flat")  # rows of logits as [B * S, V]
                node("GatherElements", ["input_ids", "fwd"], "input_ids", axis=1)
                node("GatherElements", [position_ids, "fwd"], "position_ids", axis=1)
                self.lengths = (p + "seqlens_k", p + "total", p + "position_ids")
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
            names = {i.name for i in m.model.graph.input}
            if not {"attention_mask", "input_ids"} <= names:
                return self._reject("no attention_mask / input_ids input")
            if "logits" not in {o.name for o in m.model.graph.output}:
                return self._reject("no logits output (left-padded rows are turned back there)")
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
            if pos not in graph_inputs:  # [B, S] positions: re-ordered per row (see _lengths)
                return self._reject("the rotary positions are not a graph input (position_ids)")
            if self.lengths is not None and self.positions != pos:
                return self._reject("layers rotate by different position inputs")
            self.positions = pos
            seqlens_k, total, positions = self._lengths(pos)
            name = m.create_node_name("GroupQueryAttention", "ffsplit_gqa/GroupQueryAttention")
            gqa = helper.make_node(
                "GroupQueryAttention",
                [
                    q_in,
                    k_in,
                    v_in,
                    k_cat.input[0],
                    v_cat.input[0],
                    seqlens_k,
                    total,
                    cos,
                    sin,
                    positions,
                ],
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


def _unroll_logits(model) -> None:
    """After the attention fusion: the layers read the rotated ``input_ids`` and ``logits`` are
    rotated back (``_lengths`` of the attention fusion): ``logits[b, s] = rotated[b, s - L_b]``."""
    rolled_ids = _GQA + "input_ids"
    for n in model.model.graph.node:
        if not n.name.startswith(_GQA):  # the fusion's own nodes read the graph input (the length S)
            n.input[:] = [rolled_ids if i == "input_ids" else i for i in n.input]
    producer = model.output_name_to_node()["logits"]
    rolled = _GQA + "logits_rotated"
    producer.output[:] = [rolled if o == "logits" else o for o in producer.output]
    model.add_initializer(numpy_helper.from_array(np.array([-1], np.int64), _GQA + "minus_one_1d"))
    nodes = [
        helper.make_node("Shape", [rolled], [_GQA + "logits_shape"], start=2, end=3),  # [V]
        helper.make_node(
            "Concat", [_GQA + "minus_one_1d", _GQA + "logits_shape"], [_GQA + "flat_shape"], axis=0
        ),
        helper.make_node("Reshape", [rolled, _GQA + "flat_shape"], [_GQA + "logits_flat"]),
        helper.make_node("Gather", [_GQA + "logits_flat", _GQA + "inv_flat"], ["logits"], axis=0),
    ]
    for n in nodes:
        n.name = n.output[0] if n.output[0].startswith(_GQA) else _GQA + "logits"
    model.add_nodes(nodes)


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


# ---- packed MatMulNBits: Q/K/V into one (GroupQueryAttention's packed input), gate/up per FFN part

_NBITS = "MatMulNBits"
# elementwise ops an FFN activation may be made of (their other inputs: scalar constants)
_ELEMENTWISE = frozenset(
    "Sigmoid Mul Div Add Sub Tanh Erf Pow Relu Gelu FastGelu QuickGelu Softplus Neg Exp Log Sqrt".split()
)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _packable(model, nodes) -> bool:
    """MatMulNBits nodes on the same input with the same settings (all but N), weights in initializers."""
    if any(n.op_type != _NBITS or n.domain != "com.microsoft" for n in nodes):
        return False
    first = _attrs(nodes[0])
    first.pop("N", None)
    layout = [bool(i) for i in nodes[0].input]
    for n in nodes:
        a = _attrs(n)
        a.pop("N", None)
        if a != first or [bool(i) for i in n.input] != layout or n.input[0] != nodes[0].input[0]:
            return False
        if len(n.input) > 4 and n.input[4]:  # g_idx (deprecated): its order is not per output column
            return False
        if any(model.get_initializer(i) is None for i in n.input[1:] if i):
            return False
    return True


def _rows(array: np.ndarray, n: int) -> np.ndarray:
    """An input of a MatMulNBits with ``N = n`` as one row per output column (B, scales, zero points, bias)."""
    if array.size % n:
        raise ExportError(f"a MatMulNBits input of shape {array.shape} does not split into N={n} columns")
    return array.reshape(n, -1)


def _pack_nbits(model, nodes, base: tuple[str, str], record: dict) -> onnx.NodeProto:
    """One MatMulNBits computing ``nodes``' outputs side by side (their weights stacked along N, in order).

    ``base`` names the new node and its initializers (:func:`_base`); ``record`` maps the new node's name to the
    original nodes' names (the pass's check compares the packed weights with theirs).
    """
    ns = [int(_attrs(n)["N"]) for n in nodes]
    inputs = [nodes[0].input[0]]
    suffix = {1: "qweight", 2: "scales", 3: "zero_points", 5: "bias"}
    for slot in range(1, len(nodes[0].input)):
        if not nodes[0].input[slot]:
            inputs.append("")
            continue
        arrays = [numpy_helper.to_array(model.get_initializer(n.input[slot])) for n in nodes]
        stacked = np.concatenate([_rows(a, k) for a, k in zip(arrays, ns)], axis=0)
        shape = (sum(ns), *arrays[0].shape[1:]) if arrays[0].ndim > 1 else (-1,)
        name = f"{base[1]}.{suffix.get(slot, slot)}"
        model.add_initializer(numpy_helper.from_array(np.ascontiguousarray(stacked.reshape(shape)), name))
        inputs.append(name)
    attrs = _attrs(nodes[0])
    attrs["N"] = sum(ns)
    node_name = f"{base[0]}/{_NBITS}"
    record[node_name] = [n.name for n in nodes]
    return helper.make_node(
        _NBITS, inputs, [f"{base[0]}/{_NBITS}_output_0"], name=node_name, domain="com.microsoft", **attrs
    )


def _base(node, old: str, new: str, model) -> tuple[str, str]:
    """Names for a packed node and its weights: ``node``'s (a MatMulNBits) with ``old`` -> ``new``.

    The node's name without ``/MatMulNBits``, and its B initializer's without ``.qweight``, e.g.
    ``/model/layers.0/self_attn/qkv_proj`` and ``model.layers.0.self_attn.qkv_proj``; unique.
    """

    def renamed(stem: str) -> str:
        return stem.replace(old, new) if old in stem else f"{stem}_{new}"

    node_stem = renamed(node.name.removesuffix("/" + _NBITS))
    weight_stem = renamed(node.input[1].removesuffix(".qweight"))
    taken = {n.name for n in model.model.graph.node} | {t.name for t in model.model.graph.initializer}
    i, a, b = 1, node_stem, weight_stem
    while f"{a}/{_NBITS}" in taken or f"{b}.qweight" in taken or f"{b}.scales" in taken:
        a, b, i = f"{node_stem}_{i}", f"{weight_stem}_{i}", i + 1
    return a, b


def _only_consumer(in_map, value: str, node, outputs: set) -> bool:
    kids = in_map.get(value, [])
    return value not in outputs and len(kids) == 1 and kids[0] is node


def _pack_qkv(model, record: dict) -> int:
    """Feed each fused GroupQueryAttention from one MatMulNBits (Q, K, V stacked) where all three are."""
    in_map, out_map = model.input_name_to_nodes(), model.output_name_to_node()
    outputs = {o.name for o in model.model.graph.output}
    packed = 0
    for gqa in [n for n in model.model.graph.node if n.op_type == "GroupQueryAttention"]:
        if not gqa.name.startswith("ffsplit_gqa/") or not gqa.input[1] or not gqa.input[2]:
            continue
        mms = [out_map.get(v) for v in gqa.input[:3]]
        if any(m is None for m in mms) or not _packable(model, mms):
            continue
        if not all(_only_consumer(in_map, v, gqa, outputs) for v in gqa.input[:3]):
            continue
        node = _pack_nbits(model, mms, _base(mms[0], "q_proj", "qkv_proj", model), record)
        gqa.input[0], gqa.input[1], gqa.input[2] = node.output[0], "", ""
        model.add_node(node)
        model.remove_nodes(mms)
        packed += 1
    return packed


def _int_list(model, name: str) -> list[int] | None:
    v = model.get_constant_value(name) if name else None
    return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]


def _unpin_fused_ffns(model) -> int:
    """Drop the Reshape that pins each fused FFN node's output shape for the exporter
    (``formats._module._pin_shape``: ``Reshape(Y, Concat(Slice(Shape(X), 0, -1), [D]))``).

    ``ffsplit::FusedFFN`` / ``FusedFFNNBits`` already give Y the shape of X (whose last dim is D), so
    that Reshape is the identity, but ONNX Runtime still runs it and its Shape / Slice / Concat once
    per layer and token (1.3 of 12.6 ms of node time in one profile of SmolLM2's decode). Returns how
    many.
    """
    out_map = model.output_name_to_node()
    outputs = {o.name for o in model.model.graph.output}
    dropped = 0
    for node in [n for n in model.model.graph.node if n.op_type == "Reshape"]:
        op = out_map.get(node.input[0])
        if op is None or op.domain != "ffsplit" or op.op_type not in ("FusedFFN", "FusedFFNNBits"):
            continue
        concat = out_map.get(node.input[1])
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
            continue
        cut = out_map.get(concat.input[0])
        if cut is None or cut.op_type != "Slice" or len(cut.input) < 3:
            continue
        shape = out_map.get(cut.input[0])
        if shape is None or shape.op_type != "Shape" or shape.input[0] != op.input[0] or len(shape.attribute):
            continue
        if _int_list(model, cut.input[1]) != [0] or _int_list(model, cut.input[2]) != [-1]:
            continue
        if len(cut.input) > 3 and _int_list(model, cut.input[3]) not in ([0], None):
            continue
        if node.output[0] in outputs or len(_int_list(model, concat.input[1]) or []) != 1:
            continue
        model.replace_input_of_all_nodes(node.output[0], node.input[0])
        model.remove_node(node)
        dropped += 1
    return dropped


def _split_ffn_halves(model, record: dict, pack_gate_up: bool) -> tuple[int, int]:
    """Rewrite the split FFN so heavy and light run apart, without the Concat/Slice between them.

    optimum writes our split FFN (heavy and light parts, both MatMulNBits) as
    ``Concat(gate_h, gate_l) -> act``, ``Concat(up_h, up_l)``, ``Mul``, then two ``Slice`` (heavy
    columns, light columns) feeding ``down_h`` / ``down_l``. Activation and product are elementwise,
    so ``act(gate_h) * up_h`` and ``act(gate_l) * up_l`` are exactly the two slices. With
    ``pack_gate_up`` each part's gate and up MatMulNBits become one (N stacked) and a ``Split``.
    Returns (FFNs rewritten, gate/up pairs packed).
    """
    graph = model.model.graph
    in_map, out_map = model.input_name_to_nodes(), model.output_name_to_node()
    outputs = {o.name for o in graph.output}
    done = packs = 0

    def producers(node):
        ps = [out_map.get(i) for i in node.input]
        return ps if len(ps) == 2 and all(p is not None and p.op_type == _NBITS for p in ps) else None

    def is_scalar_const(name: str) -> bool:
        v = model.get_constant_value(name)
        return v is not None and np.asarray(v).size == 1

    gone: set = set()  # ids of nodes already rewritten
    for cat_g in [n for n in graph.node if n.op_type == "Concat"]:
        if id(cat_g) in gone:
            continue
        if _attrs(cat_g).get("axis") != -1 or producers(cat_g) is None or cat_g.output[0] in outputs:
            continue
        gates = producers(cat_g)
        # the activation: elementwise nodes from cat_g's output up to the product Mul(act, Concat(up))
        act, todo, prod, cat_u = [], list(in_map.get(cat_g.output[0], [])), None, None
        seen: set = set()
        ok = True
        while todo and ok:
            n = todo.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            others = [out_map.get(i) for i in n.input]
            ups = [p for p in others if p is not None and p.op_type == "Concat" and p is not cat_g]
            if n.op_type == "Mul" and len(ups) == 1 and producers(ups[0]) is not None:
                if prod is not None:
                    ok = False
                prod, cat_u = n, ups[0]
                continue
            if n.op_type not in _ELEMENTWISE or len(n.output) != 1 or n.output[0] in outputs:
                ok = False
                continue
            act.append(n)
            todo.extend(in_map.get(n.output[0], []))
        if not ok or prod is None:
            continue
        ups = producers(cat_u)
        inside = {id(n) for n in act}
        act_out = next(i for i in prod.input if i != cat_u.output[0])
        act_outputs = {n.output[0] for n in act} | {cat_g.output[0]}
        if act_out not in act_outputs or _attrs(cat_u).get("axis") != -1 or cat_u.output[0] in outputs:
            continue
        if any(  # every activation input: cat_g, another activation node or a scalar constant
            i not in act_outputs and not is_scalar_const(i) for n in act for i in n.input
        ) or any(  # and nothing else reads the intermediate values
            any(id(k) not in inside and k is not prod for k in in_map.get(v, [])) for v in act_outputs
        ):
            continue
        if not _only_consumer(in_map, cat_u.output[0], prod, outputs) or prod.output[0] in outputs:
            continue
        n_g = [int(_attrs(p)["N"]) for p in gates]
        if [int(_attrs(p)["N"]) for p in ups] != n_g or len({p.input[0] for p in gates + ups}) != 1:
            continue
        slices = in_map.get(prod.output[0], [])
        if len(slices) != 2 or any(s.op_type != "Slice" or s.output[0] in outputs for s in slices):
            continue
        spans = []
        for s in slices:
            starts, ends = _int_list(model, s.input[1]), _int_list(model, s.input[2])
            axes = _int_list(model, s.input[3]) if len(s.input) > 3 and s.input[3] else None
            steps = _int_list(model, s.input[4]) if len(s.input) > 4 and s.input[4] else [1]
            # axis 2 of the rank-3 hidden states [B, S, F] optimum writes is the last one
            if starts is None or ends is None or len(starts) != 1 or axes not in ([-1], [2]) or steps != [1]:
                break
            spans.append((starts[0], min(ends[0], n_g[0] + n_g[1]), s))
        if len(spans) != 2:
            continue
        spans.sort(key=lambda t: t[0])
        if [(a, b) for a, b, _ in spans] != [(0, n_g[0]), (n_g[0], n_g[0] + n_g[1])]:
            continue
        # rewrite: per part, gate/up (packed + Split, or as they are) -> act clone -> Mul -> the slice's readers
        order = [n for n in graph.node if id(n) in inside]  # the activation's nodes in graph order
        new_nodes, removed = [], [cat_g, cat_u, prod, *act, *(s for _, _, s in spans)]
        for part, (g_mm, u_mm, (_, _, sl)) in enumerate(zip(gates, ups, spans)):
            tag = ("heavy", "light")[part] if len(gates) == 2 else str(part)
            g_out, u_out = g_mm.output[0], u_mm.output[0]
            stem = f"{cat_g.name.rsplit('/', 2)[0]}/ffsplit_{tag}"
            if pack_gate_up and _packable(model, [g_mm, u_mm]):
                mm = _pack_nbits(model, [g_mm, u_mm], _base(g_mm, "gate_proj", "gate_up_proj", model), record)
                split_sizes = f"{stem}/split_sizes"
                model.add_initializer(
                    numpy_helper.from_array(np.array([n_g[part]] * 2, np.int64), split_sizes)
                )
                g_out, u_out = f"{stem}/gate", f"{stem}/up"
                new_nodes += [
                    mm,
                    helper.make_node(
                        "Split", [mm.output[0], split_sizes], [g_out, u_out], name=f"{stem}/Split", axis=-1
                    ),
                ]
                removed += [g_mm, u_mm]
                packs += 1
            rename = {cat_g.output[0]: g_out}
            for k, n in enumerate(order):
                clone = onnx.NodeProto()
                clone.CopyFrom(n)
                clone.name = f"{stem}/act_{k}_{n.op_type}"
                clone.input[:] = [rename.get(i, i) for i in n.input]
                rename[n.output[0]] = clone.name + "_output_0"
                clone.output[:] = [rename[n.output[0]]]
                new_nodes.append(clone)
            ins = [rename[i] if i == act_out else u_out for i in prod.input]
            product = f"{stem}/product_output_0"
            new_nodes.append(helper.make_node("Mul", ins, [product], name=f"{stem}/product"))
            model.replace_input_of_all_nodes(sl.output[0], product)
        gone.update(id(n) for n in removed)
        model.remove_nodes(removed)
        model.add_nodes(new_nodes)
        done += 1
    return done, packs


def _digest(array: np.ndarray) -> tuple:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(), str(array.dtype), array.shape


def _nbits_entry(node, inits: dict) -> tuple:
    """A MatMulNBits as domain, attributes, and (name, digest) of each weight input."""
    weights = tuple(
        (i, _digest(numpy_helper.to_array(inits[i])) if i in inits else None) for i in node.input[1:]
    )
    return node.domain, _attrs(node), weights


def _nbits_snapshot(graph) -> dict:
    """Every MatMulNBits by name (see :func:`_nbits_entry`)."""
    inits = {t.name: t for t in graph.initializer}
    return {n.name: _nbits_entry(n, inits) for n in graph.node if n.op_type == _NBITS}


def _nbits_changes(before: dict, graph, record: dict) -> list[str]:
    """How the MatMulNBits of ``graph`` differ from ``before`` other than by the packing in ``record``.

    A packed node must hold its originals' weights, byte for byte, stacked along N in order, with
    their settings; every other MatMulNBits must keep its weights (names and bytes) and attributes;
    and every original is in the result exactly once, as itself or inside one packed node.
    """
    inits = {t.name: t for t in graph.initializer}
    problems, seen = [], Counter()
    after = {n.name: n for n in graph.node if n.op_type == _NBITS}
    for name, node in after.items():
        if name not in record:
            seen[name] += 1
            if name not in before:
                problems.append(f"new MatMulNBits {name}")
            elif _nbits_entry(node, inits) != before[name]:
                problems.append(f"MatMulNBits {name} changed")
            continue
        origs = record[name]
        seen.update(origs)
        if any(o not in before for o in origs):
            problems.append(f"packed {name}: unknown originals {origs}")
            continue
        ns = [int(before[o][1]["N"]) for o in origs]
        attrs = {**before[origs[0]][1], "N": sum(ns)}
        if node.domain != before[origs[0]][0] or _attrs(node) != attrs:
            problems.append(f"packed {name}: attributes {_attrs(node)} != {attrs}")
        if any({**before[o][1], "N": 0} != {**before[origs[0]][1], "N": 0} for o in origs):
            problems.append(f"packed {name}: originals differ in settings")
        for slot, packed_in in enumerate(node.input[1:]):
            want = [before[o][2][slot] if slot < len(before[o][2]) else ("", None) for o in origs]
            if not packed_in:
                if any(w[0] for w in want):
                    problems.append(f"packed {name}: input {slot + 1} dropped")
                continue
            if packed_in not in inits or any(w[1] is None for w in want):
                problems.append(f"packed {name}: input {slot + 1} is not an initializer")
                continue
            rows = _rows(numpy_helper.to_array(inits[packed_in]), sum(ns))
            offsets = np.cumsum([0, *ns])
            for (_, (_, dtype, shape)), w, lo, hi in zip(want, want, offsets[:-1], offsets[1:]):
                part = rows[lo:hi].reshape(shape)
                if _digest(part) != w[1] or str(part.dtype) != dtype:
                    problems.append(f"packed {name}: input {slot + 1} rows {lo}:{hi} differ from {w[0]}")
    lost = set(before) - set(seen)
    twice = [k for k, v in seen.items() if v > 1]
    if lost:
        problems.append(f"MatMulNBits lost: {sorted(lost)[:5]}")
    if twice:
        problems.append(f"MatMulNBits used twice: {twice[:5]}")
    return problems


def fuse_graph(
    src: str | Path,
    dst: str | Path,
    *,
    num_heads: int | None = None,
    kv_num_heads: int | None = None,
    max_positions: int | None = None,
    attention: bool = True,
    pack_qkv: bool = True,
    split_ffn: bool = True,
    pack_gate_up: bool = True,
) -> dict:
    """Fuse norms, rotary and attention of the ONNX file ``src`` into ``dst``; returns the counts.

    ``num_heads`` / ``kv_num_heads`` (from the model config) enable the attention fusion;
    ``max_positions`` trims the rotary cos/sin caches ONNX Runtime's fusion sizes at 131072 rows.
    ``pack_qkv``: one MatMulNBits for Q/K/V feeding the fused attention's packed input;
    ``split_ffn``: heavy and light FFN parts computed apart (no Concat/Slice between them);
    ``pack_gate_up``: with ``split_ffn``, one MatMulNBits + Split for each part's gate and up.
    Raises :class:`ExportError` if the graph's inputs/outputs, our ffsplit / GatherBlockQuantized
    nodes or the MatMulNBits weights (other than stacked, byte for byte) would change.
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
    before_nbits = _nbits_snapshot(proto.graph)
    proto_inputs = [copy.deepcopy(i) for i in proto.graph.input]
    names = [n.name for n in proto.graph.node if n.op_type == _NBITS]
    if len(set(names)) != len(names) or "" in names:  # the packing check identifies nodes by name
        pack_qkv = pack_gate_up = False
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
        if gqa.lengths is not None:
            _unroll_logits(model)
        model.prune_graph()
    # only where every attention was fused: ONNX Runtime's load-time shape inference of a custom op's
    # output loses the symbolic dims, and the unfused attention's Reshapes whose targets derive from
    # the residual stream then fail ("multiple -1 dimensions"; Whisper / MPT graphs)
    unpinned = 0
    if reasons == {} and Counter(n.op_type for n in model.model.graph.node)["GroupQueryAttention"]:
        unpinned = _unpin_fused_ffns(model)
        model.prune_graph()
    record: dict = {}  # packed MatMulNBits name -> the original names, in order
    if pack_qkv:
        stats["qkv_packed"] = _pack_qkv(model, record)
    if split_ffn:
        stats["ffn_split"], stats["gate_up_packed"] = _split_ffn_halves(model, record, pack_gate_up)
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
    # prune_graph drops a graph input no node reads any more (a model whose position_ids only fed
    # the rotary a fusion absorbed); the interface keeps it
    if [i.name for i in out.graph.input] != [i.name for i in proto_inputs]:
        del out.graph.input[:]
        out.graph.input.extend(proto_inputs)
    after = Counter(n.op_type for n in out.graph.node)
    if _interface(out.graph) != before_iface:
        raise ExportError(
            f"{src.name}: the fusion pass changed the graph's inputs/outputs; this is a bug, "
            "export with --no-fuse-attention"
        )
    problems = _nbits_changes(before_nbits, out.graph, record)
    if _untouchable(out.graph) != before_keep or problems:
        raise ExportError(
            f"{src.name}: the fusion pass changed ffsplit / GatherBlockQuantized / MatMulNBits nodes "
            f"({'; '.join(problems[:3]) or 'ffsplit or GatherBlockQuantized'}); this is a bug, "
            "export with --no-fuse-attention"
        )
    stats["fused_ffn_unpinned"] = unpinned
    packed = {
        k: stats.pop(k) for k in ("qkv_packed", "ffn_split", "gate_up_packed", "fused_ffn_unpinned") if k in stats
    }
    stats = {**{op: after.get(op, 0) - before.get(op, 0) for op in FUSED_OPS}, **packed, **stats}
    stats.update(nodes_before=sum(before.values()), nodes_after=sum(after.values()))
    if reasons:
        stats["attention_not_fused"] = reasons
    if not any(stats[op] for op in FUSED_OPS) and not any(
        packed.values()
    ):  # nothing matched: the file stays as exported
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
