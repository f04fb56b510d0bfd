"""ODSD — Sampling to Distill (Wang et al., arXiv 2307.16601): KD from an open-world pool.

ODSD as kd_jax reconstructs it. Three parts, every switch a
key of `config.odsd` (defaults as in the paper, see `default_config()`):

* **APS** (adaptive prototype sampling, §1) in `prepare()`: one streamed teacher pass over the
  pool (`kd_jax.pool.score_pool`, per-class top-L heaps with features, L = 3·n_c), prototypes
  from the teacher head refined on the heaps, a per-class quantile gate on the teacher's
  confidence, a within-class score α·rank01(cos) + (1−α)·rank01(log p_T) and a class-balanced
  quota n_c = ⌈N/C⌉. `kd_jax.pool.select_transfer_set` writes the selection (ids, classes,
  scores) and its diagnostics to the workdir (`selection.npz`, `selection_report.json`,
  `sampling.png`; results.json's `selection`); a resumed run reuses them. `config.odsd.score`
  swaps APS's within-class ranking for an out-of-distribution score of the teacher (energy,
  Mahalanobis, k-NN, BatchNorm statistics; `kd_jax.pool.OODSpec`) under the same class
  balance; on the bundled pool `selection_quality.png` compares them all as N varies. Optional adaptive
  refresh (§1F, `aps.refresh_epochs`): every R epochs the candidates are
  re-ranked with the current student's disagreement KL(p_T ‖ p_S) and the loop switches to the
  new selection (`selection_step<k>.npz`; a resumed run picks the one in force at its step).
* **LNR** (low-noise representation, §2): per-sample top-p truncated teacher targets.
* **DCRD** (§3): L_TR, the confidence-weighted KL between the teacher's and the (projected)
  student's in-batch relation distributions (or `crd_nce` / `rkd`), and L_SR, NT-Xent over two
  augmented views through a 2-layer MLP head. Both over the global batch.

L = L_LN + λ_TR·L_TR + λ_SR·L_SR; no labels anywhere.

**Segmentation** (§5, `data.target.task = "segmentation"`): the same class, pool lifecycle and
switches. The pool pass reads the teacher's pixel logits through
`sampling.segmentation_image_statistics`: an image's APS score (confidence) is the mean over
its pixels of max_c p_T, its class for the balance, the gate and the heaps is its dominant
non-background class by soft pixel share (argmax over c ≠ `odsd.segmentation.background` of
the mean pixel probability; see that function for why soft), and the prototype term uses the
pooled `pre_logits` (prototypes start from the 1×1 classifier's kernel rows, the linear head
of the pooled features). LNR runs per pixel (`losses.pixel_low_noise_loss`; pixels the crop
padded weigh 0); L_TR / L_SR run on the pooled features, weighted by the image confidence; the
second view is an independent rescale / crop / flip.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import diagnostics, fileio, inference, log, losses, parallel, pool, sampling
from kd_jax.config_utils import check_choice
from kd_jax.data import pipeline
from kd_jax.methods.base import Method
from kd_jax.models.heads import MLPHead, Projector
from kd_jax.models.layers import at_least_float32
from kd_jax.models.shapes import feature_shapes

SELECTIONS = ("aps", "random", "all")
# What ranks the pool inside each teacher class (`config.odsd.score`): APS (§1, the paper's) or
# an out-of-distribution score of the teacher (kd_jax.sampling; pool.OODSpec).
SCORES = ("aps", "energy", "mahalanobis", "knn", "bn")
INITS = ("fc_weight", "confident_mean")
GATES = ("quantile", "global", "none")
LNR_RULES = ("top_p", "top_k", "threshold", "none", "prior")
TR_KINDS = ("rel_kl", "crd_nce", "rkd")
REL_SPACES = ("feature", "lnr_prob")
SR_POSITIVES = ("instance", "pseudo_label")


def default_config() -> ml_collections.ConfigDict:
    """`config.odsd`: every switch of the method with the paper's defaults."""
    return ml_collections.ConfigDict(
        {
            # aps (the paper's §1) | energy | mahalanobis | knn | bn: the within-class ranking of
            # the pool when aps.selection = aps. The OOD scores keep APS's class balance (per
            # teacher class the top ⌈N/C⌉, shortfall from the global ranking) but no gate.
            "score": "aps",
            "ood": ml_collections.ConfigDict(
                {
                    # images with p_T(ŷ|x) >= this fit the Mahalanobis class means / covariance
                    "fit_confidence": 0.9,
                    "normalize": True,  # Mahalanobis on L2-normalised teacher features
                    "shrinkage": 0.01,  # covariance ridge, in units of tr(Σ)/d
                    "knn_k": 10,  # k-th nearest neighbour among the bank
                    "knn_bank": 0,  # bank: each class's most confident images (0 = n_c = ⌈N/C⌉)
                }
            ),
            "aps": ml_collections.ConfigDict(
                {
                    "selection": "aps",  # aps | random (same N, "ODSD w/o APS") | all (whole pool)
                    "size": 0,  # N = |D|; 0 = the original train-set size (must be set)
                    "init": "fc_weight",  # prototype init: fc_weight | confident_mean (§1B)
                    "refine_rounds": 2,  # K rounds of prototype refinement on the heaps
                    "gate": "quantile",  # quantile | global | none (§1C)
                    "gate_quantile": 0.5,  # q of the per-class quantile gate
                    "gate_threshold": 0.9,  # γ of gate = global
                    "alpha": 0.5,  # α·rank01(cos) + (1-α)·rank01(log p_T) (§1D)
                    "balance": True,  # class-balanced quota n_c = ⌈N/C⌉ (False: global top-N)
                    "heap_factor": 3.0,  # L = heap_factor·n_c candidates kept per class
                    "score_batch_size": 512,  # teacher-pass batch per host
                    # §1F adaptive refresh: every R epochs over D, re-rank the candidates (the per-class
                    # heaps, L = heap_factor·n_c) by APS score + η·rank01(KL(p_T ‖ p_S)), preferring
                    # what the student has not learned yet. 0 = off (the paper's default).
                    "refresh_epochs": 0,
                    "refresh_eta": 0.5,
                }
            ),
            "lnr": ml_collections.ConfigDict(
                {
                    "rule": "top_p",  # top_p | top_k | threshold | none (= plain KD) | prior (§2)
                    "rho": 0.9,
                    "k": 0,  # top_k: k (0 = ⌈C/2⌉)
                    "threshold": 0.01,  # threshold rule: keep p_T >= threshold (+ argmax)
                    "k_max": 0,  # cap on |K_i| (0 = ⌈C/2⌉ for top_p, none otherwise)
                    "apply_to": "teacher",  # teacher | both (EIKD's class dropping)
                    "confidence_weight": False,  # w_i = c1_i / mean(c1)
                    # drop (the paper: 0 outside K_i) | uniform (a kd_jax option: the tail's mass at τ
                    # spread evenly over the dropped classes, bounded like KD; see low_noise_targets)
                    "tail": "drop",
                }
            ),
            "tr": ml_collections.ConfigDict(
                {
                    "kind": "rel_kl",  # rel_kl | crd_nce | rkd (§3a)
                    "weight": 1.0,  # λ_TR
                    "temperature": 0.5,  # τ_r
                    "nce_temperature": 0.1,  # τ_c of crd_nce
                    "rkd_distance": 25.0,
                    "rkd_angle": 50.0,
                    "rel_space": "feature",  # feature | lnr_prob
                    "confidence_weight": True,  # w_i = c1_i (denoising); False = uniform
                }
            ),
            "sr": ml_collections.ConfigDict(
                {
                    "weight": 0.1,  # λ_SR (0 switches the second view off)
                    "temperature": 0.5,  # τ_s
                    "positives": "instance",  # instance | pseudo_label (§3b)
                    "proj_dim": 128,
                }
            ),
            "segmentation": ml_collections.ConfigDict(
                {
                    # the class no image is balanced as (SegMNIST's background, 10); -1 = none
                    # (every class a foreground class, e.g. NYUv2's 13)
                    "background": -1,
                }
            ),
            "diagnostics": ml_collections.ConfigDict(
                {
                    "plot": True,  # sampling.png in the workdir
                    # selection_quality.png (needs plot; the bundled pool only): every score's
                    # related share as N varies — costs a second teacher pass over the pool
                    "quality_plot": True,
                    "bn_images": 10000,  # images per set for the BN-statistics distance (0 = off)
                }
            ),
        }
    )


