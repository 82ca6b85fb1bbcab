"""Optimum-based ONNX export of a split model.

The split model is exported with optimum-onnx's ``onnx_export_from_model`` (its OnnxConfigs,
model patchers and decoder merging). Two of optimum's steps need an ONNX Runtime session
that knows our ops: the dynamic-axes fix and the validation (replaced by :mod:`.validate`,
which also reports the max differences). :mod:`.optimum_export` runs them with our sessions
through optimum's own parameters, without patching optimum for the whole process.
"""

from __future__ import annotations

import logging
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..errors import ConfigError, ExportError, FFSplitError, ValidationError
from ..formats import LightFormat, Target, check_target
from ..linear import NM24Linear, export_target
from ..manifest import MANIFEST, MANIFEST_VERSION, Manifest  # noqa: F401  (re-exported)
from .validate import all_nodes

logger = logging.getLogger(__name__)


#: the parts FusedFFNNBits carries (its ort-cpu kernels; on --target tensorrt its plugin nodes read them)
FUSED_TRT_FORMATS = {"light": ("int8", "int4"), "heavy": ("fp32", "int8")}


@dataclass
class ExportOptions:
    target: Target | str = Target.ORT_CPU
    validate: bool = True
    overwrite: bool = False
    atol: float | None = None
    opset: int | None = None
    nbits_accuracy_level: int | None = None  # None: the preset's (export()), else 0
    trt_dense_24: bool = False  # tensorrt + 2:4: dense 2:4 weights for TensorRT's sparse tensor cores
    reference_check: bool = True  # also run ort-cpu graphs in onnx's NumPy ReferenceEvaluator
    extra_manifest: dict = field(default_factory=dict)
    # one fused FFN node per split FFN: FusedFFN or FusedFFNNBits (ort-cpu), FusedFFNNBits (tensorrt);
    # None: on where default_fused_ffn() says so (ort-cpu, decoder-only LMs and Whisper, balanced's /
    # fast's parts at level 4), else off
    fused_ffn: bool | None = None
    activation_sparsity: str | float = 0  # 0, "exact" or a fraction 0 < F < 1 (both imply fused_ffn)
    skip_criterion: str | None = None  # with a fraction: mixed / gate / product (None: the op's best)
    # a fraction 0 < F < 1 of the input channels of ungated FFNs skipped (TEAL; implies fused_ffn)
    input_sparsity: str | float = 0
    # ort-cpu: fuse RMSNorm / rotary / attention around the FFN into ONNX Runtime contrib ops
    # (export/fusion.py); None = on for ort-cpu, off for the other targets
    fuse_attention: bool | None = None

    def __post_init__(self):
        self.target = Target.parse(self.target, "--target")
        if self.fused_ffn is not None and not isinstance(self.fused_ffn, bool):
            raise ConfigError(
                f"fused_ffn={self.fused_ffn!r}; use True, False or None (the default: on for ort-cpu "
                "decoder-only models and Whisper with light int4 + heavy int8 at accuracy level 4)"
            )
        from ..fused import parse_activation_sparsity

        self.sparsity = parse_activation_sparsity(self.activation_sparsity)
        self.skip_mode = self.sparsity.skip
        from ..fused import check_skip_criterion

        self.skip_criterion = check_skip_criterion(self.skip_criterion)
        if self.skip_criterion is not None and self.sparsity.fraction <= 0:
            raise ConfigError(
                f"--skip-criterion {self.skip_criterion} chooses how calibrated thresholds skip light neurons; "
                "pass --activation-sparsity F (0 < F < 1) with it, or leave it out"
            )
        from ..fused import parse_input_sparsity

        self.input_fraction = parse_input_sparsity(self.input_sparsity)
        if self.input_fraction > 0:
            if self.target is Target.PORTABLE:
                raise ConfigError(
                    f"--input-sparsity={self.input_sparsity}: input thresholds run in the fused FFN op "
                    f"FusedFFNNBits, which --target {self.target} does not have; use --target ort-cpu or tensorrt"
                )
            self.fused_ffn = True
        if self.sparsity.fraction > 0 and self.target is Target.PORTABLE:
            raise ConfigError(
                f"--activation-sparsity={self.activation_sparsity}: calibrated thresholds run in the "
                f"fused FFN ops, which --target {self.target} does not have; use --target ort-cpu or tensorrt"
            )
        if self.atol is not None and (
            isinstance(self.atol, bool)
            or not isinstance(self.atol, (int, float))
            or not 0.0 <= float(self.atol) < float("inf")
        ):
            raise ConfigError(f"--atol={self.atol!r}; use a finite number >= 0, or None for the default")
        if self.trt_dense_24 and self.target is not Target.TENSORRT:
            raise ConfigError(
                f"--trt-dense-24 applies to --target tensorrt, not {self.target}; pass --target tensorrt, "
                "or leave --trt-dense-24 out"
            )
        if self.fuse_attention is None:
            self.fuse_attention = self.target is Target.ORT_CPU
        elif not isinstance(self.fuse_attention, bool):
            raise ConfigError(
                f"fuse_attention={self.fuse_attention!r}; use True, False or None (on for ort-cpu)"
            )
        elif self.fuse_attention and self.target is not Target.ORT_CPU:
            raise ConfigError(
                f"fuse_attention applies to --target ort-cpu, not {self.target}; leave it out or use ort-cpu"
            )
        if self.nbits_accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise ConfigError(
                f"--nbits-accuracy-level={self.nbits_accuracy_level}; use 0 (exact fp32) to 4 (int8 compute)"
            )
        if self.fused_trt and self.nbits_accuracy_level not in (None, 0):
            raise ConfigError(
                f"--nbits-accuracy-level={self.nbits_accuracy_level} with --target tensorrt and {self.fused_flags()}: the "
                "TensorRT kernels compute float32 products (level 0); use --nbits-accuracy-level 0 or leave it out"
            )

    def fused_flags(self) -> str:
        """The fused FFN options given, as the command line spells them (for messages)."""
        flags = [
            ("--fused-ffn", self.fused_ffn and not self.input_fraction),
            (
                f"--activation-sparsity={self.activation_sparsity}",
                self.skip_mode or self.sparsity.fraction > 0,
            ),
            (f"--input-sparsity={self.input_sparsity}", self.input_fraction > 0),
        ]
        return " / ".join(f for f, on in flags if on) or "--fused-ffn"

    @property
    def fused_trt(self) -> bool:
        """Fused FFNs on --target tensorrt: FusedFFNNBits nodes, split into the plugin nodes after export."""
        return self.target is Target.TENSORRT and bool(
            self.fused_ffn or self.skip_mode or self.input_fraction > 0
        )


