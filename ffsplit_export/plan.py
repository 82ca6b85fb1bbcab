"""Heavy-set selection: a fixed fraction per layer, or a byte budget allocated across layers.

Two budget planners: :func:`plan_budget` (``--planner proxy``) moves single neurons to the
heavy set by a score^2 x weight-error proxy; :func:`plan_measured` (``--planner measured``)
compresses every candidate (heavy fraction, light format, light sparsity) of every FFN, runs
the FFN on a sample of calibration inputs, and allocates the byte budget across layers by an
exact multiple-choice knapsack over the measured (bytes, error) pairs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .adapters import FFNSpec
from .calibrate import FFNStats
from .errors import BudgetError, ConfigError
from .formats import HeavyFormat, get_format
from .formats.pruning import check_fraction
from .split import SplitConfig, get_module, linear_weight, lowrank_rank, make_light, split_modules

SELECTIONS = ("score", "act_norm", "hessian", "random")


def _ranking(st: FFNStats, selection: str, rng: np.random.Generator, scores=None) -> np.ndarray:
    if selection == "hessian":
        if scores is None or st.name not in scores:
            raise ConfigError(
                "heavy selection 'hessian' needs the saliencies of hessian_saliency() (calibration Hessians)"
            )
        return np.argsort(-scores[st.name].numpy(), kind="stable")
    if selection == "score":
        return np.argsort(-st.score.numpy(), kind="stable")
    if selection == "act_norm":
        return np.argsort(-st.act_norm.numpy(), kind="stable")
    if selection == "random":
        return rng.permutation(st.act_sq.numel())
    raise ConfigError(f"heavy selection {selection!r} is unknown; use one of {SELECTIONS}")


def plan_fraction(
    stats: dict[str, FFNStats], fraction: float, selection: str = "score", seed: int = 0, scores=None
) -> dict[str, np.ndarray]:
    """The top ``fraction`` of neurons of every FFN (by score; or by activation norm, by the
    Hessian saliencies ``scores`` of :func:`hessian_saliency`, or random)."""
    fraction = check_fraction(fraction, "--heavy-fraction")
    rng = np.random.default_rng(seed)
    plan = {}
    for name, st in stats.items():
        n = st.act_sq.numel()
        k = int(round(fraction * n))
        plan[name] = np.sort(_ranking(st, selection, rng, scores)[:k])
    return plan


@torch.no_grad()
def hessian_saliency(model, spec: FFNSpec, st: FFNStats, damp: float = 0.01) -> torch.Tensor:
    """Per neuron: the OBS saliency ``w^2 / [H^-1]_kk`` summed over the neuron's weights (its rows
    of up / gate with the FFN-input Hessian, its column of down with the activation Hessian), the
    error a neuron's weights cause when removed, to first order; float64 [F]."""
    if st.hessian_x is None or st.hessian_act is None:
        raise ConfigError(
            "heavy selection 'hessian' needs calibration Hessians (calibrate(..., hessians=True))"
        )

    def inv_diag(h: torch.Tensor) -> torch.Tensor:
        h = h.double().clone()
        dead = torch.diag(h) == 0
        h[dead, dead] = 1.0
        h += torch.eye(h.shape[0], dtype=h.dtype) * damp * torch.mean(torch.diag(h))
        return torch.diag(torch.cholesky_inverse(torch.linalg.cholesky(h)))

    dx, da = inv_diag(st.hessian_x), inv_diag(st.hessian_act)
    w_down, _ = linear_weight(get_module(model, spec.down))
    sal = (w_down.double() ** 2 / da[None, :]).sum(0)
    for path in (spec.gate, spec.up):
        if path is not None:
            w, _ = linear_weight(get_module(model, path))
            sal += (w.double() ** 2 / dx[None, :]).sum(1)
    return sal


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


# ------------------------------------------------------------------------------ measured planner

PLANNERS = ("measured", "proxy")
#: what the measured planner minimises (see :func:`plan_measured`)
OBJECTIVES = ("relative", "absolute")
#: heavy fractions and light sparsities the measured planner tries by default
PLANNER_HEAVY_FRACTIONS = (0.0, 0.01, 0.03, 0.1, 0.2, 0.3)
PLANNER_SPARSITIES = (0.5, 0.7, 0.85)
#: light formats it tries by default (those that run on every target the configured format runs on)
PLANNER_FORMATS = ("sparse-int8", "sparse-int4", "int8", "int4")


