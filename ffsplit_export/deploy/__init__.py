"""Deployment outputs of an export folder: bundled library, GenAI config, model card, Triton repository."""

from __future__ import annotations

from pathlib import Path

from .bundle import BundledLibraryError, bundle_library, bundled_library
from .genai import GENAI_CONFIG, genai_supported, normalize_tokenizer, write_genai_config
from .model_card import write_model_card


def finish_export_folder(out: str | Path, manifest: dict) -> dict:
    """Add the deployment files to a finished export in ``out``; updates and returns ``manifest``.

    ort-cpu exports get the custom-op library copied in; decoder-only exports a
    ``genai_config.json`` (and a tokenizer GenAI reads as transformers does); every export a
    model card. Called before ``ffsplit.json`` is written, inside the temporary directory.
    """
    out = Path(out)
    if manifest.get("target") == "ort-cpu":
        manifest["library"] = bundle_library(out)
    changed = normalize_tokenizer(out)
    if changed:
        manifest["tokenizer_fixes"] = changed
    if genai_supported(manifest):
        lib = manifest.get("library", {}).get("file")
        write_genai_config(out, manifest, lib)
        manifest["genai_config"] = GENAI_CONFIG
    write_model_card(out, manifest)
    return manifest


__all__ = [
    "BundledLibraryError",
    "bundle_library",
    "bundled_library",
    "finish_export_folder",
    "genai_supported",
    "write_genai_config",
    "write_model_card",
]