#: the FFN parts written as one FusedFFNNBits node by default on ort-cpu (light, heavy): balanced's and
#: fast's (H = 0), where the fused op decodes faster than the stock subgraph and prefills as fast
DEFAULT_FUSED_PARTS = (("int4", "int8"),)


def default_fused_ffn(
    target: Target | str,
    light: LightFormat | str,
    heavy: str,
    accuracy_level: int | None,
    measured_model: bool = True,
) -> bool:
    """Whether an export without ``--fused-ffn`` / ``--no-fused-ffn`` writes one FusedFFNNBits node per FFN.

    On for ``--target ort-cpu`` exports with light int4 and heavy int8 (the ``balanced`` and ``fast``
    presets' parts) at ``accuracy_level`` 4, of the kinds of model where the op was measured against
    the stock MatMulNBits subgraph on real weights (``measured_model``, see
    :func:`ffsplit_export.export.api.fused_default_model`: decoder-only text generation, SmolLM2;
    Whisper speech recognition, tiny.en and base) (README, "Which FFN graph by default"). Off
    elsewhere, unless ``--fused-ffn`` asks for the op: portable keeps standard ops, tensorrt's fused
    plugin path is opt-in; T5 and encoders (BERT) were not measured on real weights; ``accurate``'s
    parts (light int8, heavy fp32: decode a tie, 32-token prefill 1.36x slower), sparse-int8
    (FusedFFN) and level 0 keep the subgraph.
    """
    return (
        Target.parse(target, "--target") is Target.ORT_CPU
        and measured_model
        and (str(light), str(heavy)) in DEFAULT_FUSED_PARTS
        and accuracy_level == 4
    )


