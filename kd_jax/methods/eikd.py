"""EIKD: explicit and implicit knowledge distillation via unlabeled data (Wang et al. 2023).

EIKD as kd_jax reconstructs it (every open choice a config switch). In one run:

1. Selection (`prepare`, §1): one streamed teacher pass over the open-world pool
   (`kd_jax.pool.score_pool`, the scorer every method shares), a score per image
   (`confidence` default; `entropy`, `energy`, `margin`), then either `balanced` selection
   (quota ⌊N/C⌋ per teacher-predicted class, shortfall filled from the global ranking) or
   DFND's `global` top-N, through `kd_jax.pool.select_transfer_set`: the selection is saved as
   `workdir/selection.npz` and reused on resume; its per-class histogram and diagnostics go to
   `workdir/selection_report.json` and results.json's `selection`.
   An optional per-batch keep-fraction then trains on the best-scored part of each batch.
2. Class dropping (§2): KD over each image's top-k teacher classes only (or the classes with
   p_T >= ε), both networks masked (`apply_to = both`) or only the teacher truncated
   (`apply_to = teacher`).
3. Explicit features (§3): L2-normalised penultimate features, a bias-free projector on the
   student side when the widths differ (trained with the student, unused at test time).
4. Implicit relations (§4): RKD distance + angle (λ_D = 25, λ_A = 50) on the projected student
   features vs the teacher's; similarity-preserving and relation-KL terms behind weights.

Objective (§5): L = λ_KD·L_KD-drop + λ_F·L_feat + λ_D·L_D + λ_A·L_A
(+ λ_SP·L_SP + λ_RKL·L_RKL), no hard-label term. DFND's optional noise-adaptation NLL is not implemented.

A kd_jax stabiliser, off by default: `aux_warmup_fraction` (linear ramp of the
feature + relation weights). configs/eikd_mnist.py clips the global gradient norm at 2 (the
engine's `optimizer.grad_clip`) because its BatchNorm-free LeNet-5-half student diverges to NaN
otherwise.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import log, losses, pool, sampling
from kd_jax.config_utils import check_choice
from kd_jax.methods.base import Method
from kd_jax.models.heads import Projector
from kd_jax.models.shapes import feature_shapes

SCORES = ("confidence", "entropy", "energy", "margin")
MODES = ("balanced", "global")
DROP_RULES = ("topk", "threshold", "none")
APPLY_TO = ("both", "teacher")
FEATURE_KINDS = ("l2sq", "cosine", "smooth_l1")
PROJECTOR = ("auto", "always", "none")


def default_config() -> ml_collections.ConfigDict:
    """`config.eikd`: every switch of the method, with the paper's defaults."""
    return ml_collections.ConfigDict(
        {
            "selection": {
                "size": 600000,  # N images kept from the pool (DFND: 600k of ImageNet)
                "mode": "balanced",  # balanced (⌊N/C⌋ per teacher class + global fill) | global
                "score": "confidence",  # confidence | entropy | energy | margin (higher = kept)
                "keep_fraction": 1.0,  # per batch, train on the best-scored ⌈f·B⌉ rows only
                "score_batch_size": 1024,  # batch of the teacher's scoring pass over the pool
            },
            "class_drop": {
                "rule": "topk",  # topk | threshold | none (plain KD)
                "k": 0,  # 0 = ⌈C/2⌉
                "threshold": 0.01,  # rule=threshold: keep classes with p_T >= ε (+ the argmax)
                "apply_to": "both",  # both (mask both softmaxes) | teacher (truncate T only)
            },
            "feature": {
                "tap": "pre_logits",  # features[...] key of both models
                "normalize": True,  # L2-normalise rows before the distance
                "kind": "l2sq",  # l2sq | cosine | smooth_l1
                "projector": "auto",  # auto (when widths differ) | always | none
            },
            "relation": {
                "after_projector": True,  # relations on projected student features
                "relation_kl_temperature": 0.5,
            },
            "weights": {
                "kd": 1.0,
                "feature": 1.0,
                "rkd_distance": 25.0,
                "rkd_angle": 50.0,
                "sp": 0.0,
                "relation_kl": 0.0,
            },
            # kd_jax's stabiliser (0 = off): ramp the feature + relation weights linearly from 0
            # over this fraction of the steps, since at initialisation the RKD gradients dwarf KD's
            # (configs/eikd_mnist.py clips the gradient norm instead).
            "aux_warmup_fraction": 0.0,
        }
    )


