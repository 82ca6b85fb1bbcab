"""Run exported models: ONNX Runtime sessions with the ffsplit library, optimum ORTModels."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..manifest import Manifest
from ._plugin import plugin_path, session_options


def tensorrt_session(onnx_path, **kwargs):
    """ONNX Runtime TensorRT EP session of a ``--target tensorrt`` file, ffsplit plugins registered
    first (see :func:`ffsplit_export.trt.engine.ort_tensorrt_session`)."""
    from ..trt.engine import ort_tensorrt_session

    return ort_tensorrt_session(onnx_path, **kwargs)


_ORT_CLASSES = {
    "text2text-generation": "ORTModelForSeq2SeqLM",
    "automatic-speech-recognition": "ORTModelForSpeechSeq2Seq",
    "text-generation": "ORTModelForCausalLM",
    "feature-extraction": "ORTModelForFeatureExtraction",
    "fill-mask": "ORTModelForMaskedLM",
    "text-classification": "ORTModelForSequenceClassification",
}


def read_manifest(output: str | Path) -> dict:
    """The export's ffsplit.json (:meth:`ffsplit_export.manifest.Manifest.read`; typed error if unusable)."""
    return Manifest.read(output)


def ort_model_class(task: str):
    import optimum.onnxruntime as ortm

    base = task.replace("-with-past", "")
    try:
        return getattr(ortm, _ORT_CLASSES[base])
    except KeyError as e:
        raise ConfigError(
            f"no optimum ORTModel class for task {task!r}; supported: {sorted(_ORT_CLASSES)}"
        ) from e


def load(
    output: str | Path, provider: str = "cpu", session_options_=None, library: str = "installed", **kwargs
):
    """The optimum ``ORTModelFor...`` of an export, with the ffsplit library registered.

    ``provider``: ``"cpu"`` (custom ops on the CPU EP), ``"cuda"`` (``--target portable``
    exports), or ``"tensorrt"`` (``--target tensorrt`` exports, ONNX Runtime's TensorRT EP).
    ``library``: ``"installed"`` (this package's library, default) or ``"bundled"`` (the copy in
    the export folder, checked against the version and sha256 recorded in ffsplit.json).
    """
    manifest = read_manifest(output)
    if library == "bundled" and session_options_ is None:
        import onnxruntime

        from ..deploy.bundle import bundled_library

        session_options_ = onnxruntime.SessionOptions()
        session_options_.register_custom_ops_library(str(bundled_library(output, manifest)))
    elif library not in ("installed", "bundled"):
        raise ConfigError(f"library={library!r}; use 'installed' or 'bundled'")
    cls = ort_model_class(manifest["task"])
    target = manifest.get("target", "ort-cpu")
    use_cache = manifest["task"].endswith("-with-past")
    extra = (
        {"use_cache": use_cache} if "generation" in manifest["task"] or "speech" in manifest["task"] else {}
    )
    if provider == "cpu":
        so = session_options_ or (session_options() if target == "ort-cpu" else None)
        prov = "CPUExecutionProvider"
        if target == "tensorrt":
            raise ConfigError(
                "a --target tensorrt export runs on TensorRT; use provider='tensorrt' or re-export for ort-cpu"
            )
        return cls.from_pretrained(output, session_options=so, provider=prov, **extra, **kwargs)
    if provider == "cuda":
        if target == "ort-cpu":
            raise ConfigError(
                "the ffsplit custom ops run on the CPU provider; export with --target portable for CUDA"
            )
        return cls.from_pretrained(output, provider="CUDAExecutionProvider", **extra, **kwargs)
    if provider == "tensorrt":
        from ..trt.engine import tensorrt_provider_options

        provs = tensorrt_provider_options(sparse_weights=bool(manifest.get("trt_sparse_weights")))
        names = [p[0] if isinstance(p, tuple) else p for p in provs]
        opts = [p[1] if isinstance(p, tuple) else {} for p in provs]
        # the CPU library gives ONNX Runtime the ffsplit node schemas and the CPU fallback
        so = session_options_ or session_options()
        return cls.from_pretrained(
            output, providers=names, provider_options=opts, session_options=so, **extra, **kwargs
        )
    raise ConfigError(f"provider={provider!r}; use 'cpu', 'cuda' or 'tensorrt'")


__all__ = ["load", "ort_model_class", "plugin_path", "read_manifest", "session_options", "tensorrt_session"]
