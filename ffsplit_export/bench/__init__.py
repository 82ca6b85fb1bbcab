"""End-to-end decode / prefill benchmark: ffsplit exports against dense fp32 and MatMulNBits.

An MPT-shaped model with random (seeded) weights is built, exported with ``optimum``
(dense fp32), quantized with ONNX Runtime's ``MatMulNBitsQuantizer`` (int8 / int4, block 128,
symmetric, accuracy_level 4) and exported with ffsplit at each light sparsity and with each named
preset (``--presets``; round-to-nearest in place of GPTQ, since the weights are random and the
timed graph, formats and bytes are the same either way). Every variant
is then driven directly through ONNX Runtime (IOBinding, past key/values fed back) in one
process, interleaved A B C ... A B C ..., with the same thread count.

Definitions (also written into the JSON):

* ``weight_bytes_per_token``: bytes of every initializer that a decode step reads, i.e. all
  initializers except the token-embedding table, of which one row per token is counted
  (with tied embeddings, a separate lm_head weight or the embedding as a MatMul operand
  is counted in full). Sparse formats count their bitmask, values, row pointers and scales.
* ``kv_bytes_per_token``: past keys/values read by one decode step at the mean context length.
* ``achieved GB/s``: (weight + kv bytes) / decode time; ``of bandwidth``: that over the
  measured read bandwidth below (issue 13's goal: at least 0.8 for every preset).
* ``floor ms``: (weight + kv bytes) / measured read bandwidth, where the bandwidth is that
  of an ONNX Runtime fp32 MatMul with M=1 on a 1 GiB non-constant weight at the same thread
  count, measured in the same run (a single-thread numpy sum is reported too).

The machine may be shared: spreads (p10 / p90 over runs) and the load average are reported.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ExportError

TASK = "text-generation-with-past"

SHAPES = {
    "full": {"d_model": 2048, "n_heads": 16, "n_layers": 8, "expansion_ratio": 4, "vocab_size": 8192},
    "quick": {"d_model": 1024, "n_heads": 16, "n_layers": 4, "expansion_ratio": 4, "vocab_size": 8192},
}


@dataclass
class Variant:
    """One model to benchmark."""

    name: str
    path: Path  # directory holding model.onnx
    kind: str  # dense | nbits | ffsplit
    formats: str
    sparsity: float | None = None
    isa: str | None = None  # FFSPLIT_ISA while its session is created (ffsplit variants)
    stats: dict = field(default_factory=dict)


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ building


def build_model(work: Path, shape: str, seed: int = 0) -> Path:
    """Random-weight MPT model saved with a tokenizer under ``work/model-<shape>`` (reused)."""
    out = work / f"model-{shape}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import MptConfig, MptForCausalLM

    from ..models.tiny import byte_tokenizer

    torch.manual_seed(seed)
    cfg = MptConfig(**SHAPES[shape], max_seq_len=2048)
    model = MptForCausalLM(cfg).eval()
    tmp = work / f".tmp-model-{shape}"
    model.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    tmp.rename(out)
    _log(f"built {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M params)")
    return out


def export_dense(model_dir: Path, out: Path) -> Path:
    """``optimum-cli export onnx`` equivalent, no validation (reused if present)."""
    if (out / "model.onnx").exists():
        return out
    from optimum.exporters.onnx import main_export

    tmp = out.with_name("." + out.name + ".tmp")
    _log(f"optimum export -> {out}")
    main_export(str(model_dir), tmp, task=TASK, do_validation=False)
    tmp.rename(out)
    return out


def fold_weight_transposes(model) -> int:
    """Replace ``Transpose(initializer)`` (a tied lm_head) by a transposed initializer; returns the count."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    folded = []
    for n in model.graph.node:
        if n.op_type == "Transpose" and n.input[0] in inits:
            a = numpy_helper.to_array(inits[n.input[0]])
            perm = next((list(x.ints) for x in n.attribute if x.name == "perm"), None)
            model.graph.initializer.append(
                numpy_helper.from_array(np.ascontiguousarray(a.transpose(perm)), n.output[0])
            )
            folded.append(n)
    for n in folded:
        model.graph.node.remove(n)
    return len(folded)


