"""Writes an image folder or an ``.npz`` as TFRecord shards (see ``kd_jax.data.shards``).

    python -m kd_jax.data.make_shards --src=PATH --out=DIR [--num_shards=8] [--prefix=pool]
        [--image_size=H | HxW] [--format=png|jpeg] [--channels=1|3] [--labels_from_folders]
        [--overwrite]

``PATH`` is either

* an image folder, searched recursively (png, jpg/jpeg, bmp, gif, tif/tiff, webp, ppm/pgm). Files
  are taken in sorted relative-path order, which fixes their ids ``0..N-1``. The relative
  folder of a file becomes its ``source`` tag (``""`` for files directly in PATH). With
  ``--labels_from_folders`` the first-level subfolder is the class: ``PATH/<class_name>/...`` →
  label = index of ``class_name`` among the sorted class names (stored in the manifest as
  ``metadata.class_names``). Images are converted to ``--channels`` (default: 1 when every file
  is grayscale, else 3) and resized to ``--image_size`` when given.
* an ``.npz`` with ``images`` uint8 ``[N,H,W]`` or ``[N,H,W,C]`` and optionally ``labels`` ``[N]``
  ints, ``source`` (or ``sources``) ``[N]`` strings and ``ids`` ``[N]`` unique ints.

It prints what it wrote and leaves ``DIR/<prefix>.json`` (count, shards, image shape, sources,
labels). Shards are written under temporary names and renamed when complete. A run reads the
pool as ``--config.data.transfer.pattern=DIR`` (the manifest lists the shards) or a glob.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from kd_jax import fileio

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
)
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F", "P-gray")


class InputError(ValueError):
    """Bad input to the shard writer (message names the file / key and the problem)."""


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None or text == "":
        return None
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise InputError(f"--image_size={text!r}: expected H or HxW (e.g. 28 or 32x48)") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise InputError(f"--image_size={text!r}: expected H or HxW with positive sizes")
    return parts[0], parts[1]


def _resize(img: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 [H,W,C] → [size[0], size[1], C] (Lanczos, antialiased); unchanged when no size."""
    if size is None or img.shape[:2] == tuple(size):
        return img
    from PIL import Image

    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    out = np.asarray(pil.resize((size[1], size[0]), Image.LANCZOS))
    return out[..., None] if out.ndim == 2 else out


# ---------------------------------------------------------------------------------------------
# npz input
# ---------------------------------------------------------------------------------------------


class _ResizedArray:
    """Lazy ``images[i]`` resized on access (keeps memory flat for big arrays)."""

    def __init__(self, images, size):
        self.images, self.size = images, size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return _resize(self.images[i], self.size)


