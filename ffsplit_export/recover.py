"""SquareHead sparse fine-tuning of a split model (Kurtic et al., arXiv 2310.06927).

The teacher is the original model (frozen); the student is the split + compressed one.
Every compressed linear of the student (the heavy and light parts of each ``SplitLinear``,
and the ``--other-linear`` MatMulNBits layers) is swapped for a :class:`TrainableLinear`:
a float32 weight initialised from ``dense_weight()``, its sparsity mask fixed (re-applied
after every optimizer step) and its quantization simulated with a straight-through
estimator that rounds exactly as :mod:`ffsplit_export.formats.packing` does. At the end each
one is packed back into its original module type and format, so the recovered student
exports exactly like a one-shot model.

Loss = ``task_loss_weight`` * next-token cross-entropy
     + ``squarehead_weight`` * sum over blocks of mean((h_s - h_t)^2) / mean(h_t^2)
     + ``kd_logits_weight`` * KL(teacher || student) on the logits,
all over non-padding tokens.

Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) the same loop runs with
PyTorch distributed data parallel (gloo on CPU, NCCL on GPU) or, with ``fsdp=True``, with
FSDP2 (``fully_shard``) over the trainable linears: each rank takes its rows of the same
global batch, the loss normalisers (token counts, teacher energies) are summed over the
ranks so the gradient equals the one-process gradient, and only rank 0 writes checkpoints
(full tensors, so they resume on any number of ranks).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibrate import Batch, make_batches
from .errors import ConfigError, FormatError
from .formats.fakequant import fake_int4_groups, fake_int8_rows  # noqa: F401 - re-exported
from .linear import CompressedLinear
from .split import SplitLinear, get_module, linear_weight, set_module

__all__ = [
    "RecoverConfig",
    "RecoverReport",
    "TrainableLinear",
    "make_trainable_",
    "pack_trainable_",
    "Processes",
    "init_processes",
    "recover",
    "shard_batch",
    "squarehead_loss",
]

CHECKPOINT_FILE = "recover_state.safetensors"


# ------------------------------------------------------------------------------ config


@dataclass
class RecoverConfig:
    """Hyper-parameters of :func:`recover`; unknown or out-of-range values raise ConfigError."""

    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 4
    seq_len: int = 128
    task_loss_weight: float = 1.0
    squarehead_weight: float = 1.0
    kd_logits_weight: float = 0.0
    warmup_steps: int | None = None  # default: 5 % of steps
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    gradual_start_sparsity: float | None = None  # gradual pruning: start here ...
    gradual_end_step: int | None = None  # ... and reach each module's target sparsity at this step
    gradual_every: int = 10  # mask update interval (steps) during the gradual phase
    checkpoint_every: int = 50
    train_other_linear: bool = True  # also fine-tune --other-linear MatMulNBits layers
    seed: int = 0

    def __post_init__(self):
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(isinstance(self.steps, int) and self.steps >= 1, f"steps={self.steps!r}; use a positive integer")
        need(
            self.lr > 0 and math.isfinite(self.lr),
            f"lr={self.lr!r}; use a positive learning rate such as 1e-4",
        )
        need(self.batch_size >= 1, f"batch_size={self.batch_size}; use 1 or more")
        need(self.seq_len >= 2, f"seq_len={self.seq_len}; use at least 2 tokens")
        for name in ("task_loss_weight", "squarehead_weight", "kd_logits_weight", "weight_decay"):
            v = getattr(self, name)
            need(v >= 0 and math.isfinite(v), f"{name}={v!r}; use a finite value >= 0")
        need(
            self.task_loss_weight + self.squarehead_weight + self.kd_logits_weight > 0,
            "all loss weights are 0; set task_loss_weight, squarehead_weight or kd_logits_weight > 0",
        )
        need(
            self.warmup_steps is None or 0 <= self.warmup_steps < self.steps,
            f"warmup_steps={self.warmup_steps}; use 0 <= warmup_steps < steps={self.steps}",
        )
        need(
            self.grad_clip is None or self.grad_clip > 0,
            f"grad_clip={self.grad_clip}; use a positive value or None",
        )
        need(self.checkpoint_every >= 1, f"checkpoint_every={self.checkpoint_every}; use 1 or more")
        need(self.gradual_every >= 1, f"gradual_every={self.gradual_every}; use 1 or more")
        g0, g1 = self.gradual_start_sparsity, self.gradual_end_step
        need(
            (g0 is None) == (g1 is None),
            "gradual sparsity needs both gradual_start_sparsity and gradual_end_step (--gradual-start and "
            "--gradual-end-step); pass both or neither",
        )
        if g0 is not None:
            need(
                0.0 <= g0 < 1.0,
                f"gradual_start_sparsity={g0}; use a value in [0, 1) below the target sparsity",
            )
            need(1 <= g1 <= self.steps, f"gradual_end_step={g1}; use 1..steps={self.steps}")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(0, self.steps // 20)

    @classmethod
    def from_kwargs(cls, **kwargs) -> RecoverConfig:
        known = {f.name for f in fields(cls)}
        bad = sorted(set(kwargs) - known)
        if bad:
            raise ConfigError(f"unknown recover option(s) {bad}; known: {sorted(known)}")
        return cls(**kwargs)

    def sparsity_at(self, step: int, target: float) -> float:
        """Cubic schedule (Zhu & Gupta): ``gradual_start_sparsity`` at step 0, ``target`` from ``gradual_end_step``."""
        if self.gradual_start_sparsity is None or step >= self.gradual_end_step:
            return target
        s0 = min(self.gradual_start_sparsity, target)
        return target + (s0 - target) * (1.0 - step / self.gradual_end_step) ** 3


@dataclass
class RecoverReport:
    """What :func:`recover` did; ``history`` has one dict of losses per step run."""

    steps: int
    start_step: int
    seconds: float
    trained_modules: int
    trained_parameters: int
    history: list[dict] = field(default_factory=list, repr=False)
    checkpoint: str | None = None

    def mean_loss(self, first: int | None = None, last: int | None = None, key: str = "loss") -> float:
        h = self.history
        part = h[:first] if first is not None else h[-last:] if last is not None else h
        return float(np.mean([r[key] for r in part])) if part else float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------ trainable module


class TrainableLinear(nn.Module):
    """A float32 stand-in for one compressed linear: fixed mask, quantization by STE.

    What is trained, the mask and the rounding come from the module's registered format
    (:meth:`~ffsplit_export.formats.registry.WeightFormat.trainable_state`,
    ``trainable_weight``, ``trainable_forward``, ``pack_trained``).
    """

    def __init__(self, src: CompressedLinear):
        super().__init__()
        if not isinstance(src, CompressedLinear):
            raise FormatError(
                f"cannot fine-tune a {type(src).__name__}; supported: the compressed linears of "
                "ffsplit_export.linear (every registered light, heavy and other-linear format)"
            )
        self.format = src.format
        self.src_type = type(src).__name__
        self.in_features, self.out_features = src.in_features, src.out_features
        self.bias = src.bias  # frozen float32 (exported as is)
        st = self.format.trainable_state(src)
        self.register_buffer("mask", st["mask"])  # bool [N, K]: stored positions (sparse formats)
        self.register_buffer("target_mask", st["target_mask"])  # the final mask (gradual sparsity)
        self.target_sparsity = st["target_sparsity"]
        self.group_size = st["group_size"]
        self.int4_grid = st.get("int4_grid", "symmetric")  # int4 MatMulNBits: symmetric / asymmetric grid
        for name, t in st["params"].items():
            setattr(self, name, nn.Parameter(t if self.mask is None or name != "weight" else t * self.mask))

    @property
    def quant(self) -> str:
        """The format's stable name (``quant`` of earlier versions)."""
        return self.format.name

    # the weight the packed format will hold (mask, then rounding)
    def effective_weight(self) -> torch.Tensor:
        return self.format.trainable_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.format.trainable_forward(self, x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def apply_mask_(self) -> None:
        if self.mask is not None:
            mask = self.mask
            if _is_dtensor(self.weight):  # FSDP: this rank's rows of the mask (sliced here, no traffic)
                from torch.distributed.tensor import distribute_tensor

                w = self.weight
                mask = distribute_tensor(mask, w.device_mesh, w.placements, src_data_rank=None)
            self.weight.mul_(mask)

    @torch.no_grad()
    def set_sparsity_(self, sparsity: float) -> None:
        """Gradual pruning: keep the target mask plus the largest other weights up to ``1 - sparsity``."""
        if self.target_mask is None:
            return
        tm = self.target_mask
        n_keep = int(round((1.0 - sparsity) * tm.numel()))
        extra = max(0, n_keep - int(tm.sum()))
        mask = tm.clone()
        if extra:
            score = (self.weight * self.mask).abs().masked_fill(tm, -1.0).flatten()
            idx = torch.topk(score, extra).indices
            idx = idx[score[idx] > 0]
            mask.view(-1)[idx] = True
        self.mask.copy_(mask)
        self.apply_mask_()

    @torch.no_grad()
    def pack(self) -> CompressedLinear:
        """The compressed module of the original format, holding the trained weight."""
        return self.format.pack_trained(self)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, from={self.src_type}, format={self.format.name}"
        )


