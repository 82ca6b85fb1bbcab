"""Adapters of the supported architecture families."""

from __future__ import annotations

from .registry import Adapter, FFNSpec, register_adapter


def _act(config, *names: str, default: str) -> str:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, str):
            return v
    return default


@register_adapter("t5")
class T5Adapter(Adapter):
    """T5DenseActDense (wi, act, wo) and T5DenseGatedActDense (act(wi_0) * wi_1, wo)."""

    def find_ffns(self, model):
        act = _act(model.config, "dense_act_fn", default="relu")
        out = []
        for name, m in self.modules_of_class(model, "T5DenseActDense", "T5DenseGatedActDense"):
            if hasattr(m, "wi_0"):
                out.append(
                    FFNSpec(name, up=f"{name}.wi_1", gate=f"{name}.wi_0", down=f"{name}.wo", activation=act)
                )
            else:
                out.append(
                    FFNSpec(
                        name, up=f"{name}.wi", down=f"{name}.wo", activation=act, act_module=f"{name}.act"
                    )
                )
        return out


@register_adapter("whisper")
class WhisperAdapter(Adapter):
    """Encoder and decoder layers: fc1, activation, fc2."""

    def find_ffns(self, model):
        act = _act(model.config, "activation_function", default="gelu")
        return [
            FFNSpec(
                name, up=f"{name}.fc1", down=f"{name}.fc2", activation=act, act_module=f"{name}.activation_fn"
            )
            for name, _ in self.modules_of_class(model, "WhisperEncoderLayer", "WhisperDecoderLayer")
        ]


@register_adapter("mpt")
class MptAdapter(Adapter):
    def find_ffns(self, model):
        return [
            FFNSpec(
                name,
                up=f"{name}.up_proj",
                down=f"{name}.down_proj",
                activation="gelu",
                act_module=f"{name}.act",
            )
            for name, _ in self.modules_of_class(model, "MptMLP")
        ]


@register_adapter("llama")
class LlamaAdapter(Adapter):
    """Gated (SwiGLU) MLP: down(act(gate_proj(x)) * up_proj(x))."""

    def find_ffns(self, model):
        act = _act(model.config, "hidden_act", default="silu")
        return [
            FFNSpec(
                name, up=f"{name}.up_proj", gate=f"{name}.gate_proj", down=f"{name}.down_proj", activation=act
            )
            for name, _ in self.modules_of_class(model, "LlamaMLP")
        ]


@register_adapter("bert")
class BertAdapter(Adapter):
    def find_ffns(self, model):
        act = _act(model.config, "hidden_act", default="gelu")
        return [
            FFNSpec(
                name,
                up=f"{name}.intermediate.dense",
                down=f"{name}.output.dense",
                activation=act,
                act_module=f"{name}.intermediate.intermediate_act_fn",
            )
            for name, _ in self.modules_of_class(model, "BertLayer")
        ]


@register_adapter("gpt2")
class GPT2Adapter(Adapter):
    """GPT2MLP with transformers' Conv1D (weight stored [in, out])."""

    def find_ffns(self, model):
        act = _act(model.config, "activation_function", default="gelu_new")
        return [
            FFNSpec(name, up=f"{name}.c_fc", down=f"{name}.c_proj", activation=act, act_module=f"{name}.act")
            for name, _ in self.modules_of_class(model, "GPT2MLP")
        ]


@register_adapter("opt")
class OPTAdapter(Adapter):
    def find_ffns(self, model):
        act = _act(model.config, "activation_function", default="relu")
        return [
            FFNSpec(
                name, up=f"{name}.fc1", down=f"{name}.fc2", activation=act, act_module=f"{name}.activation_fn"
            )
            for name, _ in self.modules_of_class(model, "OPTDecoderLayer")
        ]
