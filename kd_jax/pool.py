"""Open-world pools: the one place that picks transfer images from a pool.

Every pool method (ODSD, EIKD, KD on a random subset) goes through `select_transfer_set`: load
`workdir/selection.npz` if it exists (a resumed run trains on exactly the same images), else
score the pool with one streamed teacher pass (`score_pool`), apply the method's selection rule
(`PoolScores -> Selection`) and save the selection atomically; then write one report,
`workdir/selection_report.json` (and `sampling.png`), which results.json carries under
`selection`. `open_transfer_set` reads a selection back for training.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from kd_jax import fileio, log

SELECTION_FILE = "selection.npz"
REPORT_FILE = "selection_report.json"
# Report names of earlier versions, read when an old workdir resumes (ODSD's).
OLD_REPORT_FILES = ("selection_diagnostics.json",)
# A selection is decoded once and served from memory when this host's share fits in this.
CACHE_BYTES = 4 << 30


@dataclasses.dataclass
class Selection:
    ids: np.ndarray  # [N] int64 pool ids
    classes: np.ndarray | None = None  # [N] teacher-assigned class
    scores: np.ndarray | None = None  # [N] selection score (higher = more wanted)

    def save(self, path: str) -> None:
        """Atomically (a killed run never leaves half a file under `path`), local or gs://."""
        fileio.save_npz_atomic(
            path, {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        )

    @classmethod
    def load(cls, path: str) -> Selection:
        return cls(**fileio.load_npz(path))


def pool_pattern(spec) -> str:
    """The pool of a spec: `shards` (spec.pattern: a directory written by make_shards, or a
    glob of TFRecord shards) or the bundled `offline_pool`."""
    if spec.source == "offline_pool":
        from kd_jax.data import offline

        return offline.ensure_offline_pool_shards(cache_dir=spec.get("cache_dir") or None)
    if spec.source == "shards":
        if not spec.get("pattern"):
            raise ValueError(
                "config.data.transfer.pattern must name the pool: the directory "
                "make_shards wrote, or a glob of its TFRecord shards"
            )
        return spec.pattern
    raise ValueError(
        f"config.data.transfer.source={spec.source!r} is not a pool (use shards or offline_pool)"
    )


def lookup(sorted_ids, values, query_ids) -> np.ndarray:
    """values[i] for each query id, given `sorted_ids` (ascending) aligned with `values`."""
    sorted_ids = np.asarray(sorted_ids)
    query_ids = np.asarray(query_ids)
    pos = np.searchsorted(sorted_ids, query_ids)
    if len(query_ids) and (
        pos.max() >= len(sorted_ids) or not np.array_equal(sorted_ids[pos], query_ids)
    ):
        raise KeyError("a selected id is missing from the pool scores")
    return np.asarray(values)[pos]


# ---------------------------------------------------------------------------------------------
# The lifecycle: load or score, select, save, report
# ---------------------------------------------------------------------------------------------


def random_rule(
    size: int, seed: int, size_key: str = "config.data.transfer.subset_size"
) -> Callable[[PoolScores], Selection]:
    """N pool images drawn uniformly without replacement (the "random unlabeled data" baseline),
    with their teacher classes. `size_key` names the config key of N in errors."""

    def rule(scores: PoolScores) -> Selection:
        ids = np.asarray(scores.ids)
        if not 0 < size <= len(ids):
            raise ValueError(
                f"{size_key}={size} must be in [1, {len(ids)}] (the pool holds {len(ids)} images)"
            )
        chosen = np.sort(np.random.default_rng(seed).choice(ids, size=size, replace=False))
        return Selection(ids=chosen, classes=lookup(ids, scores.pred, chosen).astype(np.int32))

    return rule


def select_transfer_set(
    workdir: str,
    spec,
    rule: Callable[[PoolScores], Selection],
    *,
    score_fn: Callable[[], PoolScores],
    num_classes: int,
    rule_name: str,
    report_fn: Callable[[PoolScores, Selection], dict] | None = None,
    plot_title: str | None = None,
) -> tuple[Selection, dict]:
    """The selection of `workdir` and its report: loaded when a run resumes, else made now.

    `score_fn()` runs the (collective, per-shard resumable) teacher pass, so every process calls
    this. A new selection: `rule(scores)`, the report (`diagnostics.selection_report`, the
    pool's teacher-class histogram, `rule_name` and `report_fn(scores, selection)`'s entries)
    and `sampling.png` (when `plot_title` is given) are written by process 0, `selection.npz`
    last, so its presence means the selection is complete. Returns (selection, report); the
    report is {} on the other processes.
    """
    import jax

    path = fileio.join(workdir, SELECTION_FILE)
    resumed = fileio.exists(path)  # a resumed run trains on exactly the same images
    if resumed:
        selection = Selection.load(path)
        report = read_report(workdir)
        if report is not None:
            return selection, report
    scores = score_fn()  # cached per shard, so a resumed run missing its report rescans cheaply
    if not resumed:
        selection = rule(scores)
    report = {}
    if jax.process_index() == 0:
        report = _report(
            workdir, spec, scores, selection, num_classes, rule_name, report_fn, plot_title
        )
        fileio.write_json_atomic(fileio.join(workdir, REPORT_FILE), report)
        if not resumed:
            selection.save(path)
    return selection, report


def read_report(workdir: str) -> dict | None:
    """The saved selection report (under its current or an earlier name), or None."""
    for name in (REPORT_FILE,) + OLD_REPORT_FILES:
        path = fileio.join(workdir, name)
        if fileio.exists(path):
            return fileio.read_json(path)
    return None


def _report(workdir, spec, scores, selection, num_classes, rule_name, report_fn, plot_title):
    from kd_jax import diagnostics

    related = spec.get("related_sources")  # a pool that knows its related sources
    if spec.source == "offline_pool":
        from kd_jax.data import offline

        related = offline.RELATED_SOURCES
    report = diagnostics.selection_report(scores, selection, num_classes, related_sources=related)
    report["rule"] = rule_name
    report["pool_per_class"] = np.bincount(
        np.asarray(scores.pred, np.int64), minlength=num_classes
    )[:num_classes].tolist()
    if report_fn is not None:
        report.update(report_fn(scores, selection))
    if plot_title:
        try:
            diagnostics.plot_selection(
                fileio.join(workdir, "sampling.png"),
                scores,
                selection,
                num_classes=num_classes,
                title=plot_title,
            )
        except Exception as e:  # a figure must never stop a run
            log.info(f"sampling.png not written: {e}", tag="pool")
    return report


def open_transfer_set(spec, ids, process_index: int = 0, process_count: int = 1):
    """(dataset, count) of this host's share of the pool images `ids` (None = the whole pool).

    A selection is decoded once and then served from memory when this host's share fits in
    CACHE_BYTES (fixed-shape pools): otherwise every epoch would re-read the whole pool to find
    it. Caching does not change the order of the elements, only where they come from.
    """
    from kd_jax.data import pipeline, shards

    ds, count = pipeline.open_source(
        spec, spec.get("split", "train"), process_index, process_count, keep_ids=ids
    )
    if ids is not None:
        shape = shards.image_shape(pool_pattern(spec))
        if shape is not None and count * int(np.prod(shape)) <= CACHE_BYTES:
            ds = ds.cache()
    return ds, count


# ---------------------------------------------------------------------------------------------
# The streamed teacher pass: one scorer for every selection rule (EIKD, DFND, ODSD's APS)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PoolScores:
    """Per-item teacher statistics over a whole pool (O(M) scalars) plus, when asked for, a
    bounded per-class candidate set with features (O(C·L·d), independent of the pool size)."""

    ids: np.ndarray  # [M] int64
    pred: np.ndarray  # [M] teacher argmax
    confidence: np.ndarray  # [M] max_c p_T(c|x)
    entropy: np.ndarray  # [M] H(p_T)
    energy: np.ndarray  # [M] logsumexp(z_T)
    margin: np.ndarray  # [M] p_1 - p_2
    sources: np.ndarray  # [M] source tag (diagnostics only; no selection rule reads it)
    cand_ids: np.ndarray  # [K] candidate ids (per-class top-L by confidence)
    cand_class: np.ndarray  # [K] their teacher class
    cand_feat: np.ndarray  # [K, d] L2-normalised teacher penultimate features (float16)
    cand_logp: np.ndarray  # [K] log p_T(class|x)
    # [M] feature-space scores asked for with `OODSpec` (mahalanobis, knn, bn), by name
    extra: dict = dataclasses.field(default_factory=dict)

    _SCALARS = ("ids", "pred", "confidence", "entropy", "energy", "margin", "sources")
    _STATS = ("pred", "confidence", "entropy", "energy", "margin")  # what `image_stats` gives

    def score(self, kind: str) -> np.ndarray:
        """Score per item, higher = more wanted (kd_jax.sampling's sign convention)."""
        if kind in self.extra:
            return self.extra[kind]
        return {
            "confidence": self.confidence,
            "entropy": -self.entropy,
            "energy": self.energy,
            "margin": self.margin,
        }[kind]


OOD_KINDS = ("mahalanobis", "knn", "bn")


@dataclasses.dataclass(frozen=True)
class OODSpec:
    """Which feature-space out-of-distribution scores `score_pool` adds (`PoolScores.extra`).

    * `mahalanobis`: -min_c d_M²(f, μ_c), class-conditional Gaussians with a shared covariance
      (Lee et al. 2018) on the teacher's penultimate features f;
    * `knn`: cosine of the normalised f to its k-th nearest neighbour among the pool's most
      confident images (Sun et al. 2022), the bank being each teacher class's `knn_bank` most
      confident images (a prefix of ODSD's per-class heaps; the image itself excluded);
    * `bn`: how far each image's per-layer input statistics lie from the teacher's BatchNorm
      running statistics (teachers with BatchNorm only).

    Both feature scores are fitted on the pool's own confident images: Mahalanobis's
    sufficient statistics over the images with p_T(ŷ|x) ≥ `fit_confidence` (class ŷ) and
    k-NN's bank are gathered during the one teacher pass, solved once, and a second pass over
    the same shards (same machinery, cached per shard) scores every image. `bn` needs no fit
    and comes with the first pass.
    """

    kinds: tuple = ()
    fit_confidence: float = 0.9
    normalize: bool = True  # Mahalanobis on L2-normalised features (False: raw)
    shrinkage: float = 1e-2  # ridge of the shared covariance, in units of tr(Σ)/d
    knn_k: int = 10
    knn_bank: int = 0  # bank images per teacher class (0: the heap size)

    @property
    def second_pass(self) -> bool:
        return any(k in self.kinds for k in ("mahalanobis", "knn"))


def _teacher_stats_fn(
    apply_fn, heap_size: int, num_classes: int, ood: OODSpec | None = None, image_stats=None
):
    """The first pass: per-item scalars (`image_stats(logits)`), ODSD's heaps, and (with `ood`)
    the Gaussian fit's sufficient statistics over confident images and the per-item BatchNorm
    score."""
    import flax.linen as nn
    import jax.numpy as jnp

    from kd_jax import sampling

    ood = ood or OODSpec()
    image_stats = image_stats or sampling.image_statistics

    def stats(variables, images, ids, mask, carry):
        moments = []

        def record_bn_inputs(next_fun, args, kwargs, context):
            module = context.module
            if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
                x = jnp.asarray(args[0], jnp.float32)
                axes = tuple(range(1, x.ndim - 1))  # per image: over spatial positions
                mean = jnp.mean(x, axes) if axes else x
                var = jnp.var(x, axes) if axes else jnp.zeros_like(x)
                moments.append(
                    (
                        mean,
                        var,
                        module.get_variable("batch_stats", "mean"),
                        module.get_variable("batch_stats", "var"),
                    )
                )
            return next_fun(*args, **kwargs)

        if "bn" in ood.kinds:
            with nn.intercept_methods(record_bn_inputs):
                logits, feats = apply_fn(variables, images, train=False)
        else:
            logits, feats = apply_fn(variables, images, train=False)
        stats = image_stats(logits)
        out = {k: stats[k] for k in PoolScores._STATS}
        if "bn" in ood.kinds:
            out["bn"] = sampling.bn_statistics_score(moments)
        carry = dict(carry)
        if heap_size:
            f = feats["pre_logits"].astype(jnp.float32)
            f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
            payload = {"feat": f.astype(jnp.float16), "logp": jnp.log(out["confidence"])}
            carry["heaps"] = sampling.merge_class_top_k(
                carry["heaps"], out["confidence"], out["pred"], ids, payload=payload, mask=mask > 0
            )
        if "mahalanobis" in ood.kinds:
            f = _ood_features(feats, ood)
            fit_w = mask * (out["confidence"] >= ood.fit_confidence)
            carry["gauss"] = sampling.merge_gaussian_stats(
                carry["gauss"], sampling.gaussian_stats(f, out["pred"], num_classes, fit_w)
            )
        return out, carry

    return stats


def _ood_features(feats, ood: OODSpec):
    import jax.numpy as jnp

    f = feats["pre_logits"].astype(jnp.float32)
    f = f.reshape(f.shape[0], -1)
    if ood.normalize:
        f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    return f


def _feature_scores_fn(apply_fn, ood: OODSpec):
    """The second pass: every image's feature-space scores under the solved fit / bank."""
    import jax.numpy as jnp

    from kd_jax import sampling

    def scores(variables, fit, bank, batch):
        _, feats = apply_fn(variables, batch["image"], train=False)
        out = {}
        if "mahalanobis" in ood.kinds:
            out["mahalanobis"] = sampling.mahalanobis_score(_ood_features(feats, ood), fit)
        if "knn" in ood.kinds:
            f = feats["pre_logits"].astype(jnp.float32)
            out["knn"] = sampling.knn_score(
                f.reshape(f.shape[0], -1),
                bank["feat"].astype(jnp.float32),
                k=ood.knn_k,
                ids=batch["id"].astype(jnp.int32),
                bank_ids=bank["ids"],
            )
        return out

    return scores


def class_top_candidates(scores: PoolScores, per_class: int) -> PoolScores:
    """`scores` with its candidates cut to each teacher class's `per_class` most confident
    (confidence desc, id asc): exactly the heaps a pass with heap size `per_class` keeps."""
    from kd_jax import sampling

    cls = np.asarray(scores.cand_class)
    if not len(cls):
        return scores
    rank = np.asarray(
        sampling.within_class_rank(
            np.asarray(scores.cand_logp, np.float32), cls, scores.cand_ids.astype(np.int32)
        )
    )
    keep = np.flatnonzero(rank < per_class)
    return dataclasses.replace(
        scores,
        cand_ids=scores.cand_ids[keep],
        cand_class=scores.cand_class[keep],
        cand_feat=scores.cand_feat[keep],
        cand_logp=scores.cand_logp[keep],
    )


def knn_bank(scores: PoolScores, per_class: int) -> dict:
    """k-NN's reference bank: each teacher class's `per_class` most confident pool images
    (a prefix of the per-class heaps) with their normalised features."""
    top = class_top_candidates(scores, per_class)
    return {
        "ids": top.cand_ids.astype(np.int32),
        "feat": np.asarray(top.cand_feat, np.float16),
    }


# ---------------------------------------------------------------------------------------------
# Selection quality: which share of a selection is related, per score, as N varies
# ---------------------------------------------------------------------------------------------

QUALITY_SIZES = (250, 500, 1000, 2000, 4000, 8000)
QUALITY_FILE = "selection_quality.png"


def selection_quality(
    scores: PoolScores, rules: dict, related_sources, sizes=QUALITY_SIZES
) -> dict:
    """{rule name: {N: share of related images in its selection of N}} for every N <= the pool
    size; a rule is `fn(scores, N) -> selected ids` (None: not defined at that N, skipped).
    Reads the source tags, so it is a diagnostic only."""
    related = np.isin(np.asarray(scores.sources).astype(str), list(related_sources))
    out = {}
    for name, rule in rules.items():
        curve = {}
        for n in sizes:
            if n > len(scores.ids):
                continue
            chosen = rule(scores, int(n))
            if chosen is None:
                continue
            curve[int(n)] = float(related[np.isin(scores.ids, np.asarray(chosen))].mean())
        out[name] = curve
    return out


def score_pool(
    workdir: str,
    spec,
    *,
    teacher_model,
    teacher_vars,
    domain,
    num_classes: int,
    batch_size: int,
    heap_size: int = 0,
    ood: OODSpec | None = None,
    image_stats: Callable | None = None,
) -> PoolScores:
    """One streamed teacher pass over this host's pool shards, resumable shard by shard.

    Each host scores its own files on its *local* devices (scoring needs no cross-host
    collective), writing `workdir/pool_scores/<shard>.npz` after every shard, so a killed pass
    resumes at the first unscored shard. Then every host reads all shard files and merges them
    into the same `PoolScores`. `heap_size` = L > 0 also keeps, per teacher class, the L most
    confident items with their features (ODSD's candidates); memory stays O(C·L·d). `ood`
    adds feature-space scores (`OODSpec`); a fitted one costs a second pass over the shards
    through the same machinery (`workdir/pool_scores/features/`), O(C·d + d²) state.
    `image_stats`: the teacher's logits -> per-image `pred` / `confidence` / `entropy` /
    `energy` / `margin` (default `sampling.image_statistics`, a classifier's; segmentation
    passes `sampling.segmentation_image_statistics` over the pixel logits, ODSD §5).
    """
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from kd_jax import sampling

    ood = ood or OODSpec()
    for kind in ood.kinds:
        if kind not in OOD_KINDS:
            raise ValueError(f"unknown feature score {kind!r} (known: {', '.join(OOD_KINDS)})")
    if "bn" in ood.kinds:
        from kd_jax import diagnostics

        if not diagnostics.has_batch_norm(teacher_vars):
            raise ValueError(
                "the BatchNorm-statistics score (bn) needs a teacher with BatchNorm layers; "
                f"{type(teacher_model).__name__} has none"
            )
    pattern = pool_pattern(spec)
    out_dir = fileio.join(workdir, "pool_scores")
    local_mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
    local_batch = -(-batch_size // len(jax.local_devices())) * len(jax.local_devices())
    variables = jax.device_put(
        jax.tree.map(np.asarray, teacher_vars), NamedSharding(local_mesh, P())
    )
    feats = teacher_model.apply(
        jax.tree.map(np.asarray, teacher_vars),
        np.zeros((1, domain.image_size, domain.image_size, domain.channels), np.float32),
        train=False,
    )[1]["pre_logits"]
    d = feats.shape[-1]
    spec_payload = {
        "feat": jax.ShapeDtypeStruct((d,), jnp.float16),
        "logp": jax.ShapeDtypeStruct((), jnp.float32),
    }
    bank_size = int(ood.knn_bank or heap_size)
    if "knn" in ood.kinds:
        if bank_size < max(int(ood.knn_k), 1):
            raise ValueError(
                f"the k-NN score needs a bank of at least k={ood.knn_k} images per class "
                f"(knn_bank={ood.knn_bank}, heap size {heap_size})"
            )
        heap_size = max(heap_size, bank_size)  # the bank is a prefix of the heaps
    stats_fn = _teacher_stats_fn(teacher_model.apply, heap_size, num_classes, ood, image_stats)
    d_fit = int(np.prod(feats.shape[1:]))

    def init_carry():
        carry = {}
        if heap_size:
            carry["heaps"] = sampling.init_class_top_k(num_classes, heap_size, spec_payload)
        if "mahalanobis" in ood.kinds:
            carry["gauss"] = sampling.init_gaussian_stats(num_classes, d_fit)
        return carry

    def finish(carry) -> dict:
        record = {}
        if heap_size:
            s, ids, cls, payload, valid = jax.device_get(
                sampling.flatten_class_top_k(carry["heaps"])
            )
            record.update(
                cand_ids=ids[valid].astype(np.int64),
                cand_class=cls[valid],
                cand_feat=payload["feat"][valid],
                cand_logp=payload["logp"][valid],
                cand_score=s[valid],
            )
        if "mahalanobis" in ood.kinds:
            g = jax.device_get(carry["gauss"])
            record.update(gauss_count=g.count, gauss_mean=g.mean, gauss_scatter=g.scatter)
        return record

    _stream_shards(
        pattern,
        out_dir,
        lambda v, b, carry: stats_fn(v, b["image"], b["id"], b["mask"], carry),
        (variables,),
        local_mesh=local_mesh,
        local_batch=local_batch,
        domain=domain,
        init_carry=init_carry,
        finish=finish,
        what="teacher pass + scores + heaps",
    )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("kd_jax_pool_scored")
    scores, gauss = _merge_scored_shards(pattern, out_dir, num_classes, heap_size)
    if ood.second_pass:
        fit = None
        if "mahalanobis" in ood.kinds:
            if gauss is None:
                raise ValueError(
                    f"{out_dir} holds teacher scores without the Mahalanobis statistics "
                    f"(a pass made for another config.odsd.score): remove it to rescore"
                )
            if not float(np.sum(gauss.count)):
                raise ValueError(
                    f"no pool image reaches the teacher confidence {ood.fit_confidence} that "
                    f"fits the Mahalanobis score: lower config.odsd.ood.fit_confidence"
                )
            fit = sampling.fit_gaussian(gauss, ood.shrinkage)
        bank = knn_bank(scores, bank_size) if "knn" in ood.kinds else None
        replicated = NamedSharding(local_mesh, P())
        feature_dir = fileio.join(out_dir, "features")
        _stream_shards(
            pattern,
            feature_dir,
            _feature_scores_fn(teacher_model.apply, ood),
            (variables, jax.device_put(fit, replicated), jax.device_put(bank, replicated)),
            local_mesh=local_mesh,
            local_batch=local_batch,
            domain=domain,
            what="feature scores",
        )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("kd_jax_pool_feature_scored")
        extra = _merge_extra(pattern, feature_dir, scores.ids)
        scores.extra.update({k: v for k, v in extra.items() if k in ood.kinds})
    return scores


def _stream_shards(
    pattern,
    out_dir,
    fn,
    args,
    *,
    local_mesh,
    local_batch,
    domain,
    init_carry=None,
    finish=None,
    what="teacher pass",
):
    """The one streamed pass over this host's shards: `fn(*args, batch[, carry])` per padded
    batch (image, id, mask) on the local devices, each shard's rows (plus `finish(carry)`)
    saved atomically to `out_dir/<shard>.npz`; a shard whose file exists is skipped, so a
    killed pass resumes where it stopped."""
    import jax
    import tensorflow as tf

    from kd_jax import inference
    from kd_jax.data import pipeline, shards

    carried = init_carry is not None
    apply = inference.BatchedApply(fn, local_mesh, carry=carried)
    t0, scored = time.perf_counter(), 0
    for path in shards.process_files(pattern, jax.process_index(), jax.process_count()):
        done = fileio.join(out_dir, fileio.basename(path) + ".npz")
        if fileio.exists(done):
            continue
        ds = shards.read_shards(path).map(
            lambda e: {
                "image": pipeline.preprocess(e, domain, "none"),
                "id": e["id"],
                "source": e["source"],
                "mask": tf.constant(1.0),
            },
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        ds = ds.padded_batch(
            local_batch,
            padding_values={"image": 0.0, "id": np.int64(-1), "source": "", "mask": 0.0},
        )
        kwargs = dict(batches=ds, keep=("id", "source"), pad_to=local_batch)
        if carried:
            rows, carry = apply.gather(*args, carry=init_carry(), **kwargs)
        else:
            rows = apply.gather(*args, **kwargs)
        record = {}
        if rows:
            record = {"ids": rows.pop("id"), "sources": rows.pop("source").astype(str), **rows}
        if carried:
            record.update(finish(carry))
        fileio.save_npz_atomic(
            done, record
        )  # a shard counts as scored only once its file is complete
        scored += len(record.get("ids", ()))
    if scored:
        seconds = time.perf_counter() - t0
        log.info(
            f"process {jax.process_index()}: scored {scored} images in {seconds:.1f}s "
            f"({scored / seconds:.0f} images/s, {what})",
            tag="pool",
        )


def _merge_extra(pattern, out_dir, ids) -> dict:
    """The second pass's per-item scores, aligned with `ids` (ascending)."""
    from kd_jax.data import shards

    parts, id_parts = {}, []
    for p in shards.list_shard_files(pattern):
        z = fileio.load_npz(fileio.join(out_dir, fileio.basename(p) + ".npz"))
        if "ids" not in z:
            continue
        id_parts.append(z["ids"])
        for k in OOD_KINDS:
            if k in z:
                parts.setdefault(k, []).append(z[k])
    if not id_parts:
        return {}
    all_ids = np.concatenate(id_parts).astype(np.int64)
    order = np.argsort(all_ids, kind="stable")
    return {
        k: lookup(all_ids[order], np.concatenate(v)[order], ids).astype(np.float32)
        for k, v in parts.items()
    }


def _merge_scored_shards(pattern, out_dir, num_classes, heap_size):
    """Reads the shard results one file at a time: the per-item scalars are O(M), and the
    candidates are reduced to the per-class top-L after each file, so memory holds at most
    2·C·L feature rows however many shards (≈ pool size / shard size) there are. Returns
    (PoolScores, merged GaussianStats or None); the first pass's `bn` goes to `extra`."""
    from kd_jax import sampling
    from kd_jax.data import shards

    files = [
        fileio.join(out_dir, fileio.basename(p) + ".npz") for p in shards.list_shard_files(pattern)
    ]
    cand_keys = ("cand_ids", "cand_class", "cand_feat", "cand_logp", "cand_score")
    keys = PoolScores._SCALARS + ("bn",)
    parts = {k: [] for k in keys}
    cand, gauss = None, None
    for f in files:
        z = fileio.load_npz(f)
        for k in keys:
            if k in z:
                parts[k].append(z[k])
        if heap_size and "cand_ids" in z:
            new = {k: z[k] for k in cand_keys}
            cand = (
                new if cand is None else {k: np.concatenate([cand[k], new[k]]) for k in cand_keys}
            )
            cand = _class_top(cand, num_classes, heap_size)
        if "gauss_count" in z:
            g = sampling.GaussianStats(z["gauss_count"], z["gauss_mean"], z["gauss_scatter"])
            gauss = g if gauss is None else sampling.merge_gaussian_stats(gauss, g)
    cat = lambda k: np.concatenate(parts[k]) if parts[k] else np.zeros(0)
    order = np.argsort(cat("ids").astype(np.int64), kind="stable")
    scalars = {k: cat(k)[order] for k in PoolScores._SCALARS}
    if cand is None or not len(cand["cand_ids"]):
        cand = {
            "cand_ids": np.zeros(0, np.int64),
            "cand_class": np.zeros(0, np.int32),
            "cand_feat": np.zeros((0, 1), np.float16),
            "cand_logp": np.zeros(0, np.float32),
        }
    cand.pop("cand_score", None)
    extra = {"bn": cat("bn")[order]} if parts["bn"] else {}
    return PoolScores(**scalars, **cand, extra=extra), gauss


def _class_top(cand: dict, num_classes: int, heap_size: int) -> dict:
    """Per teacher class, the `heap_size` best candidates by (score desc, id asc), in input
    order (so merging file by file keeps the order a one-shot merge gives)."""
    from kd_jax import sampling

    cls = np.asarray(cand["cand_class"])
    if not len(cls):
        return cand
    rank = np.asarray(
        sampling.within_class_rank(
            np.asarray(cand["cand_score"], np.float32),
            cls,
            np.asarray(cand["cand_ids"]).astype(np.int32),
        )
    )
    keep = np.flatnonzero((rank < heap_size) & (cls >= 0) & (cls < num_classes))
    return {k: v[keep] for k, v in cand.items()}