# ---------------------------------------------------------------------------------------------
# Pure pieces (unit-tested on their own)
# ---------------------------------------------------------------------------------------------


def drop_mask(teacher_logits, rule: str = "topk", k: int = 0, threshold: float = 0.01):
    """The kept classes K_i ([B, C] bool) of §2, or None for `rule = none` (plain KD).

    k = 0 means ⌈C/2⌉; k is clipped to [1, C].
    """
    check_choice(rule, DROP_RULES, "eikd.class_drop.rule")
    if rule == "none":
        return None
    num_classes = teacher_logits.shape[-1]
    if rule == "topk":
        k = int(k) or int(math.ceil(num_classes / 2))
        return losses.class_drop_mask(teacher_logits, k=min(max(k, 1), num_classes))
    return losses.class_drop_mask(teacher_logits, threshold=float(threshold))


def class_dropped_kd(
    student_logits,
    teacher_logits,
    temperature: float,
    rule: str = "topk",
    k: int = 0,
    threshold: float = 0.01,
    apply_to: str = "both",
    weights=None,
):
    """L_KD-drop = τ² · mean_i KL(softmax_K(z_T,i/τ) ‖ softmax_K(z_S,i/τ)) (EIKD §2).

    Returns (loss, mean |K_i|). k = C (or rule = none) is plain KD; k = 1 with `both` is 0.
    """
    check_choice(apply_to, APPLY_TO, "eikd.class_drop.apply_to")
    mask = drop_mask(teacher_logits, rule, k, threshold)
    loss = losses.kd_loss(
        student_logits,
        teacher_logits,
        temperature=temperature,
        class_mask=mask,
        weights=weights,
        mask_student=apply_to == "both",
    )
    kept = (
        jnp.asarray(teacher_logits.shape[-1], jnp.float32)
        if mask is None
        else jnp.mean(jnp.sum(mask, -1).astype(jnp.float32))
    )
    return loss, kept


def relation_terms(
    student_feats, teacher_feats, weights_cfg, relation_kl_temperature=0.5, weights=None
) -> dict:
    """The implicit-relation losses of §4 with a non-zero weight: {name: unweighted loss}.

    RKD distance / angle (lenscloth/RKD conventions), SP and relation KL come straight from
    `kd_jax.losses`; terms whose weight is 0 are not computed (RKD angle is O(B³)).
    """
    out = {}
    if weights_cfg["rkd_distance"]:
        out["rkd_distance"] = losses.rkd_distance_loss(student_feats, teacher_feats, weights)
    if weights_cfg["rkd_angle"]:
        out["rkd_angle"] = losses.rkd_angle_loss(student_feats, teacher_feats, weights)
    if weights_cfg["sp"]:
        out["sp"] = losses.similarity_preserving_loss(student_feats, teacher_feats, weights)
    if weights_cfg["relation_kl"]:
        out["relation_kl"] = losses.relation_kl_loss(
            student_feats, teacher_feats, temperature=relation_kl_temperature, weights=weights
        )
    return out


def batch_keep_weights(scores, keep_fraction: float):
    """0/1 row weights keeping the ⌈f·B⌉ best-scored rows of the (global) batch."""
    b = scores.shape[0]
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"config.eikd.selection.keep_fraction={keep_fraction} must be in (0, 1]")
    keep = max(1, int(math.ceil(keep_fraction * b)))
    idx = sampling.select_top_k(scores, keep)
    return jnp.zeros((b,), jnp.float32).at[idx].set(1.0)


def batch_scores(teacher_logits, kind: str):
    """Per-row selection score of a batch, same kinds and sign as `PoolScores.score`."""
    return {
        "confidence": sampling.confidence_score,
        "entropy": sampling.entropy_score,
        "energy": sampling.energy_score,
        "margin": sampling.margin_score,
    }[kind](teacher_logits)


