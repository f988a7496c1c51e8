"""Atomic file writes: a crash mid-write leaves the previous file intact.

Every writer here writes to a temporary file in the destination's folder,
flushes it to disk, and renames it over the destination with `os.replace`,
which is atomic on POSIX and Windows when both paths are on one file system.
A reader therefore sees either the old file or the new one, never half of
one, even if the writing process is killed (SIGKILL, out of memory, a
preempted machine) in the middle.

```python
import json, os, tempfile
from keras_peft.io import atomic_path, atomic_write_json

folder = tempfile.mkdtemp()
metrics = os.path.join(folder, "metrics.json")
atomic_write_json(metrics, {"accuracy": 0.91})

# Any library that writes to a path can be made atomic with atomic_path:
with atomic_path(os.path.join(folder, "table.csv")) as tmp:
    with open(tmp, "w") as f:
        f.write("epoch,loss\\n0,0.5\\n")
assert json.load(open(metrics)) == {"accuracy": 0.91}
```
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def _fsync_dir(folder: str) -> None:
    """Makes the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[str]:
    """Yields a temporary path to write; on success it is renamed over `path`.

    The temporary file lives in the same folder as `path` (a rename across
    file systems would not be atomic) and keeps its extensions, so writers
    that check them accept it (`model.save` wants `.keras`,
    `save_weights` wants `.weights.h5`): `model.keras` is written as
    `.model.tmp-<random>.keras`.
    If the block raises, the temporary file is removed, `path` is not
    touched, and the exception propagates. If the process dies inside the
    block, `path` is not touched either; only the temporary file may remain.

    The yielded file exists (empty) when the block starts; a writer that
    refuses to overwrite files should be told to. The folder of `path` must
    exist.

    Args:
        path: the destination file.
        fsync: flush the written file and the rename to disk before returning
            (survives a power cut, not just a killed process).

    Yields:
        The temporary path, as a string.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Cannot write {path!r}: its folder {folder!r} does not exist. Create it first "
            "(os.makedirs(folder, exist_ok=True))."
        )
    name = os.path.basename(path)
    suffix = "".join(pathlib.PurePath(name).suffixes)
    stem = name[: len(name) - len(suffix)] if suffix else name
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        # mkstemp creates the file 0600 (and a writer may have made it anew, as
        # safetensors does): give it the permissions open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if fsync:
        _fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Writes `data` to `path` atomically (see `atomic_path`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"atomic_write_bytes expects bytes. Received: {type(data).__name__}; "
            "use atomic_write_text for strings."
        )
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(
    path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = True
) -> None:
    """Writes `text` to `path` atomically (see `atomic_path`)."""
    if not isinstance(text, str):
        raise TypeError(
            f"atomic_write_text expects a str. Received: {type(text).__name__}; "
            "use atomic_write_bytes for bytes."
        )
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "w", encoding=encoding) as f:
        f.write(text)


def atomic_write_json(
    path: str | os.PathLike, obj: Any, *, indent: int | None = 2, fsync: bool = True, **kwargs
) -> None:
    """Serializes `obj` as JSON and writes it to `path` atomically.

    The object is serialized before the temporary file is created, so an
    object that JSON cannot encode raises without touching the folder.
    Extra keyword arguments go to `json.dumps` (e.g. `sort_keys=True`).
    """
    text = json.dumps(obj, indent=indent, **kwargs)
    atomic_write_text(path, text + "\n", fsync=fsync)
