"""The one path layer: every file kd_jax reads or writes under a workdir or a pool.

A path is a string (or `os.PathLike`): a local path, or a URL such as `gs://bucket/run` that
`etils.epath` opens natively (through TensorFlow's GCS client). So a run's workdir, a teacher's
workdir and a pool can live on GCS directly: no gcsfuse mount, whose emulated directory rename
(a copy of every object, then deletes) is not atomic. Orbax takes the same paths (as
`epath.Path`), and TensorFlow (`tf.summary`, TFRecord readers and writers) takes them as strings.
Nothing here turns a URL into a local path: `absolute("gs://b/x")` is `"gs://b/x"`, never
`os.path.abspath`'s `"<cwd>/gs:/b/x"`.

Semantics on the two kinds of path:

- **Atomic writes** (`write_bytes_atomic` and the JSON / npz / npy / figure writers on top of
  it): a reader sees the old content or the new one, never part of it. Local: write a hidden
  temporary sibling, fsync, `os.replace` it over the target. Remote: one object write, which
  GCS makes visible only once the upload is complete; nothing is renamed (a rename on GCS is a
  copy plus a delete).
- **Appends** (`LineLog`, `metrics.jsonl`): GCS objects cannot be appended to. Local files are
  appended to. On a remote path the log keeps the whole content in memory and rewrites the
  object (an atomic write), at most once every `min_interval` seconds, plus on `flush()`, which
  the trainer calls before every checkpoint and at the end. The cost is the log's size per
  rewrite: a 100k-step run logging every 100 steps writes ~1,000 objects of at most a few hundred
  KB (~0.2 GB in all); the interval keeps within GCS's one-update-per-second-per-object limit.
- **Directories**: GCS has none, an object write creates its "directory". `makedirs` is a no-op on
  remote paths; `exists` / `isdir` of a remote directory are true once an object lies under it.
  The atomic writers create a missing local parent directory too, so both behave alike.
- `replace_file` renames one *file*: `os.replace` locally; on GCS a server-side copy then a
  delete, the destination object appearing whole (only the TFRecord shard writer uses it, to
  publish complete shards). Directories are never renamed by kd_jax on a remote path.
"""

from __future__ import annotations

import glob as glob_lib
import io
import json
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from etils import epath


def is_remote(path) -> bool:
    """True for a URL path (`gs://...`, any `scheme://`), False for a local one."""
    return "://" in os.fspath(path)


def _p(path) -> epath.Path:
    return epath.Path(os.fspath(path))


def join(base, *parts) -> str:
    """`base/part/...` as a string (a URL stays a URL)."""
    base = os.fspath(base)
    parts = [os.fspath(p) for p in parts]
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def absolute(path) -> str:
    """A local path made absolute; a URL unchanged (a trailing slash removed)."""
    path = os.fspath(path)
    if is_remote(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}" if rest.strip("/") else path
    return os.path.abspath(path)


def dirname(path) -> str:
    path = os.fspath(path)
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def basename(path) -> str:
    path = os.fspath(path)
    return posixpath.basename(path) if is_remote(path) else os.path.basename(path)


def exists(path) -> bool:
    return _p(path).exists()


def size(path) -> int | None:
    """The size of a file in bytes, or None when it does not exist."""
    p = _p(path)
    return int(p.stat().length) if p.exists() else None


def isdir(path) -> bool:
    return _p(path).is_dir()


def isfile(path) -> bool:
    p = _p(path)
    return p.exists() and not p.is_dir()


def listdir(path) -> list[str]:
    """Names (not paths) of the entries of a directory, sorted."""
    return sorted(p.name for p in _p(path).iterdir())


def glob(pattern) -> list[str]:
    """Sorted paths matching a glob (wildcards in any component below the bucket; no `**`)."""
    pattern = os.fspath(pattern)
    if not is_remote(pattern):
        return sorted(glob_lib.glob(pattern))
    scheme, rest = pattern.split("://", 1)
    bucket, _, rel = rest.partition("/")
    if not rel:
        return [pattern] if exists(pattern) else []
    return sorted(os.fspath(p) for p in _p(f"{scheme}://{bucket}").glob(rel))


def makedirs(path) -> None:
    """`mkdir -p` locally; nothing on a remote path (an object write creates its prefix)."""
    if not is_remote(path):
        os.makedirs(os.fspath(path), exist_ok=True)


