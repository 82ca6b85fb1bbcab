"""Self-contained export folders: the custom-op library copied in, with its version and checksum.

An ``--target ort-cpu`` export needs ``libffsplit_ort.so``. Copying it next to the ONNX files
lets the folder run where only ``onnxruntime`` (or ``onnxruntime-genai``) is installed. The
manifest records the copy (``ffsplit.json`` -> ``"library"``); :func:`bundled_library` checks a
folder's copy against that record before anything loads it.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from ..errors import FFSplitError

LIBRARY_KEY = "library"


class BundledLibraryError(FFSplitError, RuntimeError):
    """An export folder's bundled custom-op library is missing, modified or of another version."""


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _ops_version() -> int:
    from ..ops._spec import VERSION

    return int(VERSION)


def bundle_library(output: str | Path, source: str | Path | None = None) -> dict:
    """Copy the custom-op library into ``output``; returns the manifest record of the copy."""
    from .. import __version__
    from ..runtime._plugin import plugin_path

    src = Path(source) if source is not None else plugin_path()
    dst = Path(output) / src.name
    shutil.copyfile(src, dst)
    return {
        "file": dst.name,
        "version": __version__,
        "ffsplit_opset": _ops_version(),
        "sha256": sha256(dst),
        "bytes": dst.stat().st_size,
    }


def bundled_library(output: str | Path, manifest: dict) -> Path:
    """The path of ``output``'s bundled library after checking it against the manifest.

    Raises :class:`BundledLibraryError` when the folder has none, when the file's sha256 differs
    from the recorded one (modified or truncated), or when it implements another ffsplit opset.
    """
    rec = manifest.get(LIBRARY_KEY)
    out = Path(output)
    if not rec:
        raise BundledLibraryError(
            f"{str(out)!r} has no bundled custom-op library (ffsplit.json has no {LIBRARY_KEY!r}); "
            "re-export with this version of ffsplit-export, or load with library='installed'"
        )
    path = out / rec["file"]
    if not path.is_file():
        raise BundledLibraryError(
            f"the bundled library {str(path)!r} is missing; copy the export folder completely, or load "
            "with library='installed'"
        )
    if rec.get("ffsplit_opset") != _ops_version():
        raise BundledLibraryError(
            f"the bundled library {rec['file']} (ffsplit-export {rec.get('version')}) implements ffsplit "
            f"opset {rec.get('ffsplit_opset')}, this ffsplit-export reads opset {_ops_version()}; "
            "load with library='installed' or re-export"
        )
    digest = sha256(path)
    if digest != rec.get("sha256"):
        raise BundledLibraryError(
            f"the bundled library {str(path)!r} does not match ffsplit.json (sha256 {digest[:12]}... "
            f"!= recorded {str(rec.get('sha256'))[:12]}..., version {rec.get('version')}): it was modified "
            "or truncated; copy the export folder again, or load with library='installed'"
        )
    return path
