"""The split: every FFN becomes a dense heavy part and a compressed light part.

The intermediate neurons of an FFN are reordered heavy-first. Up and gate projections
become :class:`SplitLinear` in ``"out"`` mode (``cat(heavy(x), light(x))``), the down
projection in ``"in"`` mode (``heavy(a[..., :h]) + light(a[..., h:]) + bias``); the model's
own code still applies the activation and the gate product in between, so every
architecture is split the same way. With the ``dense`` light format the split model
reproduces the original up to float32 summation order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import FFNSpec, find_ffns
from .errors import ConfigError
from .formats import (
    EmbeddingFormat,
    HeavyFormat,
    LightFormat,
    OtherLinearFormat,
    PruneMethod,
    get_format,
    pruning,
)
from .formats.lowrank import lowrank_rank  # noqa: F401 - re-exported (plan, callers)
from .formats.names import Int4Grid, Quantizer
from .formats.packing import EXPORT_INT4_GROUP_SIZES
from .linear import CompressedLinear

INT4_GROUP_SIZES = EXPORT_INT4_GROUP_SIZES


@dataclass
class SplitConfig:
    """How the light and heavy parts are compressed (the CLI options of DESIGN.md)."""

    light_format: LightFormat | str = LightFormat.SPARSE_INT8
    light_sparsity: float = 0.5
    prune_method: PruneMethod | str = PruneMethod.WANDA
    heavy_format: HeavyFormat | str = HeavyFormat.FP32
    group_size: int = 128  # int4 group size (light int4 and --other-linear int4)
    quantizer: Quantizer | str = Quantizer.RTN  # how int codes are chosen: round-to-nearest or GPTQ
    int4_grid: Int4Grid | str = Int4Grid.SYMMETRIC  # int4 MatMulNBits: symmetric or with zero points
    # the OBS pass (GPTQ, and SparseGPT's damping and block size): relative damping of diag(H),
    # columns per lazy block, GPTQ's activation order (static groups; the layout does not change)
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = True
    # pruned light formats with calibration Hessians: the heavy down columns absorb the light down's
    # compression error (compensate_heavy; SmolLM2 joint SparseGPT + GPTQ, 30 % int8 heavy: 75 %
    # light sparsity x3.771 -> x3.654 of dense, 50 % x1.464 -> x1.462)
    heavy_compensation: bool = True

    def __post_init__(self):
        self.quantizer = Quantizer.parse(self.quantizer, "--quantizer")
        self.int4_grid = Int4Grid.parse(self.int4_grid, "--int4-grid")
        if not (isinstance(self.gptq_damp, (int, float)) and 0.0 <= self.gptq_damp < 1.0):
            raise ConfigError(f"gptq_damp={self.gptq_damp!r} is out of range; use 0 <= damp < 1 (e.g. 0.01)")
        if not isinstance(self.heavy_compensation, bool):
            raise ConfigError(f"heavy_compensation={self.heavy_compensation!r}; use True or False")
        if not isinstance(self.gptq_block_size, int) or self.gptq_block_size < 1:
            raise ConfigError(f"gptq_block_size={self.gptq_block_size!r}; use a whole number >= 1 (e.g. 128)")
        self.light_format = LightFormat.parse(self.light_format, "--light-format")
        self.heavy_format = HeavyFormat.parse(self.heavy_format, "--heavy-format")
        self.prune_method = PruneMethod.parse(self.prune_method, "--prune-method")
        self.light_sparsity = pruning.check_fraction(self.light_sparsity, "--light-sparsity")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ConfigError(
                f"--group-size={self.group_size} is not supported; use one of {INT4_GROUP_SIZES}"
            )

    def to_dict(self) -> dict:
        return {k: str(v) if not isinstance(v, (int, float)) else v for k, v in asdict(self).items()}


# ------------------------------------------------------------------------------ weights


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W[N, K], bias)`` in float32 of nn.Linear, transformers' Conv1D or a compressed linear."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().float(), None if module.bias is None else module.bias.detach().float()
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: y = x @ W + b
        return module.weight.detach().float().t(), module.bias.detach().float()
    if isinstance(module, CompressedLinear):
        return module.dense_weight(), None if module.bias is None else module.bias.detach()
    raise ConfigError(f"{type(module).__name__} is not a linear layer this package can split")


# ------------------------------------------------------------------------------ modules


class SplitLinear(nn.Module):
    """One projection of a split FFN (see the module docstring for the two modes)."""

    def __init__(self, mode: str, heavy: nn.Module | None, light: nn.Module | None, n_heavy: int, bias=None):
        super().__init__()
        if mode not in ("out", "in"):
            raise ConfigError(f"SplitLinear mode {mode!r}; use 'out' or 'in'")
        self.mode, self.n_heavy = mode, int(n_heavy)
        self.heavy, self.light = heavy, light
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """An empty float32 tensor for models that probe ``.weight.dtype`` (T5)."""
        return torch.empty(0, dtype=torch.float32)

    def parts(self) -> list[nn.Module]:
        return [p for p in (self.heavy, self.light) if p is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "out":
            outs = [p(x) for p in self.parts()]
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.heavy is not None and self.light is not None:
            y = self.heavy(x[..., : self.n_heavy]) + self.light(x[..., self.n_heavy :])
        else:
            y = self.parts()[0](x)
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> int:
        n = sum(p.format.nbytes(p) + (0 if p.bias is None else p.bias.numel() * 4) for p in self.parts())
        return n + (0 if self.bias is None else self.bias.numel() * 4)


@dataclass
class FFNSplitInfo:
    """What happened to one FFN (recorded in ffsplit.json)."""

    name: str
    n_neurons: int
    n_heavy: int
    heavy_format: str
    light_format: str
    light_sparsity: float
    dense_bytes: int
    bytes: int
    heavy_neurons: list[int] = field(default_factory=list, repr=False)


@dataclass
class SplitReport:
    ffns: list[FFNSplitInfo]
    config: dict

    @property
    def dense_bytes(self) -> int:
        return sum(f.dense_bytes for f in self.ffns)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.ffns)

    def to_dict(self, with_neurons: bool = False) -> dict:
        rows = []
        for f in self.ffns:
            d = asdict(f)
            if not with_neurons:
                d.pop("heavy_neurons")
            rows.append(d)
        return {
            "config": self.config,
            "ffn_dense_bytes": self.dense_bytes,
            "ffn_bytes": self.bytes,
            "ffn_size_ratio": self.bytes / self.dense_bytes if self.dense_bytes else 1.0,
            "ffns": rows,
        }


def make_light(w: torch.Tensor, bias, cfg: SplitConfig, x_norm=None, hessian=None) -> CompressedLinear:
    """Compress one light weight ``w[N, K]`` in ``cfg.light_format`` (looked up in the registry)."""
    return get_format(cfg.light_format).compress(w, bias, x_norm=x_norm, hessian=hessian, config=cfg)


def make_heavy(w: torch.Tensor, bias, fmt: HeavyFormat, cfg: SplitConfig | None = None, hessian=None):
    """Compress one heavy weight (``cfg`` and the input ``hessian`` matter to quantized formats under GPTQ)."""
    return get_format(HeavyFormat.parse(fmt, "--heavy-format")).compress(w, bias, hessian=hessian, config=cfg)


def _dense_nbytes(*weights_and_biases) -> int:
    return sum(t.numel() * 4 for t in weights_and_biases if t is not None)


def split_ffn_(
    model: nn.Module,
    heavy: dict[str, np.ndarray],
    config: SplitConfig | None = None,
    stats: dict | None = None,
    specs: list[FFNSpec] | None = None,
    progress: bool = True,
    layer_configs: dict[str, SplitConfig] | None = None,
) -> SplitReport:
    """Split every FFN of ``model`` in place.

    ``heavy`` maps each FFN name to the indices of its heavy neurons (from :mod:`plan`);
    ``stats`` (from :func:`ffsplit_export.calibrate.calibrate`) feeds Wanda and SparseGPT;
    ``layer_configs`` (FFN name -> config, from the measured planner) overrides ``config`` per FFN.
    """
    cfg = config or SplitConfig()
    specs = specs if specs is not None else find_ffns(model)
    infos = []
    for spec in tqdm(specs, desc="split+compress", disable=not progress, unit="ffn"):
        if spec.name not in heavy:
            raise ConfigError(
                f"the plan has no heavy set for FFN {spec.name!r}; re-run the planner on this model"
            )
        st = (stats or {}).get(spec.name)
        lcfg = (layer_configs or {}).get(spec.name, cfg)
        infos.append(_split_one(model, spec, np.asarray(heavy[spec.name], dtype=np.int64), lcfg, st))
    return SplitReport(infos, cfg.to_dict())


def split_modules(
    model, spec: FFNSpec, heavy_idx: np.ndarray, cfg: SplitConfig, st
) -> tuple[dict[str, SplitLinear], int]:
    """The split projections of one FFN (path -> :class:`SplitLinear`; the model is not changed)
    and the FFN's dense fp32 bytes. The planner measures candidates with it."""
    w_down, b_down = linear_weight(get_module(model, spec.down))
    n_neurons = w_down.shape[1]
    if heavy_idx.size and (
        heavy_idx.min() < 0 or heavy_idx.max() >= n_neurons or np.unique(heavy_idx).size != heavy_idx.size
    ):
        raise ConfigError(f"heavy neuron indices of {spec.name} must be unique and in [0, {n_neurons})")
    hidx = torch.from_numpy(np.sort(heavy_idx))
    is_light = torch.ones(n_neurons, dtype=torch.bool)
    is_light[hidx] = False
    lidx = torch.nonzero(is_light).flatten()
    nh, nl = hidx.numel(), lidx.numel()
    dense = _dense_nbytes(w_down, b_down)
    x_norm = None if st is None else st.x_norm
    a_norm = None if st is None else st.act_norm
    out: dict[str, SplitLinear] = {}

    for path in (spec.gate, spec.up):
        if path is None:
            continue
        w, b = linear_weight(get_module(model, path))
        if w.shape[0] != n_neurons:
            raise ConfigError(f"{path} has {w.shape[0]} outputs but {spec.down} has {n_neurons} inputs")
        dense += _dense_nbytes(w, b)
        pick = lambda t, i: None if t is None else t[i]  # noqa: E731
        h_x = None if st is None else st.hessian_x
        hv = make_heavy(w[hidx], pick(b, hidx), cfg.heavy_format, cfg, h_x) if nh else None
        lt = make_light(w[lidx], pick(b, lidx), cfg, x_norm, h_x) if nl else None
        out[path] = SplitLinear("out", hv, lt, nh)

    h_full = None if st is None else st.hessian_act
    h_h = None if h_full is None or not nh else h_full[hidx][:, hidx]
    lt = None
    if nl:
        h_a = None if h_full is None else h_full[lidx][:, lidx]
        lt = make_light(w_down[:, lidx], None, cfg, None if a_norm is None else a_norm[lidx], h_a)
    w_heavy = w_down[:, hidx]
    if nh and lt is not None and h_h is not None and cfg.heavy_compensation and lt.format.pruned:
        w_heavy = compensate_heavy(w_down, lt.dense_weight(), hidx, lidx, h_full, cfg.gptq_damp)
    hv = make_heavy(w_heavy, None, cfg.heavy_format, cfg, h_h) if nh else None
    out[spec.down] = SplitLinear("in", hv, lt, nh, b_down)
    return out, int(dense)


