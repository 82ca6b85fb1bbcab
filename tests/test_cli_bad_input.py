"""The CLI bad-input table (issue 16): every command of ``ffsplit-export`` and its options.

Each row is an invocation a hostile but fair user might type. Every row must end with exit code 2,
ONE line on stderr that names the bad value and says what to do, no traceback, nothing written
(the temporary folder is unchanged, no ``.*.partial`` leftovers) and no model loaded, compressed,
built or compiled first (those functions are replaced by a guard that fails the row), except in
the rows marked ``loads`` whose bad value is the model itself. The rows run in-process through
``cli.main(argv)``; a few run as real subprocesses to check the process's own exit path.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ffsplit_export.manifest import MANIFEST

# words of a fix: every message says what to pass, use, choose, ... instead
FIX_WORDS = (
    "use ",
    "pass ",
    "choose",
    "remove",
    "install",
    "build",
    "re-run",
    "--help",
    "leave it out",
    "check ",
)


class _Guard(BaseException):
    """Raised by the expensive steps during a row: the bad value was not checked early enough."""


def _guard(name):
    def fail(*args, **kwargs):
        raise _Guard(f"{name} ran before the bad value was rejected")

    return fail


@pytest.fixture
def place(tmp_path, monkeypatch):
    """Fixtures of the rows: an existing file, a full folder, a non-export folder, fake exports."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("not a folder\n")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("precious\n")
    (tmp_path / "notexport").mkdir()
    (tmp_path / "notexport" / "readme.md").write_text("just a folder\n")
    (tmp_path / "emptydir").mkdir()

    def fake_export(name, manifest, onnx=b"\x08\x07" * 50):
        d = tmp_path / name
        d.mkdir()
        (d / "model.onnx").write_bytes(onnx)
        (d / MANIFEST).write_text(json.dumps(manifest))
        return d

    # a causal-LM export whose files match its manifest (a valid export folder, by its manifest)
    fake_export(
        "lmexport",
        {"task": "text-generation-with-past", "model_type": "llama", "onnx_files": {"model.onnx": 100}},
    )
    fake_export("truncated", {"task": "text-generation", "onnx_files": {"model.onnx": 4000}})
    fake_export("emptymanifest", {})
    fake_export("nomodel", {"task": "text-generation", "onnx_files": {"decoder_model.onnx": 100}})
    (tmp_path / "ct2empty").mkdir()
    return tmp_path


GUARDED = [
    ("ffsplit_export.models.loading", "load_model"),
    ("ffsplit_export.export.api", "load_model"),
    ("ffsplit_export.pipeline", "compress"),
    ("ffsplit_export.export.api", "compress"),
    ("ffsplit_export.export.core", "export_split_model"),
    ("ffsplit_export.export.api", "export_split_model"),
    ("ffsplit_export.bench", "run"),
    ("ffsplit_export.trt.aot", "compile_all"),
    ("ffsplit_export.runtime", "load"),
]


def _snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def run_main(argv: list[str]) -> tuple[int, str, str]:
    from ffsplit_export.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


E = "export tiny-llama out"  # a good export command; rows append one bad option
R = "recover tiny-llama out"
B = "bench --work work --output b.json"

