"""The first run on a GPU machine: engines, numerics against ONNX Runtime CPU, decode speed.

``python -m ffsplit_export.trt.gpu_check [--work DIR] [--json PATH] [--shape quick|full]``
(``scripts/gpu_check.sh`` installs the extras, runs the GPU/TensorRT tests, then this):

1. exports tiny T5, Whisper and MPT with ``--target tensorrt``, builds one TensorRT engine per
   ONNX file (:func:`.engine.build_engine`, plugins AOT) and compares every output with ONNX
   Runtime CPU (ffsplit CPU library) on the same inputs: max |diff| per output;
2. the MPT-shaped benchmark model (:mod:`ffsplit_export.bench` shapes): a dense engine (fp16
   where this TensorRT still has the FP16 builder flag, else the fp32 graph strongly typed),
   the ffsplit ``--target tensorrt`` engine (fp16 heavy), the same export through ONNX
   Runtime's TensorRT EP with our plugins, and ``--target portable`` exports (fp16 / int8 heavy)
   on ONNX Runtime's CUDA EP; numerics against ONNX Runtime CPU, decode ms per token;
3. one table on stdout, everything in JSON; exit 1 with one line on any mismatch or error.

Without a GPU it prints one "no GPU" line and exits 0 (a skip). Tolerances: fp32 graphs
``1e-3 + 5e-3 * max|ref|`` (TensorRT may use TF32 for fp32 matmuls), graphs with fp16
weights ``1e-2 + 2e-2 * max|ref|``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

TOL = {"fp32": (1e-3, 5e-3), "fp16": (1e-2, 2e-2)}
#: (model, label, SplitConfig fields, 2:4 as dense Gemm for SPARSE_WEIGHTS)
TINY_CASES = [
    ("tiny-t5", "sparse-int8", {}, False),
    ("tiny-whisper", "sparse-int8", {}, False),
    ("tiny-mpt", "sparse-int8", {}, False),
    ("tiny-mpt", "sparse-fp32", {"light_format": "sparse-fp32"}, False),
    ("tiny-mpt", "sparse-int4", {"light_format": "sparse-int4"}, False),
    ("tiny-mpt", "2:4-int8 plugin", {"light_format": "2:4-int8"}, False),
    ("tiny-mpt", "2:4-int8 dense gemm", {"light_format": "2:4-int8"}, True),
]


@dataclass
class Row:
    """One compared output (or one failed step when ``error`` is set)."""

    model: str
    backend: str
    output: str = ""
    max_abs_diff: float | None = None
    tol: float | None = None
    ms_per_token: float | None = None
    error: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        if self.error:
            return False
        if self.max_abs_diff is None:
            return True
        return bool(np.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tol)


def tolerance(ref: np.ndarray, precision: str) -> float:
    atol, rtol = TOL[precision]
    return float(atol + rtol * (float(np.abs(ref).max()) if ref.size else 0.0))


def compare(model: str, backend: str, got: dict, ref: dict, precision: str) -> list[Row]:
    """One row per reference output: max |got - ref| against the stated tolerance."""
    rows = []
    for name, r in ref.items():
        g = got.get(name)
        if g is None:
            rows.append(Row(model, backend, name, error="output missing"))
            continue
        if np.shape(g) != np.shape(r):
            rows.append(Row(model, backend, name, error=f"shape {np.shape(g)} != {np.shape(r)}"))
            continue
        d = float(np.abs(np.asarray(g, np.float64) - np.asarray(r, np.float64)).max()) if np.size(r) else 0.0
        rows.append(Row(model, backend, name, d, tolerance(np.asarray(r), precision)))
    return rows


def format_table(rows: list[Row]) -> str:
    head = f"{'model':28} {'backend':30} {'output':26} {'max|diff|':>10} {'tol':>9} {'ms/token':>9}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        diff = "" if r.max_abs_diff is None else f"{r.max_abs_diff:.3g}"
        tol = "" if r.tol is None else f"{r.tol:.3g}"
        ms = "" if r.ms_per_token is None else f"{r.ms_per_token:.3f}"
        status = "yes" if r.ok else f"NO {r.error}".strip()
        lines.append(
            f"{r.model[:28]:28} {r.backend[:30]:30} {r.output[:26]:26} {diff:>10} {tol:>9} {ms:>9}  {status}"
        )
    return "\n".join(lines)


def failures(rows: list[Row]) -> list[Row]:
    return [r for r in rows if not r.ok]


def failure_line(rows: list[Row]) -> str:
    bad = failures(rows)
    first = bad[0]
    what = first.error or f"max|diff| {first.max_abs_diff:.3g} > tol {first.tol:.3g}"
    return f"gpu_check: FAIL: {len(bad)} of {len(rows)} checks failed; first: {first.model} {first.backend} {first.output}: {what}"


def write_json(path: Path, rows: list[Row], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "ok": not failures(rows), "rows": [{**asdict(r), "ok": r.ok} for r in rows]}
    path.write_text(json.dumps(data, indent=1, default=str))


# ------------------------------------------------------------------------------ CUDA buffers


class _Cuda:
    """Device buffers through the CUDA driver API (ctypes; no torch / cuda-python needed).
    Uses the primary context, which TensorRT's runtime API shares."""

    def __init__(self, device: int = 0):
        self.lib = ctypes.CDLL("libcuda.so.1")
        self._ok(self.lib.cuInit(0))
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        self._ok(self.lib.cuDeviceGet(ctypes.byref(dev), device))
        self._ok(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
        self._ok(self.lib.cuCtxSetCurrent(ctx))
        self.lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
        self.lib.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        self.lib.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
        self.lib.cuMemFree_v2.argtypes = [ctypes.c_uint64]

    @staticmethod
    def _ok(rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"CUDA driver error {rc}")

    def alloc(self, nbytes: int) -> int:
        p = ctypes.c_uint64()
        self._ok(self.lib.cuMemAlloc_v2(ctypes.byref(p), max(int(nbytes), 1)))
        return p.value

    def put(self, a: np.ndarray) -> int:
        a = np.ascontiguousarray(a)
        p = self.alloc(a.nbytes)
        if a.nbytes:
            self._ok(self.lib.cuMemcpyHtoD_v2(p, a.ctypes.data, a.nbytes))
        return p

    def get(self, p: int, shape, dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        if out.nbytes:
            self._ok(self.lib.cuMemcpyDtoH_v2(out.ctypes.data, p, out.nbytes))
        return out

    def free(self, p: int) -> None:
        self.lib.cuMemFree_v2(p)

    def sync(self) -> None:
        self._ok(self.lib.cuCtxSynchronize())


class EngineRunner:
    """Run a serialized engine on NumPy feeds (one optimisation profile, default stream)."""

    def __init__(self, engine_path: Path, cuda: _Cuda):
        import tensorrt as trt

        self.trt, self.cuda = trt, cuda
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"cannot deserialize {engine_path}")
        self.ctx = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def __call__(self, feeds: dict) -> dict:
        trt, bufs = self.trt, []
        try:
            for n in self.inputs:
                a = np.ascontiguousarray(feeds[n], trt.nptype(self.engine.get_tensor_dtype(n)))
                self.ctx.set_input_shape(n, a.shape)
                p = self.cuda.put(a)
                bufs.append(p)
                self.ctx.set_tensor_address(n, p)
            shapes, ptrs = {}, {}
            for n in self.outputs:
                shapes[n] = tuple(self.ctx.get_tensor_shape(n))
                dt = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
                ptrs[n] = p = self.cuda.alloc(int(np.prod(shapes[n])) * dt.itemsize)
                bufs.append(p)
                self.ctx.set_tensor_address(n, p)
            if not self.ctx.execute_async_v3(0):
                raise RuntimeError("execute_async_v3 failed")
            self.cuda.sync()
            return {
                n: self.cuda.get(ptrs[n], shapes[n], trt.nptype(self.engine.get_tensor_dtype(n)))
                for n in self.outputs
            }
        finally:
            for p in bufs:
                self.cuda.free(p)


# ------------------------------------------------------------------------------ feeds


def make_feeds(
    session, rng: np.random.Generator, seq: int = 8, past: int = 4, batch: int = 1, config=None
) -> dict:
    """Inputs for every graph input of an ONNX Runtime session: token ids in [3, 100), masks of
    ones, past key/values of length ``past`` (dims named ``*past*``), other dynamic dims ``seq``,
    float features N(0, 1); Whisper's ``input_features`` get the model's mel bins and frames."""
    config = config or {}
    feeds = {}
    for i in session.get_inputs():
        dims = []
        for d in i.shape:
            if isinstance(d, int) and d > 0:
                dims.append(d)
                continue
            s = str(d).lower()
            dims.append(
                batch
                if "batch" in s
                else seq + past
                if ("past" in s and "mask" in i.name)
                else past
                if "past" in s
                else seq
            )
        if i.name == "input_features" and "num_mel_bins" in config:
            dims[1:] = [config["num_mel_bins"], 2 * config.get("max_source_positions", 1500)]
        if i.type == "tensor(int64)":
            feeds[i.name] = (
                np.ones(dims, np.int64) if "mask" in i.name else rng.integers(3, 100, dims, dtype=np.int64)
            )
        elif i.type == "tensor(bool)":
            feeds[i.name] = np.zeros(dims, bool)
        else:
            dt = np.float16 if i.type == "tensor(float16)" else np.float32
            feeds[i.name] = rng.standard_normal(dims).astype(dt)
    return feeds


def _config(onnx_path: Path) -> dict:
    p = Path(onnx_path).parent / "config.json"
    return json.loads(p.read_text()) if p.exists() else {}


def cpu_session(path: Path):
    import onnxruntime as ort

    from ..runtime import session_options

    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def run_session(sess, feeds: dict) -> dict:
    names = [o.name for o in sess.get_outputs()]
    return dict(
        zip(
            names,
            sess.run(names, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}}),
        )
    )


