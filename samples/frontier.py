"""The speed x accuracy front (issue 13): every recipe and ONNX Runtime's own baselines, one run.

For each model and each recipe the model is exported once and measured through ONNX Runtime
with the runtime settings the export ships with (MatMulNBits ``accuracy_level`` is a node
attribute, so the accuracy is that of the graph that is timed):

* accuracy: perplexity on the held-out half of the Bible text (README protocol: first
  ``--max-chars`` characters of the Gospel of Matthew, context 256, stride 256);
* decode ms/token (prompt ``--prompt`` tokens, ``--tokens`` single-token steps, IOBinding with
  past key/values fed back) and prefill ms, ``--threads`` intra-op threads; every timed run
  opens each variant in turn (A B C ... A B C ...), medians over ``--runs``;
* file bytes, weight bytes read per decode token (``ffsplit_export.bench.weight_bytes``: the
  embedding table counts one row) plus the KV cache at the mean context, and the effective
  bandwidth (bytes read / decode time) against the read bandwidth measured in the same run
  (NumPy sum over a large array, 1 thread, and ONNX Runtime's fp32 MatMul with M=1).

Baselines made as a user makes them: optimum's dense fp32 export; ONNX Runtime's
``MatMulNBitsQuantizer`` (8 / 4 bit, block 32 / 128, DEFAULT / HQQ, accuracy_level 0 / 4, tied
lm_head untied first so it is quantized too); with ``--genai-python`` (a virtual environment
made by ``samples/genai_builder_env.sh``) the ONNX Runtime GenAI model builder's int4 CPU model,
whose perplexity comes from its ONNX graph in ONNX Runtime and whose decode speed, like that of
our exports, is also measured in onnxruntime-genai's own generation loop.

Whisper (``--models whisper-tiny.en``, ``whisper-base``, ``tiny-whisper``): accuracy is the WER
on the five offline LibriVox clips plus the teacher-forced perplexity of the dense PyTorch
model's own transcripts (README protocol; ``ffsplit_export.eval.evaluate.transcribe`` /
``transcript_perplexity`` on optimum's ``ORTModelForSpeechSeq2Seq``), speed is the seconds to
transcribe the clips (greedy), the median decoder call with a KV cache in that same loop
(ms/token) and the median encoder call (one per 30 s window: 1500 frames, the prefill of
speech), interleaved and medians as above; bytes are those of the files optimum loads
(encoder + merged decoder). ONNX Runtime's quantizer is applied to the encoder and the merged
decoder, the tied lm_head (a Transpose inside the If branches) folded to a constant first.

Outputs under ``--output``: ``<stem>.json``, ``<stem>.md`` (``--stem``, default ``frontier``) and
``<model>_front.png`` (perplexity against decode ms/token, Pareto front drawn).

    python samples/frontier.py --models smollm2-135m --output samples/results/frontier \\
        --genai-python "$(samples/genai_builder_env.sh)"
    python samples/frontier.py --models tiny-llama --quick --output /tmp/front   # smoke test, < 1 min
    python samples/frontier.py --models whisper-tiny.en --output samples/results/frontier \\
        --work /tmp/front-work --stem whisper_tiny_en
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CTX = 256  # perplexity context and stride (README protocol)
TASK = "text-generation-with-past"


# ------------------------------------------------------------------------------ recipes


@dataclass(frozen=True)
class Recipe:
    """One point: ``kind`` is dense | ort-quant | ffsplit | genai-builder."""

    name: str
    kind: str
    options: tuple = ()  # sorted (key, value) pairs
    note: str = ""

    @property
    def opts(self) -> dict:
        return dict(self.options)


def _r(name: str, kind: str, note: str = "", **opts) -> Recipe:
    return Recipe(name, kind, tuple(sorted(opts.items())), note)


def ffsplit_recipe(name: str, note: str = "", **opts) -> Recipe:
    return _r(name, "ffsplit", note, **opts)


def recipes(quick: bool) -> list[Recipe]:
    """Baselines first, then ffsplit recipes (the presets among them)."""
    from ffsplit_export.config import CompressionConfig
    from ffsplit_export.presets import PRESET_FIELDS, PRESETS

    out = [_r("dense fp32 (optimum)", "dense")]
    if quick:
        out += [
            _r("ORT int4 b32 DEFAULT L4", "ort-quant", bits=4, block=32, algo="DEFAULT", level=4),
            _r("ORT int8 b128 DEFAULT L4", "ort-quant", bits=8, block=128, algo="DEFAULT", level=4),
        ]
    else:
        for level in (0, 4):
            for block in (32, 128):
                if level == 4:  # 8-bit at level 0 runs at ~1 s/token here: never on the front
                    out.append(
                        _r(
                            f"ORT int8 b{block} DEFAULT L{level}",
                            "ort-quant",
                            bits=8,
                            block=block,
                            algo="DEFAULT",
                            level=level,
                        )
                    )
                for algo in ("DEFAULT", "HQQ"):
                    out.append(
                        _r(
                            f"ORT int4 b{block} {algo} L{level}",
                            "ort-quant",
                            bits=4,
                            block=block,
                            algo=algo,
                            level=level,
                        )
                    )
    out.append(
        ffsplit_recipe(
            "ffsplit old default (wanda sparse-int8 0.5, heavy 0.1 fp32, L0)",
            "--preset none: each option's own default (the CLI defaults before presets)",
            **{k: v for k, v in CompressionConfig().to_dict().items() if k in PRESET_FIELDS},
            nbits_accuracy_level=0,
        )
    )
    for name, p in PRESETS.items():
        fields = {k: v for k, v in p.items() if k != "note"}
        # the stock MatMulNBits subgraph (--no-fused-ffn); on ort-cpu the export's default is the fused row
        out.append(ffsplit_recipe(f"preset {name}", "--no-fused-ffn: " + p.get("note", ""), **fields))
        if quick:
            continue
        # issue 12: the same compressed model, one ffsplit::FusedFFNNBits node per FFN, then light
        # neurons skipped at calibrated thresholds (the preset's calibration batches)
        out.append(
            ffsplit_recipe(
                f"preset {name} fused", "the ort-cpu default (--fused-ffn)", **fields, fused_ffn=True
            )
        )
        if name == "balanced":
            out += [
                ffsplit_recipe(
                    f"preset {name} fused, act. sparsity {f}",
                    f"--activation-sparsity {f}",
                    **fields,
                    fused_ffn=True,
                    activation_sparsity=f,
                )
                for f in (0.25, 0.4, 0.5)
            ]
    if quick:
        return out
    # candidates around the presets (what chose them)
    bal = {k: v for k, v in PRESETS["balanced"].items() if k != "note"}
    out += [
        ffsplit_recipe(
            "balanced with RTN (no GPTQ)",
            "the same bytes with round-to-nearest codes",
            **{**bal, "quantizer": "rtn"},
        ),
        ffsplit_recipe(
            "sparse-int4 0.5 sgpt g32 + heavy 0.1 int8, other int4, emb int8, GPTQ, L4",
            "joint SparseGPT prune + GPTQ, sparse-int4 light part",
            **{**bal, "light_format": "sparse-int4", "prune_method": "sparsegpt"},
        ),
    ]
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------ building


def _log(msg: str) -> None:
    print(f"[frontier {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Model:
    """A source model: its transformers directory, calibration statistics and evaluation text."""

    def __init__(self, name: str, work: Path, quick: bool, max_chars: int, num_samples: int):
        from ffsplit_export.calibrate import calibrate, make_batches
        from ffsplit_export.data.evaldata import calibration_text, eval_text
        from ffsplit_export.models.loading import load_model

        self.name = name
        self.model, self.pre, task = load_model(name)
        if task != TASK:
            raise SystemExit(f"{name}: task {task}; the frontier measures decoder-only LMs ({TASK}) so far")
        self.src = work / "src"
        if not (self.src / "config.json").exists():
            self.model.save_pretrained(self.src)
            self.pre.save_pretrained(self.src)
        self.text = eval_text("bible", max_chars)
        self._calib = lambda: make_batches(
            self.model, self.pre, calibration_text("bible", num_samples), batch_size=8, max_length=128
        )
        self._stats = None
        self._calibrate = calibrate

    def calibration(self) -> tuple[dict, list]:
        """(statistics, batches), computed once on first use (cached exports need none)."""
        if self._stats is None:
            self.batches = self._calib()
            # with the Hessians SparseGPT / GPTQ need, so every recipe shares one pass
            self._stats = self._calibrate(self.model, self.batches, hessians=True, progress=False)
        return self._stats, self.batches


def build_dense(m: Model, out: Path) -> Path:
    if not (out / "model.onnx").exists():
        from optimum.exporters.onnx import main_export

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        main_export(str(m.src), tmp, task=TASK, do_validation=False)
        tmp.rename(out)
    return out


def _graphs(graph):
    """A graph and every subgraph under it (the If branches of optimum's merged decoder)."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.g is not None and a.HasField("g"):
                yield from _graphs(a.g)
            for g in a.graphs:
                yield from _graphs(g)


def _set_level(model, level: int) -> int:
    n = 0
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.op_type == "MatMulNBits":
                for a in node.attribute:
                    if a.name == "accuracy_level":
                        a.i = level
                        break
                else:
                    from onnx import helper

                    node.attribute.append(helper.make_attribute("accuracy_level", level))
                n += 1
    return n


def _quant_files(dense: Path) -> list[str]:
    """The ONNX files a user quantizes: model.onnx (LM), or the encoder and the decoder(s) optimum loads."""
    if (dense / "model.onnx").exists():
        return ["model.onnx"]
    if (dense / "decoder_model_merged.onnx").exists():
        return ["encoder_model.onnx", "decoder_model_merged.onnx"]
    return sorted(f.name for f in dense.glob("*.onnx"))


def fold_subgraph_transposes(model) -> int:
    """``fold_weight_transposes`` for the If branches of a merged decoder: every
    ``Transpose(top-level initializer)`` in a subgraph is replaced by one shared transposed
    top-level initializer (both branches use the same one), so the quantizer sees the tied
    lm_head as a constant weight. Returns the number of nodes removed."""
    from onnx import numpy_helper

    top = model.graph
    inits = {t.name: t for t in top.initializer}
    made: dict = {}
    removed = 0
    for graph in list(_graphs(top))[1:]:
        renames = {}
        for n in list(graph.node):
            if n.op_type == "Transpose" and n.input[0] in inits:
                perm = next((list(x.ints) for x in n.attribute if x.name == "perm"), None)
                key = (n.input[0], tuple(perm or ()))
                if key not in made:
                    a = numpy_helper.to_array(inits[n.input[0]])
                    name = f"{n.input[0]}_transposed{len(made)}"
                    top.initializer.append(
                        numpy_helper.from_array(np.ascontiguousarray(a.transpose(perm)), name)
                    )
                    made[key] = name
                renames[n.output[0]] = made[key]
                graph.node.remove(n)
                removed += 1
        for n in graph.node:
            for i, x in enumerate(n.input):
                if x in renames:
                    n.input[i] = renames[x]
        for o in graph.output:
            if o.name in renames:
                raise SystemExit(f"a folded Transpose output {o.name} is a subgraph output; cannot fold")
    return removed


def build_ort_quant(dense: Path, out: Path, bits: int, block: int, algo: str, level: int) -> Path:
    """ONNX Runtime's quantizer on optimum's export (each file it loads), the tied lm_head untied
    first so it is quantized."""
    files = _quant_files(dense)
    if (out / files[0]).exists():
        return out
    import onnx

    l0 = out.with_name(out.name[: -len(f"L{level}")] + "L0") if out.name.endswith(f"L{level}") else None
    if level != 0 and l0 is not None and all((l0 / f).exists() for f in files):  # same weights
        qms = {f: onnx.load(str(l0 / f)) for f in files}
        for qm in qms.values():
            _set_level(qm, level)
        return _save_quant(qms, dense, out)
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from ffsplit_export.bench import fold_weight_transposes

    qms = {}
    for f in files:
        model = onnx.load(str(dense / f))
        fold_weight_transposes(model)
        fold_subgraph_transposes(model)  # the merged decoder's tied lm_head (no-op for model.onnx)
        if algo == "HQQ":
            cfg = HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
        else:
            cfg = DefaultWeightOnlyQuantConfig(block_size=block, bits=bits, accuracy_level=level)
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=block, accuracy_level=level, algo_config=cfg)
        q.process()
        qm = q.model.model if hasattr(q.model, "model") else q.model
        _set_level(qm, level)  # HQQ's config takes no accuracy_level
        qms[f] = qm
    return _save_quant(qms, dense, out)


