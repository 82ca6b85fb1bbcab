"""Built-in names and local directories never touch the network; a hub id tries once (issue 16).

Each case runs in a fresh interpreter with ``HF_HUB_OFFLINE`` unset and ``HF_ENDPOINT`` pointing
at a closed local port, and with ``socket.connect`` replaced by a function that records the
address and refuses; the child prints how many connections were attempted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, socket, sys
attempts = []
def refuse(self, address):
    attempts.append(str(address))
    raise OSError("network disabled by the test")
socket.socket.connect = refuse
socket.create_connection = lambda address, *a, **k: refuse(None, address)
from ffsplit_export.cli import main
rc = main(sys.argv[1:])
print("RESULT " + json.dumps({"rc": rc, "attempts": attempts}))
"""


def _run(tmp_path: Path, *argv: str) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HOME=str(tmp_path / "hf-home"),  # an empty cache: nothing can come from it
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, env=env, timeout=600
    )
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"child failed (rc {p.returncode}):\n{p.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT ") :]), p.stderr


@pytest.mark.slow
def test_builtin_and_local_models_make_no_request(tmp_path):
    from ffsplit_export.models.tiny import build_tiny

    res, err = _run(tmp_path, "export", "tiny-llama", str(tmp_path / "a"), "--no-validate", "--quiet")
    assert res == {"rc": 0, "attempts": []}, err[-2000:]
    assert (tmp_path / "a" / "model.onnx").is_file() and (tmp_path / "a" / "tokenizer.json").is_file()

    model, tok, _ = build_tiny("tiny-llama")
    local = tmp_path / "local-llama"
    model.save_pretrained(local)
    tok.save_pretrained(local)
    res, err = _run(tmp_path, "export", str(local), str(tmp_path / "b"), "--no-validate", "--quiet")
    assert res == {"rc": 0, "attempts": []}, err[-2000:]  # --task auto from the local config, offline
    assert (tmp_path / "b" / "model.onnx").is_file()


def test_hub_id_tries_once_and_says_what_to_do(tmp_path):
    res, err = _run(tmp_path, "export", "no-such-org/no-such-model", str(tmp_path / "out"))
    assert res["rc"] == 2
    assert len(res["attempts"]) == 1, res  # one request, no retries
    assert "not reachable" in err and "HF_HUB_OFFLINE=1" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_folder_without_tokenizer_names_what_is_missing(tmp_path):
    from ffsplit_export.models.tiny import build_tiny

    model, _, _ = build_tiny("tiny-t5")
    raw = tmp_path / "raw-t5"
    model.save_pretrained(raw)  # weights and config, no tokenizer (a raw training checkpoint)
    res, err = _run(tmp_path, "export", str(raw), str(tmp_path / "out"))
    assert res == {"rc": 2, "attempts": []}
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "UnsupportedModelError" in lines[0], err[-2000:]
    assert "no usable tokenizer" in lines[0] and "tokenizer.save_pretrained" in lines[0]
    assert "model_file or model_proto" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
