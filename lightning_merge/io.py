"""Atomic file and directory writes: nothing a run already wrote is lost or left half-written.

A write that fails because of where it goes (no space left, no permission, a read-only file system) raises one
`OutputError` naming the path; the temporary file or directory it was writing is removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lightning_merge.errors import OutputError

# OS errors that say the output location, not the program, is the problem
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR}


@contextlib.contextmanager
def output_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failure to write ``path`` (full disk, permissions, read-only) into one `OutputError` line."""
    try:
        yield
    except OSError as err:
        if err.errno not in _OUTPUT_ERRNOS:
            raise
        fix = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a directory you can write"
        raise OutputError(f"cannot write {path}: {err.strerror}; {fix} (e.g. another --trainer.default_root_dir)") \
            from err


def check_writable(directory: str | os.PathLike) -> None:
    """Create ``directory`` if needed and write and remove a probe file in it: `OutputError` if that fails."""
    directory = Path(directory)
    with output_errors(directory):
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=directory)
        os.close(fd)
        os.unlink(probe)


def check_free_space(directory: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """Raise `OutputError` before an expensive phase if ``directory`` lacks room for what it will write."""
    directory = Path(directory)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise OutputError(f"{what} needs about {needed_bytes / 2**20:.0f} MiB in {directory}, but only "
                          f"{free / 2**20:.0f} MiB are free; free some space or choose another directory")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    with output_errors(path):
        return _atomic_write_bytes(path, data)


def _atomic_write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs should be readable like any other
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer that wants a filename; rename it into place on success."""
    path = Path(path)
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it replaces ``path`` in one rename.

    An existing ``path`` is only replaced when ``overwrite`` is set; the old copy is removed after the swap.
    """
    path = Path(path)
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 dirs; the renamed result should be readable like any other
        try:
            yield tmp
            _swap_into_place(tmp, path, overwrite)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    if not path.exists():
        os.replace(tmp, path)
        return
    if not overwrite:
        from lightning_merge.errors import OutputExistsError

        raise OutputExistsError(f"{path} exists already; choose another path or pass overwrite")
    old = path.with_name(f".{path.name}.old.{os.getpid()}")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_verified(path: str | os.PathLike, data: bytes) -> Path:
    """Write a cache file, then (last) its sha256 beside it: a file without a matching digest is not trusted."""
    path = Path(path)
    atomic_write_bytes(path, data)
    atomic_write_text(_digest_path(path), hashlib.sha256(data).hexdigest() + "\n")
    return path


def read_verified(path: str | os.PathLike, log: Callable[[str], None] = print) -> bytes | None:
    """A cache file's bytes if its recorded sha256 matches; None if it is absent or damaged (then removed, and
    ``log`` told, so the caller rebuilds it)."""
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    digest = _digest_path(path)
    recorded = digest.read_text().strip() if digest.is_file() else None
    if recorded == hashlib.sha256(data).hexdigest():
        return data
    reason = "has no recorded digest" if recorded is None else "does not match its recorded digest"
    log(f"cache file {path} {reason} (damaged or from an interrupted run); rebuilding it")
    path.unlink(missing_ok=True)
    digest.unlink(missing_ok=True)
    return None


def cached_arrays(path: str | os.PathLike, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Named numpy arrays kept in a verified ``.npz`` cache file (`read_verified`): read if whole, else ``build()``
    and written. Arrays only: nothing is unpickled."""
    import numpy as np  # not needed by the rest of this module

    data = read_verified(path)
    if data is not None:
        with np.load(io.BytesIO(data)) as stored:
            return {name: stored[name] for name in stored.files}
    arrays = build()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_verified(path, buffer.getvalue())
    return arrays


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete what interrupted atomic writes left in ``directory`` (``.<name>.*.tmp``, ``.<name>.old.*``).

    Returns the paths removed. Only this module's naming is matched, so other files are left alone.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir()
             if p.name.startswith(".") and (p.name.endswith(".tmp") or ".old." in p.name)]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale
