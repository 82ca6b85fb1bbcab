"""TensorRT engine builds with the ffsplit plugin, and ONNX Runtime TensorRT EP options.

Needs ``tensorrt`` (10.12+ / 11), ``triton`` and an NVIDIA GPU; without them every entry
point raises :class:`TensorRTUnavailableError` saying what is missing and how to get it.
Not run on hardware here.
"""

from __future__ import annotations

import ctypes
import tempfile
from pathlib import Path

from ..errors import ConfigError, ExportError, PluginNotFoundError
from ..manifest import MANIFEST, Manifest


class TensorRTUnavailableError(PluginNotFoundError):
    """TensorRT, triton or a CUDA GPU is missing (a RuntimeError)."""


def cuda_device_count() -> int:
    """Number of CUDA devices via the driver API (0 when there is no driver); no torch."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if lib.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        return count.value if lib.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0
    return 0


def require_tensorrt(need_gpu: bool = True):
    """Import tensorrt and register the plugins; typed error naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailableError(
            "TensorRT is not installed: pip install 'ffsplit-export[tensorrt]' (tensorrt>=10.12, "
            "needs an NVIDIA driver; the wheels download from NVIDIA's index)"
        ) from e
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise TensorRTUnavailableError("triton is not installed: pip install 'triton>=3.2'") from e
    if need_gpu and cuda_device_count() == 0:
        raise TensorRTUnavailableError(
            "no CUDA GPU found (libcuda missing or no device): TensorRT engines can only be built "
            "on a machine with an NVIDIA GPU (sm_80 or newer) and its driver"
        )
    from . import plugin  # noqa: F401  (registers ffsplit::* in the plugin registry)

    return trt


def read_manifest(output_dir: Path) -> dict:
    """ffsplit.json of an export, or {} for a plain ONNX directory without one (trt-build accepts both)."""
    if not (Path(output_dir) / MANIFEST).exists():
        return {}
    return Manifest.read(output_dir)


def wants_sparse_weights(manifest: dict) -> bool:
    """SPARSE_WEIGHTS when the manifest says so, or for 2:4 exports that emit dense 2:4 weights."""
    if "trt_sparse_weights" in manifest:
        return bool(manifest["trt_sparse_weights"])
    return False


def _profile_dims(dims, max_batch: int, max_seq: int):
    mins, opts, maxs = [], [], []
    for d in dims:
        if d.dim_value > 0:
            mins.append(d.dim_value)
            opts.append(d.dim_value)
            maxs.append(d.dim_value)
            continue
        batchy = "batch" in d.dim_param.lower()
        hi = max_batch if batchy else max_seq
        mins.append(1)
        opts.append(1 if batchy else min(hi, 64))
        maxs.append(hi)
    return tuple(mins), tuple(opts), tuple(maxs)


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    sparse_weights: bool = False,
    fp16: bool = False,
    bf16: bool = False,
    max_batch: int = 4,
    max_seq: int = 1024,
    workspace_bytes: int | None = None,
) -> Path:
    """One engine for one ONNX file: plugin nodes get the int32 weight view, the network is
    strongly typed, one optimization profile spans every dynamic dim (1..max)."""
    import onnx

    from .fused_nodes import split_fused_ffn
    from .layout import prepare_model

    trt = require_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    try:
        model = onnx.load(str(onnx_path))
    except Exception as e:  # onnx raises DecodeError / OSError / ValueError
        raise ExportError(f"cannot read {onnx_path}: {e}; the file is corrupt or truncated, re-export") from e
    prepare_model(model)
    split_fused_ffn(model)  # FusedFFNNBits -> FusedFFNNBitsUp + FusedFFNNBitsDown plugin nodes

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise TensorRTUnavailableError("trt.Builder could not be created: check the GPU driver")
    flag_enum = trt.NetworkDefinitionCreationFlag
    reduced_precision = fp16 or bf16
    weak_flag = getattr(trt.BuilderFlag, "BF16" if bf16 else "FP16", None)
    if reduced_precision and weak_flag is None:
        raise ConfigError(
            "--fp16/--bf16: this TensorRT only builds strongly typed networks (precision comes from the "
            "ONNX graph); export with --heavy-format fp16 instead"
        )
    flags = 0
    if not reduced_precision and hasattr(flag_enum, "STRONGLY_TYPED"):
        flags |= 1 << int(flag_enum.STRONGLY_TYPED)
    if hasattr(flag_enum, "PREFER_AOT_PYTHON_PLUGINS"):
        flags |= 1 << int(flag_enum.PREFER_AOT_PYTHON_PLUGINS)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory() as tmp:
        # saved next to external data so the parser resolves it; works past 2 GB
        prepared = Path(tmp) / onnx_path.name
        onnx.save(model, str(prepared), save_as_external_data=True, location=onnx_path.name + ".data")
        ok = parser.parse_from_file(str(prepared))
    if not ok:
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(
            f"TensorRT could not parse {onnx_path.name}: {errs}. If a node ffsplit::* is 'not found', "
            "the plugin did not register: import ffsplit_export.trt.plugin first"
        )
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if reduced_precision:
        config.set_flag(weak_flag)
    dynamic = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t for t in dynamic if any(d < 0 for d in t.shape)]
    if dynamic:
        profile = builder.create_optimization_profile()
        by_name = {i.name: i for i in model.graph.input}
        for t in dynamic:
            dims = by_name[t.name].type.tensor_type.shape.dim
            profile.set_shape(t.name, *_profile_dims(dims, max_batch, max_seq))
        config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ExportError(f"TensorRT failed to build an engine for {onnx_path.name}; see the log above")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(blob))
    return engine_path