def load_npz(path: str) -> dict:
    """Reads and checks an ``.npz``; InputError naming the file and key on any problem."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip / not an npz
        raise InputError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e
    with z:
        keys = sorted(z.files)
        if "images" not in z.files:
            raise InputError(
                f"{path}: missing key 'images' (keys present: {keys}); expected "
                f"'images' uint8 [N,H,W] or [N,H,W,C]"
            )
        images = z["images"]
        if images.dtype != np.uint8:
            raise InputError(
                f"{path}: key 'images' has dtype {images.dtype}; expected uint8 "
                f"(0..255). Convert first, e.g. (x * 255).round().astype(np.uint8)"
            )
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.shape[0] == 0:
            raise InputError(
                f"{path}: key 'images' has shape {z['images'].shape}; expected "
                f"[N,H,W] or [N,H,W,C] with N > 0 and C in (1, 3, 4)"
            )
        n = images.shape[0]
        out = {"images": images, "labels": None, "sources": None, "ids": None}
        if "labels" in z.files:
            labels = z["labels"]
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
                raise InputError(
                    f"{path}: key 'labels' has dtype {labels.dtype} shape "
                    f"{labels.shape}; expected integers of shape [{n}]"
                )
            out["labels"] = labels.astype(np.int64)
        skey = "source" if "source" in z.files else ("sources" if "sources" in z.files else None)
        if skey:
            src = z[skey]
            if src.shape != (n,) or src.dtype.kind not in "US":
                raise InputError(
                    f"{path}: key '{skey}' has dtype {src.dtype} shape {src.shape}; "
                    f"expected strings of shape [{n}]"
                )
            out["sources"] = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in src]
        if "ids" in z.files:
            ids = z["ids"]
            if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
                raise InputError(
                    f"{path}: key 'ids' has dtype {ids.dtype} shape {ids.shape}; "
                    f"expected integers of shape [{n}]"
                )
            if len(np.unique(ids)) != n:
                raise InputError(f"{path}: key 'ids' holds duplicates; ids must be unique")
            out["ids"] = ids.astype(np.int64)
    return out


# ---------------------------------------------------------------------------------------------
# Image-folder input
# ---------------------------------------------------------------------------------------------


class _FolderImages:
    """Lazy ``[i] -> uint8 [H,W,C]`` over image files (converted / resized on access)."""

    def __init__(self, files, channels, size):
        self.files, self.channels, self.size = files, channels, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as e:
            raise InputError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
        if arr.ndim == 2:
            arr = arr[..., None]
        return _resize(arr, self.size)


def scan_folder(root: str, labels_from_folders: bool = False) -> dict:
    """Lists image files under ``root`` (sorted) with source tags and optional labels."""
    if not os.path.isdir(root):
        raise InputError(f"{root}: not a directory")
    rel_files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                rel_files.append(os.path.relpath(os.path.join(dirpath, f), root))
    rel_files.sort(key=lambda p: p.replace(os.sep, "/"))
    if not rel_files:
        raise InputError(
            f"{root}: no image files found (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    sources = [os.path.dirname(p).replace(os.sep, "/") for p in rel_files]
    out = {
        "files": [os.path.join(root, p) for p in rel_files],
        "sources": sources,
        "labels": None,
        "class_names": None,
    }
    if labels_from_folders:
        at_root = [p for p in rel_files if os.sep not in p]
        if at_root:
            raise InputError(
                f"{os.path.join(root, at_root[0])}: --labels_from_folders needs "
                f"every image inside a class folder ({root}/<class_name>/...), "
                f"but {len(at_root)} file(s) sit directly in {root}"
            )
        top = [p.split(os.sep, 1)[0] for p in rel_files]
        class_names = sorted(set(top))
        index = {c: k for k, c in enumerate(class_names)}
        out["labels"] = np.array([index[t] for t in top], np.int64)
        out["class_names"] = class_names
    return out


def _folder_channels(files: Sequence[str]) -> int:
    """1 when every file is grayscale (header only, no decoding), else 3."""
    from PIL import Image

    for path in files:
        try:
            with Image.open(path) as im:
                mode = im.mode
                if mode == "P":  # a palette may still be gray
                    pal = im.getpalette() or []
                    rgb = np.array(pal[: 3 * (len(pal) // 3)]).reshape(-1, 3)
                    mode = "P-gray" if (rgb == rgb[:, :1]).all() else "P"
        except Exception as e:
            raise InputError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
        if mode not in _GRAY_MODES:
            return 3
    return 1


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def make_shards(
    src: str,
    out: str,
    *,
    num_shards: int = 8,
    prefix: str = "pool",
    image_size=None,
    image_format: str = "png",
    channels: int | None = None,
    labels_from_folders: bool = False,
    overwrite: bool = False,
) -> dict:
    """Library form of the CLI; returns the manifest. Raises InputError on bad input."""
    if image_size is None or isinstance(image_size, str):
        size = _parse_size(image_size)
    elif np.isscalar(image_size):
        size = (int(image_size), int(image_size))
    else:
        size = tuple(int(v) for v in image_size)
    if channels not in (None, 1, 3):
        raise InputError(f"--channels={channels}: expected 1 or 3")
    if not os.path.exists(src):
        raise InputError(f"{src}: no such file or directory")
    metadata = {"src": os.path.abspath(src)}
    if os.path.isdir(src):
        found = scan_folder(src, labels_from_folders)
        ch = channels or _folder_channels(found["files"])
        images = _FolderImages(found["files"], ch, size)
        labels, sources, ids = found["labels"], found["sources"], None
        if found["class_names"] is not None:
            metadata["class_names"] = found["class_names"]
    else:
        if not src.lower().endswith(".npz"):
            raise InputError(f"{src}: expected an image folder or a .npz file")
        if labels_from_folders:
            raise InputError(
                f"{src}: --labels_from_folders applies to image folders only; an "
                f".npz carries its labels in the key 'labels'"
            )
        d = load_npz(src)
        images = d["images"]
        if channels is not None and channels != images.shape[-1]:
            raise InputError(
                f"{src}: key 'images' has {images.shape[-1]} channel(s) but "
                f"--channels={channels}; convert the array first"
            )
        if size is not None:
            images = _ResizedArray(images, size)
        labels, sources, ids = d["labels"], d["sources"], d["ids"]
    from kd_jax.data import shards  # TensorFlow is imported only once the input looks sane

    try:
        return shards.write_shards(
            out,
            images,
            labels=labels,
            sources=sources,
            ids=ids,
            num_shards=num_shards,
            prefix=prefix,
            image_format=image_format,
            overwrite=overwrite,
            metadata=metadata,
        )
    except InputError:
        raise
    except (FileExistsError, ValueError, TypeError) as e:
        raise InputError(f"{src}: {e}") from e


def describe(manifest: dict, out: str) -> str:
    """The human summary printed by the CLI."""
    shape = manifest["image_shape"]
    shape_s = "x".join(map(str, shape)) if shape else "variable (no --image_size)"
    names = manifest["shards"]
    files = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"
    srcs = ", ".join(f"{k or '<none>'}={v}" for k, v in sorted(manifest["sources"].items()))
    lines = [
        f"wrote {manifest['count']:,} images to {manifest['num_shards']} shard(s) in {out}: "
        f"{files}",
        f"  image shape {shape_s}, format {manifest['image_format']}, ids "
        f"{manifest['id_min']}..{manifest['id_max']}",
        f"  sources: {srcs}",
    ]
    if manifest["has_labels"]:
        lines.append(
            f"  labels: {manifest['num_labeled']:,} labeled, "
            f"{len(manifest['label_counts'])} classes"
        )
        names = manifest.get("metadata", {}).get("class_names")
        if names:
            lines.append(f"  classes: {', '.join(f'{i}={c}' for i, c in enumerate(names))}")
    else:
        lines.append("  labels: none (stored as -1)")
    lines.append(f"  manifest: {fileio.join(out, manifest['prefix'] + '.json')}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kd_jax.data.make_shards",
        description="Write an image folder or an .npz as TFRecord shards plus a JSON manifest.",
    )
    p.add_argument("--src", required=True, help="image folder (recursive) or .npz file")
    p.add_argument("--out", required=True, help="output directory (local or gs://)")
    p.add_argument("--num_shards", type=int, default=8, help="number of shard files (default 8)")
    p.add_argument("--prefix", default="pool", help="file-name prefix (default pool)")
    p.add_argument("--image_size", default=None, help="resize to H (square) or HxW")
    p.add_argument(
        "--format",
        dest="image_format",
        choices=("png", "jpeg"),
        default="png",
        help="encoding (png is lossless; default png)",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="folder images as gray (1) or RGB (3); default: 1 if all are gray",
    )
    p.add_argument(
        "--labels_from_folders",
        action="store_true",
        help="label = index of the first-level subfolder among sorted class names",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace shards already written with this prefix in --out",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        manifest = make_shards(
            args.src,
            args.out,
            num_shards=args.num_shards,
            prefix=args.prefix,
            image_size=args.image_size,
            image_format=args.image_format,
            channels=args.channels,
            labels_from_folders=args.labels_from_folders,
            overwrite=args.overwrite,
        )
    except InputError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(describe(manifest, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