def check_target_format(
    target: Target,
    light_format: LightFormat,
    heavy_format: str = "fp32",
    other_linear: str = "fp32",
    embedding: str = "fp32",
    lm_head: str | None = None,
    fused_ffn: bool = False,
) -> None:
    """Formats that a target cannot carry are rejected before any work is done (the registry decides).

    ``fused_ffn`` on tensorrt: the FFN parts that ``FusedFFNNBits`` takes (light int8 / int4, heavy
    fp32 / int8) travel inside its plugin nodes, so they need no TensorRT form of their own (every FFN
    must then be fused: :func:`ffsplit_export.export.api.check_export_request` and ``_fuse``)."""
    chosen = [("light", light_format), ("heavy", heavy_format)]
    if fused_ffn and Target.parse(target, "--target") is Target.TENSORRT:
        chosen = [(r, v) for r, v in chosen if str(v) not in FUSED_TRT_FORMATS[r]]
    check_target(target, [*chosen, ("other-linear", other_linear), ("embedding", embedding)])
    if lm_head is not None:  # the other-linear formats, under the option the user gave
        try:
            check_target(target, [("other-linear", lm_head)])
        except ConfigError as e:
            raise ConfigError(str(e).replace("--other-linear", "--lm-head", 1)) from None


class _Sessions:
    """ONNX Runtime sessions with the ffsplit library registered when the target needs it."""

    def __init__(self, target: Target):
        import onnxruntime

        self.target = target
        if target is Target.ORT_CPU:
            from ..runtime import session_options

            session_options()  # fail early, with the build hint, if the library is missing
            lib = str(_plugin_path())

            class _Options(onnxruntime.SessionOptions):
                def __init__(self):
                    super().__init__()
                    self.register_custom_ops_library(lib)

            self.options_class = _Options
        else:
            self.options_class = onnxruntime.SessionOptions

    def __call__(self, path: Path):
        import onnxruntime

        so = self.options_class()
        so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        return onnxruntime.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _plugin_path():
    from ..runtime import plugin_path

    return plugin_path()


def default_atol(options: ExportOptions) -> float:
    if options.atol is not None:
        return options.atol
    # the max-abs check always runs on the exact float32 path (accuracy_level forced to 0), where
    # graphs differ from PyTorch by summation order only (tiny models 2e-7; the relative part,
    # 5e-4 x max|PyTorch|, covers deep models); accuracy_level 4 is judged by relative L2 error and
    # top-1 agreement instead (validate.Tolerances)
    from .validate import Tolerances

    return Tolerances.atol


def export_split_model(
    model,
    preprocessor,
    output: str | Path,
    task: str,
    options: ExportOptions,
    manifest: dict,
) -> dict:
    """Export an already split (and compressed) model into ``output``, atomically.

    Writes the files ``optimum-cli export onnx`` writes for the task, plus ``ffsplit.json``.
    Returns the manifest.
    """
    output = Path(output)
    if output.exists() and not options.overwrite:
        raise ConfigError(
            f"output {str(output)!r} exists; pass --overwrite to replace it, or choose another directory"
        )
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output {str(output)!r} is a file; choose a directory path")
    output.parent.mkdir(parents=True, exist_ok=True)
    from .lock import output_lock

    with output_lock(output):
        return _export_locked(model, preprocessor, output, task, options, manifest)


