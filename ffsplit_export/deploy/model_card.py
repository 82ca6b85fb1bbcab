"""The model card (``README.md`` with Hugging Face front matter) written into every export folder."""

from __future__ import annotations

from pathlib import Path

import yaml

# built-in real model names -> (hub id of the weights, license); tiny-* models are random
_KNOWN = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "whisper-tiny.en": ("openai/whisper-tiny.en", "mit"),
    "whisper-base": ("openai/whisper-base", "mit"),
}
_PIPELINE = {
    "text-generation": "text-generation",
    "text2text-generation": "text2text-generation",
    "automatic-speech-recognition": "automatic-speech-recognition",
    "feature-extraction": "feature-extraction",
    "fill-mask": "fill-mask",
    "text-classification": "text-classification",
}


def front_matter(manifest: dict) -> dict:
    """The card's YAML metadata: base_model, license where known, library and tags."""
    source = str(manifest.get("source_model", ""))
    base, license_ = _KNOWN.get(source, (None, None))
    if base is None and "/" in source and not Path(source).exists():
        base = source  # a hub id
    meta: dict = {}
    if license_:
        meta["license"] = license_
    if base:
        meta["base_model"] = base
    meta["library_name"] = "onnx"
    task = str(manifest.get("task", "")).replace("-with-past", "")
    if task in _PIPELINE:
        meta["pipeline_tag"] = _PIPELINE[task]
    meta["tags"] = [
        "onnx",
        "onnxruntime",
        "transformers",
        "ffsplit",
        "sparse",
        str(manifest.get("model_type", "")),
        str(manifest.get("light_format", "")),
    ]
    return meta


def _mib(n) -> str:
    return f"{n / 2**20:.2f} MiB"


def model_card(manifest: dict) -> str:
    """Markdown of the card: source, recipe, sizes, validation, and three ways to run it."""
    meta = front_matter(manifest)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]
    source = manifest.get("source_model", "?")
    lines += [
        f"# {source}, FFSplit-compressed ONNX export",
        "",
        f"Source model: `{source}` ({manifest.get('model_type')}"
        + (f", weights of `{meta['base_model']}`" if "base_model" in meta else "")
        + f"); task `{manifest.get('task')}`; target `{manifest.get('target')}`. Written by ffsplit-export "
        f"{manifest.get('versions', {}).get('ffsplit-export') or ''}: every FFN is split into a dense heavy part "
        "(the heavy-hitter neurons) and a compressed light part that runs on the ffsplit custom ops.",
        "",
        "## Recipe",
        "",
        "| option | value |",
        "| --- | --- |",
    ]
    for k, v in sorted((manifest.get("options") or {}).items()):
        lines.append(f"| `{k}` | `{v}` |")
    lines += ["", "## Sizes", "", "| what | size |", "| --- | --- |"]
    wb, ffn = manifest.get("weight_bytes") or {}, manifest.get("ffn") or {}
    if ffn:
        lines.append(
            f"| FFN weights | {_mib(ffn['ffn_dense_bytes'])} dense fp32 -> {_mib(ffn['ffn_bytes'])} "
            f"({ffn['ffn_size_ratio']:.3f} of dense) |"
        )
    if wb:
        lines.append(
            f"| all weights | {_mib(wb['dense_fp32'])} -> {_mib(wb['compressed'])} ({wb['ratio']:.3f}) |"
        )
    for name, size in (manifest.get("onnx_files") or {}).items():
        lines.append(f"| `{name}` | {_mib(size)} |")
    lib = manifest.get("library")
    if lib:
        lines.append(
            f"| `{lib['file']}` (custom-op library, sha256 `{lib['sha256'][:16]}...`) | {_mib(lib['bytes'])} |"
        )
    lines += ["", "## Validation", ""]
    val = manifest.get("validation") or {}
    if not val:
        lines.append("Not validated (`--no-validate`).")
    for name, r in val.items():
        outs = r.get("outputs")
        if outs:
            lines.append(
                f"- `{name}`: max |ONNX Runtime - PyTorch| over {len(outs)} outputs = {max(outs.values()):.3g}"
                + (
                    f"; NumPy reference evaluator {max(r['reference_evaluator'].values(), default=0.0):.3g}"
                    if r.get("reference_evaluator")
                    else ""
                )
            )
        else:
            lines.append(f"- `{name}`: {r.get('checked', r)}")
    lines += ["", "## Run it", ""]
    lines += [
        "1. optimum `ORTModel` with the installed ffsplit library (`pip install ffsplit-export[cpu]`):",
        "",
        "```python",
        "from ffsplit_export.runtime import load",
        'model = load(".")  # or load(".", library="bundled") for the copy in this folder',
        "```",
        "",
    ]
    if lib:
        onnx_name = next(iter(manifest.get("onnx_files") or {"model.onnx": 0}))
        lines += [
            "2. plain `onnxruntime` (nothing else installed) with the bundled library:",
            "",
            "```python",
            "import onnxruntime as ort",
            "so = ort.SessionOptions()",
            f'so.register_custom_ops_library("{lib["file"]}")',
            f'session = ort.InferenceSession("{onnx_name}", so, providers=["CPUExecutionProvider"])',
            "```",
            "",
        ]
    else:
        lines += ["2. plain `onnxruntime`: this target needs no custom-op library.", ""]
    if manifest.get("genai_config"):
        lines += [
            "3. ONNX Runtime GenAI (`pip install onnxruntime-genai`), which reads `genai_config.json` and "
            "loads the bundled library from this folder:",
            "",
            "```python",
            "import onnxruntime_genai as og",
            'model = og.Model("."); tokenizer = og.Tokenizer(model)',
            "params = og.GeneratorParams(model); params.set_search_options(max_length=64)",
            "generator = og.Generator(model, params)",
            'generator.append_tokens(tokenizer.encode("Hello"))',
            "```",
            "",
        ]
    else:
        lines += [
            "3. ONNX Runtime GenAI: not for this export (GenAI runs decoder-only text-generation exports).",
            "",
        ]
    return "\n".join(lines) + "\n"


def write_model_card(output: str | Path, manifest: dict) -> Path:
    path = Path(output) / "README.md"
    path.write_text(model_card(manifest))
    return path
