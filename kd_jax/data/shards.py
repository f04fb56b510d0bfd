"""TFRecord shards of encoded images: a writer and a streaming, per-process reader.

An open-world pool (or any bring-your-own image set) is stored as ``num_shards`` TFRecord files
``{prefix}-{i:05d}-of-{n:05d}.tfrecord`` plus a small JSON manifest ``{prefix}.json``. Each record
is a ``tf.train.Example`` with

=========  ========  =====================================================================
key        type      meaning
=========  ========  =====================================================================
image      bytes     the encoded image (PNG by default: lossless, decodes byte-identical)
id         int64     a stable integer id (default: the index in the writer's input order)
label      int64     the class index, or -1 when unlabeled
source     bytes     a free-form tag (where the item came from), ``b""`` when none
=========  ========  =====================================================================

Item ``i`` goes to shard ``i % num_shards`` (round-robin), so every shard holds a mix of the
input order and per-process file shares stay balanced even when the input is grouped by source.

Writing is atomic per file: every shard is written under a hidden ``.partial`` name, all are
renamed into place once all are complete, and the manifest is written last, so a killed writer
never leaves a half shard under a shard name. ``out_dir`` may be local or ``gs://``: every file
operation goes through :mod:`kd_jax.fileio` (on GCS a shard's "rename" is a server-side copy of
that one object, which appears whole; the manifest is one object write, never renamed), and the
TFRecord reader and writer are TensorFlow's, which take ``gs://`` paths natively.

Reading (:func:`read_shards`) is the usual multi-host recipe: list the files (sorted; a pool is
the directory ``write_shards`` wrote, whose manifest lists the shards, or a glob) → shard *by
file* across processes (process ``i`` takes files ``i, i+P, ...``) → interleave → parse →
decode.
A corrupt record (an image that does not decode, an example that does not parse, a damaged
record frame, a shard cut short, a file that is no shard) is skipped, counted and reported with
a warning naming the file, or raises an error naming the file when ``on_corrupt="fail"``. The
id and count passes (:func:`read_ids`, :func:`count_ids`, :func:`count_records`) read through
the same reader without decoding, so they skip the same damaged or foreign files (an image
that parses but does not decode is noticed only by the passes that decode it).

Random access later
-------------------
Code that selects pool items by id should depend only on the :class:`PoolSource` protocol: the
number of items and a streamed pass over ``{image, id, label, source}`` (e.g. for scoring), then
a selection by id (``keep_id_fn``). A random-access backend (ArrayRecord + Grain) can implement
the same protocol plus ``__getitem__(ids)`` later without changing its callers;
:class:`TFRecordPool` is the streaming implementation.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import (
    Any,
    Protocol,
    runtime_checkable,
)

import numpy as np
import tensorflow as tf

from kd_jax import fileio
from kd_jax import log as kd_log

try:  # tf.data runs on the host CPU only; JAX owns the accelerators.
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # TF already initialised elsewhere: leave it as it is.
    pass

log = kd_log.get(__name__)

MANIFEST_FORMAT = "kd_jax.image_shards"
MANIFEST_VERSION = 1
IMAGE_FORMATS = ("png", "jpeg")
PathPattern = str | os.PathLike | Sequence[str | os.PathLike]
KeepIdFn = Callable[[tf.Tensor], tf.Tensor]
# The tf.data functions below use explicit tf.cond: skipping AutoGraph's conversion makes
# building a reader several times cheaper.
_no_autograph = tf.autograph.experimental.do_not_convert


# ---------------------------------------------------------------------------------------------
# Names and manifests
# ---------------------------------------------------------------------------------------------


def shard_name(prefix: str, index: int, num_shards: int) -> str:
    """File name of shard ``index`` of ``num_shards``: ``{prefix}-00003-of-00008.tfrecord``."""
    return f"{prefix}-{index:05d}-of-{num_shards:05d}.tfrecord"


def shard_pattern(out_dir: str | os.PathLike, prefix: str = "pool") -> str:
    """The glob matching every shard written with ``prefix`` into ``out_dir``."""
    return fileio.join(out_dir, f"{prefix}-*-of-*.tfrecord")


def manifest_path(out_dir: str | os.PathLike, prefix: str = "pool") -> str:
    """``{out_dir}/{prefix}.json``."""
    return fileio.join(out_dir, f"{prefix}.json")


def read_manifest(out_dir: str | os.PathLike, prefix: str = "pool") -> dict:
    """Loads the manifest written by :func:`write_shards`; FileNotFoundError naming the path."""
    path = manifest_path(out_dir, prefix)
    if not fileio.exists(path):
        raise FileNotFoundError(f"No shard manifest at {path!r}")
    return fileio.read_json(path)


def _partial_name(path: str) -> str:
    # Hidden and ending in ".partial" (neither ".tfrecord" nor ".json"): no shard glob matches.
    head, tail = fileio.dirname(path), fileio.basename(path)
    return fileio.join(head, f".{tail}.{uuid.uuid4().hex[:12]}.partial")


def _manifest_index(files: Sequence[str]) -> dict[str, tuple[int, list | None, bool]]:
    """{shard path: (record count, image_shape, intact)} from the manifests beside ``files``;
    `intact` is False when the file's size is not the one the manifest records (truncated)."""
    known = {}
    for d in sorted({fileio.dirname(f) for f in files}):
        for m in fileio.glob(fileio.join(d, "*.json")):
            try:
                man = fileio.read_json(m)
            except (ValueError, OSError, tf.errors.OpError):
                continue
            if not isinstance(man, dict) or man.get("format") != MANIFEST_FORMAT:
                continue
            sizes = man.get("shard_bytes") or [None] * len(man.get("shards", []))
            for name, c, size in zip(man.get("shards", []), man.get("shard_counts", []), sizes):
                path = fileio.join(d, name)
                intact = size is None or path not in files or fileio.size(path) == size
                known[path] = (int(c), man.get("image_shape"), intact)
    return known


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