def _targets(model: nn.Module, other_linear: bool) -> list[str]:
    names = []
    for name, m in model.named_modules():
        if isinstance(m, SplitLinear):
            names += [f"{name}.{p}" for p in ("heavy", "light") if getattr(m, p) is not None]
        elif (
            other_linear
            and isinstance(m, CompressedLinear)
            and not any(name.startswith(n + ".") for n in names)
        ):
            parent = name.rpartition(".")[0]
            if not isinstance(model.get_submodule(parent) if parent else model, SplitLinear):
                names.append(name)
    return names


def make_trainable_(model: nn.Module, other_linear: bool = True) -> dict[str, TrainableLinear]:
    """Swap every compressed linear of ``model`` for a :class:`TrainableLinear`, in place."""
    out = {}
    for name in _targets(model, other_linear):
        t = TrainableLinear(get_module(model, name))
        set_module(model, name, t)
        out[name] = t
    if not out:
        raise ConfigError(
            "the student has no compressed linear layer; pass the model that `compress` returned"
        )
    return out


def pack_trainable_(model: nn.Module) -> int:
    """Pack every :class:`TrainableLinear` back into its compressed module, in place; returns the count."""
    names = [n for n, m in model.named_modules() if isinstance(m, TrainableLinear)]
    for name in names:
        t = get_module(model, name)
        dev = next(p for n, p in t.named_parameters(recurse=False) if n != "bias").device
        set_module(model, name, t.pack().to(dev))
    return len(names)