def time_per_call(fn, feeds: dict, n: int) -> float:
    fn(feeds)  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        fn(feeds)
    return (time.perf_counter() - t0) / n * 1e3


# ------------------------------------------------------------------------------ steps


def _void(fn):
    """A step with no rows of its own (an export): run ``fn`` when called."""
    return lambda: (fn(), [])[1]


def _step(rows: list[Row], model: str, backend: str, fn) -> None:
    """Run one step; any exception becomes a failed row (the run continues)."""
    try:
        rows.extend(fn())
    except Exception as e:  # report every failure in the table, fail at the end
        tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
        rows.append(Row(model, backend, error=f"{type(e).__name__}: {e}"[:300], extra={"where": tb}))


def check_engine(
    cuda,
    onnx_path: Path,
    engine_dir: Path,
    model: str,
    precision: str,
    rng,
    sparse=False,
    fp16=False,
    tokens=0,
):
    from .engine import build_engine

    sess = cpu_session(onnx_path)
    cfg = _config(onnx_path)
    feeds = make_feeds(sess, rng, config=cfg)
    dec = make_feeds(sess, rng, seq=1, past=32, config=cfg) if tokens else {}
    max_seq = max([512] + [d for f in (*feeds.values(), *dec.values()) for d in np.shape(f)])
    engine = build_engine(
        onnx_path, engine_dir / f"{onnx_path.stem}.engine", sparse_weights=sparse, fp16=fp16, max_seq=max_seq
    )
    runner = EngineRunner(engine, cuda)
    rows = compare(model, f"trt engine {onnx_path.stem}", runner(feeds), run_session(sess, feeds), precision)
    if tokens:
        rows[0].ms_per_token = time_per_call(runner, dec, tokens)
    return rows


