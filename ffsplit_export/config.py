"""The typed, versioned compression config: every setting of a split, in one frozen object.

``export``, ``recover``, ``eval`` and the Python API all start from a :class:`CompressionConfig`;
:meth:`CompressionConfig.split_config` builds the internal :class:`~ffsplit_export.split.SplitConfig`
and :meth:`CompressionConfig.compress_kwargs` the keyword arguments of
:func:`ffsplit_export.pipeline.compress`, so each setting is defined here once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from .errors import CalibrationError, ConfigError
from .formats import EmbeddingFormat, HeavyFormat, LightFormat, OtherLinearFormat, PruneMethod, pruning
from .formats.names import Int4Grid, Quantizer
from .formats.packing import EXPORT_INT4_GROUP_SIZES
from .presets import DEFAULT_PRESET, NO_PRESET, resolve_preset


@dataclass(frozen=True)
class CompressionConfig:
    """How a model is split and compressed (the ``export`` options of DESIGN.md)."""

    VERSION = 1  # bump when a field changes meaning; from_dict refuses other versions

    light_format: str = "sparse-int8"
    light_sparsity: float = 0.5
    prune_method: str = "wanda"
    heavy_format: str = "fp32"
    heavy_fraction: float | None = None  # None: 0.1, unless size_budget is set
    size_budget: float | None = None
    selection: str = "score"
    sequential: bool = False
    group_size: int = 128
    quantizer: str = "rtn"
    int4_grid: str = "symmetric"  # int4 MatMulNBits grid: symmetric, asymmetric, asymmetric-mse
    gptq_damp: float = 0.01  # GPTQ / SparseGPT relative damping of diag(H)
    other_linear: str = "fp32"
    embedding: str = "fp32"
    lm_head: str | None = None  # the output projection's format; None: other_linear's
    calibration: str | None = None
    num_samples: int = 64
    batch_size: int = 8
    max_length: int = 128
    seed: int = 0
    planner: str = "measured"  # with size_budget: measured (plan_measured) or proxy (plan_budget)
    planner_formats: str | None = None  # comma list of light formats the measured planner may pick
    preset: str | None = None  # the named recipe these fields came from (ffsplit_export.presets), if any

    def __post_init__(self):
        norm = object.__setattr__
        norm(self, "light_format", str(LightFormat.parse(self.light_format, "--light-format")))
        norm(self, "heavy_format", str(HeavyFormat.parse(self.heavy_format, "--heavy-format")))
        norm(self, "prune_method", str(PruneMethod.parse(self.prune_method, "--prune-method")))
        norm(self, "embedding", str(EmbeddingFormat.parse(self.embedding, "--embedding")))
        norm(self, "quantizer", str(Quantizer.parse(self.quantizer, "--quantizer")))
        norm(self, "int4_grid", str(Int4Grid.parse(self.int4_grid, "--int4-grid")))
        pruning.check_fraction(self.light_sparsity, "--light-sparsity")
        d = self.gptq_damp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ConfigError(f"--gptq-damp={d!r} is out of range; use 0 <= damp < 1 (e.g. 0.01)")
        norm(self, "other_linear", str(OtherLinearFormat.parse(self.other_linear, "--other-linear")))
        if self.lm_head is not None:
            norm(self, "lm_head", str(OtherLinearFormat.parse(self.lm_head, "--lm-head")))
        if self.group_size not in EXPORT_INT4_GROUP_SIZES:
            raise ConfigError(
                f"--group-size={self.group_size} is not supported; use one of {EXPORT_INT4_GROUP_SIZES}"
            )
        if self.size_budget is not None and self.heavy_fraction is not None:
            raise ConfigError("--size-budget and --heavy-fraction are alternatives; pass only one of them")
        if self.heavy_fraction is not None:
            pruning.check_fraction(self.heavy_fraction, "--heavy-fraction")
        if self.planner not in ("measured", "proxy"):
            raise ConfigError(f"--planner {self.planner!r} is unknown; use measured or proxy")
        if self.planner_formats is not None:
            names = [f.strip() for f in str(self.planner_formats).split(",") if f.strip()]
            if not names:
                raise ConfigError("--planner-formats is empty; name light formats, e.g. sparse-int8,int4")
            norm(
                self,
                "planner_formats",
                ",".join(str(LightFormat.parse(f, "--planner-formats")) for f in names),
            )
        if self.size_budget is not None:
            pruning.check_fraction(self.size_budget, "--size-budget")
        for name in ("num_samples", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CalibrationError(f"--{name.replace('_', '-')}={value!r}; use a whole number >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed={self.seed!r}; use a whole number >= 0")

    def split_config(self):
        """The internal per-FFN :class:`~ffsplit_export.split.SplitConfig` (built only here)."""
        from .split import SplitConfig

        return SplitConfig(
            light_format=self.light_format,
            light_sparsity=self.light_sparsity,
            prune_method=self.prune_method,
            heavy_format=self.heavy_format,
            group_size=self.group_size,
            quantizer=self.quantizer,
            int4_grid=self.int4_grid,
            gptq_damp=float(self.gptq_damp),
        )

    def compress_kwargs(self) -> dict:
        """Keyword arguments of :func:`ffsplit_export.pipeline.compress`, ``config`` included."""
        return dict(
            config=self.split_config(),
            heavy_fraction=self.heavy_fraction,
            size_budget=self.size_budget,
            selection=self.selection,
            other_linear=self.other_linear,
            embedding=self.embedding,
            lm_head=self.lm_head,
            calibration=self.calibration,
            num_samples=self.num_samples,
            batch_size=self.batch_size,
            max_length=self.max_length,
            seed=self.seed,
            sequential=self.sequential,
            planner=self.planner,
            planner_formats=None if self.planner_formats is None else self.planner_formats.split(","),
        )

    @classmethod
    def from_split_config(cls, split, **kwargs) -> CompressionConfig:
        """A SplitConfig plus ``compress()`` keyword arguments (the pre-0.2 Python API)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown compression option(s) {unknown}; known: {sorted(known)}")
        given = split is not None
        split = split if given else _default_split()
        base = dict(
            light_format=str(split.light_format),
            light_sparsity=split.light_sparsity,
            prune_method=str(split.prune_method),
            heavy_format=str(split.heavy_format),
            group_size=split.group_size,
            quantizer=str(split.quantizer),
            int4_grid=str(getattr(split, "int4_grid", "symmetric")),
            gptq_damp=float(getattr(split, "gptq_damp", 0.01)),
        )
        twice = sorted(set(base) & set(kwargs)) if given else []
        if twice:
            raise ConfigError(
                f"{twice} given both in the SplitConfig and as keyword arguments; pass each once"
            )
        return cls(**{**base, **kwargs})

    def replace(self, **changes) -> CompressionConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able fields plus ``version``; :meth:`from_dict` reads it back."""
        return {"version": self.VERSION, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, data: dict) -> CompressionConfig:
        """The config of :meth:`to_dict`; unknown fields and other versions are typed errors."""
        data = dict(data)
        version = data.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise ConfigError(
                f"compression config version {version!r} is not supported (this package reads version "
                f"{cls.VERSION}); re-export with this version of ffsplit-export"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown compression config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str | None = DEFAULT_PRESET, target=None, **explicit) -> CompressionConfig:
        """The config of preset ``name`` (``accurate``, ``balanced``, ``fast``) with the explicit
        (non-None) fields over it; ``name`` None or ``"none"``: the fields' own defaults.

        ``target`` replaces the fields that target cannot carry (``presets.TARGET_OVERRIDES``).
        ``nbits_accuracy_level`` is an export option, not a config field:
        :func:`~ffsplit_export.presets.preset_accuracy_level` gives it.
        """
        values = resolve_preset(name, None if target is None else str(target), **explicit)
        values.pop("nbits_accuracy_level", None)
        if values.get("size_budget") is not None:
            values.pop("heavy_fraction", None)  # a size budget plans the heavy set itself
        return cls(**values, preset=None if name in (None, NO_PRESET) else name)

    @classmethod
    def from_args(cls, args) -> CompressionConfig:
        """The config of the options that ``add_compress_arguments`` adds to a parser.

        Options left at None (not given) take the value of ``args.preset`` (``--preset``, on
        ``export``; commands without it use the config's own defaults).
        """
        explicit = dict(
            light_format=args.light_format,
            light_sparsity=args.light_sparsity,
            prune_method=args.prune_method,
            heavy_format=args.heavy_format,
            heavy_fraction=args.heavy_fraction if args.size_budget is None else None,
            size_budget=args.size_budget,
            selection=args.heavy_selection,
            sequential=args.sequential,
            group_size=args.group_size,
            quantizer=getattr(args, "quantizer", None),
            int4_grid=getattr(args, "int4_grid", None),
            gptq_damp=getattr(args, "gptq_damp", None),
            other_linear=args.other_linear,
            embedding=args.embedding,
            lm_head=getattr(args, "lm_head", None),
            calibration=args.calibration,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            max_length=args.max_length,
            seed=args.seed,
            planner=getattr(args, "planner", "measured"),
            planner_formats=getattr(args, "planner_formats", None),
        )
        return cls.from_preset(getattr(args, "preset", None), getattr(args, "target", None), **explicit)


def _default_split():
    from .split import SplitConfig

    return SplitConfig()