# ------------------------------------------------------------------------------ losses


def _token_mask(batch: Batch, key: str, like: torch.Tensor) -> torch.Tensor:
    m = batch.masks.get(key) if batch.masks else None
    if m is None:
        m = batch.masks.get("default") if batch.masks else None
    if m is None or tuple(m.shape) != tuple(like.shape[:2]):
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return m.to(like.device).bool()


def squarehead_loss(student_hidden, teacher_hidden, mask: torch.Tensor) -> torch.Tensor:
    """Sum over layers of mean((h_s - h_t)^2) / mean(h_t^2) over the tokens where ``mask``."""
    total = None
    for hs, ht in zip(student_hidden, teacher_hidden, strict=True):
        m = mask[..., None].to(hs.dtype)
        num = ((hs - ht) ** 2 * m).sum()
        den = (ht**2 * m).sum().clamp_min(1e-12)
        term = num / den
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def _hidden_groups(out, batch: Batch, like_key: str) -> list[tuple[tuple, str]]:
    """(block outputs, mask key) per stack; embeddings (index 0) are not a block output."""
    if getattr(out, "encoder_hidden_states", None) is not None:
        groups = [(out.encoder_hidden_states[1:], "encoder")]
        if getattr(out, "decoder_hidden_states", None) is not None:
            groups.append((out.decoder_hidden_states[1:], "decoder"))
        return groups
    return [(out.hidden_states[1:], like_key)]


def _targets_of(batch: Batch, is_seq2seq: bool) -> tuple[torch.Tensor, str]:
    if is_seq2seq:
        return batch.inputs["decoder_input_ids"], "decoder"
    return batch.inputs["input_ids"], "default"


def compute_losses(
    student,
    teacher,
    batch: Batch,
    cfg: RecoverConfig,
    *,
    procs: Processes | None = None,
    forward=None,
    live: bool = True,
) -> dict[str, torch.Tensor]:
    """Task, SquareHead and logit-KL losses of one batch (student with grad, teacher without).

    With ``procs`` of more than one rank, ``batch`` is this rank's rows of the global batch and
    ``forward`` the wrapped student (DDP); see :func:`_sharded_losses`. ``live=False``: this
    rank has no rows in this step (``batch`` is a stand-in row that contributes nothing).
    """
    is_s2s = bool(getattr(student.config, "is_encoder_decoder", False))
    kwargs = dict(batch.inputs, output_hidden_states=True, use_cache=False, return_dict=True)
    with torch.no_grad():
        t_out = teacher(**kwargs)
    s_out = (forward or student)(**kwargs)
    if procs is not None and procs.active:
        return _sharded_losses(s_out, t_out, batch, cfg, procs, is_s2s, live)
    ids, key = _targets_of(batch, is_s2s)
    mask = _token_mask(batch, key, ids[..., None])
    losses: dict[str, torch.Tensor] = {}
    zero = s_out.logits.new_zeros(())
    # next-token cross-entropy over non-padding targets
    logits = s_out.logits[:, :-1].float()
    tgt_mask = mask[:, 1:] & mask[:, :-1]
    if cfg.task_loss_weight > 0 and bool(tgt_mask.any()):
        losses["task"] = F.cross_entropy(logits[tgt_mask], ids[:, 1:][tgt_mask])
    else:
        losses["task"] = zero
    sq = zero
    if cfg.squarehead_weight > 0:
        for (hs, k), (ht, _) in zip(
            _hidden_groups(s_out, batch, key), _hidden_groups(t_out, batch, key), strict=True
        ):
            sq = sq + squarehead_loss(hs, ht, _token_mask(batch, k, hs[0]))
    losses["squarehead"] = sq
    if cfg.kd_logits_weight > 0:
        tl = t_out.logits.float()[mask]
        sl = s_out.logits.float()[mask]
        losses["kd"] = F.kl_div(
            F.log_softmax(sl, -1), F.log_softmax(tl, -1), log_target=True, reduction="batchmean"
        )
    else:
        losses["kd"] = zero
    losses["loss"] = (
        cfg.task_loss_weight * losses["task"]
        + cfg.squarehead_weight * losses["squarehead"]
        + cfg.kd_logits_weight * losses["kd"]
    )
    return losses


