"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Everything herd writes that someone may read later (checkpoints, shards, manifests, reports,
logs, plots, models) is first written under a temporary name in the same folder and then renamed
into place with `os.replace`, which is atomic on one file system. A crash or Ctrl-C leaves the
old version (or nothing), never half a file. Temporary names carry the writer's process id,

    .NAME.tmp-PID[.SUFFIX]

so two writers never share one, and the next write of the same target removes temporaries left
by processes that no longer run (a killed `herd convert` does not leave its folder behind forever).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def temp_name(path: Path) -> Path:
    """The temporary sibling this process writes `path` under (keeps the suffix for tools that look at it)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


def remove_stale_temps(path: Path) -> None:
    """Delete temporaries of `path` left by writers that are no longer running."""
    parent = path.parent
    if not parent.is_dir():
        return
    prefix = f".{path.name}.tmp-"
    for p in parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        pid_text = p.name[len(prefix):].split(".", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write `path` through (for writers that take a file name).

    On success the temporary file is renamed to `path`; on any exception it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", opener: Callable[..., IO] = open,
                **kwargs) -> Iterator[IO]:
    """`open(path, mode)` whose file appears under `path` only when the block finishes without error.

    opener: e.g. gzip.open for compressed output; text modes default to UTF-8.
    """
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp:
        with opener(tmp, mode, **kwargs) as f:
            yield f


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically; returns the path."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)


@contextmanager
def atomic_folder(dst: str | os.PathLike, overwrite: bool = False,
                  replaceable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to `dst`; on success it replaces `dst` in one rename.

    An existing `dst` is replaced only with overwrite=True, and only if it is empty or
    `replaceable(dst)` says it may be (so a typo cannot delete an unrelated folder); otherwise a
    FileExistsError. On failure the temporary folder is removed.
    """
    dst = Path(dst)
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} already exists")
        if dst.is_file() or (any(dst.iterdir()) and not (replaceable and replaceable(dst))):
            raise IsADirectoryError(f"{dst} exists and is not a folder that may be replaced")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, replacing an existing `dst` (two renames; the old copy is deleted last)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