def check_ort(
    onnx_path: Path, model: str, backend: str, providers, precision: str, rng, tokens=0, session=None
):
    import onnxruntime as ort

    sess = session or ort.InferenceSession(str(onnx_path), providers=providers)
    want = (providers or ["TensorrtExecutionProvider"])[0]
    if sess.get_providers()[0] != want:
        # ONNX Runtime drops a provider it cannot load with only a warning: say so, loudly
        raise RuntimeError(f"{want} is not active (session providers: {sess.get_providers()})")
    cpu = cpu_session(onnx_path)
    feeds = make_feeds(cpu, rng, config=_config(onnx_path))
    rows = compare(model, backend, run_session(sess, feeds), run_session(cpu, feeds), precision)
    if tokens:
        dec = make_feeds(cpu, rng, seq=1, past=32)
        rows[0].ms_per_token = time_per_call(lambda f: run_session(sess, f), dec, tokens)
    return rows


def run_all(args) -> tuple[list[Row], dict]:
    from ..export import ExportOptions, export
    from ..split import SplitConfig

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cuda = _Cuda()
    rows: list[Row] = []
    meta = {
        "versions": _versions(),
        "timing": f"ms per decode call: 1 new token after a 32-token past, batch 1, mean of "
        f"{args.tokens} calls after one warm-up; host<->device copies of inputs and outputs included "
        "for every backend (NumPy in, NumPy out)",
    }

    def exp(name, out, target, dense24=False, **cfg):
        # tensorrt graphs with plugin nodes cannot run in ONNX Runtime CPU: checked below instead
        opts = ExportOptions(
            target=target, overwrite=True, validate=target != "tensorrt" or dense24, trt_dense_24=dense24
        )
        export(name, out, config=SplitConfig(**cfg), options=opts, num_samples=8, progress=False)
        return out

    # 1. tiny models (every plugin op, and the 2:4 dense Gemm form with SPARSE_WEIGHTS): one
    #    engine per ONNX file, and ONNX Runtime's TensorRT EP on the same files
    for name, label, cfg, dense24 in TINY_CASES:
        out = work / name / label.replace(":", "").replace(" ", "-")
        tag = f"{name} {label}"
        _step(
            rows,
            tag,
            "export --target tensorrt",
            _void(lambda n=name, o=out, c=cfg, d=dense24: exp(n, o, "tensorrt", d, **c)),
        )
        for f in sorted(out.glob("*.onnx")):
            if f.stem == "decoder_model_merged":
                continue  # the two decoders it merges are checked one by one
            _step(
                rows,
                tag,
                f"trt engine {f.stem}",
                lambda f=f, o=out, t=tag, d=dense24: check_engine(
                    cuda, f, o / "engines", t, "fp32", rng, sparse=d
                ),
            )
            _step(rows, tag, f"ort trt-ep {f.stem}", lambda f=f, t=tag: _ort_trt(f, t, "fp32", rng, 0))

    # 2. the MPT-shaped benchmark model
    from ..bench import build_model, export_dense

    mdir = build_model(work, args.shape)
    bname = f"bench-mpt-{args.shape}"
    dense = work / "bench-dense"
    _step(rows, bname, "export dense (optimum)", _void(lambda: export_dense(mdir, dense)))
    if (dense / "model.onnx").exists():
        _step(
            rows,
            bname,
            "trt engine dense",
            lambda: _dense_engine(cuda, dense / "model.onnx", bname, rng, args.tokens),
        )
    ff = work / "bench-ffsplit-trt"
    _step(
        rows,
        bname,
        "export ffsplit tensorrt",
        _void(lambda: exp(str(mdir), ff, "tensorrt", heavy_format="fp16")),
    )
    if (ff / "model.onnx").exists():
        _step(
            rows,
            bname,
            "trt engine ffsplit",
            lambda: check_engine(
                cuda, ff / "model.onnx", ff / "engines", bname, "fp16", rng, tokens=args.tokens
            ),
        )
        _step(
            rows,
            bname,
            "ort trt-ep ffsplit",
            lambda: _ort_trt(ff / "model.onnx", bname, "fp16", rng, args.tokens),
        )
    for heavy in ("fp16", "int8"):
        pdir = work / f"bench-portable-{heavy}"
        _step(
            rows,
            bname,
            f"export portable {heavy}",
            _void(lambda p=pdir, h=heavy: exp(str(mdir), p, "portable", heavy_format=h)),
        )
        if (pdir / "model.onnx").exists():
            _step(
                rows,
                bname,
                f"ort cuda portable {heavy}",
                lambda p=pdir, h=heavy: check_ort(
                    p / "model.onnx",
                    bname,
                    f"ort cuda portable {h}",
                    ["CUDAExecutionProvider"],
                    "fp16",
                    rng,
                    args.tokens,
                ),
            )
    return rows, meta


