"""Open-world pools: the one place that picks transfer images from a pool.

A selection is a set of pool ids (plus, for score-based rules, the teacher class and score of
each). It is computed once, written atomically to `workdir/selection.npz`, and reused when a run
resumes, so a restarted job trains on exactly the same images.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from kd_jax import fileio


@dataclasses.dataclass
class Selection:
    ids: np.ndarray                      # [N] int64 pool ids
    classes: np.ndarray | None = None    # [N] teacher-assigned class
    scores: np.ndarray | None = None     # [N] selection score (higher = more wanted)

    def save(self, path: str) -> None:
        """Atomically (a killed run never leaves half a file under `path`), local or gs://."""
        fileio.save_npz_atomic(path, {k: v for k, v in dataclasses.asdict(self).items()
                                      if v is not None})

    @classmethod
    def load(cls, path: str) -> "Selection":
        return cls(**fileio.load_npz(path))


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
    path = fileio.join(workdir, "selection.npz")
    if fileio.exists(path):
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
        selection.save(path)
    return selection


# ---------------------------------------------------------------------------------------------
# The streamed teacher pass: one scorer for every selection rule (EIKD, DFND, ODSD's APS)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PoolScores:
    """Per-item teacher statistics over a whole pool (O(M) scalars) plus, when asked for, a
    bounded per-class candidate set with features (O(C·L·d), independent of the pool size)."""
    ids: np.ndarray          # [M] int64
    pred: np.ndarray         # [M] teacher argmax
    confidence: np.ndarray   # [M] max_c p_T(c|x)
    entropy: np.ndarray      # [M] H(p_T)
    energy: np.ndarray       # [M] logsumexp(z_T)
    margin: np.ndarray       # [M] p_1 - p_2
    sources: np.ndarray      # [M] source tag (diagnostics only; no selection rule reads it)
    cand_ids: np.ndarray     # [K] candidate ids (per-class top-L by confidence)
    cand_class: np.ndarray   # [K] their teacher class
    cand_feat: np.ndarray    # [K, d] L2-normalised teacher penultimate features (float16)
    cand_logp: np.ndarray    # [K] log p_T(class|x)

    _SCALARS = ("ids", "pred", "confidence", "entropy", "energy", "margin", "sources")

    def score(self, kind: str) -> np.ndarray:
        """Score per item, higher = more wanted (kd_jax.sampling's sign convention)."""
        return {"confidence": self.confidence, "entropy": -self.entropy,
                "energy": self.energy, "margin": self.margin}[kind]


def _teacher_stats_fn(apply_fn, heap_size: int, num_classes: int):
    import jax
    import jax.numpy as jnp
    from kd_jax import sampling

    def stats(variables, images, ids, mask, heaps):
        logits, feats = apply_fn(variables, images, train=False)
        logits = logits.astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        p = jnp.exp(logp)
        top2 = jax.lax.top_k(p, 2)[0]
        out = {"pred": jnp.argmax(logits, -1).astype(jnp.int32), "confidence": top2[:, 0],
               "entropy": -jnp.sum(p * logp, -1), "energy": jax.nn.logsumexp(logits, -1),
               "margin": top2[:, 0] - top2[:, 1]}
        if heap_size:
            f = feats["pre_logits"].astype(jnp.float32)
            f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
            payload = {"feat": f.astype(jnp.float16), "logp": jnp.log(out["confidence"])}
            heaps = sampling.merge_class_top_k(heaps, out["confidence"], out["pred"], ids,
                                               payload=payload, mask=mask > 0)
        return out, heaps

    return stats


