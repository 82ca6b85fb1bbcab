"""samples/frontier.py: the Pareto front, and a --quick run on tiny-llama (rows, JSON, PNG)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _frontier():
    spec = importlib.util.spec_from_file_location("frontier_sample", ROOT / "samples" / "frontier.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_pareto_front_excludes_dominated_points():
    front = _frontier().pareto_front
    pts = [
        (10.0, 5.0),  # 0: fastest, worst
        (20.0, 3.0),  # 1: on the front
        (25.0, 3.5),  # 2: dominated by 1 (slower and worse)
        (30.0, 2.0),  # 3: most accurate
        (20.0, 3.0),  # 4: a tie with 1: neither dominates the other
        (10.0, 6.0),  # 5: as fast as 0 but worse: dominated
        (float("nan"), 1.0),  # 6: unmeasured: never on the front
    ]
    assert front(pts) == [0, 1, 4, 3]
    assert front([]) == []
    assert front([(1.0, 1.0)]) == [0]


@pytest.mark.slow
def test_quick_run_on_tiny_llama(tmp_path):
    import torch

    from ffsplit_export.data.evaldata import eval_text
    from ffsplit_export.eval.evaluate import perplexity_pytorch
    from ffsplit_export.models.tiny import build_tiny

    fr = _frontier()
    out = tmp_path / "out"
    fr.main(
        [
            "--models",
            "tiny-llama",
            "--quick",
            "--output",
            str(out),
            "--runs",
            "1",
            "--tokens",
            "4",
            "--no-genai-loop",
            "--bandwidth-gib",
            "0.01",
        ]
    )
    data = json.loads((out / "frontier.json").read_text())
    rows = data["models"]["tiny-llama"]["rows"]
    names = [r["name"] for r in rows]
    assert names[0] == "dense fp32 (optimum)"
    assert any(n.startswith("ORT int4") for n in names) and "preset balanced" in names
    for r in rows:
        assert math.isfinite(r["perplexity"]) and r["decode_ms"] > 0 and r["file_bytes"] > 0
        assert r["bytes_read_per_token"] >= r["weight_bytes_per_token"] > 0
        assert r["prefill_ms"]["16"] > 0
    # the dense row's ONNX Runtime perplexity equals PyTorch's on the same text (float32 export)
    model, tok, _ = build_tiny("tiny-llama")
    torch.manual_seed(0)
    ref = perplexity_pytorch(model, tok, eval_text("bible", 600), context_length=256, stride=256).perplexity
    assert rows[0]["perplexity"] == pytest.approx(ref, rel=1e-4)  # float32 graph vs PyTorch
    by = {r["name"]: r for r in rows}
    assert by["ORT int4 b32 DEFAULT L4"]["file_bytes"] < by["dense fp32 (optimum)"]["file_bytes"]
    # on_front agrees with pareto_front, and at least one row is on it
    front = set(fr.pareto_front([(r["decode_ms"], r["perplexity"]) for r in rows]))
    assert front and {i for i, r in enumerate(rows) if r["on_front"]} == front
    png = out / "tiny-llama_front.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| preset balanced |" in (out / "frontier.md").read_text()
