"""Heavy-hitter calibration: hooks on every FFN's intermediate activation.

For FFN neuron j with activation ``a_j`` (after the activation function, and after the gate
product for gated FFNs) the heavy-hitter score is the norm of its contribution to the FFN
output over all non-padding calibration tokens, ``||a_j|| * ||W_down[:, j]||``; the plain
activation norm ``||a_j||`` is kept for comparison. The same pass collects the input norms
that Wanda needs and, on request, the Hessians ``X^T X`` that SparseGPT needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import FFNSpec, find_ffns
from .errors import CalibrationError
from .split import get_module, linear_weight

SAMPLE_RATE = 16000  # Whisper's feature extractor rate; calibration audio is read at it


@dataclass
class FFNStats:
    """Calibration statistics of one FFN (all sums over non-padding tokens)."""

    name: str
    down_col_norm: torch.Tensor  # [F] ||W_down[:, j]||
    act_sq: torch.Tensor  # [F] sum_t a_tj^2
    x_sq: torch.Tensor  # [D] sum_t x_tk^2 (FFN input)
    n_tokens: int = 0
    hessian_x: torch.Tensor | None = None  # [D, D] sum_t x_t x_t^T
    hessian_act: torch.Tensor | None = None  # [F, F] sum_t a_t a_t^T

    @property
    def act_norm(self) -> torch.Tensor:
        return self.act_sq.sqrt().float()

    @property
    def x_norm(self) -> torch.Tensor:
        return self.x_sq.sqrt().float()

    @property
    def score(self) -> torch.Tensor:
        return self.act_norm * self.down_col_norm

    def top_share(self, fraction: float, by: str = "score") -> float:
        """Share of the summed contribution norms carried by the top ``fraction`` of neurons."""
        s = (self.score if by == "score" else self.act_norm).double()
        k = max(1, int(round(fraction * s.numel())))
        total = float(s.sum())
        return float(torch.topk(s, k).values.sum()) / total if total > 0 else 0.0


@dataclass
class Batch:
    """Model keyword arguments and the non-padding token masks of each stack."""

    inputs: dict
    masks: dict = field(default_factory=dict)  # "encoder" / "decoder" / "default" -> bool [B, T]


def modality(model: nn.Module) -> str:
    if getattr(model.config, "model_type", "") == "whisper":
        return "audio"
    return "text"


def make_batches(
    model, preprocessor, samples: list, batch_size: int = 8, max_length: int = 128
) -> list[Batch]:
    """Tokenise / featurise the samples into model inputs, padding masked out."""
    batches = []
    cfg = model.config
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        if modality(model) == "audio":
            batches.append(_whisper_batch(model, preprocessor, chunk))
            continue
        tok = preprocessor
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        mask = enc["attention_mask"].bool()
        if getattr(cfg, "is_encoder_decoder", False):
            start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
            labels = enc["input_ids"]
            dec = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)
            dmask = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
            inputs = {
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "decoder_input_ids": dec,
                "decoder_attention_mask": dmask.long(),
            }
            batches.append(Batch(inputs, {"encoder": mask, "decoder": dmask}))
        else:
            inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            batches.append(Batch(inputs, {"default": mask}))
    return batches


@torch.no_grad()
def _whisper_batch(model, feature_extractor, clips, max_new_tokens: int = 24) -> Batch:
    fe = getattr(feature_extractor, "feature_extractor", feature_extractor)
    feats = fe(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    feats = feats.to(next(model.parameters()).dtype)
    cfg = model.config
    start = cfg.decoder_start_token_id
    eos = cfg.eos_token_id
    enc = model.get_encoder()(feats)
    ids = torch.full((feats.shape[0], 1), start, dtype=torch.long)
    done = torch.zeros(feats.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):  # greedy transcripts: the decoder sees what it will see in use
        logits = model(encoder_outputs=enc, decoder_input_ids=ids).logits[:, -1]
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos if eos is not None else 0), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == eos
        if bool(done.all()):
            break
    dmask = torch.ones_like(ids, dtype=torch.bool)
    if eos is not None:  # tokens after the first eos are padding
        after = (ids == eos).long().cumsum(1) - (ids == eos).long() > 0
        dmask &= ~after
    return Batch({"input_features": feats, "decoder_input_ids": ids}, {"encoder": None, "decoder": dmask})


def _stack(name: str, masks: dict) -> str:
    if "default" in masks:
        return "default"
    return "decoder" if "decoder" in name.split(".") else "encoder"


def _linear_stack(name: str, masks: dict) -> str:
    """The token mask of a linear layer outside the FFNs: lm_head / proj_out read the decoder."""
    if "default" in masks:
        return "default"
    return "encoder" if "encoder" in name.split(".") else "decoder"


class _StopForward(Exception):
    """Raised by the ``stop_after`` hook to end a calibration forward pass early."""


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: list[Batch],
    specs: list[FFNSpec] | None = None,
    hessians: bool = False,
    progress: bool = True,
    stop_after: str | None = None,
) -> dict[str, FFNStats]:
    """Run the calibration batches and return per-FFN statistics keyed by FFN name.

    ``stop_after`` (a module path) ends each forward pass once that module has run: the
    layer-by-layer (sequential) mode needs statistics of one FFN at a time, not the rest of
    the model.
    """
    specs = specs if specs is not None else find_ffns(model)
    if not batches:
        raise CalibrationError("no calibration batch; pass --calibration PATH or use the built-in sample")
    stats: dict[str, FFNStats] = {}
    current: dict = {}
    handles = []

    def rows(t: torch.Tensor, spec: FFNSpec) -> torch.Tensor:
        mask = current.get(_stack(spec.name, current))
        t = t.detach().double()
        if mask is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(mask.shape):
            return t[mask]
        return t.reshape(-1, t.shape[-1])

    for spec in specs:
        w_down, _ = linear_weight(get_module(model, spec.down))
        f, d = w_down.shape[1], w_down.shape[0]
        st = FFNStats(
            spec.name,
            down_col_norm=w_down.norm(dim=0).float(),
            act_sq=torch.zeros(f, dtype=torch.float64),
            x_sq=torch.zeros(d, dtype=torch.float64),
            hessian_x=torch.zeros(d, d, dtype=torch.float64) if hessians else None,
            hessian_act=torch.zeros(f, f, dtype=torch.float64) if hessians else None,
        )
        stats[spec.name] = st

        def down_hook(_m, args, st=st, spec=spec):
            a = rows(args[0], spec)
            st.act_sq += (a * a).sum(0)
            st.n_tokens += a.shape[0]
            if st.hessian_act is not None:
                st.hessian_act += a.T @ a

        def up_hook(_m, args, st=st, spec=spec):
            x = rows(args[0], spec)
            st.x_sq += (x * x).sum(0)
            if st.hessian_x is not None:
                st.hessian_x += x.T @ x

        handles.append(get_module(model, spec.down).register_forward_pre_hook(down_hook))
        handles.append(get_module(model, spec.up).register_forward_pre_hook(up_hook))

    if stop_after is not None:

        def stop(_m, _args, _out):
            raise _StopForward

        handles.append(get_module(model, stop_after).register_forward_hook(stop))
    was_training = model.training
    model.eval()
    try:
        for b in tqdm(batches, desc="calibrate", disable=not progress, unit="batch"):
            current.clear()
            current.update(b.masks)
            try:
                model(**b.inputs)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for st in stats.values():
        if st.n_tokens == 0:
            raise CalibrationError(
                f"FFN {st.name} saw no calibration token; check that the samples are not empty"
            )
    return stats


@torch.no_grad()
def linear_hessians(
    model: nn.Module,
    batches: list[Batch],
    names: list[str],
    progress: bool = True,
    stop_after: str | None = None,
) -> dict[str, torch.Tensor]:
    """The input Hessian ``X^T X`` (float64, over non-padding tokens) of each named linear layer.

    Layers that read the same input tensor (attention's q / k / v projections) share one
    accumulated matrix. ``stop_after`` ends each forward pass once that module has run.
    """
    if not batches:
        raise CalibrationError("no calibration batch; pass --calibration PATH or use the built-in sample")
    sums: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}  # layer -> the layer whose matrix it shares
    current: dict = {}
    seen: list[tuple[torch.Tensor, str]] = []  # this batch's input tensors and who accumulated them
    handles = []

    def hook(_m, args, name):
        x = args[0]
        for t, owner in seen:
            if t is x:
                alias.setdefault(name, owner)
                return
        seen.append((x, name))
        mask = current.get(_linear_stack(name, current))
        t = x.detach().double()
        rows = (
            t[mask] if mask is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(mask.shape) else None
        )
        rows = t.reshape(-1, t.shape[-1]) if rows is None else rows
        h = rows.T @ rows
        sums[name] = sums[name] + h if name in sums else h

    for name in names:
        handles.append(get_module(model, name).register_forward_pre_hook(lambda m, a, n=name: hook(m, a, n)))
    if stop_after is not None:

        def stop(_m, _args, _out):
            raise _StopForward

        handles.append(get_module(model, stop_after).register_forward_hook(stop))
    was_training = model.training
    model.eval()
    try:
        for b in tqdm(batches, desc="calibrate linears", disable=not progress, unit="batch"):
            current.clear()
            current.update(b.masks)
            seen.clear()
            try:
                model(**b.inputs)
            except _StopForward:
                pass
    finally:
        seen.clear()
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name in names:
        owner = alias.get(name, name)
        if owner not in sums:
            raise CalibrationError(f"linear layer {name} saw no calibration token; check the samples")
        out[name] = sums[owner]
    return out


def stats_to_json(stats: dict[str, FFNStats]) -> dict:
    """``heavy_hitters.json``: per FFN its name, neuron count and per-neuron scores."""
    ffns = []
    for st in stats.values():
        ffns.append(
            {
                "name": st.name,
                "n_neurons": int(st.act_sq.numel()),
                "n_tokens": st.n_tokens,
                "score": np.round(st.score.numpy(), 6).tolist(),
                "act_norm": np.round(st.act_norm.numpy(), 6).tolist(),
                "top_share": {f"{p}%": round(st.top_share(p / 100), 4) for p in (5, 10, 20)},
                "top_share_act_norm": {
                    f"{p}%": round(st.top_share(p / 100, by="act"), 4) for p in (5, 10, 20)
                },
            }
        )
    return {
        "score": "||a_j|| * ||W_down[:, j]|| over non-padding calibration tokens",
        "top_share": "sum of the top p% neuron scores / sum of all scores",
        "ffns": ffns,
    }
