"""Built-in tiny random models, built from configs in code (no hub download).

``tiny-<family>`` names give a small randomly initialised model of each supported family
with a byte-level tokenizer (or a Whisper feature extractor + tokenizer), for tests, smoke
runs and the default of the main job when no real model is installed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UnsupportedModelError

VOCAB = 384  # 3 specials + 256 bytes, rounded up


def byte_tokenizer(eos: str = "</s>", bos: str | None = None):
    """A byte-level fast tokenizer: <pad>=0, </s>=1, <unk>=2, then the 256 byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for i, ch in enumerate(sorted(alphabet)):
        vocab[ch] = 3 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token=eos, unk_token="<unk>", bos_token=bos
    )


def _t5(gated: bool):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=160,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu" if gated else "relu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=not gated,
    )
    return T5ForConditionalGeneration(cfg), byte_tokenizer()


def _whisper():
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    cfg = WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=80,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        d_model=64,
        encoder_ffn_dim=192,
        decoder_ffn_dim=192,
        max_source_positions=1500,
        max_target_positions=64,
        decoder_start_token_id=3,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config.forced_decoder_ids = None
    fast = byte_tokenizer()
    tok = WhisperTokenizerFast(
        tokenizer_object=fast.backend_tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="</s>",
    )
    return model, WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tok)


def _mpt():
    from transformers import MptConfig, MptForCausalLM

    cfg = MptConfig(
        d_model=64,
        n_heads=4,
        n_layers=2,
        expansion_ratio=3,
        max_seq_len=128,
        vocab_size=VOCAB,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return MptForCausalLM(cfg), byte_tokenizer()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg), byte_tokenizer()


def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=144,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return BertModel(cfg, add_pooling_layer=False), byte_tokenizer()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        n_inner=224,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg), byte_tokenizer()


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=208,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return OPTForCausalLM(cfg), byte_tokenizer()


TINY: dict[str, tuple[Callable, str]] = {
    "tiny-t5": (lambda: _t5(False), "text2text-generation-with-past"),
    "tiny-t5-gated": (lambda: _t5(True), "text2text-generation-with-past"),
    "tiny-whisper": (_whisper, "automatic-speech-recognition-with-past"),
    "tiny-mpt": (_mpt, "text-generation-with-past"),
    "tiny-llama": (_llama, "text-generation-with-past"),
    "tiny-bert": (_bert, "feature-extraction"),
    "tiny-gpt2": (_gpt2, "text-generation-with-past"),
    "tiny-opt": (_opt, "text-generation-with-past"),
}


def build_tiny(name: str, seed: int = 0):
    """``(model, preprocessor, default task)`` of a built-in tiny model, deterministic per seed."""
    try:
        factory, task = TINY[name]
    except KeyError as e:
        raise UnsupportedModelError(f"unknown built-in model {name!r}; built-ins: {', '.join(TINY)}") from e
    torch.manual_seed(seed)
    model, pre = factory()
    model.config._name_or_path = name
    model.eval()
    return model, pre, task
