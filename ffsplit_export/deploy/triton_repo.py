"""A Triton Inference Server model repository from an export folder (onnxruntime backend).

One model per ONNX file: ``REPO/<name>/config.pbtxt`` and ``REPO/<name>/1/model.onnx`` (with its
external data). ort-cpu exports get the custom-op library copied next to each config and named
in ``model_operations { op_library_filename }`` (Triton wants the path on the server, so it is
``--mount``/<name>/<library>); tensorrt exports get the TensorRT execution accelerator instead.
Dynamic batching is enabled only when every input and output has a dynamic first (batch)
dimension and the graph carries no past key/value state (a KV cache belongs to one sequence).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .._io import atomic_dir
from ..errors import ConfigError, ExportError

_TYPES = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    16: "TYPE_BF16",
}


def _tensors(values) -> list[tuple[str, str, list[int]]]:
    out = []
    for v in values:
        t = v.type.tensor_type
        if t.elem_type not in _TYPES:
            raise ExportError(
                f"tensor {v.name!r} has ONNX element type {t.elem_type}, which Triton cannot carry"
            )
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        out.append((v.name, _TYPES[t.elem_type], dims))
    return out


def batchable(inputs, outputs) -> bool:
    """Triton may batch requests: every tensor has a dynamic first dim, and no KV-cache state."""
    tensors = list(inputs) + list(outputs)
    if any(n.startswith(("past_key_values", "present")) for n, _, _ in tensors):
        return False
    return bool(tensors) and all(dims and dims[0] == -1 for _, _, dims in tensors)


def _io_block(kind: str, tensors, drop_batch: bool) -> str:
    items = []
    for name, dtype, dims in tensors:
        d = dims[1:] if drop_batch else dims
        items.append(
            f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(str(x) for x in d)} ]\n  }}'
        )
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def config_pbtxt(
    name: str,
    onnx_path: Path,
    target: str,
    library_path: str | None,
    max_batch_size: int = 8,
    instances: int = 1,
) -> str:
    """The ``config.pbtxt`` of one ONNX file."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    init = {i.name for i in g.initializer}
    inputs = _tensors(i for i in g.input if i.name not in init)
    outputs = _tensors(g.output)
    batch = max_batch_size > 0 and batchable(inputs, outputs)
    text = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size if batch else 0}",
        _io_block("input", inputs, batch).rstrip(),
        _io_block("output", outputs, batch).rstrip(),
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {'KIND_GPU' if target == 'tensorrt' else 'KIND_CPU'}\n  }}\n]",
    ]
    if batch:
        text.append("dynamic_batching { }")
    if target == "tensorrt":
        params = {
            "precision_mode": "FP32",  # TensorRT 11 networks are strongly typed: the graph's types rule
            "max_workspace_size_bytes": str(1 << 30),
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": "/tmp/ffsplit-trt-cache",
        }
        ps = "\n".join(f'        parameters {{ key: "{k}" value: "{v}" }}' for k, v in params.items())
        text.append(
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator : [\n"
            f'      {{\n        name : "tensorrt"\n{ps}\n      }}\n    ]\n  }}\n}}'
        )
    elif library_path:
        text.append(f'model_operations {{\n  op_library_filename: "{library_path}"\n}}')
    return "\n".join(text) + "\n"


def _model_name(stem: str, prefix: str) -> str:
    name = f"{prefix}{stem}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(
            f"model name {name!r} is not a valid Triton model name; pass --prefix with [A-Za-z0-9_.-]"
        )
    return name


def write_triton_repo(
    output: str | Path,
    repo: str | Path,
    *,
    mount: str | None = None,
    prefix: str = "",
    max_batch_size: int = 8,
    instances: int = 1,
    overwrite: bool = False,
) -> list[Path]:
    """Write a Triton model repository for the export in ``output``; returns the config paths.

    ``mount``: where ``repo`` will be on the server (default: its absolute path here); the
    library path in ``model_operations`` is built from it.
    """
    from ..runtime import plugin_path, read_manifest
    from .bundle import bundled_library

    out, repo = Path(output), Path(repo)
    manifest = read_manifest(out)
    target = manifest.get("target", "ort-cpu")
    if max_batch_size < 0 or instances < 1:
        raise ConfigError(f"--max-batch-size {max_batch_size} / --instances {instances}; use >= 0 and >= 1")
    files = sorted(out.glob("*.onnx"))
    if not files:
        raise ExportError(
            f"{str(out)!r} has no .onnx file; pass a directory written by `ffsplit-export export`"
        )
    if repo.exists() and not overwrite:
        raise ConfigError(f"repository {str(repo)!r} exists; pass --overwrite, or choose another directory")
    library = None
    if target == "ort-cpu":
        library = bundled_library(out, manifest) if manifest.get("library") else plugin_path()
    mount = (mount or str(repo.resolve())).rstrip("/")
    repo.parent.mkdir(parents=True, exist_ok=True)
    configs = []
    with atomic_dir(repo, replace=True) as tmp:  # overwrite was checked above
        data_files = [p for p in out.iterdir() if p.name.endswith((".onnx_data", ".onnx.data"))]
        for f in files:
            name = _model_name(f.stem, prefix)
            mdir = tmp / name
            (mdir / "1").mkdir(parents=True)
            shutil.copyfile(f, mdir / "1" / "model.onnx")
            for d in data_files:  # external data is referenced by its original file name
                if d.name in (f"{f.name}_data", f"{f.name}.data"):
                    shutil.copyfile(d, mdir / "1" / d.name)
            lib_path = None
            if library is not None:
                shutil.copyfile(library, mdir / library.name)
                lib_path = f"{mount}/{name}/{library.name}"
            (mdir / "config.pbtxt").write_text(
                config_pbtxt(name, f, target, lib_path, max_batch_size, instances)
            )
            configs.append(repo / name / "config.pbtxt")
    return configs