def build_engines(
    output_dir: str | Path, engine_dir: str | Path | None = None, fp16: bool = False, bf16: bool = False
) -> list[Path]:
    """One ``<name>.engine`` per ONNX file of an export (default: ``OUTPUT/tensorrt``)."""
    if fp16 and bf16:
        raise ConfigError("--fp16 and --bf16 exclude each other; pick one")
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ConfigError(f"{output_dir} is not an export directory; run ffsplit-export export first")
    files = sorted(output_dir.glob("*.onnx"))
    if not files:
        raise ExportError(f"no .onnx files in {output_dir}; export with --target tensorrt first")
    manifest = read_manifest(output_dir)
    require_tensorrt()
    engine_dir = Path(engine_dir) if engine_dir else output_dir / "tensorrt"
    sparse = wants_sparse_weights(manifest)
    return [
        build_engine(f, engine_dir / f"{f.stem}.engine", sparse_weights=sparse, fp16=fp16, bf16=bf16)
        for f in files
    ]


def tensorrt_provider_options(
    cache_dir: str | Path | None = None,
    fp16: bool = False,
    sparse_weights: bool = False,
    device_id: int = 0,
) -> list:
    """``providers`` for ``onnxruntime.InferenceSession`` running the plugin nodes in
    ONNX Runtime's TensorRT EP, with CUDA and CPU after it.

    The plugins are Python (tensorrt.plugin) creators, not a shared library, so
    ``trt_extra_plugin_lib_paths`` does not apply: this imports :mod:`.plugin`, which
    registers them in the libnvinfer that ``tensorrt`` loaded; the EP finds them there when
    it uses the same libnvinfer (onnxruntime-gpu and tensorrt of one major version, the
    tensorrt wheel's libs on the loader path). The session must also know the node schemas:
    keep the nodes in the ``ffsplit`` domain and register the CPU custom-op library
    (``ffsplit_export.runtime.session_options()``), which is also the CPU fallback.
    """
    require_tensorrt()
    opts = {"device_id": device_id, "trt_fp16_enable": fp16, "trt_sparsity_enable": sparse_weights}
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        opts.update(
            trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir), trt_timing_cache_enable=True
        )
    return [
        ("TensorrtExecutionProvider", opts),
        ("CUDAExecutionProvider", {"device_id": device_id}),
        "CPUExecutionProvider",
    ]


def ort_tensorrt_session(
    onnx_path: str | Path,
    *,
    cache_dir: str | Path | None = None,
    fp16: bool = False,
    sparse_weights: bool = False,
    device_id: int = 0,
    session_options=None,
):
    """An ``onnxruntime.InferenceSession`` of a ``--target tensorrt`` ONNX file on ONNX Runtime's
    TensorRT EP, with the ffsplit plugins in TensorRT's registry before the session exists.

    Order matters (microsoft/onnxruntime ``tensorrt_execution_provider.cc``: the EP parses each
    subgraph with TensorRT's ONNX parser while the session is created, and the parser looks the
    plugin up in the registry of the libnvinfer it runs in): :func:`tensorrt_provider_options`
    imports :mod:`.plugin` first. ``trt_extra_plugin_lib_paths`` loads shared libraries and has
    nothing to load for Python plugins. Session options default to the ffsplit CPU library
    (the ``ffsplit`` node schemas ONNX Runtime needs to load the graph, and the CPU fallback).
    Needs onnxruntime-gpu built with the TensorRT EP, TensorRT of the same major and a GPU.
    """
    import onnxruntime as ort

    provs = tensorrt_provider_options(
        cache_dir=cache_dir, fp16=fp16, sparse_weights=sparse_weights, device_id=device_id
    )
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise TensorRTUnavailableError(
            f"this onnxruntime {ort.__version__} has no TensorrtExecutionProvider (providers: "
            f"{ort.get_available_providers()}); pip install 'ffsplit-export[gpu]' (onnxruntime-gpu)"
        )
    if session_options is None:
        from ..runtime._plugin import session_options as ffsplit_session_options

        session_options = ffsplit_session_options()
    names = [p[0] if isinstance(p, tuple) else p for p in provs]
    opts = [p[1] if isinstance(p, tuple) else {} for p in provs]
    return ort.InferenceSession(
        str(onnx_path), sess_options=session_options, providers=names, provider_options=opts
    )
