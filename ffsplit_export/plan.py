"""Heavy-set selection: a fixed fraction per layer, or a byte budget allocated across layers."""

from __future__ import annotations

import numpy as np
import torch

from .adapters import FFNSpec
from .calibrate import FFNStats
from .errors import BudgetError, ConfigError
from .formats import HeavyFormat, get_format
from .formats.pruning import check_fraction
from .split import SplitConfig, get_module, linear_weight, lowrank_rank, make_light

SELECTIONS = ("score", "act_norm", "random")


def _ranking(st: FFNStats, selection: str, rng: np.random.Generator) -> np.ndarray:
    if selection == "score":
        return np.argsort(-st.score.numpy(), kind="stable")
    if selection == "act_norm":
        return np.argsort(-st.act_norm.numpy(), kind="stable")
    if selection == "random":
        return rng.permutation(st.act_sq.numel())
    raise ConfigError(f"heavy selection {selection!r} is unknown; use one of {SELECTIONS}")


def plan_fraction(
    stats: dict[str, FFNStats], fraction: float, selection: str = "score", seed: int = 0
) -> dict[str, np.ndarray]:
    """The top ``fraction`` of neurons of every FFN (by score; or by activation norm, or random)."""
    fraction = check_fraction(fraction, "--heavy-fraction")
    rng = np.random.default_rng(seed)
    plan = {}
    for name, st in stats.items():
        n = st.act_sq.numel()
        k = int(round(fraction * n))
        plan[name] = np.sort(_ranking(st, selection, rng)[:k])
    return plan


# ------------------------------------------------------------------------------ bytes


def heavy_bytes_per_weight(fmt: HeavyFormat) -> float:
    """Bytes per weight of the heavy format (the registry's size model)."""
    return get_format(HeavyFormat.parse(fmt, "--heavy-format")).bytes_per_weight()


def light_bytes_per_weight(cfg: SplitConfig) -> float:
    """Packed bytes per weight of the light format (scales and row pointers ignored)."""
    return get_format(cfg.light_format).bytes_per_weight(cfg)


def light_row_overhead(cfg: SplitConfig) -> float:
    """Packed bytes per light row that do not scale with K (row pointers, scales)."""
    return get_format(cfg.light_format).row_overhead(cfg)


def plan_budget(
    model,
    specs: list[FFNSpec],
    stats: dict[str, FFNStats],
    config: SplitConfig,
    budget: float,
) -> dict[str, np.ndarray]:
    """Allocate heavy neurons across layers to minimise FFN output error under a byte budget.

    ``budget`` is the target FFN weight bytes as a fraction of dense fp32. Every neuron
    starts light; moving neuron j of a layer to the heavy set removes its estimated
    calibration output error ``score_j^2 * e_j`` (``e_j`` = relative squared error of its
    weights under the light format) and costs ``(bytes_heavy - bytes_light) * weights_j``.
    Neurons are promoted greedily by error removed per byte until the budget is spent, so
    layers with strong heavy hitters receive more of it.
    """
    budget = check_fraction(budget, "--size-budget")
    hb, lb = heavy_bytes_per_weight(config.heavy_format), light_bytes_per_weight(config)
    ro = light_row_overhead(config)
    hro = get_format(config.heavy_format).row_overhead(config)
    dense_total = light_total = 0.0
    cands = []  # (gain per byte, cost, layer name, neuron)
    for spec in specs:
        st = stats[spec.name]
        w_down, _ = linear_weight(get_module(model, spec.down))
        d_model, f = w_down.shape
        weights_per_neuron = d_model * len(spec.projections)
        rows_per_neuron = len(spec.projections) - 1  # a light neuron is one row of up (and gate)
        light_neuron = lb * weights_per_neuron + ro * rows_per_neuron
        heavy_neuron = hb * weights_per_neuron + hro * rows_per_neuron
        dense_total += 4.0 * weights_per_neuron * f
        light_total += light_neuron * f + ro * d_model  # the light down projection has d_model rows
        err = _light_relative_error(model, spec, st, config)
        gain = (st.score.double() ** 2 * err).numpy()
        cost = heavy_neuron - light_neuron
        for j in range(f):
            cands.append((gain[j] / cost if cost > 0 else np.inf, cost, spec.name, j))
    target = budget * dense_total
    if light_total > target + 1e-9:
        raise BudgetError(
            f"--size-budget={budget} cannot be met: with every neuron light the FFNs take "
            f"{light_total / dense_total:.3f} of dense bytes; raise the budget to at least that, "
            "or use a smaller light format / higher --light-sparsity"
        )
    cands.sort(key=lambda c: -c[0])
    spent = light_total
    chosen: dict[str, list[int]] = {s.name: [] for s in specs}
    for _, cost, name, j in cands:
        if spent + cost > target:
            continue
        spent += cost
        chosen[name].append(j)
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in chosen.items()}


@torch.no_grad()
def _light_relative_error(model, spec: FFNSpec, st: FFNStats, cfg: SplitConfig) -> torch.Tensor:
    """Per neuron: relative squared error of its up/gate rows and down column under the light format."""
    light_cfg = SplitConfig(
        light_format=cfg.light_format,
        light_sparsity=cfg.light_sparsity,
        prune_method="wanda" if str(cfg.prune_method) == "sparsegpt" else cfg.prune_method,
        heavy_format=cfg.heavy_format,
        group_size=cfg.group_size,
    )
    num = None
    den = None
    for path in spec.projections:
        w, _ = linear_weight(get_module(model, path))
        is_down = path == spec.down
        x_norm = st.act_norm if is_down else st.x_norm
        approx = make_light(w, None, light_cfg, x_norm=x_norm).dense_weight()
        diff = (w - approx) ** 2
        e = diff.sum(0) if is_down else diff.sum(1)
        n = (w**2).sum(0) if is_down else (w**2).sum(1)
        num = e if num is None else num + e
        den = n if den is None else den + n
    return (num / den.clamp_min(1e-30)).double()


def plan_summary(plan: dict[str, np.ndarray], stats: dict[str, FFNStats]) -> dict[str, dict]:
    return {
        name: {"n_heavy": int(idx.size), "n_neurons": int(stats[name].act_sq.numel())}
        for name, idx in plan.items()
    }


__all__ = ["SELECTIONS", "lowrank_rank", "plan_budget", "plan_fraction", "plan_summary"]