def _sharded_losses(s_out, t_out, batch: Batch, cfg: RecoverConfig, procs, is_s2s: bool, live: bool):
    """The losses of :func:`compute_losses` when each rank holds some rows of the global batch.

    Every loss of the global batch is a ratio whose denominator does not depend on the
    student (token counts, teacher energies ``sum h_t^2``). Those denominators are summed over
    the ranks (one all-reduce) and each rank returns ``world_size * (its numerator) / (global
    denominator)``: the mean over ranks, which DDP and FSDP take of the gradients, is then the
    gradient of the one-process loss of the whole batch, also for uneven or padded shards.
    """
    ids, key = _targets_of(batch, is_s2s)
    mask = _token_mask(batch, key, ids[..., None])
    if not live:
        mask = torch.zeros_like(mask)
    tgt_mask = mask[:, 1:] & mask[:, :-1]
    groups = []  # (student blocks, teacher blocks, token mask) per stack
    if cfg.squarehead_weight > 0:
        for (hs, k), (ht, _) in zip(
            _hidden_groups(s_out, batch, key), _hidden_groups(t_out, batch, key), strict=True
        ):
            m = _token_mask(batch, k, hs[0])
            groups.append((hs, ht, m if live else torch.zeros_like(m)))
    dens = [(ht_l**2 * m[..., None].to(ht_l.dtype)).sum() for _, ht, m in groups for ht_l in ht]
    totals = torch.stack([tgt_mask.sum().double(), mask.sum().double()] + [d.detach().double() for d in dens])
    procs.all_reduce_sum(totals)
    totals = totals.tolist()
    w = float(procs.world_size)
    zero = s_out.logits.new_zeros(())
    losses: dict[str, torch.Tensor] = {}
    logits = s_out.logits[:, :-1].float()
    if cfg.task_loss_weight > 0 and totals[0] > 0:
        ce = F.cross_entropy(logits[tgt_mask], ids[:, 1:][tgt_mask], reduction="sum")
        losses["task"] = ce * (w / totals[0])
    else:
        losses["task"] = zero
    sq, i = zero, 2
    for hs, ht, m in groups:
        for hs_l, ht_l in zip(hs, ht, strict=True):
            num = ((hs_l - ht_l) ** 2 * m[..., None].to(hs_l.dtype)).sum()
            sq = sq + num * (w / max(totals[i], 1e-12))
            i += 1
    losses["squarehead"] = sq
    if cfg.kd_logits_weight > 0 and totals[1] > 0:
        tl = t_out.logits.float()[mask]
        sl = s_out.logits.float()[mask]
        kl = F.kl_div(F.log_softmax(sl, -1), F.log_softmax(tl, -1), log_target=True, reduction="sum")
        losses["kd"] = kl * (w / totals[1])
    else:
        losses["kd"] = zero
    losses["loss"] = (
        cfg.task_loss_weight * losses["task"]
        + cfg.squarehead_weight * losses["squarehead"]
        + cfg.kd_logits_weight * losses["kd"]
    )
    if not live:  # keep the graph (DDP / FSDP expect every gradient), contribute nothing
        losses = {k: v + 0.0 * s_out.logits.sum() for k, v in losses.items()}
    return losses


# ------------------------------------------------------------------------------ processes