def _export_locked(
    model, preprocessor, output: Path, task: str, options: ExportOptions, manifest: dict
) -> dict:
    from .._io import atomic_dir

    with atomic_dir(output, replace=True) as tmp:
        results, fusion = _export_into(model, preprocessor, tmp, task, options)
        manifest = dict(manifest)
        manifest.update(_file_summary(tmp), validation=results, target=str(options.target), task=task)
        manifest["graph_fusion"] = fusion
        manifest.update(options.extra_manifest)
        manifest["versions"] = _versions()
        from ..deploy import finish_export_folder  # bundled library, genai_config.json, model card

        manifest = finish_export_folder(tmp, manifest)
        Manifest(manifest).write(tmp)
    return manifest


def _export_into(model, preprocessor, out: Path, task: str, options: ExportOptions) -> dict:
    from ..fused import fused_modules

    # fused FFNs on tensorrt: exported as FusedFFNNBits (ONNX Runtime runs them with the CPU library),
    # then split into the plugin nodes (the onnx reference evaluator runs those): _split_for_tensorrt
    fused_trt = options.target is Target.TENSORRT and bool(fused_modules(model))
    # (ONNX Runtime needs the CPU library to run FusedFFNNBits: only when validating)
    sessions = _Sessions(Target.ORT_CPU if fused_trt and options.validate else options.target)
    atol = default_atol(options)
    results: dict = {}
    ref_ops = None
    pending: list = []  # optimum's validation calls, run after the fusion pass
    # a tensorrt graph without plugin nodes (2:4 as dense Gemm) runs in ONNX Runtime: validate it
    ort_check = options.target is not Target.TENSORRT or not _emits_plugin_nodes(model, options)
    if options.validate and ort_check and options.reference_check:
        from ..ops import reference_ops

        ref_ops = reference_ops(include_contrib=True)
        if fused_trt:
            from ..trt.fused_nodes import plugin_reference_ops

            ref_ops += plugin_reference_ops()
    presplit: dict = {}  # fused tensorrt: file name -> its graph before the split (ONNX Runtime runs it)

    def validator(
        models_and_onnx_configs,
        onnx_named_outputs,
        output_dir,
        atol=None,
        onnx_files_subpaths=None,
        input_shapes=None,
        device="cpu",
        use_subprocess=False,
        model_kwargs=None,
    ):
        pending.append(
            (
                models_and_onnx_configs,
                onnx_named_outputs,
                output_dir,
                onnx_files_subpaths,
                input_shapes,
                model_kwargs,
            )
        )

    def run_validation(
        models_and_onnx_configs,
        onnx_named_outputs,
        output_dir,
        onnx_files_subpaths,
        input_shapes,
        model_kwargs,
    ):
        from .validate import text_tokens, validate_file, validation_summary

        tokens = text_tokens(preprocessor)

        names = onnx_files_subpaths or [f"{k}.onnx" for k in models_and_onnx_configs]
        for (_sub_name, (sub_model, cfg)), outs, fname in zip(
            models_and_onnx_configs.items(), onnx_named_outputs, names
        ):
            path = Path(output_dir) / fname
            use_ref = ref_ops is not None and path.stat().st_size < 600 * 2**20
            # a GroupQueryAttention graph is checked on inputs it is made for (export/fusion.py): no
            # padding, and batch 1 (it takes several new tokens after a cache only at batch 1)
            shapes = {"batch_size": 1} if fusion.get(fname, {}).get("GroupQueryAttention") else {}
            t0 = time.time()
            r = validate_file(
                cfg,
                sub_model,
                path,
                outs,
                {**(input_shapes or {}), **shapes},
                model_kwargs,
                (lambda p: sessions(presplit.get(Path(p).name, p))) if presplit else sessions,
                ref_ops if use_ref else None,
                full_attention_mask=bool(shapes),
                reference_path=unfused.get(fname),
                tokens=tokens,
            )
            r["seconds"] = round(time.time() - t0, 2)
            if shapes:
                r["inputs"] = {**shapes, "attention_mask": "all ones"}
            if fname in presplit:
                r["tensorrt_split"] = (
                    "ONNX Runtime ran the graph before the split (FusedFFNNBits, CPU library); the reference "
                    "evaluator ran the split graph (FusedFFNNBitsUp / Down in NumPy) against it"
                )
            key = fname if fname not in results else f"{fname} (use_cache_branch)"
            results[key] = r
            print(f"validated {key}: " + validation_summary(r))

    for m in model.modules():
        if isinstance(m, NM24Linear):
            m.trt_dense_weights = options.trt_dense_24
    source = str(getattr(model.config, "_name_or_path", ""))
    # optimum re-loads the preprocessors from config._name_or_path to copy them into the output: for
    # a built-in name or a hub id that is a round of model-hub requests (retried for minutes on a
    # machine without network). We save the preprocessor ourselves below, so point optimum at the
    # (local, still empty) output folder while it exports, and restore the name afterwards.
    model.config._name_or_path = source if source and Path(source).is_dir() else str(out)
    from .optimum_export import export_with_optimum  # optimum's export, our sessions, no patching

    with export_target(options.target, options.nbits_accuracy_level or 0):
        try:
            export_with_optimum(
                model,
                out,
                task=task,
                opset=options.opset,
                atol=atol,
                session_factory=sessions,
                run_graphs=options.target is not Target.TENSORRT,
                validator=validator if options.validate and ort_check else None,
            )
        except FFSplitError:
            raise
        except RuntimeError as e:
            cause = e.__cause__
            if isinstance(cause, FFSplitError):
                raise cause from None
            raise ExportError(f"the ONNX export failed: {e}") from e
        except Exception as e:  # optimum / torch.onnx errors
            raise ExportError(
                f"the ONNX export of {type(model).__name__} for task {task!r} failed: {e}"
            ) from e
        finally:
            model.config._name_or_path = source
    fusion: dict = {"enabled": bool(options.fuse_attention)}
    from .subgraphs import hoist_file  # merged decoders: the fused FFN's weights once, not per branch

    shared = {p.name: st for p in sorted(out.glob("*.onnx")) if (st := hoist_file(p)) and st["constants"]}
    if shared:
        fusion["shared_constants"] = shared
    unfused: dict = {}
    with tempfile.TemporaryDirectory(prefix=".unfused-", dir=out) as keep:
        if options.fuse_attention:
            fusion.update(_fuse_files(model, out, Path(keep) if ref_ops is not None else None, unfused))
        if fused_trt:
            fusion["tensorrt_split"] = _split_for_tensorrt(out, Path(keep), presplit)
        for call in pending:
            run_validation(*call)
    if preprocessor is not None:
        preprocessor.save_pretrained(out)
    from .run_hint import add_run_hints  # the one-line fix for running ffsplit nodes, inside each graph

    add_run_hints(out, options.target)
    if options.validate and options.target is Target.TENSORRT:
        for name, r in _check_tensorrt_graphs(out).items():
            results.setdefault(name, {}).update(r)
    if options.validate and ort_check:
        from .validate import check_tolerance

        if not results:
            raise ValidationError(
                "no ONNX file was validated; this is a bug, re-run with --no-validate to inspect"
            )
        check_tolerance(results, atol)
    return results, fusion


