"""The stages as one call each: load, calibrate, plan, split (+ other linears)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .adapters import find_ffns
from .calibrate import calibrate, linear_hessians, make_batches
from .data.calibration import SELF_GENERATED, generates_text, load_samples, self_generated
from .errors import ConfigError
from .formats import EmbeddingFormat, OtherLinearFormat, get_format
from .plan import PLANNERS, default_candidates, hessian_saliency, plan_budget, plan_fraction, plan_measured
from .split import (
    SplitConfig,
    SplitReport,
    lm_head_name,
    other_linear_names,
    quantize_embeddings_,
    quantize_other_linears_,
    split_ffn_,
)


@dataclass
class CompressResult:
    model: torch.nn.Module
    report: SplitReport
    other_linear: dict
    plan: dict
    stats: dict
    batches: list
    embedding: dict = field(
        default_factory=lambda: {"format": "fp32", "tables": 0, "dense_bytes": 0, "bytes": 0}
    )
    planner: dict | None = None  # the measured planner's choices and measurements (budget mode)
    calibration_source: str | None = None  # the calibration text/audio's origin (the manifest records it)


def compress(
    model,
    preprocessor,
    *,
    config: SplitConfig | None = None,
    heavy_fraction: float | None = None,
    size_budget: float | None = None,
    selection: str = "score",
    other_linear: str = "fp32",
    embedding: str = "fp32",
    lm_head: str | None = None,
    calibration: str | None = None,
    num_samples: int = 64,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
    stats: dict | None = None,
    batches: list | None = None,
    inplace: bool = False,
    sequential: bool = False,
    progress: bool = True,
    planner: str = "measured",
    planner_formats: list[str] | None = None,
) -> CompressResult:
    """Calibrate, plan and split ``model`` (a copy unless ``inplace``).

    The heavy set is ``heavy_fraction`` of every FFN (default 0.1) or, with ``size_budget``,
    allocated across layers under that byte budget: ``planner`` measured (default) picks heavy
    fraction, light format (among ``planner_formats``) and light sparsity per FFN by measured FFN
    output error (:func:`ffsplit_export.plan.plan_measured`), proxy moves single neurons by a
    score^2 proxy keeping ``config``'s light format. With ``sequential`` the light parts are
    pruned FFN by FFN, each from statistics of the model whose earlier FFNs are already
    compressed (as in SparseGPT's layer-wise procedure), and the other linear layers are
    quantized in model order between them (with GPTQ, each from its input Hessian on the
    partly compressed model); the heavy sets still come from the original model. With
    ``config.quantizer`` gptq every integer weight gets GPTQ's codes (from the Hessians of
    the same calibration pass, or of the partly compressed model when ``sequential``).
    """
    cfg = config or SplitConfig()
    EmbeddingFormat.parse(embedding, "--embedding")  # bad values fail before calibration
    if size_budget is not None and heavy_fraction is not None:
        raise ConfigError("--size-budget and --heavy-fraction are alternatives; pass only one of them")
    specs = find_ffns(model)
    gptq = str(cfg.quantizer) == "gptq"
    other_fmt = get_format(OtherLinearFormat.parse(other_linear, "--other-linear"))
    head_fmt = other_fmt if lm_head is None else get_format(OtherLinearFormat.parse(lm_head, "--lm-head"))
    head_name = lm_head_name(model)

    def fmt_of(name: str):
        return head_fmt if name == head_name else other_fmt

    quantize_others = not (other_fmt.keeps_original and head_fmt.keeps_original)
    if planner not in PLANNERS:
        raise ConfigError(f"--planner {planner!r} is unknown; use one of {list(PLANNERS)}")
    measured = size_budget is not None and planner == "measured"
    lights = [get_format(cfg.light_format)]
    if measured:
        cands = default_candidates(cfg, planner_formats)
        lights = [get_format(f) for f in dict.fromkeys(c.light_format for c in cands)]
    need_h = (
        (str(cfg.prune_method) == "sparsegpt" and any(f.pruned for f in lights))
        or (gptq and (any(f.gptq for f in lights) or get_format(cfg.heavy_format).gptq))
        or selection == "hessian"
    )
    source = "given batches" if batches is not None else (calibration or "builtin")
    if batches is None:
        # error compensation (GPTQ, SparseGPT, Hessian saliency) needs more tokens than the built-in
        # sentences hold: a decoder-only LM then writes its own calibration text (self_generated)
        if (
            calibration is None
            and (need_h or (gptq and (other_fmt.gptq or head_fmt.gptq)))
            and generates_text(model)
        ):
            samples = self_generated(model, preprocessor, num_samples, max_length, seed, progress=progress)
            source = f"{SELF_GENERATED} ({len(samples)} samples, seed {seed})"
        else:
            samples = load_samples(model, calibration, num_samples)
        batches = make_batches(model, preprocessor, samples, batch_size=batch_size, max_length=max_length)
    if stats is None or (need_h and next(iter(stats.values())).hessian_x is None):
        stats = calibrate(model, batches, specs, hessians=need_h, progress=progress)
    scores = None
    if selection == "hessian":
        scores = {s.name: hessian_saliency(model, s, stats[s.name], cfg.gptq_damp) for s in specs}
    layer_cfgs, planned = None, None
    if measured:
        mp = plan_measured(
            model, specs, stats, batches, cfg, size_budget, candidates=cands, selection=selection,
            seed=seed, progress=progress, scores=scores,
        )  # fmt: skip
        plan, layer_cfgs, planned = mp.heavy, mp.configs, mp.to_dict()
    elif size_budget is not None:
        plan = plan_budget(model, specs, stats, cfg, size_budget)
    else:
        plan = plan_fraction(
            stats, 0.1 if heavy_fraction is None else heavy_fraction, selection, seed, scores
        )
    others = other_linear_names(model, specs) if quantize_others else []
    others = [n for n in others if not fmt_of(n).keeps_original]
    h_names = {n for n in others if gptq and fmt_of(n).gptq}  # GPTQ needs their input Hessians
    target = model if inplace else copy.deepcopy(model)

    def quantize_others_(names, stop_after=None) -> dict:
        hn = [n for n in names if n in h_names]
        hs = linear_hessians(target, batches, hn, False, stop_after) if hn else None
        return quantize_other_linears_(
            target, other_linear, cfg.group_size, specs, config=cfg, hessians=hs, names=names, lm_head=lm_head
        )

    if sequential:
        # FFN by FFN in model order, each from the statistics of the model whose earlier layers
        # are already compressed; the other linears registered before an FFN go first
        order = {name: i for i, (name, _) in enumerate(target.named_modules())}
        infos, parts, done = [], [], 0
        for spec in tqdm(specs, desc="sequential split", disable=not progress, unit="ffn"):
            first = min(order[p] for p in spec.projections)
            before = [o for o in others[done:] if order[o] < first]
            if before:
                parts.append(quantize_others_(before, stop_after=spec.up))
                done += len(before)
            st = calibrate(target, batches, [spec], hessians=need_h, progress=False, stop_after=spec.down)
            infos += split_ffn_(target, plan, cfg, st, [spec], progress=False, layer_configs=layer_cfgs).ffns
        if others[done:]:
            parts.append(quantize_others_(others[done:]))
        report = SplitReport(infos, cfg.to_dict())
        other = _merge_other(other_linear, parts, lm_head)
    else:
        hn = [n for n in others if n in h_names]
        hs = linear_hessians(model, batches, hn, progress) if hn else None
        report = split_ffn_(target, plan, cfg, stats, specs, progress=progress, layer_configs=layer_cfgs)
        other = quantize_other_linears_(
            target,
            other_linear,
            cfg.group_size,
            specs,
            config=cfg,
            hessians=hs,
            names=others,
            lm_head=lm_head,
        )
    emb = quantize_embeddings_(target, embedding, cfg.group_size)
    return CompressResult(target, report, other, plan, stats, batches, emb, planned, source)


def _merge_other(fmt: str, parts: list[dict], lm_head: str | None = None) -> dict:
    """One ``quantize_other_linears_`` summary of several calls."""
    out = {"format": str(fmt), "layers": 0, "dense_bytes": 0, "bytes": 0}
    if lm_head is not None and str(lm_head) != str(fmt):
        out["lm_head"] = str(lm_head)
    for p in parts:
        for key in ("layers", "dense_bytes", "bytes"):
            out[key] += p[key]
    return out


def model_output(model, batch) -> torch.Tensor:
    """The main output tensor (logits or last hidden state) of a calibration batch."""
    with torch.no_grad():
        out = model(**batch.inputs)
    for key in ("logits", "last_hidden_state"):
        if key in out:
            return out[key]
    return out[0]
