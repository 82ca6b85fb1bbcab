"""Large constants inside optimum's merged decoders, stored once.

optimum merges a seq2seq decoder and its with-past twin into one file whose ``If`` node holds both
graphs as branches; the two graphs' initializers that are equal are stored once, in the main
graph. Weights that the exporter writes as ``Constant`` nodes (the inputs of ``ffsplit::FusedFFNNBits``
/ ``FusedFFN``, emitted by their symbolic functions) are not initializers, so each branch kept its
own copy: Whisper tiny.en's merged decoder grew by 3.1 MB (17 %) with ``--fused-ffn``.
:func:`hoist_branch_constants` moves every large ``Constant`` of the branches of a main-graph ``If``
into one main-graph initializer per distinct value; the branches read it by name (ONNX subgraphs
see the names of the graph around them). The function is unchanged: same values, same consumers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import AttributeProto, TensorProto

#: Constants smaller than this stay where they are (shapes, axes, scalars)
MIN_BYTES = 1024


def _value(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor of a ``Constant`` node's ``value`` attribute (None for the other forms)."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    a = node.attribute[0]
    return a.t if a.name == "value" and a.type == AttributeProto.TENSOR else None


def _key(t: TensorProto) -> tuple:
    raw = t.raw_data if t.HasField("raw_data") else t.SerializeToString()
    return (t.data_type, tuple(t.dims), hashlib.sha256(raw).hexdigest())


def _names(graph: onnx.GraphProto, into: set) -> set:
    """Every value name used anywhere in ``graph`` and its subgraphs."""
    into.update(t.name for t in graph.initializer)
    into.update(v.name for v in [*graph.input, *graph.output, *graph.value_info])
    for n in graph.node:
        into.update(n.input)
        into.update(n.output)
        for a in n.attribute:
            for g in [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs):
                _names(g, into)
    return into


def _rename_inputs(graph: onnx.GraphProto, old: str, new: str) -> None:
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
        for a in n.attribute:  # a nested subgraph may read the constant too
            for g in [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs):
                _rename_inputs(g, old, new)


def hoist_branch_constants(model: onnx.ModelProto, min_bytes: int = MIN_BYTES) -> dict:
    """Move the large ``Constant`` nodes of every main-graph ``If`` branch into main-graph
    initializers, one per distinct value, in place. Returns ``{"constants": moved nodes,
    "initializers": added initializers, "bytes_saved": bytes no longer stored twice}``."""
    graph = model.graph
    used = _names(graph, set())
    shared: dict[tuple, str] = {}
    moved = saved = 0
    for node in graph.node:
        if node.op_type != "If":
            continue
        for attr in node.attribute:
            if attr.type != AttributeProto.GRAPH:
                continue
            branch = attr.g
            outputs = {o.name for o in branch.output}
            keep = []
            for n in branch.node:
                t = _value(n)
                if t is None or len(n.output) != 1 or n.output[0] in outputs or t.ByteSize() < min_bytes:
                    keep.append(n)
                    continue
                key = _key(t)
                name = shared.get(key)
                if name is None:
                    name, k = f"ffsplit_shared/{n.output[0]}", 0
                    while name in used:
                        k += 1
                        name = f"ffsplit_shared/{n.output[0]}_{k}"
                    used.add(name)
                    init = TensorProto()
                    init.CopyFrom(t)
                    init.name = name
                    graph.initializer.append(init)
                    shared[key] = name
                else:
                    saved += t.ByteSize()
                _rename_inputs(branch, n.output[0], name)
                moved += 1
            if len(keep) != len(branch.node):
                del branch.node[:]
                branch.node.extend(keep)
    return {"constants": moved, "initializers": len(shared), "bytes_saved": saved}


def hoist_file(path: Path) -> dict | None:
    """:func:`hoist_branch_constants` on one ONNX file, rewritten in place when anything moved
    (external data kept external). None for a file without a main-graph ``If``."""
    bare = onnx.load(str(path), load_external_data=False)
    if not any(n.op_type == "If" for n in bare.graph.node):
        return None
    locations = _locations(bare)
    model = onnx.load(str(path), load_external_data=True)
    stats = hoist_branch_constants(model)
    if stats["constants"]:
        save_rewritten(model, path, locations)
    return stats


def _locations(bare: onnx.ModelProto) -> set[str]:
    return {e.value for t in bare.graph.initializer for e in t.external_data if e.key == "location"}


def external_locations(path: Path) -> set[str]:
    """The external data files that the initializers of the ONNX file ``path`` point to."""
    return _locations(onnx.load(str(path), load_external_data=False))


def save_rewritten(model: onnx.ModelProto, path: Path, locations: set[str]) -> None:
    """Write ``model`` over ``path``, whose weights were in the external files ``locations`` (deleted
    first: onnx would append to an existing data file), external again if they were."""
    for name in locations:
        (path.parent / name).unlink()
    if locations:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + "_data")
    else:
        onnx.save_model(model, str(path))