def compensate_heavy(w_down, light_dense, hidx, lidx, hessian, damp: float) -> torch.Tensor:
    """The heavy columns of a down projection updated to absorb the light part's compression error.

    With activations ``a = [a_H, a_L]`` and ``H = E[a a^T]`` (the calibration Hessian of the down's
    input), the light error ``E = W_L - W_L'`` leaves ``E a_L`` in the output; the heavy columns
    ``W_H + D`` with ``D = E H_LH H_HH^-1`` minimise ``E||D a_H - E a_L||^2`` (the OBS update of
    the heavy columns when the light ones are compressed first: least squares on the calibration
    activations, H_HH damped by ``damp`` x its mean diagonal as GPTQ does).
    """
    h = hessian.double()
    h_hh = h[hidx][:, hidx].clone()
    h_hh += torch.eye(h_hh.shape[0], dtype=h.dtype) * (damp * float(torch.mean(torch.diag(h_hh))) + 1e-12)
    h_lh = h[lidx][:, hidx]
    err = w_down[:, lidx].double() - light_dense.double()
    delta = torch.linalg.solve(h_hh, (err @ h_lh).T).T  # H_HH symmetric
    return (w_down[:, hidx].double() + delta).to(w_down.dtype)


def _split_one(model, spec: FFNSpec, heavy_idx: np.ndarray, cfg: SplitConfig, st) -> FFNSplitInfo:
    n_neurons = linear_weight(get_module(model, spec.down))[0].shape[1]
    parts, dense = split_modules(model, spec, heavy_idx, cfg, st)
    for path, m in parts.items():
        set_module(model, path, m)
    hidx = torch.from_numpy(np.sort(heavy_idx))
    nh = hidx.numel()

    nbytes = sum(get_module(model, p).nbytes() for p in spec.projections)
    lights = [get_module(model, p).light for p in spec.projections]
    sparsities = [
        s for m in lights if m is not None for s in [m.format.measured_sparsity(m)] if s is not None
    ]
    light_sp = float(np.mean(sparsities)) if sparsities else 0.0
    return FFNSplitInfo(
        name=spec.name,
        n_neurons=n_neurons,
        n_heavy=nh,
        heavy_format=str(cfg.heavy_format),
        light_format=str(cfg.light_format),
        light_sparsity=round(light_sp, 4),
        dense_bytes=int(dense),
        bytes=int(nbytes),
        heavy_neurons=hidx.tolist(),
    )