# ---------------------------------------------------------------------------------------------
# APS: selection from the candidate heaps (pure; the streamed and the in-memory path share it)
# ---------------------------------------------------------------------------------------------


def per_class_quota(size: int, num_classes: int) -> int:
    """n_c = ⌈N / C⌉."""
    return int(math.ceil(size / num_classes))


def heap_size(aps: ml_collections.ConfigDict, size: int, num_classes: int) -> int:
    """Candidates kept per teacher class: L = heap_factor·n_c, or N without balancing (so that
    the global top-N, which may hold more than L items of one class, is among the candidates)."""
    if not aps.balance:
        return int(size)
    return int(math.ceil(aps.heap_factor * per_class_quota(size, num_classes)))


def aps_select(
    cand_ids,
    cand_class,
    cand_feat,
    cand_conf,
    *,
    num_classes: int,
    size: int,
    aps: ml_collections.ConfigDict,
    gamma=None,
    head_weight=None,
) -> dict:
    """ODSD §1 B–D on the per-class candidates. Deterministic and invariant to their order.

    Args:
      cand_ids [K] unique ints, cand_class [K] teacher argmax, cand_feat [K, d] L2-normalised
      teacher features, cand_conf [K] p_T(ŷ|u).
      gamma: [C] per-class gate thresholds (quantile gate over the whole of A_c, computed by
        the caller from the pool's confidences); used when aps.gate == "quantile".
      head_weight: [d, C] teacher head kernel (init = fc_weight).
    Returns dict: ids [min(N, K)] (sorted), classes, scores (APS score), gated bool,
    prototypes. With fewer than N candidates in all, the method tops the selection up with
    `fill_from_pool`, so |D| = N whenever the pool holds N images.
    """
    check_choice(aps.init, INITS, "odsd.aps.init")
    check_choice(aps.gate, GATES, "odsd.aps.gate")
    cand_ids = np.asarray(cand_ids, np.int64)
    cls = np.asarray(cand_class, np.int32)
    conf = np.asarray(cand_conf, np.float32)
    f = jnp.asarray(np.asarray(cand_feat, np.float32))
    ids32 = jnp.asarray(cand_ids.astype(np.int32))
    n_c = per_class_quota(size, num_classes)
    logp = np.log(np.maximum(conf, np.float32(1e-30)))

    # B. prototypes: teacher head rows (data-free) or the confident mean, refined K rounds.
    if aps.init == "fc_weight" and head_weight is not None:
        mu0 = jnp.asarray(np.asarray(head_weight, np.float32).T)
    else:
        if aps.init == "fc_weight":
            log.warning(
                "ODSD: no teacher head kernel of shape [d, C] found; prototypes start "
                "from the confident mean instead"
            )
        top = np.asarray(sampling.within_class_rank(jnp.asarray(logp), jnp.asarray(cls), ids32))
        mu0 = sampling.class_prototypes(f, jnp.asarray(np.where(top < n_c, cls, -1)), num_classes)
    mu = sampling.refine_prototypes(
        f, jnp.asarray(cls), mu0, n_c, rounds=aps.refine_rounds, ids=ids32
    )
    cos = sampling.prototype_score(f, mu, jnp.asarray(cls))

    # C. gate: ranked first inside each class's quota.
    if aps.gate == "quantile":
        if gamma is None:
            raise ValueError("aps_select: gate='quantile' needs the per-class thresholds gamma")
        passed = conf >= np.asarray(gamma, np.float32)[np.clip(cls, 0, num_classes - 1)]
    elif aps.gate == "global":
        passed = conf >= np.float32(aps.gate_threshold)
    else:
        passed = None

    # D. score and quota (or, without balancing, one global ranking).
    rank_classes = jnp.asarray(cls) if aps.balance else None  # None: one global ranking
    scores = sampling.aps_scores(cos, jnp.asarray(logp), rank_classes, alpha=float(aps.alpha))
    prio = None if passed is None else jnp.asarray(passed)
    if aps.balance:
        idx = sampling.select_class_balanced(
            scores, jnp.asarray(cls), n_c, num_classes, ids=ids32, priority=prio, total=size
        )
    else:
        idx = sampling.select_class_balanced(
            scores, jnp.zeros_like(jnp.asarray(cls)), size, 1, ids=ids32, priority=prio, total=size
        )
    idx = np.asarray(idx)
    idx = idx[np.argsort(cand_ids[idx], kind="stable")]
    all_passed = np.ones(len(cand_ids), bool) if passed is None else np.asarray(passed)
    return {
        "ids": cand_ids[idx],
        "classes": cls[idx],
        "scores": np.asarray(scores)[idx],
        "gated": all_passed[idx],
        "prototypes": np.asarray(mu),
        # every candidate's score and gate: the adaptive refresh (§1F) re-ranks them
        "candidates": {
            "ids": cand_ids,
            "classes": cls,
            "scores": np.asarray(scores),
            "passed": all_passed,
        },
    }


