"""Lossless ``--activation-sparsity exact`` on ReLU models: fused + exact exports against the plain
split exports of the same model (same compression, deterministic), through ONNX Runtime.

For each model: export twice (default options, and ``--activation-sparsity exact``), run every
ONNX file (merged decoders excepted) of both on the same random feeds, report the max abs diff
per file, and the fraction of light neurons skipped (exact zeros of the light activation) on the
calibration batches in PyTorch (the fused modules compute what the op computes).

    python samples/measure_exact_skip.py --models tiny-t5 tiny-opt --output exact_skip.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

DIMS = {
    "batch_size": 1,
    "sequence_length": 5,
    "past_sequence_length": 3,
    "encoder_sequence_length": 6,
    "decoder_sequence_length": 5,
}


def _dim(d) -> int:
    if isinstance(d, int):
        return d
    try:
        return int(eval(str(d), {}, dict(DIMS)))  # optimum's axis names, e.g. "past_sequence_length + 1"
    except Exception:
        return 5


def _feeds(sess, rng) -> dict:
    feeds = {}
    for i in sess.get_inputs():
        shape = [_dim(d) for d in i.shape]
        if i.type == "tensor(int64)":
            feeds[i.name] = (
                np.ones(shape, np.int64) if "mask" in i.name else rng.integers(0, 60, shape).astype(np.int64)
            )
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    if "position_ids" in feeds:
        s = feeds["position_ids"].shape[-1]
        feeds["position_ids"] = np.arange(DIMS["past_sequence_length"], DIMS["past_sequence_length"] + s)[
            None
        ]
    return feeds


def _skip_fraction(name: str) -> float:
    from ffsplit_export.fused import FusedFFN, _act, _split_apply, fuse_ffns_
    from ffsplit_export.models.tiny import build_tiny
    from ffsplit_export.pipeline import compress

    model, pre, _ = build_tiny(name)
    res = compress(model, pre, progress=False)
    fuse_ffns_(res.model, 1)
    zeros, total = [0], [0]

    def hook(mod, inp, out):  # noqa: ARG001
        x = inp[0]
        u = _split_apply(mod.up, x)
        a = _act(mod.kind, _split_apply(mod.gate, x)) * u if mod.gate is not None else _act(mod.kind, u)
        light = a[..., mod.up.n_heavy :]
        zeros[0] += int((light == 0).sum())
        total[0] += light.numel()

    for m in res.model.modules():
        if isinstance(m, FusedFFN):
            m.register_forward_hook(hook)
    with torch.no_grad():
        for b in res.batches:
            res.model(**b.inputs)
    return zeros[0] / max(total[0], 1)


def main() -> None:
    import onnxruntime as ort

    from ffsplit_export.export.api import export
    from ffsplit_export.export.core import ExportOptions
    from ffsplit_export.runtime import session_options

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-t5", "tiny-opt"])
    ap.add_argument("--output", default="exact_skip.json")
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            dirs = {}
            for tag, opts in (
                ("plain", ExportOptions()),
                ("exact", ExportOptions(activation_sparsity="exact")),
            ):
                dirs[tag] = Path(tmp) / f"{name}-{tag}"
                man = export(name, dirs[tag], options=opts, progress=False)
            diffs = {}
            for f in sorted(dirs["plain"].glob("*.onnx")):
                if "merged" in f.name:
                    continue
                s0 = ort.InferenceSession(str(f), session_options(), providers=["CPUExecutionProvider"])
                s1 = ort.InferenceSession(
                    str(dirs["exact"] / f.name), session_options(), providers=["CPUExecutionProvider"]
                )
                feeds = _feeds(s0, np.random.default_rng(0))
                y0, y1 = s0.run(None, feeds), s1.run(None, feeds)
                diffs[f.name] = max(float(np.abs(a - b).max()) for a, b in zip(y0, y1))
            out[name] = {
                "fused": man["fused_ffn"],
                "max_abs_diff_exact_vs_plain": diffs,
                "light_neurons_skipped_fraction": _skip_fraction(name),
            }
            print(name, json.dumps(out[name]))
    Path(args.output).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
