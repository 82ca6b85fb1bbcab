"""One FFN layer at decode (M = 1): ``ffsplit::FusedFFNNBits`` against today's stock subgraph, same run.

The FFN's parts are the presets' kinds (heavy int8 per channel in blocks of 128, light int4 in
groups of 64 with zero points; random weights of a realistic shape, packed by
:func:`ffsplit_export.ops._ffn.pack_nbits_part`). Shapes (``--shape``):

* ``smollm2``: gated SiLU, D = 576, F = 1536, H = 154 (SmolLM2-135M's FFN);
* ``mpt``: ungated GELU, D = 2048, F = 8192, H = 819 (MPT-shaped).

Variants, interleaved (A B C ... A B C ...), median of ``--repeats`` timings of ``--inner`` runs
over a cycle of tokens, for ``--threads`` (default 1 and 2 intra-op threads). With ``--layers N``
each variant is N layers of the shape (own weights) side by side on the same X, outputs summed, and
times are per layer: one layer's weights stay in the last-level cache between runs, N layers (32
SmolLM2 / 4 MPT > 32 MiB) stream from DRAM as in a whole model.

* ``stock``: MatMulNBits accuracy_level 4 per part + Concat / bias Add / activation / Mul / Slice /
  Add, as the export writes the split FFN today (built with onnx.helper);
* ``fused``: FusedFFNNBits accuracy_level 4, skip 0 (row-major light down);
* ``fused-nm``: the same with the light down stored neuron-major (FFSPLIT_NBITS_DOWN=neurons):
  the layout comparison for skip 0;
* ``exact``: skip 1, threshold 0 (skips exact zeros only: the overhead of skipping on a
  non-ReLU FFN);
* ``skipXX``: skip 1 with the threshold that skips XX % of the light neurons on calibration tokens
  (quantile of the silence score; the fraction measured on the benchmark tokens is reported). The
  light down is read tiled and whole (skipped neurons have a = 0) unless at most 30 % of the light
  neurons are kept (then neuron-major): at 50 % skipped that beats reading only the kept columns on
  the machine measured, see ``skipXX-nm``; gated, the light up rows of skipped neurons are not read;
* ``skipXX-nm``: the same with the light down stored neuron-major (FFSPLIT_NBITS_DOWN=neurons): the
  down columns of skipped neurons are not read;
* ``mixedXX`` (gated shapes): ``--skip-criterion mixed``: the gate threshold skips a quarter of XX %
  (their up rows unread), ``product_threshold`` on |act(gate) * up| the rest (down columns only).

Input skipping (``--input-skip XX ...``, ungated shapes; TEAL-style ``input_threshold``: the light up
sees X with the channels |x| <= t zeroed, t the XX % quantile of |x| on the calibration tokens):

* ``inXX``: skip 1, input_threshold only: at M = 1 the light up is read input-major, only the kept
  channels' rows (3.7 KB each for the MPT shape's int4 light up);
* ``inXX-tiled``: the same node with the light up read tiled and whole after zeroing the channels
  (FFSPLIT_NBITS_UP=tiled): the layout comparison;
* ``inXX+skipYY``: both thresholds (the neuron threshold's quantile taken with the input skipping on).

With ``--baseline-library PATH`` (another build of libffsplit_ort, e.g. main's before a change),
``fused``, ``exact`` and the ``skipXX`` variants also run on that library in the same run, named
``<variant>@base`` (ONNX Runtime keeps each session's custom-op library apart).

Bytes read per token (per layer) are computed from the packed sizes: the heavy parts, the light gate / up rows
read (gated with skipping: only the rows of live neurons), and the light down part (neuron-major:
only the columns of the neurons not skipped; ``@base`` variants with skip 1 use neuron-major, the
library's layout before tiling). The load average is recorded beside the numbers (the machine is shared).

    python samples/bench_fused_ffn_nbits.py --output samples/results/bench_fused_ffn_nbits.json
    python samples/bench_fused_ffn_nbits.py --shape mpt --threads 1 \
        --baseline-library /tmp/mainlib/plugins/onnxruntime/libffsplit_ort.so
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

SHAPES = {
    "smollm2": dict(d=576, f=1536, h=154, activation="silu", gated=1),
    "mpt": dict(d=2048, f=8192, h=819, activation="gelu", gated=0),
}
KIND = dict(heavy_bits=8, light_bits=4, heavy_block_size=128, light_block_size=64)


def _load() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def _session(model, threads: int, env: dict | None = None, library: str | None = None):
    import onnxruntime as ort

    from ffsplit_export.runtime import session_options

    if library:  # a baseline build of the custom-op library instead of the configured one
        so = ort.SessionOptions()
        so.register_custom_ops_library(library)
    else:
        so = session_options()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    old = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:  # the kernel reads FFSPLIT_NBITS_DOWN when the session is created
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stack(models: list):
    """One model of the layers' models side by side on the same X, their outputs summed (each
    layer's names prefixed): with more layers than the last-level cache holds, the weights stream
    from DRAM as in a whole model. One layer: the model itself."""
    if len(models) == 1:
        return models[0]
    from onnx import TensorProto, helper

    nodes, inits, outs = [], [], []
    for i, m in enumerate(models):

        def ren(n, i=i):
            return n if n in ("X", "") else f"l{i}_{n}"

        for t in m.graph.initializer:
            t2 = type(t)()
            t2.CopyFrom(t)
            t2.name = ren(t.name)
            inits.append(t2)
        for nd in m.graph.node:
            n2 = type(nd)()
            n2.CopyFrom(nd)
            n2.input[:] = [ren(x) for x in nd.input]
            n2.output[:] = [ren(x) for x in nd.output]
            n2.name = ren(nd.name) if nd.name else ""
            nodes.append(n2)
        outs.append(ren(m.graph.output[0].name))
    nodes.append(helper.make_node("Sum", outs, ["Y"]))
    graph = helper.make_graph(
        nodes,
        "layers",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    return helper.make_model(
        graph, opset_imports=list(models[0].opset_import), ir_version=models[0].ir_version
    )


def _silence(x, ins, shape) -> np.ndarray:
    from ffsplit_export.ops._ffn import NBITS_PARTS, _nbits_weight, activation

    i = NBITS_PARTS["gate_light" if shape["gated"] else "up_light"] - 1
    w = _nbits_weight(ins[i : i + 3], "light", None, shape["d"], KIND["light_bits"], KIND["light_block_size"])
    bias = ins[20 if shape["gated"] else 6]
    v = (x.astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32)
    if bias is not None:
        v = v + bias[-w.shape[0] :]
    return np.abs(activation(shape["activation"], v).astype(np.float32))


def _product(x, ins, shape) -> np.ndarray:
    """|act(gate) * up| of the light neurons (gated shapes), as the reference computes it."""
    from ffsplit_export.ops._ffn import NBITS_PARTS, _nbits_weight

    i = NBITS_PARTS["up_light"] - 1
    w = _nbits_weight(ins[i : i + 3], "light", None, shape["d"], KIND["light_bits"], KIND["light_block_size"])
    u = (x.astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32)
    if ins[6] is not None:
        u = u + ins[6][-w.shape[0] :]
    return _silence(x, ins, shape) * np.abs(u)


def _zeroed(x, t):
    return np.where(np.abs(x) <= np.float32(t), np.float32(0), x).astype(np.float32)


def _layer_variants(ins, calib, shape, base, skips, input_skips=()) -> dict:
    """The variants of one layer: name -> (model, environment at session creation, reference kwargs)."""
    from ffsplit_export.ops._ffn import fused_ffn_nbits_model, stock_nbits_ffn_model

    sil = _silence(calib, ins, shape)
    v = {
        "stock": (stock_nbits_ffn_model(ins, **base), None, {}),
        "fused@base": (fused_ffn_nbits_model(ins, **base, skip=0), None, {}),
        "fused": (fused_ffn_nbits_model(ins, **base, skip=0), None, {}),
        "fused-nm": (
            fused_ffn_nbits_model(ins, **base, skip=0),
            {"FFSPLIT_NBITS_DOWN": "neurons"},
            {},
        ),
        "exact": (fused_ffn_nbits_model(ins, **base, skip=1), None, {"skip": 1}),
    }
    for q in skips:
        thr = float(np.quantile(sil, q))
        model = fused_ffn_nbits_model(ins, **base, skip=1, threshold=thr)
        v[f"skip{round(q * 100)}"] = (model, None, {"skip": 1, "threshold": thr})
        nm = {"FFSPLIT_NBITS_DOWN": "neurons"}
        v[f"skip{round(q * 100)}-nm"] = (model, nm, {"skip": 1, "threshold": thr})
        if shape["gated"]:  # --skip-criterion mixed: a quarter of q by the gate, the rest by |act(g) * up|
            from ffsplit_export.fused import GATE_SHARE

            gthr = float(np.quantile(sil, q * GATE_SHARE))
            prod = np.where(sil <= gthr, 0.0, _product(calib, ins, shape))
            kw = {"skip": 1, "threshold": gthr, "product_threshold": float(np.quantile(prod, q))}
            v[f"mixed{round(q * 100)}"] = (fused_ffn_nbits_model(ins, **base, **kw), None, kw)
    for qi in input_skips if not shape["gated"] else ():
        tin = float(np.quantile(np.abs(calib), qi))
        name = f"in{round(qi * 100)}"
        model = fused_ffn_nbits_model(ins, **base, skip=1, input_threshold=tin)
        kw = {"skip": 1, "input_threshold": tin}
        v[name] = (model, None, kw)
        v[f"{name}-tiled"] = (model, {"FFSPLIT_NBITS_UP": "tiled"}, kw)
        sil_in = _silence(_zeroed(calib, tin), ins, shape)
        for q in skips:
            thr = float(np.quantile(sil_in, q))
            model = fused_ffn_nbits_model(ins, **base, skip=1, threshold=thr, input_threshold=tin)
            v[f"{name}+skip{round(q * 100)}"] = (model, None, {**kw, "threshold": thr})
            v[f"{name}+skip{round(q * 100)}-nm"] = (model, {"FFSPLIT_NBITS_DOWN": "neurons"}, {**kw, "threshold": thr})
    return v


def _nbytes(*arrays) -> int:
    return int(sum(a.nbytes for a in arrays if a is not None))


def _bytes_per_token(ins, shape, active: float, live: float, kept_channels: float = 1.0) -> int:
    """Weights read for one token: ``active`` fraction of light neurons not skipped (down columns),
    ``live`` fraction of light up rows read (gated with skipping; else 1), ``kept_channels``
    fraction of the light up's input channels read (input-major: codes of the kept channels only;
    the block scales / zero points are read whole)."""
    heavy = _nbytes(*ins[0:3], *ins[7:10]) + (_nbytes(*ins[14:17]) if shape["gated"] else 0)
    up_l = _nbytes(ins[3]) * kept_channels + _nbytes(*ins[4:6])
    gate_l = _nbytes(*ins[17:20]) if shape["gated"] else 0
    down_l = _nbytes(*ins[10:13])
    return int(heavy + gate_l + up_l * live + down_l * active)


def _time(sessions: dict, xs: list[np.ndarray], repeats: int, inner: int) -> dict:
    times = {k: [] for k in sessions}
    for s in sessions.values():  # warm-up, past the kernel's layout tuning (its first 20 single-row calls)
        for i in range(max(len(xs), 24)):
            s.run(None, {"X": xs[i % len(xs)]})
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            for i in range(inner):
                s.run(None, {"X": xs[i % len(xs)]})
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    from ffsplit_export.ops._ffn import (
        fused_ffn_nbits_reference,
        random_nbits_ffn_inputs,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--skip", type=float, nargs="+", default=[0.25, 0.4, 0.5])
    ap.add_argument(
        "--input-skip",
        type=float,
        nargs="*",
        default=[],
        help="ungated shapes: also the inXX / inXX-tiled / inXX+skipYY variants (input_threshold at the "
        "XX %% quantile of |x|)",
    )
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=8, help="benchmark tokens (cycled)")
    ap.add_argument("--calibration", type=int, default=64, help="calibration tokens for the thresholds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--layers",
        type=int,
        default=1,
        help="N layers of the shape (own weights) on the same X, outputs summed; times are per layer "
        "(e.g. 32 SmolLM2 or 4 MPT layers exceed a 32 MiB L3: the weights stream from DRAM)",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="time only these variants (and stock / fused, the baselines), e.g. in50+skip50 in50+skip50-nm: "
        "fewer sessions, less memory with many --layers",
    )
    ap.add_argument("--output", default="samples/results/bench_fused_ffn_nbits.json")
    ap.add_argument(
        "--baseline-library",
        default=None,
        help="another libffsplit_ort.so: fused / exact / skipXX also run on it as '<variant>@base'",
    )
    args = ap.parse_args()

    rows = []
    print(f"load average at start: {_load()}")
    for name in args.shape:
        shape = SHAPES[name]
        rng = np.random.default_rng(args.seed)
        d, f, h = shape["d"], shape["f"], shape["h"]
        layers = []
        for _ in range(args.layers):
            ins = random_nbits_ffn_inputs(rng, d, f, h, zero_points=True, gated=bool(shape["gated"]), **KIND)
            # the heavy int8 part is symmetric (per channel, as formats/nbits.py stores it)
            heavy = random_nbits_ffn_inputs(
                rng, d, f, h, zero_points=False, gated=bool(shape["gated"]), **KIND
            )
            for i in (0, 1, 2, 7, 8, 9) + ((14, 15, 16) if shape["gated"] else ()):
                ins[i] = heavy[i]
            layers.append(ins)
        ins = layers[0]
        calib = rng.standard_normal((args.calibration, d)).astype(np.float32)
        xs = [rng.standard_normal((1, d)).astype(np.float32) for _ in range(args.tokens)]
        base = dict(activation=shape["activation"], gated=shape["gated"], accuracy_level=4, **KIND)

        per_layer = [_layer_variants(x, calib, shape, base, args.skip, args.input_skip) for x in layers]
        names = list(per_layer[0])
        if args.variants:
            unknown = sorted(set(args.variants) - set(names))
            if unknown:
                raise SystemExit(f"--variants: unknown {unknown}; this run has {sorted(names)}")
            names = [k for k in names if k in {"stock", "fused", "fused@base", *args.variants}]
        # the skip fractions and bytes below are layer 0's (the layers are alike)
        variants = {k: (_stack([lv[k][0] for lv in per_layer]), *per_layer[0][k][1:]) for k in names}
        del per_layer  # the stacked models hold what is timed
        if args.baseline_library:
            for k in [k for k in variants if k == "exact" or (k.startswith("skip") and "-" not in k)]:
                variants[f"{k}@base"] = variants[k]
        else:
            variants.pop("fused@base", None)
        # skipped fractions on the benchmark tokens (reference) and bytes read
        x_all = np.concatenate(xs)
        ref_kw = {k: v for k, v in base.items() if k != "activation"}
        info = {}
        for k, (_, env, kw) in variants.items():
            if kw:
                _, skipped = fused_ffn_nbits_reference(
                    x_all, *ins, activation_kind=shape["activation"], return_skipped=True, **ref_kw, **kw
                )
                frac = float(skipped.mean())
                # gated with skipping (M = 1): a light up row is read only for a neuron live by the gate
                live = 1.0 - frac if shape["gated"] else 1.0
                if kw.get("product_threshold"):
                    gate_kw = {k: v for k, v in kw.items() if k != "product_threshold"}
                    _, by_gate = fused_ffn_nbits_reference(
                        x_all,
                        *ins,
                        activation_kind=shape["activation"],
                        return_skipped=True,
                        **ref_kw,
                        **gate_kw,
                    )
                    live = 1.0 - float(by_gate.mean())
            else:
                frac, live = 0.0, 1.0
            # the light down columns of skipped neurons are left unread by the neuron-major layout only:
            # forced (-nm), the library before tiling (@base), chosen when <= 30 % are kept, or chosen
            # by the kernel's timing of both layouts (read from its FFSPLIT_NBITS_TUNE_LOG after the run)
            forced = bool(env) and "FFSPLIT_NBITS_DOWN" in env
            down = (
                "neurons"
                if forced and env["FFSPLIT_NBITS_DOWN"] == "neurons"
                or (k.endswith("@base") and kw)
                or (bool(kw) and frac >= 0.7)
                else "rows"
                if forced or not kw
                else "tuned"
            )
            tin = kw.get("input_threshold", 0.0)
            in_frac = float((np.abs(x_all) <= np.float32(tin)).mean()) if tin else 0.0
            im = tin > 0 and not (env and "FFSPLIT_NBITS_UP" in env)
            info[k] = {
                "skipped": frac,
                "input_skipped": in_frac,
                "down": down,
                "bytes": _bytes_per_token(ins, shape, 1.0, live, 1.0 - in_frac if im else 1.0),
                "bytes_nm": _bytes_per_token(ins, shape, 1.0 - frac, live, 1.0 - in_frac if im else 1.0),
            }
        for threads in args.threads:
            logs = tempfile.mkdtemp(prefix="ffsplit_tune_")
            sessions = {
                k: _session(
                    m,
                    threads,
                    {**(env or {}), "FFSPLIT_NBITS_TUNE_LOG": os.path.join(logs, k)},
                    args.baseline_library if k.endswith("@base") else None,
                )
                for k, (m, env, _) in variants.items()
            }
            load0 = _load()
            ms = {k: v / args.layers for k, v in _time(sessions, xs, args.repeats, args.inner).items()}
            for k in variants:
                down = info[k]["down"]
                if down == "tuned":  # each layer's node chose by timing; the majority's layout
                    path = os.path.join(logs, k)
                    picks = open(path).read().split() if os.path.exists(path) else []
                    nm_votes = sum(p == "down=neurons" for p in picks)
                    row_votes = sum(p == "down=rows" for p in picks)
                    down = f"tuned:{'neurons' if nm_votes > row_votes else 'rows'} ({nm_votes}/{nm_votes + row_votes})"
                nbytes = info[k]["bytes_nm"] if "neurons" in down.split(" ")[0] else info[k]["bytes"]
                rows.append(
                    {
                        "shape": name,
                        "layers": args.layers,
                        "threads": threads,
                        "variant": k,
                        "ms": ms[k],
                        "vs_stock": ms["stock"] / ms[k],
                        "vs_fused": ms["fused"] / ms[k],
                        "skipped_light": info[k]["skipped"],
                        "skipped_input": info[k]["input_skipped"],
                        "down_layout": down,
                        "bytes_per_token": nbytes,
                        "load": f"{load0} -> {_load()}",
                    }
                )
            print(
                f"\n{name} (D={d}, F={f}, H={h}, {shape['activation']}, gated={shape['gated']}), threads={threads}"
                + (f", {args.layers} layers (ms per layer)" if args.layers > 1 else "")
            )
            print(
                f"{'variant':16} {'ms':>8} {'x stock':>8} {'x fused':>8} {'skipped':>8} {'in skip':>8} "
                f"{'MB/token':>9}  {'light down':20} load"
            )
            for r in rows[-len(variants) :]:
                print(
                    f"{r['variant']:16} {r['ms']:8.3f} {r['vs_stock']:8.2f} {r['vs_fused']:8.2f} "
                    f"{r['skipped_light']:8.1%} {r['skipped_input']:8.1%} {r['bytes_per_token'] / 1e6:9.2f}  "
                    f"{r['down_layout']:20} {r['load']}"
                )
            shutil.rmtree(logs, ignore_errors=True)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as fh:
        lib = os.environ.get("FFSPLIT_ORT_LIBRARY", "")
        meta = {"args": vars(args), "cpu_count": os.cpu_count(), "kind": KIND, "library": lib, "rows": rows}
        json.dump(meta, fh, indent=1)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