def _as_hwc(img: Any, where: str) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8, got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(
            f"{where}: expected an image [H,W] or [H,W,C] with C in 1..4, got shape {a.shape}"
        )
    return a


def _check_images(images: Any) -> tuple[Any, int]:
    """(indexable images, N). Arrays are checked here, sequences item by item while writing."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got dtype {images.dtype}")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 2, 3, 4):
            raise ValueError(
                f"images must have shape [N,H,W] or [N,H,W,C] with C in 1..4, got {images.shape}"
            )
        return images, images.shape[0]
    if not hasattr(images, "__len__") or not hasattr(images, "__getitem__"):
        raise TypeError(
            "images must be a uint8 array [N,H,W(,C)] or a sequence of uint8 images "
            f"supporting len() and indexing, got {type(images).__name__}"
        )
    return images, len(images)


def encode_image(img: np.ndarray, image_format: str = "png") -> bytes:
    """uint8 [H,W,C] → PNG (lossless) or JPEG (quality 95) bytes."""
    if image_format == "png":
        return tf.io.encode_png(img).numpy()
    if image_format == "jpeg":
        if img.shape[-1] not in (1, 3):
            raise ValueError(f"jpeg needs 1 or 3 channels, got an image of shape {img.shape}")
        return tf.io.encode_jpeg(img, quality=95).numpy()
    raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")


def make_example(encoded: bytes, id_: int, label: int = -1, source: str | bytes = b"") -> bytes:
    """One serialized ``tf.train.Example`` record in the shard format."""
    if isinstance(source, str):
        source = source.encode("utf-8")
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(id_)])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "source": tf.train.Feature(bytes_list=tf.train.BytesList(value=[source])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_shards(
    out_dir: str | os.PathLike,
    images: Any,
    *,
    labels: Sequence[int] | None = None,
    sources: Sequence[str] | None = None,
    ids: Sequence[int] | None = None,
    num_shards: int = 8,
    prefix: str = "pool",
    image_format: str = "png",
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> dict:
    """Writes images (+ ids, labels, source tags) as TFRecord shards and a JSON manifest.

    Args:
      out_dir: directory to write into (created if missing; local or ``gs://``).
      images: uint8 array ``[N,H,W]`` / ``[N,H,W,C]`` (C in 1..4), or a sequence of uint8 images
        ``[H,W(,C)]`` supporting ``len`` and indexing (sizes may differ; items are fetched one at
        a time, so a lazy sequence keeps memory flat).
      labels: optional ``[N]`` ints (stored as -1 when absent).
      sources: optional ``[N]`` string tags (stored as ``b""`` when absent).
      ids: optional ``[N]`` unique ints; default ``0..N-1`` (the input order).
      num_shards: number of files (clamped to N when N is smaller). Item i goes to shard
        ``i % num_shards``.
      prefix: files ``{prefix}-{i:05d}-of-{n:05d}.tfrecord``, manifest ``{prefix}.json``.
      image_format: "png" (lossless) or "jpeg" (quality 95).
      overwrite: replace shards already written with this prefix (else FileExistsError).
      metadata: extra JSON-able entries, stored under ``"metadata"`` in the manifest.

    Returns:
      The manifest (also written to ``{out_dir}/{prefix}.json``): ``count``, ``num_shards``,
      ``shards`` (file names), ``shard_counts``, ``image_shape`` ([H,W,C], or None when sizes
      vary), ``image_format``, ``sources`` ({tag: count}), ``has_labels``, ``num_labeled``,
      ``label_counts``, ``id_min``, ``id_max``, ``metadata``.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    images, n = _check_images(images)
    if n == 0:
        raise ValueError("write_shards: no images to write (N == 0)")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"prefix must be a plain, non-empty file-name prefix, got {prefix!r}")

    if labels is None:
        labels_arr = np.full((n,), -1, np.int64)
    else:
        labels_arr = np.asarray(labels)
        if labels_arr.shape != (n,) or not np.issubdtype(labels_arr.dtype, np.integer):
            raise ValueError(
                f"labels must be integers of shape [{n}], got dtype "
                f"{labels_arr.dtype} shape {labels_arr.shape}"
            )
        labels_arr = labels_arr.astype(np.int64)
    if sources is None:
        source_list = [b""] * n
    else:
        source_list = [s if isinstance(s, bytes) else str(s).encode("utf-8") for s in sources]
        if len(source_list) != n:
            raise ValueError(f"sources must have length {n}, got {len(source_list)}")
    if ids is None:
        ids_arr = np.arange(n, dtype=np.int64)
    else:
        ids_arr = np.asarray(ids)
        if ids_arr.shape != (n,) or not np.issubdtype(ids_arr.dtype, np.integer):
            raise ValueError(
                f"ids must be integers of shape [{n}], got dtype {ids_arr.dtype} "
                f"shape {ids_arr.shape}"
            )
        ids_arr = ids_arr.astype(np.int64)
        if len(np.unique(ids_arr)) != n:
            raise ValueError("ids must be unique")
    if num_shards > n:
        log.warning("write_shards: %d shards requested for %d images; writing %d", num_shards, n, n)
        num_shards = n

    out_dir = os.fspath(out_dir)
    fileio.makedirs(out_dir)
    existing = fileio.glob(shard_pattern(out_dir, prefix))
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir!r} already holds {len(existing)} shard(s) with prefix {prefix!r} (e.g. "
            f"{fileio.basename(existing[0])}); pass overwrite=True (--overwrite) or another "
            f"prefix"
        )
    if overwrite and fileio.exists(manifest_path(out_dir, prefix)):
        fileio.remove(manifest_path(out_dir, prefix))

    names = [shard_name(prefix, i, num_shards) for i in range(num_shards)]
    finals = [fileio.join(out_dir, name) for name in names]
    tmps = [_partial_name(f) for f in finals]
    shard_counts, shard_bytes, shapes = [], [], set()
    try:  # every shard under a temporary name first; renamed only once all are complete
        for s, tmp in enumerate(tmps):
            count = 0
            with tf.io.TFRecordWriter(tmp) as writer:
                for i in range(s, n, num_shards):
                    img = _as_hwc(images[i], f"image {i}")
                    shapes.add(img.shape)
                    writer.write(
                        make_example(
                            encode_image(img, image_format),
                            ids_arr[i],
                            labels_arr[i],
                            source_list[i],
                        )
                    )
                    count += 1
            shard_counts.append(count)
            shard_bytes.append(fileio.size(tmp))
    except BaseException:
        for tmp in tmps:
            if fileio.exists(tmp):
                fileio.remove(tmp)
        raise
    for tmp, final in zip(tmps, finals):
        fileio.replace_file(tmp, final)
    for stale in existing:  # shards of an earlier write with another shard count
        if fileio.basename(stale) not in names:
            fileio.remove(stale)

    tags, tag_counts = np.unique([s.decode("utf-8") for s in source_list], return_counts=True)
    labeled = labels_arr >= 0
    lab, lab_counts = np.unique(labels_arr[labeled], return_counts=True)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "prefix": prefix,
        "count": int(n),
        "num_shards": int(num_shards),
        "shards": names,
        "shard_counts": shard_counts,
        "shard_bytes": shard_bytes,
        "image_shape": [int(d) for d in next(iter(shapes))] if len(shapes) == 1 else None,
        "image_format": image_format,
        "sources": {str(t): int(c) for t, c in zip(tags, tag_counts)},
        "has_labels": bool(labeled.any()),
        "num_labeled": int(labeled.sum()),
        "label_counts": {str(int(label)): int(c) for label, c in zip(lab, lab_counts)},
        "id_min": int(ids_arr.min()),
        "id_max": int(ids_arr.max()),
        "metadata": dict(metadata or {}),
    }
    fileio.write_json_atomic(manifest_path(out_dir, prefix), manifest, indent=1)
    return manifest


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