def export_nbits(
    dense: Path, out: Path, bits: int, block_size: int = 128, accuracy_level: int = 4, untie: bool = False
) -> Path:
    """MatMulNBits quantization of every MatMul with a constant weight (reused if present).

    With ``untie`` a tied lm_head (``MatMul(x, Transpose(embedding))``, which the quantizer skips)
    gets its own transposed weight first, so it is quantized too.
    """
    if (out / "model.onnx").exists():
        return out
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _log(f"MatMulNBits {bits}-bit{' (lm_head untied)' if untie else ''} -> {out}")
    model = onnx.load(str(dense / "model.onnx"))
    if untie and not fold_weight_transposes(model):
        _log("no Transpose(initializer) to untie; the lm_head is quantized as in the plain export")
    q = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=accuracy_level,
    )
    q.process()
    tmp = out.with_name("." + out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    q.model.save_model_to_file(str(tmp / "model.onnx"), use_external_data_format=True)
    for f in dense.iterdir():
        if f.suffix == ".json" or f.name.startswith("tokenizer"):
            (tmp / f.name).write_bytes(f.read_bytes())
    tmp.rename(out)
    return out


def export_ffsplit(
    model_dir: Path,
    out: Path,
    sparsity: float,
    light_format: str,
    heavy_format: str,
    heavy_fraction: float,
    num_samples: int,
) -> Path:
    """ffsplit export with ``--target ort-cpu --other-linear int4`` (reused if present)."""
    if (out / "model.onnx").exists():
        return out
    from ..export.api import export
    from ..export.core import ExportOptions
    from ..split import SplitConfig

    _log(f"ffsplit export sparsity {sparsity} -> {out}")
    export(
        str(model_dir),
        out,
        task=TASK,
        config=SplitConfig(light_format=light_format, light_sparsity=sparsity, heavy_format=heavy_format),
        options=ExportOptions(target="ort-cpu", validate=False, nbits_accuracy_level=4, overwrite=True),
        other_linear="int4",
        heavy_fraction=heavy_fraction,
        num_samples=num_samples,
        progress=False,
    )
    return out


def export_preset(model_dir: Path, out: Path, preset: str, num_samples: int) -> Path:
    """ffsplit export with preset ``preset`` and ``quantizer="rtn"`` (reused if present).

    The weights are random, so error compensation buys nothing here; the graph, formats and
    bytes are those of the preset's GPTQ export, which takes minutes longer at this shape.
    """
    if (out / "model.onnx").exists():
        return out
    from ..export.api import export
    from ..export.core import ExportOptions

    _log(f"ffsplit export preset {preset} -> {out}")
    export(
        str(model_dir),
        out,
        task=TASK,
        preset=preset,
        options=ExportOptions(target="ort-cpu", validate=False, overwrite=True),
        quantizer="rtn",
        num_samples=num_samples,
        progress=False,
    )
    return out


# ------------------------------------------------------------------------------ bytes


def _embedding_names(model) -> set[str]:
    """Initializers consumed as the data input (0) of a Gather: embedding tables."""
    names = set()
    for n in model.graph.node:
        if n.op_type in ("Gather", "GatherBlockQuantized") and n.input:
            names.add(n.input[0])
    return names


def weight_bytes(onnx_path: Path) -> dict:
    """Initializer bytes of a model: total, read per decode token, embedding tables."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    emb = _embedding_names(m)
    other_use = {
        i for n in m.graph.node if n.op_type not in ("Gather", "GatherBlockQuantized") for i in n.input
    }
    total = per_token = 0
    emb_bytes = 0
    # weights folded into Constant nodes (the fused FFN ops' inputs are exported that way) count too
    consts = [
        a.t
        for n in m.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR
    ]
    for t in list(m.graph.initializer) + consts:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            n = int({e.key: e.value for e in t.external_data}.get("length", 0))
        else:
            n = len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes
        total += n
        if t.name in emb and t.name not in other_use and len(t.dims) == 2:
            emb_bytes += n
            per_token += n // max(1, t.dims[0])  # one row
        else:
            per_token += n
    files = sum(
        f.stat().st_size
        for f in onnx_path.parent.iterdir()
        if f.is_file() and (f.suffix in (".onnx", ".onnx_data", ".data") or f.name.endswith("_data"))
    )
    return {
        "initializer_bytes": total,
        "weight_bytes_per_token": per_token,
        "embedding_bytes": emb_bytes,
        "file_bytes": files,
    }


# ------------------------------------------------------------------------------ running


class Runner:
    """An ONNX Runtime session of a text-generation-with-past graph, driven through IOBinding."""

    def __init__(self, onnx_path: Path, threads: int):
        import onnxruntime as ort

        from ..runtime import session_options

        self.ort = ort
        so = session_options(intra_op_num_threads=threads, inter_op_num_threads=1)
        try:
            self.sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ExportError(f"cannot open {str(onnx_path)!r} in ONNX Runtime: {e}") from e
        ins = {i.name: i for i in self.sess.get_inputs()}
        missing = {"input_ids", "attention_mask"} - set(ins)
        if missing:
            raise ExportError(f"{str(onnx_path)!r} lacks inputs {sorted(missing)}; export with --task {TASK}")
        self.past = [n for n in ins if n.startswith("past_key_values.")]
        shape = ins[self.past[0]].shape
        self.heads, self.head_dim = int(shape[1]), int(shape[3])
        outs = [o.name for o in self.sess.get_outputs()]
        self.present = [n.replace("past_key_values.", "present.") for n in self.past]
        if "logits" not in outs or any(p not in outs for p in self.present):
            raise ExportError(f"{str(onnx_path)!r} outputs {outs}: expected logits and present.*")

    def empty_past(self) -> list:
        z = np.zeros((1, self.heads, 0, self.head_dim), np.float32)
        return [self.ort.OrtValue.ortvalue_from_numpy(z) for _ in self.past]

    def step(self, ids: np.ndarray, past: list, past_len: int) -> tuple[list, float]:
        """One forward of ``ids`` [1, n] after ``past_len`` cached tokens; returns (presents, seconds)."""
        t0 = time.perf_counter()
        io = self.sess.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", np.ones((1, past_len + ids.shape[1]), np.int64))
        for name, v in zip(self.past, past):
            io.bind_ortvalue_input(name, v)
        io.bind_output("logits")
        for name in self.present:
            io.bind_output(name)
        self.sess.run_with_iobinding(io)
        outs = io.get_outputs()
        dt = time.perf_counter() - t0
        return list(outs[1:]), dt

    def decode(self, prompt: np.ndarray, tokens: np.ndarray, flush=None) -> list[float]:
        """Prefill ``prompt``, then decode ``tokens`` one at a time; seconds of each decode step."""
        past, _ = self.step(prompt, self.empty_past(), 0)
        n = prompt.shape[1]
        times = []
        for t in tokens:
            if flush is not None:
                flush()
            past, dt = self.step(np.array([[t]], np.int64), past, n)
            n += 1
            times.append(dt)
        return times

    def prefill(self, ids: np.ndarray) -> float:
        return self.step(ids, self.empty_past(), 0)[1]


class Bandwidth:
    """Read-bandwidth probes: ORT fp32 MatMul M=1 over a 1 GiB weight input, numpy sum."""

    def __init__(self, threads: int, gib: float = 1.0):
        import onnxruntime as ort
        from onnx import TensorProto, helper

        k = 4096
        n = int(gib * 2**30 / 4 / k)
        self.w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
        self.x = np.ones((1, k), np.float32)
        g = helper.make_graph(
            [helper.make_node("MatMul", ["X", "W"], ["Y"])],
            "bw",
            [
                helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, k]),
                helper.make_tensor_value_info("W", TensorProto.FLOAT, [k, n]),
            ],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])],
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 9
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.sess.run(None, {"X": self.x, "W": self.w})

    def flush(self) -> None:
        """Evict the caches (used between decode steps with --flush-cache)."""
        self.w.sum(dtype=np.float32)

    def measure(self, repeats: int = 5) -> dict:
        ort_s, np_s = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.sess.run(None, {"X": self.x, "W": self.w})
            ort_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            self.w.sum(dtype=np.float32)
            np_s.append(time.perf_counter() - t0)
        nb = self.w.nbytes
        return {
            "ort_matmul_gbs": [nb / s / 1e9 for s in ort_s],
            "numpy_sum_gbs": [nb / s / 1e9 for s in np_s],
        }


def _open(v: Variant, threads: int) -> Runner:
    """A Runner for ``v``, with FFSPLIT_ISA set while its kernels are created."""
    if v.isa is None:
        return Runner(v.path / "model.onnx", threads)
    old = os.environ.get("FFSPLIT_ISA")
    os.environ["FFSPLIT_ISA"] = v.isa
    try:
        return Runner(v.path / "model.onnx", threads)
    finally:
        if old is None:
            del os.environ["FFSPLIT_ISA"]
        else:
            os.environ["FFSPLIT_ISA"] = old


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "p10": _pct(xs, 10), "p90": _pct(xs, 90), "runs": xs}


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ------------------------------------------------------------------------------ driver


def prepare(args) -> tuple[Path, list[Variant]]:
    """Build the model and every exported variant under ``--work`` (reusing what is there)."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shape = "quick" if args.quick else "full"
    model_dir = build_model(work, shape, args.seed)
    dense = export_dense(model_dir, work / f"{shape}-dense")
    variants = [Variant("dense fp32", dense, "dense", "fp32 (optimum-cli export onnx)")]
    for bits in (8, 4):
        p = export_nbits(dense, work / f"{shape}-int{bits}", bits)
        variants.append(
            Variant(
                f"MatMulNBits int{bits}",
                p,
                "nbits",
                f"MatMulNBits {bits}-bit, block 128, symmetric, accuracy_level 4",
            )
        )
    if args.untied_int4:
        p = export_nbits(dense, work / f"{shape}-int4-untied", 4, untie=True)
        variants.append(
            Variant(
                "MatMulNBits int4 +lm_head",
                p,
                "nbits",
                "as int4, tied lm_head untied first so it is int4 too (the stock quantizer leaves it fp32)",
            )
        )
    for s in args.sparsities:
        tag = f"{shape}-ffsplit-{args.light_format}-s{s:g}-h{args.heavy_format}-f{args.heavy_fraction:g}"
        p = export_ffsplit(
            model_dir,
            work / tag,
            s,
            args.light_format,
            args.heavy_format,
            args.heavy_fraction,
            args.num_samples,
        )
        for isa in args.isa:
            variants.append(
                Variant(
                    f"ffsplit s={s:g}" + ("" if isa == "auto" else f" {isa}"),
                    p,
                    "ffsplit",
                    f"light {args.light_format} {s:g} (wanda), heavy {args.heavy_format} "
                    f"(fraction {args.heavy_fraction:g}), other linears int4"
                    + ("" if isa == "auto" else f", FFSPLIT_ISA={isa}"),
                    s,
                    isa,
                )
            )
        gc.collect()
    for name in args.presets:
        from ..presets import PRESETS

        p = export_preset(model_dir, work / f"{shape}-preset-{name}", name, args.num_samples)
        variants.append(
            Variant(f"preset {name}", p, "ffsplit", f"--preset {name} (RTN): {PRESETS[name]['note']}")
        )
        gc.collect()
    return model_dir, variants


def run(args) -> dict:
    """Export (or reuse) every variant, time them interleaved, print the table, write JSON."""
    if args.runs < 1 or args.tokens < 1:
        raise ConfigError(f"--runs={args.runs} --tokens={args.tokens}: both must be >= 1")
    model_dir, variants = prepare(args)
    cfg = json.loads((model_dir / "config.json").read_text())
    for v in variants:
        v.stats.update(weight_bytes(v.path / "model.onnx"))
    _log("opening sessions")
    runners = {v.name: _open(v, args.threads) for v in variants}
    bw = Bandwidth(args.threads)
    bw_before = bw.measure()
    flush = bw.flush if args.flush_cache else None

    rng = np.random.default_rng(args.seed)
    vocab = int(cfg["vocab_size"])
    prompt = rng.integers(3, vocab, (1, args.prompt), dtype=np.int64)
    toks = rng.integers(3, vocab, args.tokens, dtype=np.int64)
    _log("warm-up")
    for v in variants:
        runners[v.name].decode(prompt, toks[:2])
        for n in args.prefill:
            runners[v.name].prefill(rng.integers(3, vocab, (1, n), dtype=np.int64))

    decode = {v.name: [] for v in variants}
    steps = {v.name: [] for v in variants}
    for r in range(args.runs):
        for v in variants:  # A B C ... A B C ...
            t = runners[v.name].decode(prompt, toks, flush)
            decode[v.name].append(1e3 * statistics.mean(t))
            steps[v.name].extend(1e3 * x for x in t)
        _log(f"decode run {r + 1}/{args.runs}: " + ", ".join(f"{k} {x[-1]:.1f}" for k, x in decode.items()))
    prefill = {v.name: {n: [] for n in args.prefill} for v in variants}
    for n in args.prefill:
        ids = rng.integers(3, vocab, (1, n), dtype=np.int64)
        for _ in range(args.runs):
            for v in variants:
                prefill[v.name][n].append(1e3 * runners[v.name].prefill(ids))
        _log(f"prefill {n}: " + ", ".join(f"{k} {statistics.median(x[n]):.1f}" for k, x in prefill.items()))
    bw_after = bw.measure()
    del runners, bw
    gc.collect()

    ort_bw = bw_before["ort_matmul_gbs"] + bw_after["ort_matmul_gbs"]
    ref_gbs = max(ort_bw)
    n_layers, d_model = int(cfg["n_layers"]), int(cfg["d_model"])
    ctx = args.prompt + (args.tokens + 1) / 2  # mean cached length during decode
    kv_bytes = int(n_layers * 2 * d_model * 4 * ctx)

    results = {}
    for v in variants:
        d = _summary(decode[v.name])
        s = v.stats
        read = s["weight_bytes_per_token"] + kv_bytes
        results[v.name] = {
            "kind": v.kind,
            "ffsplit_isa": v.isa,
            "formats": v.formats,
            "light_sparsity": v.sparsity,
            "path": str(v.path),
            **s,
            "kv_bytes_per_token": kv_bytes,
            "bytes_read_per_token": read,
            "decode_ms_per_token": d,
            "decode_step_ms": _summary(steps[v.name]),
            "tokens_per_s": 1e3 / d["median"],
            "achieved_gbs": read / (d["median"] * 1e-3) / 1e9,
            "bandwidth_fraction": read / (d["median"] * 1e-3) / 1e9 / ref_gbs,
            "floor_ms": read / (ref_gbs * 1e9) * 1e3,
            "prefill_ms": {str(n): _summary(prefill[v.name][n]) for n in args.prefill},
        }
    for base_key, base in (
        ("dense", "dense fp32"),
        ("int8", "MatMulNBits int8"),
        ("int4", "MatMulNBits int4"),
    ):
        b = results[base]
        for r in results.values():
            r.setdefault("decode_speedup", {})[base_key] = (
                b["decode_ms_per_token"]["median"] / r["decode_ms_per_token"]["median"]
            )
            r.setdefault("prefill_speedup", {})[base_key] = {
                n: b["prefill_ms"][n]["median"] / r["prefill_ms"][n]["median"] for n in r["prefill_ms"]
            }
            r.setdefault("bytes_ratio", {})[base_key] = b["bytes_read_per_token"] / r["bytes_read_per_token"]
    out = {
        "command": " ".join(sys.argv),
        "shape": {k: cfg[k] for k in ("d_model", "n_heads", "n_layers", "expansion_ratio", "vocab_size")},
        "params": d_model**2 * (4 + 2 * int(cfg["expansion_ratio"])) * n_layers + vocab * int(cfg["d_model"]),
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_start": args._load0,
            "loadavg_end": _loadavg(),
            **_runtime_info(),
        },
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"},
        "definitions": {
            "weight_bytes_per_token": "all initializer bytes except embedding tables read only by Gather, of "
            "which one row is counted",
            "kv_bytes_per_token": "past keys + values at the mean cached length during the timed decode",
            "achieved_gbs": "(weight + kv bytes) / median decode time",
            "bandwidth_fraction": "achieved_gbs / best ORT fp32 MatMul M=1 read bandwidth of this run",
            "floor_ms": "(weight + kv bytes) / best ORT fp32 MatMul M=1 read bandwidth of this run",
            "decode_ms_per_token": "per run: mean of the timed single-token steps; median / p10 / p90 over runs",
        },
        "bandwidth_gbs": {
            "ort_matmul_m1": _summary(ort_bw),
            "reference": ref_gbs,
            "numpy_sum_1thread": _summary(bw_before["numpy_sum_gbs"] + bw_after["numpy_sum_gbs"]),
        },
        "results": results,
    }
    text = table(out, args.prefill)
    print(text)
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1))
        _log(f"wrote {args.output}")
    return out