@dataclass
class Processes:
    """The processes :func:`recover` trains in: one, or the group ``torchrun`` launched."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owned: bool = field(default=False, repr=False)  # init_processes() created the group
    wait_group: object = field(default=None, repr=False)  # gloo group with a long timeout

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> None:
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(t)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def wait_for_main(self) -> None:
        """Every rank waits here while rank 0 exports (a gloo barrier with a 24 h timeout)."""
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.wait_group) if self.wait_group is not None else dist.barrier()

    def close(self) -> None:
        """Leave the process group, if :func:`init_processes` created it."""
        if self.active and self.owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={v!r} is not an integer; launch with torchrun"
        ) from None


def init_processes(device=None, backend: str | None = None) -> Processes:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe, once.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
    ``WORLD_SIZE`` unset or 1 gives the single process. ``backend``: ``gloo`` or ``nccl``;
    default nccl for a CUDA ``device`` (each rank on ``cuda:LOCAL_RANK``), else gloo. A group
    somebody else initialised is used as it is.
    """
    local = _env_int("LOCAL_RANK", 0)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()))
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Processes()
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world} but this PyTorch has no torch.distributed; run one process")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
            "`torchrun --nproc_per_node N` (or `accelerate launch`), or unset WORLD_SIZE"
        )
    dev = torch.device(device) if device is not None else torch.device("cpu")
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"backend {backend!r} is not supported; use gloo (CPU) or nccl (CUDA)")
    if backend == "nccl":
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise ConfigError(
                f"backend nccl needs a CUDA device for LOCAL_RANK={local} "
                f"({torch.cuda.device_count()} visible); use --backend gloo / --device cpu"
            )
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    from datetime import timedelta

    wait = dist.new_group(backend="gloo", timeout=timedelta(hours=24))
    return Processes(dist.get_rank(), dist.get_world_size(), local, backend, owned=True, wait_group=wait)


def check_global_batch(batch_size: int, world_size: int) -> None:
    """The global batch (``--train-batch-size``) must split evenly over the processes."""
    if world_size > 1 and batch_size % world_size:
        raise ConfigError(
            f"the global batch of {batch_size} sequences (--train-batch-size) does not split "
            f"evenly over {world_size} processes; use a multiple of {world_size} "
            f"(e.g. {world_size * max(1, round(batch_size / world_size))}) or another --nproc_per_node"
        )


def _rows(batch: Batch) -> int:
    for v in batch.inputs.values():
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            return int(v.shape[0])
    raise ConfigError("a training batch has no tensor input; pass calibration batches or text")


def shard_batch(batch: Batch, rank: int, world_size: int) -> tuple[Batch, bool]:
    """This rank's contiguous rows of a global batch, and whether it has any.

    Rows ``[n*rank//W, n*(rank+1)//W)``, so the ranks together hold the global batch in its
    order. A rank left without rows (a last batch smaller than the world) gets row 0 as a
    stand-in and ``False``; :func:`compute_losses` then counts nothing from it.
    """
    n = _rows(batch)
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    live = hi > lo
    if not live:
        lo, hi = 0, 1

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n:
            return v[lo:hi]
        return v

    return Batch(
        {k: cut(v) for k, v in batch.inputs.items()}, {k: cut(v) for k, v in (batch.masks or {}).items()}
    ), live


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) one; a collective for a DTensor."""
    return t.full_tensor() if _is_dtensor(t) else t


def _place(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out like ``like`` (this rank's shard of it when ``like`` is a DTensor)."""
    if _is_dtensor(like):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(
            t.to(like.device_mesh.device_type), like.device_mesh, like.placements, src_data_rank=None
        )
    return t.to(like.device)


def _check_same_models(procs: Processes, teacher: nn.Module, modules: dict, dev) -> None:
    """Every rank must have built the same teacher and student (same model, seed, data)."""
    with torch.no_grad():
        sums = torch.stack(
            [
                sum((p.double().sum() for p in teacher.parameters()), torch.zeros((), dtype=torch.float64)),
                sum((p.double().sum() for p in _params(modules)), torch.zeros((), dtype=torch.float64)),
            ]
        ).to(dev)
    import torch.distributed as dist

    hi, lo = sums.clone(), sums.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        raise ConfigError(
            "the ranks built different teacher / student models; run the same command (model, "
            "calibration data, seed) on every rank"
        )


def _unshard_(modules: dict[str, TrainableLinear]) -> None:
    """FSDP: give every trainable module its whole parameters back (all ranks take part)."""
    for m in modules.values():
        for name, p in list(m.named_parameters(recurse=False)):
            if _is_dtensor(p):
                m.register_parameter(name, nn.Parameter(p.full_tensor().detach(), requires_grad=False))


# ------------------------------------------------------------------------------ data


