"""ONNX Runtime GenAI support: ``genai_config.json`` for decoder-only exports, and generation.

GenAI (``onnxruntime-genai``) runs an optimum-layout decoder once its config names the graph's
inputs and outputs and gives the model's sizes. Names and KV-cache shapes are read from the
ONNX graph itself (so they are what the file really has), the rest from the model config.
The custom-op library is named relative to the folder: GenAI loads a ``custom_ops_library``
only from inside the model folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import ConfigError, ExportError, MissingResourceError

GENAI_CONFIG = "genai_config.json"

# model types whose optimum export GenAI's decoder-only pipeline runs (checked in tests/test_deploy.py);
# GenAI's own type names: the llama family keeps "llama", the others run as its generic "decoder"
GENAI_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "gpt2": "decoder",
    "mpt": "decoder",
    "opt": "decoder",
}


def genai_supported(manifest: dict) -> bool:
    """True when an export can get a ``genai_config.json`` (decoder-only, ONNX Runtime CPU or portable)."""
    return (
        manifest.get("model_type") in GENAI_TYPES
        and str(manifest.get("task", "")).startswith("text-generation")
        and manifest.get("target") in ("ort-cpu", "portable")
    )


def _graph_io(path: Path) -> tuple[dict, list[str], bool]:
    """Inputs (name -> dims), outputs, and whether every present key/value is written by a
    GroupQueryAttention node (then past and present can share one max-length buffer in GenAI)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    outputs = [o.name for o in g.output]
    producer = {o: n.op_type for n in g.node for o in n.output}
    presents = [o for o in outputs if o.startswith("present.")]
    in_place = bool(presents) and all(producer.get(o) == "GroupQueryAttention" for o in presents)
    return inputs, outputs, in_place