def remove(path) -> None:
    _p(path).unlink()


def rmtree(path) -> None:
    """Deletes a directory (every object under a remote prefix) and what it holds."""
    _p(path).rmtree()


def replace_file(src, dst) -> None:
    """Moves one file over `dst` (see the module docstring; never used for directories)."""
    if is_remote(src) or is_remote(dst):
        _p(src).replace(os.fspath(dst))
    else:
        os.replace(os.fspath(src), os.fspath(dst))


# ----- reading ------------------------------------------------------------------------------


def read_bytes(path) -> bytes:
    with _p(path).open("rb") as f:
        return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path) -> Any:
    return json.loads(read_text(path))


def load_npz(path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Every array of an `.npz` as a dict (read in full, the file closed)."""
    src = os.fspath(path) if not is_remote(path) else io.BytesIO(read_bytes(path))
    with np.load(src, allow_pickle=allow_pickle) as z:
        return {k: z[k] for k in z.files}


def load_npy(path) -> np.ndarray:
    src = os.fspath(path) if not is_remote(path) else io.BytesIO(read_bytes(path))
    return np.load(src, allow_pickle=False)


# ----- atomic writes ------------------------------------------------------------------------


def write_bytes_atomic(path, data: bytes) -> None:
    """`path` holds `data`, or (killed midway) what it held before; see the module docstring."""
    path = os.fspath(path)
    if is_remote(path):
        with _p(path).open("wb") as f:  # one object, visible once its upload is complete
            f.write(data)
        return
    d, name = os.path.split(path)
    if d:  # as on GCS, writing a file creates its directory
        os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def write_text_atomic(path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def json_default(value):
    """numpy scalars and arrays as JSON numbers and lists (`json.dumps`' `default`)."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_json_atomic(
    path, obj: Any, default: Callable[[Any], Any] | None = json_default, indent: int = 2
) -> None:
    """JSON (indented, sorted keys; numpy values as numbers / lists) written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True, default=default))


def save_npz_atomic(path, arrays: Mapping[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


def save_npy_atomic(path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    write_bytes_atomic(path, buf.getvalue())


def save_figure_atomic(path, fig, **savefig_kwargs) -> None:
    """`fig.savefig` into memory (format from the suffix), then one atomic write."""
    buf = io.BytesIO()
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    fig.savefig(buf, format=fmt, **savefig_kwargs)
    write_bytes_atomic(path, buf.getvalue())


# ----- append-only line logs ------------------------------------------------------------------


class LineLog:
    """An append-only text file of lines (`metrics.jsonl`), local or remote.

    Local: each `append` appends (a line cut short by a kill is ended before the next one).
    Remote: the content is kept in memory and the object rewritten atomically when
    `min_interval` seconds have passed since the last rewrite, and on `flush()`; see the
    module docstring for the cost.
    """

    def __init__(self, path, min_interval: float = 2.0):
        self.path = os.fspath(path)
        self.remote = is_remote(self.path)
        self.min_interval = min_interval
        self._content: str | None = None  # remote: the object's content, with pending lines
        self._dirty = False
        self._last_write = 0.0
        self._checked_tail = False

    def read_lines(self) -> list[str]:
        """The lines on storage plus (remote) those not flushed yet, without newlines."""
        if self.remote and self._content is not None:
            text = self._content
        else:
            text = read_text(self.path) if exists(self.path) else ""
            if self.remote:
                self._content = text
        return text.splitlines()

    def append(self, line: str) -> None:
        line = line if line.endswith("\n") else line + "\n"
        if not self.remote:
            with open(self.path, "a+b") as f:
                if not self._checked_tail:  # a kill mid-line left no newline: end that line
                    self._checked_tail = True
                    if f.seek(0, os.SEEK_END) > 0:
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            f.write(b"\n")
                f.write(line.encode("utf-8"))
            return
        if self._content is None:
            self._content = read_text(self.path) if exists(self.path) else ""
        if self._content and not self._content.endswith("\n"):
            self._content += "\n"
        self._content += line
        self._dirty = True
        if time.monotonic() - self._last_write >= self.min_interval:
            self.flush()

    def flush(self) -> None:
        """Writes pending lines now (remote; local appends are written at once)."""
        if self.remote and self._dirty:
            write_text_atomic(self.path, self._content)
            self._dirty = False
            self._last_write = time.monotonic()