def _save_quant(qms: dict, dense: Path, out: Path) -> Path:
    import onnx

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f, qm in qms.items():
        onnx.save_model(qm, str(tmp / f))
    for f in dense.iterdir():
        if f.suffix in (".json", ".txt", ".model") or f.name.startswith("tokenizer"):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


EXPORT_FIELDS = ("nbits_accuracy_level", "fused_ffn", "activation_sparsity")  # not compression
_LAST_COMPRESSED: dict = {}  # (model, compression fields) -> the compressed model (one kept)


def build_ffsplit(m: Model, out: Path, opts: dict) -> Path:
    """``ffsplit-export export`` with the recipe's options (the shared calibration statistics).

    Recipes that differ only in export options (``--fused-ffn``, ``--activation-sparsity``) share
    one compression: the last compressed model is kept and copied before fusing."""
    if (out / "ffsplit.json").exists():
        return out
    import copy

    from ffsplit_export.config import CompressionConfig
    from ffsplit_export.export.api import _fuse
    from ffsplit_export.export.core import ExportOptions, export_split_model
    from ffsplit_export.pipeline import compress

    fields = {k: v for k, v in opts.items() if k not in EXPORT_FIELDS}
    cfg = CompressionConfig(**fields)
    stats, batches = m.calibration()
    key = (m.name, tuple(sorted(fields.items())))
    if key not in _LAST_COMPRESSED:
        _LAST_COMPRESSED.clear()
        gc.collect()
        kw = cfg.compress_kwargs()
        _LAST_COMPRESSED[key] = compress(
            m.model, m.pre, **kw, stats=stats, batches=batches, progress=False
        ).model
    model = _LAST_COMPRESSED[key]
    eo = ExportOptions(
        validate=False,
        overwrite=True,
        nbits_accuracy_level=opts["nbits_accuracy_level"],
        fused_ffn=bool(opts.get("fused_ffn", False)),
        activation_sparsity=opts.get("activation_sparsity", 0),
    )
    manifest = {
        "format_version": 1,
        "source_model": m.name,
        "model_type": m.model.config.model_type,
        "options": dict(opts),
        "light_format": cfg.light_format,
        "compression_config": cfg.to_dict(),
    }
    if eo.fused_ffn or eo.skip_mode:
        model = copy.deepcopy(model)
        manifest["fused_ffn"] = _fuse(model, eo, batches)
    export_split_model(model, m.pre, out, getattr(m, "task", TASK), eo, manifest)
    del model
    gc.collect()
    return out