# (argv, text the message must contain, may the model be loaded before the error)
ROWS: list[tuple[str, str, bool]] = [
    # ------------------------------------------------------------ no command / unknown command or option
    ("", "command", False),
    ("frobnicate", "frobnicate", False),
    (f"{E} --no-such-option", "--no-such-option", False),
    ("export tiny-llama", "output", False),
    ("export", "model", False),
    # ------------------------------------------------------------ export: numbers and fractions
    (f"{E} --heavy-fraction abc", "abc", False),
    (f"{E} --heavy-fraction -0.1", "-0.1", False),
    (f"{E} --heavy-fraction 1.5", "1.5", False),
    (f"{E} --heavy-fraction nan", "nan", False),
    (f"{E} --heavy-fraction inf", "inf", False),
    (f"{E} --heavy-fraction=", "''", False),
    (f"{E} --size-budget 1.5", "1.5", False),
    (f"{E} --size-budget -0.1", "-0.1", False),
    (f"{E} --size-budget nan", "nan", False),
    (f"{E} --size-budget 0.5 --heavy-fraction 0.1", "--heavy-fraction", False),
    (f"{E} --light-sparsity -0.1", "-0.1", False),
    (f"{E} --light-sparsity 1.5", "1.5", False),
    (f"{E} --light-sparsity nan", "nan", False),
    (f"{E} --light-sparsity -inf", "-inf", False),
    (f"{E} --light-sparsity half", "half", False),
    (f"{E} --num-samples 0", "0", False),
    (f"{E} --num-samples -1", "-1", False),
    (f"{E} --num-samples 1.5", "1.5", False),
    (f"{E} --batch-size 0", "0", False),
    (f"{E} --batch-size -3", "-3", False),
    (f"{E} --batch-size many", "many", False),
    (f"{E} --max-length 0", "0", False),
    (f"{E} --max-length -5", "-5", False),
    (f"{E} --seed -1", "-1", False),
    (f"{E} --seed x", "x", False),
    (f"{E} --group-size 100", "100", False),
    (f"{E} --group-size 0", "0", False),
    (f"{E} --group-size abc", "abc", False),
    (f"{E} --gptq-damp -0.1", "-0.1", False),
    (f"{E} --gptq-damp 1", "1", False),
    (f"{E} --gptq-damp lots", "lots", False),
    (f"{E} --atol -1", "-1", False),
    (f"{E} --atol nan", "nan", False),
    (f"{E} --atol inf", "inf", False),
    (f"{E} --atol small", "small", False),
    (f"{E} --opset 5", "5", False),
    (f"{E} --opset 13", "13", False),
    (f"{E} --opset latest", "latest", False),
    (f"{E} --nbits-accuracy-level 5", "5", False),
    (f"{E} --nbits-accuracy-level -1", "-1", False),
    (f"{E} --nbits-accuracy-level high", "high", False),
    # ------------------------------------------------------------ export: unknown names
    (f"{E} --light-format foo", "foo", False),
    (f"{E} --light-format SPARSE-INT8", "SPARSE-INT8", False),
    (f"{E} --heavy-format int3", "int3", False),
    (f"{E} --prune-method random", "random", False),
    (f"{E} --other-linear int2", "int2", False),
    (f"{E} --lm-head int2", "int2", False),
    (f"{E} --embedding int2", "int2", False),
    (f"{E} --heavy-selection best", "best", False),
    (f"{E} --target gpu", "gpu", False),
    (f"{E} --activation-sparsity 1.5", "1.5", False),
    (f"{E} --activation-sparsity approx", "approx", False),
    (f"{E} --activation-sparsity 0.4 --skip-criterion both", "both", False),
    (f"{E} --skip-criterion gate", "--activation-sparsity", False),
    (f"{E} --input-sparsity 1.5", "1.5", False),
    (f"{E} --input-sparsity -0.2", "-0.2", False),
    (f"{E} --input-sparsity lots", "lots", False),
    (f"{E} --input-sparsity 0.4", "is gated", True),  # tiny-llama: gated FFNs, found once compressed
    ("export no-such-model-xyz out", "no-such-model-xyz", True),
    ("export ./no/such/dir out", "no/such/dir", True),
    ("export notexport out", "notexport", True),
    ("export emptydir out", "emptydir", True),
    ("export file.txt out", "file.txt", True),
    # ------------------------------------------------------------ export: paths
    (f"{E} --calibration /no/such/file.txt", "/no/such/file.txt", False),
    (f"{E} --calibration wikipedia", "wikipedia", False),
    ("export tiny-llama file.txt", "file.txt", False),
    ("export tiny-llama file.txt --overwrite", "file.txt", False),
    ("export tiny-llama existing", "existing", False),
    # ------------------------------------------------------------ export: contradictory combinations
    (f"{E} --target tensorrt --light-format int4", "int4", False),
    (f"{E} --target tensorrt --other-linear int4", "int4", False),
    (f"{E} --target tensorrt --lm-head int4", "--lm-head int4", False),
    (f"{E} --target tensorrt --embedding int8", "int8", False),
    (f"{E} --target tensorrt --embedding int4", "int4", False),
    (f"{E} --target tensorrt --fused-ffn", "--fused-ffn", False),  # the tensorrt preset's sparse-int8
    (f"{E} --target tensorrt --activation-sparsity exact", "exact", False),
    (
        f"{E} --target tensorrt --fused-ffn --light-format sparse-int8 --heavy-format fp32",
        "sparse-int8",
        False,
    ),
    (f"{E} --target tensorrt --fused-ffn --light-format int4 --heavy-format fp16", "fp16", False),
    (
        f"{E} --target tensorrt --input-sparsity 0.4 --nbits-accuracy-level 4",
        "--nbits-accuracy-level=4",
        False,
    ),
    (f"{E} --target portable --input-sparsity 0.4", "--input-sparsity=0.4", False),
    (f"{E} --trt-dense-24", "--trt-dense-24", False),
    (f"{E} --target tensorrt --trt-dense-24", "--trt-dense-24", False),
    (f"{E} --fused-ffn --light-format lowrank", "lowrank", False),
    (f"{E} --task no-such-task", "no-such-task", True),
    # ------------------------------------------------------------ analyze
    ("analyze tiny-llama", "--output", False),
    ("analyze tiny-llama --output file.txt", "file.txt", False),
    ("analyze tiny-llama --output out --heavy-fraction 2", "2", False),
    ("analyze tiny-llama --output out --light-format foo", "foo", False),
    ("analyze tiny-llama --output out --batch-size 0", "0", False),
    ("analyze no-such-model-xyz --output out", "no-such-model-xyz", True),
    # ------------------------------------------------------------ generate
    ("generate", "output", False),
    ("generate no/such/export", "no/such/export", False),
    ("generate file.txt", "file.txt", False),
    ("generate notexport", "notexport", False),
    ("generate truncated", "truncated", False),
    ("generate emptymanifest", "emptymanifest", False),
    ("generate nomodel", "decoder_model.onnx", False),
    ("generate lmexport --max-new-tokens 0", "0", False),
    ("generate lmexport --max-new-tokens -1", "-1", False),
    ("generate lmexport --max-new-tokens lots", "lots", False),
    ("generate lmexport --runtime vllm", "vllm", False),
    # ------------------------------------------------------------ convert-ct2
    ("convert-ct2 no/such/ct2 out", "no/such/ct2", False),
    ("convert-ct2 file.txt out", "file.txt", False),
    ("convert-ct2 ct2empty out", "ct2empty", False),
    ("convert-ct2 ct2empty file.txt", "file.txt", False),
    ("convert-ct2 ct2empty existing", "existing", False),
    # ------------------------------------------------------------ trt-plugin / trt-build
    ("trt-plugin", "--output", False),
    ("trt-plugin --aot-only --output file.txt", "file.txt", False),
    ("trt-plugin --aot-only --output out --arch sm_12", "sm_12", False),
    ("trt-plugin --aot-only --output out --arch ampere", "ampere", False),
    ("trt-plugin --aot-only --output out --arch ''", "''", False),
    ("trt-build no/such/export", "no/such/export", False),
    ("trt-build file.txt", "file.txt", False),
    ("trt-build notexport", "notexport", False),
    ("trt-build truncated", "truncated", False),
    ("trt-build lmexport --fp16 --bf16", "--bf16", False),
    # ------------------------------------------------------------ triton-repo
    ("triton-repo no/such/export repo", "no/such/export", False),
    ("triton-repo file.txt repo", "file.txt", False),
    ("triton-repo notexport repo", "notexport", False),
    ("triton-repo lmexport file.txt", "file.txt", False),
    ("triton-repo lmexport existing", "existing", False),
    ("triton-repo lmexport repo --max-batch-size -1", "-1", False),
    ("triton-repo lmexport repo --max-batch-size x", "x", False),
    ("triton-repo lmexport repo --instances 0", "0", False),
    ("triton-repo lmexport repo --prefix 'a b/c'", "a b/c", False),
    # ------------------------------------------------------------ recover
    (f"{R} --steps 0", "0", False),
    (f"{R} --steps -5", "-5", False),
    (f"{R} --lr 0", "0", False),
    (f"{R} --lr nan", "nan", False),
    (f"{R} --lr -1e-4", "-0.0001", False),
    (f"{R} --seq-len 0", "0", False),
    (f"{R} --train-batch-size 0", "0", False),
    (f"{R} --train-samples 0", "0", False),
    (f"{R} --train-data /no/such/data.txt", "/no/such/data.txt", False),
    (f"{R} --task-loss-weight -1", "-1", False),
    (f"{R} --squarehead-weight inf", "inf", False),
    (f"{R} --kd-logits-weight nan", "nan", False),
    (f"{R} --gradual-start 1.5", "1.5", False),
    (f"{R} --gradual-start 0.9", "--gradual-start", False),
    (f"{R} --gradual-end-step 10", "--gradual-end-step", False),
    (f"{R} --gradual-start 0.1 --gradual-end-step 500 --steps 100", "500", False),
    (f"{R} --device tpu", "tpu", False),
    (f"{R} --device cuda:x", "cuda:x", False),
    (f"{R} --heavy-fraction 2", "2", False),
    ("recover tiny-llama existing", "existing", False),
    ("recover tiny-llama file.txt", "file.txt", False),
    (f"{R} --checkpoint-dir file.txt", "file.txt", False),
    # ------------------------------------------------------------ eval
    ("eval", "model", False),
    ("eval file.txt", "file.txt", False),
    ("eval notexport", "notexport", False),
    ("eval truncated", "truncated", False),
    ("eval emptymanifest", "emptymanifest", False),
    ("eval ./no/such/export", "no/such/export", False),
    ("eval lmexport --speech", "--speech", False),
    ("eval lmexport --text wikipedia", "wikipedia", False),
    ("eval lmexport --text bible --speech", "--speech", False),
    ("eval lmexport --context-length 1", "1", False),
    ("eval lmexport --context-length 0", "0", False),
    ("eval lmexport --stride 0", "0", False),
    ("eval lmexport --stride 1024", "1024", False),
    ("eval lmexport --clips 0", "0", False),
    ("eval lmexport --max-chars 0", "0", False),
    ("eval lmexport --provider rocm", "rocm", False),
    ("eval lmexport --json existing", "existing", False),
    ("eval lmexport --compress", "--compress", False),
    ("eval lmexport --heavy-fraction 1.5", "1.5", False),
    ("eval no-such-model-xyz --pytorch", "no-such-model-xyz", True),
    ("eval tiny-mpt --pytorch --input-sparsity 0.4", "--input-sparsity=0.4", True),
    ("eval tiny-mpt --pytorch --compress --input-sparsity 2", "2", True),
    # ------------------------------------------------------------ bench
    (f"{B} --sparsities 1.5", "1.5", False),
    (f"{B} --sparsities 0.5,nan", "nan", False),
    (f"{B} --sparsities ,", "','", False),
    (f"{B} --isa foo", "foo", False),
    (f"{B} --isa auto,neon", "neon", False),
    (f"{B} --threads 0", "0", False),
    (f"{B} --runs 0", "0", False),
    (f"{B} --tokens -1", "-1", False),
    (f"{B} --prompt 0", "0", False),
    (f"{B} --prefill 0", "0", False),
    (f"{B} --prefill 32,x", "x", False),
    (f"{B} --heavy-fraction 2", "2", False),
    (f"{B} --light-format foo", "foo", False),
    (f"{B} --heavy-format int3", "int3", False),
    (f"{B} --num-samples 0", "0", False),
    (f"{B} --seed -2", "-2", False),
    ("bench --work file.txt --output b.json", "file.txt", False),
    ("bench --work work --output existing", "existing", False),
]