def score_pool(workdir: str, spec, *, teacher_model, teacher_vars, domain, num_classes: int,
               batch_size: int, heap_size: int = 0) -> PoolScores:
    """One streamed teacher pass over this host's pool shards, resumable shard by shard.

    Each host scores its own files on its *local* devices (scoring needs no cross-host
    collective), writing `workdir/pool_scores/<shard>.npz` after every shard, so a killed pass
    resumes at the first unscored shard. Then every host reads all shard files and merges them
    into the same `PoolScores`. `heap_size` = L > 0 also keeps, per teacher class, the L most
    confident items with their features (ODSD's candidates); memory stays O(C·L·d).
    """
    import jax
    import jax.numpy as jnp
    import tensorflow as tf
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from kd_jax import inference, sampling
    from kd_jax.data import pipeline, shards

    pattern = pool_pattern(spec)
    out_dir = fileio.join(workdir, "pool_scores")
    local_mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
    local_batch = -(-batch_size // len(jax.local_devices())) * len(jax.local_devices())
    variables = jax.device_put(jax.tree.map(np.asarray, teacher_vars),
                               NamedSharding(local_mesh, P()))
    d = teacher_model.apply(jax.tree.map(np.asarray, teacher_vars),
                            np.zeros((1, domain.image_size, domain.image_size, domain.channels),
                                     np.float32), train=False)[1]["pre_logits"].shape[-1]
    spec_payload = {"feat": jax.ShapeDtypeStruct((d,), jnp.float16),
                    "logp": jax.ShapeDtypeStruct((), jnp.float32)}
    stats_fn = _teacher_stats_fn(teacher_model.apply, heap_size, num_classes)
    stats = inference.BatchedApply(
        lambda v, b, heaps: stats_fn(v, b["image"], b["id"], b["mask"], heaps), local_mesh,
        carry=True)

    t0, scored = time.perf_counter(), 0
    for path in shards.process_files(pattern, jax.process_index(), jax.process_count()):
        done = fileio.join(out_dir, fileio.basename(path) + ".npz")
        if fileio.exists(done):
            continue
        ds = shards.read_shards(path).map(
            lambda e: {"image": pipeline.preprocess(e, domain, "none"), "id": e["id"],
                       "source": e["source"], "mask": tf.constant(1.0)},
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.padded_batch(local_batch, padding_values={
            "image": 0.0, "id": np.int64(-1), "source": "", "mask": 0.0})
        heaps = sampling.init_class_top_k(num_classes, max(heap_size, 1), spec_payload) \
            if heap_size else None
        rows, heaps = stats.gather(variables, batches=ds, keep=("id", "source"),
                                   pad_to=local_batch, carry=heaps)
        record = {}
        if rows:
            record = {"ids": rows.pop("id"), "sources": rows.pop("source").astype(str), **rows}
        if heap_size:
            s, ids, cls, payload, valid = jax.device_get(sampling.flatten_class_top_k(heaps))
            record.update(cand_ids=ids[valid].astype(np.int64), cand_class=cls[valid],
                          cand_feat=payload["feat"][valid], cand_logp=payload["logp"][valid],
                          cand_score=s[valid])
        fileio.save_npz_atomic(done, record)  # a shard counts as scored only once its file is complete
        scored += len(record.get("ids", ()))
    if scored:
        seconds = time.perf_counter() - t0
        print(f"[pool] process {jax.process_index()}: scored {scored} images in {seconds:.1f}s "
              f"({scored / seconds:.0f} images/s, teacher pass + scores + heaps)", flush=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("kd_jax_pool_scored")
    return _merge_scored_shards(pattern, out_dir, num_classes, heap_size)


def _merge_scored_shards(pattern, out_dir, num_classes, heap_size) -> PoolScores:
    """Reads the shard results one file at a time: the per-item scalars are O(M), and the
    candidates are reduced to the per-class top-L after each file, so memory holds at most
    2·C·L feature rows however many shards (≈ pool size / shard size) there are."""
    from kd_jax.data import shards
    files = [fileio.join(out_dir, fileio.basename(p) + ".npz")
             for p in shards.list_shard_files(pattern)]
    cand_keys = ("cand_ids", "cand_class", "cand_feat", "cand_logp", "cand_score")
    parts = {k: [] for k in PoolScores._SCALARS}
    cand = None
    for f in files:
        z = fileio.load_npz(f)
        for k in PoolScores._SCALARS:
            if k in z:
                parts[k].append(z[k])
        if heap_size and "cand_ids" in z:
            new = {k: z[k] for k in cand_keys}
            cand = new if cand is None else {k: np.concatenate([cand[k], new[k]])
                                             for k in cand_keys}
            cand = _class_top(cand, num_classes, heap_size)
    cat = lambda k: np.concatenate(parts[k]) if parts[k] else np.zeros(0)
    order = np.argsort(cat("ids").astype(np.int64), kind="stable")
    scalars = {k: cat(k)[order] for k in PoolScores._SCALARS}
    if cand is None or not len(cand["cand_ids"]):
        cand = {"cand_ids": np.zeros(0, np.int64), "cand_class": np.zeros(0, np.int32),
                "cand_feat": np.zeros((0, 1), np.float16), "cand_logp": np.zeros(0, np.float32)}
    cand.pop("cand_score", None)
    return PoolScores(**scalars, **cand)


def _class_top(cand: dict, num_classes: int, heap_size: int) -> dict:
    """Per teacher class, the `heap_size` best candidates by (score desc, id asc), in input
    order (so merging file by file keeps the order a one-shot merge gives)."""
    keep = []
    for c in range(num_classes):
        idx = np.flatnonzero(cand["cand_class"] == c)
        rank = np.lexsort((cand["cand_ids"][idx], -cand["cand_score"][idx]))
        keep.append(idx[rank[:heap_size]])
    keep = np.sort(np.concatenate(keep))
    return {k: v[keep] for k, v in cand.items()}