def _manifest_shards(directory: str) -> list[str]:
    """The shard files that the manifests in ``directory`` (written by :func:`write_shards`)
    list; ValueError naming the directory when it holds no manifest."""
    files = []
    for m in fileio.glob(fileio.join(directory, "*.json")):
        try:
            man = fileio.read_json(m)
        except (ValueError, OSError, tf.errors.OpError):
            continue
        if isinstance(man, dict) and man.get("format") == MANIFEST_FORMAT:
            files += [fileio.join(directory, name) for name in man.get("shards", [])]
    if not files:
        raise ValueError(
            f"{directory!r} is a directory without a shard manifest (the "
            f"<prefix>.json that kd_jax.data.make_shards writes); name its shards "
            f"with a glob instead, e.g. {fileio.join(directory, '*.tfrecord')!r}"
        )
    return files


def list_shard_files(file_pattern: PathPattern) -> list[str]:
    """Sorted, de-duplicated pool files: a directory written by :func:`write_shards` (its
    manifest lists the shards), a glob, or a list of those.

    Every reader opens a pool through this. A glob may also catch files that are not shards
    (e.g. the manifest itself): each pass over the pool reads them like a damaged shard and
    skips them with a warning naming the file. Raises ValueError naming the pattern when
    nothing matches.
    """
    if isinstance(file_pattern, (str, os.PathLike)):
        patterns = [file_pattern]
    else:
        patterns = list(file_pattern)
    if not patterns:
        raise ValueError("No file pattern given (an empty list)")
    files = set()
    for p in patterns:
        p = os.fspath(p)
        if p and fileio.isdir(p):
            files.update(_manifest_shards(p))
            continue
        matched = fileio.glob(p) if p else []
        if not matched:
            raise ValueError(f"No files match the pattern {p!r}")
        files.update(matched)
    return sorted(files)


