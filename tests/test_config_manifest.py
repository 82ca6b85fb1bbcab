"""CompressionConfig (typed, versioned) and the one ffsplit.json reader."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ffsplit_export.config import CompressionConfig
from ffsplit_export.errors import ConfigError
from ffsplit_export.manifest import MANIFEST, REQUIRED_KEYS, Manifest, ManifestError


def test_config_round_trip_through_json():
    cfg = CompressionConfig(
        light_format="int4",
        light_sparsity=0.0,
        heavy_fraction=0.2,
        group_size=64,
        other_linear="int8",
        calibration="some.txt",
        num_samples=3,
        sequential=True,
    )
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["version"] == CompressionConfig.VERSION
    assert CompressionConfig.from_dict(data) == cfg
    # every field is in the dict: a new field cannot be forgotten by to_dict
    assert set(data) == {f.name for f in dataclasses.fields(cfg)} | {"version"}


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CompressionConfig().light_sparsity = 0.9


def test_unknown_field_is_named():
    data = CompressionConfig().to_dict() | {"light_sparsty": 0.5}
    with pytest.raises(ConfigError, match="light_sparsty"):
        CompressionConfig.from_dict(data)


def test_other_version_is_refused():
    data = CompressionConfig().to_dict() | {"version": CompressionConfig.VERSION + 1}
    with pytest.raises(ConfigError, match="version"):
        CompressionConfig.from_dict(data)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"light_format": "int3"}, "--light-format"),
        ({"light_sparsity": 1.5}, "--light-sparsity"),
        ({"heavy_fraction": -0.1}, "--heavy-fraction"),
        ({"heavy_fraction": 0.1, "size_budget": 0.5}, "alternatives"),
        ({"group_size": 48}, "--group-size"),
        ({"other_linear": "int2"}, "--other-linear"),
    ],
)
def test_bad_values_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CompressionConfig(**kwargs)


def test_split_config_is_built_from_the_config():
    cfg = CompressionConfig(light_format="2:4-int8", prune_method="magnitude", heavy_format="fp16")
    split = cfg.split_config()
    assert (str(split.light_format), str(split.prune_method), str(split.heavy_format)) == (
        "2:4-int8",
        "magnitude",
        "fp16",
    )
    assert CompressionConfig.from_split_config(split) == cfg


def _write_export(tmp_path, manifest):
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    return tmp_path


def _good():
    return {
        "format_version": 1,
        "source_model": "tiny-llama",
        "model_type": "llama",
        "task": "text-generation-with-past",
        "onnx_files": {"model.onnx": 10},
    }


def test_reader_accepts_a_complete_export(tmp_path):
    d = _write_export(tmp_path, _good() | {"compression_config": CompressionConfig().to_dict()})
    (d / "model.onnx").write_bytes(b"x" * 10)  # the size the manifest records
    m = Manifest.read(d)
    assert m["task"] == "text-generation-with-past" and m.compression_config == CompressionConfig()


def test_reader_truncated_onnx_file(tmp_path):
    d = _write_export(tmp_path, _good())
    (d / "model.onnx").write_bytes(b"x" * 7)  # 3 bytes short of what the export wrote
    with pytest.raises(ManifestError, match="has 7 bytes, the export wrote 10: it is truncated"):
        Manifest.read(d)


def test_reader_missing_file(tmp_path):
    with pytest.raises(ManifestError, match=f"no {MANIFEST}.*ffsplit-export export"):
        Manifest.read(tmp_path)


def test_reader_on_a_file_path(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"x")
    with pytest.raises(ManifestError, match="is a file"):
        Manifest.read(f)


def test_reader_empty_manifest_names_the_missing_keys(tmp_path):
    with pytest.raises(ManifestError, match="lacks the key") as e:
        Manifest.read(_write_export(tmp_path, {}))
    assert all(k in str(e.value) for k in REQUIRED_KEYS)


def test_reader_truncated_json(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps(_good())[:-7])
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.read(tmp_path)


def test_reader_missing_model_file(tmp_path):
    with pytest.raises(ManifestError, match="model.onnx"):
        Manifest.read(_write_export(tmp_path, _good()))


def test_runtime_load_uses_the_same_reader(tmp_path):
    from ffsplit_export.runtime import load

    with pytest.raises(ManifestError, match="lacks the key"):
        load(_write_export(tmp_path, {}))


def test_trt_reader_accepts_a_plain_onnx_dir_and_rejects_a_broken_manifest(tmp_path):
    from ffsplit_export.trt.engine import read_manifest

    assert read_manifest(tmp_path) == {}  # trt-build also takes a plain optimum ONNX directory
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)
