"""--embedding int4: the block-wise int4 GatherBlockQuantized table, and the table shared with a
tied int4 lm_head (one copy in the file)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import needs_plugin
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from ffsplit_export.errors import ConfigError, FormatError
from ffsplit_export.formats import packing
from ffsplit_export.formats.embedding import (
    QuantizedEmbedding,
    SharedInt4Embedding,
    TiedInt4Head,
    pack_int4_rows,
    unpack_int4_rows,
)
from ffsplit_export.formats.nbits import NBitsLinear
from ffsplit_export.ops._spec import gather_block_quantized_reference

V, D = 50, 96


def _gather_graph(data: np.ndarray, scales: np.ndarray, block: int, bits: int) -> onnx.ModelProto:
    node = oh.make_node(
        "GatherBlockQuantized",
        ["data", "ids", "scales"],
        ["y"],
        domain="com.microsoft",
        gather_axis=0,
        quantize_axis=1,
        block_size=block,
        bits=bits,
    )
    g = oh.make_graph(
        [node],
        "g",
        [oh.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [nh.from_array(data, "data"), nh.from_array(scales, "scales")],
    )
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft", 1)])


def test_int4_rows_pack_round_trip_and_nibble_order():
    q = np.array([[-8, 7, 0, -1], [1, 2, 3, 4]], np.int8)
    p = pack_int4_rows(q)
    # column 0 in the low nibble (code + 8), column 1 in the high nibble
    assert (
        p.dtype == np.uint8 and p.shape == (2, 2) and p[0, 0] == (0 | (15 << 4)) and p[0, 1] == (8 | (7 << 4))
    )
    assert np.array_equal(unpack_int4_rows(p), q)
    with pytest.raises(FormatError, match="D even"):
        pack_int4_rows(np.zeros((2, 3), np.int8))


@pytest.mark.parametrize("block", [16, 32])
def test_int4_embedding_matches_onnx_runtime_and_numpy_reference(block):
    """PyTorch forward == NumPy reference == ONNX Runtime's kernel: all compute (code - 8) * scale in
    float32, so the tolerance is 0 (measured 0)."""
    import onnxruntime as ort

    torch.manual_seed(0)
    w = torch.randn(V, D)
    m = QuantizedEmbedding(w, block_size=block, bits=4)
    assert m.data.dtype == torch.uint8 and m.data.shape == (V, D // 2) and m.scales.shape == (V, D // block)
    assert m.packed_nbytes() == V * D // 2 + V * (D // block) * 4
    # round to nearest on a symmetric grid of 7 steps: at most half a step per block
    step = w.reshape(V, D // block, block).abs().amax(-1, keepdim=True) / 7
    assert ((m.weight - w).reshape(V, D // block, block).abs() <= step / 2 + 1e-6).all()
    ids = np.array([[0, 7, 49, 7], [3, 3, 48, 1]], np.int64)
    with torch.no_grad():
        y_torch = m(torch.from_numpy(ids)).numpy()
    data, scales = m.data.numpy(), m.scales.numpy()
    y_ref = gather_block_quantized_reference(data, ids, scales, block_size=block, bits=4)
    sess = ort.InferenceSession(
        _gather_graph(data, scales, block, 4).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    y_ort = sess.run(None, {"ids": ids})[0]
    np.testing.assert_allclose(y_ref, y_torch, rtol=0, atol=0)
    np.testing.assert_allclose(y_ort, y_torch, rtol=0, atol=0)
    # the reference with an explicit zero point 8 per block reads the same table
    zp = np.full((V, D // block), 8, np.uint8)
    np.testing.assert_allclose(
        gather_block_quantized_reference(data, ids, scales, zp, block_size=block, bits=4), y_torch, atol=0
    )


def test_int8_reference_unchanged():
    torch.manual_seed(1)
    m = QuantizedEmbedding(torch.randn(V, D))  # int8, block 32 (the largest power of two <= 128 dividing 96)
    assert m.bits == 8 and m.block_size == 32
    ids = np.array([[1, 2, 49]], np.int64)
    y = gather_block_quantized_reference(m.data.numpy(), ids, m.scales.numpy(), block_size=32, bits=8)
    np.testing.assert_allclose(y, m(torch.from_numpy(ids)).detach().numpy(), rtol=0, atol=0)


def test_int4_embedding_bad_widths_raise_typed_errors():
    with pytest.raises(ConfigError, match=r"even embedding width, got 33.*--embedding int8 or fp32"):
        QuantizedEmbedding(torch.randn(4, 33), bits=4)
    with pytest.raises(
        ConfigError, match=r"block size 32 does not divide the embedding width 48; use one of \[16\]"
    ):
        QuantizedEmbedding(torch.randn(4, 48), bits=4, block_size=32)
    with pytest.raises(ConfigError, match=r"width divisible by 16, got 40; use --embedding fp32"):
        QuantizedEmbedding(torch.randn(4, 40), bits=4)
    with pytest.raises(ConfigError, match="block size 24 is not a power of two"):
        QuantizedEmbedding(torch.randn(4, 48), bits=4, block_size=24)


def test_shared_embedding_decodes_the_lm_head_codes_whatever_chose_them():
    """The shared embedding's rows are exactly the lm_head's decoded rows, for codes that are not
    round-to-nearest (as GPTQ's are not)."""
    rng = np.random.default_rng(0)
    q = rng.integers(-7, 8, (V, D)).astype(np.int8)
    s = (rng.random((V, D // 32)) + 0.1).astype(np.float32)
    head = NBitsLinear(q, s, 4, 32)

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = head

    owner = Tied()
    emb = SharedInt4Embedding(owner, "lm_head")
    ids = torch.tensor([[0, 5, 49]])
    want = torch.from_numpy(packing.dequantize(q, s, 32))[ids]
    assert torch.equal(emb(ids), want) and emb.packed_nbytes() == 0 and emb.block_size == 32
    # a replaced lm_head is followed (recover swaps modules)
    owner.lm_head = NBitsLinear(np.zeros_like(q), s, 4, 32)
    assert torch.equal(emb(ids), torch.zeros(1, 3, D))
    # a block that does not divide the width (MatMulNBits pads K): no shared table
    other = torch.nn.Module()
    other.lm_head = NBitsLinear.from_weight(torch.randn(V, 80), 4, 32)
    with pytest.raises(FormatError, match="--group-size dividing 80"):
        SharedInt4Embedding(other, "lm_head")


@pytest.mark.parametrize(
    "tied_head,grid",
    [(True, "symmetric"), (False, "symmetric"), (True, "asymmetric"), (True, "asymmetric-mse")],
)
def test_shared_layout_matches_onnx_runtime_and_reference_evaluator(tied_head, grid, tmp_path):
    """lm_head(embedding(ids)) with the shared table: ONNX Runtime, onnx's ReferenceEvaluator (our
    GatherBlockQuantized / MatMulNBits references) and PyTorch agree (float32 summation order only:
    atol 1e-4 on outputs up to ~50); the file has the codes once. ``tied_head`` False: a plain
    NBitsLinear lm_head (1-D scales, e.g. after recover repacks it) gets a reshaped scales copy.
    With zero points (``--int4-grid asymmetric``) the gather reads its own one-per-block zero points
    ([V, D/B, 1], V * D/B bytes) beside the lm_head's packed ones; the codes are still stored once."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    from ffsplit_export.linear import export_target
    from ffsplit_export.ops import reference_ops

    torch.manual_seed(0)
    head = NBitsLinear.from_weight(torch.randn(V, D) + 0.3, 4, 32, grid=grid)  # skewed: zero points differ
    assert head.asymmetric is (grid != "symmetric")

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = TiedInt4Head(head) if tied_head else head
            self.emb = SharedInt4Embedding(self, "lm_head")

        def forward(self, ids):
            return self.lm_head(self.emb(ids))

    m = Tied()
    ids = torch.tensor([[0, 7, 49, 7], [3, 3, 48, 1]])
    with torch.no_grad():
        want = m(ids).numpy()
        np.testing.assert_array_equal(m.emb(ids).numpy(), head.dense_weight()[ids].numpy())
        with export_target("ort-cpu"):
            torch.onnx.export(
                m,
                (ids,),
                str(tmp_path / "m.onnx"),
                input_names=["ids"],
                output_names=["y"],
                dynamic_axes={"ids": {0: "b", 1: "s"}},
                opset_version=17,
                dynamo=False,
            )
    model = onnx.load(str(tmp_path / "m.onnx"))
    codes = [i for i in model.graph.initializer if i.data_type == TensorProto.UINT8]
    zps = [tuple(i.dims) for i in codes if tuple(i.dims) != (V, D // 32, 16)]
    assert sum(tuple(i.dims) == (V, D // 32, 16) for i in codes) == 1
    assert sorted(zps) == (
        [] if grid == "symmetric" else sorted([(V * -(-(D // 32) // 2),), (V, D // 32, 1)])
    ), zps
    n_scales = [int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type == TensorProto.FLOAT]
    assert n_scales == ([V * D // 32] if tied_head else [V * D // 32] * 2), n_scales
    y_ort = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids.numpy()}
    )[0]
    y_ref = ReferenceEvaluator(model, new_ops=reference_ops(include_contrib=True)).run(
        None, {"ids": ids.numpy()}
    )[0]
    np.testing.assert_allclose(y_ort, want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(y_ref, want, rtol=0, atol=1e-4)


def _nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(a.g)


def _initializers(path):
    m = onnx.load(str(path), load_external_data=True)
    out = list(m.graph.initializer)
    for n in m.graph.node:  # the merged decoder keeps its initializers in If branches too
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out += list(a.g.initializer)
    return out, m


@pytest.mark.slow  # full optimum exports (still run by .ci/run)
@needs_plugin
@pytest.mark.parametrize("name,shared", [("tiny-llama", True), ("tiny-t5", True), ("tiny-t5-gated", False)])
def test_export_int4_embedding_shares_a_tied_lm_head_table(name, shared, tmp_path):
    """Tied lm_head + --other-linear int4 at a block dividing the width: the file holds the table once
    (the gather reads the lm_head's initializers) and validates exactly; an untied model (tiny-t5-gated)
    gets a standalone int4 table."""
    from ffsplit_export.export import ExportOptions, export
    from ffsplit_export.models.loading import load_model

    out = tmp_path / "out"
    m = export(
        name,
        out,
        preset="none",
        other_linear="int4",
        embedding="int4",
        group_size=32,
        num_samples=8,
        progress=False,
        options=ExportOptions(overwrite=True),
    )
    model, _, _ = load_model(name)
    emb = model.get_input_embeddings().weight
    v, d = emb.shape
    assert m["embedding"]["format"] == "int4" and m["embedding"]["block_size"] == 32
    assert (m["embedding"].get("shared_with") == "lm_head") is shared
    assert m["embedding"]["bytes"] == (0 if shared else v * d // 2 + v * (d // 32) * 4)
    for key, r in m["validation"].items():
        exact = r.get("exact_outputs", r["outputs"])  # accuracy_level 0 here: the exact path
        assert max(exact.values()) < 1e-4, (key, exact)
        assert max(r["reference_evaluator"].values()) < 1e-4, (key, r["reference_evaluator"])
    tables = 0
    for f in m["onnx_files"]:
        inits, g = _initializers(out / f)
        # int4 tables of the vocabulary: uint8 with V * D/2 bytes (the lm_head's B or a standalone
        # table), as initializers or Constant nodes (the encoder has the lm_head's only as a constant)
        consts = [
            (n.output[0], a.t)
            for n in _nodes(g.graph)
            if n.op_type == "Constant"
            for a in n.attribute
            if a.name == "value"
        ]
        vocab_tables = {
            name
            for name, t in [(i.name, i) for i in inits] + consts
            if t.data_type == TensorProto.UINT8 and np.prod(t.dims) == v * d // 2
        }
        gathers = [n for n in _nodes(g.graph) if n.op_type == "GatherBlockQuantized"]
        if not gathers:
            continue
        tables = max(tables, len(vocab_tables))
        attrs = {a.name: oh.get_attribute_value(a) for a in gathers[0].attribute}
        assert attrs["bits"] == 4 and attrs["block_size"] == 32
        if shared:  # the gather reads the lm_head's MatMulNBits B as it is (optimum's merge renames it)
            b_inputs = {n.input[1] for n in _nodes(g.graph) if n.op_type == "MatMulNBits"}
            src = gathers[0].input[0]
            assert vocab_tables == {src}, (vocab_tables, src)
            assert src in b_inputs or f.startswith("encoder"), (src, f)  # the encoder has no lm_head
    # tied: one table per file (the lm_head's, in the decoder also the lm_head's operand); untied:
    # the standalone table next to the (different) lm_head weights
    assert tables == (1 if shared else 2)
