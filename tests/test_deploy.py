"""Deployment outputs: ONNX Runtime GenAI, bundled library, model card, Triton repository, quiet exports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from conftest import needs_plugin

DECODERS = ["tiny-llama", "tiny-mpt", "tiny-gpt2", "tiny-opt"]
PROMPTS = [[5, 70, 80, 90, 100, 33, 2], [40, 41, 42], [200, 17, 99, 150, 150, 7, 8, 9, 10, 11]]


pytestmark = needs_plugin


def _export(name, out, target="ort-cpu", **kw):
    from ffsplit_export.export import ExportOptions
    from ffsplit_export.export.api import export

    kw.setdefault("num_samples", 8)
    kw.setdefault("progress", False)
    kw.setdefault("preset", "none")  # the deploy paths, not a preset's compression
    return export(name, out, options=ExportOptions(target=target, overwrite=True), **kw)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name, target="ort-cpu"):
        if (name, target) not in cache:
            out = tmp_path_factory.mktemp("deploy") / f"{name}-{target}"
            _export(name, out, target=target)
            cache[name, target] = out
        return cache[name, target]

    return get


def _ort_greedy(out, ids, n, stop_at_eos=False, **load_kw):
    from ffsplit_export.runtime import load

    model = load(out, **load_kw)
    x = torch.tensor([ids])
    got = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=n,
        min_new_tokens=0 if stop_at_eos else n,
        do_sample=False,
    )
    return got[0, len(ids) :].tolist()


# ------------------------------------------------------------------------------ GenAI


@pytest.mark.parametrize("name", DECODERS)
def test_genai_greedy_matches_ortmodel(name, exported):
    pytest.importorskip("onnxruntime_genai")
    from transformers import AutoConfig

    from ffsplit_export.deploy.genai import genai_generate, genai_model

    out = exported(name)
    cfg = json.loads((out / "genai_config.json").read_text())["model"]
    hf = AutoConfig.from_pretrained(out)
    dec = cfg["decoder"]
    assert dec["session_options"]["custom_ops_library"] == "libffsplit_ort.so"  # relative: inside the folder
    assert dec["num_hidden_layers"] == hf.num_hidden_layers
    assert dec["hidden_size"] == hf.hidden_size and cfg["vocab_size"] == hf.vocab_size
    assert dec["num_attention_heads"] == hf.num_attention_heads
    assert dec["head_size"] * hf.num_attention_heads == hf.hidden_size
    graph_inputs = {i.name for i in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.input}
    assert set(dec["inputs"]) - {"past_key_names", "past_value_names"} <= graph_inputs
    assert (
        "past_key_values.0.key" in graph_inputs
        and dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    )

    # the fused Llama graph writes its cache with GroupQueryAttention: GenAI shares one buffer
    producers = {
        o: n.op_type
        for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
        for o in n.output
    }
    gqa = producers.get("present.0.key") == "GroupQueryAttention"
    assert gqa == (name == "tiny-llama")
    assert json.loads((out / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is gqa

    model = genai_model(out)
    for ids in PROMPTS:
        want = _ort_greedy(out, ids, 16)
        got, _ = genai_generate(out, ids, 16, model=model)
        assert got == want, (ids, got, want)


def test_generate_cli_genai_reports_tokens_per_second(exported, capsys):
    pytest.importorskip("onnxruntime_genai")
    from ffsplit_export.cli import main

    out = exported("tiny-llama")
    assert main(["generate", str(out), "--runtime", "genai", "--max-new-tokens", "8", "--raw"]) == 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "ONNX Runtime GenAI" in text


def test_genai_refuses_encoder_decoder(exported):
    from ffsplit_export.deploy.genai import genai_config, genai_supported
    from ffsplit_export.errors import ConfigError
    from ffsplit_export.runtime import read_manifest

    out = exported("tiny-t5")
    manifest = read_manifest(out)
    assert not genai_supported(manifest) and not (out / "genai_config.json").exists()
    with pytest.raises(ConfigError, match="decoder-only"):
        genai_config(out, manifest)


@pytest.mark.slow
def test_smollm2_genai_tokenizer_and_generation(tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    from transformers import AutoTokenizer

    from ffsplit_export.errors import MissingResourceError
    from ffsplit_export.models.realmodels import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except MissingResourceError as e:
        pytest.skip(str(e))
    from ffsplit_export.deploy.genai import genai_generate

    out = tmp_path / "smollm2"
    _export("smollm2-135m", out, num_samples=16)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    want = tok(prompt)["input_ids"]
    model = og.Model(str(out))
    got = [int(i) for i in og.Tokenizer(model).encode(prompt)]
    assert got == want
    assert want.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # no extra BOS before the template's
    new, _ = genai_generate(out, want, 20, model=model)
    ref = _ort_greedy(out, want, 20, stop_at_eos=True)  # both stop at <|im_end|>
    assert new == ref and len(new) > 3, (tok.decode(new), tok.decode(ref))


# ------------------------------------------------------------------------------ bundled library


def test_bundled_library_loads_and_refuses_a_modified_copy(exported, tmp_path):
    from ffsplit_export.deploy import BundledLibraryError
    from ffsplit_export.deploy.bundle import sha256
    from ffsplit_export.runtime import plugin_path, read_manifest

    src = exported("tiny-llama")
    rec = read_manifest(src)["library"]
    assert rec["sha256"] == sha256(src / rec["file"]) == sha256(plugin_path())
    assert rec["version"] and rec["ffsplit_opset"] == 1
    ids = PROMPTS[0]
    assert _ort_greedy(src, ids, 8, library="bundled") == _ort_greedy(src, ids, 8)

    # plain onnxruntime with the bundled file only
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.register_custom_ops_library(str(src / rec["file"]))
    sess = ort.InferenceSession(str(src / "model.onnx"), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        shape = [1 if not isinstance(d, int) else d for d in i.shape]
        if i.name.startswith("past_key_values"):
            shape[2] = 0
        dtype = np.int64 if "int64" in i.type else np.float32
        feeds[i.name] = np.ones(shape, dtype) if i.name != "position_ids" else np.zeros(shape, dtype)
    assert sess.run(["logits"], feeds)[0].shape[-1] == 384

    bad = tmp_path / "tampered"
    shutil.copytree(src, bad)
    data = bytearray((bad / rec["file"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / rec["file"]).write_bytes(bytes(data))
    with pytest.raises(BundledLibraryError, match="does not match ffsplit.json"):
        _ort_greedy(bad, ids, 2, library="bundled")
    manifest = json.loads((bad / "ffsplit.json").read_text())
    manifest["library"]["ffsplit_opset"] = 2
    (bad / "ffsplit.json").write_text(json.dumps(manifest))
    with pytest.raises(BundledLibraryError, match="opset 2"):
        _ort_greedy(bad, ids, 2, library="bundled")
    (bad / rec["file"]).unlink()
    with pytest.raises(BundledLibraryError, match="missing"):
        _ort_greedy(bad, ids, 2, library="bundled")


# ------------------------------------------------------------------------------ model card


def _front_matter(text: str) -> dict:
    import yaml

    assert text.startswith("---\n")
    head, _ = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head)


def test_model_card_front_matter_and_content(exported):
    from ffsplit_export.deploy.model_card import front_matter, model_card
    from ffsplit_export.runtime import read_manifest

    out = exported("tiny-llama")
    manifest = read_manifest(out)
    text = (out / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "onnx" and meta["pipeline_tag"] == "text-generation"
    assert {"onnx", "transformers", "llama", "sparse-int8"} <= set(meta["tags"])
    assert "license" not in meta and "base_model" not in meta  # a random tiny model has neither
    for needle in (
        "tiny-llama",
        "light_sparsity",
        "max |ONNX Runtime - PyTorch|",
        "libffsplit_ort.so",
        "ffsplit_export.runtime",
        "onnxruntime_genai",
        "register_custom_ops_library",
    ):
        assert needle in text, needle
    real = dict(manifest, source_model="smollm2-135m")
    meta = front_matter(real)
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    hub = pytest.importorskip("huggingface_hub")
    card = hub.ModelCard(model_card(real))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"


# ------------------------------------------------------------------------------ Triton


_DTYPES = {1: "TYPE_FP32", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16"}


def _parse(path: Path):
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), pb.ModelConfig()), pb


def _check_against_graph(cfg, pb, onnx_path: Path):
    g = onnx.load(str(onnx_path), load_external_data=False).graph
    batch = cfg.max_batch_size > 0
    for values, entries in ((g.input, cfg.input), (g.output, cfg.output)):
        assert [e.name for e in entries] == [v.name for v in values]
        for v, e in zip(values, entries):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            assert list(e.dims) == (dims[1:] if batch else dims), v.name
            assert pb.DataType.Name(e.data_type) == _DTYPES[v.type.tensor_type.elem_type], v.name


def test_triton_repo_configs_match_the_graphs(exported, tmp_path):
    from ffsplit_export.cli import main

    cases = [("tiny-llama", "ort-cpu", False), ("tiny-bert", "ort-cpu", True), ("tiny-t5", "ort-cpu", False)]
    for name, target, batchable in cases:
        out = exported(name, target)
        repo = tmp_path / f"repo-{name}"
        assert main(["triton-repo", str(out), str(repo), "--mount", "/models"]) == 0
        onnx_files = sorted(out.glob("*.onnx"))
        assert sorted(p.name for p in repo.iterdir()) == sorted(p.stem for p in onnx_files)
        for f in onnx_files:
            cfg, pb = _parse(repo / f.stem / "config.pbtxt")
            assert cfg.name == f.stem and cfg.platform == "onnxruntime_onnx"
            assert (repo / f.stem / "1" / "model.onnx").read_bytes() == f.read_bytes()
            _check_against_graph(cfg, pb, f)
            lib = cfg.model_operations.op_library_filename[0]
            assert (
                lib == f"/models/{f.stem}/libffsplit_ort.so"
                and (repo / f.stem / "libffsplit_ort.so").is_file()
            )
            assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
            g = onnx.load(str(f), load_external_data=False).graph
            tensors = list(g.input) + list(g.output)
            kv_state = any(t.name.startswith(("past_key_values", "present")) for t in tensors)
            batch_dynamic = all(not t.type.tensor_type.shape.dim[0].HasField("dim_value") for t in tensors)
            assert cfg.HasField("dynamic_batching") == (batch_dynamic and not kv_state), f.name
            assert (cfg.max_batch_size > 0) == cfg.HasField("dynamic_batching")
            if batchable:  # an encoder-only graph: Triton may batch it
                assert cfg.max_batch_size == 8
            if f.name in ("model.onnx", "decoder_model.onnx") and name != "tiny-bert":
                assert kv_state and cfg.max_batch_size == 0


def test_triton_repo_tensorrt_target(exported, tmp_path):
    from ffsplit_export.deploy.triton_repo import write_triton_repo
    from ffsplit_export.errors import ConfigError

    out = exported("tiny-mpt", "tensorrt")
    repo = tmp_path / "repo"
    (cfg_path,) = write_triton_repo(out, repo)
    cfg, pb = _parse(cfg_path)
    _check_against_graph(cfg, pb, out / "model.onnx")
    acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in acc] == ["tensorrt"] and "precision_mode" in acc[0].parameters
    assert (
        not cfg.model_operations.op_library_filename
        and cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    )
    with pytest.raises(ConfigError, match="exists"):
        write_triton_repo(out, repo)


# ------------------------------------------------------------------------------ quiet exports


def test_export_is_quiet_unless_verbose(tmp_path):
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]),
    )
    base = [
        sys.executable,
        "-m",
        "ffsplit_export.cli",
        "export",
        "tiny-mpt",
        "--num-samples",
        "4",
        "--quiet",
        "--overwrite",
    ]
    quiet = subprocess.run(base + [str(tmp_path / "a")], capture_output=True, text=True, env=env, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "TracerWarning" not in quiet.stderr and "Found different candidate" not in quiet.stderr
    assert "exported tiny-mpt" in quiet.stdout and "validation passed" in quiet.stdout
    loud = subprocess.run(
        base + [str(tmp_path / "b"), "-v"], capture_output=True, text=True, env=env, timeout=600
    )
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "TracerWarning" in loud.stderr
    bad = subprocess.run(
        base + [str(tmp_path / "c"), "--light-sparsity", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "error:" in bad.stderr
