"""Locate the compiled ONNX Runtime custom-op library and register it with a session.

The library ``libffsplit_ort.so`` is built by the package's own install (CMake through
scikit-build-core) into ``ffsplit_export/lib/``. With an editable install in redirect mode
it lands in site-packages, not in the source tree, so both places are searched.
``FFSPLIT_ORT_LIBRARY`` overrides the search (e.g. a sanitizer build).
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, PluginNotFoundError

if TYPE_CHECKING:
    import onnxruntime

ENV_VAR = "FFSPLIT_ORT_LIBRARY"
LIB_NAME = "libffsplit_ort.so"

_BUILD_HINT = (
    "Build it with the package install: get ONNX Runtime's C/C++ headers (scripts/get_ort_headers.sh, "
    "or any ONNX Runtime release's include/ folder), then run "
    "`ONNXRUNTIME_INCLUDE_DIR=/path/to/include/onnxruntime pip install -e .` (or a plain `pip install .`) "
    f"in the repository; or set {ENV_VAR} to a libffsplit_ort.so you built yourself."
)


def _candidates() -> list[Path]:
    pkg_dir = Path(__file__).resolve().parent.parent  # .../ffsplit_export
    dirs: list[Path] = [pkg_dir]
    roots: list[str] = []
    for key in ("platlib", "purelib"):
        try:
            roots.append(sysconfig.get_paths()[key])
        except KeyError:
            pass
    try:
        roots.extend(site.getsitepackages())
    except AttributeError:  # some virtualenv flavours lack it
        pass
    user = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if isinstance(user, str):
        roots.append(user)
    roots.extend(p for p in sys.path if p)
    dirs.extend(Path(r) / "ffsplit_export" for r in roots)
    seen: set[Path] = set()
    out: list[Path] = []
    for d in dirs:
        cand = d / "lib" / LIB_NAME
        if cand not in seen:
            seen.add(cand)
            out.append(cand)
    return out


def plugin_path() -> Path:
    """Path of the compiled ONNX Runtime custom-op library (``libffsplit_ort.so``).

    Raises :class:`PluginNotFoundError` (saying how to build it) when it is missing.
    """
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise PluginNotFoundError(
                f"{ENV_VAR}={override!r} does not name an existing file; unset it to use the "
                f"installed library, or point it at a built {LIB_NAME}. {_BUILD_HINT}"
            )
        return path.resolve()
    searched = _candidates()
    for cand in searched:
        if cand.is_file():
            return cand.resolve()
    where = ", ".join(str(c.parent) for c in searched[:4])
    raise PluginNotFoundError(f"{LIB_NAME} was not found (searched {where}, ...). {_BUILD_HINT}")


def session_options(**options: Any) -> onnxruntime.SessionOptions:
    """``onnxruntime.SessionOptions`` with the ffsplit custom-op library registered.

    Keyword arguments set attributes of the options, e.g.
    ``session_options(intra_op_num_threads=2)``.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise PluginNotFoundError(
            "onnxruntime is not installed; install the CPU runtime with `pip install 'ffsplit-export[cpu]'`"
        ) from e
    so = ort.SessionOptions()
    for name, value in options.items():
        if name.startswith("_") or not hasattr(so, name):
            raise ConfigError(
                f"onnxruntime.SessionOptions has no option {name!r}; valid ones include "
                "intra_op_num_threads, inter_op_num_threads, graph_optimization_level, execution_mode, "
                "log_severity_level, enable_profiling"
            )
        try:
            setattr(so, name, value)
        except (TypeError, ValueError) as e:
            kind = type(getattr(so, name)).__name__
            raise ConfigError(
                f"session_options({name}={value!r}): onnxruntime wants a {kind} there; pass e.g. "
                f"{name}={getattr(so, name)!r}"
            ) from e
    path = plugin_path()
    try:
        so.register_custom_ops_library(str(path))
    except Exception as e:  # onnxruntime raises its own Fail / RuntimeError types
        raise PluginNotFoundError(
            f"onnxruntime could not load {path}: {e}. Rebuild it against ONNX Runtime headers of API "
            f"version <= the installed onnxruntime's. {_BUILD_HINT}"
        ) from e
    return so