def select_from_scores(
    pool_scores: pool.PoolScores, size: int, mode: str, score: str, num_classes: int
) -> pool.Selection:
    """§1: balanced (⌊N/C⌋ per teacher class, shortfall from the global ranking) or global
    top-N of the pool, by `score` (higher = kept; ties by smaller id)."""
    check_choice(mode, MODES, "eikd.selection.mode")
    check_choice(score, SCORES, "eikd.selection.score")
    m = len(pool_scores.ids)
    if m == 0:
        raise ValueError("the pool is empty: config.data.transfer names no images")
    if size <= 0:
        raise ValueError(f"config.eikd.selection.size={size} must be positive")
    if size > m:
        log.info(
            f"config.eikd.selection.size={size} exceeds the pool ({m} images): keeping all of it",
            tag="eikd",
        )
        size = m
    s = np.asarray(pool_scores.score(score), np.float32)
    ids = np.asarray(pool_scores.ids)
    if ids.max(initial=0) >= np.iinfo(np.int32).max:
        raise ValueError("pool ids must fit in int32 for selection")
    if mode == "global":
        idx = sampling.select_top_k(s, size, ids=ids.astype(np.int32))
    else:
        idx = sampling.select_class_balanced(
            s,
            np.asarray(pool_scores.pred, np.int32),
            size // num_classes,
            num_classes,
            ids=ids.astype(np.int32),
            total=size,
        )
    idx = np.asarray(jax.device_get(idx))
    order = np.argsort(ids[idx], kind="stable")  # stored sorted by id
    idx = idx[order]
    return pool.Selection(
        ids=ids[idx].astype(np.int64),
        classes=np.asarray(pool_scores.pred)[idx].astype(np.int32),
        scores=s[idx],
    )


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class EIKD(Method):
    name = "eikd"

    def __init__(self, config, workdir, mesh, teacher=None):
        super().__init__(config, workdir, mesh, teacher)
        e = config.eikd
        check_choice(e.feature.kind, FEATURE_KINDS, "eikd.feature.kind")
        check_choice(e.feature.projector, PROJECTOR, "eikd.feature.projector")
        check_choice(e.selection.score, SCORES, "eikd.selection.score")
        _ = self.heads  # built now: a bad feature tap or width fails before the pool pass

    # ----- projector ---------------------------------------------------------------------------
    def _tap_shape(self, model):
        tap = self.config.eikd.feature.tap
        shapes = feature_shapes(model, self.domain.image_size, self.domain.channels)
        if tap not in shapes:
            raise KeyError(
                f"config.eikd.feature.tap={tap!r} is not a feature of "
                f"{type(model).__name__} (taps: {sorted(shapes)})"
            )
        return shapes[tap]

    @functools.cached_property
    def heads(self) -> dict:
        """The projector of §3 (student tap -> teacher width), when a loss term uses it."""
        e = self.config.eikd
        mode = e.feature.projector
        w = e.weights
        uses_projection = w.feature or (
            e.relation.after_projector
            and any(w[k] for k in ("rkd_distance", "rkd_angle", "sp", "relation_kl"))
        )
        if not uses_projection:  # e.g. the DFND row: plain KD, no projector to train
            return {}
        s_shape, t_shape = self._tap_shape(self.student), self._tap_shape(self.teacher_model)
        if len(s_shape) != len(t_shape) or s_shape[:-1] != t_shape[:-1]:
            raise ValueError(
                f"config.eikd.feature.tap={self.config.eikd.feature.tap!r}: student "
                f"{s_shape} and teacher {t_shape} differ in rank or spatial "
                f"size; a projector only maps channels"
            )
        if mode == "none" or (mode == "auto" and s_shape[-1] == t_shape[-1]):
            if s_shape[-1] != t_shape[-1] and w.feature:
                raise ValueError(
                    f"config.eikd.feature.projector='none' but the student "
                    f"({s_shape[-1]}) and teacher ({t_shape[-1]}) widths differ"
                )
            return {}
        example = np.zeros((2,) + s_shape, np.float32)
        return {"projector": (Projector(features=t_shape[-1]), example)}

    def aux_scale(self, step):
        """Ramp of the feature + relation weights: 0 -> 1 over `aux_warmup_fraction` of training."""
        frac = float(self.config.eikd.get("aux_warmup_fraction", 0.0))
        if frac <= 0:
            return 1.0
        warm = max(1.0, frac * self.num_steps())
        return jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / warm)

    # ----- selection ---------------------------------------------------------------------------
    def prepare(self):
        transfer = self.config.data.transfer
        if transfer.source not in ("shards", "offline_pool"):
            raise ValueError(
                f"config.data.transfer.source={transfer.source!r}: EIKD selects "
                f"from an open-world pool (shards or offline_pool)"
            )
        sel_cfg = self.config.eikd.selection
        rule_name = f"{sel_cfg.mode}, {sel_cfg.score}"
        self.selection, self.report = pool.select_transfer_set(
            self.workdir,
            transfer,
            lambda scores: select_from_scores(
                scores, int(sel_cfg.size), sel_cfg.mode, sel_cfg.score, self.config.num_classes
            ),
            score_fn=self._score_pool,
            num_classes=self.config.num_classes,
            rule_name=rule_name,
            plot_title=f"EIKD selection ({rule_name})",
        )
        log.info(
            f"selection: {len(self.selection.ids)} images ({rule_name}); per class "
            f"{np.bincount(self.selection.classes, minlength=self.config.num_classes).tolist()}",
            tag="eikd",
        )

    def _score_pool(self) -> pool.PoolScores:
        return pool.score_pool(
            self.workdir,
            self.config.data.transfer,
            teacher_model=self.teacher_model,
            teacher_vars=self.teacher_vars,
            domain=self.domain,
            num_classes=self.config.num_classes,
            batch_size=int(self.config.eikd.selection.score_batch_size),
        )

    def transfer_source(self):
        return pool.open_transfer_set(
            self.config.data.transfer, self.selection.ids, jax.process_index(), jax.process_count()
        )

    # ----- the loss ----------------------------------------------------------------------------
    def loss(self, params, batch_stats, batch, rng, teacher_vars, step):
        e = self.config.eikd
        aux = self.aux_scale(step)
        w = e.weights
        tau = self.config.kd.temperature
        t_logits, t_feats = self.teacher_apply(teacher_vars, batch["image"])
        (s_logits, s_feats), new_model_stats = self.student_apply(
            params, batch_stats, batch["image"], True, rng=rng
        )
        new_stats = {"model": new_model_stats}
        metrics = {}

        row_w = None
        if e.selection.keep_fraction < 1.0:
            row_w = batch_keep_weights(
                batch_scores(t_logits, e.selection.score), float(e.selection.keep_fraction)
            )

        total = 0.0
        kd, kept = class_dropped_kd(
            s_logits,
            t_logits,
            tau,
            e.class_drop.rule,
            e.class_drop.k,
            e.class_drop.threshold,
            e.class_drop.apply_to,
            row_w,
        )
        total = total + w.kd * kd
        metrics.update(kd=kd, kept_classes=kept)

        tap = e.feature.tap
        f_t = t_feats[tap]
        f_s_raw = s_feats[tap]
        f_s = f_s_raw
        if "projector" in self.heads:
            f_s, new_stats["projector"] = self.apply_head(
                "projector", params, batch_stats, f_s_raw, True
            )
        if w.feature:
            feat = losses.feature_loss(
                f_s, f_t, normalize=e.feature.normalize, kind=e.feature.kind, weights=row_w
            )
            total = total + aux * w.feature * feat
            metrics["feature"] = feat
        rel_s = f_s if e.relation.after_projector else f_s_raw
        for name, value in relation_terms(
            rel_s, f_t, w, e.relation.relation_kl_temperature, row_w
        ).items():
            total = total + aux * w[name] * value
            metrics[name] = value
        metrics["teacher_agreement"] = (s_logits.argmax(-1) == t_logits.argmax(-1)).mean()
        return total, (new_stats, metrics)

    def results(self, state) -> dict:
        """The selection diagnostics (histograms, related share, ...) under `selection`."""
        return {"selection": self.report}