def _fuse_files(model, out: Path, keep: Path | None, unfused: dict) -> dict:
    """Run the fusion pass (export/fusion.py) on every ONNX file in ``out``, in place.

    With ``keep``, each file's unfused graph is saved there first (the NumPy reference evaluator has
    no contrib ops, so it checks the unfused graph) and its path recorded in ``unfused``.
    """
    from .fusion import fuse_graph

    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    stats = {}
    for path in sorted(out.glob("*.onnx")):
        if keep is not None and path.stat().st_size < 600 * 2**20:  # the reference check's limit
            m = onnx.load(str(path), load_external_data=True)
            copy = keep / path.name
            onnx.save_model(m, str(copy), save_as_external_data=True, location=path.name + "_data")
            unfused[path.name] = copy
            del m
        try:
            stats[path.name] = fuse_graph(
                path,
                path,
                num_heads=heads,
                kv_num_heads=kv_heads,
                max_positions=getattr(cfg, "max_position_embeddings", None),
            )
        except FFSplitError:
            raise
        except Exception as e:  # onnxruntime.transformers' fusions raise plain exceptions
            raise ExportError(
                f"the graph fusion pass failed on {path.name}: {e}; export with --no-fuse-attention"
            ) from e
    return stats


def _split_for_tensorrt(out: Path, keep: Path, presplit: dict) -> dict:
    """Every ``FusedFFNNBits`` node of every ONNX file in ``out`` -> the two TensorRT plugin nodes,
    in place; each rewritten file's graph before the split is copied into ``keep`` (``presplit[name]``:
    its path). Returns the number of FFN nodes split per file."""
    import shutil

    from ..trt.fused_nodes import split_fused_ffn
    from .subgraphs import external_locations, save_rewritten

    counts = {}
    for path in sorted(out.glob("*.onnx")):
        locations = external_locations(path)
        m = onnx.load(str(path), load_external_data=True)
        counts[path.name] = split_fused_ffn(m)
        if not counts[path.name]:
            continue
        for name in [path.name, *locations]:
            shutil.copy2(path.parent / name, keep / name)
        presplit[path.name] = keep / path.name
        save_rewritten(m, path, locations)
    return counts


