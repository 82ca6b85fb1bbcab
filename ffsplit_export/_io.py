"""Writing a directory atomically: every folder the package produces is built beside its final
path in a ``.NAME.*.partial`` folder and renamed into place only once complete.

Used by the export, ``convert-ct2`` and the real-model cache. A reader never sees a half-written
folder; a failure (or Ctrl-C) inside the block removes the partial folder; a process killed
mid-write leaves a ``.NAME.*.partial`` folder that the export lock removes (see
:mod:`ffsplit_export.export.lock`). The result gets the modes a plain ``mkdir``/``open`` would
give under the process umask (0o755 folders and 0o644 files under the usual 022), not the 0o700
of ``tempfile.mkdtemp`` or the 0o600 some writers use for their temporary files: an export folder
is readable by other users, like any ``optimum-cli`` output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def partial_glob(target: Path) -> str:
    """The glob (in ``target``'s parent) matching the partial folders of writes to ``target``."""
    return f".{target.name}.*{PARTIAL_SUFFIX}"


def process_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it,
    which for a moment would give files created by other threads mode 0o666)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc (not Linux): the racy way
    os.umask(mask)
    return mask


def apply_default_modes(root: Path, umask: int | None = None) -> None:
    """Give ``root`` and everything below it the modes ``mkdir``/``open`` give under ``umask``:
    folders 0o777 & ~umask, files 0o666 & ~umask (0o777 & ~umask if any execute bit was set, e.g.
    a bundled shared library). Symbolic links are left alone."""
    mask = process_umask() if umask is None else umask
    dir_mode, file_mode, exe_mode = 0o777 & ~mask, 0o666 & ~mask, 0o777 & ~mask
    os.chmod(root, dir_mode)
    for base, dirs, files in os.walk(root):
        for d in dirs:
            p = os.path.join(base, d)
            if not os.path.islink(p):
                os.chmod(p, dir_mode)
        for f in files:
            p = os.path.join(base, f)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                os.chmod(p, exe_mode if st.st_mode & 0o111 else file_mode)


def _rename_into_place(tmp: Path, target: Path, replace: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        os.rename(tmp, target)  # fails (and the caller cleans up) if someone created target meanwhile
        return
    if not replace:
        raise FileExistsError(f"{target} appeared while it was being written")
    # the old folder goes into a partial-named folder: if we are killed here, the next export lock
    # (or the caller's retry) removes it, and target is never missing except for one rename
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent))
    try:
        os.rename(target, trash / "old")
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(trash / "old", target)
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on a clean exit give it the default
    modes and rename it to ``target`` (replacing an existing ``target`` only if ``replace``,
    otherwise raising FileExistsError); on an exception remove it and re-raise.

    The temporary folder is ``.TARGET.<random>.partial`` in ``target``'s parent (created if
    missing), on the same file system, so the final rename is atomic.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent))
    try:
        yield tmp
        apply_default_modes(tmp)
        _rename_into_place(tmp, target, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