def build_genai(genai_python: str, src: Path, out: Path) -> Path:
    """``python -m onnxruntime_genai.models.builder -m SRC -o OUT -p int4 -e cpu`` in its own venv."""
    if (out / "model.onnx").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        genai_python,
        "-m",
        "onnxruntime_genai.models.builder",
        "-m",
        str(src),
        "-o",
        str(tmp),
        "-p",
        "int4",
        "-e",
        "cpu",
        "-c",
        str(out.parent / "genai-cache"),
    ]
    _log(" ".join(cmd))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(cmd, check=True, env=env)
    tmp.rename(out)
    return out


# ------------------------------------------------------------------------------ measuring


def perplexity(path: Path, kind: str, text: str, tokenizer, threads: int) -> float:
    import torch

    from ffsplit_export.eval.evaluate import perplexity_from_logits as _perplexity
    from ffsplit_export.runtime import session_options

    so = session_options(intra_op_num_threads=threads, inter_op_num_threads=1)
    if kind == "genai-builder":
        runner = GenAIGraph(path, threads)
        return _perplexity(runner.logits, tokenizer, text, CTX, CTX).perplexity
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(path, session_options=so, use_cache=True)
    # never past the model's positions (a fused GroupQueryAttention's rotary cache stops there)
    ctx = min(CTX, int(getattr(model.config, "max_position_embeddings", CTX) or CTX))

    def logits_fn(ids):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    return _perplexity(logits_fn, tokenizer, text, ctx, ctx).perplexity