def _ids():
    return [argv or "(no arguments)" for argv, _, _ in ROWS]


@pytest.mark.parametrize(("argv", "names", "loads"), ROWS, ids=_ids())
def test_bad_invocation(argv, names, loads, place, monkeypatch):
    import shlex

    if not loads:
        import importlib

        # import every module first: one imported while another is patched would keep the guard
        modules = [importlib.import_module(module) for module, _ in GUARDED]
        for mod, (module, attr) in zip(modules, GUARDED):
            monkeypatch.setattr(mod, attr, _guard(f"{module}.{attr}"))
    before = _snapshot(place)
    try:
        rc, out, err = run_main(shlex.split(argv))
    except _Guard as e:
        pytest.fail(f"{argv!r}: {e}")
    assert rc == 2, f"{argv!r}: exit code {rc}, stderr {err!r}"
    assert "Traceback" not in err + out, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"{argv!r}: stderr is not one line: {err!r}"
    assert names in lines[0], f"{argv!r}: the message does not name {names!r}: {lines[0]!r}"
    assert any(w in lines[0] for w in FIX_WORDS), f"{argv!r}: the message gives no fix: {lines[0]!r}"
    assert _snapshot(place) == before, f"{argv!r} wrote or changed files"
    assert not list(place.rglob("*.partial")), argv