def genai_config(output: str | Path, manifest: dict, library: str | None = None) -> dict:
    """The ``genai_config.json`` content for a decoder-only export in ``output``.

    ``library``: the custom-op library's file name inside ``output`` (ort-cpu exports).
    """
    from transformers import AutoConfig, GenerationConfig

    out = Path(output)
    if not genai_supported(manifest):
        raise ConfigError(
            f"ONNX Runtime GenAI runs decoder-only text-generation exports of types {sorted(GENAI_TYPES)} "
            f"with --target ort-cpu or portable; this export is {manifest.get('model_type')!r}, task "
            f"{manifest.get('task')!r}, target {manifest.get('target')!r}"
        )
    onnx_name = "model.onnx"
    if not (out / onnx_name).is_file():
        raise ExportError(f"{out / onnx_name} is missing; re-run the export")
    inputs, outputs, share_buffer = _graph_io(out / onnx_name)
    if "past_key_values.0.key" not in inputs:
        raise ConfigError(
            f"{onnx_name} has no KV-cache inputs; GenAI needs a with-past export (--task text-generation-with-past)"
        )
    cfg = AutoConfig.from_pretrained(out)
    kdims = inputs["past_key_values.0.key"]  # [batch, kv_heads, past, head_size] in optimum's layout
    kv_heads, head_size = int(kdims[1]), int(kdims[3])
    layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    context = next(
        (
            int(getattr(cfg, k))
            for k in ("max_position_embeddings", "n_positions", "max_seq_len")
            if isinstance(getattr(cfg, k, None), int)
        ),
        2048,
    )
    try:
        gen = GenerationConfig.from_pretrained(out)
    except OSError:
        gen = GenerationConfig.from_model_config(cfg)
    eos = gen.eos_token_id if gen.eos_token_id is not None else cfg.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else cfg.pad_token_id
    bos = gen.bos_token_id if gen.bos_token_id is not None else cfg.bos_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    names_in = {"input_ids": "input_ids"}
    for name in ("attention_mask", "position_ids"):
        if name in inputs:
            names_in[name] = name
    names_in.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    session_options: dict = {"log_id": "onnxruntime-genai", "provider_options": []}
    if library:
        session_options["custom_ops_library"] = library  # relative: resolved inside the model folder
    return {
        "model": {
            "type": GENAI_TYPES[manifest["model_type"]],
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "vocab_size": int(cfg.vocab_size),
            "context_length": context,
            "decoder": {
                "session_options": session_options,
                "filename": onnx_name,
                "head_size": head_size,
                "hidden_size": int(cfg.hidden_size),
                "num_attention_heads": int(cfg.num_attention_heads),
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": layers,
                "inputs": names_in,
                "outputs": {
                    "logits": outputs[0],
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": context,
            "min_length": 0,
            # GroupQueryAttention (the fused ort-cpu graph) appends to a max-length cache in place;
            # optimum's unfused graphs concatenate past and new keys into a new tensor
            "past_present_share_buffer": share_buffer,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
            "early_stopping": True,
            "length_penalty": 1.0,
            "diversity_penalty": 0.0,
            "no_repeat_ngram_size": 0,
        },
    }


def write_genai_config(output: str | Path, manifest: dict, library: str | None = None) -> Path:
    path = Path(output) / GENAI_CONFIG
    path.write_text(json.dumps(genai_config(output, manifest, library), indent=1))
    return path


def _og():
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise MissingResourceError(
            "onnxruntime-genai is not installed; `pip install 'ffsplit-export[genai]'` (or onnxruntime-genai)"
        ) from e
    return og


def genai_model(output: str | Path):
    """An ``onnxruntime_genai.Model`` of an export folder (it needs ``genai_config.json``)."""
    og = _og()
    out = Path(output)
    if not (out / GENAI_CONFIG).is_file():
        raise ConfigError(
            f"{str(out)!r} has no {GENAI_CONFIG}; GenAI runs decoder-only exports of types "
            f"{sorted(GENAI_TYPES)} (re-export with this version of ffsplit-export)"
        )
    return og.Model(str(out))


def genai_generate(
    output: str | Path, input_ids: list[int], max_new_tokens: int, model=None
) -> tuple[list[int], float]:
    """Greedy generation with GenAI from token ids; returns (new token ids, seconds)."""
    og = _og()
    model = model or genai_model(output)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(input_ids) + max_new_tokens, batch_size=1)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens([list(input_ids)])
    new: list[int] = []
    while not gen.is_done() and len(new) < max_new_tokens:
        gen.generate_next_token()
        new.append(int(gen.get_next_tokens()[0]))
    return new, time.perf_counter() - t0


def normalize_tokenizer(output: str | Path) -> list[str]:
    """Make a GGUF-converted byte-level BPE tokenizer read the same in GenAI as in transformers.

    transformers' GGUF loader labels SmolLM2's tokenizer ``LlamaTokenizer`` (a SentencePiece
    class) although ``tokenizer.json`` is a GPT-2 byte-level BPE; GenAI's tokenizer picks its
    algorithm from ``tokenizer_class``, maps every byte-level space to ``<|endoftext|>`` (unk),
    and the TemplateProcessing post-processor adds a second BOS before the chat template's own.
    This relabels it ``GPT2Tokenizer`` with a byte-level post-processor and decoder, and drops
    the unused SentencePiece ``tokenizer.model``. Returns what it changed.
    """
    out = Path(output)
    tj, tc = out / "tokenizer.json", out / "tokenizer_config.json"
    if not (tj.is_file() and tc.is_file()):
        return []
    tok = json.loads(tj.read_text())
    conf = json.loads(tc.read_text())
    pre = tok.get("pre_tokenizer") or {}
    byte_level = tok.get("model", {}).get("type") == "BPE" and pre.get("type") == "ByteLevel"
    if not byte_level or not str(conf.get("tokenizer_class", "")).startswith("Llama"):
        return []
    byte_level_step = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": True,
    }
    tok["post_processor"] = dict(byte_level_step)
    tok["decoder"] = dict(byte_level_step, add_prefix_space=True, trim_offsets=True)
    conf.update(tokenizer_class="GPT2Tokenizer", add_bos_token=False, add_eos_token=False)
    conf.pop("legacy", None)
    tj.write_text(json.dumps(tok, ensure_ascii=False))
    tc.write_text(json.dumps(conf, indent=1, ensure_ascii=False))
    changed = ["tokenizer_class LlamaTokenizer -> GPT2Tokenizer", "byte-level post-processor and decoder"]
    if (out / "tokenizer.model").is_file():
        (out / "tokenizer.model").unlink()
        changed.append("removed the unused SentencePiece tokenizer.model")
    return changed
