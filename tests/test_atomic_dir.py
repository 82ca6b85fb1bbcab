"""atomic_dir(): one way to write a folder (export, convert-ct2, the real-model cache).

Checks the modes of what it leaves (those of a plain mkdir/open under the process umask, not
mkdtemp's 0o700 or a writer's 0o600), that a failure inside the block leaves nothing behind, and
that its temporary folders are the ``.NAME.*.partial`` ones the export lock cleans up.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_plugin

from ffsplit_export._io import apply_default_modes, atomic_dir, process_umask
from ffsplit_export.export.lock import stale_partials


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def _leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_process_umask_reads_without_changing(mask):
    with umask(mask):
        assert process_umask() == mask
        assert os.umask(mask) == mask  # still set: reading it did not change it


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_modes_follow_the_umask(tmp_path, mask):
    target = tmp_path / "out"
    with umask(mask), atomic_dir(target) as tmp:
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o700  # mkdtemp's mode while it is being written
        (tmp / "plain.json").write_text("{}")
        fd = os.open(tmp / "private.bin", os.O_WRONLY | os.O_CREAT, 0o600)  # e.g. a mkstemp'ed file
        os.close(fd)
        (tmp / "lib.so").write_bytes(b"\0")
        os.chmod(tmp / "lib.so", 0o700)
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "x.onnx").write_bytes(b"x")
        os.symlink("plain.json", tmp / "link.json")
    d, f, x = 0o777 & ~mask, 0o666 & ~mask, 0o777 & ~mask
    modes = _modes(target)
    link = modes.pop("link.json")
    assert modes == {".": d, "plain.json": f, "private.bin": f, "lib.so": x, "sub": d, "sub/x.onnx": f}
    assert link == 0o777  # links themselves untouched
    assert _leftovers(target) == []


def test_apply_default_modes_explicit_umask(tmp_path):
    (tmp_path / "a").write_text("a")
    os.chmod(tmp_path / "a", 0o600)
    apply_default_modes(tmp_path, umask=0o002)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o664
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o775


def test_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    seen = []
    with pytest.raises(KeyError), atomic_dir(target) as tmp:
        seen.append(tmp)
        assert tmp.parent == tmp_path and stale_partials(target) == [tmp]  # the lock's contract
        (tmp / "half.onnx").write_bytes(b"x" * 100)
        raise KeyError("boom")
    assert not target.exists() and not seen[0].exists()
    assert sorted(os.listdir(tmp_path)) == []


def test_replace_and_refuse(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(target)) == ["old.txt"] and _leftovers(target) == []
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(target)) == ["new.txt"] and _leftovers(target) == []
    # a failure while replacing keeps the old folder
    with pytest.raises(RuntimeError), atomic_dir(target, replace=True) as tmp:
        (tmp / "newer.txt").write_text("x")
        raise RuntimeError("boom")
    assert sorted(os.listdir(target)) == ["new.txt"] and _leftovers(target) == []


# --------------------------------------------------------------------------- users of atomic_dir


@pytest.mark.slow  # a full optimum export (still run by .ci/run)
@needs_plugin
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_export_folder_modes(tmp_path, mask):
    from ffsplit_export.export import ExportOptions, export

    out = tmp_path / "exp"
    with umask(mask):
        export("tiny-llama", out, options=ExportOptions(reference_check=False), num_samples=4, progress=False)
    modes = _modes(out)
    assert modes["."] == 0o777 & ~mask
    assert {"model.onnx", "ffsplit.json", "libffsplit_ort.so", "config.json"} <= set(modes)
    files = {k: v for k, v in modes.items() if k != "."}
    assert all(not (out / k).is_dir() for k in files)
    assert files == dict.fromkeys(files, 0o666 & ~mask), files
    assert not stale_partials(out) and _leftovers(out) == []


@pytest.mark.slow
def test_export_failure_leaves_nothing(tmp_path, monkeypatch):
    import ffsplit_export.deploy as deploy
    from ffsplit_export.export import ExportOptions, export

    def fail(folder, manifest):
        assert (Path(folder) / "model.onnx").is_file()  # fails after optimum wrote the files
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(deploy, "finish_export_folder", fail)
    out = tmp_path / "exp"
    with pytest.raises(OSError, match="simulated"):
        export(
            "tiny-llama",
            out,
            options=ExportOptions(target="portable", validate=False),
            num_samples=4,
            progress=False,
        )
    assert os.listdir(tmp_path) == []  # no folder, no partial, no lock file


def _tiny_ct2(tmp_path) -> Path:
    from helpers import write_ct2_dir
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=300,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=32,
        decoder_start_token_id=257,
        pad_token_id=256,
        eos_token_id=256,
        bos_token_id=256,
    )
    model = WhisperForConditionalGeneration(cfg).eval()
    src = tmp_path / "ct2"
    write_ct2_dir(src, model, np.float32)
    return src


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_convert_ct2_modes(tmp_path, mask):
    from ffsplit_export.models.convert_ct2 import convert_ct2

    src = _tiny_ct2(tmp_path)
    out = tmp_path / "hf"
    with umask(mask):
        convert_ct2(src, out)
    modes = _modes(out)
    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= set(modes)
    assert modes.pop(".") == 0o777 & ~mask
    assert modes == dict.fromkeys(modes, 0o666 & ~mask), modes
    assert _leftovers(out) == []


def test_convert_ct2_failure_leaves_nothing(tmp_path, monkeypatch):
    import ffsplit_export.models.convert_ct2 as mod

    src = _tiny_ct2(tmp_path)
    out = tmp_path / "hf"

    def fail(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(mod, "_write_tokenizer", fail)
    with pytest.raises(OSError, match="simulated"):
        mod.convert_ct2(src, out)
    assert sorted(os.listdir(tmp_path)) == ["ct2"]
