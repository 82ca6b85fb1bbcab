"""Export locking (issue 16): one export per OUTPUT at a time; a killed export's leftovers are removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ffsplit_export.errors import ConfigError
from ffsplit_export.export.lock import lock_path, output_lock, stale_partials

HOLD = """
import sys
from ffsplit_export.export.lock import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def test_second_export_fails_while_the_first_holds_the_lock(tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="being written by another export"):
            with output_lock(out):
                pass
        from ffsplit_export.cli import main

        assert main(["export", "tiny-llama", str(out), "--num-samples", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert "another export" in err and str(out) in err and err.count("\n") == 0
        assert not out.exists() and not stale_partials(out)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not lock_path(out).exists()  # removed on release
    with output_lock(out):  # free again
        assert lock_path(out).exists()


def test_lock_is_reentrant_in_one_process(tmp_path):
    with output_lock(tmp_path / "o"), output_lock(tmp_path / "o"):
        pass


@pytest.mark.slow
def test_killed_export_leftovers_are_removed_by_the_next_export(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ffsplit_export.cli", "export", "tiny-llama", str(out), "--num-samples", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 300
    while not stale_partials(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert stale_partials(out), "the export never created its temporary folder"
    os.kill(proc.pid, signal.SIGKILL)  # killed mid-export: the kernel releases the lock, the folder stays
    proc.wait(timeout=60)
    assert stale_partials(out) and not out.exists()
    done = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "ffsplit.json").is_file()
    assert not stale_partials(out) and not lock_path(out).exists()