def image_shape(file_pattern: PathPattern) -> tuple[int, int, int] | None:
    """The (H, W, C) of every image in the pool when its manifests say so, else None."""
    files = list_shard_files(file_pattern)
    known = _manifest_index(files)
    shapes = {tuple(known[f][1]) if f in known and known[f][1] else None for f in files}
    return shapes.pop() if len(shapes) == 1 and None not in shapes else None


def process_files(
    file_pattern: PathPattern, process_index: int = 0, process_count: int = 1
) -> list[str]:
    """This process's files: sorted matches ``[process_index::process_count]``."""
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} is not in [0, process_count={process_count})"
        )
    files = list_shard_files(file_pattern)
    if len(files) < process_count:
        raise ValueError(
            f"{len(files)} file(s) match {file_pattern!r} but there are {process_count} "
            f"processes: file-level sharding needs at least one file per process. Rewrite the "
            f"shards with --num_shards >= {process_count} (a multiple of it keeps the shares "
            f"balanced)"
        )
    return files[process_index::process_count]


@dataclasses.dataclass
class ReadStats:
    """Corrupt records skipped by :func:`read_shards` datasets (thread-safe counter)."""

    skipped: int = 0
    by_file: dict = dataclasses.field(default_factory=dict)
    _lock: Any = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, filename: str, n: int) -> None:
        with self._lock:
            self.skipped += n
            self.by_file[filename] = self.by_file.get(filename, 0) + n


