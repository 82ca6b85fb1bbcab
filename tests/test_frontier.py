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
    ctx = min(256, model.config.max_position_embeddings)  # frontier.py stops at the model's positions
    ref = perplexity_pytorch(model, tok, eval_text("bible", 600), context_length=ctx, stride=ctx).perplexity
    assert rows[0]["perplexity"] == pytest.approx(ref, rel=1e-4)  # float32 graph vs PyTorch
    by = {r["name"]: r for r in rows}
    assert by["ORT int4 b32 DEFAULT L4"]["file_bytes"] < by["dense fp32 (optimum)"]["file_bytes"]
    # on_front agrees with pareto_front, and at least one row is on it
    front = set(fr.pareto_front([(r["decode_ms"], r["perplexity"]) for r in rows]))
    assert front and {i for i, r in enumerate(rows) if r["on_front"]} == front
    png = out / "tiny-llama_front.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| preset balanced |" in (out / "frontier.md").read_text()


@pytest.mark.slow
def test_quick_run_on_tiny_whisper(tmp_path):
    import onnx
    import torch

    from ffsplit_export.data import evaldata
    from ffsplit_export.errors import MissingResourceError
    from ffsplit_export.eval.evaluate import transcribe, transcript_perplexity
    from ffsplit_export.models.tiny import build_tiny

    try:
        clips = evaldata.librispeech_clips(2)
    except MissingResourceError as e:
        pytest.skip(str(e))
    fr = _frontier()
    out = tmp_path / "out"
    fr.main(
        [
            "--models",
            "tiny-whisper",
            "--quick",
            "--output",
            str(out),
            "--stem",
            "whisper",
            "--runs",
            "1",
            "--threads",
            "1",
            "--bandwidth-gib",
            "0.01",
        ]
    )
    data = json.loads((out / "whisper.json").read_text())
    rows = data["models"]["tiny-whisper"]["rows"]
    names = [r["name"] for r in rows]
    assert names[0] == "dense fp32 (optimum)" and "ORT int4 b32 DEFAULT L4" in names
    assert {"preset accurate", "preset balanced", "preset fast"} <= set(names)
    words = len(" ".join(r for _, r in clips).split())
    for r in rows:
        assert 0 <= r["wer"] and r["words"] == words and len(r["transcripts"]) == 2
        assert math.isfinite(r["transcript_perplexity"]) and r["transcript_perplexity"] > 1
        assert r["transcribe_s"] > 0 and r["decode_ms"] > 0 and r["file_bytes"] > 0
    # the dense row (float32 graphs in ONNX Runtime) scores the dense transcripts as PyTorch does
    model, pre, _ = build_tiny("tiny-whisper")
    torch.manual_seed(0)
    hyps = transcribe(model, pre, clips, token_ids=True)
    ref = transcript_perplexity(model, pre, [(a, h) for (a, _), h in zip(clips, hyps)]).perplexity
    assert rows[0]["transcript_perplexity"] == pytest.approx(ref, rel=1e-4)
    by = {r["name"]: r for r in rows}
    q = by["ORT int4 b32 DEFAULT L4"]
    assert q["file_bytes"] < rows[0]["file_bytes"]
    # the tied lm_head was untied inside the merged decoder's branches, so it is 4-bit too
    dec = onnx.load(str(Path(q["path"]) / "decoder_model_merged.onnx"))
    vocab = model.config.vocab_size
    nbits = [
        n
        for g in fr._graphs(dec.graph)
        for n in g.node
        if n.op_type == "MatMulNBits" and any(a.name == "N" and a.i == vocab for a in n.attribute)
    ]
    assert nbits and all(next(a.i for a in n.attribute if a.name == "accuracy_level") == 4 for n in nbits)
    front = set(fr.pareto_front([(r["decode_ms"], r["transcript_perplexity"]) for r in rows]))
    assert front and {i for i, r in enumerate(rows) if r["on_front"]} == front
    png = out / "tiny-whisper_front.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| preset balanced |" in (out / "whisper.md").read_text()