def _ort_trt(path: Path, model: str, precision: str, rng, tokens: int):
    from .engine import ort_tensorrt_session

    sess = ort_tensorrt_session(path, cache_dir=path.parent / "ort-trt-cache")
    return check_ort(path, model, f"ort trt-ep {path.stem}", None, precision, rng, tokens, session=sess)


def _dense_engine(cuda, path: Path, model: str, rng, tokens: int):
    import tensorrt as trt

    fp16 = hasattr(trt.BuilderFlag, "FP16")  # TensorRT 10: weakly typed fp16; 11: fp32 graph, strongly typed
    rows = check_engine(
        cuda, path, path.parent / "engines", model, "fp16" if fp16 else "fp32", rng, fp16=fp16, tokens=tokens
    )
    for r in rows:
        r.backend = f"trt engine dense {'fp16' if fp16 else 'fp32'}"
    return rows


def _versions() -> dict:
    import importlib.metadata as md

    v = {}
    for pkg in ("tensorrt", "onnxruntime-gpu", "onnxruntime", "triton", "torch", "onnx"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    return v


def main(argv: list[str] | None = None) -> int:
    from .engine import cuda_device_count

    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--work", default="gpu_check_work", help="folder for exports and engines")
    p.add_argument("--json", default=None, help="result JSON (default WORK/gpu_check.json)")
    p.add_argument("--shape", default="quick", choices=["quick", "full"], help="benchmark model shape")
    p.add_argument("--tokens", type=int, default=50, help="timed decode steps per backend")
    args = p.parse_args(argv)
    if cuda_device_count() == 0:
        print("gpu_check: no GPU (no NVIDIA driver or CUDA device found): nothing to check here, skipped")
        return 0
    t0 = time.time()
    rows, meta = run_all(args)
    meta["seconds"] = round(time.time() - t0, 1)
    print(format_table(rows))
    out = Path(args.json) if args.json else Path(args.work) / "gpu_check.json"
    write_json(out, rows, meta)
    print(f"wrote {out}")
    if failures(rows):
        print(failure_line(rows), file=sys.stderr)
        return 1
    print(f"gpu_check: OK: {len(rows)} checks passed in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
