"""scripts/gpu_check.sh and ffsplit_export.trt.gpu_check on a machine without a GPU: the skip
message, and the table / JSON / mismatch logic on made-up results (no GPU, no TensorRT)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_plugin

from ffsplit_export.trt import gpu_check
from ffsplit_export.trt.gpu_check import Row

ROOT = Path(__file__).resolve().parents[1]


def test_compare_rows_against_stated_tolerance():
    ref = {"logits": np.array([[1.0, -30.0, 2.0]]), "present.0.key": np.zeros((1, 2, 3, 4))}
    got = {
        "logits": ref["logits"] + np.array([[0.0, 0.1, 0.0]]),
        "present.0.key": np.full((1, 2, 3, 4), 5e-4),
    }
    rows = gpu_check.compare("m", "trt engine model", got, ref, "fp32")
    by = {r.output: r for r in rows}
    # fp32: 1e-3 + 5e-3 * max|ref| = 1e-3 + 0.15 -> 0.1 passes; zeros: tol 1e-3 -> 5e-4 passes
    assert by["logits"].max_abs_diff == pytest.approx(0.1) and by["logits"].tol == pytest.approx(0.151)
    assert all(r.ok for r in rows)
    got["logits"] = ref["logits"] + 0.2
    assert not gpu_check.compare("m", "b", got, ref, "fp32")[0].ok
    got["logits"] = np.full_like(ref["logits"], np.nan)
    assert not gpu_check.compare("m", "b", got, ref, "fp32")[0].ok  # NaN never passes
    assert gpu_check.compare("m", "b", {}, ref, "fp32")[0].error == "output missing"
    bad_shape = gpu_check.compare("m", "b", {"logits": np.zeros((2, 2))}, {"logits": ref["logits"]}, "fp32")
    assert "shape" in bad_shape[0].error


def test_table_json_and_failure_line(tmp_path):
    rows = [
        Row("tiny-mpt", "trt engine model", "logits", 1e-5, 1e-3, ms_per_token=0.42),
        Row("bench-mpt-quick", "ort trt-ep model", "logits", 0.5, 0.01),
        Row("tiny-t5", "export --target tensorrt", error="ExportError: boom"),
    ]
    table = gpu_check.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows) and "ms/token" in lines[0]
    assert "0.420" in lines[2] and lines[2].rstrip().endswith("yes")
    assert "NO" in lines[3] and "ExportError: boom" in lines[4]
    assert [r.ok for r in gpu_check.failures(rows)] == [False, False]
    line = gpu_check.failure_line(rows)
    assert "\n" not in line and line.startswith("gpu_check: FAIL: 2 of 3")
    assert "bench-mpt-quick" in line and "0.5 > tol 0.01" in line
    out = tmp_path / "r" / "gpu_check.json"
    gpu_check.write_json(out, rows, {"seconds": 1.0})
    data = json.loads(out.read_text())
    assert data["ok"] is False and [r["ok"] for r in data["rows"]] == [True, False, False]
    assert data["rows"][0]["ms_per_token"] == 0.42 and data["meta"]["seconds"] == 1.0


def test_main_exit_codes_with_made_up_results(tmp_path, monkeypatch, capsys):
    import ffsplit_export.trt.engine as engine

    monkeypatch.setattr(engine, "cuda_device_count", lambda: 1)
    good = [Row("tiny-mpt", "trt engine model", "logits", 1e-5, 1e-3)]
    monkeypatch.setattr(gpu_check, "run_all", lambda args: (good, {}))
    assert gpu_check.main(["--work", str(tmp_path)]) == 0
    assert "gpu_check: OK" in capsys.readouterr().out
    assert json.loads((tmp_path / "gpu_check.json").read_text())["ok"] is True
    bad = good + [Row("tiny-t5", "trt engine encoder_model", "last_hidden_state", 3.0, 1e-3)]
    monkeypatch.setattr(gpu_check, "run_all", lambda args: (bad, {}))
    assert gpu_check.main(["--work", str(tmp_path), "--json", str(tmp_path / "x.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: FAIL: 1 of 2") and "encoder_model" in err[0]


def test_main_without_gpu_is_a_clean_skip(monkeypatch, capsys, tmp_path):
    import ffsplit_export.trt.engine as engine

    monkeypatch.setattr(engine, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(gpu_check, "run_all", lambda args: pytest.fail("must not run without a GPU"))
    assert gpu_check.main(["--work", str(tmp_path)]) == 0
    assert "no GPU" in capsys.readouterr().out


def test_make_feeds_names_dims_by_role():
    class Inp:
        def __init__(self, name, shape, type_):
            self.name, self.shape, self.type = name, shape, type_

    class S:
        def get_inputs(self):
            return [
                Inp("input_ids", ["batch_size", "sequence_length"], "tensor(int64)"),
                Inp(
                    "attention_mask",
                    ["batch_size", "past_sequence_length + sequence_length"],
                    "tensor(int64)",
                ),
                Inp("past_key_values.0.key", ["batch_size", 4, "past_sequence_length", 16], "tensor(float)"),
                Inp(
                    "input_features",
                    ["batch_size", "feature_size", "encoder_sequence_length"],
                    "tensor(float)",
                ),
            ]

    f = gpu_check.make_feeds(
        S(), np.random.default_rng(0), seq=3, past=5, config={"num_mel_bins": 80, "max_source_positions": 16}
    )
    assert f["input_ids"].shape == (1, 3) and f["input_ids"].min() >= 3
    assert f["attention_mask"].shape == (1, 8) and (f["attention_mask"] == 1).all()
    assert f["past_key_values.0.key"].shape == (1, 4, 5, 16)
    assert f["input_features"].shape == (1, 80, 32)


@pytest.mark.skipif(
    subprocess.run(["bash", "-c", "nvidia-smi -L"], capture_output=True).returncode == 0,
    reason="a GPU is present: the script would run the real check",
)
def test_gpu_check_sh_says_no_gpu_and_exits_0():
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == [
        "gpu_check: no GPU (nvidia-smi finds no NVIDIA GPU): nothing to check here, skipped"
    ]


@pytest.mark.slow
@needs_plugin
@pytest.mark.parametrize("case", gpu_check.TINY_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_reference_side_runs_on_cpu(tmp_path, case):
    """Everything gpu_check does before the GPU: the export, the feeds of every ONNX file (full
    and one-token decode) and the ONNX Runtime CPU reference it compares engines with."""
    from ffsplit_export.export import ExportOptions, export
    from ffsplit_export.split import SplitConfig

    name, _label, cfg, dense24 = case
    out = tmp_path / "x"
    opts = ExportOptions(target="tensorrt", overwrite=True, validate=dense24, trt_dense_24=dense24)
    export(name, out, config=SplitConfig(**cfg), options=opts, num_samples=8, progress=False)
    files = sorted(out.glob("*.onnx"))
    assert files
    rng = np.random.default_rng(0)
    for f in files:
        sess = gpu_check.cpu_session(f)
        for kw in ({}, {"seq": 1, "past": 32}):
            feeds = gpu_check.make_feeds(sess, rng, config=gpu_check._config(f), **kw)
            res = gpu_check.run_session(sess, feeds)
            assert res and all(np.isfinite(v).all() for v in res.values() if v.dtype.kind == "f"), f.name
            # an engine returning exactly the reference passes, a perturbed one does not
            assert all(r.ok for r in gpu_check.compare(name, "self", res, res, "fp32"))