# ------------------------------------------------------------------------------ other linears


def other_linear_names(model: nn.Module, specs: list[FFNSpec] | None = None) -> list[str]:
    """The linear layers outside the FFNs (attention, lm_head), in registration order."""
    specs = specs if specs is not None else find_ffns(model)
    skip = {p for s in specs for p in s.projections}
    return [
        name
        for name, m in model.named_modules()
        if name
        and name not in skip
        and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
        and not any(name.startswith(p + ".") for p in skip)
    ]


def quantize_other_linears_(
    model: nn.Module,
    fmt: OtherLinearFormat | str,
    group_size: int = 128,
    specs: list[FFNSpec] | None = None,
    *,
    config: SplitConfig | None = None,
    hessians: dict | None = None,
    names: list[str] | None = None,
    lm_head: OtherLinearFormat | str | None = None,
) -> dict:
    """Weight-quantize every linear layer outside the FFNs (attention, lm_head) as MatMulNBits.

    With ``config.quantizer`` gptq, ``hessians`` maps each layer name to its input Hessian
    (:func:`ffsplit_export.calibrate.linear_hessians`); ``names`` limits the pass to those layers.
    ``lm_head`` (``--lm-head``): the output projection's own format (None: ``fmt`` like the rest).
    """
    fmt = OtherLinearFormat.parse(fmt, "--other-linear")
    head_fmt = fmt if lm_head is None else OtherLinearFormat.parse(lm_head, "--lm-head")
    head = lm_head_name(model)
    fmts = {fmt: get_format(fmt), head_fmt: get_format(head_fmt)}
    targets = names if names is not None else other_linear_names(model, specs)
    targets = [n for n in targets if not fmts[head_fmt if n == head else fmt].keeps_original]
    out = {"format": str(fmt), "layers": 0, "dense_bytes": 0, "bytes": 0}
    if head_fmt is not fmt:
        out["lm_head"] = str(head_fmt)
    if not targets:
        return out
    cfg = _GroupSize(group_size) if config is None else replace(config, group_size=group_size)
    tied = _input_embedding_weight(model)
    dense = packed = 0
    for name in targets:
        qf = fmts[head_fmt if name == head else fmt]
        w, b = linear_weight(get_module(model, name))
        q = qf.compress(w, b, hessian=(hessians or {}).get(name), config=cfg)
        if tied is not None and getattr(get_module(model, name), "weight", None) is tied:
            q.tied_input_embedding = True  # the lm_head tied to the embedding: int4 can share its table
        dense += _dense_nbytes(w, b)
        packed += qf.nbytes(q) + (0 if b is None else b.numel() * 4)
        set_module(model, name, q)
    return {**out, "layers": len(targets), "dense_bytes": dense, "bytes": packed}


