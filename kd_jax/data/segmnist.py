"""SegMNIST: the offline segmentation benchmark, canvases of real MNIST-5k digits (no download).

Each canvas is 64×64×1 uint8, black, with 1–3 digits (count uniform) pasted at random positions
and scales: a digit's 28×28 image is resized (bilinear) to a side drawn uniformly from
[`MIN_SIDE`, `MAX_SIDE`] = [20, 40] px and placed fully inside the canvas, a new digit avoiding
the boxes of the earlier ones when one of 20 random positions allows (otherwise it overlaps);
pixels combine by maximum. The mask labels a pixel with the digit's class (0..9) where that
digit's resized intensity is ≥ `STROKE` (64), later digits over earlier ones, and
`BACKGROUND` (10) elsewhere: 11 classes. Train canvases draw only from the 4,000 teacher-train
digits of `offline.mnist5k()`, test canvases only from its 1,000 held-out digits (with
replacement); sizes `TRAIN_CANVASES` = 4,000 and `TEST_CANVASES` = 1,000, seeds
`TRAIN_SEED` / `TEST_SEED`, independent of any run seed.

The open-world pool (`build_pool`, shards via `ensure_pool_shards`): `POOL_CANVASES` = 5,000
canvases composed the same way from the bundled pool's 28×28 items (`offline.build_offline_pool`:
other handwriting, printed digits, printed letters, photo crops), each canvas from one pool
source (drawn in proportion to the pool's composition) so it keeps that source tag for
diagnostics; no masks.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from kd_jax.data import offline

CANVAS = 64
MIN_SIDE, MAX_SIDE = 20, 40
MAX_DIGITS = 3
STROKE = 64
BACKGROUND = 10
NUM_CLASSES = 11
TRAIN_CANVASES, TEST_CANVASES, POOL_CANVASES = 4000, 1000, 5000
TRAIN_SEED, TEST_SEED, POOL_SEED = 1, 2, 3
#: Bump when the canvases change (part of the pool cache folder name).
VERSION = 1
POOL_PREFIX = "segmnist_pool"


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    out = Image.fromarray(image).resize((side, side), Image.BILINEAR)
    return np.asarray(out, np.uint8)


def compose(
    items: np.ndarray, labels: np.ndarray | None, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """`count` canvases from 28×28 `items` [M,28,28(,1)] uint8 (drawn with replacement).

    Returns images uint8 [count,64,64,1], masks uint8 [count,64,64] (None without `labels`),
    and the item indices used [count, MAX_DIGITS] (-1 where a canvas has fewer digits)."""
    items = np.asarray(items)
    items = items[..., 0] if items.ndim == 4 else items
    images = np.zeros((count, CANVAS, CANVAS), np.uint8)
    masks = None if labels is None else np.full((count, CANVAS, CANVAS), BACKGROUND, np.uint8)
    used = np.full((count, MAX_DIGITS), -1, np.int64)
    for k in range(count):
        boxes = []
        for j in range(int(rng.integers(1, MAX_DIGITS + 1))):
            i = int(rng.integers(len(items)))
            side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
            digit = _resize(items[i], side)
            for _ in range(20):
                y, x = (int(v) for v in rng.integers(0, CANVAS - side + 1, size=2))
                if all(
                    y >= b[2] or y + side <= b[0] or x >= b[3] or x + side <= b[1] for b in boxes
                ):
                    break
            boxes.append((y, x, y + side, x + side))
            window = images[k, y : y + side, x : x + side]
            np.maximum(window, digit, out=window)
            if masks is not None:
                m = masks[k, y : y + side, x : x + side]
                m[digit >= STROKE] = labels[i]
            used[k, j] = i
    return images[..., None], masks, used


@functools.lru_cache(maxsize=2)
def _canvases(split: str):
    d = offline.mnist5k()
    key = "train" if split == "train" else "test"
    count, seed = (TRAIN_CANVASES, TRAIN_SEED) if key == "train" else (TEST_CANVASES, TEST_SEED)
    images, masks, used = compose(
        d[f"{key}_images"], d[f"{key}_labels"], count, np.random.default_rng(seed)
    )
    for a in (images, masks, used):
        a.setflags(write=False)
    return images, masks, used


def canvases(split: str) -> dict:
    """SegMNIST `split` ("train…" → the train canvases, anything else → test): `images` uint8
    [N,64,64,1], `masks` uint8 [N,64,64] (0..9 digits, 10 background), `digits` [N,3] the
    positions in `mnist5k()[f"{split}_images"]` of the digits used (-1: none)."""
    images, masks, used = _canvases("train" if split.startswith("train") else "test")
    return {"images": images.copy(), "masks": masks.copy(), "digits": used.copy()}


def build_pool(seed: int = POOL_SEED, count: int = POOL_CANVASES, pool_seed: int = 0) -> dict:
    """The canvas pool: `images` uint8 [count,64,64,1] and `sources` [count] str, each canvas
    from items of one source of `offline.build_offline_pool(pool_seed)`."""
    pool = offline.build_offline_pool(pool_seed)
    tags = np.asarray(pool["sources"]).astype(str)
    names, sizes = np.unique(tags, return_counts=True)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    which = rng.choice(len(names), size=count, p=sizes / sizes.sum())
    images = np.zeros((count, CANVAS, CANVAS, 1), np.uint8)
    for n, name in enumerate(names):
        rows = np.flatnonzero(which == n)
        if len(rows):
            images[rows] = compose(pool["images"][tags == name], None, len(rows), rng)[0]
    return {"images": images, "sources": names[which]}


def ensure_pool_shards(
    cache_dir: str | None = None, num_shards: int = 8, count: int = POOL_CANVASES
) -> str:
    """The canvas pool written once as TFRecord shards (source tags kept, labels -1) in the
    offline cache (`offline.ensure_cached_shards`); returns their file pattern. `count` other
    than `POOL_CANVASES`: a pool of that many canvases composed the same way (tests; not a
    prefix of the full pool)."""
    count = int(count)
    if count < 1:
        raise ValueError(f"config.data.transfer.pool_canvases={count} must be > 0 (0 = default)")
    expect = {
        "segmnist_version": VERSION,
        "pool_version": offline.POOL_VERSION,
        "seed": POOL_SEED,
        "count": count,
        "num_shards_requested": int(num_shards),
    }
    digest = hashlib.sha256(repr(sorted(expect.items())).encode()).hexdigest()[:8]
    key = f"{POOL_PREFIX}_v{VERSION}_n{count}_{digest}_shards{num_shards}"

    def build():
        pool = build_pool(count=count)
        return pool["images"], pool["sources"]

    return offline.ensure_cached_shards(key, POOL_PREFIX, expect, build, num_shards, cache_dir)


def pool_pattern(spec) -> str:
    """The shard pattern of a `segmnist_pool` spec: `POOL_CANVASES` canvases, or
    `spec.pool_canvases` when set (> 0)."""
    count = int(spec.get("pool_canvases", 0) or POOL_CANVASES)
    return ensure_pool_shards(spec.get("cache_dir") or None, count=count)


def pool_spec(spec):
    """A transfer spec with `source = segmnist_pool` as the `shards` spec of its cached pool
    (what `kd_jax.pool` reads), whose `related_sources` (the canvases of digits, as the
    bundled pool's) the selection report reads; any other spec unchanged."""
    if spec.get("source") != "segmnist_pool":
        return spec
    resolved = spec.copy_and_resolve_references()
    with resolved.unlocked():  # the command line hands in a locked config
        resolved.source = "shards"
        resolved.pattern = pool_pattern(spec)
        resolved.related_sources = tuple(offline.RELATED_SOURCES)
    return resolved
