"""The measured planner (``--planner measured``): candidates measured exactly as the split compresses
them, a byte budget that holds on the split model, and a summed FFN output error no higher than a
fixed heavy fraction of the same (or larger) size, measured on the same calibration inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ffsplit_export.adapters import find_ffns
from ffsplit_export.errors import BudgetError, ConfigError
from ffsplit_export.pipeline import compress
from ffsplit_export.plan import (
    Candidate,
    LayerMeasure,
    allocate,
    default_candidates,
    ffn_forward,
    ffn_inputs,
    measure_layer,
    measured_error,
    plan_fraction,
    plan_measured,
    planner_formats,
)
from ffsplit_export.split import SplitConfig, split_ffn_

FIXED = SplitConfig(light_format="sparse-int8", light_sparsity=0.5)  # the CLI default light part
CANDS = [
    Candidate(h, f, sp)
    for h in (0.0, 0.1, 0.25)
    for f, sps in (("sparse-int8", (0.5, 0.75)), ("sparse-int4", (0.5, 0.75)), ("int4", (0.5,)))
    for sp in sps
]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-t5-gated"])
def test_ffn_forward_matches_the_model(name, tiny_calibrated):
    """The planner's FFN function is the model's FFN (gated and ungated, T5's own activation)."""
    model, _, _, batches, _ = tiny_calibrated(name)
    specs = find_ffns(model)
    xs = ffn_inputs(model, specs, batches, max_tokens=64)
    for spec in specs:
        x = xs[spec.name]
        assert x.shape[0] == 64 or x.shape[0] > 0
        up = torch.nn.functional.linear
        from ffsplit_export.split import get_module, linear_weight

        w_up, b_up = linear_weight(get_module(model, spec.up))
        w_dn, b_dn = linear_weight(get_module(model, spec.down))
        from transformers.activations import ACT2FN

        act = ACT2FN[spec.activation]
        if spec.gate is not None:
            w_g, b_g = linear_weight(get_module(model, spec.gate))
            h = act(up(x, w_g, b_g)) * up(x, w_up, b_up)
        else:
            h = act(up(x, w_up, b_up))
        want = up(h, w_dn, b_dn)
        torch.testing.assert_close(ffn_forward(model, spec, x), want, rtol=1e-5, atol=1e-5)


def test_measure_layer_is_the_split(tiny_calibrated):
    """A candidate's measured error and bytes are those of the FFN split with that candidate."""
    model, _, _, batches, stats = tiny_calibrated("tiny-llama")
    specs = find_ffns(model)
    spec = specs[0]
    xs = ffn_inputs(model, specs, batches, max_tokens=128)
    c = Candidate(0.1, "sparse-int4", 0.6)
    lm = measure_layer(model, spec, stats[spec.name], xs[spec.name], FIXED, [c])
    split = copy.deepcopy(model)
    report = split_ffn_(split, plan_fraction(stats, 0.1), c.config(FIXED), stats, specs, progress=False)
    assert lm.bytes[0] == report.ffns[0].bytes and lm.dense_bytes == report.ffns[0].dense_bytes
    err = measured_error(split, specs[:1], xs, model)[0]
    assert lm.errors[0] == pytest.approx(err, rel=1e-6)
    assert 0.0 < err < 1.0


def test_allocate_is_optimal_on_a_small_case():
    """Against brute force over every assignment (3 layers x 4 candidates)."""
    import itertools

    rng = np.random.default_rng(0)
    cands = [Candidate(h, "sparse-int8", 0.5) for h in (0.0, 0.1, 0.2, 0.3)]
    layers = []
    for i in range(3):
        b = np.sort(rng.integers(100, 1000, 4))
        e = np.sort(rng.random(4))[::-1]
        layers.append(LayerMeasure(f"l{i}", 4000, cands, b.tolist(), e.tolist()))
    floor = sum(min(lm.bytes) for lm in layers)
    for budget in (floor, floor + 300, floor + 800, floor + 2000):
        picks = allocate(layers, budget)
        got = sum(lm.errors[i] for lm, i in zip(layers, picks))
        assert sum(lm.bytes[i] for lm, i in zip(layers, picks)) <= budget
        best = min(
            sum(lm.errors[i] for lm, i in zip(layers, ch))
            for ch in itertools.product(range(4), repeat=3)
            if sum(lm.bytes[i] for lm, i in zip(layers, ch)) <= budget
        )
        assert got == pytest.approx(best, rel=1e-3)  # the byte grid costs at most a hair
    with pytest.raises(BudgetError, match="below the smallest"):
        allocate(layers, 100)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_plan_meets_budget_and_beats_fixed_fraction(name, tiny_calibrated):
    model, _, _, batches, stats = tiny_calibrated(name)
    specs = find_ffns(model)
    # the fixed fraction: heavy 0.1 fp32 + sparse-int8 @ 0.5 in every FFN, split for real
    fixed = copy.deepcopy(model)
    rep_fixed = split_ffn_(fixed, plan_fraction(stats, 0.1), FIXED, stats, specs, progress=False)
    budget = rep_fixed.bytes / rep_fixed.dense_bytes
    mp = plan_measured(
        model, specs, stats, batches, FIXED, budget, candidates=CANDS, max_tokens=256, objective="relative"
    )
    planned = copy.deepcopy(model)
    rep = split_ffn_(planned, mp.heavy, FIXED, stats, specs, progress=False, layer_configs=mp.configs)
    # the budget holds on the split model, and the plan's bytes are the split's bytes
    assert rep.bytes <= rep_fixed.bytes and rep.bytes == mp.bytes
    assert [f.light_format for f in rep.ffns] == [r["light_format"] for r in mp.layers]
    # measured on the same sampled calibration inputs, through the split modules
    xs = ffn_inputs(model, specs, batches, max_tokens=256)
    err_plan = sum(measured_error(planned, specs, xs, model))
    err_fixed = sum(measured_error(fixed, specs, xs, model))
    assert err_plan == pytest.approx(mp.error, rel=1e-6)
    assert err_plan <= err_fixed * (1 + 1e-9), (err_plan, err_fixed)
    # the absolute objective (errors weighted by each FFN's output energy), from the same measurements
    ma = plan_measured(
        model, specs, stats, batches, FIXED, budget, measures=mp.measures, objective="absolute"
    )
    planned_a = copy.deepcopy(model)
    rep_a = split_ffn_(planned_a, ma.heavy, FIXED, stats, specs, progress=False, layer_configs=ma.configs)
    assert rep_a.bytes <= rep_fixed.bytes and ma.objective == "absolute"
    ref = np.array([lm.ref_sq for lm in mp.measures])
    w = ref / ref.mean()
    abs_plan = float(np.dot(w, measured_error(planned_a, specs, xs, model)))
    abs_fixed = float(np.dot(w, measured_error(fixed, specs, xs, model)))
    assert abs_plan == pytest.approx(ma.to_dict()["objective_value"], rel=1e-6)
    assert abs_plan <= abs_fixed * (1 + 1e-9), (abs_plan, abs_fixed)
    with pytest.raises(ConfigError, match="objective"):
        plan_measured(model, specs, stats, batches, FIXED, budget, measures=mp.measures, objective="l1")


def test_compress_budget_mode_uses_the_measured_planner(tiny_calibrated):
    model, pre, _, batches, stats = tiny_calibrated("tiny-llama")
    res = compress(model, pre, config=FIXED, size_budget=0.35, stats=stats, batches=batches, progress=False)
    assert res.planner is not None and res.planner["planner"] == "measured"
    assert res.report.bytes <= 0.35 * res.report.dense_bytes
    assert {f.light_format for f in res.report.ffns} <= set(planner_formats(FIXED))
    proxy = compress(
        model,
        pre,
        config=FIXED,
        size_budget=0.35,
        stats=stats,
        batches=batches,
        progress=False,
        planner="proxy",
    )
    assert proxy.planner is None and {f.light_format for f in proxy.report.ffns} == {"sparse-int8"}
    with pytest.raises(ConfigError, match="--planner"):
        compress(model, pre, config=FIXED, size_budget=0.35, stats=stats, batches=batches, planner="best")


def test_candidate_grid_and_formats():
    cands = default_candidates(FIXED)
    # sparse-int8 runs on every target, so only formats that do too are offered by default
    assert {c.light_format for c in cands} == {"sparse-int8", "sparse-int4"}
    assert Candidate(0.1, "sparse-int8", 0.5) in cands
    assert {c.light_format for c in default_candidates(FIXED, ["int4", "sparse-int8"])} == {
        "int4",
        "sparse-int8",
    }
    assert len({c for c in default_candidates(FIXED, ["int4"])}) == 6  # int4 does not prune: heavy only
    with pytest.raises(ConfigError, match="--planner-formats"):
        planner_formats(FIXED, ["int3"])


def test_config_and_target_checks(tmp_path):
    from ffsplit_export.config import CompressionConfig
    from ffsplit_export.export.api import export

    cc = CompressionConfig(size_budget=0.3, planner_formats="int4, sparse-int8")
    assert cc.planner == "measured" and cc.compress_kwargs()["planner_formats"] == ["int4", "sparse-int8"]
    assert CompressionConfig.from_dict(cc.to_dict()) == cc
    with pytest.raises(ConfigError, match="--planner"):
        CompressionConfig(planner="best")
    with pytest.raises(ConfigError, match="--planner-formats"):
        CompressionConfig(planner_formats="int3")
    # int4 (MatMulNBits) does not run on TensorRT: refused before any work is done
    with pytest.raises(ConfigError, match="int4.*--target tensorrt"):
        export("tiny-llama", tmp_path / "out", config=cc, options=_trt_options())


def _trt_options():
    from ffsplit_export.export.core import ExportOptions

    return ExportOptions(target="tensorrt")


@pytest.mark.slow
def test_cli_export_with_measured_planner(tmp_path):
    import json

    from ffsplit_export.cli import main

    out = tmp_path / "out"
    rc = main(["export", "tiny-llama", str(out), "--size-budget", "0.35", "--num-samples", "8", "--quiet"])
    assert rc == 0
    man = json.loads((out / "ffsplit.json").read_text())
    assert man["planner"]["planner"] == "measured"
    assert man["ffn"]["ffn_bytes"] <= 0.35 * man["ffn"]["ffn_dense_bytes"]
    assert [f["light_format"] for f in man["ffn"]["ffns"]] == [
        r["light_format"] for r in man["planner"]["layers"]
    ]


def test_hessian_saliency_selection(tiny_calibrated):
    """The OBS saliency of a neuron is the sum over its weights of w^2 / [H^-1]_kk (checked against
    a float64 inverse), and 'hessian' selection takes the top neurons by it."""
    from ffsplit_export.plan import hessian_saliency
    from ffsplit_export.split import get_module, linear_weight

    model, pre, _, batches, stats = tiny_calibrated("tiny-llama", hessians=True)
    spec = find_ffns(model)[0]
    st = stats[spec.name]
    sal = hessian_saliency(model, spec, st, damp=0.01)

    def inv_diag(h):
        h = h.double() + torch.eye(h.shape[0], dtype=torch.float64) * 0.01 * torch.mean(
            torch.diag(h.double())
        )
        return torch.diag(torch.linalg.inv(h))

    dx, da = inv_diag(st.hessian_x), inv_diag(st.hessian_act)
    j = 3
    want = sum(
        float((linear_weight(get_module(model, p))[0][j].double() ** 2 / dx).sum())
        for p in (spec.gate, spec.up)
    ) + float((linear_weight(get_module(model, spec.down))[0][:, j].double() ** 2 / da[j]).sum())
    assert float(sal[j]) == pytest.approx(want, rel=1e-6)
    res = compress(
        model, pre, config=FIXED, heavy_fraction=0.1, selection="hessian", stats=stats, batches=batches,
        progress=False,
    )  # fmt: skip
    top = np.sort(np.argsort(-sal.numpy(), kind="stable")[: round(0.1 * sal.numel())])
    assert np.array_equal(res.plan[spec.name], top)
    with pytest.raises(ConfigError, match="hessian"):
        plan_fraction(stats, 0.1, "hessian")


def test_export_default_planner_formats_follow_the_target(tmp_path, monkeypatch):
    """Without --planner-formats, export offers the planner the formats that run on --target."""
    import ffsplit_export.export.api as api
    from ffsplit_export.config import CompressionConfig
    from ffsplit_export.export.core import ExportOptions

    seen = {}

    def stop(*_a, **kw):
        seen.update(kw)
        raise RuntimeError("stop after compress arguments")

    monkeypatch.setattr(api, "load_model", lambda *a, **k: (None, None, "text-generation"))
    monkeypatch.setattr(api, "compress", stop)
    cc = CompressionConfig(size_budget=0.3)
    for target, want in (("ort-cpu", ["sparse-int8", "sparse-int4", "int8", "int4"]),
                         ("tensorrt", ["sparse-int8", "sparse-int4"])):  # fmt: skip
        with pytest.raises(RuntimeError, match="stop"):
            api.export("tiny-llama", tmp_path / target, config=cc, options=ExportOptions(target=target))
        assert seen["planner_formats"] == want
