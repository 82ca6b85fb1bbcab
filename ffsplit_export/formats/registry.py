"""The format registry: one registered class per weight format, keyed by its stable name.

A format owns everything that differs between formats: how a float32 weight is compressed
(:meth:`WeightFormat.compress`), its size model for the planner (:meth:`bytes_per_weight`,
:meth:`row_overhead`) and its exact byte count (:meth:`nbytes`), the targets it supports and
its ONNX emission per target (:meth:`emit`), its PyTorch reference forward, and its
trainable form for ``recover`` (mask and fake quantization). ``split``, ``plan``, export's
target check, ``linear`` and ``recover`` look formats up here instead of branching on names.

Formats are registered with :func:`register_format`, keyed by a member of one of the string
enums of :mod:`.names` (the enum's class says the role: light, heavy, other-linear,
embedding). A new format (say ``sparse-int4``) is:

* its stable name in :mod:`.names` (one enum member);
* one new module here holding its packed ``CompressedLinear`` and its registered class,
  added to :data:`BUILTIN_MODULES`;
* one entry in ``tests/test_format_registry.py`` (that test fails until it exists);
* only if it needs a new kernel: the op's schema and NumPy reference in :mod:`ffsplit_export.ops`,
  the C++ kernel in ``plugins/onnxruntime`` and, for ``tensorrt``, the Triton plugin in
  :mod:`ffsplit_export.trt` (or leave ``tensorrt`` out of its ``targets``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigError, FormatError
from .names import EmbeddingFormat, HeavyFormat, LightFormat, OtherLinearFormat, Target, _NamedEnum

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: role -> (enum of its stable names, CLI option)
ROLES: dict[str, tuple[type[_NamedEnum], str]] = {
    "light": (LightFormat, "--light-format"),
    "heavy": (HeavyFormat, "--heavy-format"),
    "other-linear": (OtherLinearFormat, "--other-linear"),
    "embedding": (EmbeddingFormat, "--embedding"),
}


def dense_matmul(g, x, w):
    """``MatMul(x, W.T)`` with the float32 weight (a torch tensor) as a constant."""
    wt = g.op("Constant", value_t=w.detach().t().contiguous().float())
    return g.op("MatMul", x, wt)


#: the modules that register the built-in formats (imported on first lookup)
BUILTIN_MODULES = ("dense", "sparse", "sparse_int4", "nm24", "nbits", "lowrank", "embedding")

ALL_TARGETS = frozenset(Target)

_REGISTRY: dict[tuple[str, str], WeightFormat] = {}
_loaded = False


class WeightFormat:
    """Base class of a registered format (one stateless instance per registered class).

    Subclasses set :attr:`targets` (and :attr:`target_need`, what the other targets lack),
    and override :meth:`compress`, :meth:`bytes_per_weight` and, where the default dense
    product does not fit, the ``emit_*`` methods and the trainable hooks.
    """

    role: ClassVar[str] = ""
    name: ClassVar[str] = ""
    key: ClassVar[_NamedEnum]
    targets: ClassVar[frozenset[Target]] = ALL_TARGETS
    target_need: ClassVar[str] = ""  # e.g. "ONNX Runtime's MatMulNBits" (for the target error)
    pruned: ClassVar[bool] = False  # unstructured or N:M sparse (needs pruning statistics)
    structured: ClassVar[bool] = False  # N:M structured sparsity
    keeps_original: ClassVar[bool] = False  # the layer stays as it is (fp32 other linears / embedding)
    gptq: ClassVar[bool] = False  # integer codes that --quantizer gptq chooses (compress reads the Hessian)

    # singletons: copying a model (deepcopy) keeps the registered instance
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (get_format, (self.name, self.role))

    def __repr__(self) -> str:
        return f"<{self.role} format {self.name!r}>"

    # -- compression ------------------------------------------------------------------
    def compress(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        x_norm: torch.Tensor | None = None,
        hessian: torch.Tensor | None = None,
        config: Any = None,
    ):
        """The packed module of ``weight[N, K]`` (float32), given calibration statistics.

        ``x_norm`` is the L2 norm of each input channel over the calibration tokens (Wanda),
        ``hessian`` the input Hessian (SparseGPT); ``config`` a :class:`~ffsplit_export.split.SplitConfig`.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    # -- size -------------------------------------------------------------------------
    def bytes_per_weight(self, config: Any = None) -> float:
        """Packed bytes per weight for the planner (per-row terms in :meth:`row_overhead`)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def row_overhead(self, config: Any = None) -> float:  # noqa: ARG002
        """Packed bytes per output row that do not scale with K (row pointers, scales)."""
        return 0.0

    def nbytes(self, module) -> int:
        """Exact packed bytes of a module of this format (bias not included)."""
        return module.packed_nbytes()

    def unpack(self, module) -> dict:
        """The logical content of the packed buffers (NumPy arrays; pure, the module is not changed)."""
        return {n: getattr(module, n).detach().cpu().numpy().copy() for n in module.packed_names}

    def pack_arrays(self, module, arrays: dict) -> dict:  # noqa: ARG002
        """Inverse of :meth:`unpack`: the packed buffers (name -> NumPy array) of ``module``'s layout."""
        return dict(arrays)

    def measured_sparsity(self, module) -> float | None:  # noqa: ARG002
        """Fraction of weights not stored, for the split report (None: not a sparse format)."""
        return None

    # -- targets and ONNX -------------------------------------------------------------
    def supports(self, target: Target | str) -> bool:
        return Target.parse(target, "--target") in self.targets

    def emit(self, g, x, module, buffers: tuple, target: Target):
        """The ONNX value of ``x @ W.T`` for ``target`` (called from the module's symbolic)."""
        table: dict[Target, Callable] = {
            Target.ORT_CPU: self.emit_ort_cpu,
            Target.PORTABLE: self.emit_portable,
            Target.TENSORRT: self.emit_tensorrt,
        }
        return table[target](g, x, module, buffers)

    def emit_ort_cpu(self, g, x, module, buffers):  # noqa: ARG002
        return dense_matmul(g, x, module.dense_weight())

    def emit_portable(self, g, x, module, buffers):
        return self.emit_ort_cpu(g, x, module, buffers)

    def emit_tensorrt(self, g, x, module, buffers):
        return self.emit_ort_cpu(g, x, module, buffers)

    # -- PyTorch reference -------------------------------------------------------------
    def reference_forward(self, module, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T (+ b)`` with W decoded exactly as the exported kernel decodes it."""
        return module(x)

    # -- trainable form (recover) ------------------------------------------------------
    def trainable_state(self, module) -> dict:
        """What :class:`~ffsplit_export.recover.TrainableLinear` trains for ``module``.

        Keys: ``params`` (name -> float32 tensor to train; default ``weight``), ``mask``
        (bool [N, K] of stored positions, or None), ``target_mask`` (the final mask for
        gradual sparsity, or None), ``target_sparsity``, ``group_size``.
        """
        return {
            "params": {"weight": module.dense_weight().detach().clone().float()},
            "mask": None,
            "target_mask": None,
            "target_sparsity": 0.0,
            "group_size": 128,
        }

    def fake_quantize(self, w: torch.Tensor, trainable) -> torch.Tensor:  # noqa: ARG002
        """The weight after the format's rounding (no gradient trick; the caller adds the STE)."""
        return w

    #: whether :meth:`fake_quantize` changes anything (no straight-through estimator otherwise)
    quantizes: ClassVar[bool] = False

    def trainable_weight(self, trainable) -> torch.Tensor:
        """The effective weight of a trainable module: mask, then the format's rounding (STE)."""
        w = trainable.weight if trainable.mask is None else trainable.weight * trainable.mask
        if not self.quantizes:
            return w
        return w + (self.fake_quantize(w, trainable) - w).detach()

    def trainable_forward(self, trainable, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.linear(x, self.trainable_weight(trainable).to(x.dtype))

    def pack_trained(self, trainable):
        """The packed module of this format holding the trained weight."""
        w = trainable.weight if trainable.mask is None else trainable.weight * trainable.mask
        w = w.detach().float().cpu()
        mask = None if trainable.mask is None else trainable.mask.cpu()
        return self.pack_weight(w, mask, trainable.bias, trainable.group_size)

    def pack_weight(self, w, mask, bias, group_size: int):  # noqa: ARG002
        raise NotImplementedError  # pragma: no cover - abstract


def role_of(name: Any) -> str | None:
    """The role of an enum member of :mod:`.names` (None for a plain string)."""
    for role, (enum, _) in ROLES.items():
        if type(name) is enum:
            return role
    return None


def register_format(name: _NamedEnum) -> Callable[[type[WeightFormat]], type[WeightFormat]]:
    """Class decorator: register one instance of the class under ``name`` (a :mod:`.names` member)."""
    role = role_of(name)
    if role is None:
        raise FormatError(
            f"register_format needs a member of {', '.join(e.__name__ for e, _ in ROLES.values())}, "
            f"got {name!r}; add the stable name to formats/names.py first"
        )

    def deco(cls: type[WeightFormat]) -> type[WeightFormat]:
        key = (role, name.value)
        if key in _REGISTRY:
            raise FormatError(f"{role} format {name.value!r} is already registered by {_REGISTRY[key]!r}")
        cls.role, cls.name, cls.key = role, name.value, name
        _REGISTRY[key] = cls()
        return cls

    return deco


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{mod}")


def get_format(name: Any, role: str | None = None) -> WeightFormat:
    """The registered format for ``name`` (an enum member of :mod:`.names`, or a string with ``role``).

    ``role`` is one of ``light`` (default for plain strings), ``heavy``, ``other-linear``,
    ``embedding``; an unknown name raises ConfigError listing the registered ones.
    """
    if isinstance(name, WeightFormat):
        return name
    _load_builtins()
    role = role or role_of(name) or "light"
    if role not in ROLES:
        raise ConfigError(f"format role {role!r} is unknown; use one of {sorted(ROLES)}")
    value = name.value if isinstance(name, _NamedEnum) else str(name)
    try:
        return _REGISTRY[(role, value)]
    except KeyError:
        option = ROLES[role][1]
        names = ", ".join(f.name for f in registered_formats(role))
        raise ConfigError(f"{option}={value!r} is not a registered format; use one of: {names}") from None


def registered_formats(role: str | None = None) -> list[WeightFormat]:
    """Every registered format (of ``role``): light, heavy, other-linear, embedding, each in enum order."""
    _load_builtins()
    order = list(ROLES)
    fmts = [f for (r, _), f in _REGISTRY.items() if role is None or r == role]
    return sorted(fmts, key=lambda f: (order.index(f.role), list(type(f.key)).index(f.key)))


_TARGET_TEXT = {
    Target.ORT_CPU: "ONNX Runtime's CPU provider",
    Target.PORTABLE: "stock ONNX Runtime",
    Target.TENSORRT: "TensorRT",
}


def check_target(target: Target | str, chosen: list[tuple[str, Any]]) -> None:
    """Raise ConfigError if a chosen ``(role, name)`` format cannot be exported for ``target``.

    The message names every offending option, what the target lacks, the registered
    formats of those roles that the target supports, and the targets that carry them all.
    """
    target = Target.parse(target, "--target")
    bad = [get_format(n, r) for r, n in chosen]
    bad = [f for f in bad if not f.supports(target)]
    if not bad:
        return
    need = bad[0].target_need or "an op"
    group = [f for f in bad if (f.target_need or "an op") == need]
    opts = ", ".join(f"{ROLES[f.role][1]} {f.name}" for f in group)
    roles = list(dict.fromkeys(f.role for f in group))
    alts = " and ".join(
        f"{ROLES[r][1]} " + " / ".join(f.name for f in registered_formats(r) if f.supports(target))
        for r in roles
    )
    others = " / ".join(str(t) for t in Target if t is not target and all(f.supports(t) for f in group))
    raise ConfigError(
        f"{opts} needs {need}, which {_TARGET_TEXT[target]} does not have; with --target {target} use "
        f"{alts}, or export with --target {others}"
    )