def test_every_command_has_rows():
    """A new command gets rows here: the table lists every subcommand of the parser."""
    from ffsplit_export.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    covered = {shlex_first(argv) for argv, _, _ in ROWS}
    assert set(sub.choices) <= covered, sorted(set(sub.choices) - covered)


def shlex_first(argv: str) -> str:
    return argv.split()[0] if argv.split() else ""


# ---------------------------------------------------------------- the real process exit path


SUBPROCESS_ROWS = [
    ("export tiny-llama out --heavy-fraction 1.5", "1.5"),
    ("export tiny-llama existing", "existing"),
    ("export tiny-llama out --target tensorrt --light-format int4", "int4"),
    ("bench --work work --output b.json --isa foo", "foo"),
    ("generate truncated", "truncated"),
]


@pytest.mark.parametrize(("argv", "names"), SUBPROCESS_ROWS)
def test_bad_invocation_in_a_process(argv, names, place):
    import shlex

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    before = _snapshot(place)
    p = subprocess.run(
        [sys.executable, "-m", "ffsplit_export.cli", *shlex.split(argv)],
        cwd=place,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and names in lines[0], p.stderr
    assert _snapshot(place) == before


# ---------------------------------------------------------------- the Python API


def _api_cases(place: Path):
    from ffsplit_export import CompressionConfig
    from ffsplit_export.export import ExportOptions, export
    from ffsplit_export.runtime import load, session_options

    out = str(place / "out")
    return [
        # (call, text the message must name)
        (lambda: export("tiny-llama", out, options=ExportOptions(target="gpu")), "gpu"),
        (lambda: ExportOptions(nbits_accuracy_level=7), "7"),
        (lambda: ExportOptions(atol=-1.0), "-1.0"),
        (lambda: ExportOptions(atol=float("nan")), "nan"),
        (lambda: ExportOptions(atol="small"), "small"),
        (lambda: ExportOptions(activation_sparsity=1.3), "1.3"),
        (lambda: ExportOptions(input_sparsity=1.3), "1.3"),
        (lambda: ExportOptions(target="portable", input_sparsity=0.4), "--input-sparsity=0.4"),
        (lambda: ExportOptions(target="ort-cpu", trt_dense_24=True), "--trt-dense-24"),
        (lambda: ExportOptions(target="tensorrt", fused_ffn=True, nbits_accuracy_level=4), "TensorRT"),
        (lambda: CompressionConfig(heavy_fraction=1.5), "1.5"),
        (lambda: CompressionConfig(heavy_fraction=float("nan")), "nan"),
        (lambda: CompressionConfig(heavy_fraction="0.1"), "'0.1'"),
        (lambda: CompressionConfig(size_budget=-0.2), "-0.2"),
        (lambda: CompressionConfig(size_budget=0.3, heavy_fraction=0.1), "--size-budget"),
        (lambda: CompressionConfig(light_sparsity=float("inf")), "inf"),
        (lambda: CompressionConfig(light_format="foo"), "foo"),
        (lambda: CompressionConfig(heavy_format="int3"), "int3"),
        (lambda: CompressionConfig(prune_method="random"), "random"),
        (lambda: CompressionConfig(group_size=100), "100"),
        (lambda: CompressionConfig(num_samples=0), "0"),
        (lambda: CompressionConfig(batch_size=-3), "-3"),
        (lambda: CompressionConfig(max_length=2.5), "2.5"),
        (lambda: CompressionConfig(seed=-1), "-1"),
        (lambda: CompressionConfig.from_dict({"light_format": "sparse-int8", "bogus": 1}), "bogus"),
        (lambda: export("tiny-llama", out, config=CompressionConfig(), num_samples=4), "num_samples"),
        (lambda: export("tiny-llama", out, num_samples=0), "--num-samples=0"),
        (
            lambda: export("tiny-llama", out, options=ExportOptions(target="tensorrt"), light_format="int4"),
            "int4",
        ),
        (
            lambda: export("tiny-llama", str(place / "file.txt"), options=ExportOptions(overwrite=True)),
            "file.txt",
        ),
        (lambda: export("tiny-llama", str(place / "existing")), "existing"),
        (
            lambda: export(
                "tiny-llama",
                out,
                config=CompressionConfig(light_format="lowrank"),
                options=ExportOptions(fused_ffn=True),
            ),
            "lowrank",
        ),
        (
            lambda: export("tiny-llama", out, options=ExportOptions(target="tensorrt", trt_dense_24=True)),
            "sparse-int8",
        ),
        (lambda: load(str(place / "file.txt")), "file.txt"),
        (lambda: load(str(place / "notexport")), "notexport"),
        (lambda: load(str(place / "emptymanifest")), "emptymanifest"),
        (lambda: load(str(place / "nomodel")), "decoder_model.onnx"),
        (lambda: load(str(place / "truncated")), "truncated"),
        (lambda: session_options(intra_op_num_threads="two"), "two"),
        (lambda: session_options(no_such_option=1), "no_such_option"),
    ]


def test_python_api_misuse_raises_typed_errors(place, monkeypatch):
    """Each misuse raises a typed error (ValueError / RuntimeError subclass) naming the value, before
    any model is loaded, and writes nothing."""
    import importlib

    from ffsplit_export.errors import FFSplitError

    modules = [importlib.import_module(module) for module, _ in GUARDED]
    for mod, (module, attr) in zip(modules, GUARDED):
        if attr != "load":  # runtime.load is under test here
            monkeypatch.setattr(mod, attr, _guard(f"{module}.{attr}"))
    before = _snapshot(place)
    cases = _api_cases(place)
    assert len(cases) >= 22  # the 22 misuses and their siblings
    for i, (call, names) in enumerate(cases):
        try:
            call()
        except FFSplitError as e:
            assert isinstance(e, (ValueError, RuntimeError)), (i, e)
            assert names in str(e), f"case {i}: {e!r} does not name {names!r}"
            assert "\n" not in str(e).strip(), (i, e)
        except _Guard as e:
            pytest.fail(f"case {i} ({names}): {e}")
        else:
            pytest.fail(f"case {i} ({names}) raised nothing")
    assert _snapshot(place) == before