def _runtime_info() -> dict:
    import onnxruntime as ort

    from ..runtime import plugin_path

    lib = plugin_path()
    return {
        "onnxruntime": ort.__version__,
        "plugin": str(lib),
        "plugin_mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lib.stat().st_mtime)),
        "FFSPLIT_ISA_env": os.environ.get("FFSPLIT_ISA", "auto"),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(out: dict, prefill: list[int]) -> str:
    """Markdown table of a result dict."""
    hdr = [
        "variant",
        "formats",
        "file MB",
        "read MB/token",
        "decode ms/token (p10-p90)",
        "tok/s",
        "x dense",
        "x int8",
        "x int4",
        "GB/s",
        "of bandwidth",
        "floor ms",
    ]
    hdr += [f"prefill {n} ms (x int4)" for n in prefill]
    rows = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for name, r in out["results"].items():
        d = r["decode_ms_per_token"]
        cells = [
            name,
            r["formats"],
            f"{r['file_bytes'] / 1e6:.0f}",
            f"{r['bytes_read_per_token'] / 1e6:.0f}",
            f"{d['median']:.2f} ({d['p10']:.2f}-{d['p90']:.2f})",
            f"{r['tokens_per_s']:.1f}",
            f"{r['decode_speedup']['dense']:.2f}",
            f"{r['decode_speedup']['int8']:.2f}",
            f"{r['decode_speedup']['int4']:.2f}",
            f"{r['achieved_gbs']:.1f}",
            f"{r['bandwidth_fraction']:.2f}",
            f"{r['floor_ms']:.2f}",
        ]
        for n in prefill:
            p = r["prefill_ms"][str(n)]
            cells.append(f"{p['median']:.1f} ({r['prefill_speedup']['int4'][str(n)]:.2f})")
        rows.append("| " + " | ".join(cells) + " |")
    bw = out["bandwidth_gbs"]
    m = out["machine"]
    rows.append("")
    rows.append(
        f"read bandwidth (ORT fp32 MatMul M=1, 1 GiB, {out['settings']['threads']} threads): "
        f"median {bw['ort_matmul_m1']['median']:.1f} GB/s, best {bw['reference']:.1f} GB/s "
        f"(floor uses best); numpy sum 1 thread {bw['numpy_sum_1thread']['median']:.1f} GB/s. "
        f"{m['cpu']}, {m['cores']} cores, load average {m['loadavg_start']} -> {m['loadavg_end']}."
    )
    return "\n".join(rows)