#: Corrupt records skipped by every reader in this process (each also counts in its ``stats``).
TOTAL_SKIPPED = ReadStats()

_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "id": tf.io.FixedLenFeature([], tf.int64),
    "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    "source": tf.io.FixedLenFeature([], tf.string, default_value=""),
}


def read_shards(
    file_pattern: PathPattern,
    *,
    process_index: int = 0,
    process_count: int = 1,
    shuffle_files: bool = False,
    seed: int = 0,
    num_parallel: int = tf.data.AUTOTUNE,
    cycle_length: int | None = None,
    on_corrupt: str = "skip",
    channels: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    keep_id_fn: KeepIdFn | None = None,
    stats: ReadStats | None = None,
    decode: bool = True,
) -> tf.data.Dataset:
    """Streams this process's share of TFRecord image shards.

    list files (sorted) → keep files ``process_index::process_count`` → (shuffle the files) →
    interleave → parse → (keep_id_fn) → decode (→ resize).

    Args:
      file_pattern: a glob such as ``dir/pool-*.tfrecord``, or a list of globs / paths.
      process_index, process_count: this process's share (``jax.process_index()``,
        ``jax.process_count()``); shares are disjoint and together complete. The split is by
        file, so at least ``process_count`` files are needed.
      shuffle_files: shuffle this process's file order (deterministic for ``seed``, reshuffled
        on each repetition). Without it the record order is deterministic.
      num_parallel: parallelism of interleave and decode.
      cycle_length: files read concurrently (default ``min(#files, 16)``).
      on_corrupt: "skip" drops a corrupt record, counts it (``stats``, ``TOTAL_SKIPPED``) and
        logs a warning naming the file; "fail" raises ``tf.errors.InvalidArgumentError`` naming
        the file during iteration.
      channels: decode to this many channels (1 gray, 3 RGB); default: the channel count in the
        shards' manifest, else as stored (then unknown statically).
      image_size: resize to ``(H, W)`` (or ``H`` for square) after decoding; stays uint8.
      keep_id_fn: ``id (int64 scalar tensor) -> bool tensor``; records it rejects are dropped
        before their image is decoded (a pool selection by id).
      stats: a :class:`ReadStats` that counts the records this dataset skipped.
      decode: False skips image decoding (``image`` is then a 1x1 placeholder): the id and
        count passes read the files through the same checks as training.

    Returns:
      ``tf.data.Dataset`` of ``{"image": uint8 [H,W,C], "id": int64, "label": int64 (-1 =
      unlabeled), "source": tf.string}``.
    """
    if on_corrupt not in ("skip", "fail"):
        raise ValueError(f"on_corrupt must be 'skip' or 'fail', got {on_corrupt!r}")
    mine = process_files(file_pattern, process_index, process_count)
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    static_hw = None
    known = _manifest_index(mine)
    if all(f in known for f in mine):
        shapes = {tuple(known[f][1]) if known[f][1] else None for f in mine}
        if len(shapes) == 1 and None not in shapes:
            (shape,) = shapes
            if channels is None:
                channels = shape[2]
            static_hw = shape[:2]
    sinks = [TOTAL_SKIPPED] + ([stats] if stats is not None else [])

    def report(filename, gap, first_bad):
        filename = filename.numpy().decode("utf-8")
        gap, first_bad = int(gap.numpy()), int(first_bad.numpy())
        for s in sinks:
            s.add(filename, gap)
        log.warning(
            "read_shards: skipped %d corrupt record(s) in %s (from record #%d of that "
            "file); %d skipped so far in this process",
            gap,
            filename,
            first_bad,
            TOTAL_SKIPPED.skipped,
        )
        return np.int64(0)

    c_out = (channels or 1) if decode else 1
    if not decode:
        image_size = static_hw = None

    def dummy_image():
        # Same static shape as a decoded image where that is known, so tf.cond keeps it.
        return tf.zeros([*(image_size or static_hw or (1, 1)), c_out], tf.uint8)

    def decode_image(encoded):
        img = tf.io.decode_image(
            encoded, channels=channels or 0, dtype=tf.uint8, expand_animations=False
        )
        if static_hw is not None:
            img = tf.ensure_shape(img, [*static_hw, None])
        if image_size is not None:
            img = tf.image.resize(img, image_size, antialias=True)
            img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
        return img

    @_no_autograph
    def parse_decode(idx, record, is_end):
        def real():
            ex = tf.io.parse_single_example(record, _FEATURES)
            keep = (
                tf.constant(True)
                if keep_id_fn is None
                else tf.reshape(tf.cast(keep_id_fn(ex["id"]), tf.bool), [])
            )
            img = (
                tf.cond(keep, lambda: decode_image(ex["image"]), dummy_image)
                if decode
                else dummy_image()
            )
            return img, ex["id"], ex["label"], ex["source"], keep

        def end():
            return (
                dummy_image(),
                tf.constant(-1, tf.int64),
                tf.constant(-1, tf.int64),
                tf.constant(""),
                tf.constant(False),
            )

        img, id_, label, source, keep = tf.cond(is_end, end, real)
        return {
            "image": img,
            "id": id_,
            "label": label,
            "source": source,
            "_idx": idx,
            "_keep": keep,
            "_end": is_end,
        }

    @_no_autograph
    def one_file(filename, manifest_count):
        # Every record carries its index in the file, and an end marker follows the last one.
        # ignore_errors drops what fails to parse or decode, so each dropped record leaves a gap
        # in the indices: the scan measures the gaps exactly, the end marker exposes trailing
        # ones. A damaged record frame ends the file's stream (the enumerate zip loses one index
        # with it) and a truncated file just ends early, so at the end marker the records the
        # manifest promises but the file did not deliver count as well. Only a gap calls back
        # into Python.
        recs = tf.data.TFRecordDataset(filename).map(
            _no_autograph(lambda r: (r, tf.constant(False)))
        )
        recs = recs.concatenate(tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(True))))
        ds = recs.enumerate().map(
            _no_autograph(lambda i, x: parse_decode(i, x[0], x[1])),
            num_parallel_calls=num_parallel,
            deterministic=True,
        )
        ds = ds.ignore_errors()

        @_no_autograph
        def step(expected, ex):
            idx = ex["_idx"]
            missing = tf.where(
                ex["_end"], tf.maximum(manifest_count - idx, 0), tf.constant(0, tf.int64)
            )
            return idx + 1, (ex, idx - expected + missing, expected)

        ds = ds.scan(tf.constant(0, tf.int64), step)

        @_no_autograph
        def keep(ex, gap, first_bad):
            if on_corrupt == "fail":
                noted = tf.debugging.Assert(
                    tf.equal(gap, 0),
                    [
                        "kd_jax.data.shards.read_shards: corrupt record(s) in file",
                        filename,
                        "from record #",
                        first_bad,
                        "count",
                        gap,
                        "(on_corrupt='skip' skips and counts them)",
                    ],
                )
            else:
                noted = tf.cond(
                    gap > 0,
                    lambda: tf.py_function(report, [filename, gap, first_bad], tf.int64),
                    lambda: tf.constant(0, tf.int64),
                )
            with tf.control_dependencies([noted]):
                return tf.logical_and(ex["_keep"], tf.logical_not(ex["_end"]))

        ds = ds.filter(keep)
        return ds.map(
            _no_autograph(lambda ex, gap, first: {k: v for k, v in ex.items() if k[0] != "_"})
        )

    # Records each file should hold (-1: unknown, no manifest lists it).
    expected = np.array([known[f][0] if f in known else -1 for f in mine], np.int64)
    files_ds = tf.data.Dataset.from_tensor_slices((mine, expected))
    if shuffle_files:
        files_ds = files_ds.shuffle(len(mine), seed=seed, reshuffle_each_iteration=True)
    return files_ds.interleave(
        one_file,
        cycle_length=cycle_length or min(len(mine), 16),
        block_length=1,
        num_parallel_calls=num_parallel,
        deterministic=True,
    )


