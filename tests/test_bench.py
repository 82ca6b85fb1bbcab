"""The e2e benchmark's byte accounting, table and arguments (no timing here)."""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ffsplit_export import bench


def _model(tmp_path, tied: bool):
    emb = np.zeros((100, 8), np.float32)
    w = np.zeros((8, 16), np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"])]
    inits = [numpy_helper.from_array(emb, "E"), numpy_helper.from_array(w, "W")]
    if tied:
        nodes += [
            helper.make_node("Transpose", ["E"], ["Et"]),
            helper.make_node("MatMul", ["h", "Et"], ["z"]),
        ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(g), path)
    return path, emb.nbytes, w.nbytes


def test_weight_bytes_counts_one_embedding_row(tmp_path):
    path, e, w = _model(tmp_path, tied=False)
    b = bench.weight_bytes(path)
    assert b["initializer_bytes"] == e + w
    assert b["embedding_bytes"] == e
    assert b["weight_bytes_per_token"] == w + 8 * 4
    assert b["file_bytes"] == path.stat().st_size


def test_weight_bytes_tied_embedding_is_read_in_full(tmp_path):
    path, e, w = _model(tmp_path, tied=True)
    b = bench.weight_bytes(path)
    assert b["embedding_bytes"] == 0
    assert b["weight_bytes_per_token"] == e + w


def test_weight_bytes_counts_constant_node_weights(tmp_path):
    """Weights folded into Constant nodes (how the fused FFN ops' inputs are exported) are read too."""
    w = np.ones((8, 16), np.float32)
    g = helper.make_graph(
        [
            helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W")),
            helper.make_node("MatMul", ["x", "W"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(g), path)
    b = bench.weight_bytes(path)
    assert b["initializer_bytes"] == w.nbytes
    assert b["weight_bytes_per_token"] == w.nbytes


def test_arguments_and_bad_lists():
    from ffsplit_export.cli import bench as bench_cli
    from ffsplit_export.cli.options import fraction_list

    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    bench_cli.add_commands(sub)
    a = p.parse_args(["bench", "--quick", "--sparsities", "0.5,0.9", "--prefill", "32"])
    assert a.sparsities == [0.5, 0.9] and a.prefill == [32] and a.quick and a.func is bench_cli.run_bench
    with pytest.raises(argparse.ArgumentTypeError, match="0.5,0.75,0.9"):
        fraction_list("0.5,x")
    a = p.parse_args(["bench", "--sparsities", "none", "--presets", "balanced,fast"])
    assert a.sparsities == [] and a.presets == ["balanced", "fast"]
    assert p.parse_args(["bench"]).presets == []
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "--presets", "balanced,quick"])  # not a preset


def test_preset_variant_is_the_preset_with_rtn(tmp_path, monkeypatch):
    """``--presets``: the preset's own export, round-to-nearest (random weights), reused when present."""
    import ffsplit_export.export.api as api

    calls = []
    monkeypatch.setattr(
        api, "export", lambda *a, **k: calls.append(k) or (tmp_path / "p" / "model.onnx").touch()
    )
    (tmp_path / "p").mkdir()
    assert bench.export_preset(tmp_path / "m", tmp_path / "q", "fast", 4) == tmp_path / "q"
    assert calls[0]["preset"] == "fast" and calls[0]["quantizer"] == "rtn" and calls[0]["num_samples"] == 4
    assert calls[0]["options"].nbits_accuracy_level is None  # the preset's level
    bench.export_preset(tmp_path / "m", tmp_path / "p", "fast", 4)
    assert len(calls) == 1  # p/model.onnx exists: reused


def test_table_has_a_row_per_variant():
    r = {
        "formats": "f",
        "file_bytes": 1e6,
        "bytes_read_per_token": 2e6,
        "decode_ms_per_token": {"median": 2.0, "p10": 1.5, "p90": 2.5},
        "tokens_per_s": 500.0,
        "decode_speedup": {"dense": 1.0, "int8": 1.0, "int4": 1.0},
        "achieved_gbs": 1.0,
        "bandwidth_fraction": 0.1,
        "floor_ms": 0.1,
        "prefill_ms": {"32": {"median": 3.0}},
        "prefill_speedup": {"int4": {"32": 1.0}},
    }
    out = {
        "results": {"a": r, "b": r},
        "bandwidth_gbs": {
            "ort_matmul_m1": {"median": 9.0},
            "reference": 10.0,
            "numpy_sum_1thread": {"median": 8.0},
        },
        "machine": {"cpu": "x", "cores": 2, "loadavg_start": [], "loadavg_end": []},
        "settings": {"threads": 2},
    }
    text = bench.table(out, [32])
    assert text.count("\n| a |") == 1 and "| b |" in text and "10.0 GB/s" in text


def test_fold_weight_transposes_unties_lm_head(tmp_path):
    path, e, w = _model(tmp_path, tied=True)
    m = onnx.load(path)
    assert bench.fold_weight_transposes(m) == 1
    assert "Transpose" not in {n.op_type for n in m.graph.node}
    onnx.save(m, path)
    b = bench.weight_bytes(path)
    assert b["embedding_bytes"] == e and b["weight_bytes_per_token"] == w + e + 8 * 4