class GenAIGraph:
    """The GenAI builder's model.onnx run directly in ONNX Runtime for full-sequence logits."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        self.sess = ort.InferenceSession(str(path / "model.onnx"), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        cfg = json.loads((path / "genai_config.json").read_text())
        self.head_size = int(cfg["model"]["decoder"]["head_size"])

    def logits(self, ids):
        ids = np.asarray(ids, np.int64)
        n = ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, n), np.int64)}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(n, dtype=np.int64)[None]
        for name, i in self.inputs.items():
            if name.startswith("past_key_values"):
                dt = np.float16 if "float16" in i.type else np.float32
                feed[name] = np.zeros((1, int(i.shape[1]), 0, self.head_size), dt)
        return self.sess.run(["logits"], feed)[0].astype(np.float32)


class Runner:
    """An optimum-layout decoder session driven through IOBinding (as ``ffsplit_export.bench``),
    with ``position_ids`` bound when the graph has them (Llama)."""

    def __init__(self, onnx_path: Path, threads: int):
        import onnxruntime as ort

        from ffsplit_export.runtime import session_options

        self.ort = ort
        so = session_options(intra_op_num_threads=threads, inter_op_num_threads=1)
        self.sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        ins = {i.name: i for i in self.sess.get_inputs()}
        self.has_pos = "position_ids" in ins
        self.past = [n for n in ins if n.startswith("past_key_values.")]
        shape = ins[self.past[0]].shape
        self.heads, self.head_dim = int(shape[1]), int(shape[3])
        self.present = [n.replace("past_key_values.", "present.") for n in self.past]

    def kv_bytes(self, ctx: float) -> int:
        return int(len(self.past) * self.heads * self.head_dim * 4 * ctx)

    def step(self, ids: np.ndarray, past: list | None, past_len: int) -> tuple[list, float]:
        if past is None:
            z = np.zeros((1, self.heads, 0, self.head_dim), np.float32)
            past = [self.ort.OrtValue.ortvalue_from_numpy(z) for _ in self.past]
        t0 = time.perf_counter()
        io = self.sess.io_binding()
        n = ids.shape[1]
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", np.ones((1, past_len + n), np.int64))
        if self.has_pos:
            io.bind_cpu_input("position_ids", np.arange(past_len, past_len + n, dtype=np.int64)[None])
        for name, v in zip(self.past, past):
            io.bind_ortvalue_input(name, v)
        io.bind_output("logits")
        for name in self.present:
            io.bind_output(name)
        self.sess.run_with_iobinding(io)
        outs = io.get_outputs()
        return list(outs[1:]), time.perf_counter() - t0

    def decode(self, prompt: np.ndarray, tokens: np.ndarray) -> list[float]:
        past, _ = self.step(prompt, None, 0)
        n, times = prompt.shape[1], []
        for t in tokens:
            past, dt = self.step(np.array([[t]], np.int64), past, n)
            n += 1
            times.append(dt)
        return times


def genai_decode_ms(path: Path, prompt: list[int], tokens: int, threads: int) -> float:
    """Mean ms per generated token after the prompt, in onnxruntime-genai's own loop."""
    import onnxruntime_genai as og

    cfg_path = path / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    if so.get("intra_op_num_threads") != threads:
        so["intra_op_num_threads"] = threads
        so["inter_op_num_threads"] = 1
        cfg_path.write_text(json.dumps(cfg, indent=1))
    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + tokens + 1, batch_size=1)
    gen = og.Generator(model, params)
    gen.append_tokens([list(prompt)])
    steps = []
    for _ in range(tokens):
        if gen.is_done():
            break
        t0 = time.perf_counter()
        gen.generate_next_token()
        steps.append(time.perf_counter() - t0)
    del gen, model
    return 1e3 * statistics.mean(steps[1:] or steps)


def read_bandwidth(gib: float, repeats: int = 5) -> dict:
    """Read bandwidth of a large float32 array: NumPy sum (1 thread)."""
    a = np.ones(int(gib * 2**30 / 4), np.float32)
    a.sum()
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum(dtype=np.float32)
        best.append(a.nbytes / (time.perf_counter() - t0) / 1e9)
    del a
    return {"numpy_sum_gbs_median": statistics.median(best), "numpy_sum_gbs_best": max(best)}


# ------------------------------------------------------------------------------ Whisper

SPEECH_TASK = "automatic-speech-recognition-with-past"


def whisper_recipes(quick: bool) -> list[Recipe]:
    """Whisper rows: dense, ONNX Runtime's int4 (block 32 / 128, DEFAULT, accuracy_level 4) on the
    encoder and decoder files, the old default, the presets and (full runs) Whisper candidates."""
    from ffsplit_export.presets import PRESETS

    out = [_r("dense fp32 (optimum)", "dense")]
    for block in (32,) if quick else (32, 128):
        out.append(
            _r(f"ORT int4 b{block} DEFAULT L4", "ort-quant", bits=4, block=block, algo="DEFAULT", level=4)
        )
    if not quick:
        out.append(_r("ORT int8 b128 DEFAULT L4", "ort-quant", bits=8, block=128, algo="DEFAULT", level=4))
    for r in recipes(True):
        if r.kind != "ffsplit":
            continue
        out.append(r)
        name = r.name.removeprefix("preset ")
        if not quick and name in PRESETS:  # each preset with one fused FFN node per FFN, right after
            # it (the compressed model is reused)
            fields = {k: v for k, v in PRESETS[name].items() if k != "note"}
            out.append(ffsplit_recipe(f"{r.name} fused", "--fused-ffn", **fields, fused_ffn=True))
    if quick:
        return out
    acc = {k: v for k, v in PRESETS["accurate"].items() if k != "note"}
    bal = {k: v for k, v in PRESETS["balanced"].items() if k != "note"}
    fast = {k: v for k, v in PRESETS["fast"].items() if k != "note"}
    out += [
        # GPTQ from the built-in calibration (16 espeak-ng clips, ~300 decoder tokens) fits the
        # calibration rather than the speech: on tiny.en in PyTorch RTN gives x1.030 against GPTQ's x1.071
        ffsplit_recipe(
            "balanced with RTN (no GPTQ)",
            "Whisper candidate: the balanced preset with round-to-nearest codes",
            **{**bal, "quantizer": "rtn"},
        ),
        ffsplit_recipe(
            "fast with RTN (no GPTQ)",
            "Whisper candidate: the fast preset with round-to-nearest codes",
            **{**fast, "quantizer": "rtn"},
        ),
        ffsplit_recipe(
            "accurate with int8 heavy",
            "Whisper candidate: the accurate preset with the heavy part int8 too (all int8)",
            **{**acc, "heavy_format": "int8"},
        ),
        ffsplit_recipe(
            "accurate with int4 g32 attention (GPTQ)",
            "Whisper candidate: int8 FFN light part, fp32 heavy, other linears GPTQ int4 group 32",
            **{**acc, "other_linear": "int4", "group_size": 32, "quantizer": "gptq"},
        ),
    ]
    return list(dict.fromkeys(out))


