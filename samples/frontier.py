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

Outputs under ``--output``: ``frontier.json``, ``frontier.md`` and ``<model>_front.png``
(perplexity against decode ms/token, Pareto front drawn).

    python samples/frontier.py --models smollm2-135m --output samples/results/frontier \\
        --genai-python "$(samples/genai_builder_env.sh)"
    python samples/frontier.py --models tiny-llama --quick --output /tmp/front   # smoke test, < 1 min
"""

from __future__ import annotations

import argparse
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
        out.append(
            ffsplit_recipe(f"preset {name}", p.get("note", ""), **{k: v for k, v in p.items() if k != "note"})
        )
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


def _set_level(model, level: int) -> int:
    n = 0
    for node in model.graph.node:
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


def build_ort_quant(dense: Path, out: Path, bits: int, block: int, algo: str, level: int) -> Path:
    """ONNX Runtime's quantizer on optimum's export, the tied lm_head untied first so it is quantized."""
    if (out / "model.onnx").exists():
        return out
    import onnx

    l0 = out.with_name(out.name[: -len(f"L{level}")] + "L0") if out.name.endswith(f"L{level}") else None
    if level != 0 and l0 is not None and (l0 / "model.onnx").exists():  # same weights, other attribute
        qm = onnx.load(str(l0 / "model.onnx"))
        _set_level(qm, level)
        return _save_quant(qm, dense, out)
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from ffsplit_export.bench import fold_weight_transposes

    model = onnx.load(str(dense / "model.onnx"))
    fold_weight_transposes(model)
    if algo == "HQQ":
        cfg = HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    else:
        cfg = DefaultWeightOnlyQuantConfig(block_size=block, bits=bits, accuracy_level=level)
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block, accuracy_level=level, algo_config=cfg)
    q.process()
    qm = q.model.model if hasattr(q.model, "model") else q.model
    _set_level(qm, level)  # HQQ's config takes no accuracy_level
    return _save_quant(qm, dense, out)


def _save_quant(qm, dense: Path, out: Path) -> Path:
    import onnx

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    onnx.save_model(qm, str(tmp / "model.onnx"))
    for f in dense.iterdir():
        if f.suffix in (".json", ".txt", ".model") or f.name.startswith("tokenizer"):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def build_ffsplit(m: Model, out: Path, opts: dict) -> Path:
    """``ffsplit-export export`` with the recipe's options (the shared calibration statistics)."""
    if (out / "model.onnx").exists():
        return out
    from ffsplit_export.config import CompressionConfig
    from ffsplit_export.export.core import ExportOptions, export_split_model
    from ffsplit_export.pipeline import compress

    fields = {k: v for k, v in opts.items() if k != "nbits_accuracy_level"}
    cfg = CompressionConfig(**fields)
    stats, batches = m.calibration()
    kw = cfg.compress_kwargs()
    res = compress(m.model, m.pre, **kw, stats=stats, batches=batches, progress=False)
    manifest = {
        "format_version": 1,
        "source_model": m.name,
        "model_type": m.model.config.model_type,
        "options": dict(opts),
        "light_format": cfg.light_format,
        "compression_config": cfg.to_dict(),
    }
    eo = ExportOptions(validate=False, overwrite=True, nbits_accuracy_level=opts["nbits_accuracy_level"])
    export_split_model(res.model, m.pre, out, TASK, eo, manifest)
    del res
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

    def logits_fn(ids):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    return _perplexity(logits_fn, tokenizer, text, CTX, CTX).perplexity


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
        if args.only and not any(s in rec.name for s in args.only):
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m")
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
    ap.add_argument("--only", default=None, help="comma-separated substrings of recipe names to keep")
    ap.add_argument("--bandwidth-gib", type=float, default=None)
    args = ap.parse_args(argv)
    q = args.quick
    args.runs = args.runs or (2 if q else 5)
    args.tokens = args.tokens or (8 if q else 32)
    args.prefill = [int(x) for x in (args.prefill or ("16" if q else "32,256")).split(",")]
    args.max_chars = args.max_chars or (600 if q else 8000)
    args.num_samples = args.num_samples or (8 if q else 128)
    args.only = [s for s in args.only.split(",")] if args.only else None
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
        result["models"][name] = run_model(name, args, work / name)
        bw2 = read_bandwidth(args.bandwidth_gib or (0.0625 if q else 1.0))
        result["bandwidth"] = {k: max(bw[k], bw2[k]) for k in bw}
        (out / "frontier.json").write_text(json.dumps(result, indent=1))
        plot(name, result["models"][name]["rows"], out / f"{name}_front.png")
    result["bandwidth"] = result.get("bandwidth", bw)
    (out / "frontier.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "frontier.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
