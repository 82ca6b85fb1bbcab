"""Adapters, calibration, planning and the split itself (PyTorch only)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from ffsplit_export import SplitConfig, get_adapter, split_ffn_, supported_model_types
from ffsplit_export.adapters import find_ffns
from ffsplit_export.errors import BudgetError, CalibrationError, ConfigError, UnsupportedModelError
from ffsplit_export.models.tiny import TINY, build_tiny
from ffsplit_export.pipeline import compress, model_output
from ffsplit_export.plan import plan_budget, plan_fraction
from ffsplit_export.split import SplitLinear, get_module

TINY_BY_TYPE = {
    "t5": ["tiny-t5", "tiny-t5-gated"],
    "whisper": ["tiny-whisper"],
    "mpt": ["tiny-mpt"],
    "llama": ["tiny-llama"],
    "bert": ["tiny-bert"],
    "gpt2": ["tiny-gpt2"],
    "opt": ["tiny-opt"],
}


def test_every_adapter_has_a_tiny_model():
    covered = {build_tiny(n)[0].config.model_type for n in TINY}
    missing = set(supported_model_types()) - covered
    assert not missing, f"registered adapters without a tiny test model: {missing}"
    assert set(TINY_BY_TYPE) == set(supported_model_types())


def test_unknown_model_type_lists_supported():
    with pytest.raises(UnsupportedModelError, match="supported model types: bert, gpt2"):
        get_adapter("mamba")


def test_t5_both_ffn_kinds():
    plain = find_ffns(build_tiny("tiny-t5")[0])
    gated = find_ffns(build_tiny("tiny-t5-gated")[0])
    assert all(s.gate is None and s.activation == "relu" for s in plain)
    assert all(s.gate.endswith("wi_0") and s.up.endswith("wi_1") for s in gated)
    assert len(plain) == len(gated) == 4  # 2 encoder + 2 decoder blocks


@pytest.mark.parametrize("name", list(TINY))
def test_dense_split_reproduces_original(name, tiny_calibrated):
    model, _, _, batches, stats = tiny_calibrated(name)
    split = copy.deepcopy(model)
    report = split_ffn_(
        split, plan_fraction(stats, 0.1), SplitConfig(light_format="dense"), stats, progress=False
    )
    assert all(isinstance(get_module(split, s.down), SplitLinear) for s in find_ffns(model))
    assert all(f.n_heavy == round(0.1 * f.n_neurons) for f in report.ffns)
    for b in batches:
        ref, got = model_output(model, b), model_output(split, b)
        diff = float((ref - got).abs().max())
        # float32 summation order only; measured <= 2.1e-5 on logits of magnitude ~31 (tiny-t5-gated), else <= 3e-6
        assert diff <= 1e-5 * max(1.0, float(ref.abs().max())), diff


@pytest.mark.parametrize("fmt", ["sparse-int8", "sparse-fp32", "2:4-int8", "int8", "int4", "lowrank"])
def test_light_formats_compress_and_stay_close(fmt, tiny_calibrated):
    model, _, _, batches, stats = tiny_calibrated("tiny-llama")
    split = copy.deepcopy(model)
    cfg = SplitConfig(light_format=fmt, light_sparsity=0.5, group_size=32)
    report = split_ffn_(split, plan_fraction(stats, 0.1), cfg, stats, progress=False)
    assert report.bytes < 0.65 * report.dense_bytes
    ref, got = model_output(model, batches[0]), model_output(split, batches[0])
    rel = float((ref - got).norm() / ref.norm())
    assert 0 < rel < 0.5, rel  # compressed, but not broken


def test_heavy_hitters_carry_more_than_their_share(tiny_calibrated):
    """Planted heavy hitters: the score finds them and their share beats the unplanted control.

    A random tiny model has no heavy hitters (its top-10 % share is about that of i.i.d. scores,
    0.17-0.18 measured), so the control is the same model before planting.
    """
    import copy

    from ffsplit_export.calibrate import calibrate

    model, _, _, batches, control = tiny_calibrated("tiny-llama")
    planted = copy.deepcopy(model)
    spec = next(iter(control))
    down = planted.get_submodule(spec).down_proj
    n = down.weight.shape[1]
    heavy = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 10]
    with torch.no_grad():
        down.weight[:, heavy] *= 8.0
    stats = calibrate(planted, batches, progress=False)
    st = stats[spec]
    assert st.n_tokens > 0 and torch.all(st.score >= 0)
    assert st.top_share(0.1) > control[spec].top_share(0.1) + 0.2  # measured 0.439 vs 0.171
    found = set(torch.topk(st.score, len(heavy)).indices.tolist())
    assert found == set(heavy.tolist())


def test_padding_is_masked(tiny_calibrated):
    model, pre, _, batches, stats = tiny_calibrated("tiny-mpt")
    n_real = sum(int(b.masks["default"].sum()) for b in batches)
    assert all(st.n_tokens == n_real for st in stats.values())


def test_plan_fraction_and_selection(tiny_calibrated):
    _, _, _, _, stats = tiny_calibrated("tiny-opt")
    top = plan_fraction(stats, 0.25)
    rnd = plan_fraction(stats, 0.25, selection="random", seed=1)
    for name, st in stats.items():
        assert len(top[name]) == len(rnd[name]) == round(0.25 * st.act_sq.numel())
        assert st.score[top[name]].sum() >= st.score[rnd[name]].sum()
    with pytest.raises(ConfigError, match="--heavy-fraction"):
        plan_fraction(stats, 1.2)


def test_plan_budget_meets_budget_and_prefers_heavy_layers(tiny_calibrated):
    model, _, _, _, stats = tiny_calibrated("tiny-llama")
    cfg = SplitConfig(light_format="sparse-int8", light_sparsity=0.5)
    specs = find_ffns(model)
    plan = plan_budget(model, specs, stats, cfg, 0.3)
    split = copy.deepcopy(model)
    report = split_ffn_(split, plan, cfg, stats, specs, progress=False)
    assert report.bytes <= 0.3 * report.dense_bytes * 1.02  # scales / row pointers are not in the estimate
    assert sum(len(v) for v in plan.values()) > 0
    with pytest.raises(BudgetError, match="cannot be met"):
        plan_budget(model, specs, stats, cfg, 0.05)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="--light-sparsity"):
        SplitConfig(light_sparsity=1.5)
    with pytest.raises(ConfigError, match="--group-size"):
        SplitConfig(group_size=48)
    with pytest.raises(ConfigError, match="--light-format"):
        SplitConfig(light_format="sparse-int3")
    model, pre, _ = build_tiny("tiny-llama")
    with pytest.raises(CalibrationError, match="--num-samples"):
        compress(model, pre, num_samples=0, progress=False)


def test_calibration_file_errors(tmp_path):
    model, pre, _ = build_tiny("tiny-llama")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(CalibrationError, match="no non-empty line"):
        compress(model, pre, calibration=str(empty), progress=False)
    with pytest.raises(CalibrationError, match="cannot read"):
        compress(model, pre, calibration=str(tmp_path / "missing.txt"), progress=False)


def test_model_without_ffn():
    model, _, _ = build_tiny("tiny-llama")
    model.model.layers = torch.nn.ModuleList()
    with pytest.raises(UnsupportedModelError, match="no FFN found"):
        find_ffns(model)


def test_analyze_cli(tmp_path, capsys):
    from ffsplit_export.cli import main

    rc = main(["analyze", "tiny-t5-gated", "--output", str(tmp_path), "--num-samples", "8", "--quiet"])
    assert rc == 0
    data = json.loads((tmp_path / "heavy_hitters.json").read_text())
    assert len(data["ffns"]) == 4
    f = data["ffns"][0]
    assert f["n_neurons"] == len(f["score"]) == len(f["act_norm"]) == 160
    assert np.isclose(
        f["top_share"]["10%"],
        sorted(f["score"])[-16:] and sum(sorted(f["score"])[-16:]) / sum(f["score"]),
        atol=1e-3,
    )
    assert (tmp_path / "score_curves.png").stat().st_size > 1000 and (
        tmp_path / "top_share.png"
    ).stat().st_size > 1000
    assert "% smaller" in capsys.readouterr().out
    assert main(["analyze", "tiny-nothing", "--output", str(tmp_path)]) == 2


def test_sequential_prunes_from_the_compressed_model(tiny_calibrated):
    model, pre, _, batches, stats = tiny_calibrated("tiny-llama", hessians=True)
    cfg = SplitConfig(light_format="sparse-fp32", prune_method="sparsegpt", light_sparsity=0.5)
    one = compress(model, pre, config=cfg, stats=stats, batches=batches, progress=False)
    seq = compress(model, pre, config=cfg, stats=stats, batches=batches, sequential=True, progress=False)
    assert {k: v.tolist() for k, v in one.plan.items()} == {k: v.tolist() for k, v in seq.plan.items()}
    specs = find_ffns(model)
    w = lambda r, s: get_module(r.model, s.down).light.dense_weight()  # noqa: E731
    # the first FFN sees the same inputs either way; the second sees the compressed first one
    assert torch.allclose(w(one, specs[0]), w(seq, specs[0]), atol=1e-6)
    assert not torch.allclose(w(one, specs[1]), w(seq, specs[1]), atol=1e-6)
    assert [f.light_sparsity for f in seq.report.ffns] == [f.light_sparsity for f in one.report.ffns]


def test_compensate_heavy_is_the_least_squares_update():
    """compensate_heavy: the heavy columns' update D = E H_LH H_HH^-1 is the least-squares fit of the
    light error on the heavy activations, so the output error on those activations can only fall."""
    from ffsplit_export.split import compensate_heavy

    g = torch.Generator().manual_seed(0)
    n, f, d = 400, 24, 10
    mix = torch.randn(f, f, generator=g, dtype=torch.float64)
    a = torch.randn(n, f, generator=g, dtype=torch.float64) @ mix  # correlated activations
    w = torch.randn(d, f, generator=g, dtype=torch.float64)
    hidx, lidx = torch.arange(0, 6), torch.arange(6, f)
    light = w[:, lidx] * (torch.rand(d, f - 6, generator=g) > 0.5)  # pruned light columns
    w_h = compensate_heavy(w, light, hidx, lidx, a.T @ a, damp=0.0)
    err = lambda wh: torch.linalg.norm(a[:, hidx] @ wh.T + a[:, lidx] @ light.T - a @ w.T)  # noqa: E731
    assert err(w_h) < 0.9 * err(w[:, hidx]), (err(w_h), err(w[:, hidx]))
    # the same as solving the least-squares problem directly
    e = a[:, lidx] @ (w[:, lidx] - light).T
    delta = torch.linalg.lstsq(a[:, hidx], e).solution.T
    torch.testing.assert_close(w_h, w[:, hidx] + delta, rtol=1e-8, atol=1e-8)


def test_pruned_light_down_compensated_by_the_heavy_columns(tiny_calibrated):
    """heavy_compensation (default on, pruned light formats with Hessians): the split down's output
    error on the calibration activations is below that of the same split without it; the light
    part is unchanged."""
    from ffsplit_export.split import split_modules

    model, _, _, _, stats = tiny_calibrated("tiny-llama", hessians=True)
    spec = find_ffns(model)[0]
    st = stats[spec.name]
    f = get_module(model, spec.down).weight.shape[1]
    heavy = np.arange(0, f, 4)
    errs = {}
    for on in (True, False):
        cfg = SplitConfig(light_format="sparse-fp32", prune_method="sparsegpt", light_sparsity=0.75,
                          heavy_compensation=on)
        parts, _ = split_modules(model, spec, heavy, cfg, st)
        down = parts[spec.down]
        w = get_module(model, spec.down).weight.detach().double()
        wh = down.heavy.dense_weight().double() if hasattr(down.heavy, "dense_weight") else down.heavy.weight.double()
        wl = down.light.dense_weight().double()
        hidx = torch.from_numpy(np.sort(heavy))
        lidx = torch.from_numpy(np.setdiff1d(np.arange(f), heavy))
        e = torch.cat([wh, wl], 1) - torch.cat([w[:, hidx], w[:, lidx]], 1)  # error per reordered column
        order = torch.cat([hidx, lidx])
        h = st.hessian_act.double()[order][:, order]
        errs[on] = float(torch.trace(e @ h @ e.T))
        errs[f"light{on}"] = wl
    assert errs[True] < errs[False], errs
    torch.testing.assert_close(errs["lightTrue"], errs["lightFalse"])
    with pytest.raises(ConfigError, match="heavy_compensation"):
        SplitConfig(heavy_compensation="yes")
