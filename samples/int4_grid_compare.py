"""Symmetric vs asymmetric int4 MatMulNBits grids (``--int4-grid``) on SmolLM2-135M (issues 11 and 13).

Every row is the ``balanced`` preset (int4 light part, attention and lm_head; 10 % int8 heavy;
int8 embedding) with one change: ``--int4-grid`` (symmetric: codes -7..7 around the op's default
zero point; asymmetric: a uint4 zero point per group; asymmetric-mse: the same with a clipping
search for each group's range), ``--group-size`` 32 / 64 / 128 and ``--quantizer`` rtn / gptq.

README protocol: perplexity on the first 8000 characters of the Gospel of Matthew (context 256,
stride 256), calibration on 128 verses of Genesis; calibration statistics (with Hessians) are
computed once and shared by every row. PyTorch evaluates every row (the exact float32 path); with
``--onnx ROWS`` the named rows are also exported (accuracy_level 4, as the preset ships) and
evaluated through ONNX Runtime, with their file MiB. Prints a table, writes ``results.json`` and
``results.md`` under ``--output``::

    OMP_NUM_THREADS=1 python samples/int4_grid_compare.py --output samples/results/int4_grid \\
        --onnx "gptq g32 symmetric,gptq g32 asymmetric"
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

from ffsplit_export.calibrate import calibrate, make_batches
from ffsplit_export.config import CompressionConfig
from ffsplit_export.data.evaldata import calibration_text, eval_text
from ffsplit_export.eval.evaluate import perplexity_onnx, perplexity_pytorch
from ffsplit_export.export.api import weight_bytes
from ffsplit_export.models.loading import load_model
from ffsplit_export.pipeline import compress
from ffsplit_export.presets import preset_accuracy_level

CTX = 256
MODEL = "smollm2-135m"


def row_name(quantizer: str, group: int, grid: str) -> str:
    return f"{quantizer} g{group} {grid}"


def parse_rows(text: str) -> list[tuple[str, int, str]]:
    """``gptq:32:asymmetric,rtn:128:symmetric`` -> [(quantizer, group, grid), ...]."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        q, g, grid = part.split(":")
        out.append((q, int(g), grid))
    return out


DEFAULT_ROWS = (
    "gptq:32:symmetric,gptq:32:asymmetric,gptq:128:asymmetric,rtn:32:symmetric,rtn:32:asymmetric,"
    "gptq:32:asymmetric-mse,gptq:64:asymmetric,gptq:128:asymmetric-mse,gptq:64:asymmetric-mse,"
    "rtn:32:asymmetric-mse,gptq:128:symmetric"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="comma list of quantizer:group:grid")
    ap.add_argument("--onnx", default="", help="comma list of row names also measured through ONNX Runtime")
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--max-chars", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    onnx_rows = {r.strip() for r in args.onnx.split(",") if r.strip()}

    model, pre, _task = load_model(MODEL)
    text = eval_text("bible", args.max_chars)
    batches = make_batches(
        model, pre, calibration_text("bible", args.num_samples), batch_size=8, max_length=128
    )
    stats = calibrate(model, batches, hessians=True, progress=False)
    results_path = args.output / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if "dense" not in results:
        results["dense"] = {"perplexity_pytorch": perplexity_pytorch(model, pre, text, CTX, CTX).perplexity}
    level = preset_accuracy_level("balanced")

    for quantizer, group, grid in parse_rows(args.rows):
        name = row_name(quantizer, group, grid)
        row = results.get(name, {})
        if "perplexity_pytorch" not in row:
            cfg = CompressionConfig.from_preset(
                "balanced", group_size=group, int4_grid=grid, quantizer=quantizer
            )
            t0 = time.perf_counter()
            res = compress(model, pre, **cfg.compress_kwargs(), stats=stats, batches=batches, progress=False)
            row["compress_s"] = round(time.perf_counter() - t0, 1)
            row["perplexity_pytorch"] = perplexity_pytorch(res.model, pre, text, CTX, CTX).perplexity
            row["weight_mib"] = weight_bytes(model, res.model)["compressed"] / 2**20
            row["config"] = cfg.to_dict()
            if name in onnx_rows:
                from ffsplit_export.export.core import ExportOptions, export_split_model
                from ffsplit_export.runtime import session_options

                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "export"
                    manifest = {
                        "format_version": 1,
                        "source_model": MODEL,
                        "compression_config": cfg.to_dict(),
                    }
                    eo = ExportOptions(validate=False, overwrite=True, nbits_accuracy_level=level)
                    export_split_model(res.model, pre, out, "text-generation-with-past", eo, manifest)
                    row["file_mib"] = sum(f.stat().st_size for f in out.rglob("*.onnx*")) / 2**20
                    so = session_options(intra_op_num_threads=args.threads, inter_op_num_threads=1)
                    row["perplexity_onnx_level4"] = perplexity_onnx(out, text, so, CTX, CTX).perplexity
            del res
            gc.collect()
            results[name] = row
            results_path.write_text(json.dumps(results, indent=1))
        print(name, {k: v for k, v in row.items() if k != "config"}, flush=True)

    dense = results["dense"]["perplexity_pytorch"]
    lines = [
        f"# int4 grids on {MODEL} (balanced preset, one field changed; dense PyTorch ppl {dense:.3f})",
        "",
        "| row | perplexity PyTorch (x dense) | ONNX Runtime level 4 | weight MiB | file MiB | compress s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        if name == "dense":
            continue
        ppl = r["perplexity_pytorch"]
        ort = r.get("perplexity_onnx_level4")
        ort_s = "" if ort is None else f"{ort:.3f}"
        file_s = f"{r['file_mib']:.1f}" if "file_mib" in r else ""
        lines.append(
            f"| {name} | {ppl:.3f} (x{ppl / dense:.3f}) | {ort_s} | {r['weight_mib']:.1f} | {file_s} | "
            f"{r['compress_s']} |"
        )
    (args.output / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
