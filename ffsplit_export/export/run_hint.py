"""How to run a graph with ffsplit nodes, written into the graph itself.

A plain ``onnxruntime.InferenceSession`` on an ort-cpu export without our library fails with
"ffsplit:SparseMatMulInt8(-1) is not a registered function/op". ONNX Runtime 1.32 does not show
a model's doc strings or metadata in that error (checked), but the file carries the fix where
tools that read ONNX files (onnx.load, Netron, ``InferenceSession.get_modelmeta()``) show it:
a ``metadata_props`` entry and the graph's ``doc_string``.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from ..formats import Target
from ..ops import DOMAIN
from .validate import all_nodes

HINT_KEY = "ffsplit.how_to_run"


def run_hint(target: Target, library: str = "libffsplit_ort.so") -> str:
    """The one-line fix for running a graph of ``target`` that has ffsplit nodes."""
    if target is Target.TENSORRT:
        return (
            f"this graph has ffsplit TensorRT plugin nodes (domain {DOMAIN!r}, plugin_namespace 'ffsplit'): "
            "pip install ffsplit-export, then build engines with `ffsplit-export trt-build <this folder>` "
            "(needs TensorRT and a GPU)"
        )
    return (
        f"this graph has custom ops of domain {DOMAIN!r} that need {library}: pip install ffsplit-export, then "
        "onnxruntime.InferenceSession(path, sess_options=ffsplit_export.runtime.session_options()); "
        f"or SessionOptions.register_custom_ops_library(<the {library} bundled in this folder>)"
    )


def _uses_domain(model: onnx.ModelProto, domain: str) -> bool:
    if any(o.domain == domain for o in model.opset_import):
        return True
    return any(n.domain == domain for n in all_nodes(model.graph))


def add_run_hints(folder: Path, target: Target, library: str = "libffsplit_ort.so") -> list[str]:
    """Write the hint into every ``*.onnx`` in ``folder`` that uses the ffsplit domain; returns their names.

    External data stays where it is (the files are loaded without it and its references kept).
    """
    hint = run_hint(target, library)
    done = []
    for path in sorted(Path(folder).glob("*.onnx")):
        m = onnx.load(str(path), load_external_data=False)
        if not _uses_domain(m, DOMAIN):
            continue
        for p in list(m.metadata_props):
            if p.key == HINT_KEY:
                m.metadata_props.remove(p)
        m.metadata_props.add(key=HINT_KEY, value=hint)
        if hint not in m.graph.doc_string:
            m.graph.doc_string = hint + (f"\n{m.graph.doc_string}" if m.graph.doc_string else "")
        onnx.save_model(m, str(path))
        done.append(path.name)
    return done
