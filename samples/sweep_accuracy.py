"""Accuracy vs size sweep (issue 6): SmolLM2-135M perplexity and Whisper tiny.en WER.

One command writes ``results.json``, ``results.md`` and PNG plots of accuracy vs model bytes:

    python samples/sweep_accuracy.py --output sweep_out --quick    # headline rows + ablation (~25 min)
    python samples/sweep_accuracy.py --output sweep_out            # + the full grid (hours on 2 cores)

Rows: dense fp32; MatMulNBits int8 / int4 of every linear (the whole model, no heavy set);
FFSplit (heavy-hitter heavy set) with light format x light sparsity x heavy fraction x heavy
format (x --other-linear, x prune method); and the ablation at equal FFN bytes for each
headline FFSplit row that has a heavy set: heavy-hitter split vs uniform compression of the
whole FFN (no heavy set, light sparsity lowered until the FFN bytes match) vs a random heavy
set of the same size (same bytes). Calibration statistics are computed once per model and
reused. The protocol is the one of ``ffsplit-export eval``: perplexity on the first 8000
characters of the held-out Gospel of Matthew (context 256, stride 256), calibration on 128
Genesis verses; WER on the 5 LibriVox clips (71 words: one word is 1.41 points). PyTorch
evaluates every row (Whisper also: the teacher-forced perplexity of the dense model's own
transcripts, smoother than WER on 71 words; the lowercase LibriVox references are not used for
it because a model that loses casing and punctuation scores better on them); headline FFSplit rows are also exported and evaluated through ONNX
Runtime (``--no-onnx`` to skip).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ffsplit_export.calibrate import calibrate, make_batches
from ffsplit_export.data.calibration import load_samples
from ffsplit_export.data.evaldata import calibration_text, eval_text, librispeech_clips
from ffsplit_export.eval.evaluate import perplexity_pytorch, transcribe, transcript_perplexity, wer_pytorch
from ffsplit_export.export.api import weight_bytes
from ffsplit_export.models.loading import load_model
from ffsplit_export.pipeline import compress
from ffsplit_export.split import SplitConfig


@dataclass(frozen=True)
class Row:
    """One configuration of the sweep."""

    group: str  # dense / matmulnbits / ffsplit / uniform / random
    light_format: str = "dense"
    light_sparsity: float = 0.0
    heavy_fraction: float = 0.0
    heavy_format: str = "fp32"
    other_linear: str = "fp32"
    selection: str = "score"
    prune_method: str = "wanda"
    embedding: str = "fp32"
    headline: bool = False
    note: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def label(self) -> str:
        if self.group == "dense":
            return "dense fp32"
        emb = ", embedding int8" if self.embedding == "int8" else ""
        if self.group == "matmulnbits":
            return f"MatMulNBits {self.light_format} (all linears){emb}"
        sp = (
            f"{self.light_format}@{self.light_sparsity:g}"
            if self.light_format in SPARSE
            else self.light_format
        )
        s = f"{self.group}: heavy {self.heavy_fraction:g} {self.heavy_format} + light {sp}"
        if self.light_format in ("sparse-int8", "sparse-fp32", "2:4-int8"):
            s += f" {self.prune_method}"
        return s + (f", other {self.other_linear}" if self.other_linear != "fp32" else "") + emb


SPARSE = ("sparse-int8", "sparse-fp32", "2:4-int8", "lowrank")
CTX = 256  # perplexity context length and stride, as in the README's `ffsplit-export eval` commands


def grid(quick: bool) -> list[Row]:
    """The configurations, headline rows first."""
    # headline splits: SparseGPT-pruned sparse-int8 light parts, and the int8 "43 % smaller" points
    sgpt = partial(Row, "ffsplit", "sparse-int8", prune_method="sparsegpt")
    int8 = partial(Row, "ffsplit", "int8", 0.0, 0.1, other_linear="int8", headline=True)
    rows = [
        Row("dense", headline=True),
        Row("matmulnbits", "int8", other_linear="int8", headline=True),
        Row("matmulnbits", "int4", other_linear="int4", headline=True),
        Row("matmulnbits", "int4", other_linear="int4", embedding="int8", headline=True),
        Row("ffsplit", "sparse-int8", 0.5, 0.1, headline=True, note="the CLI defaults"),
        sgpt(0.5, 0.3, "int8", headline=True, note="accurate one-shot recipe"),
        sgpt(0.5, 0.1, "int8", headline=True, note="small int8 heavy set"),
        int8(note="FFSplit's 43 % smaller point"),
        int8(embedding="int8", note="FFSplit's 43 % smaller point, int8 embedding"),
        sgpt(
            0.5,
            0.3,
            "int8",
            "int8",
            embedding="int8",
            headline=True,
            note="accurate recipe, everything else int8",
        ),
        sgpt(0.55, 0.1, "int8", "int4", headline=True, note="sized to the int4 model"),
        sgpt(0.75, 0.3, "int8"),
        sgpt(0.75, 0.2, "int8", "int4", note="sized to the int4 model"),
    ]
    if quick:
        return rows
    for fmt in ("sparse-int8", "2:4-int8", "lowrank", "int4", "int8", "sparse-fp32"):
        for sp in (0.5, 0.6, 0.75) if fmt in ("sparse-int8", "lowrank", "sparse-fp32") else (0.5,):
            for hf in (0.0, 0.1, 0.3):
                for hfmt in ("fp32", "int8") if hf else ("fp32",):
                    for other in ("fp32", "int8"):
                        sp_ = sp if fmt in SPARSE else 0.0
                        group = "ffsplit" if hf else "uniform"
                        rows.append(Row(group, fmt, sp_, hf, hfmt, other_linear=other))
    rows += [Row("ffsplit", "sparse-int8", 0.75, hf, "fp16") for hf in (0.05, 0.1, 0.2)]
    rows += [Row("ffsplit", "sparse-int8", sp, 0.3, "int8", prune_method="sparsegpt") for sp in (0.6, 0.9)]
    return list(dict.fromkeys(rows))


def ablation_rows(base: Row) -> list[Row]:
    """Uniform (no heavy set, same sparsity), and random heavy set of the same size (same bytes)."""
    same = dict(
        light_format=base.light_format, light_sparsity=base.light_sparsity, prune_method=base.prune_method
    )
    return [
        Row("uniform", **same, note="same light sparsity (fewer bytes)"),
        Row(
            "random",
            **same,
            heavy_fraction=base.heavy_fraction,
            heavy_format=base.heavy_format,
            selection="random",
            note="random heavy set: same size, same bytes",
        ),
    ]


# ------------------------------------------------------------------------------ models


class Bench:
    """One model, its calibration data and statistics, and its metric."""

    def __init__(self, name: str, quick: bool, max_chars: int | None, clips: int | None):
        self.name = name
        self.model, self.pre, self.task = load_model(name)
        self.speech = self.model.config.model_type == "whisper"
        if self.speech:
            samples = load_samples(self.model, None, 16)
            self.clips = librispeech_clips(clips)
            # the dense model's own greedy transcripts (cased, punctuated): the fidelity reference
            hyps = transcribe(self.model, self.pre, self.clips)
            self.dense_clips = [(a, h) for (a, _), h in zip(self.clips, hyps)]
            self.metric = "wer"
        else:
            samples = calibration_text("bible", 128)
            self.text = eval_text("bible", max_chars)
            self.metric = "perplexity"
        self.batches = make_batches(self.model, self.pre, samples, batch_size=8, max_length=128)
        self.stats = calibrate(self.model, self.batches, progress=False)
        self.quick = quick

    def compress(self, row: Row):
        if row.group == "dense":
            return None
        cfg = SplitConfig(
            light_format=row.light_format,
            light_sparsity=row.light_sparsity or 0.5,
            heavy_format=row.heavy_format,
            prune_method=row.prune_method,
        )
        return compress(
            self.model,
            self.pre,
            config=cfg,
            heavy_fraction=row.heavy_fraction,
            selection=row.selection,
            other_linear=row.other_linear,
            embedding=row.embedding,
            stats=self.stats,
            batches=self.batches,
            progress=False,
        )

    def evaluate(self, model) -> float:
        if self.speech:
            return wer_pytorch(model, self.pre, self.clips).wer
        return perplexity_pytorch(model, self.pre, self.text, context_length=CTX, stride=CTX).perplexity

    def evaluate_onnx(self, model, res_dir: Path) -> float:
        from ffsplit_export.eval import evaluate as ev
        from ffsplit_export.export.core import ExportOptions, export_split_model
        from ffsplit_export.runtime import load

        export_split_model(
            model, self.pre, res_dir, self.task, ExportOptions(validate=False, overwrite=True), {}
        )
        ort = load(res_dir)
        if self.speech:
            return ev.word_error_rate(
                [c[1] for c in self.clips], ev.transcribe(ort, self.pre, self.clips)
            ).wer

        def logits_fn(ids):
            with torch.no_grad():
                return ort(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

        return ev.perplexity_from_logits(logits_fn, self.pre, self.text, CTX, CTX).perplexity


def run_row(bench: Bench, row: Row, onnx: bool, tmp: Path) -> dict:
    t0 = time.time()
    res = bench.compress(row)
    model = bench.model if res is None else res.model
    wb = weight_bytes(bench.model, model)
    ffn_dense = res.report.dense_bytes if res is not None else None
    out = {
        "model": bench.name,
        "label": row.label,
        "group": row.group,
        "light_format": row.light_format,
        "light_sparsity": row.light_sparsity,
        "heavy_fraction": row.heavy_fraction,
        "heavy_format": row.heavy_format,
        "other_linear": row.other_linear,
        "embedding": row.embedding,
        "selection": row.selection,
        "note": row.note,
        "model_bytes": wb["compressed"],
        "model_bytes_ratio": wb["ratio"],
        "ffn_bytes": res.report.bytes if res is not None else None,
        "ffn_ratio": res.report.bytes / ffn_dense if res is not None else 1.0,
        "metric": bench.metric,
        "pytorch": bench.evaluate(model),
    }
    if bench.speech:  # a smooth companion of WER on 71 words: how likely the dense transcripts stay
        out["transcript_ppl"] = transcript_perplexity(model, bench.pre, bench.dense_clips).perplexity
    if onnx and row.headline and row.group == "ffsplit":
        out["onnx"] = bench.evaluate_onnx(model, tmp / f"{bench.name}-{abs(hash(row.label))}")
    out["seconds"] = round(time.time() - t0, 1)
    print(
        f"  {row.label:70s} {bench.metric} {out['pytorch']:.4f}"
        + (f" (onnx {out['onnx']:.4f})" if "onnx" in out else "")
        + (f" transcript ppl {out['transcript_ppl']:.4f}" if "transcript_ppl" in out else "")
        + f"  ffn x{out['ffn_ratio']:.3f} model {wb['compressed'] / 2**20:.1f} MiB  [{out['seconds']} s]",
        flush=True,
    )
    return out


def equal_bytes_uniform(bench: Bench, base_result: dict, probe: dict, row: Row) -> Row:
    """Uniform row whose light sparsity gives the FFN bytes of ``base_result`` (bytes are linear in density)."""
    ffn_dense = base_result["ffn_bytes"] / base_result["ffn_ratio"]
    n_weights = ffn_dense / 4  # FFN weights (the biases are few)
    density = 1.0 - probe["light_sparsity"]
    c0 = probe["ffn_bytes"] - n_weights * density
    new_density = (base_result["ffn_bytes"] - c0) / n_weights
    sp = min(0.99, max(0.0, round(1.0 - new_density, 4)))
    return Row("uniform", row.light_format, sp, 0.0, prune_method=row.prune_method, note="equal FFN bytes")


# ------------------------------------------------------------------------------ output


def markdown(results: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
        rows = list({r["label"]: r for r in results if r["model"] == model}.values())  # each row once
        metric = rows[0]["metric"]
        speech = metric == "wer"
        dense = next((r for r in rows if r["group"] == "dense"), None)
        extra = " ppl of the dense transcripts |" if speech else ""
        lines += [
            f"### {model}: {metric} (lower is better)",
            "",
            f"| configuration | FFN bytes / dense | model MiB (/ dense) | {metric} PyTorch | vs dense |{extra}"
            " ONNX Runtime | note |",
            "| --- | ---: | ---: | ---: | ---: |" + (" ---: |" if speech else "") + " ---: | --- |",
        ]
        for r in rows:
            if speech:
                val, rel = f"{100 * r['pytorch']:.2f} %", f"{100 * (r['pytorch'] - dense['pytorch']):+.2f} pt"
                ox = f"{100 * r['onnx']:.2f} %" if "onnx" in r else ""
                tp = r["transcript_ppl"]
                val += f" | {rel} | {tp:.3f} (x{tp / dense['transcript_ppl']:.3f})"
            else:
                val = f"{r['pytorch']:.3f} | x{r['pytorch'] / dense['pytorch']:.3f}"
                ox = f"{r['onnx']:.3f}" if "onnx" in r else ""
            lines.append(
                f"| {r['label']} | {r['ffn_ratio']:.3f} | {r['model_bytes'] / 2**20:.1f} "
                f"({r['model_bytes_ratio']:.2f}) | {val} | {ox} | {r['note']} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    style = {
        "dense": ("k", "*"),
        "matmulnbits": ("tab:red", "s"),
        "ffsplit": ("tab:blue", "o"),
        "uniform": ("tab:orange", "^"),
        "random": ("tab:green", "v"),
    }
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        series = [("pytorch", rows[0]["metric"])]
        if rows[0]["metric"] == "wer":
            series.append(("transcript_ppl", "dense_transcript_perplexity"))
        for key, name in series:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for group, (color, marker) in style.items():
                pts = [r for r in rows if r["group"] == group]
                if pts:
                    ax.scatter(
                        [r["model_bytes"] / 2**20 for r in pts],
                        [r[key] for r in pts],
                        c=color,
                        marker=marker,
                        label=group,
                        s=50,
                    )
            if name != "wer":
                ax.set_yscale("log")
            ax.set_xlabel("model weight bytes (MiB)")
            ax.set_ylabel(name.replace("_", " ") + " (PyTorch)")
            ax.set_title(f"{model}: {name.replace('_', ' ')} vs size")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            p = out / f"{model}_{name}_vs_bytes.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="sweep_accuracy_out")
    ap.add_argument(
        "--quick", action="store_true", help="the headline rows and their ablation only (~25 min, 2 cores)"
    )
    ap.add_argument("--models", default="smollm2-135m,whisper-tiny.en")
    ap.add_argument(
        "--no-onnx", action="store_true", help="skip the ONNX Runtime evaluation of headline rows"
    )
    ap.add_argument(
        "--max-chars", type=int, default=8000, help="evaluation text length in characters (default 8000)"
    )
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    max_chars = args.max_chars
    results: list[dict] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="sweep_onnx_") as tmp:
        for name in args.models.split(","):
            print(f"{name}:", flush=True)
            bench = Bench(name, args.quick, max_chars, None)
            rows = grid(args.quick)
            done: dict[Row, dict] = {}
            for row in rows:
                done[row] = run_row(bench, row, not args.no_onnx, Path(tmp))
                results.append(done[row])
                # the equal-bytes ablation, for headline splits whose other weights stay fp32
                ablate = row.light_format in SPARSE and row.other_linear == "fp32" and row.embedding == "fp32"
                if row.group == "ffsplit" and row.headline and ablate:
                    probe, rnd = ablation_rows(row)
                    for extra in (probe, rnd):
                        if extra not in done:
                            done[extra] = run_row(bench, extra, False, Path(tmp))
                            results.append(done[extra])
                    eq = equal_bytes_uniform(bench, done[row], done[probe], row)
                    if eq not in done:
                        done[eq] = run_row(bench, eq, False, Path(tmp))
                        results.append(done[eq])
                (out / "results.json").write_text(json.dumps(results, indent=1))
            del bench
    (out / "results.md").write_text(markdown(results))
    plots = plot(results, out)
    print("\n" + markdown(results))
    print(
        f"wrote {out / 'results.json'}, {out / 'results.md'}, {', '.join(map(str, plots))} "
        f"in {(time.time() - t0) / 60:.1f} min"
    )
    if any(math.isnan(r["pytorch"]) for r in results):
        print("note: some rows are NaN")


if __name__ == "__main__":
    main()