@dataclass(frozen=True)
class Candidate:
    """One way to compress an FFN: the top ``heavy_fraction`` neurons heavy, the rest in
    ``light_format`` at ``light_sparsity`` (ignored by formats that do not prune)."""

    heavy_fraction: float
    light_format: str
    light_sparsity: float

    def config(self, base: SplitConfig) -> SplitConfig:
        return dataclasses.replace(base, light_format=self.light_format, light_sparsity=self.light_sparsity)

    @property
    def label(self) -> str:
        fmt = get_format(self.light_format)
        sp = f"@{self.light_sparsity:g}" if fmt.pruned and not fmt.structured else ""
        return f"heavy {self.heavy_fraction:g} + {self.light_format}{sp}"


def planner_formats(config: SplitConfig, formats=None) -> list[str]:
    """Light formats the measured planner may pick: ``formats`` (checked) or, by default, those of
    :data:`PLANNER_FORMATS` that run on every target the configured light format runs on (so the
    export target check of ``--light-format`` covers the plan), plus the configured format."""
    from .formats import LightFormat

    own = str(config.light_format)
    if formats is not None:
        names = [str(LightFormat.parse(f, "--planner-formats")) for f in formats]
        if not names:
            raise ConfigError("--planner-formats is empty; name at least one light format (e.g. sparse-int8)")
        return list(dict.fromkeys(names))
    need = get_format(own).targets
    names = [own] + [f for f in PLANNER_FORMATS if need <= get_format(f).targets]
    return list(dict.fromkeys(names))


def default_candidates(
    config: SplitConfig, formats=None, heavy_fractions=None, sparsities=None
) -> list[Candidate]:
    """The candidate grid: heavy fractions x light formats x (for unstructured pruned formats)
    sparsities; the configured light sparsity is always among them."""
    hfs = sorted(
        {float(check_fraction(h, "heavy fraction")) for h in (heavy_fractions or PLANNER_HEAVY_FRACTIONS)}
    )
    sps = sorted({float(s) for s in (sparsities or PLANNER_SPARSITIES)} | {float(config.light_sparsity)})
    out = []
    for name in planner_formats(config, formats):
        fmt = get_format(name)
        if fmt.pruned and fmt.structured:
            sp_list = [0.5]
        elif fmt.pruned:
            sp_list = sps
        else:
            sp_list = [float(config.light_sparsity)]
        out += [Candidate(h, name, sp) for h in hfs for sp in sp_list]
    return out