def _id_dataset(
    file_pattern: PathPattern,
    process_index: int = 0,
    process_count: int = 1,
    keep_id_fn: KeepIdFn | None = None,
) -> tf.data.Dataset:
    """ids of this process's records (no image decoding), with the corrupt-record handling of
    :func:`read_shards`: what training skips, the id and count passes skip too."""
    return read_shards(
        file_pattern,
        process_index=process_index,
        process_count=process_count,
        keep_id_fn=keep_id_fn,
        decode=False,
    ).map(lambda e: e["id"])


def read_ids(
    file_pattern: PathPattern, *, process_index: int = 0, process_count: int = 1
) -> np.ndarray:
    """int64 ids of this process's records, in reading order (no image decoding)."""
    ids = _id_dataset(file_pattern, process_index, process_count).batch(65536)
    parts = [b for b in ids.as_numpy_iterator()]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0,), np.int64)


def count_ids(
    file_pattern: PathPattern,
    *,
    process_index: int = 0,
    process_count: int = 1,
    keep_id_fn: KeepIdFn | None = None,
) -> int:
    """Records in this process's share (that ``keep_id_fn`` keeps, when given).

    Without ``keep_id_fn`` this reads the manifests when they cover the files (no record I/O).
    """
    files = process_files(file_pattern, process_index, process_count)
    if keep_id_fn is None:
        return count_records(files)
    ds = _id_dataset(files, keep_id_fn=keep_id_fn)
    return int(ds.reduce(np.int64(0), lambda c, _: c + 1).numpy())