def fill_from_pool(out: dict, pool_ids, pool_pred, pool_conf, size: int):
    """Tops an APS selection up to N with the most confident pool images not yet selected
    (confidence desc, id asc) — only when the per-class heaps hold fewer than N candidates in
    all (a teacher that puts the pool into very few classes). They get score -1 (below every
    APS score, which lies in [0, 1]). Returns (selection dict sorted by id, number filled)."""
    need = size - len(out["ids"])
    rest = np.flatnonzero(~np.isin(pool_ids, out["ids"]))
    order = rest[
        np.asarray(
            sampling.select_top_k(
                np.asarray(pool_conf)[rest], need, ids=np.asarray(pool_ids)[rest].astype(np.int32)
            )
        )
    ]
    merged = {
        "ids": np.concatenate([out["ids"], np.asarray(pool_ids, np.int64)[order]]),
        "classes": np.concatenate([out["classes"], np.asarray(pool_pred, np.int32)[order]]),
        "scores": np.concatenate(
            [np.asarray(out["scores"], np.float32), np.full(len(order), -1.0, np.float32)]
        ),
        "gated": np.concatenate([out["gated"], np.zeros(len(order), bool)]),
    }
    perm = np.argsort(merged["ids"], kind="stable")
    return dict(
        {k: v[perm] for k, v in merged.items()},
        prototypes=out["prototypes"],
        candidates=out.get("candidates"),
    ), len(order)


def ood_spec(
    cfg: ml_collections.ConfigDict, size: int, num_classes: int, kinds=None
) -> pool.OODSpec | None:
    """The pool pass's feature scores for `config.odsd`: `kinds`, or the configured score's
    (None for APS / energy, which need only the first pass's statistics). The k-NN bank
    defaults to n_c images per class."""
    check_choice(cfg.score, SCORES, "odsd.score")
    if kinds is None:
        kinds = (cfg.score,) if cfg.score in pool.OOD_KINDS else ()
    if not kinds:
        return None
    o = cfg.ood
    return pool.OODSpec(
        kinds=tuple(kinds),
        fit_confidence=float(o.fit_confidence),
        normalize=bool(o.normalize),
        shrinkage=float(o.shrinkage),
        knn_k=int(o.knn_k),
        knn_bank=int(o.knn_bank) or per_class_quota(size, num_classes),
    )


