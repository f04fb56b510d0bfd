"""Pure distillation losses: arrays in, a scalar out (the notebook API).

    from kd_jax import losses
    loss = losses.kd_loss(student_logits, teacher_logits, temperature=4.0)

Imports only `jax` / `jax.numpy` (no Flax, no TensorFlow, no config). Every function works
under `jit`, `vmap` and `grad`, and batch-relational ones are over the global batch (equal on
1 or 8 devices under a sharded `jit`).

Conventions shared by all losses:
  * `weights` [B] (0/1 or real >= 0): rows with weight <= 0 are excluded (as anchors and as
    pair partners), so padded rows change nothing; reductions are sum_i w_i l_i / sum_i w_i.
  * "teacher" arguments are stop-gradient; `info_nce` / `nt_xent` stop nothing.
  * Computation is in float32 or wider; norms that can vanish are guarded (finite values and
    gradients for zero vectors, identical features and one-hot logits). B x B similarity
    matmuls use Precision.HIGHEST (float32-exact on GPU/TPU, whose default is TF32/bf16).
  * `rkd_angle_loss` is O(B^3 D) like the reference (method="exact"); method="gram" is the
    O(B^2 D + B^3) approximation for CPUs. Memory stays O(chunk * B * max(B, D)) either way.

Modules: `distill` (KD, class dropping, low-noise targets, features), `segmentation` (per-pixel
cross-entropy, KD and ODSD's LNR with an ignore index), `relational` (RKD, SP,
PKT, relation KL, InfoNCE, NT-Xent/SupCon), `ncd` (Sinkhorn-Knopp, swapped prediction,
SCKD's replica similarity and pseudo-label synthesis, and the relation-based spatial mutual
information / self-cooperation), `generator` (DAFL's one-hot / activation / information
entropy, DFAD's adversarial gap, DeepInversion's BatchNorm-statistics matching).
"""

from kd_jax.losses.distill import (
    class_drop_mask,
    feature_loss,
    kd_loss,
    low_noise_targets,
    soft_target_cross_entropy,
)
from kd_jax.losses.generator import (
    activation_loss,
    adversarial_loss,
    batch_moments,
    bn_statistics_loss,
    information_entropy_loss,
    one_hot_loss,
)
from kd_jax.losses.ncd import (
    cross_similarity,
    cross_space_distillation,
    pseudo_label_kl,
    relation_matrix,
    self_cooperation_loss,
    sinkhorn_knopp,
    spatial_mutual_information,
    swapped_prediction_loss,
    synthesize_pseudo_labels,
)
from kd_jax.losses.relational import (
    info_nce,
    nt_xent,
    pkt_loss,
    relation_kl_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_pdist,
    similarity_preserving_loss,
)
from kd_jax.losses.segmentation import pixel_cross_entropy, pixel_kd_loss, pixel_low_noise_loss

__all__ = [
    "activation_loss",
    "adversarial_loss",
    "batch_moments",
    "bn_statistics_loss",
    "information_entropy_loss",
    "one_hot_loss",
    "class_drop_mask",
    "cross_similarity",
    "cross_space_distillation",
    "feature_loss",
    "info_nce",
    "kd_loss",
    "low_noise_targets",
    "nt_xent",
    "pixel_cross_entropy",
    "pixel_kd_loss",
    "pixel_low_noise_loss",
    "pkt_loss",
    "pseudo_label_kl",
    "relation_kl_loss",
    "relation_matrix",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_pdist",
    "self_cooperation_loss",
    "similarity_preserving_loss",
    "sinkhorn_knopp",
    "soft_target_cross_entropy",
    "spatial_mutual_information",
    "swapped_prediction_loss",
    "synthesize_pseudo_labels",
]
