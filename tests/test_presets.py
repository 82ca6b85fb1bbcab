"""Presets: resolution, explicit options over a preset's fields, the balanced default, typed errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ffsplit_export.cli import build_parser
from ffsplit_export.cli.options import export_options_from_args
from ffsplit_export.config import CompressionConfig
from ffsplit_export.errors import ConfigError
from ffsplit_export.presets import (
    DEFAULT_PRESET,
    PRESET_FIELDS,
    PRESETS,
    preset_accuracy_level,
    resolve_preset,
)


def test_every_preset_sets_every_field_and_is_a_valid_config():
    assert DEFAULT_PRESET == "balanced"
    for name, p in PRESETS.items():
        assert set(PRESET_FIELDS) <= set(p), name
        cfg = CompressionConfig.from_preset(name)  # CompressionConfig checks every value
        assert cfg.preset == name
        for key in PRESET_FIELDS:
            if key != "nbits_accuracy_level":
                assert getattr(cfg, key) == p[key], (name, key)
        assert preset_accuracy_level(name) == p["nbits_accuracy_level"]


def test_explicit_option_overrides_preset_field():
    got = resolve_preset("fast", light_sparsity=0.6, other_linear=None)
    assert got["light_sparsity"] == 0.6  # explicit wins
    assert got["other_linear"] == PRESETS["fast"]["other_linear"]  # None = not given: the preset's
    assert "note" not in got
    cfg = CompressionConfig.from_preset("accurate", heavy_fraction=0.2)
    assert cfg.heavy_fraction == 0.2 and cfg.light_format == PRESETS["accurate"]["light_format"]
    # a size budget plans the heavy set itself: the preset's heavy fraction steps aside
    cfg = CompressionConfig.from_preset("balanced", size_budget=0.4)
    assert cfg.heavy_fraction is None and cfg.size_budget == 0.4


def test_unknown_preset_is_a_typed_error_listing_the_names():
    with pytest.raises(ConfigError) as e:
        resolve_preset("turbo")
    for name in ("turbo", "accurate", "balanced", "fast", "none"):
        assert name in str(e.value)


def _args(*extra, command="export"):
    return build_parser().parse_args([command, "tiny-llama", "/tmp/unused-out", *extra])


def test_cli_default_is_balanced():
    args = _args()
    cfg = CompressionConfig.from_args(args)
    opts = export_options_from_args(args)
    assert cfg == CompressionConfig.from_preset("balanced")
    assert cfg.preset == "balanced"
    assert opts.nbits_accuracy_level == PRESETS["balanced"]["nbits_accuracy_level"]


def test_cli_explicit_options_override_the_preset():
    args = _args(
        "--preset", "fast", "--light-sparsity", "0.6", "--nbits-accuracy-level", "0", "--quantizer", "rtn"
    )
    cfg = CompressionConfig.from_args(args)
    assert cfg.light_sparsity == 0.6 and cfg.quantizer == "rtn"
    assert cfg.heavy_fraction == PRESETS["fast"]["heavy_fraction"]
    assert cfg.group_size == PRESETS["fast"]["group_size"]
    assert export_options_from_args(args).nbits_accuracy_level == 0
    # an explicit value equal to the no-preset default still wins over the preset
    cfg = CompressionConfig.from_args(_args("--other-linear", "fp32", "--embedding", "fp32"))
    assert cfg.other_linear == "fp32" and cfg.embedding == "fp32"


def test_cli_preset_none_gives_each_options_own_default():
    args = _args("--preset", "none")
    cfg = CompressionConfig.from_args(args)
    assert cfg == CompressionConfig()
    assert export_options_from_args(args).nbits_accuracy_level == 0


def test_cli_unknown_preset_is_one_line_exit_2():
    r = subprocess.run(
        [sys.executable, "-m", "ffsplit_export.cli", "export", "tiny-llama", "/tmp/x", "--preset", "turbo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "'turbo' is not known" in r.stderr and "balanced" in r.stderr


def test_commands_without_preset_keep_their_defaults():
    # eval --pytorch --compress and recover: no preset (recovery trains a sparse light part)
    cfg = CompressionConfig.from_args(build_parser().parse_args(["eval", "tiny-llama"]))
    assert cfg == CompressionConfig()
    args = _args(command="recover")
    assert CompressionConfig.from_args(args) == CompressionConfig()
    assert export_options_from_args(args).nbits_accuracy_level == 0


def test_optimum_cli_gets_the_same_preset_option():
    import argparse

    from optimum.commands.register.register_ffsplit import FFSplitExportCommand

    p = argparse.ArgumentParser()
    FFSplitExportCommand.parse_args(p)  # what optimum-cli calls
    args = p.parse_args(["tiny-llama", "/tmp/unused", "--preset", "accurate", "--embedding", "fp32"])
    cfg = CompressionConfig.from_args(args)
    assert cfg.preset == "accurate" and cfg.embedding == "fp32"
    assert cfg.light_format == PRESETS["accurate"]["light_format"]
    assert export_options_from_args(args).nbits_accuracy_level == PRESETS["accurate"]["nbits_accuracy_level"]


def test_api_preset_with_explicit_override_and_errors():
    from ffsplit_export.export.api import export
    from ffsplit_export.split import SplitConfig

    with pytest.raises(ConfigError, match="turbo"):
        export("tiny-llama", "/tmp/unused-out-presets", preset="turbo")
    with pytest.raises(ConfigError, match="not both"):
        export("tiny-llama", "/tmp/unused-out-presets", preset="fast", config=SplitConfig())


def test_cli_tensorrt_target_gets_a_preset_it_can_carry():
    cfg = CompressionConfig.from_args(_args("--target", "tensorrt"))
    assert cfg.other_linear == "fp32" and cfg.heavy_format == "fp16" and cfg.embedding == "fp32"
    assert export_options_from_args(_args("--target", "tensorrt")).nbits_accuracy_level == 0
    cfg = CompressionConfig.from_args(_args("--target", "tensorrt", "--heavy-format", "fp32"))
    assert cfg.heavy_format == "fp32"  # explicit wins


@pytest.mark.slow
def test_api_default_export_is_balanced_and_manifest_records_it(tmp_path):
    """export() with no config: the balanced preset (GPTQ, int4, level 4) on tiny-llama, validated."""
    from ffsplit_export.export.api import export
    from ffsplit_export.export.validate import graph_accuracy_level

    man = export("tiny-llama", tmp_path / "b", num_samples=8, progress=False)
    assert man["options"]["preset"] == "balanced"
    assert man["compression_config"]["preset"] == "balanced"
    assert man["compression_config"]["quantizer"] == "gptq"
    assert man["options"]["nbits_accuracy_level"] == PRESETS["balanced"]["nbits_accuracy_level"]
    assert graph_accuracy_level(tmp_path / "b" / "model.onnx") == PRESETS["balanced"]["nbits_accuracy_level"]
    assert man["validation"]  # validated against PyTorch within the level-4 tolerances
    # an explicit keyword overrides one field; the rest stays the preset's
    man = export(
        "tiny-llama", tmp_path / "f", preset="fast", other_linear="int8", num_samples=8, progress=False
    )
    cc = CompressionConfig.from_dict(
        json.loads((tmp_path / "f" / "ffsplit.json").read_text())["compression_config"]
    )
    assert (
        cc.preset == "fast" and cc.other_linear == "int8" and cc.group_size == PRESETS["fast"]["group_size"]
    )


def test_gptq_damp_reaches_the_obs_pass():
    """--gptq-damp: CLI -> CompressionConfig -> SplitConfig -> the GPTQ options; default 0.01."""
    from ffsplit_export.formats.gptq import GPTQOptions

    assert CompressionConfig.from_args(_args()).gptq_damp == 0.01
    cfg = CompressionConfig.from_args(_args("--gptq-damp", "0.1"))
    assert cfg.gptq_damp == 0.1 and cfg.split_config().gptq_damp == 0.1
    assert GPTQOptions.of(cfg.split_config()).damp == 0.1
    assert CompressionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="gptq-damp"):
        CompressionConfig(gptq_damp=1.0)
