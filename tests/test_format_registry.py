"""One parametrised test per registered format (ffsplit_export.formats.registry).

For every registered format: its packed buffers survive unpack -> pack exactly; a one-layer
graph exported for each supported target gives the PyTorch reference's output in ONNX
Runtime (with the ffsplit library) and in onnx's NumPy ReferenceEvaluator (with the
package's op references); targets it does not support are rejected with ConfigError; and
the byte count the size report reads equals the packed buffers. A registered format
without a case below fails ``test_every_registered_format_has_a_case``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from ffsplit_export.errors import ConfigError
from ffsplit_export.formats import Target, check_target, get_format, registered_formats
from ffsplit_export.formats.registry import ROLES
from ffsplit_export.split import SplitConfig

N, K = 37, 70  # odd shapes: K not a multiple of 4, 8, 32 or 128
V, D = 50, 48  # embedding table (D divisible by 16)

# (role, name) -> SplitConfig fields used to compress; tolerances stated per comparison below
CASES: dict[tuple[str, str], dict] = {
    ("light", "dense"): {},
    ("light", "sparse-fp32"): {"light_sparsity": 0.5},
    ("light", "sparse-int8"): {"light_sparsity": 0.5},
    ("light", "sparse-int4"): {"light_sparsity": 0.5, "group_size": 32},
    ("light", "2:4-int8"): {},
    ("light", "int8"): {},
    ("light", "int4"): {"group_size": 32},
    ("light", "lowrank"): {"light_sparsity": 0.5},
    ("heavy", "fp32"): {},
    ("heavy", "fp16"): {},
    ("heavy", "int8"): {},
    ("other-linear", "fp32"): {},
    ("other-linear", "int8"): {},
    ("other-linear", "int4"): {"group_size": 64},
    ("embedding", "fp32"): {},
    ("embedding", "int8"): {},
    ("embedding", "int4"): {},
}
IDS = [f"{r}:{n}" for r, n in CASES]

# max |ONNX Runtime - PyTorch| and |ReferenceEvaluator - PyTorch| on outputs up to |y| = 21:
# summation order only (float64 in the NumPy reference); measured <= 4.8e-6 over every case
ATOL = 1e-4


def _weight(shape, seed=0) -> torch.Tensor:
    """Magnitudes in [0.5, 1]: no kept weight quantizes to a stored zero, so layouts are canonical."""
    g = torch.Generator().manual_seed(seed)
    mag = 0.5 + 0.5 * torch.rand(shape, generator=g)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return mag * sign


def _compress(role: str, name: str):
    fmt = get_format(name, role)
    if role == "embedding":
        return fmt, fmt.compress(_weight((V, D)))
    cfg = SplitConfig(**CASES[(role, name)])
    x_norm = torch.linspace(0.5, 2.0, K)
    bias = torch.linspace(-1.0, 1.0, N)
    return fmt, fmt.compress(_weight((N, K)), bias, x_norm=x_norm, config=cfg)


def _input(role: str) -> torch.Tensor:
    if role == "embedding":
        return torch.tensor([[0, 3, 49, 7], [1, 1, 2, 48]], dtype=torch.int64)
    return torch.randn(2, 3, K, generator=torch.Generator().manual_seed(1))


class _One(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _export(module, x, path, target) -> onnx.ModelProto:
    from ffsplit_export.linear import export_target

    with export_target(target), torch.no_grad():
        torch.onnx.export(
            _One(module),
            (x,),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return onnx.load(str(path))


def _kept(role, name) -> bool:
    return get_format(name, role).keeps_original


# ------------------------------------------------------------------------------ registry


def test_every_registered_format_has_a_case():
    registered = {(f.role, f.name) for f in registered_formats()}
    assert registered == set(CASES), f"formats without a test case: {sorted(registered - set(CASES))}"


def test_every_stable_name_is_registered_and_lookup_errors_list_the_names():
    for role, (enum, option) in ROLES.items():
        for member in enum:
            fmt = get_format(member)
            assert (fmt.role, fmt.name) == (role, member.value)
            assert get_format(member.value, role) is fmt
        with pytest.raises(ConfigError, match=option) as ei:
            get_format("no-such-format", role)
        for f in registered_formats(role):
            assert f.name in str(ei.value)


def test_duplicate_registration_is_refused():
    from ffsplit_export.errors import FormatError
    from ffsplit_export.formats import LightFormat, WeightFormat, register_format

    with pytest.raises(FormatError, match="already registered"):
        register_format(LightFormat.INT8)(type("Again", (WeightFormat,), {}))


# ------------------------------------------------------------------------------ per format


@pytest.mark.parametrize("role,name", CASES, ids=IDS)
def test_pack_unpack_round_trip(role, name):
    fmt, m = _compress(role, name)
    if _kept(role, name):
        assert m is None  # the layer stays as it is
        return
    buffers = {n: b.detach().numpy().copy() for n, b in m.named_buffers(recurse=False) if b is not None}
    logical = fmt.unpack(m)
    repacked = fmt.pack_arrays(m, logical)
    assert set(repacked) == set(buffers)
    for n, arr in repacked.items():
        assert arr.dtype == buffers[n].dtype and np.array_equal(arr, buffers[n]), n
    # unpacking did not touch the module
    for n, b in m.named_buffers(recurse=False):
        if b is not None:
            assert np.array_equal(b.numpy(), buffers[n])
    # the size report's exact count is the packed buffers
    if role != "embedding":
        assert fmt.nbytes(m) == sum(a.nbytes for n, a in buffers.items() if n in m.packed_names)


@pytest.mark.parametrize("role,name", CASES, ids=IDS)
def test_reference_forward_matches_onnx_runtime_and_numpy_reference(role, name, tmp_path):
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    from ffsplit_export.ops import reference_ops
    from ffsplit_export.runtime import session_options

    fmt, m = _compress(role, name)
    if _kept(role, name):
        assert all(fmt.supports(t) for t in Target)
        return
    x = _input(role)
    with torch.no_grad():
        ref = fmt.reference_forward(m, x).numpy()
        dense = (
            torch.nn.functional.embedding(x, m.dense_weight())
            if role == "embedding"
            else x @ m.dense_weight().T + m.bias
        ).numpy()
    # the reference forward is x @ decode(W).T (+ b); low-rank multiplies by its factors in turn
    np.testing.assert_allclose(ref, dense, rtol=0, atol=1e-5)
    for target in sorted(fmt.targets, key=str):
        if target is Target.TENSORRT:
            continue  # no TensorRT here; the graph is checked in test_tensorrt_graph
        model = _export(m, x, tmp_path / f"{target}.onnx", target)
        if target is Target.PORTABLE:
            assert all(n.domain != "ffsplit" for n in model.graph.node), "portable must use standard ops"
        sess = ort.InferenceSession(
            model.SerializeToString(), sess_options=session_options(), providers=["CPUExecutionProvider"]
        )
        y_ort = sess.run(None, {"x": x.numpy()})[0]
        y_np = ReferenceEvaluator(model, new_ops=reference_ops(include_contrib=True)).run(
            None, {"x": x.numpy()}
        )[0]
        np.testing.assert_allclose(y_ort, ref, rtol=0, atol=ATOL, err_msg=f"ONNX Runtime, {target}")
        np.testing.assert_allclose(y_np, ref, rtol=0, atol=ATOL, err_msg=f"ReferenceEvaluator, {target}")


@pytest.mark.parametrize("role,name", CASES, ids=IDS)
def test_tensorrt_graph(role, name, tmp_path):
    """Where supported: only standard ops and ffsplit plugin nodes that carry namespace + version."""
    fmt, m = _compress(role, name)
    if m is None:
        pytest.skip(f"{role} {name} leaves the layer as it is")
    if not fmt.supports(Target.TENSORRT):
        pytest.skip(f"{role} {name} is rejected for tensorrt (test_targets_supported_or_rejected)")
    model = _export(m, _input(role), tmp_path / "trt.onnx", Target.TENSORRT)
    for n in model.graph.node:
        assert n.domain in ("", "ai.onnx", "ffsplit"), n.domain
        if n.domain == "ffsplit":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["plugin_namespace"] == b"ffsplit" and attrs["plugin_version"] == b"1"


@pytest.mark.parametrize("role,name", CASES, ids=IDS)
def test_targets_supported_or_rejected(role, name):
    fmt = get_format(name, role)
    for target in Target:
        if fmt.supports(target):
            check_target(target, [(role, name)])
        else:
            with pytest.raises(ConfigError, match=f"{ROLES[role][1]} {name}.*--target {target}"):
                check_target(target, [(role, name)])


@pytest.mark.parametrize("role,name", [c for c in CASES if c[0] != "embedding"], ids=lambda c: str(c))
def test_trainable_form_packs_back_into_the_format(role, name):
    from ffsplit_export.recover import TrainableLinear

    fmt, m = _compress(role, name)
    if m is None:
        return
    t = TrainableLinear(m)
    x = _input(role)
    with torch.no_grad():
        y_t = t(x)
        y_m = m(x)
    # the fake-quantized float weight reproduces the packed one (rounding of a rounded weight)
    np.testing.assert_allclose(y_t.numpy(), y_m.numpy(), rtol=0, atol=1e-5)
    packed = t.pack()
    assert packed.format is fmt and type(packed) is type(m)
    np.testing.assert_allclose(packed.dense_weight().numpy(), m.dense_weight().numpy(), rtol=0, atol=1e-6)
    if fmt.pruned:  # the mask is fixed: pruned positions stay pruned
        assert t.mask is not None and (t.effective_weight()[~t.mask] == 0).all()