class SpeechModel:
    """A Whisper source model: the five offline clips, the dense model's own transcripts (the
    reference of the dense-transcript perplexity) and the audio calibration statistics."""

    def __init__(self, name: str, work: Path, quick: bool):
        from ffsplit_export.calibrate import calibrate, make_batches
        from ffsplit_export.data.calibration import load_samples
        from ffsplit_export.data.evaldata import librispeech_clips
        from ffsplit_export.eval.evaluate import transcribe
        from ffsplit_export.models.loading import load_model

        self.name = name
        self.model, self.pre, self.task = load_model(name)
        self.src = work / "src"
        if not (self.src / "config.json").exists():
            self.model.save_pretrained(self.src)
            self.pre.save_pretrained(self.src)
        self.clips = librispeech_clips(2 if quick else None)
        # the dense model's own tokens, not its text re-tokenized: whisper-base's tokenizer spells
        # ' then' as 'Ġ' + 'then' where the model wrote 'Ġthen', and those split tokens dominated the score
        hyps = transcribe(self.model, self.pre, self.clips, token_ids=True)
        self.dense_clips = [(a, h) for (a, _), h in zip(self.clips, hyps)]
        self._samples = lambda: load_samples(self.model, None, 4 if quick else 16)
        self._make_batches, self._calibrate = make_batches, calibrate
        self._stats = None

    def calibration(self) -> tuple[dict, list]:
        if self._stats is None:
            self.batches = self._make_batches(self.model, self.pre, self._samples(), batch_size=8)
            self._stats = self._calibrate(self.model, self.batches, hessians=True, progress=False)
        return self._stats, self.batches


def build_dense_speech(m: SpeechModel, out: Path) -> Path:
    if not (out / "encoder_model.onnx").exists():
        from optimum.exporters.onnx import main_export

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        main_export(str(m.src), tmp, task=SPEECH_TASK, do_validation=False)
        tmp.rename(out)
    return out


def speech_files(path: Path) -> list[Path]:
    """The ONNX files optimum's ORTModelForSpeechSeq2Seq loads from an export (merged decoder
    when there is one)."""
    if (path / "decoder_model_merged.onnx").exists():
        names = ["encoder_model.onnx", "decoder_model_merged.onnx"]
    else:
        names = ["encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"]
    return [path / n for n in names if (path / n).exists()]


def speech_bytes(path: Path) -> dict:
    """File bytes of the files loaded (with external data) and decoder weight bytes read per token."""
    from ffsplit_export.bench import weight_bytes

    files = speech_files(path)
    total = 0
    for f in files:
        total += f.stat().st_size
        for d in (f.with_name(f.name + "_data"), f.with_name(f.name + ".data")):
            total += d.stat().st_size if d.exists() else 0
    dec = weight_bytes(files[-1])
    return {"file_bytes": total, "decoder_weight_bytes_per_token": dec["weight_bytes_per_token"]}


def load_speech(path: Path, threads: int):
    """optimum's ORTModelForSpeechSeq2Seq with the ffsplit library registered (ffsplit_export.runtime)."""
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq

    from ffsplit_export.runtime import session_options

    so = session_options(intra_op_num_threads=threads, inter_op_num_threads=1)
    return ORTModelForSpeechSeq2Seq.from_pretrained(path, session_options=so, use_cache=True)


def timed_transcribe(model, pre, clips) -> tuple[list[str], float, list[float], list[float]]:
    """(transcripts, seconds for all clips, seconds of every decoder call that had a KV cache, seconds
    of every encoder call: one per 30 s window, 1500 frames through every encoder FFN at once)."""
    from ffsplit_export.eval.evaluate import transcribe

    steps: list[float] = []
    enc: list[float] = []
    decs = [d for d in (model.decoder, getattr(model, "decoder_with_past", None)) if d is not None]
    parts = [*decs, model.encoder]
    originals = [d.forward for d in parts]

    def wrap(fwd, is_encoder):
        @functools.wraps(fwd)  # generate() reads the forward's signature to choose its arguments
        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = fwd(*a, **kw)
            if is_encoder:
                enc.append(time.perf_counter() - t0)
            elif kw.get("past_key_values") is not None:
                steps.append(time.perf_counter() - t0)
            return out

        return timed

    for d, fwd in zip(parts, originals):
        d.forward = wrap(fwd, d is model.encoder)
    try:
        t0 = time.perf_counter()
        hyps = transcribe(model, pre, clips)
        secs = time.perf_counter() - t0
    finally:
        for d, fwd in zip(parts, originals):
            d.forward = fwd
    return hyps, secs, steps, enc


def is_speech(name: str) -> bool:
    """Whisper models (real or tiny) take the speech path."""
    return "whisper" in name