def count_records(file_pattern: PathPattern, *, use_manifest: bool = True) -> int:
    """Number of readable records in the files matching ``file_pattern`` (all processes).

    Files listed in a manifest written by :func:`write_shards` count as it says; the others are
    read (a damaged or foreign file skipped with a warning naming it, as in training).
    """
    files = list_shard_files(file_pattern)
    known = _manifest_index(files) if use_manifest else {}
    listed = sum(known[f][0] for f in files if f in known and known[f][2])
    unlisted = [f for f in files if f not in known or not known[f][2]]
    if not unlisted:
        return listed
    ds = _id_dataset(unlisted)
    return listed + int(ds.reduce(np.int64(0), lambda c, _: c + 1).numpy())


# ---------------------------------------------------------------------------------------------
# A small source interface (room for a random-access backend later)
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class PoolSource(Protocol):
    """What a method needs from an unlabeled pool.

    ``len(source)`` items with stable integer ids; ``ids()`` lists them; ``stream(...)`` yields
    this process's share as ``{image, id, label, source}`` dicts (one pass, e.g. scoring), with
    an optional ``keep_id_fn`` to read back a selection. A random-access backend (ArrayRecord +
    Grain) would add ``__getitem__(ids)`` and implement the same methods.
    """

    def __len__(self) -> int: ...

    def ids(self) -> np.ndarray: ...

    def stream(
        self,
        *,
        process_index: int = 0,
        process_count: int = 1,
        shuffle_files: bool = False,
        seed: int = 0,
        keep_id_fn: KeepIdFn | None = None,
    ) -> tf.data.Dataset: ...


class TFRecordPool:
    """:class:`PoolSource` over TFRecord shards (streaming only)."""

    def __init__(self, file_pattern: PathPattern, **read_kwargs):
        self.files = list_shard_files(file_pattern)
        self.read_kwargs = read_kwargs
        self._len: int | None = None

    def __len__(self) -> int:
        if self._len is None:
            self._len = count_records(self.files)
        return self._len

    def ids(self) -> np.ndarray:
        return np.sort(read_ids(self.files))

    def stream(
        self,
        *,
        process_index: int = 0,
        process_count: int = 1,
        shuffle_files: bool = False,
        seed: int = 0,
        keep_id_fn: KeepIdFn | None = None,
    ) -> tf.data.Dataset:
        return read_shards(
            self.files,
            process_index=process_index,
            process_count=process_count,
            shuffle_files=shuffle_files,
            seed=seed,
            keep_id_fn=keep_id_fn,
            **self.read_kwargs,
        )


def iter_numpy(ds: tf.data.Dataset) -> Iterator[dict]:
    """Iterates a :func:`read_shards` dataset as numpy dicts, ``source`` decoded to str."""
    for ex in ds.as_numpy_iterator():
        ex = dict(ex)
        ex["source"] = ex["source"].decode("utf-8")
        yield ex
