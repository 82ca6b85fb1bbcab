"""samples/sweep_accuracy.py end to end on a tiny causal LM: rows, the equal-bytes ablation, outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ffsplit_export.errors import MissingResourceError

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def test_sweep_quick_on_a_tiny_model(tmp_path, monkeypatch):
    from ffsplit_export.data.evaldata import calibration_text

    try:
        calibration_text("bible", 2)
    except MissingResourceError as e:
        pytest.skip(str(e))
    sys.path.insert(0, str(SAMPLES))
    try:
        import sweep_accuracy
    finally:
        sys.path.remove(str(SAMPLES))
    out = tmp_path / "sweep"
    argv = ["sweep_accuracy.py", "--output", str(out), "--quick", "--models", "tiny-llama", "--no-onnx"]
    monkeypatch.setattr(sys, "argv", argv + ["--max-chars", "3000"])
    sweep_accuracy.main()
    rows = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in rows]
    assert len(labels) == len(set(labels)), "a configuration ran twice"
    groups = {"dense", "preset", "matmulnbits", "ffsplit", "uniform", "random"}  # no ort-quant: --no-onnx
    assert {r["group"] for r in rows} == groups
    # the presets are the shipped recipes: their stored config is CompressionConfig.from_preset's
    from ffsplit_export.config import CompressionConfig

    presets = {r["preset"]: r for r in rows if r["group"] == "preset" and not r["overrides"]}
    assert set(presets) == {"accurate", "balanced", "fast"}
    for name, r in presets.items():
        want = CompressionConfig.from_preset(name).split_config().to_dict()
        assert r["config"] == want, name
    # recipes near a preset: the preset's config with the row's fields over it
    near = [r for r in rows if r["group"] == "preset" and r["overrides"]]
    assert {r["overrides"].get("quantizer", "gptq") for r in near} == {"gptq", "rtn"}
    for r in near:
        want = CompressionConfig.from_preset(r["preset"], **r["overrides"]).split_config().to_dict()
        assert r["config"] == want and r["config"]["group_size"] == 32, r["label"]
    # the goal rows again on the long calibration, one of them layer by layer
    long = [r for r in rows if r["calibration"] != "protocol"]
    assert len(long) >= 5 and any(r["sequential"] for r in long)
    assert all(r["calibration"] == sweep_accuracy.LONG_CAL_DESC for r in long)
    tok = sweep_accuracy.load_model("tiny-llama")[1]
    texts = sweep_accuracy.long_calibration(tok)
    assert 1 < len(texts) <= sweep_accuracy.LONG_CAL[0]
    assert all(len(tok(t)["input_ids"]) >= sweep_accuracy.LONG_CAL[1] for t in texts)
    # the joint prune-and-quantize goal rows and the mixed-precision rows ran with GPTQ codes
    joint = [r for r in rows if r["quantizer"] == "gptq" and r["prune_method"] == "sparsegpt"]
    assert {r["light_format"] for r in joint} >= {"sparse-int8", "sparse-int4"}
    mixed = [r for r in rows if r["note"] == "mixed precision"]
    assert mixed and all(r["selection"] == "hessian" and 0 < r["heavy_fraction"] <= 0.03 for r in mixed)
    dense = next(r for r in rows if r["group"] == "dense")
    assert dense["ffn_ratio"] == 1.0 and dense["model_bytes_ratio"] == 1.0
    # every equal-bytes uniform row matches the FFN bytes of the split it follows within 2 %
    for i, r in enumerate(rows):
        if r["note"] == "equal FFN bytes":
            split = next(x for x in reversed(rows[:i]) if x["group"] == "ffsplit")
            assert r["heavy_fraction"] == 0 and r["ffn_ratio"] == pytest.approx(split["ffn_ratio"], rel=0.02)
            rnd = rows[i - 1]  # the random heavy set of the same split runs just before
            assert rnd["group"] == "random" and rnd["heavy_fraction"] == split["heavy_fraction"]
            assert rnd["ffn_ratio"] == pytest.approx(split["ffn_ratio"], rel=1e-3)
    emb = [r for r in rows if r["embedding"] == "int8"]
    assert emb and all(r["model_bytes"] < dense["model_bytes"] for r in emb)
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == len(rows) + 2  # header, separator, one line per row
    assert (out / "tiny-llama_perplexity_vs_bytes.png").stat().st_size > 1000
    # a rerun finds every row stored and recomputes none; --report rewrites the same tables
    (out / "results.md").unlink()
    sweep_accuracy.main()
    assert json.loads((out / "results.json").read_text()) == rows
    monkeypatch.setattr(sys, "argv", argv + ["--report"])
    sweep_accuracy.main()
    assert (out / "results.md").read_text() == md