def run_whisper(name: str, args, work: Path) -> dict:
    from ffsplit_export.eval.evaluate import transcript_perplexity, word_error_rate

    load0 = loadavg()
    work.mkdir(parents=True, exist_ok=True)
    m = SpeechModel(name, work, args.quick)
    dense = build_dense_speech(m, work / "dense")
    variants: list[tuple[Recipe, Path]] = []
    for rec in whisper_recipes(args.quick):
        if not _selected(rec, args):
            continue
        slug = "".join(c if c.isalnum() else "-" for c in rec.name)[:80]
        t0 = time.time()
        o = rec.opts
        if rec.kind == "dense":
            p = dense
        elif rec.kind == "ort-quant":
            p = build_ort_quant(dense, work / slug, o["bits"], o["block"], o["algo"], o["level"])
        else:
            p = build_ffsplit(m, work / slug, o)
        _log(f"{name}: built {rec.name} in {time.time() - t0:.0f} s")
        variants.append((rec, p))
    refs = [r for _, r in m.clips]
    rows = []
    secs = {rec.name: [] for rec, _ in variants}
    steps = {rec.name: [] for rec, _ in variants}
    encs = {rec.name: [] for rec, _ in variants}
    for rec, p in variants:
        t0 = time.time()
        model = load_speech(p, args.threads)
        timed_transcribe(model, m.pre, m.clips[:1])  # warm-up
        hyps, t, st, en = timed_transcribe(model, m.pre, m.clips)  # also the first timed run
        secs[rec.name].append(t)
        steps[rec.name].append(1e3 * statistics.median(st) if st else float("nan"))
        encs[rec.name].append(1e3 * statistics.median(en) if en else float("nan"))
        wer = word_error_rate(refs, hyps)
        tppl = transcript_perplexity(model, m.pre, m.dense_clips).perplexity
        del model
        _log(
            f"{name}: {rec.name}: WER {wer.wer:.4f} ({wer.substitutions + wer.deletions + wer.insertions} words), transcript ppl {tppl:.4f} "
            f"({time.time() - t0:.0f} s)"
        )
        rows.append(
            {
                "name": rec.name,
                "kind": rec.kind,
                "options": rec.opts,
                "note": rec.note,
                "path": str(p),
                "wer": wer.wer,
                "word_errors": wer.substitutions + wer.deletions + wer.insertions,
                "words": wer.num_words,
                "transcripts": hyps,
                "transcript_perplexity": tppl,
                **speech_bytes(p),
            }
        )
    gc.collect()
    # speed: A B C ... A B C ..., one model alive at a time, a warm-up transcription of one clip
    # first; the accuracy pass above (the same order) is the first of the --runs runs
    for r in range(1, args.runs):
        for rec, p in variants:
            model = load_speech(p, args.threads)
            timed_transcribe(model, m.pre, m.clips[:1])
            _, t, st, en = timed_transcribe(model, m.pre, m.clips)
            secs[rec.name].append(t)
            steps[rec.name].append(1e3 * statistics.median(st) if st else float("nan"))
            encs[rec.name].append(1e3 * statistics.median(en) if en else float("nan"))
            del model
        _log(
            f"{name}: run {r + 1}/{args.runs}: "
            + ", ".join(f"{k[:24]} {v[-1]:.2f} s" for k, v in secs.items())
        )
    for row in rows:
        n = row["name"]
        row.update(
            transcribe_s=statistics.median(secs[n]),
            transcribe_runs=secs[n],
            decode_ms=statistics.median(steps[n]),
            decode_runs=steps[n],
            encoder_ms=statistics.median(encs[n]),
            encoder_runs=encs[n],
        )
    front = set(pareto_front([(r["decode_ms"], r["transcript_perplexity"]) for r in rows]))
    for i, r in enumerate(rows):
        r["on_front"] = i in front
    return {"rows": rows, "load_start": load0, "load_end": loadavg(), "kind": "speech"}


