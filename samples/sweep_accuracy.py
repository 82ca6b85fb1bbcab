"""Accuracy vs size sweep (issues 6 and 11): SmolLM2-135M perplexity, Whisper tiny.en / base WER.

One command writes ``results.json``, ``results.md`` and PNG plots of accuracy vs model bytes:

    OMP_NUM_THREADS=1 python samples/sweep_accuracy.py --output sweep_out --quick   # headline rows
    python samples/sweep_accuracy.py --output sweep_out            # + the full grid (hours on 2 cores)
    python samples/sweep_accuracy.py --output sweep_out --report   # tables and plots from the rows done

Rows, most important first: dense fp32; the three presets (``CompressionConfig.from_preset``,
exported at the accuracy level they ship with); ONNX Runtime's own quantizer
(``onnxruntime.quantization.matmul_nbits_quantizer`` on optimum's fp32 export, the functions of
``samples/frontier.py``: DEFAULT and HQQ at 4 bits block 32 / 128 and DEFAULT 8 bits block 32,
accuracy_level 4, each also with the embedding quantized by that quantizer's Gather path); the
one-shot goal rows of issue 11 (SparseGPT pruning with GPTQ codes in one pass: sparse-int8 and
sparse-int4 light parts at 50 % and 75 %, int8 heavy sets); mixed precision at about equal FFN
bytes (a 1-3 % int8 heavy set chosen by Hessian saliency + GPTQ int4 light against uniform GPTQ
int4 at group 128 / 64 / 32); the goal rows again with the long calibration (SmolLM2: 256
windows of 256 tokens of the calibration half, 65536 tokens against the protocol's ~3900; also
layer by layer, ``--sequential``); recipes near ``balanced`` set against ONNX Runtime's 4-bit
models at no more bytes (group 32, a 30 % int8 heavy set; GPTQ, and round-to-nearest for Whisper,
whose built-in calibration is 16 synthesised clips); then the round-to-nearest rows of issue 6: MatMulNBits int8 / int4
of every linear (the whole model, no heavy set); FFSplit (heavy-hitter heavy set) with light
format x light sparsity x heavy fraction x heavy format (x --other-linear, x prune method); and
the ablation at equal FFN bytes for each headline round-to-nearest sparse-int8 row that has a
heavy set: heavy-hitter split vs uniform compression of the whole FFN (no heavy set, light
sparsity lowered until the FFN bytes match) vs a random heavy set of the same size (same bytes).

Calibration statistics (with Hessians) are computed once per model and reused, and so are the
Hessians of the other linear layers for GPTQ. The protocol is the one of ``ffsplit-export eval``:
perplexity on the first 8000 characters of the held-out Gospel of Matthew (context 256, stride
256), calibration on 128 Genesis verses; WER on the 5 LibriVox clips (71 words: one word is 1.41
points). PyTorch evaluates every PyTorch row (Whisper also: the teacher-forced perplexity of the
dense model's own transcript tokens, smoother than WER on 71 words; the lowercase LibriVox
references are not used for it because a model that loses casing and punctuation scores better
on them); headline FFSplit rows are also exported and evaluated through ONNX Runtime with the
ffsplit library, and ONNX Runtime's quantizer rows only through ONNX Runtime (``--no-onnx`` skips
both). Each finished row is stored in ``OUTPUT/rows/<model>.json``; a rerun skips the rows found
there (``--fresh`` starts over), so a run can be stopped, resumed, or split into one process per
model (the last one to finish writes the combined tables; ``--report`` rewrites them).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ffsplit_export import pipeline
from ffsplit_export.calibrate import calibrate, make_batches
from ffsplit_export.config import CompressionConfig
from ffsplit_export.data.calibration import load_samples
from ffsplit_export.data.evaldata import calibration_text, eval_text, librispeech_clips
from ffsplit_export.eval.evaluate import perplexity_pytorch, transcribe, transcript_perplexity, wer_pytorch
from ffsplit_export.export.api import weight_bytes
from ffsplit_export.models.loading import load_model
from ffsplit_export.pipeline import compress
from ffsplit_export.presets import preset_accuracy_level
from ffsplit_export.split import SplitConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frontier  # noqa: E402  (samples/frontier.py: ONNX Runtime's quantizer, optimum's exports)


@dataclass(frozen=True)
class Row:
    """One configuration of the sweep."""

    group: str  # dense / preset / ort-quant / matmulnbits / ffsplit / uniform / random
    light_format: str = "dense"
    light_sparsity: float = 0.0
    heavy_fraction: float = 0.0
    heavy_format: str = "fp32"
    other_linear: str = "fp32"
    selection: str = "score"
    prune_method: str = "wanda"
    embedding: str = "fp32"
    quantizer: str = "rtn"  # rtn / gptq; ort-quant rows: DEFAULT / HQQ
    group_size: int = 128  # int4 group (light int4 / sparse-int4, --other-linear int4); ort-quant: block
    int4_grid: str = "symmetric"
    preset: str = ""  # group "preset": the preset's name (its config comes from CompressionConfig)
    bits: int = 0  # ort-quant rows: 4 or 8
    # "" = the protocol's calibration (128 Genesis verses, ~3.9k tokens); "long" = LONG_CAL
    calibration: str = ""
    sequential: bool = False  # layer by layer, on the partly compressed model's activations
    gptq_damp: float = 0.0  # GPTQ / SparseGPT damping (--gptq-damp); 0: the default
    # group "preset": fields set over the preset's, as (name, value) pairs (a recipe near a preset)
    overrides: tuple = ()
    headline: bool = False
    note: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def label(self) -> str:
        if self.group == "dense":
            return "dense fp32"
        tail = (f", calibration {LONG_CAL_DESC}" if self.calibration == "long" else "") + (
            ", sequential" if self.sequential else ""
        )
        if self.group == "preset":
            over = ", ".join(f"{k} {v}" for k, v in self.overrides)
            return f"preset {self.preset}" + (f" with {over}" if over else "") + tail
        emb = f", embedding {self.embedding}" if self.embedding != "fp32" else ""
        if self.group == "ort-quant":
            return f"ORT quantizer {self.bits}-bit block {self.group_size} {self.quantizer}{emb}"
        if self.group == "matmulnbits":
            return f"MatMulNBits {self.light_format} (all linears){emb}"
        sp = (
            f"{self.light_format}@{self.light_sparsity:g}"
            if self.light_format in SPARSE
            else self.light_format
        )
        s = f"{self.group}: heavy {self.heavy_fraction:g} {self.heavy_format} + light {sp}"
        if self.light_format in PRUNED:
            s += f" {self.prune_method}"
        int4 = self.light_format in ("int4", "sparse-int4") or self.other_linear == "int4"
        if self.quantizer != "rtn" or self.int4_grid != "symmetric" or (int4 and self.group_size != 128):
            s += f", {self.quantizer}" + (f" g{self.group_size}" if int4 else "")
            s += f" {self.int4_grid}" if self.int4_grid != "symmetric" else ""
        if self.selection != "score" and self.group != "random":
            s += f", {self.selection}-selected heavy set"
        if self.gptq_damp:
            s += f", damp {self.gptq_damp:g}"
        return s + (f", other {self.other_linear}" if self.other_linear != "fp32" else "") + emb + tail


SPARSE = ("sparse-int8", "sparse-fp32", "2:4-int8", "lowrank", "sparse-int4")
PRUNED = ("sparse-int8", "sparse-fp32", "2:4-int8", "sparse-int4")
CTX = 256  # perplexity context length and stride, as in the README's `ffsplit-export eval` commands
# the long calibration: the calibration half of the text source, verses joined into windows of
# LONG_CAL[1] tokens, LONG_CAL[0] of them (65536 tokens, 17x the protocol's; SparseGPT / GPTQ rows)
LONG_CAL = (256, 256)
LONG_CAL_DESC = f"{LONG_CAL[0]}x{LONG_CAL[1]} tokens"
ORT_LEVEL = 4  # MatMulNBits accuracy_level of ONNX Runtime's quantizer rows (as in the frontier)


def grid(quick: bool, onnx: bool = True) -> list[Row]:
    """The configurations, most important first (a stopped run has the headline rows)."""
    rows = [Row("dense", headline=True)]
    rows += [Row("preset", preset=p, headline=True) for p in ("accurate", "balanced", "fast")]
    # issue 11's one-shot goals: SparseGPT prune + GPTQ codes in one pass (the joint pass), int8 heavy
    joint = partial(Row, "ffsplit", prune_method="sparsegpt", quantizer="gptq", heavy_format="int8")
    rows += [
        joint("sparse-int8", 0.5, 0.3, headline=True, note="joint SparseGPT + GPTQ, 50 % goal"),
        joint("sparse-int4", 0.5, 0.3, group_size=32, headline=True, note="joint, sparse-int4 light, 50 %"),
        joint("sparse-int8", 0.75, 0.3, note="joint SparseGPT + GPTQ, 75 % goal"),
        joint("sparse-int4", 0.75, 0.3, group_size=32, note="joint, sparse-int4 light, 75 %"),
        joint("sparse-int8", 0.5, 0.1, note="joint, small int8 heavy set"),
    ]
    # the same goals with 17x the calibration tokens (text models: the long calibration is text)
    long = partial(joint, calibration="long")
    rows += [
        long("sparse-int8", 0.5, 0.3, headline=True, note="50 % goal, long calibration"),
        long("sparse-int8", 0.5, 0.3, sequential=True, note="50 % goal, long calibration, layer by layer"),
        long("sparse-int8", 0.75, 0.3, note="75 % goal, long calibration"),
        long("sparse-int4", 0.5, 0.3, group_size=32, note="sparse-int4 light, 50 %, long calibration"),
        long("sparse-int4", 0.75, 0.3, group_size=32, note="sparse-int4 light, 75 %, long calibration"),
        # damping 0.1 (of the Hessian's mean diagonal) instead of 0.01: the goals' best rows
        long("sparse-int8", 0.5, 0.3, gptq_damp=0.1, headline=True, note="50 % goal, long calibration, damp 0.1"),
        long("sparse-int8", 0.75, 0.3, gptq_damp=0.1, headline=True, note="75 % goal, long calibration, damp 0.1"),
        long("sparse-int4", 0.75, 0.3, group_size=32, gptq_damp=0.1, note="sparse-int4 light, 75 %, damp 0.1"),
    ]
    # recipes near balanced against ONNX Runtime's 4-bit models at no more bytes (group 32 like its
    # best block, a 30 % int8 heavy set); Whisper with round-to-nearest codes, because GPTQ fitted
    # to its built-in calibration (16 synthesised clips) fits them rather than the speech
    near = (("group_size", 32), ("heavy_fraction", 0.3))
    bal = partial(Row, "preset", preset="balanced", headline=True)
    rows += [
        bal(overrides=near, note="vs ORT 4-bit"),
        bal(overrides=near, calibration="long", note="vs ORT 4-bit, long calibration"),
        bal(overrides=(("quantizer", "rtn"), *near), note="vs ORT 4-bit, round-to-nearest"),
        # the bytes left under ORT's best 4-bit model spent on int8 attention, the tied lm_head /
        # embedding table kept int4 (--lm-head)
        bal(
            overrides=(*near, ("other_linear", "int8"), ("lm_head", "int4")),
            note="vs ORT 4-bit, int8 attention",
        ),
    ]
    # mixed precision at about equal FFN bytes: a small Hessian-chosen int8 heavy set + GPTQ int4
    # light, against uniform GPTQ int4 (attention / lm_head fp32 in all of them)
    mse = dict(light_format="int4", quantizer="gptq", int4_grid="asymmetric-mse")
    rows += [Row("uniform", **mse, group_size=g, note="uniform GPTQ int4") for g in (128, 64, 32)]
    rows += [
        Row(
            "ffsplit",
            **mse,
            heavy_fraction=hf,
            heavy_format="int8",
            group_size=g,
            selection="hessian",
            note="mixed precision",
        )  # fmt: skip
        for hf, g in ((0.01, 128), (0.03, 128), (0.03, 64))
    ]
    if onnx:  # ONNX Runtime's quantizer: evaluated only through ONNX Runtime
        for bits, block, algo in ((4, 32, "DEFAULT"), (4, 128, "DEFAULT"), (4, 32, "HQQ"), (4, 128, "HQQ"),
                                  (8, 32, "DEFAULT")):  # fmt: skip
            for emb in ("fp32", "int4"):
                q = Row("ort-quant", "int8" if bits == 8 else "int4", quantizer=algo, group_size=block,
                        bits=bits, embedding=emb, headline=True)  # fmt: skip
                rows.append(q)
    # issue 6's round-to-nearest rows: headline splits (SparseGPT-pruned sparse-int8 light parts,
    # and the int8 "43 % smaller" points)
    sgpt = partial(Row, "ffsplit", "sparse-int8", prune_method="sparsegpt")
    int8 = partial(Row, "ffsplit", "int8", 0.0, 0.1, other_linear="int8", headline=True)
    rows += [
        Row("matmulnbits", "int8", other_linear="int8", headline=True),
        Row("matmulnbits", "int4", other_linear="int4", headline=True),
        Row("matmulnbits", "int4", other_linear="int4", embedding="int8", headline=True),
        Row("ffsplit", "sparse-int8", 0.5, 0.1, headline=True, note="the CLI defaults before presets"),
        sgpt(0.5, 0.3, "int8", headline=True, note="the issue-6 accurate one-shot recipe"),
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
        ),  # fmt: skip
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


def long_calibration(tokenizer) -> list[str]:
    """LONG_CAL[0] texts of about LONG_CAL[1] tokens: consecutive calibration verses joined."""
    texts, cur = [], ""
    for verse in calibration_text("bible"):
        cur = f"{cur} {verse}".strip()
        if len(tokenizer(cur)["input_ids"]) >= LONG_CAL[1]:
            texts.append(cur)
            cur = ""
            if len(texts) == LONG_CAL[0]:
                break
    return texts


class _HessianCache:
    """``linear_hessians`` of the unchanged source model, computed once per set of layers: every
    GPTQ row of one model asks for the same Hessians of its other linear layers (only the
    sequential mode, not used here, asks on a partly compressed model, and is passed through)."""

    def __init__(self, fn):
        self.fn, self.memo = fn, {}

    def __call__(self, model, batches, names, progress=True, stop_after=None):
        if stop_after is not None or not getattr(model, "_sweep_source", False):
            return self.fn(model, batches, names, progress, stop_after)
        key = (id(model), id(batches), tuple(names))
        if key not in self.memo:
            self.memo[key] = self.fn(model, batches, names, progress)
        return {k: v.clone() for k, v in self.memo[key].items()}  # GPTQ may damp them in place


class Bench:
    """One model, its calibration data and statistics, and its metric."""

    def __init__(self, name: str, quick: bool, max_chars: int | None, clips: int | None, work: Path):
        self.name = name
        self.work = work / name
        self.model, self.pre, self.task = load_model(name)
        self.model._sweep_source = True  # the Hessian cache's mark (deep copies keep it; they are not
        # asked: compress computes the other linears' Hessians on the source model)
        self.speech = self.model.config.model_type == "whisper"
        if self.speech:
            samples = load_samples(self.model, None, 16)
            self.clips = librispeech_clips(clips)
            # the dense model's own greedy transcript tokens: the fidelity reference (its tokens, not
            # its text re-tokenized, as in samples/frontier.py)
            hyps = transcribe(self.model, self.pre, self.clips, token_ids=True)
            self.dense_clips = [(a, h) for (a, _), h in zip(self.clips, hyps)]
            self.metric = "wer"
        else:
            samples = calibration_text("bible", 128)
            self.text = eval_text("bible", max_chars)
            self.metric = "perplexity"
        self.batches = make_batches(self.model, self.pre, samples, batch_size=8, max_length=128)
        self.stats = None
        self._long = None  # (batches, statistics) of the long calibration, made when a row asks
        self.quick = quick
        self._dense_onnx = None

    def statistics(self) -> dict:
        """Calibration statistics with Hessians (SparseGPT, GPTQ, Hessian saliency), once."""
        if self.stats is None:
            self.stats = calibrate(self.model, self.batches, hessians=True, progress=False)
        return self.stats

    def calibration_for(self, row: Row) -> tuple[list, dict]:
        """(batches, statistics) of the row's calibration."""
        if row.calibration != "long":
            return self.batches, self.statistics()
        if self.speech:
            raise ValueError(f"{row.label}: the long calibration is text; Whisper rows use the clips")
        if self._long is None:
            batches = make_batches(self.model, self.pre, long_calibration(self.pre), 8, LONG_CAL[1])
            self._long = (batches, calibrate(self.model, batches, hessians=True, progress=False))
        return self._long

    def config(self, row: Row) -> CompressionConfig:
        if row.group == "preset":
            return CompressionConfig.from_preset(row.preset, **dict(row.overrides))
        split = SplitConfig(
            light_format=row.light_format,
            light_sparsity=row.light_sparsity or 0.5,
            heavy_format=row.heavy_format,
            prune_method=row.prune_method,
            group_size=row.group_size,
            quantizer=row.quantizer,
            int4_grid=row.int4_grid,
            **({"gptq_damp": row.gptq_damp} if row.gptq_damp else {}),
        )
        return CompressionConfig.from_split_config(
            split,
            heavy_fraction=row.heavy_fraction,
            selection=row.selection,
            other_linear=row.other_linear,
            embedding=row.embedding,
        )

    def compress(self, row: Row):
        if row.group == "dense":
            return None
        kw = {**self.config(row).compress_kwargs(), "sequential": row.sequential}
        batches, stats = self.calibration_for(row)
        return compress(self.model, self.pre, **kw, stats=stats, batches=batches, progress=False)

    def evaluate(self, model) -> float:
        if self.speech:
            return wer_pytorch(model, self.pre, self.clips).wer
        return perplexity_pytorch(model, self.pre, self.text, context_length=CTX, stride=CTX).perplexity

    def _evaluate_ort(self, ort) -> dict:
        """Metric (and dense-transcript perplexity) of an optimum ORTModel."""
        from ffsplit_export.eval import evaluate as ev

        if self.speech:
            wer = ev.word_error_rate([c[1] for c in self.clips], ev.transcribe(ort, self.pre, self.clips)).wer
            tppl = transcript_perplexity(ort, self.pre, self.dense_clips).perplexity
            return {"onnx": wer, "onnx_transcript_ppl": tppl}

        def logits_fn(ids):
            with torch.no_grad():
                return ort(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

        # never past the model's positions (a fused GroupQueryAttention's rotary cache stops there)
        ctx = min(CTX, int(getattr(self.model.config, "max_position_embeddings", CTX) or CTX))
        return {"onnx": ev.perplexity_from_logits(logits_fn, self.pre, self.text, ctx, ctx).perplexity}

    def evaluate_onnx(self, model, row: Row, res_dir: Path) -> dict:
        """Export ``model`` (our kernels, the row's accuracy level) and evaluate it through ONNX Runtime."""
        from ffsplit_export.export.core import ExportOptions, export_split_model
        from ffsplit_export.runtime import load, session_options

        level = preset_accuracy_level(row.preset) if row.group == "preset" else 0
        opts = ExportOptions(validate=False, overwrite=True, nbits_accuracy_level=level)
        export_split_model(model, self.pre, res_dir, self.task, opts, {})
        out = {"onnx_file_bytes": _file_bytes(res_dir), "onnx_accuracy_level": level}
        threads = torch.get_num_threads()
        ort = load(
            res_dir, session_options_=session_options(intra_op_num_threads=threads, inter_op_num_threads=1)
        )
        out.update(self._evaluate_ort(ort))
        return out

    def dense_onnx(self) -> Path:
        """optimum's fp32 export of the source model (the input of ONNX Runtime's quantizer), once."""
        if self._dense_onnx is None:
            self.work.mkdir(parents=True, exist_ok=True)
            src = self.work / "src"
            if not (src / "config.json").exists():
                self.model.save_pretrained(src)
                self.pre.save_pretrained(src)
            frontier_model = type("Src", (), {"src": src})()
            if self.speech:
                self._dense_onnx = frontier.build_dense_speech(frontier_model, self.work / "dense")
            else:
                self._dense_onnx = frontier.build_dense(frontier_model, self.work / "dense")
        return self._dense_onnx

    def ort_quant(self, row: Row) -> dict:
        """ONNX Runtime's quantizer on optimum's export (frontier.build_ort_quant: tied lm_head untied
        and quantized too, accuracy_level 4); with ``embedding`` int4 the same quantizer's Gather path
        (DEFAULT config, block ``group_size``; it writes 4-bit GatherBlockQuantized only, and HQQ has
        no Gather path) then quantizes the embedding tables of the quantized files."""
        import onnx

        dense = self.dense_onnx()
        slug = f"ort-{row.bits}b-b{row.group_size}-{row.quantizer}"
        path = frontier.build_ort_quant(dense, self.work / f"{slug}-L{ORT_LEVEL}", row.bits, row.group_size,
                                        row.quantizer, ORT_LEVEL)  # fmt: skip
        if row.embedding != "fp32":
            out = self.work / f"{slug}-emb{row.embedding}-L{ORT_LEVEL}"
            files = frontier._quant_files(dense)
            if not (out / files[0]).exists():
                from onnxruntime.quantization.matmul_nbits_quantizer import (
                    DefaultWeightOnlyQuantConfig,
                    MatMulNBitsQuantizer,
                )

                qms = {}
                for f in files:
                    cfg = DefaultWeightOnlyQuantConfig(block_size=row.group_size, bits=4,
                                                       op_types_to_quantize=("Gather",))  # fmt: skip
                    q = MatMulNBitsQuantizer(onnx.load(str(path / f)), bits=4, block_size=row.group_size,
                                             algo_config=cfg)  # fmt: skip
                    q.process()
                    qms[f] = q.model.model if hasattr(q.model, "model") else q.model
                frontier._save_quant(qms, dense, out)
            path = out
        return self._evaluate_ort_files(path) | {"onnx_file_bytes": _file_bytes(path), "path": str(path)}

    def _evaluate_ort_files(self, path: Path) -> dict:
        threads = torch.get_num_threads()
        if self.speech:
            return self._evaluate_ort(frontier.load_speech(path, threads))
        return {"onnx": frontier.perplexity(path, "ort-quant", self.text, self.pre, threads)}


def _file_bytes(path: Path) -> int:
    """Bytes of the ONNX files (and their external data) that ONNX Runtime loads from an export
    folder: Whisper's encoder and merged decoder only (``frontier.speech_files``), not the
    unmerged decoders the export also writes."""
    path = Path(path)
    files = (
        frontier.speech_files(path) if (path / "encoder_model.onnx").exists() else sorted(path.glob("*.onnx"))
    )
    data = [f.with_name(f.name + sfx) for f in files for sfx in ("_data", ".data")]
    return sum(f.stat().st_size for f in files + data if f.exists())


def _result(bench: Bench, row: Row) -> dict:
    return {
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
        "prune_method": row.prune_method,
        "quantizer": row.quantizer,
        "group_size": row.group_size,
        "int4_grid": row.int4_grid,
        "preset": row.preset,
        "overrides": dict(row.overrides),
        "calibration": LONG_CAL_DESC if row.calibration == "long" else "protocol",
        "sequential": row.sequential,
        "note": row.note,
        "metric": bench.metric,
    }


def run_row(bench: Bench, row: Row, onnx: bool, tmp: Path) -> dict:
    t0 = time.time()
    out = _result(bench, row)
    if row.group == "ort-quant":
        out.update(bench.ort_quant(row))
        out["seconds"] = round(time.time() - t0, 1)
        print(f"  {row.label:70s} {bench.metric} (onnx {out['onnx']:.4f})"
              + (f" transcript ppl {out['onnx_transcript_ppl']:.4f}" if bench.speech else "")
              + f"  file {out['onnx_file_bytes'] / 2**20:.1f} MiB  [{out['seconds']} s]", flush=True)  # fmt: skip
        return out
    res = bench.compress(row)
    model = bench.model if res is None else res.model
    wb = weight_bytes(bench.model, model)
    ffn_dense = res.report.dense_bytes if res is not None else None
    if row.group == "preset":
        out["config"] = res.report.config
    out.update(
        model_bytes=wb["compressed"],
        model_bytes_ratio=wb["ratio"],
        ffn_bytes=res.report.bytes if res is not None else None,
        ffn_ratio=res.report.bytes / ffn_dense if res is not None else 1.0,
        pytorch=bench.evaluate(model),
    )
    if bench.speech:  # a smooth companion of WER on 71 words: how likely the dense transcripts stay
        out["transcript_ppl"] = transcript_perplexity(model, bench.pre, bench.dense_clips).perplexity
    if onnx and row.headline and row.group in ("ffsplit", "preset"):
        out.update(bench.evaluate_onnx(model, row, tmp / f"{bench.name}-{abs(hash(row.label))}"))
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
        if dense is None:  # a partial run (--only) without the dense row: nothing to compare with
            continue
        extra = " ppl of the dense transcripts |" if speech else ""
        lines += [
            f"### {model}: {metric} (lower is better)",
            "",
            f"| configuration | FFN bytes / dense | model MiB (/ dense) | {metric} PyTorch | vs dense |{extra}"
            " ONNX Runtime | ONNX file MiB | note |",
            "| --- | ---: | ---: | ---: | ---: |" + (" ---: |" if speech else "") + " ---: | ---: | --- |",
        ]
        for r in rows:
            ox = ""
            if speech:
                if "pytorch" in r:
                    val = f"{100 * r['pytorch']:.2f} % | {100 * (r['pytorch'] - dense['pytorch']):+.2f} pt"
                    tp = r["transcript_ppl"]
                    val += f" | {tp:.3f} (x{tp / dense['transcript_ppl']:.3f})"
                else:
                    val = " |  | "
                if "onnx" in r:
                    ox = f"{100 * r['onnx']:.2f} %"
                    if "onnx_transcript_ppl" in r:
                        ox += f", ppl {r['onnx_transcript_ppl']:.3f} (x{r['onnx_transcript_ppl'] / dense['transcript_ppl']:.3f})"
            else:
                val = (
                    f"{r['pytorch']:.3f} | x{r['pytorch'] / dense['pytorch']:.3f}"
                    if "pytorch" in r
                    else " | "
                )
                ox = f"{r['onnx']:.3f} (x{r['onnx'] / dense['pytorch']:.3f})" if "onnx" in r else ""
            ffn = f"{r['ffn_ratio']:.3f}" if r.get("ffn_ratio") is not None else ""
            mib = (
                f"{r['model_bytes'] / 2**20:.1f} ({r['model_bytes_ratio']:.2f})" if "model_bytes" in r else ""
            )
            fmib = f"{r['onnx_file_bytes'] / 2**20:.1f}" if "onnx_file_bytes" in r else ""
            lines.append(f"| {r['label']} | {ffn} | {mib} | {val} | {ox} | {fmib} | {r['note']} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    style = {
        "dense": ("k", "*"),
        "preset": ("tab:purple", "D"),
        "ort-quant": ("tab:brown", "P"),
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
            # ONNX Runtime's quantizer rows have only ONNX Runtime numbers and file bytes
            okey = {"pytorch": "onnx", "transcript_ppl": "onnx_transcript_ppl"}[key]
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for group, (color, marker) in style.items():
                pts = [r for r in rows if r["group"] == group]
                xy = [
                    (r["model_bytes"] / 2**20, r[key])
                    if key in r
                    else (r["onnx_file_bytes"] / 2**20, r[okey])
                    for r in pts
                    if key in r or (okey in r and "onnx_file_bytes" in r)
                ]
                if xy:
                    label = group + (" (ONNX Runtime, file bytes)" if group == "ort-quant" else "")
                    ax.scatter(
                        [p[0] for p in xy], [p[1] for p in xy], c=color, marker=marker, label=label, s=50
                    )
            if name != "wer":
                ax.set_yscale("log")
            ax.set_xlabel("model weight bytes (MiB)")
            ax.set_ylabel(name.replace("_", " ") + " (PyTorch; ORT rows: ONNX Runtime)")
            ax.set_title(f"{model}: {name.replace('_', ' ')} vs size")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            p = out / f"{model}_{name}_vs_bytes.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
    return paths


def _load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def report(out: Path, models: list[str]) -> list[dict]:
    """Combine the per-model row files (``models`` first, then any other found) into the outputs."""
    found = [p.stem for p in sorted((out / "rows").glob("*.json"))]
    results = [r for m in dict.fromkeys(models + found) for r in _load_rows(out / "rows" / f"{m}.json")]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    plot(results, out)
    return results


def run_model(name: str, args, out: Path, work: Path, tmp: Path, only: list[str]) -> None:
    """Every row of one model not stored yet, each stored in OUTPUT/rows/<model>.json when done."""
    print(f"{name}:", flush=True)
    store = out / "rows" / f"{name}.json"
    results = [] if args.fresh else _load_rows(store)
    stored = {r["label"]: r for r in results}
    bench = Bench(name, args.quick, args.max_chars, None, work)

    def run(row: Row, onnx: bool) -> dict:
        if row.label not in stored:
            stored[row.label] = run_row(bench, row, onnx, tmp)
            results.append(stored[row.label])
            store.write_text(json.dumps(results, indent=1))
        return stored[row.label]

    for row in grid(args.quick, not args.no_onnx):
        if only and not any(s in row.label for s in only):
            continue
        if row.calibration == "long" and bench.speech:
            continue  # the long calibration is text
        res = run(row, not args.no_onnx)
        # the equal-bytes ablation, for headline round-to-nearest sparse-int8 splits whose other
        # weights stay fp32 (equal_bytes_uniform's bytes model is int8 values)
        ablate = (
            row.light_format in ("sparse-int8", "sparse-fp32")
            and row.quantizer == "rtn"
            and row.other_linear == "fp32"
            and row.embedding == "fp32"
        )
        if row.group == "ffsplit" and row.headline and ablate:
            probe, rnd = ablation_rows(row)
            probe_res = run(probe, False)
            run(rnd, False)
            run(equal_bytes_uniform(bench, res, probe_res, row), False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="sweep_accuracy_out")
    ap.add_argument("--quick", action="store_true", help="the headline rows and their ablation only")
    ap.add_argument("--models", default="smollm2-135m,whisper-tiny.en,whisper-base")
    ap.add_argument(
        "--no-onnx", action="store_true",
        help="skip everything that runs in ONNX Runtime (headline rows' column, ONNX Runtime's quantizer rows)",
    )  # fmt: skip
    ap.add_argument(
        "--max-chars", type=int, default=8000, help="evaluation text length in characters (default 8000)"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=None, help="folder for optimum's exports and ONNX Runtime's quantized "
                    "models (kept, reused by a rerun; default TMPDIR/sweep_accuracy_work)")  # fmt: skip
    ap.add_argument("--fresh", action="store_true", help="ignore the rows stored by an earlier run")
    ap.add_argument(
        "--report", action="store_true", help="only rewrite the tables and plots from the stored rows"
    )
    ap.add_argument(
        "--only", default=None, help="comma list of substrings: run only rows whose label has one"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    if args.report:
        report(out, models)
        return
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "sweep_accuracy_work"
    only = [s for s in (args.only or "").split(",") if s]
    pipeline.linear_hessians = _HessianCache(pipeline.linear_hessians)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="sweep_onnx_") as tmp:
        for name in models:
            run_model(name, args, out, work, Path(tmp), only)
    results = report(out, models)
    print("\n" + markdown(results))
    print(
        f"wrote {out / 'results.json'}, {out / 'results.md'} and plots in {(time.time() - t0) / 60:.1f} min"
    )
    if any(math.isnan(r.get("pytorch", r.get("onnx", 0.0))) for r in results):
        print("note: some rows are NaN")


if __name__ == "__main__":
    main()