def lm_head_name(model: nn.Module) -> str | None:
    """The module path of the model's output projection (``get_output_embeddings``), if it has one."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head and n), None)


def _input_embedding_weight(model: nn.Module):
    """The input embedding's weight Parameter (None where the model has no nn.Embedding input)."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return emb.weight if isinstance(emb, nn.Embedding) else None


def _tied_int4_lm_head(model: nn.Module, emb: nn.Embedding) -> tuple[nn.Module, str, str] | None:
    """(owner, attribute, path) of the int4 MatMulNBits layer that was quantized from the weight
    tied to ``emb`` (``quantize_other_linears_`` marks it), if an embedding can gather from it."""
    from .formats.embedding import shareable_lm_head

    for path, m in model.named_modules():
        if getattr(m, "tied_input_embedding", False) and shareable_lm_head(
            m, emb.num_embeddings, emb.embedding_dim
        ):
            parent, _, attr = path.rpartition(".")
            return (model.get_submodule(parent) if parent else model), attr, path
    return None


def quantize_embeddings_(model: nn.Module, fmt: EmbeddingFormat | str, group_size: int | None = None) -> dict:
    """Store the token embedding table in block-wise int8 or int4 (``com.microsoft::GatherBlockQuantized``).

    Every name under which the table is reachable (T5's ``shared`` / ``encoder.embed_tokens`` /
    ``decoder.embed_tokens``) gets the same quantized module. ``int4``: when ``quantize_other_linears_``
    has already quantized an lm_head tied to this table as int4 with a block size that divides the
    width, the embedding gathers from that lm_head's codes and scales (one table in the file:
    ``shared_with`` in the summary, 0 bytes of its own); otherwise a standalone int4 table with block
    ``group_size`` (default 32) or the largest smaller power of two that divides the width. A tied
    lm_head kept in float32 keeps its own weight.
    """
    from .formats.embedding import SharedInt4Embedding, TiedInt4Head

    fmt = EmbeddingFormat.parse(fmt, "--embedding")
    qf = get_format(fmt)
    if qf.keeps_original:
        return {"format": str(fmt), "tables": 0, "dense_bytes": 0, "bytes": 0}
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise ConfigError(
            f"--embedding {fmt}: the input embedding of {type(model).__name__} is a {type(emb).__name__}, "
            "not an nn.Embedding; use --embedding fp32"
        )
    shared = _tied_int4_lm_head(model, emb) if fmt is EmbeddingFormat.INT4 else None
    extra: dict = {}
    if shared is not None:
        owner, attr, path = shared
        setattr(owner, attr, TiedInt4Head(getattr(owner, attr)))  # same buffers, scales [V, D/B, 1]
        q = SharedInt4Embedding(owner, attr, padding_idx=emb.padding_idx)
        extra = {"shared_with": path}
    else:
        cfg = None if group_size is None else _GroupSize(group_size)
        q = qf.compress(emb.weight, config=cfg, padding_idx=emb.padding_idx)
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is emb]
    for name in names:
        set_module(model, name, q)
    return {
        "format": str(fmt),
        "tables": 1,
        "names": names,
        "block_size": q.block_size,
        "dense_bytes": _dense_nbytes(emb.weight),
        "bytes": qf.nbytes(q),
        **extra,
    }


@dataclass(frozen=True)
class _GroupSize:
    """The part of :class:`SplitConfig` the other-linear formats read."""

    group_size: int
    quantizer: str = "rtn"