def training_batches(model, preprocessor, data, cfg: RecoverConfig) -> list[Batch]:
    """Batches from a list of Batch (used as is), a text, a list of texts or of waveforms.

    Text for a causal LM is tokenized once and cut into ``seq_len`` blocks (no padding).
    """
    if isinstance(data, (list, tuple)) and data and all(isinstance(b, Batch) for b in data):
        return list(data)
    if isinstance(data, str):
        data = [line for line in data.splitlines() if line.strip()]
    if not isinstance(data, (list, tuple)) or not data:
        raise ConfigError(
            "recover needs training data: a text, a list of texts / waveforms, or calibration batches"
        )
    if preprocessor is None:
        raise ConfigError("text or audio training data needs preprocessor= (the tokenizer / processor)")
    is_text = isinstance(data[0], str)
    if is_text and not getattr(model.config, "is_encoder_decoder", False):
        ids = preprocessor("\n".join(data), add_special_tokens=False)["input_ids"]
        n = len(ids) // cfg.seq_len
        if n < 1:
            raise ConfigError(
                f"the training text has {len(ids)} tokens, less than seq_len={cfg.seq_len}; give more text"
            )
        blocks = torch.tensor(ids[: n * cfg.seq_len], dtype=torch.long).reshape(n, cfg.seq_len)
        out = []
        for i in range(0, n, cfg.batch_size):
            x = blocks[i : i + cfg.batch_size]
            out.append(
                Batch(
                    {"input_ids": x, "attention_mask": torch.ones_like(x)},
                    {"default": torch.ones_like(x, dtype=torch.bool)},
                )
            )
        return out
    return make_batches(model, preprocessor, list(data), batch_size=cfg.batch_size, max_length=cfg.seq_len)


def _to(batch: Batch, device) -> Batch:
    mv = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return Batch(
        {k: mv(v) for k, v in batch.inputs.items()}, {k: mv(v) for k, v in (batch.masks or {}).items()}
    )


def _order(n: int, step: int, seed: int) -> int:
    """Index of the batch used at ``step``: a fresh permutation per epoch, reproducible on resume."""
    epoch, i = divmod(step, n)
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return int(torch.randperm(n, generator=g)[i])


# ------------------------------------------------------------------------------ checkpoints


