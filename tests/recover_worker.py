"""One recovery run of tiny-llama, for tests/test_recover_ddp.py.

Run as a plain process, or under ``python -m torch.distributed.run --nproc_per_node N``:
every rank runs the same command; rank 0 writes the per-step losses (and, for a finished run,
the trained weights) to ``--out``. ``--stop-after K`` interrupts the run after step K-1 (its
checkpoint written), as a killed job would be.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "pack my box with five dozen liquor jugs",
    "how vexingly quick daft zebras jump",
    "sphinx of black quartz, judge my vow",
] * 2

STEPS = 8
SEQ_LEN = 24  # 8 x ~40 bytes -> 13 blocks: batches of 4, 4, 4 and 1 (a rank without rows)


class Stop(Exception):
    """Raised by the step hook to interrupt a run."""


def run(
    out: str | None,
    checkpoint_dir: str | None = None,
    stop_after: int | None = None,
    batch_size: int = 4,
    fsdp: bool = False,
    model: str = "tiny-llama",
) -> dict:
    from ffsplit_export.calibrate import make_batches
    from ffsplit_export.models.loading import load_model
    from ffsplit_export.pipeline import compress
    from ffsplit_export.recover import recover
    from ffsplit_export.split import SplitConfig

    torch.manual_seed(0)
    teacher, pre, _ = load_model(model)
    res = compress(
        teacher,
        pre,
        config=SplitConfig(light_format="sparse-int8", light_sparsity=0.5),
        batches=make_batches(teacher, pre, TEXT, batch_size=4, max_length=32),
        progress=False,
    )
    data = TEXT  # a causal LM: cut into SEQ_LEN blocks
    if teacher.config.is_encoder_decoder:  # padded batches of 3: uneven shards (2 + 1 rows)
        data = make_batches(teacher, pre, TEXT[:-2], batch_size=3, max_length=32)
    rows: list[dict] = []

    def on_step(row):
        rows.append(row)
        if stop_after is not None and row["step"] + 1 == stop_after:
            raise Stop

    result = {"rows": rows, "finished": False, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    try:
        rep = recover(
            teacher,
            res.model,
            data,
            preprocessor=pre,
            steps=STEPS,
            lr=3e-3,
            batch_size=batch_size,
            seq_len=SEQ_LEN,
            kd_logits_weight=0.5,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=4,
            progress=False,
            fsdp=fsdp,
            on_step=on_step,
        )
        result.update(finished=True, start_step=rep.start_step)
        result["weights"] = {
            n: m.dense_weight().flatten()[:64].tolist()
            for n, m in res.model.named_modules()
            if hasattr(m, "dense_weight") and type(m).__name__ != "SplitLinear"
        }
    except Stop:
        pass
    rank = int(os.environ.get("RANK", "0"))
    if out is not None and rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--checkpoint-dir")
    ap.add_argument("--stop-after", type=int)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--model", default="tiny-llama")
    a = ap.parse_args()
    run(a.out, a.checkpoint_dir, a.stop_after, a.batch_size, a.fsdp, a.model)
