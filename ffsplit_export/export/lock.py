"""One export per OUTPUT at a time, and no leftovers from killed exports.

An export holds an OS lock (``fcntl.flock``, released by the kernel when the process dies, even
by ``kill -9``) on ``.OUTPUT.lock`` beside OUTPUT for as long as it runs. A second export to the
same OUTPUT fails at once with a typed error. Whoever takes the lock removes the
``.OUTPUT.*.partial`` folders in OUTPUT's parent: no live export can own them, since it would
hold the lock. The lock file is removed on release.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from .._io import partial_glob
from ..errors import ConfigError

_held: set[str] = set()  # lock paths this process holds (an export nested in an export reuses the lock)


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


def stale_partials(output: Path) -> list[Path]:
    """Temporary folders of earlier exports to ``output`` (see :func:`ffsplit_export._io.atomic_dir`)."""
    if not output.parent.is_dir():
        return []
    return sorted(p for p in output.parent.glob(partial_glob(output)) if p.is_dir())


@contextlib.contextmanager
def output_lock(output: str | Path):
    """Hold the export lock of ``output``; raise ConfigError if another process holds it."""
    output = Path(output).absolute()
    path = lock_path(output)
    key = str(path)
    if key in _held:
        yield
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"output {str(output)!r} is being written by another export (lock {path.name} is held); "
                "wait for it to finish, or choose another directory"
            ) from None
        try:  # the holder before us may have removed the file after we opened it: lock the live one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _held.add(key)
    try:
        for stale in stale_partials(output):
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        _held.discard(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
