"""--lm-head: the output projection's own format beside --other-linear (attention), with a tied int4
embedding still sharing the lm_head's table."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_plugin
from torch import nn

from ffsplit_export.config import CompressionConfig
from ffsplit_export.errors import ConfigError
from ffsplit_export.formats import OtherLinearFormat
from ffsplit_export.formats.nbits import NBitsLinear
from ffsplit_export.split import lm_head_name, other_linear_names


def _compress(name: str, **kw):
    from ffsplit_export.models.loading import load_model
    from ffsplit_export.pipeline import compress

    model, pre, _ = load_model(name)
    cfg = CompressionConfig.from_preset("none", num_samples=8, group_size=32, **kw)
    return model, compress(model, pre, **cfg.compress_kwargs(), progress=False)


@pytest.mark.parametrize("other,head", [("int8", "int4"), ("fp32", "int4"), ("int4", "int8")])
def test_lm_head_gets_its_own_format(other, head):
    model, res = _compress("tiny-llama", other_linear=other, lm_head=head, embedding="int4")
    m = res.model
    head_path = lm_head_name(m)
    assert head_path == "lm_head"
    bits = {"int8": 8, "int4": 4}
    lm = m.get_submodule(head_path)
    lm = getattr(lm, "inner", lm)  # a TiedInt4Head wraps the int4 head the embedding gathers from
    assert isinstance(lm, NBitsLinear) and lm.bits == bits[head], type(lm)
    attn = [n for n in other_linear_names(model) if n != head_path]
    assert attn
    for n in attn:
        q = m.get_submodule(n)
        if other == "fp32":
            assert type(q) is nn.Linear, (n, type(q))
        else:
            assert isinstance(q, NBitsLinear) and q.bits == bits[other], (n, type(q))
    assert res.other_linear["lm_head"] == head and res.other_linear["format"] == other
    assert res.other_linear["layers"] == len(attn) * (other != "fp32") + 1
    # the tied embedding shares the int4 lm_head's table, else it is a standalone int4 table
    assert (res.embedding.get("shared_with") == head_path) is (head == "int4")
    # the compressed model still predicts like the dense one (int4 / int8 weights, tiny model)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, m(input_ids=ids).logits
    assert torch.isfinite(b).all() and (a - b).abs().max() < 0.5 * a.abs().max()


def test_lm_head_same_as_other_linear_is_not_recorded():
    _, res = _compress("tiny-llama", other_linear="int8", lm_head="int8")
    assert "lm_head" not in res.other_linear


def test_lm_head_config_round_trip_and_bad_value():
    cfg = CompressionConfig(other_linear="int8", lm_head=OtherLinearFormat.INT4)
    assert cfg.lm_head == "int4"
    assert CompressionConfig.from_dict(cfg.to_dict()) == cfg
    assert CompressionConfig().lm_head is None  # default: as --other-linear
    with pytest.raises(ConfigError, match="--lm-head"):
        CompressionConfig(lm_head="int3")


@pytest.mark.slow  # one optimum export (still run by .ci/run)
@needs_plugin
def test_export_int8_attention_int4_lm_head_validates(tmp_path):
    import onnx

    from ffsplit_export.export import ExportOptions, export

    m = export(
        "tiny-llama",
        tmp_path / "out",
        preset="none",
        other_linear="int8",
        lm_head="int4",
        embedding="int4",
        group_size=32,
        num_samples=8,
        progress=False,
        options=ExportOptions(overwrite=True),
    )
    assert m["compression_config"]["lm_head"] == "int4"
    assert m["other_linear"]["lm_head"] == "int4" and m["embedding"].get("shared_with") == "lm_head"
    for key, r in m["validation"].items():
        exact = r.get("exact_outputs", r["outputs"])
        assert max(exact.values()) < 1e-4, (key, exact)
    bits = set()
    for f in m["onnx_files"]:
        g = onnx.load(str(tmp_path / "out" / f), load_external_data=False).graph
        for n in g.node:
            if n.op_type == "MatMulNBits":
                bits.add(next(a.i for a in n.attribute if a.name == "bits"))
    assert bits == {4, 8}, bits