@torch.no_grad()
def ffn_inputs(
    model, specs: list[FFNSpec], batches, max_tokens: int = 512, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A seeded sample of at most ``max_tokens`` non-padding FFN inputs (float32 [T, D]) per FFN."""
    from .calibrate import _stack

    if not batches:
        raise BudgetError("the measured planner needs calibration batches")
    per_batch = max(1, math.ceil(max_tokens / len(batches)))
    gen = torch.Generator().manual_seed(seed)
    got: dict[str, list[torch.Tensor]] = {s.name: [] for s in specs}
    current: dict = {}
    handles = []
    for spec in specs:

        def hook(_m, args, spec=spec):
            t = args[0].detach().float()
            mask = current.get(_stack(spec.name, current))
            rows = (
                t[mask]
                if mask is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(mask.shape)
                else t
            )
            rows = rows.reshape(-1, rows.shape[-1])
            pick = torch.randperm(rows.shape[0], generator=gen)[:per_batch]
            got[spec.name].append(rows[pick].clone())

        handles.append(get_module(model, spec.up).register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            current.clear()
            current.update(b.masks)
            model(**b.inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: torch.cat(v)[:max_tokens] for k, v in got.items()}


def _activation(name: str):
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ConfigError(
            f"activation {name!r} is unknown to transformers' ACT2FN; the measured planner needs it"
        )
    return ACT2FN[name]


@torch.no_grad()
def ffn_forward(model, spec: FFNSpec, x: torch.Tensor, parts: dict | None = None) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` (ungated: ``down(act(up(x)))``) with the model's projections,
    or the modules of ``parts`` (path -> module) in their place."""
    parts = parts or {}
    mod = lambda p: parts.get(p) or get_module(model, p)  # noqa: E731
    act = _activation(spec.activation)
    h = act(mod(spec.gate)(x)) * mod(spec.up)(x) if spec.gate is not None else act(mod(spec.up)(x))
    return mod(spec.down)(h)


@dataclass
class LayerMeasure:
    """The measured candidates of one FFN: parallel lists of candidates, bytes and relative errors."""

    name: str
    dense_bytes: int
    candidates: list[Candidate]
    bytes: list[int]
    errors: list[float]
    ref_sq: float = 1.0  # ||y_ref||^2 of the sampled inputs (the relative errors' denominator)

    def weighted(self, weight: float) -> LayerMeasure:
        return dataclasses.replace(self, errors=[e * weight for e in self.errors])


@torch.no_grad()
def measure_layer(
    model,
    spec: FFNSpec,
    st: FFNStats,
    x: torch.Tensor,
    config: SplitConfig,
    candidates: list[Candidate],
    selection: str = "score",
    seed: int = 0,
    scores=None,
) -> LayerMeasure:
    """Compress ``spec`` with every candidate (exactly as the split does) and measure the relative
    squared error ``||y - y_ref||^2 / ||y_ref||^2`` of the FFN output on the inputs ``x``; bytes
    are the packed modules' bytes (:meth:`SplitLinear.nbytes`, the format registry's)."""
    y_ref = ffn_forward(model, spec, x)
    ref = float((y_ref.double() ** 2).sum())
    order = _ranking(st, selection, np.random.default_rng(seed), scores)
    n = order.size
    nbytes, errs, dense = [], [], 0
    for c in candidates:
        heavy = np.sort(order[: int(round(c.heavy_fraction * n))])
        parts, dense = split_modules(model, spec, heavy, c.config(config), st)
        y = ffn_forward(model, spec, x, parts)
        nbytes.append(int(sum(m.nbytes() for m in parts.values())))
        errs.append(float(((y - y_ref).double() ** 2).sum()) / max(ref, 1e-30))
    return LayerMeasure(spec.name, dense, list(candidates), nbytes, errs, ref / max(1, x.shape[0]))


def allocate(layers: list[LayerMeasure], budget_bytes: float, grid: int = 20000) -> list[int]:
    """Per layer, the index of its candidate: minimum summed error with summed bytes <= budget.

    An exact multiple-choice knapsack over bytes rounded up to ``budget / grid`` (so the choice
    always fits), then compared with every uniform choice (the same candidate in every layer)
    that fits exactly, so a plan is never worse than a fixed setting of equal or smaller size.
    """
    if not layers:
        return []
    floor = sum(min(lm.bytes) for lm in layers)
    if floor > budget_bytes:
        raise BudgetError(
            f"the byte budget ({budget_bytes:.0f} B) is below the smallest candidate set ({floor} B); "
            "raise --size-budget or add smaller candidates (--planner-formats, higher sparsity)"
        )
    unit = budget_bytes / grid
    inf = np.inf
    dp = np.zeros(grid + 1)  # dp[b]: min error of the layers so far within b units
    choice = []
    for lm in layers:
        cost = np.ceil(np.asarray(lm.bytes, dtype=np.float64) / unit - 1e-9).astype(np.int64)
        new = np.full(grid + 1, inf)
        arg = np.full(grid + 1, -1, dtype=np.int64)
        for i, (c, e) in enumerate(zip(cost, lm.errors)):
            if c > grid:
                continue
            cand = np.full(grid + 1, inf)
            cand[c:] = dp[: grid + 1 - c] + e
            better = cand < new
            new[better] = cand[better]
            arg[better] = i
        choice.append(arg)
        dp = new
    picks: list[int] = []
    if np.isfinite(dp[grid]):
        b = grid
        for lm, arg in zip(reversed(layers), reversed(choice)):
            i = int(arg[b])
            picks.append(i)
            b -= int(np.ceil(lm.bytes[i] / unit - 1e-9))
        picks.reverse()
    best = sum(lm.errors[i] for lm, i in zip(layers, picks)) if picks else inf
    # the uniform choices (candidate lists are the same in every layer)
    for i in range(len(layers[0].candidates)):
        if all(lm.candidates[i] == layers[0].candidates[i] for lm in layers):
            if sum(lm.bytes[i] for lm in layers) <= budget_bytes:
                err = sum(lm.errors[i] for lm in layers)
                if err < best:
                    best, picks = err, [i] * len(layers)
    if not picks:  # the grid rounding left no room: the cheapest candidate of every layer fits
        picks = [int(np.argmin(lm.bytes)) for lm in layers]
    return picks


@dataclass
class MeasuredPlan:
    """What :func:`plan_measured` chose: heavy sets, per-FFN configs, and the measurements."""

    heavy: dict[str, np.ndarray]
    configs: dict[str, SplitConfig]
    budget_bytes: float
    dense_bytes: int
    layers: list[dict] = field(default_factory=list)
    objective: str = "relative"
    measures: list[LayerMeasure] = field(default_factory=list, repr=False)  # reuse: plan_measured(measures=)

    @property
    def bytes(self) -> int:
        return int(sum(r["bytes"] for r in self.layers))

    @property
    def error(self) -> float:
        return float(sum(r["error"] for r in self.layers))

    def to_dict(self) -> dict:
        return {
            "planner": "measured",
            "budget_bytes": int(self.budget_bytes),
            "bytes": self.bytes,
            "dense_bytes": self.dense_bytes,
            "size_ratio": self.bytes / self.dense_bytes if self.dense_bytes else 1.0,
            "summed_relative_error": self.error,
            "objective": self.objective,
            "objective_value": float(sum(r["objective"] for r in self.layers)),
            "layers": self.layers,
        }


def plan_measured(
    model,
    specs: list[FFNSpec],
    stats: dict[str, FFNStats],
    batches,
    config: SplitConfig,
    budget: float,
    *,
    candidates: list[Candidate] | None = None,
    formats=None,
    max_tokens: int = 512,
    selection: str = "score",
    seed: int = 0,
    measures: list[LayerMeasure] | None = None,
    progress: bool = False,
    scores=None,
    objective: str = "absolute",
) -> MeasuredPlan:
    """Allocate (heavy fraction, light format, light sparsity) per FFN under ``budget`` (FFN bytes
    as a fraction of dense fp32) by measured FFN output error on calibration inputs.

    Every candidate of every FFN is compressed as the split would compress it (heavy set = top
    neurons by ``selection``; the light format's pruning and quantizer, ``config.quantizer`` included)
    and run on up to ``max_tokens`` sampled calibration inputs of that FFN (from the original model);
    :func:`allocate` then minimises the summed output error under the byte budget: ``objective``
    relative sums ``||dy||^2 / ||y||^2`` per FFN (every layer weighs the same); absolute sums
    ``||dy||^2`` per token (normalised by the mean ``||y||^2``), so FFNs with large outputs (the
    perturbation they add to the residual stream) weigh more. ``measures`` (from an earlier call,
    :attr:`MeasuredPlan.measures`) skips the measurement. Default absolute: on SmolLM2 it gave
    perplexity 13.7 (relative 16.8) at 0.2446 of dense FFN bytes and 35.1 (relative 51.9) at 0.1345
    (samples/planner_compare.py).
    """
    from tqdm.auto import tqdm

    budget = check_fraction(budget, "--size-budget")
    if measures is None:
        cands = candidates if candidates is not None else default_candidates(config, formats)
        xs = ffn_inputs(model, specs, batches, max_tokens, seed)
        measures = [
            measure_layer(
                model, spec, stats[spec.name], xs[spec.name], config, cands, selection, seed, scores
            )
            for spec in tqdm(specs, desc="measure candidates", disable=not progress, unit="ffn")
        ]
    if objective not in OBJECTIVES:
        raise ConfigError(f"planner objective {objective!r} is unknown; use one of {list(OBJECTIVES)}")
    dense = sum(lm.dense_bytes for lm in measures)
    target = budget * dense
    mean_ref = float(np.mean([lm.ref_sq for lm in measures])) or 1.0
    weights = [1.0 if objective == "relative" else lm.ref_sq / mean_ref for lm in measures]
    picks = allocate([lm.weighted(w) for lm, w in zip(measures, weights)], target)
    heavy, configs, rows = {}, {}, []
    for spec, lm, i, wt in zip(specs, measures, picks, weights):
        c = lm.candidates[i]
        order = _ranking(stats[spec.name], selection, np.random.default_rng(seed), scores)
        heavy[spec.name] = np.sort(order[: int(round(c.heavy_fraction * order.size))]).astype(np.int64)
        configs[spec.name] = c.config(config)
        rows.append(
            {"name": spec.name, "choice": c.label, "heavy_fraction": c.heavy_fraction,
             "light_format": c.light_format, "light_sparsity": c.light_sparsity,
             "bytes": lm.bytes[i], "dense_bytes": lm.dense_bytes, "error": lm.errors[i],
             "objective": lm.errors[i] * wt}
        )  # fmt: skip
    return MeasuredPlan(heavy, configs, target, dense, rows, objective, measures)


def measured_error(model, specs: list[FFNSpec], xs: dict[str, torch.Tensor], reference) -> list[float]:
    """Relative squared FFN output error of every FFN of an already split ``model`` on inputs ``xs``,
    against the unsplit ``reference`` model (for comparing plans on the same inputs)."""
    out = []
    for spec in specs:
        y_ref = ffn_forward(reference, spec, xs[spec.name])
        y = ffn_forward(model, spec, xs[spec.name])
        out.append(float(((y - y_ref).double() ** 2).sum()) / max(float((y_ref.double() ** 2).sum()), 1e-30))
    return out


__all__ = [
    "PLANNERS",
    "SELECTIONS",
    "Candidate",
    "MeasuredPlan",
    "OBJECTIVES",
    "allocate",
    "default_candidates",
    "ffn_inputs",
    "hessian_saliency",
    "lowrank_rank",
    "measure_layer",
    "measured_error",
    "plan_budget",
    "plan_fraction",
    "plan_measured",
    "plan_summary",
]