def save_checkpoint(
    path: Path,
    modules: dict[str, TrainableLinear],
    opt: torch.optim.Optimizer,
    step: int,
    cfg: RecoverConfig,
    *,
    write: bool = True,
    world_size: int = 1,
) -> None:
    """Trainable weights, masks and Adam state as safetensors (atomic replace).

    The tensors are whole (FSDP shards are gathered first, so with FSDP every rank calls this
    and only the one with ``write`` writes): the file resumes on any number of processes. The
    data position is the step (the batch order is a function of seed and step).
    """
    from safetensors.torch import save_file

    params = [p for p in _params(modules)]
    if not write and not any(_is_dtensor(p) for p in params):
        return  # nothing to gather: the writing rank holds the same whole tensors
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        for pname, p in m.named_parameters(recurse=False):
            if p.requires_grad:
                tensors[f"param/{name}/{pname}"] = _full(p.detach()).cpu().contiguous()
        if m.mask is not None:
            tensors[f"mask/{name}"] = m.mask.cpu().to(torch.uint8).contiguous()
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt/{i}/{k}"] = _full(v.detach()).cpu().contiguous()
    if not write:
        return
    meta = {
        "step": str(step),
        "modules": json.dumps(sorted(modules)),
        "config": json.dumps(asdict(cfg)),
        "world_size": str(world_size),  # informational: the file resumes on any number of ranks
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_checkpoint(
    path: Path,
    modules: dict[str, TrainableLinear],
    opt: torch.optim.Optimizer,
    cfg: RecoverConfig | None = None,
) -> int:
    """Restore a :func:`save_checkpoint` file; returns the step to continue from.

    Works on any number of processes (each rank reads the whole file and keeps its FSDP shard).
    With ``cfg``, the global batch size and seed must be those the file was written with.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise FormatError(
            f"checkpoint {str(path)!r} is unreadable ({e}); delete it or pass resume=False"
        ) from e
    if json.loads(meta.get("modules", "[]")) != sorted(modules):
        raise ConfigError(
            f"checkpoint {str(path)!r} is of another model or split; delete it or pass resume=False"
        )
    saved = json.loads(meta.get("config", "{}"))
    for key, flag in (("batch_size", "--train-batch-size"), ("seed", "--seed")):
        if cfg is not None and key in saved and saved[key] != getattr(cfg, key):
            raise ConfigError(
                f"checkpoint {str(path)!r} was written with {key}={saved[key]} (the global batch "
                f"order), this run has {getattr(cfg, key)}; pass {flag} {saved[key]}, or --no-resume"
            )
    with torch.no_grad():
        for name, m in modules.items():
            for pname, p in m.named_parameters(recurse=False):
                if p.requires_grad:
                    p.copy_(_place(tensors[f"param/{name}/{pname}"], p))
            if m.mask is not None:
                m.mask.copy_(tensors[f"mask/{name}"].bool().to(m.mask.device))
    for i, p in enumerate(_params(modules)):
        st = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt/{i}/")}
        st = {k: v if k == "step" else _place(v, p) for k, v in st.items()}
        if st:
            if "step" in st:
                st["step"] = st["step"].cpu()  # Adam keeps its step counter on the CPU
            opt.state[p] = st
    return int(meta.get("step", 0))


def _params(modules: dict[str, TrainableLinear]) -> list[nn.Parameter]:
    return [p for m in modules.values() for p in m.parameters(recurse=False) if p.requires_grad]


# ------------------------------------------------------------------------------ training loop


def recover(
    teacher: nn.Module,
    student: nn.Module,
    data,
    config: RecoverConfig | None = None,
    *,
    preprocessor=None,
    plan: dict | None = None,
    device: str | torch.device | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    fsdp: bool = False,
    backend: str | None = None,
    on_step=None,
    **options,
) -> RecoverReport:
    """Fine-tune ``student`` towards ``teacher`` in place; its compressed modules are re-packed at the end.

    ``data``: calibration batches (``CompressResult.batches``), a text, or a list of texts /
    waveforms (then ``preprocessor`` is needed). ``plan`` (``CompressResult.plan``) is needed
    for gradual sparsity, to find the teacher values of pruned weights. ``options`` are :class:`RecoverConfig` fields
    (``steps``, ``lr``, ``squarehead_weight``, ...), used when ``config`` is None.

    Launched by ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1), every rank calls this
    with the same arguments: the process group is joined (:func:`init_processes`, ``backend``
    gloo / nccl), ``config.batch_size`` is the global batch (each rank trains on its rows of
    it), gradients are averaged by DistributedDataParallel, or with ``fsdp=True`` the
    trainable linears are sharded with FSDP2 ``fully_shard``; only rank 0 writes checkpoints
    and shows progress, and every rank returns the same report and the same trained student.
    ``on_step(row)`` is called on every rank after each step (and its checkpoint) with that
    step's losses; an exception it raises stops the run there.
    """
    if config is not None and options:
        raise ConfigError(f"pass either config= or keyword options, not both (got {sorted(options)})")
    cfg = config or RecoverConfig.from_kwargs(**options)
    dev = torch.device(device) if device is not None else next(student.parameters()).device
    procs = init_processes(dev, backend)
    if procs.active and dev.type == "cuda":
        dev = torch.device("cuda", procs.local_rank)  # one GPU per rank
    gradual = cfg.gradual_start_sparsity is not None
    sharded = fsdp and procs.active
    if sharded and gradual:
        raise ConfigError(
            "--fsdp cannot grow masks gradually (it needs whole weights); drop --fsdp (DDP) "
            "or --gradual-start"
        )
    progress = progress and procs.is_main
    teacher.to(dev).eval()
    student.to(dev).eval()  # eval: no dropout; gradients flow all the same
    for p in list(teacher.parameters()) + list(student.parameters()):
        p.requires_grad_(False)
    batches = training_batches(teacher, preprocessor, data, cfg)  # Whisper: the teacher transcribes
    if not _prebuilt(data):  # batches given as they are may have any size: shards may be uneven
        check_global_batch(cfg.batch_size, procs.world_size)
    modules = make_trainable_(student, cfg.train_other_linear)
    student.to(dev)
    if procs.active:
        _check_same_models(procs, teacher, modules, dev)
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(dev.type, (procs.world_size,))
        for m in modules.values():
            fully_shard(m, mesh=mesh)  # each rank keeps 1/world of every weight and its Adam state
    params = _params(modules)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = cfg.warmup

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < warm:
            return cfg.lr * (step + 1) / warm
        t = (step - warm) / max(1, cfg.steps - warm)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    if gradual:
        if plan is None:
            raise ConfigError("gradual sparsity needs plan= (CompressResult.plan) to restore pruned weights")
        init_from_teacher_(student, teacher, plan)
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    start = 0
    if ckpt is not None and resume and ckpt.is_file():
        start = load_checkpoint(ckpt, modules, opt, cfg)
    elif gradual:
        _set_gradual(modules, cfg, 0)
    forward = student
    if procs.active and not sharded:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(
            student, device_ids=[dev.index] if dev.type == "cuda" else None, **_ddp_no_buffer_sync()
        )
    procs.barrier()  # every rank has read the checkpoint before rank 0 may replace it
    history: list[dict] = []
    t0 = time.time()
    bar = tqdm(
        range(start, cfg.steps),
        desc="recover",
        disable=not progress,
        unit="step",
        initial=start,
        total=cfg.steps,
    )
    try:
        for step in bar:
            if gradual and step <= cfg.gradual_end_step and step % cfg.gradual_every == 0 and step > 0:
                _set_gradual(modules, cfg, step)
            batch = batches[_order(len(batches), step, cfg.seed)]
            if procs.active:
                batch, live = shard_batch(batch, procs.rank, procs.world_size)
                losses = compute_losses(
                    student, teacher, _to(batch, dev), cfg, procs=procs, forward=forward, live=live
                )
                # the global values (each rank holds world_size * its share) for the log
                shown = torch.stack([losses[k].detach().float() for k in _KEYS])
                procs.all_reduce_sum(shown)
                shown = dict(zip(_KEYS, (shown / procs.world_size).tolist(), strict=True))
            else:
                losses = compute_losses(student, teacher, _to(batch, dev), cfg)
                shown = None
            loss_value = float(losses["loss"].detach()) if shown is None else shown["loss"]
            if not math.isfinite(loss_value):
                raise ConfigError(f"the loss became {loss_value} at step {step}; lower lr={cfg.lr}")
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.step()
            for m in modules.values():
                m.apply_mask_()
            row = {k: float(v.detach()) for k, v in losses.items()} if shown is None else dict(shown)
            row["step"] = step
            history.append(row)
            bar.set_postfix(
                loss=f"{row['loss']:.4f}", sq=f"{row['squarehead']:.4f}", task=f"{row['task']:.3f}"
            )
            if ckpt is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                save_checkpoint(
                    ckpt, modules, opt, step + 1, cfg, write=procs.is_main, world_size=procs.world_size
                )
            if on_step is not None:
                on_step(dict(row))
    finally:
        bar.close()
    del forward
    if gradual:
        _set_gradual(modules, cfg, cfg.steps)  # the target masks, whatever happened
    n_params = sum(p.numel() for p in params)
    if sharded:
        _unshard_(modules)
    procs.barrier()
    pack_trainable_(student)
    student.eval()
    return RecoverReport(
        cfg.steps,
        start,
        round(time.time() - t0, 1),
        len(modules),
        n_params,
        history,
        None if ckpt is None else str(ckpt),
    )


_KEYS = ("loss", "task", "squarehead", "kd")


def _ddp_no_buffer_sync() -> dict:
    """DDP keyword that stops the buffer (mask) broadcast before every forward.

    Masks change only between steps, identically on every rank. torch 2.13 renamed
    ``broadcast_buffers`` to ``forward_sync_buffers`` (which still syncs once at the start).
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _prebuilt(data) -> bool:
    return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(b, Batch) for b in data)