def select_by_score(
    scores: pool.PoolScores, score: str, size: int, num_classes: int, balance: bool = True
) -> pool.Selection:
    """ODSD's class balance with an OOD score instead of APS's: per teacher class the ⌈N/C⌉
    best images by `score` (higher = more in-distribution, ties by smaller id), the shortfall
    from the global ranking; `balance=False`: the global top-N."""
    ids = np.asarray(scores.ids)
    if len(ids) < size:
        raise ValueError(f"config.odsd.aps.size={size} exceeds the pool ({len(ids)} images)")
    s = np.asarray(scores.score(score), np.float32)
    cls = np.asarray(scores.pred, np.int32)
    ids32 = ids.astype(np.int32)  # pool ids fit int32 (the samplers' id type)
    if balance:
        idx = sampling.select_class_balanced(
            s, cls, per_class_quota(size, num_classes), num_classes, ids=ids32, total=size
        )
    else:
        idx = sampling.select_top_k(s, size, ids=ids32)
    idx = np.asarray(idx)
    idx = idx[np.argsort(ids[idx], kind="stable")]
    return pool.Selection(ids=ids[idx].astype(np.int64), classes=cls[idx], scores=s[idx])


def aps_selection(scores: pool.PoolScores, size: int, num_classes: int, aps, head_weight=None):
    """ODSD §1 on a scored pool: the gate thresholds γ_c over the whole pool, `aps_select` on
    the candidates, and the fill-up when the heaps hold fewer than N. Returns (selection dict,
    γ [C], number filled)."""
    if len(scores.ids) < size:
        raise ValueError(f"config.odsd.aps.size={size} exceeds the pool ({len(scores.ids)} images)")
    gamma, _ = sampling.quantile_gate(
        jnp.asarray(scores.confidence, jnp.float32),
        jnp.asarray(scores.pred),
        num_classes,
        q=aps.gate_quantile,
    )
    gamma = np.asarray(gamma, np.float32)
    if aps.gate == "global":
        gamma = np.full((num_classes,), aps.gate_threshold, np.float32)
    elif aps.gate == "none":
        gamma = np.zeros((num_classes,), np.float32)
    cand_conf = pool.lookup(scores.ids, scores.confidence, scores.cand_ids)
    out = aps_select(
        scores.cand_ids,
        scores.cand_class,
        scores.cand_feat,
        cand_conf,
        num_classes=num_classes,
        size=size,
        aps=aps,
        gamma=gamma,
        head_weight=head_weight,
    )
    filled = 0
    if len(out["ids"]) < size:  # the heaps ran dry: too few classes hold enough images
        out, filled = fill_from_pool(out, scores.ids, scores.pred, scores.confidence, size)
    return out, gamma, filled


def quality_rules(
    scores: pool.PoolScores, aps, num_classes: int, head_weight=None, aps_max_size=None
) -> dict:
    """The selection rules `selection_quality.png` compares, one per score this pool pass
    computed: APS (only up to `aps_max_size`, the N whose heaps the pass kept: a smaller N
    reads a prefix of them), teacher confidence, energy and every feature score, each with
    ODSD's class balance. name -> fn(scores, N) -> ids."""
    rules = {}
    if len(scores.cand_ids):

        def aps_rule(s, n):
            if aps_max_size is not None and n > aps_max_size:
                return None
            top = pool.class_top_candidates(s, heap_size(aps, n, num_classes))
            return aps_selection(top, n, num_classes, aps, head_weight)[0]["ids"]

        rules["aps"] = aps_rule
    for kind in ("confidence", "energy") + tuple(k for k in pool.OOD_KINDS if k in scores.extra):
        rules[kind] = functools.partial(
            lambda s, n, kind: select_by_score(s, kind, n, num_classes, aps.balance).ids,
            kind=kind,
        )
    return rules


