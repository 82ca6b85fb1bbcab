"""Round-to-nearest vs GPTQ (issue 11) on SmolLM2-135M, with ONNX Runtime's own 4-bit quantizer beside.

The README protocol: perplexity on the first 8000 characters of the Gospel of Matthew (context
256, stride 256), calibration on 128 verses of Genesis (``--calibration bible --num-samples 128``).
Calibration statistics (with Hessians) are computed once and shared by every row; GPTQ's
other-linear Hessians (attention, lm_head) are collected inside each compress call.

Rows (``--rows``, comma list of groups):

* ``int4``: ``--other-linear int4 --light-format int4 --heavy-format int8`` (heavy 0.1), RTN vs GPTQ,
  at ``--group-size`` 128 and 32;
* ``s50`` / ``s75``: heavy 0.3 int8 + light sparse-int8 at 50 % / 75 % (SparseGPT), RTN vs GPTQ
  (the joint prune-and-quantize pass), and the same with sparse-int4 (group 32);
* ``default``: the CLI defaults (heavy 0.1 fp32, sparse-int8 @ 0.5, Wanda), RTN vs GPTQ;
* ``seq``: GPTQ with ``--sequential`` for the int4 and s50 / s75 rows (does it pay?);
* ``ort``: ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` 4-bit, DEFAULT
  (round-to-nearest with zero points) and HQQ, block 32 and 128, applied to the dense fp32 export
  (``--light-format dense --heavy-fraction 0``), evaluated through ONNX Runtime; file bytes of each.

PyTorch evaluates every ffsplit row (it equals ONNX Runtime with our kernels, README); with
``--onnx`` the GPTQ rows are also exported and evaluated through ONNX Runtime. Prints a table
and writes ``results.json`` / ``results.md`` under ``--output``::

    OMP_NUM_THREADS=1 python samples/quantizer_compare.py --output samples/results/quantizer_compare
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ffsplit_export.calibrate import calibrate, make_batches
from ffsplit_export.data.evaldata import calibration_text, eval_text
from ffsplit_export.eval.evaluate import perplexity_from_logits, perplexity_pytorch
from ffsplit_export.export.api import weight_bytes
from ffsplit_export.models.loading import load_model
from ffsplit_export.pipeline import compress
from ffsplit_export.split import SplitConfig

CTX = 256


def rows(groups: list[str]) -> list[dict]:
    """The ffsplit configurations: name, compress() arguments."""
    out = []

    def add(name, q, *, seq=False, other="fp32", hf=0.1, **split):
        out.append(
            dict(
                name=f"{name} {q}" + (" sequential" if seq else ""),
                quantizer=q,
                sequential=seq,
                other_linear=other,
                heavy_fraction=hf,
                split=split,
            )
        )

    int4 = dict(light_format="int4", heavy_format="int8", other="int4")
    s50 = dict(
        light_format="sparse-int8", light_sparsity=0.5, heavy_format="int8", prune_method="sparsegpt", hf=0.3
    )
    s75 = dict(s50, light_sparsity=0.75)
    si4 = dict(light_format="sparse-int4", group_size=32)
    for g in groups:
        for q in ("rtn", "gptq"):
            if g == "int4":
                add("(a) heavy 0.1 int8, light int4 g128, other int4 g128", q, **int4)
                add("(a) heavy 0.1 int8, light int4 g32, other int4 g32", q, **int4, group_size=32)
            elif g == "s50":
                add("(b) heavy 0.3 int8, light sparse-int8@0.5 sparsegpt", q, **s50)
                add("(b) heavy 0.3 int8, light sparse-int4 g32@0.5 sparsegpt", q, **dict(s50, **si4))
            elif g == "s75":
                add("(c) heavy 0.3 int8, light sparse-int8@0.75 sparsegpt", q, **s75)
                add("(c) heavy 0.3 int8, light sparse-int4 g32@0.75 sparsegpt", q, **dict(s75, **si4))
            elif g == "default":
                add("(d) CLI defaults: heavy 0.1 fp32, sparse-int8@0.5 wanda", q)
        if g == "seq":
            add("(a) heavy 0.1 int8, light int4 g128, other int4 g128", "gptq", seq=True, **int4)
            add("(b) heavy 0.3 int8, light sparse-int8@0.5 sparsegpt", "rtn", seq=True, **s50)
            add("(b) heavy 0.3 int8, light sparse-int8@0.5 sparsegpt", "gptq", seq=True, **s50)
            add("(c) heavy 0.3 int8, light sparse-int8@0.75 sparsegpt", "rtn", seq=True, **s75)
            add("(c) heavy 0.3 int8, light sparse-int8@0.75 sparsegpt", "gptq", seq=True, **s75)
    return out


def onnx_bytes(folder: Path) -> int:
    return sum(
        p.stat().st_size
        for p in folder.iterdir()
        if p.suffix in (".onnx", ".onnx_data") or p.name.endswith(".data")
    )


def ort_perplexity(folder: Path, tok, text: str, so=None) -> float:
    from optimum.onnxruntime import ORTModelForCausalLM

    m = ORTModelForCausalLM.from_pretrained(
        folder, session_options=so, provider="CPUExecutionProvider", use_cache=True
    )

    def logits_fn(ids):
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    return perplexity_from_logits(logits_fn, tok, text, CTX, CTX).perplexity


def export(model, pre, task, folder: Path) -> None:
    from ffsplit_export.export.core import ExportOptions, export_split_model

    export_split_model(model, pre, folder, task, ExportOptions(validate=False, overwrite=True), {})


def ort_baselines(model, pre, task, stats, batches, text, work: Path, blocks: list[int]) -> list[dict]:
    """Dense fp32 export, then MatMulNBitsQuantizer DEFAULT / HQQ 4-bit at each block size."""
    import shutil

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    dense_dir = work / "dense"
    res = compress(
        model,
        pre,
        config=SplitConfig(light_format="dense"),
        heavy_fraction=0.0,
        stats=stats,
        batches=batches,
        progress=False,
    )
    export(res.model, pre, task, dense_dir)
    out = []
    t0 = time.time()
    ppl = ort_perplexity(dense_dir, pre, text)
    out.append(
        dict(
            name="ONNX Runtime: dense fp32 export",
            ppl_ort=ppl,
            file_bytes=onnx_bytes(dense_dir),
            seconds=round(time.time() - t0, 1),
        )
    )
    print(f"  {out[-1]['name']:72s} ort {ppl:.4f}  {out[-1]['file_bytes'] / 2**20:.1f} MiB", flush=True)
    for block in blocks:
        for algo in ("DEFAULT", "HQQ"):
            t0 = time.time()
            cfg = (
                DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False)
                if algo == "DEFAULT"
                else HQQWeightOnlyQuantConfig(block_size=block, bits=4)
            )
            qdir = work / f"ort-{algo}-{block}"
            if qdir.exists():
                shutil.rmtree(qdir)
            shutil.copytree(dense_dir, qdir)
            q = MatMulNBitsQuantizer(onnx.load(str(dense_dir / "model.onnx")), algo_config=cfg)
            q.process()
            for p in qdir.glob("model.onnx*"):
                p.unlink()
            q.model.save_model_to_file(str(qdir / "model.onnx"), use_external_data_format=False)
            seconds_q = round(time.time() - t0, 1)
            ppl = ort_perplexity(qdir, pre, text)
            name = f"ONNX Runtime MatMulNBitsQuantizer {algo} 4-bit block {block}"
            out.append(
                dict(
                    name=name,
                    ppl_ort=ppl,
                    file_bytes=onnx_bytes(qdir),
                    quantize_seconds=seconds_q,
                    seconds=round(time.time() - t0, 1),
                )
            )
            print(
                f"  {name:72s} ort {ppl:.4f}  {out[-1]['file_bytes'] / 2**20:.1f} MiB  [quantize {seconds_q} s]",
                flush=True,
            )
            shutil.rmtree(qdir)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="samples/results/quantizer_compare")
    ap.add_argument("--rows", default="int4,s50,s75,default,seq,ort")
    ap.add_argument(
        "--onnx", action="store_true", help="also export the GPTQ rows and evaluate them through ONNX Runtime"
    )
    ap.add_argument("--max-chars", type=int, default=8000)
    ap.add_argument("--ort-blocks", default="32,128")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = [g for g in args.rows.split(",") if g]
    t_all = time.time()

    model, pre, task = load_model("smollm2-135m")
    text = eval_text("bible", args.max_chars)
    batches = make_batches(model, pre, calibration_text("bible", 128), batch_size=8, max_length=128)
    t0 = time.time()
    stats = calibrate(model, batches, hessians=True, progress=False)
    print(f"calibration with Hessians: {time.time() - t0:.1f} s", flush=True)
    dense = perplexity_pytorch(model, pre, text, context_length=CTX, stride=CTX).perplexity
    results: list[dict] = [
        dict(name="dense fp32 (PyTorch)", ppl=dense, model_bytes=weight_bytes(model, model)["compressed"])
    ]
    print(f"  {'dense fp32':72s} ppl {dense:.4f}", flush=True)

    def save():
        (out_dir / "results.json").write_text(json.dumps({"dense_ppl": dense, "rows": results}, indent=1))

    with tempfile.TemporaryDirectory(prefix="quantizer_compare_") as tmp:
        for r in rows(groups):
            t0 = time.time()
            res = compress(
                model,
                pre,
                config=SplitConfig(quantizer=r["quantizer"], **r["split"]),
                heavy_fraction=r["heavy_fraction"],
                other_linear=r["other_linear"],
                sequential=r["sequential"],
                stats=stats,
                batches=batches,
                progress=False,
            )
            secs = time.time() - t0
            ppl = perplexity_pytorch(res.model, pre, text, context_length=CTX, stride=CTX).perplexity
            row = dict(
                name=r["name"],
                quantizer=r["quantizer"],
                sequential=r["sequential"],
                ppl=ppl,
                vs_dense=ppl / dense,
                model_bytes=weight_bytes(model, res.model)["compressed"],
                ffn_ratio=res.report.bytes / res.report.dense_bytes,
                compress_seconds=round(secs, 1),
                config=dict(r["split"], heavy_fraction=r["heavy_fraction"], other_linear=r["other_linear"]),
            )
            if args.onnx and r["quantizer"] == "gptq" and not r["sequential"]:
                folder = Path(tmp) / "ffsplit"
                export(res.model, pre, task, folder)
                from ffsplit_export.runtime import session_options

                row["ppl_ort"] = ort_perplexity(folder, pre, text, session_options())
                row["file_bytes"] = onnx_bytes(folder)
            results.append(row)
            print(
                f"  {row['name']:72s} ppl {ppl:.4f} (x{ppl / dense:.3f})"
                + (f" ort {row['ppl_ort']:.4f}" if "ppl_ort" in row else "")
                + f"  {row['model_bytes'] / 2**20:.1f} MiB  [compress {secs:.1f} s]",
                flush=True,
            )
            save()
            del res
        if "ort" in groups:
            blocks = [int(b) for b in args.ort_blocks.split(",")]
            results += ort_baselines(model, pre, task, stats, batches, text, Path(tmp), blocks)
            save()
    md = markdown(dense, results)
    (out_dir / "results.md").write_text(md)
    print("\n" + md)
    print(f"wrote {out_dir / 'results.json'} and results.md in {(time.time() - t_all) / 60:.1f} min")


def markdown(dense: float, results: list[dict]) -> str:
    lines = [
        f"SmolLM2-135M perplexity, Gospel of Matthew 8000 chars, context {CTX}; dense fp32 {dense:.3f}",
        "",
        "| configuration | perplexity (PyTorch) | vs dense | ONNX Runtime | MiB (weights / ONNX file) | compress s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results[1:]:
        p = r.get("ppl")
        ort = r.get("ppl_ort")
        mib = r.get("model_bytes", r.get("file_bytes", 0)) / 2**20
        ref = p if p is not None else ort
        lines.append(
            f"| {r['name']} | {'' if p is None else f'{p:.3f}'} | x{ref / dense:.3f} | "
            f"{'' if ort is None else f'{ort:.3f}'} | {mib:.1f} | {r.get('compress_seconds', r.get('quantize_seconds', ''))} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