def _set_gradual(modules: dict[str, TrainableLinear], cfg: RecoverConfig, step: int) -> None:
    for m in modules.values():
        if m.target_mask is not None:
            m.set_sparsity_(cfg.sparsity_at(step, m.target_sparsity))


def init_from_teacher_(student: nn.Module, teacher: nn.Module, plan: dict) -> int:
    """Gradual pruning: give the pruned light weights their teacher values so they can come back.

    ``plan`` maps each FFN name to its heavy neuron indices (``CompressResult.plan``). Only
    entries outside the target mask change; returns the number of modules updated.
    """
    from .adapters import find_ffns

    count = 0
    for spec in find_ffns(teacher):
        if spec.name not in plan:
            continue
        w_down, _ = linear_weight(get_module(teacher, spec.down))
        f = w_down.shape[1]
        heavy = torch.zeros(f, dtype=torch.bool)
        heavy[torch.as_tensor(np.asarray(plan[spec.name], dtype=np.int64))] = True
        lidx = torch.nonzero(~heavy).flatten()
        for path in (spec.gate, spec.up, spec.down):
            if path is None:
                continue
            light = getattr(get_module(student, path), "light", None)
            if not isinstance(light, TrainableLinear) or light.target_mask is None:
                continue
            w, _ = linear_weight(get_module(teacher, path))
            wl = (w[:, lidx] if path == spec.down else w[lidx]).to(light.weight.device)
            with torch.no_grad():
                light.weight.copy_(torch.where(light.target_mask, light.weight, wl))
                light.mask.fill_(True)
            count += 1
    return count
