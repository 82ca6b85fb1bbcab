"""SquareHead recovery on the built-in tiny models (no downloads, CPU, a few seconds each)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ffsplit_export.calibrate import make_batches
from ffsplit_export.errors import ConfigError
from ffsplit_export.linear import CompressedLinear, SparseLinear
from ffsplit_export.models.loading import load_model
from ffsplit_export.pipeline import compress
from ffsplit_export.recover import (
    RecoverConfig,
    compute_losses,
    make_trainable_,
    pack_trainable_,
    recover,
)
from ffsplit_export.split import SplitConfig

TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "pack my box with five dozen liquor jugs",
    "how vexingly quick daft zebras jump",
    "sphinx of black quartz, judge my vow",
] * 2


def _split(name="tiny-llama", fmt="sparse-int8", other="fp32", heavy="fp32", sparsity=0.5):
    torch.manual_seed(0)
    model, pre, _ = load_model(name)
    batches = make_batches(model, pre, TEXT, batch_size=4, max_length=32)
    res = compress(
        model,
        pre,
        config=SplitConfig(light_format=fmt, light_sparsity=sparsity, heavy_format=heavy),
        other_linear=other,
        batches=batches,
        progress=False,
    )
    return model, res


def _compressed(model) -> dict[str, CompressedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


@pytest.mark.parametrize(
    "fmt,heavy,other",
    [
        ("sparse-int8", "fp32", "fp32"),
        ("sparse-fp32", "fp16", "int8"),
        ("2:4-int8", "int8", "int4"),
        ("int8", "fp32", "fp32"),
        ("int4", "fp32", "fp32"),
        ("lowrank", "fp32", "fp32"),
    ],
)
def test_ste_forward_equals_packed_weight(fmt, heavy, other):
    _, res = _split(fmt=fmt, heavy=heavy, other=other)
    ref = {n: m.dense_weight().clone() for n, m in _compressed(res.model).items()}
    student = copy.deepcopy(res.model)
    mods = make_trainable_(student)
    assert set(mods) == set(ref)
    for n, m in mods.items():
        # exact: the fake quantizers round as formats/packing.py (measured max diff 0.0)
        torch.testing.assert_close(m.effective_weight().detach(), ref[n], rtol=0, atol=0)
    pack_trainable_(student)
    for n, m in _compressed(student).items():
        assert type(m).__name__ == type(get(res.model, n)).__name__
        torch.testing.assert_close(m.dense_weight(), ref[n], rtol=0, atol=0)


def get(model, name):
    return model.get_submodule(name)


def test_masks_fixed_and_loss_decreases():
    teacher, res = _split()
    before = {n: m.mask.clone() for n, m in _compressed(res.model).items() if isinstance(m, SparseLinear)}
    w0 = {n: get(res.model, n).dense_weight().clone() for n in before}
    # a random tiny model's task loss pulls away from the teacher: distil only
    n_compressed = len(_compressed(res.model))  # every compressed linear is trained
    rep = recover(teacher, res.model, res.batches, steps=20, lr=1e-3, task_loss_weight=0.0, progress=False)
    assert n_compressed > 0 and rep.trained_modules == n_compressed and len(rep.history) == 20
    assert rep.mean_loss(last=5) < 0.7 * rep.mean_loss(first=5)  # measured 0.0053 -> 0.00085
    changed = 0
    for n, mask in before.items():
        m = get(res.model, n)
        assert isinstance(m, SparseLinear)
        assert torch.equal(m.mask, mask), n  # same positions stored
        changed += int(not torch.equal(m.dense_weight(), w0[n]))
    assert changed == len(before)


def test_squarehead_is_zero_for_identical_models():
    teacher, res = _split()
    cfg = RecoverConfig(kd_logits_weight=1.0)
    losses = compute_losses(teacher, copy.deepcopy(teacher), res.batches[0], cfg)
    assert float(losses["squarehead"]) == 0.0
    assert abs(float(losses["kd"])) < 1e-6  # KL of identical logits, float32 round-off
    losses = compute_losses(res.model, teacher, res.batches[0], cfg)
    assert float(losses["squarehead"]) > 0.0


def test_seq2seq_recovery_runs():
    teacher, res = _split("tiny-t5")
    rep = recover(teacher, res.model, res.batches, steps=12, lr=3e-3, kd_logits_weight=0.5, progress=False)
    assert rep.mean_loss(last=3) < rep.mean_loss(first=3)
    assert all(np.isfinite(h["loss"]) for h in rep.history)


def test_checkpoint_resume_gives_the_same_state(tmp_path, monkeypatch):
    import ffsplit_export.recover as rec

    teacher, res = _split()
    full = copy.deepcopy(res.model)
    recover(teacher, full, res.batches, steps=8, lr=3e-3, progress=False)

    part = copy.deepcopy(res.model)
    calls = {"n": 0}
    orig = rec.compute_losses

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(rec, "compute_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recover(
            teacher,
            part,
            res.batches,
            steps=8,
            lr=3e-3,
            checkpoint_dir=tmp_path,
            checkpoint_every=4,
            progress=False,
        )
    monkeypatch.setattr(rec, "compute_losses", orig)
    part = copy.deepcopy(res.model)  # a fresh process would start from the one-shot student too
    rep = recover(
        teacher,
        part,
        res.batches,
        steps=8,
        lr=3e-3,
        checkpoint_dir=tmp_path,
        checkpoint_every=4,
        progress=False,
    )
    assert rep.start_step == 4 and len(rep.history) == 4
    for n, m in _compressed(full).items():
        # same data order, same Adam state: identical up to float32 round-off (measured 0.0)
        torch.testing.assert_close(get(part, n).dense_weight(), m.dense_weight(), rtol=0, atol=1e-6)


def test_gradual_schedule_ends_at_the_target_masks():
    teacher, res = _split(sparsity=0.75)
    masks = {n: m.mask.clone() for n, m in _compressed(res.model).items() if isinstance(m, SparseLinear)}
    cfg = RecoverConfig(steps=6, lr=1e-3, gradual_start_sparsity=0.25, gradual_end_step=4, gradual_every=2)
    assert cfg.sparsity_at(0, 0.75) == pytest.approx(0.25) and cfg.sparsity_at(4, 0.75) == 0.75
    recover(teacher, res.model, res.batches, cfg, plan=res.plan, progress=False)
    for n, mask in masks.items():
        assert torch.equal(get(res.model, n).mask, mask)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 0}, "steps=0"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"gradual_start_sparsity": 0.2}, "gradual_end_step"),
        ({"squarehead_weight": 0.0, "task_loss_weight": 0.0}, "all loss weights"),
        ({"stepz": 3}, "unknown"),
    ],
)
def test_bad_options_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RecoverConfig.from_kwargs(**kwargs)


def test_gradual_needs_the_plan():
    teacher, res = _split()
    with pytest.raises(ConfigError, match="plan="):
        recover(
            teacher,
            res.model,
            res.batches,
            steps=2,
            gradual_start_sparsity=0.1,
            gradual_end_step=1,
            progress=False,
        )


@pytest.mark.slow  # one-shot + recovery + full export (still run by .ci/run)
def test_recover_cli_writes_a_validated_export(tmp_path):
    import json

    from ffsplit_export.cli import main
    from ffsplit_export.runtime import _plugin

    try:
        _plugin.plugin_path()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"ffsplit ORT library not built: {e}")
    out = tmp_path / "rec"
    assert main(["recover", "tiny-llama", str(out), "--steps", "3", "--num-samples", "8", "--quiet"]) == 0
    from ffsplit_export.config import CompressionConfig
    from ffsplit_export.manifest import Manifest

    manifest = Manifest.read(out)  # the same reader as for export
    assert manifest == json.loads((out / "ffsplit.json").read_text())
    assert manifest.compression_config == CompressionConfig(num_samples=8)  # the CLI options given
    assert manifest["recover"] and (out / "model.onnx").exists()
    worst = max(max(r["outputs"].values()) for r in manifest["validation"].values())
    assert worst < 1e-3  # measured 2.4e-7
