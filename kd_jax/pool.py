"""Open-world pools: the one place that picks transfer images from a pool.

A selection is a set of pool ids (plus, for score-based rules, the teacher class and score of
each). It is computed once, written atomically to `workdir/selection.npz`, and reused when a run
resumes, so a restarted job trains on exactly the same images.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np


@dataclasses.dataclass
class Selection:
    ids: np.ndarray                      # [N] int64 pool ids
    classes: np.ndarray | None = None    # [N] teacher-assigned class
    scores: np.ndarray | None = None     # [N] selection score (higher = more wanted)

    def save(self, path: str) -> None:
        arrays = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # atomic: a killed run never leaves half a selection

    @classmethod
    def load(cls, path: str) -> "Selection":
        with np.load(path) as z:
            return cls(**{k: z[k] for k in z.files})


def pool_pattern(spec) -> str:
    """The TFRecord file pattern of a pool spec (`shards` or the bundled `offline_pool`)."""
    if spec.source == "offline_pool":
        from kd_jax.data import offline
        return offline.ensure_offline_pool_shards(cache_dir=spec.get("cache_dir") or None)
    if spec.source == "shards":
        if not spec.get("pattern"):
            raise ValueError("config.data.transfer.pattern must name the pool's TFRecord shards")
        return spec.pattern
    raise ValueError(f"config.data.transfer.source={spec.source!r} is not a pool "
                     f"(use shards or offline_pool)")


def all_ids(spec) -> np.ndarray:
    """Every id of the pool (an id-only parse, no image decoding), sorted."""
    from kd_jax.data import shards
    return np.sort(shards.read_ids(pool_pattern(spec)))


def random_subset(workdir: str, spec, size: int, seed: int) -> Selection:
    """N pool images drawn uniformly without replacement (the "random unlabeled data" baseline)."""
    path = os.path.join(workdir, "selection.npz")
    if os.path.exists(path):
        return Selection.load(path)
    ids = all_ids(spec)
    if not 0 < size <= len(ids):
        raise ValueError(f"config.data.transfer.subset_size={size} must be in [1, {len(ids)}] "
                         f"(the pool holds {len(ids)} images)")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(ids, size=size, replace=False))
    selection = Selection(ids=chosen)
    import jax
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        selection.save(path)
    return selection