def _emits_plugin_nodes(model, options: ExportOptions) -> bool:
    """Whether the tensorrt export of ``model`` has ffsplit plugin nodes (ONNX Runtime cannot run them)."""
    from ..linear import SparseLinear

    mods = list(model.modules())
    return any(isinstance(m, SparseLinear) for m in mods) or (
        not options.trt_dense_24 and any(isinstance(m, NM24Linear) for m in mods)
    )


def _check_tensorrt_graphs(out: Path) -> dict:
    """TensorRT graphs cannot run here: check their structure and plugin attributes."""
    from ..linear import TRT_PLUGIN_DOMAIN
    from ..ops import OPS
    from ..trt.fused_nodes import DOWN_OP, UP_OP
    from ..trt.onnx_nodes import check_plugin_node

    res = {}
    for path in sorted(out.glob("*.onnx")):
        m = onnx.load(str(path), load_external_data=False)
        nodes = list(all_nodes(m.graph))
        plugins = [
            n
            for n in nodes
            if n.domain == TRT_PLUGIN_DOMAIN and (n.op_type in OPS or n.op_type in (UP_OP, DOWN_OP))
        ]
        for n in plugins:
            why = check_plugin_node(n)
            if why:
                raise ValidationError(
                    f"{path.name}: node {n.name} is not a valid ffsplit TensorRT plugin node: {why}"
                )
        others = {n.domain for n in nodes if n.domain not in ("", "ai.onnx", TRT_PLUGIN_DOMAIN)}
        if others:
            raise ValidationError(
                f"{path.name}: nodes of domains {sorted(others)} are not loadable by TensorRT"
            )
        res[path.name] = {"plugin_nodes": len(plugins), "checked": "structure only (no TensorRT here)"}
    return res


def _file_summary(out: Path) -> dict:
    files = {}
    for p in sorted(out.iterdir()):
        if p.suffix == ".onnx" or p.name.endswith(".onnx_data") or p.name.endswith(".onnx.data"):
            files[p.name] = p.stat().st_size
    return {"onnx_files": files}


def _versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version()}
    for pkg in ("ffsplit-export", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    return v