def head_kernel(params, feature_dim: int, num_classes: int, conv_1x1: bool = False):
    """The teacher's classifier kernel [d, C] (the last 2-D `kernel` of that shape), or None.
    `conv_1x1` (segmentation) also takes a 1×1 conv kernel [1, 1, d, C]: a pixel classifier
    is linear, so on pooled features it is the same map."""
    found = []
    shapes = {(feature_dim, num_classes)}
    if conv_1x1:
        shapes.add((1, 1, feature_dim, num_classes))

    def visit(tree):
        if isinstance(tree, dict) or hasattr(tree, "items"):
            for k, v in tree.items():
                if k == "kernel" and getattr(v, "shape", None) in shapes:
                    found.append(np.reshape(v, (feature_dim, num_classes)))
                elif hasattr(v, "items"):
                    visit(v)

    visit(params)
    return np.asarray(found[-1]) if found else None


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class ODSD(Method):
    name = "odsd"

    def __init__(self, config, workdir, mesh, teacher=None):
        super().__init__(config, workdir, mesh, teacher)
        cfg = config.odsd
        check_choice(cfg.aps.selection, SELECTIONS, "odsd.aps.selection")
        check_choice(cfg.score, SCORES, "odsd.score")
        check_choice(cfg.lnr.rule, LNR_RULES, "odsd.lnr.rule")
        check_choice(cfg.lnr.apply_to, ("teacher", "both"), "odsd.lnr.apply_to")
        check_choice(cfg.lnr.tail, ("drop", "uniform"), "odsd.lnr.tail")
        if cfg.lnr.rule == "prior" and cfg.lnr.apply_to == "both":
            raise ValueError(
                "odsd.lnr.rule='prior' shifts the teacher's targets, which "
                "odsd.lnr.apply_to='both' (class dropping) does not use: pick one"
            )
        check_choice(cfg.tr.kind, TR_KINDS, "odsd.tr.kind")
        check_choice(cfg.tr.rel_space, REL_SPACES, "odsd.tr.rel_space")
        check_choice(cfg.sr.positives, SR_POSITIVES, "odsd.sr.positives")
        if config.data.transfer.source not in ("offline_pool", "shards", "segmnist_pool"):
            raise ValueError(
                f"config.data.transfer.source={config.data.transfer.source!r}: "
                f"ODSD samples from a pool (offline_pool, shards or segmnist_pool)"
            )
        bg = int(cfg.get("segmentation", {}).get("background", -1))
        if not -1 <= bg < config.num_classes:
            raise ValueError(
                f"config.odsd.segmentation.background={bg} must be a class in "
                f"[0, {config.num_classes}) or -1 (none)"
            )
        self.background = bg if bg >= 0 and self.segmentation else None
        self.views = 2 if cfg.sr.weight > 0 else 1
        size, ch = self.domain.image_size, self.domain.channels
        self.d_student = feature_shapes(self.student, size, ch)["pre_logits"][-1]
        self.d_teacher = feature_shapes(self.teacher_model, size, ch)["pre_logits"][-1]
        self.gamma = np.zeros((config.num_classes,), np.float32)  # SR pseudo-label gate

    # ----- heads -------------------------------------------------------------------------------
    def _uses_projector(self) -> bool:
        tr = self.config.odsd.tr
        return (
            tr.weight > 0
            and tr.kind in ("rel_kl", "crd_nce")
            and tr.rel_space == "feature"
            and self.d_student != self.d_teacher
        )

    @functools.cached_property
    def heads(self) -> dict:
        """L_TR's projector P (when the widths differ) and L_SR's MLP head."""
        heads = {}
        if self._uses_projector():
            heads["projector"] = (
                Projector(self.d_teacher, dense_name="proj"),
                np.zeros((2, self.d_student), np.float32),
            )
        if self.config.odsd.sr.weight > 0:
            heads["sr_head"] = (
                MLPHead(self.d_student, self.config.odsd.sr.proj_dim),
                np.zeros((2, self.d_student), np.float32),
            )
        return heads

    # ----- APS ---------------------------------------------------------------------------------
    def _size(self) -> int:
        size = int(self.config.odsd.aps.size)
        if size <= 0:
            raise ValueError(
                "config.odsd.aps.size (N, the number of pool images to sample) must be > 0"
            )
        return size

    def prepare(self):
        aps = self.config.odsd.aps
        spec = self.transfer_spec
        self.keep_ids, self.report = None, {}
        if aps.selection == "all":
            return
        num_classes = self.config.num_classes

        score = self.config.odsd.score
        use_aps = aps.selection == "aps" and score == "aps"
        # selection_quality.png compares every score, so the pass computes them all (a second,
        # feature-only pass over the pool): on the bundled pool, whose related sources are known.
        self._quality = (
            aps.selection == "aps"
            and self.config.odsd.diagnostics.plot
            and self.config.odsd.diagnostics.quality_plot
            and spec.source == "offline_pool"
        )
        kinds = None
        if self._quality:
            kinds = ("mahalanobis", "knn")
            if diagnostics.has_batch_norm(self.teacher_vars):
                kinds += ("bn",)
        elif score == "bn" and not diagnostics.has_batch_norm(self.teacher_vars):
            raise ValueError(
                f"config.odsd.score='bn' needs a teacher with BatchNorm; "
                f"{type(self.teacher_model).__name__} has none"
            )

        def score_fn():
            heap = heap_size(aps, self._size(), num_classes) if use_aps or self._quality else 0
            return pool.score_pool(
                self.workdir,
                spec,
                teacher_model=self.teacher_model,
                teacher_vars=self.teacher_vars,
                domain=self.domain,
                num_classes=num_classes,
                batch_size=aps.score_batch_size,
                heap_size=heap,
                ood=ood_spec(self.config.odsd, self._size(), num_classes, kinds)
                if aps.selection == "aps"
                else None,
                image_stats=self._image_stats,
            )

        if aps.selection == "random":
            rule = pool.random_rule(self._size(), self.config.seed, "config.odsd.aps.size")
        elif use_aps:
            rule = lambda scores: self._aps(scores, self._size())
        else:
            rule = lambda scores: select_by_score(
                scores, score, self._size(), num_classes, balance=aps.balance
            )
        selection, self.report = pool.select_transfer_set(
            self.workdir,
            spec,
            rule,
            score_fn=score_fn,
            num_classes=num_classes,
            rule_name=aps.selection if use_aps or aps.selection != "aps" else score,
            report_fn=self._report_extras,
            plot_title=(
                f"ODSD selection ({aps.selection}, score {score})"
                if self.config.odsd.diagnostics.plot
                else None
            ),
        )
        self.keep_ids = selection.ids
        gamma_path = fileio.join(self.workdir, "gate_thresholds.npy")
        if fileio.exists(gamma_path):  # the gate of the first selection (SR pseudo-labels)
            self.gamma = fileio.load_npy(gamma_path)

    def _head_weight(self):
        params = jax.tree.map(np.asarray, self.teacher_vars["params"])
        return head_kernel(
            params, self.d_teacher, self.config.num_classes, conv_1x1=self.segmentation
        )

    def _image_stats(self, logits, pixel_mask=None):
        """Per-image teacher statistics (`PoolScores`'s): a classifier's, or §5's over the
        pixels of a segmentation teacher."""
        if self.segmentation:
            return sampling.segmentation_image_statistics(
                logits, background=self.background, pixel_mask=pixel_mask
            )
        return sampling.image_statistics(logits)

    def _aps(self, scores: pool.PoolScores, size: int):
        aps = self.config.odsd.aps
        num_classes = self.config.num_classes
        out, gamma, filled = aps_selection(scores, size, num_classes, aps, self._head_weight())
        if filled:
            log.info(
                f"APS: the per-class candidates held fewer than N={size} images; "
                f"{filled} filled by global teacher confidence",
                tag="odsd",
            )
        counts = np.bincount(out["classes"], minlength=num_classes)
        quota = per_class_quota(size, num_classes)
        # segmentation's background is nobody's class: its quota always goes to the others
        short = {int(c): int(n) for c, n in enumerate(counts) if n < quota and c != self.background}
        if short:
            log.info(
                f"APS: classes below the quota n_c={per_class_quota(size, num_classes)} "
                f"(filled from other classes): {short}",
                tag="odsd",
            )
        ungated = int((~out["gated"]).sum())
        if ungated:
            log.info(
                f"APS: {ungated} selected images are below their class gate "
                f"(shortfall filled from A_c \\ G_c)",
                tag="odsd",
            )
        self._candidates = out.get("candidates")  # every host holds them (§1F refresh)
        self.gamma = gamma
        if jax.process_index() == 0:  # written before selection.npz, which comes last
            fileio.save_npy_atomic(fileio.join(self.workdir, "gate_thresholds.npy"), gamma)
            if self._candidates is not None:
                fileio.save_npz_atomic(
                    fileio.join(self.workdir, "aps_candidates.npz"), self._candidates
                )
        self._aps_extra = {
            "selection_ungated": ungated,
            "selection_filled_by_confidence": filled,
            "selection_short_classes": {str(k): v for k, v in short.items()},
        }
        return pool.Selection(
            ids=out["ids"], classes=out["classes"], scores=out["scores"].astype(np.float32)
        )

    def _report_extras(self, scores, selection) -> dict:
        """APS's gate / fill counts and the BN-statistics distances of the selection and of a
        random pool subset of the same size."""
        report = dict(getattr(self, "_aps_extra", {}))
        dcfg = self.config.odsd.diagnostics
        spec = self.transfer_spec
        if getattr(self, "_quality", False):
            report["selection_quality"] = self._plot_quality(scores, selection)
        if dcfg.bn_images and diagnostics.has_batch_norm(self.teacher_vars):
            n = min(int(dcfg.bn_images), len(selection.ids))
            rng = np.random.default_rng(self.config.seed)
            chosen = np.sort(rng.choice(selection.ids, n, replace=False))
            random_ids = np.sort(rng.choice(scores.ids, n, replace=False))
            variables = jax.tree.map(np.asarray, self.teacher_vars)
            report["selection_bn_distance"] = diagnostics.bn_statistics_distance(
                self.teacher_model, variables, self._image_batches(spec, chosen)
            )
            report["random_bn_distance"] = diagnostics.bn_statistics_distance(
                self.teacher_model, variables, self._image_batches(spec, random_ids)
            )
            report["bn_distance_images"] = n
        else:
            report["selection_bn_distance"] = None
            report["random_bn_distance"] = None
        return report

    def _plot_quality(self, scores, selection) -> dict | None:
        """selection_quality.png: every score's related share as N varies (a figure never
        stops a run). Returns {score: {N: share}} for the report."""
        from kd_jax.data import offline

        cfg, size = self.config.odsd, self._size()
        try:
            rules = quality_rules(
                scores, cfg.aps, self.config.num_classes, self._head_weight(), aps_max_size=size
            )
            sizes = sorted(set(pool.QUALITY_SIZES) | {size})
            curves = pool.selection_quality(scores, rules, offline.RELATED_SOURCES, sizes)
            related = np.isin(np.asarray(scores.sources).astype(str), offline.RELATED_SOURCES)
            mark_share = float(related[np.isin(scores.ids, selection.ids)].mean())
            diagnostics.plot_selection_quality(
                fileio.join(self.workdir, pool.QUALITY_FILE),
                curves,
                pool_share=float(related.mean()),
                mark=(len(selection.ids), mark_share),
                title=f"ODSD selection quality (this run: score {cfg.score})",
            )
        except Exception as e:  # a figure must never stop a run
            log.info(f"{pool.QUALITY_FILE} not written: {e}", tag="odsd")
            return None
        return {k: {str(n): v for n, v in c.items()} for k, c in curves.items()}

    def _image_batches(self, spec, ids, batch: int = 256):
        """Pool images `ids` as the pool pass scored them (`image_size` square, segmentation
        too: a pool's images may differ in size, e.g. ImageNet's, and could not be batched at
        their own)."""
        ds, _ = pipeline.open_source(spec, spec.get("split", "train"), keep_ids=ids)
        domain = self.domain
        ds = ds.map(lambda e: pipeline.preprocess(e, domain, "none")).batch(batch)
        return ds.as_numpy_iterator()

    # ----- §1F adaptive refresh ------------------------------------------------------------------
    def _refresh_every(self) -> int:
        """Steps between refreshes: R epochs over D (0 = off)."""
        aps = self.config.odsd.aps
        if not aps.refresh_epochs or aps.selection != "aps" or self.config.odsd.score != "aps":
            return 0
        return int(aps.refresh_epochs) * max(1, -(-self._size() // self.config.batch_size))

    def _refresh_path(self, step: int) -> str:
        return fileio.join(self.workdir, f"selection_step{step:08d}.npz")

    def train_batches(self, start_step: int):
        every = self._refresh_every()
        if every:  # a resumed run continues on the selection in force at start_step
            latest = start_step // every * every
            while latest > 0 and not fileio.exists(self._refresh_path(latest)):
                latest -= every
            if latest > 0:
                self.keep_ids = pool.Selection.load(self._refresh_path(latest)).ids
        return super().train_batches(start_step)

    def update_transfer_set(self, state, step: int) -> bool:
        every = self._refresh_every()
        if not every or step == 0 or step % every or step >= self.num_steps():
            return False
        path = self._refresh_path(step)
        if fileio.exists(path):  # resumed exactly here: the refresh was already computed
            selection = pool.Selection.load(path)
        else:
            selection, report = self._refreshed_selection(state)
            if jax.process_index() == 0:
                selection.save(path)
                log.info(
                    f"step {step}: APS refresh kept {report['kept']}/{report['size']} "
                    f"images, mean KL(p_T||p_S) on candidates {report['mean_kl']:.4f}",
                    tag="odsd",
                )
        self.keep_ids = selection.ids
        return True

    def _refreshed_selection(self, state):
        """Re-ranks the saved APS candidates with the current student (same quota and gate
        priority as the first selection); every host computes the same selection."""
        aps = self.config.odsd.aps
        cand = getattr(self, "_candidates", None)
        if cand is None:  # a resumed run: the candidates saved with the first selection
            path = fileio.join(self.workdir, "aps_candidates.npz")
            if not fileio.exists(path):
                raise FileNotFoundError(
                    f"config.odsd.aps.refresh_epochs={aps.refresh_epochs} needs the APS "
                    f"candidates {path}, written with the first selection; this workdir's "
                    f"selection was made without them: start a new workdir"
                )
            cand = self._candidates = fileio.load_npz(path)
        spec = self.transfer_spec
        ds, count = pipeline.open_source(
            spec,
            spec.get("split", "train"),
            jax.process_index(),
            jax.process_count(),
            keep_ids=cand["ids"],
        )
        if count is None:
            count = int(ds.reduce(0, lambda n, _: n + 1))
        counts = parallel.allgather_ints(count)
        batches = pipeline.eval_batches(
            ds,
            host_count=count,
            max_host_count=int(counts.max()),
            local_batch=self.local_eval_batch,
            domain=self.domain,
        )
        rows = self._batched_disagreement.gather(
            state, self.teacher_vars, batches=batches, keep=("id",)
        )
        ids, kls = rows["id"], rows["kl"]
        order = np.argsort(ids)
        kl = pool.lookup(ids[order], kls[order], cand["ids"]).astype(np.float32)
        cls = jnp.asarray(cand["classes"])
        score = jnp.asarray(cand["scores"]) + aps.refresh_eta * sampling.rank01(
            jnp.asarray(kl), cls
        )
        size, num_classes = self._size(), self.config.num_classes
        idx = np.asarray(
            sampling.select_class_balanced(
                score,
                cls,
                per_class_quota(size, num_classes),
                num_classes,
                ids=jnp.asarray(cand["ids"].astype(np.int32)),
                priority=jnp.asarray(cand["passed"]),
                total=size,
            )
        )
        idx = idx[np.argsort(cand["ids"][idx], kind="stable")]
        selection = pool.Selection(
            ids=cand["ids"][idx],
            classes=cand["classes"][idx],
            scores=np.asarray(score)[idx].astype(np.float32),
        )
        if len(selection.ids) < len(self.keep_ids):  # heaps smaller than N: keep the fill-up
            extra = np.setdiff1d(self.keep_ids, cand["ids"])
            ids = np.concatenate([selection.ids, extra])
            classes = np.concatenate([selection.classes, np.full(len(extra), -1, np.int32)])
            order = np.argsort(ids, kind="stable")
            selection = pool.Selection(ids=ids[order], classes=classes[order])
        report = {
            "kept": int(np.isin(selection.ids, self.keep_ids).sum()),
            "size": len(selection.ids),
            "mean_kl": float(kl.mean()),
        }
        return selection, report

    def _disagreement(self, state, teacher_vars, batch):
        """Per image KL(p_T ‖ p_S) at temperature 1 (eval-mode student); segmentation: its
        mean over the pixels."""
        t_logits, _ = self.teacher_apply(teacher_vars, batch["image"])
        (s_logits, _), _ = self.student_apply(
            state.params, state.batch_stats, batch["image"], False
        )
        logp_t = jax.nn.log_softmax(at_least_float32(t_logits), -1)
        logp_s = jax.nn.log_softmax(at_least_float32(s_logits), -1)
        kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), -1)
        return {"kl": kl.reshape(kl.shape[0], -1).mean(-1)}

    @functools.cached_property
    def _batched_disagreement(self) -> inference.BatchedApply:
        return inference.BatchedApply(self._disagreement, self.mesh)

    # ----- data --------------------------------------------------------------------------------
    def transfer_source(self):
        return pool.open_transfer_set(
            self.transfer_spec, self.keep_ids, jax.process_index(), jax.process_count()
        )

    # ----- the loss ----------------------------------------------------------------------------
    def loss(self, params, batch_stats, batch, rng, teacher_vars, step):
        cfg = self.config.odsd
        tau = self.config.kd.temperature
        x1 = batch["image"]
        b = x1.shape[0]
        t_logits, t_feats = self.teacher_apply(teacher_vars, x1)
        x = jnp.concatenate([x1, batch["image2"]]) if self.views == 2 else x1
        (s_logits_all, s_feats_all), model_stats = self.student_apply(
            params, batch_stats, x, True, rng=rng
        )
        # Heads a step does not apply keep their (empty) statistics.
        new_stats = dict({name: batch_stats[name] for name in self.heads}, model=model_stats)
        s_logits = s_logits_all[:b]
        f_s_all = at_least_float32(s_feats_all["pre_logits"])
        f_s = f_s_all[:b]
        lnr = cfg.lnr
        rule = dict(
            rule=lnr.rule,
            rho=lnr.rho,
            k=lnr.k or None,
            threshold=lnr.threshold,
            k_max=lnr.k_max or None,
            tail=lnr.tail,
        )
        if self.segmentation:
            # §5: per-image conf / class over the pixels (for L_TR's weights, L_SR's positives);
            # LNR per pixel. `valid`: 0 where the crop padded the pool image.
            valid = batch.get("valid")
            pixel_w = jnp.ones(t_logits.shape[:-1]) if valid is None else valid
            stats = sampling.segmentation_image_statistics(t_logits, self.background, valid)
            conf, pred = stats["confidence"], stats["pred"]
            agree = s_logits.argmax(-1) == t_logits.argmax(-1)
            metrics = {
                "teacher_agreement": _masked_mean(agree, pixel_w),
                "teacher_confidence": jnp.mean(conf),
            }
            l_ln, targets, kept = losses.pixel_low_noise_loss(
                s_logits,
                t_logits,
                tau,
                pixel_mask=valid,
                apply_to=lnr.apply_to,
                confidence_weight=lnr.confidence_weight,
                **rule,
            )
            kept_classes = _masked_mean(jnp.sum(kept, -1), pixel_w)
        else:
            p_t = jax.nn.softmax(at_least_float32(t_logits), -1)
            conf = jnp.max(p_t, -1)
            pred = jnp.argmax(t_logits, -1)
            metrics = {
                "teacher_agreement": jnp.mean(s_logits.argmax(-1) == pred),
                "teacher_confidence": jnp.mean(conf),
            }

            # LNR (§2)
            targets, kept = losses.low_noise_targets(t_logits, tau, **rule)
            w_ln = conf / jnp.mean(conf) if lnr.confidence_weight else None
            if lnr.apply_to == "both":
                l_ln = losses.kd_loss(
                    s_logits, t_logits, tau, class_mask=kept, weights=w_ln, mask_student=True
                )
            else:
                l_ln = losses.soft_target_cross_entropy(s_logits, targets, tau, weights=w_ln)
            kept_classes = jnp.mean(jnp.sum(kept, -1))
        metrics.update(lnr=l_ln, lnr_kept_classes=kept_classes)
        total = l_ln

        # L_TR (§3a): teacher structure -> student
        tr = cfg.tr
        if tr.weight > 0:
            w_tr = conf if tr.confidence_weight else None
            if tr.rel_space == "lnr_prob":
                e_t = targets
                e_s = jax.nn.softmax(s_logits / tau, -1)
                if self.segmentation:  # an image's distribution: its pixels' mean
                    e_t, e_s = _pixel_mean(e_t, pixel_w), _pixel_mean(e_s, pixel_w)
            else:
                e_t = at_least_float32(t_feats["pre_logits"])
                e_s = f_s
                if "projector" in self.heads:
                    e_s, new_stats["projector"] = self.apply_head(
                        "projector", params, batch_stats, f_s, True
                    )
            if tr.kind == "rel_kl":
                l_tr = losses.relation_kl_loss(e_s, e_t, tr.temperature, weights=w_tr)
            elif tr.kind == "crd_nce":
                l_tr = losses.info_nce(
                    e_s, jax.lax.stop_gradient(e_t), tr.nce_temperature, weights=w_tr
                )
            else:
                l_tr = tr.rkd_distance * losses.rkd_distance_loss(
                    e_s, e_t, weights=w_tr
                ) + tr.rkd_angle * losses.rkd_angle_loss(e_s, e_t, weights=w_tr)
            metrics["tr"] = l_tr
            total = total + tr.weight * l_tr

        # L_SR (§3b): student self-relations over two views
        sr = cfg.sr
        if sr.weight > 0:
            z, new_stats["sr_head"] = self.apply_head("sr_head", params, batch_stats, f_s_all, True)
            positives = None
            if sr.positives == "pseudo_label":
                gamma = jnp.asarray(self.gamma)
                positives = jnp.where(conf >= gamma[pred], pred, -1)
            l_sr = losses.nt_xent(z[:b], z[b:], sr.temperature, positives=positives)
            metrics["sr"] = l_sr
            total = total + sr.weight * l_sr
        return total, (new_stats, metrics)

    def results(self, state) -> dict:
        out = {"selection": self.report} if self.report else {}
        if self.segmentation and self.teacher_info.get("miou") is not None:
            out["teacher_miou"] = self.teacher_info["miou"]
        return out


def _masked_mean(x, w):
    """Mean of x [B, H, W] over the pixels with w > 0 (0 when none)."""
    w = (w > 0).astype(jnp.float32)
    return jnp.sum(jnp.where(w > 0, x, 0).astype(jnp.float32)) / jnp.maximum(jnp.sum(w), 1.0)


def _pixel_mean(x, w):
    """[B, H, W, K] -> [B, K]: each image's mean over its pixels with w > 0."""
    w = (w > 0).astype(x.dtype)[..., None]
    return jnp.sum(jnp.where(w > 0, x, 0), (1, 2)) / jnp.maximum(jnp.sum(w, (1, 2)), 1.0)