def plot_speech(model: str, rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"dense": ("k", "*"), "ort-quant": ("tab:red", "s"), "ffsplit": ("tab:blue", "o")}
    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, (c, mk) in style.items():
        pts = [r for r in rows if r["kind"] == kind]
        if pts:
            ax.scatter(
                [r["decode_ms"] for r in pts],
                [r["transcript_perplexity"] for r in pts],
                c=c,
                marker=mk,
                s=45,
                label=kind,
            )
    front = [rows[i] for i in pareto_front([(r["decode_ms"], r["transcript_perplexity"]) for r in rows])]
    ax.plot(
        [r["decode_ms"] for r in front],
        [r["transcript_perplexity"] for r in front],
        "g--",
        lw=1.2,
        label="Pareto front",
    )
    for r in rows:
        ax.annotate(
            f"{r['name']} ({r['word_errors']} err)",
            (r["decode_ms"], r["transcript_perplexity"]),
            fontsize=6,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("decoder ms/token (ONNX Runtime, median)")
    ax.set_ylabel("dense-transcript perplexity (lower is better)")
    ax.set_title(f"{model}: accuracy vs decode speed (labels: word errors on the clips)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_speech(result: dict, model: str) -> str:
    block = result["models"][model]
    rows = block["rows"]
    dense = next(r for r in rows if r["kind"] == "dense")
    lines = [
        f"### {model}",
        "",
        f"{result['threads']} threads; {result['runs']} runs, variants interleaved, medians; load average "
        f"{block['load_start']} -> {block['load_end']}. WER on {dense['words']} reference words of "
        f"{len(dense['transcripts'])} offline LibriVox clips; dense-transcript perplexity: the reference "
        "transcripts are the dense PyTorch model's own greedy ones. Shared machine: re-take the speed "
        "columns on an idle one.",
        "",
        "| recipe | on front | WER (word errors) | dense-transcript ppl (x dense) | file MiB | "
        f"decoder read MiB/token | transcribe s ({len(dense['transcripts'])} clips) | encoder ms (30 s window) | "
        "decoder ms/token | x dense |",
        "| --- | :-: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {'yes' if r['on_front'] else ''} | {100 * r['wer']:.2f} % ({r['word_errors']}) | "
            f"{r['transcript_perplexity']:.4f} (x{r['transcript_perplexity'] / dense['transcript_perplexity']:.3f}) | "
            f"{r['file_bytes'] / 2**20:.1f} | {r['decoder_weight_bytes_per_token'] / 2**20:.1f} | "
            f"{r['transcribe_s']:.2f} | {r.get('encoder_ms', float('nan')):.1f} | {r['decode_ms']:.2f} | "
            f"{dense['decode_ms'] / r['decode_ms']:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the front


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (both coordinates lower is better).

    A point is dominated when another is at least as good on both axes and strictly better on
    one; NaN points are never on the front. Returned in increasing order of the first coordinate.
    """
    ok = [i for i, (x, y) in enumerate(points) if x == x and y == y]
    front = []
    for i in ok:
        xi, yi = points[i]
        dominated = any(
            (points[j][0] <= xi and points[j][1] <= yi) and (points[j][0] < xi or points[j][1] < yi)
            for j in ok
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def plot(model: str, rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {
        "dense": ("k", "*"),
        "ort-quant": ("tab:red", "s"),
        "genai-builder": ("tab:purple", "D"),
        "ffsplit": ("tab:blue", "o"),
    }
    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, (c, mk) in style.items():
        pts = [r for r in rows if r["kind"] == kind]
        if pts:
            ax.scatter(
                [r["decode_ms"] for r in pts],
                [r["perplexity"] for r in pts],
                c=c,
                marker=mk,
                s=45,
                label=kind,
            )
    front = [rows[i] for i in pareto_front([(r["decode_ms"], r["perplexity"]) for r in rows])]
    ax.plot(
        [r["decode_ms"] for r in front], [r["perplexity"] for r in front], "g--", lw=1.2, label="Pareto front"
    )
    for r in front:
        ax.annotate(
            r["name"],
            (r["decode_ms"], r["perplexity"]),
            fontsize=6,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_yscale("log")
    ax.set_xlabel("decode ms/token (ONNX Runtime, median)")
    ax.set_ylabel("perplexity (ONNX Runtime, lower is better)")
    ax.set_title(f"{model}: accuracy vs decode speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(result: dict) -> str:
    lines = []
    for model, block in result["models"].items():
        if block.get("kind") == "speech":
            lines.append(markdown_speech(result, model))
            continue
        rows = block["rows"]
        dense = next(r for r in rows if r["kind"] == "dense")
        bw = result["bandwidth"]
        lines += [
            f"### {model}",
            "",
            f"{result['threads']} threads; load average {block['load_start']} -> {block['load_end']}; read "
            f"bandwidth (NumPy sum, 1 thread) {bw['numpy_sum_gbs_median']:.1f} GB/s median. Shared machine: "
            "re-take the speed columns on an idle one.",
            "",
            "| recipe | on front | perplexity (x dense) | file MiB | read MiB/token | decode ms/token (p10-p90) | "
            "x dense | prefill ms | GB/s (% of NumPy) | GenAI decode ms |",
            "| --- | :-: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            gen = f"{r['genai_decode_ms']:.1f}" if r.get("genai_decode_ms") else ""
            pre = ", ".join(f"{v:.1f}" for v in r["prefill_ms"].values())
            lines.append(
                f"| {r['name']} | {'yes' if r['on_front'] else ''} | {r['perplexity']:.3f} "
                f"(x{r['perplexity'] / dense['perplexity']:.3f}) | {r['file_bytes'] / 2**20:.1f} | "
                f"{r['bytes_read_per_token'] / 2**20:.1f} | {r['decode_ms']:.2f} ({r['decode_p10']:.2f}-"
                f"{r['decode_p90']:.2f}) | {dense['decode_ms'] / r['decode_ms']:.2f} | {pre} | "
                f"{r['achieved_gbs']:.1f} ({100 * r['achieved_gbs'] / bw['numpy_sum_gbs_median']:.0f} %) | {gen} |"
            )
        lines += ["", f"prefill lengths: {result['prefill']} tokens", ""]
    return "\n".join(lines)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_model(name: str, args, work: Path) -> dict:
    from ffsplit_export.bench import weight_bytes

    load0 = loadavg()
    work.mkdir(parents=True, exist_ok=True)
    m = Model(name, work, args.quick, args.max_chars, args.num_samples)
    variants: list[tuple[Recipe, Path]] = []
    dense = build_dense(m, work / "dense")
    for rec in recipes(args.quick):
        if not _selected(rec, args):
            continue
        slug = "".join(c if c.isalnum() else "-" for c in rec.name)[:80]
        t0 = time.time()
        o = rec.opts
        if rec.kind == "dense":
            p = dense
        elif rec.kind == "ort-quant":
            p = build_ort_quant(dense, work / slug, o["bits"], o["block"], o["algo"], o["level"])
        else:
            p = build_ffsplit(m, work / slug, o)
        _log(f"{name}: built {rec.name} in {time.time() - t0:.0f} s")
        variants.append((rec, p))
    if args.genai_python and name == "smollm2-135m":
        variants.append(
            (
                _r("GenAI builder int4 (-p int4 -e cpu)", "genai-builder"),
                build_genai(args.genai_python, m.src, work / "genai-int4"),
            )
        )
    rows = []
    for rec, p in variants:
        t0 = time.time()
        ppl = perplexity(p, rec.kind, m.text, m.pre, args.threads)
        _log(f"{name}: {rec.name}: perplexity {ppl:.3f} ({time.time() - t0:.0f} s)")
        rows.append(
            {
                "name": rec.name,
                "kind": rec.kind,
                "options": rec.opts,
                "note": rec.note,
                "path": str(p),
                "perplexity": ppl,
                **weight_bytes(p / "model.onnx"),
            }
        )
    del m
    gc.collect()

    # speed: every variant opened in turn per run (A B C ... A B C ...), one session alive at a time
    vocab = int(json.loads((dense / "config.json").read_text())["vocab_size"])
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, vocab, (1, args.prompt), dtype=np.int64)
    toks = rng.integers(3, vocab, args.tokens, dtype=np.int64)
    timed = [(rec, p) for rec, p in variants if rec.kind != "genai-builder"]
    dec = {rec.name: [] for rec, _ in timed}
    pre = {rec.name: {n: [] for n in args.prefill} for rec, _ in timed}
    kv = {}
    for r in range(args.runs):
        for rec, p in timed:
            run = Runner(p / "model.onnx", args.threads)
            run.decode(prompt, toks[:2])  # warm-up
            dec[rec.name].append(1e3 * statistics.mean(run.decode(prompt, toks)))
            for n in args.prefill:
                pre[rec.name][n].append(
                    1e3 * run.step(rng.integers(3, vocab, (1, n), dtype=np.int64), None, 0)[1]
                )
            kv[rec.name] = run.kv_bytes(args.prompt + (args.tokens + 1) / 2)
            del run
        _log(
            f"{name}: decode run {r + 1}/{args.runs}: "
            + ", ".join(f"{k[:24]} {v[-1]:.1f}" for k, v in dec.items())
        )
    genai = {}
    if args.genai_loop:
        for _ in range(args.runs):
            for rec, p in variants:
                if (p / "genai_config.json").exists():
                    genai.setdefault(rec.name, []).append(
                        genai_decode_ms(p, prompt[0].tolist(), args.tokens, args.threads)
                    )
    for row in rows:
        n = row["name"]
        if n in dec:
            xs = dec[n]
            row.update(
                decode_ms=statistics.median(xs),
                decode_p10=float(np.percentile(xs, 10)),
                decode_p90=float(np.percentile(xs, 90)),
                decode_runs=xs,
                prefill_ms={str(k): statistics.median(v) for k, v in pre[n].items()},
            )
            row["kv_bytes_per_token"] = kv[n]
        else:  # GenAI builder graph: timed in GenAI's loop only
            row.update(
                decode_ms=statistics.median(genai.get(n, [float("nan")])),
                decode_p10=float("nan"),
                decode_p90=float("nan"),
                decode_runs=genai.get(n, []),
                prefill_ms={},
                kv_bytes_per_token=next(iter(kv.values()), 0),  # the same fp32 KV shape
            )
        if n in genai:
            row["genai_decode_ms"] = statistics.median(genai[n])
        row["bytes_read_per_token"] = row["weight_bytes_per_token"] + row["kv_bytes_per_token"]
        row["achieved_gbs"] = row["bytes_read_per_token"] / (row["decode_ms"] * 1e-3) / 1e9
    front = set(pareto_front([(r["decode_ms"], r["perplexity"]) for r in rows]))
    for i, r in enumerate(rows):
        r["on_front"] = i in front
    return {"rows": rows, "load_start": load0, "load_end": loadavg()}


def _selected(rec, args) -> bool:
    """``--only`` / ``--exclude`` (substrings of recipe names); the dense model always runs."""
    if rec.kind == "dense":
        return True
    if args.only and not any(s in rec.name for s in args.only):
        return False
    return not (args.exclude and any(s in rec.name for s in args.exclude))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models",
        default="smollm2-135m",
        help="comma-separated: smollm2-135m, whisper-tiny.en, whisper-base, or a tiny model (tiny-llama, "
        "tiny-whisper)",
    )
    ap.add_argument("--stem", default="frontier", help="file name of the JSON and markdown outputs")
    ap.add_argument("--output", default="samples/results/frontier")
    ap.add_argument("--work", default=None, help="exports cache (default: OUTPUT/work)")
    ap.add_argument("--quick", action="store_true", help="few recipes, short text, few runs (smoke test)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=None, help="timed runs per variant (default 5, quick 2)")
    ap.add_argument("--tokens", type=int, default=None, help="decode steps per run (default 32, quick 8)")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--prefill", default=None, help="prefill lengths (default 32,256; quick 16)")
    ap.add_argument(
        "--max-chars", type=int, default=None, help="eval text characters (default 8000, quick 600)"
    )
    ap.add_argument(
        "--num-samples", type=int, default=None, help="calibration samples (default 128, quick 8)"
    )
    ap.add_argument("--genai-python", default=None, help="python of a venv from samples/genai_builder_env.sh")
    ap.add_argument(
        "--genai-loop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time decode in onnxruntime-genai's loop where genai_config.json exists",
    )
    ap.add_argument(
        "--only", default=None, help="comma-separated substrings of recipe names to keep (dense always runs)"
    )
    ap.add_argument("--exclude", default=None, help="comma-separated substrings of recipe names to drop")
    ap.add_argument("--bandwidth-gib", type=float, default=None)
    args = ap.parse_args(argv)
    q = args.quick
    args.runs = args.runs or (2 if q else 5)
    args.tokens = args.tokens or (8 if q else 32)
    args.prefill = [int(x) for x in (args.prefill or ("16" if q else "32,256")).split(",")]
    args.max_chars = args.max_chars or (600 if q else 8000)
    args.num_samples = args.num_samples or (8 if q else 128)
    args.only = [s for s in args.only.split(",")] if args.only else None
    args.exclude = [s for s in args.exclude.split(",")] if args.exclude else None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / "work"
    bw = read_bandwidth(args.bandwidth_gib or (0.0625 if q else 1.0))
    result = {
        "command": " ".join(sys.argv),
        "threads": args.threads,
        "prefill": args.prefill,
        "prompt": args.prompt,
        "tokens": args.tokens,
        "runs": args.runs,
        "models": {},
    }
    for name in args.models.split(","):
        if is_speech(name):
            result["models"][name] = run_whisper(name, args, work / name)
            plot_speech(name, result["models"][name]["rows"], out / f"{name}_front.png")
        else:
            result["models"][name] = run_model(name, args, work / name)
            plot(name, result["models"][name]["rows"], out / f"{name}_front.png")
        bw2 = read_bandwidth(args.bandwidth_gib or (0.0625 if q else 1.0))
        result["bandwidth"] = {k: max(bw[k], bw2[k]) for k in result.get("bandwidth", bw)}
        (out / f"{args.stem}.json").write_text(json.dumps(result, indent=1))
    result["bandwidth"] = result.get("bandwidth", bw)
    (out / f"{args.stem}.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / f"{args.stem}.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
