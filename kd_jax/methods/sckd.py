"""Novel class discovery: the NCD protocol (two stages, UNO objective) and SCKD on top of it.

Novel class discovery (SCKD and its UNO base). Three registered methods share this module:

* `ncd_pretrain` (`NCDPretrain`, stage 1): supervised cross-entropy on the *known* classes,
  through the same cosine-prototype known head (logits = cos / 0.1) that stage 2 starts from.
* `uno` (`UNO`, stage 2, Fini et al. ICCV 2021): a known head of C_l normalised prototypes on
  the backbone features, and H parallel novel heads (MLP projector -> C_u normalised
  prototypes) plus H over-clustering heads (3·C_u prototypes). Two views per image; a labeled
  sample's target is its one-hot label over [C_l + C_u], an unlabeled sample's is zeros over
  the known classes and the Sinkhorn-Knopp assignment of the *other* view's novel logits
  (computed over the unlabeled part of the global batch). Loss = (swapped-prediction CE of the
  novel heads + that of the over-clustering heads) / 2, averaged over heads and views. The
  "best head" is the one with the lowest running cluster loss. Multi-crop (`ncd.num_small_crops`,
  UNO's `--multicrop`): small crops make no targets and predict both large views' (all the
  pairs averaged); the views' augmentation is `ncd.strong_views` / `ncd.strong_augment`.
* `sckd` (`SCKD`, a subclass of `UNO`): L = L_UNO + SCKD's cross-space terms. The default
  (`sckd.variant = replica`) is the paper's mechanism as three secondary sources describe it
  (sckd.md §6): a frozen replica of the stage-1 encoder scores every labeled x unlabeled pair
  of the batch, and each side's logits synthesise soft targets for the other side's head
  (L_k->n for the novel heads, L_n->k for the known head), weighted by β. `relations` is the
  earlier reconstruction from the abstract (§2-3: relation matrices of the two spaces aligned
  by InfoNCE and relation KL). At weight 0 either equals UNO exactly.

Data (`config.ncd`): the classes of one labeled source are split into known (labeled) and novel
(unlabeled) classes and relabeled to 0..C_l-1 (known) and C_l..C_l+C_u-1 (novel); each global
batch mixes a labeled and an unlabeled stream. Stage 2 chains stage 1 the way KD configs chain
their teacher: `kd_jax.run` trains `stage1_config(config)` (`ncd.pretrain.train` on this run's
data and split) into `<workdir>/pretrain` unless `ncd.pretrain.workdir` names a finished run;
discovery only reads it.

Evaluation (Hungarian matching, `kd_jax.metrics`): task-aware (novel samples only, the best
novel head; on the unlabeled train set and on the novel test images) and task-agnostic (the
whole test set, argmax over the concatenated [known; best novel head] logits; all / known /
novel) in both conventions papers report: `*_accuracy_uno` (UNO's: known images unmatched,
novel images matched among themselves) and `*_accuracy_global` (rKD's / GCD's: one matching
over everything). The headline `accuracy` is the task-aware novel accuracy on the unlabeled
train set (the number UNO's tables lead with); `confusion.png` in the workdir shows the
globally matched task-agnostic confusion matrix on the test set.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kd_jax import diagnostics, fileio, losses, metrics, parallel, prerequisites
from kd_jax.config_utils import check_choice
from kd_jax.data import pipeline
from kd_jax.data.splits import SPLIT_KEYS, class_split, hide_labels, remap_labels
from kd_jax.methods.base import Method, TrainState, make_optimizer, make_schedule
from kd_jax.models.heads import MLPHead
from kd_jax.models.layers import at_least_float32
from kd_jax.models.shapes import feature_shapes
from kd_jax.teacher import model_variables


def default_config(num_known: int = 5, num_novel: int = 5) -> ml_collections.ConfigDict:
    """The `ncd` (class split, UNO heads, stage chaining) and `sckd` (the SCKD terms) keys every
    NCD config starts from: `c.update(sckd.default_config(num_known=..., num_novel=...))`."""
    ncd = ml_collections.ConfigDict(
        {
            # Class split (original label ids). Explicit lists win; else the first `num_known`
            # classes of `classes` / `classes_file` / a `subset_seed`-ed choice from
            # `total_classes` / 0..num_known+num_novel-1 are known and the next `num_novel` novel.
            "known_classes": (),
            "novel_classes": (),
            "classes": (),
            "classes_file": "",
            "subset_seed": -1,
            "total_classes": 0,
            "num_known": num_known,
            "num_novel": num_novel,
            # Prototypes per novel head (0 = num_novel): an estimate of the novel class count.
            "num_clusters": 0,
            # Share of each batch from the labeled stream; 0 = proportional to the set sizes (UNO).
            "labeled_fraction": 0.0,
            # UNO heads: cosine logits / temperature, H novel heads + H over-clustering heads.
            "temperature": 0.1,
            "num_heads": 4,
            "overcluster_factor": 3,
            "hidden_dim": 2048,
            "proj_dim": 128,
            "sk_iters": 3,
            "sk_epsilon": 0.05,
            "head_loss_decay": 0.99,  # running per-head cluster loss -> the best head
            # Discovery views (`view_augments`). This default (view 1 as `data.augment`, view 2
            # plus SimCLR colour jitter, no small crops) is the one the offline MNIST numbers
            # were measured with; the CIFAR / ImageNet configs set UNO's published recipe
            # (`config_utils.ncd_uno_recipe`): both views strong and 2 small crops.
            "strong_views": "second",  # second | both: the large views `strong_augment` gets
            "strong_augment": "simclr",  # simclr | uno_cifar | uno_imagenet (pipeline)
            # UNO's multi-crop: small crops predict the large views' targets, make none of theirs.
            "num_small_crops": 0,
            "small_crop_size": 0,  # px; 0 = the recipe's (UNO: 18 CIFAR, 96 ImageNet)
            "small_crop_scale": (),  # area range; () = the recipe's (UNO: .3-.8 / .08-.5)
            "max_train_eval_examples": 0,  # 0 = the whole unlabeled train set in each eval
            # Top-level backbone modules that train (empty = all), e.g. ("blocks_11", "norm").
            "trainable": (),
            # Stage 1 may start from converted weights (e.g. DINO via kd_jax.tools.convert_torch).
            "backbone_workdir": "",
            # Discovery starts from stage 1: a finished run in `workdir`, or kd_jax.run trains
            # `stage1_config(config)` (from `train`) into <workdir>/pretrain first.
            "pretrain": ml_collections.ConfigDict(
                {"enabled": True, "workdir": "", "train": ml_collections.ConfigDict()}
            ),
        }
    )
    sckd = ml_collections.ConfigDict(
        {
            # replica: the paper's mechanism as three secondary sources describe it (sckd.md §6);
            # relations: the reconstruction from the abstract (§2-3), kept with its table.
            "variant": "replica",  # replica | relations
            # ----- variant = replica: L = L_UNO + beta * (L_k->n + L_n->k)
            # S_ij = cos(E_r(x_l,i), f(x_u,j)) with E_r the frozen stage-1 encoder (`replica`), or
            # with the current encoder on both sides (`current`, the paper's "no replica").
            "similarity": "replica",  # replica | current
            # similarity (the paper) | uniform (every pair 1) | random (U(0, 1) per step).
            "weights": "similarity",
            "normalize": True,  # S / max|S| over the batch's pairs (the reimplementation)
            "terms": "both",  # both | known_to_novel | novel_to_known
            "alpha": 0.1,  # q = softmax(alpha * sum_i S_ij z_i)
            "beta": 0.1,
            "kl_tau": 1.0,  # KL(q || softmax(z / kl_tau)); z = cosine logits / ncd.temperature
            # ----- variant = relations: L = L_UNO + w(t)(lambda_smi L_SMI + lambda_sc L_SC)
            "smi": "infonce",  # infonce | none
            "sc": "rel_kl",  # rel_kl | none
            # reliable (default): known -> novel among the labeled rows, novel -> known among the
            # unlabeled rows, i.e. each space teaches where it has a training signal. The spec's
            # `both` (every row, both ways) lets the known space, a poor clustering of the novel
            # images, pull the novel heads towards it.
            "direction": "reliable",  # reliable | both | known_to_novel | novel_to_known
            "space": "probs",  # probs | embeddings
            # all (the spec: the whole global batch) | unlabeled (a kd_jax option: the relations
            # only among the unlabeled samples). Applies to L_SMI, and to L_SC unless
            # direction=reliable, which picks its own rows.
            "samples": "all",
            "lambda_smi": 1.0,
            "lambda_sc": 1.0,
            "ramp_steps": 0,  # w(t): linear 0 -> 1 ramp of both weights (0 = no ramp)
            "space_temperature": 0.1,  # τ of r = softmax(logits / τ)
            "smi_temperature": 0.1,  # τ_m
            "sc_temperature": 0.1,  # τ_r
        }
    )
    return ml_collections.ConfigDict({"ncd": ncd, "sckd": sckd})


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------


def _l2n(x, axis=-1):
    # F.normalize semantics (x / max(|x|, 1e-12)); a zero row stays zero.
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


class Prototypes(nn.Module):
    """K L2-normalised prototypes; returns cosine similarities <x^, w^_k> in [-1, 1].

    UNO renormalises the prototype weights in place before every step; normalising inside the
    forward gives the same logits (the gradient then also flows through the normalisation).
    """

    num_prototypes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.num_prototypes))
        return _l2n(at_least_float32(x)) @ _l2n(w, axis=0)


class MultiHead(nn.Module):
    """H independent (projector -> normalised embedding -> prototypes) heads.

    Returns (logits [H, B, K] cosine similarities, embeddings [H, B, output_dim] L2-normalised).
    """

    num_heads: int
    num_prototypes: int
    hidden_dim: int
    output_dim: int

    @nn.compact
    def __call__(self, feats, train: bool = False):
        logits, embeds = [], []
        for h in range(self.num_heads):
            z = _l2n(
                MLPHead(self.hidden_dim, self.output_dim, batch_norm=True, name=f"proj_{h}")(
                    feats, train
                )
            )
            logits.append(Prototypes(self.num_prototypes, name=f"proto_{h}")(z))
            embeds.append(z)
        return jnp.stack(logits), jnp.stack(embeds)


class DiscoveryHeads(nn.Module):
    """The novel heads and the over-clustering heads of UNO (separate projectors each)."""

    num_heads: int
    num_novel: int
    overcluster_factor: int
    hidden_dim: int
    output_dim: int

    @nn.compact
    def __call__(self, feats, train: bool = False):
        novel = MultiHead(
            self.num_heads, self.num_novel, self.hidden_dim, self.output_dim, name="novel"
        )(feats, train)
        if self.overcluster_factor <= 0:
            return novel, None
        over = MultiHead(
            self.num_heads,
            self.num_novel * self.overcluster_factor,
            self.hidden_dim,
            self.output_dim,
            name="over",
        )(feats, train)
        return novel, over


# ---------------------------------------------------------------------------------------------
# Stage chaining
# ---------------------------------------------------------------------------------------------


def pretrain_workdir(config, workdir: str) -> str:
    """The stage-1 run a discovery run in `workdir` starts from."""
    return config.ncd.pretrain.workdir or fileio.join(workdir, "pretrain")


def stage1_config(config) -> ml_collections.ConfigDict:
    """The NCD stage-1 config of a discovery `config`: `ncd.pretrain.train` with the discovery
    run's dataset and class split (so a command-line override of either reaches both stages
    and they cannot disagree)."""
    cfg = config.ncd.pretrain.train.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.data.target = config.data.target.copy_and_resolve_references()
        for key in SPLIT_KEYS:
            cfg.ncd[key] = config.ncd[key]
    return cfg


# ---------------------------------------------------------------------------------------------
# Shared plumbing of both stages
# ---------------------------------------------------------------------------------------------


class _NCDBase(Method):
    uses_teacher = False

    def __init__(self, config, workdir, mesh, teacher=None):
        super().__init__(config, workdir, mesh, teacher)
        self.known, self.novel = class_split(config)
        self.num_known, self.num_novel = len(self.known), len(self.novel)
        # The novel heads' size: the number of novel classes, or an estimate of it (a wrong
        # one is an experiment of the paper's).
        self.num_clusters = config.ncd.get("num_clusters", 0) or self.num_novel
        self.feature_dim = int(
            feature_shapes(self.student, self.domain.image_size, self.domain.channels)[
                "pre_logits"
            ][-1]
        )

    @functools.cached_property
    def heads(self) -> dict:
        """The known head: cosine prototypes of the known classes on the backbone features."""
        return {"known": (Prototypes(self.num_known), self._feature_example())}

    def _feature_example(self):
        return np.zeros((2, self.feature_dim), np.float32)

    # ----- data --------------------------------------------------------------------------------
    def _source(self, split: str, classes, unlabeled=False):
        target = self.config.data.target
        ds, n = pipeline.open_source(
            target, split, jax.process_index(), jax.process_count(), classes=tuple(classes)
        )
        if n == 0:
            raise ValueError(
                f"config.data.target ({target.source} {target.get('name', '')!r} "
                f"split {split!r}) holds no image of classes {list(classes)[:10]}…"
            )
        ds = remap_labels(ds, self.known, self.novel)
        return (hide_labels(ds) if unlabeled else ds), n

    def _eval_stream(self, split: str, classes, limit: int = 0):
        ds, count = self._source(split, classes)
        if limit:  # a quick eval on the first examples of each host's share
            count = min(count, -(-limit // jax.process_count()))
        counts = parallel.allgather_ints(count)
        return pipeline.eval_batches(
            ds,
            host_count=count,
            max_host_count=int(counts.max()),
            local_batch=self.local_eval_batch,
            domain=self.domain,
        )

    def results(self, state):
        return {"known_classes": list(self.known), "novel_classes": list(self.novel)}

    def build_optimizer(self, num_steps: int) -> None:
        """As the base, but only the backbone modules named in `ncd.trainable` train."""
        self.schedule = make_schedule(self.config.optimizer, num_steps)
        self.tx = make_optimizer(
            self.config.optimizer, self.schedule, trainable=self.config.ncd.get("trainable", ())
        )


# ---------------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------------


class NCDPretrain(_NCDBase):
    """Supervised stage 1 on the labeled (known-class) training images.

    CE of the known head's cosine logits / `ncd.temperature` (UNO's `pretrain.py`). The
    backbone may start from `ncd.backbone_workdir` (e.g. DINO weights converted with
    `python -m kd_jax.tools.convert_torch`). Eval: accuracy on the known-class test images.
    """

    name = "ncd_pretrain"

    def warm_start_source(self):
        return self.config.ncd.get("backbone_workdir") or None

    def transfer_source(self):
        return self._source(self.config.data.target.train_split, self.known)

    def loss(self, params, batch_stats, batch, rng, teacher_vars, step):
        (_, feats), model_stats = self.student_apply(
            params, batch_stats, batch["image"], True, rng=rng
        )
        logits, known_stats = self.apply_head(
            "known", params, batch_stats, feats["pre_logits"], True
        )
        t = self.config.ncd.temperature
        ce = optax.softmax_cross_entropy_with_integer_labels(logits / t, batch["label"]).mean()
        acc = (logits.argmax(-1) == batch["label"]).mean()
        stats = dict(batch_stats, model=model_stats, known=known_stats)
        return ce, (stats, {"ce": ce, "train_accuracy": acc})

    def eval_step(self, state, batch):
        (_, feats), _ = self.student_apply(state.params, state.batch_stats, batch["image"], False)
        logits, _ = self.apply_head(
            "known", state.params, state.batch_stats, feats["pre_logits"], False
        )
        correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
        return {"correct": jnp.sum(correct * batch["mask"]), "count": jnp.sum(batch["mask"])}

    def eval_dataset(self):
        target = self.config.data.target
        return self._eval_stream(target.eval_split, self.known, target.get("max_eval_examples", 0))


# ---------------------------------------------------------------------------------------------
# Stage 2: UNO
# ---------------------------------------------------------------------------------------------


def view_augments(ncd) -> dict:
    """Batch key -> `pipeline.ViewAugment` of each discovery view, from `config.ncd`: the two
    large views "image" and "image2" (the first plain unless `strong_views = both`), then
    `num_small_crops` small crops "image_small_<i>" of the recipe's small-crop augmentation."""
    strong_views, recipe = ncd.get("strong_views", "second"), ncd.get("strong_augment", "simclr")
    check_choice(strong_views, ("second", "both"), "ncd.strong_views")
    check_choice(recipe, tuple(pipeline.STRONG_AUGMENTS), "ncd.strong_augment")
    num_small = ncd.get("num_small_crops", 0)
    if not isinstance(num_small, int) or num_small < 0:
        raise ValueError(f"config.ncd.num_small_crops={num_small!r}: use an integer >= 0")
    large, small = pipeline.STRONG_AUGMENTS[recipe]
    views = {"image": large if strong_views == "both" else pipeline.PLAIN_VIEW, "image2": large}
    if not num_small:
        return views
    size = ncd.get("small_crop_size", 0) or small.size
    scale = tuple(ncd.get("small_crop_scale", ()) or small.scale)
    if not isinstance(size, int) or size < 1:
        raise ValueError(
            f"config.ncd.small_crop_size={size!r}: set the small crops' side in px "
            f"(ncd.strong_augment={recipe!r} has no size of its own)"
        )
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(
            f"config.ncd.small_crop_scale={scale!r}: use (lo, hi) with 0 < lo <= hi <= 1"
        )
    small = dataclasses.replace(small, size=size, scale=scale)
    return dict(views, **{f"image_small_{i}": small for i in range(num_small)})


class UNO(_NCDBase):
    """UNO discovery (stage 2); see the module docstring."""

    name = "uno"
    views = 2  # the large views; `view_augments` adds any small crops

    def __init__(self, config, workdir, mesh, teacher=None):
        super().__init__(config, workdir, mesh, teacher)
        self.view_augments = view_augments(config.ncd)

    @functools.cached_property
    def heads(self):
        """The known head and the novel + over-clustering heads (`discovery`)."""
        n = self.config.ncd
        x = self._feature_example()
        return {
            "known": (Prototypes(self.num_known), x),
            "discovery": (
                DiscoveryHeads(
                    n.num_heads, self.num_clusters, n.overcluster_factor, n.hidden_dim, n.proj_dim
                ),
                x,
            ),
        }

    # ----- stage chaining ------------------------------------------------------------------------
    stage1_config = staticmethod(stage1_config)  # the stage `kd_jax.run` trains first

    def pretrain_workdir(self) -> str:
        return pretrain_workdir(self.config, self.workdir)

    def prepare(self):
        """Checks the finished stage-1 run that discovery starts from (only read here)."""
        if not self.config.ncd.pretrain.get("enabled", True):
            return
        workdir = self.pretrain_workdir()
        if not prerequisites.finished(workdir):
            raise FileNotFoundError(
                f"config.ncd.pretrain.workdir={workdir!r} holds no finished ncd_pretrain run "
                f"(results.json missing): kd_jax.run.run(config, workdir) (python -m "
                f"kd_jax.main) trains config.ncd.pretrain.train there first, or train one with "
                f"this config's `pretrain` argument"
            )
        known = fileio.read_json(fileio.join(workdir, "results.json")).get("known_classes")
        if known is not None and tuple(known) != self.known:
            raise ValueError(
                f"config.ncd.pretrain.workdir={workdir!r} was trained on known "
                f"classes {known}, this run's are {list(self.known)}"
            )

    def warm_start_source(self):
        return self.pretrain_workdir() if self.config.ncd.pretrain.get("enabled", True) else None

    def init_state(self, rng):
        state = super().init_state(rng)
        # The running per-head cluster loss (best-head choice) rides in batch_stats: it is
        # carried by every step, replicated and checkpointed, and never differentiated.
        stats = dict(
            state.batch_stats,
            head_loss={"ema": jnp.zeros((self.config.ncd.num_heads,), jnp.float32)},
        )
        return TrainState(
            step=state.step, params=state.params, batch_stats=stats, opt_state=state.opt_state
        )

    # ----- data: labeled + unlabeled streams in every batch ------------------------------------
    def transfer_source(self):
        split = self.config.data.target.train_split
        return self._source(split, self.known), self._source(split, self.novel, True)

    def train_batches(self, start_step: int) -> Iterator[dict]:
        (lab, n_lab), (unl, n_unl) = self.transfer_source()
        frac = self.config.ncd.labeled_fraction
        if frac <= 0:  # UNO concatenates both sets: the batch mirrors their sizes
            counts_l = parallel.allgather_ints(n_lab).sum()
            counts_u = parallel.allgather_ints(n_unl).sum()
            frac = counts_l / (counts_l + counts_u)
        b_lab = int(round(self.local_batch * frac))
        b_lab = min(max(b_lab, 1), self.local_batch - 1)
        b_unl = self.local_batch - b_lab
        self.transfer_size = int(parallel.allgather_ints(n_lab + n_unl).sum())
        data = self.config.data
        common = dict(
            domain=self.domain,
            augment=data.augment,
            start_step=start_step,
            view_augments=self.view_augments,
            shuffle_buffer=data.get("shuffle_buffer", 16384),
            cache=data.get("cache", False),
        )
        streams = []
        for ds, n, b, salt in ((lab, n_lab, b_lab, 0), (unl, n_unl, b_unl, 1)):
            per_epoch = int(parallel.allgather_ints(n).min()) // b
            if per_epoch < 1:
                raise ValueError(
                    f"config.batch_size={self.config.batch_size}: a host holds "
                    f"{n} {'labeled' if salt == 0 else 'unlabeled'} images, fewer "
                    f"than its share of a batch ({b})"
                )
            # Different seeds so the two streams do not shuffle/augment in lock-step.
            streams.append(
                pipeline.train_iterator(
                    ds,
                    local_batch=b,
                    steps_per_epoch=per_epoch,
                    seed=self.config.seed * 2 + salt,
                    **common,
                )
            )
        lab_it, unl_it = streams
        keys = (*self.view_augments, "label")
        while True:
            a, b = next(lab_it), next(unl_it)
            yield {k: np.concatenate([a[k], b[k]]) for k in keys}

    # ----- the step ----------------------------------------------------------------------------
    def _forward(self, params, batch_stats, images, train, rng=None):
        """One view -> (dict of head outputs, new batch_stats)."""
        (_, feats), model_stats = self.student_apply(params, batch_stats, images, train, rng=rng)
        f = feats["pre_logits"]
        known, known_stats = self.apply_head("known", params, batch_stats, f, train)
        ((novel, novel_z), over), disc_stats = self.apply_head(
            "discovery", params, batch_stats, f, train
        )
        out = {
            "feats": f,
            "known": known,
            "novel": novel,
            "novel_z": novel_z,
            "over": over[0] if over is not None else None,
        }
        stats = dict(batch_stats, model=model_stats, known=known_stats, discovery=disc_stats)
        return out, stats

    def _targets(self, known_logits_h, novel_logits, labels, labeled):
        """[H, B, C_l + K] targets of one view: one-hot labels for labeled rows; zeros over the
        known classes and Sinkhorn-Knopp over this view's novel logits for unlabeled rows."""
        n = self.config.ncd
        h, b, k = novel_logits.shape
        onehot = jax.nn.one_hot(jnp.where(labeled, labels, 0), self.num_known)
        onehot = onehot * labeled[:, None]
        sk = jax.vmap(
            lambda head_logits: losses.sinkhorn_knopp(
                head_logits,
                n_iters=n.sk_iters,
                epsilon=n.sk_epsilon,
                weights=(~labeled).astype(jnp.float32),
            )
        )(novel_logits)
        return jnp.concatenate(
            [
                jnp.broadcast_to(onehot, (h, b, self.num_known)),
                jnp.where(labeled[None, :, None], 0.0, sk),
            ],
            axis=-1,
        )

    def uno_loss(self, outs, labels):
        """-> (scalar UNO loss, per-head cluster loss [H], metrics).

        `outs`: the head outputs of each view, the two large views first, then any small crops.
        As UNO's multi-crop (`swapped_prediction` of its main_discover.py): targets come from
        the large views only, every view predicts each *other* large view's targets, and the
        CE is averaged over those 2·(V - 1) pairs, per head.
        """
        t = self.config.ncd.temperature
        labeled = labels >= 0
        h = self.config.ncd.num_heads
        pair = jax.vmap(functools.partial(losses.swapped_prediction_loss, temperature=t))

        def swapped(key):
            logits, targets = [], []
            for i, o in enumerate(outs):
                kh = jnp.broadcast_to(o["known"], (h, *o["known"].shape))
                logits.append(jnp.concatenate([kh, o[key]], axis=-1))
                if i < 2:
                    targets.append(self._targets(kh, o[key], labels, labeled))
            # Each call is the mean of two pairs: the large views predicting each other's
            # targets, then a small crop (its logits in both slots) predicting both large
            # views'. So the sum / (V - 1) is the mean over all pairs, and with no small crop
            # it is the two-view loss bit for bit (/ 1).
            total = pair(logits[0], logits[1], targets[0], targets[1])
            for small in logits[2:]:
                total = total + pair(small, small, targets[0], targets[1])
            return total / (len(outs) - 1)

        cluster = swapped("novel")
        if outs[0]["over"] is not None:
            over = swapped("over")
            loss = 0.5 * (cluster.mean() + over.mean())
        else:
            over, loss = jnp.zeros_like(cluster), cluster.mean()
        return loss, cluster, {"loss_cluster": cluster.mean(), "loss_overcluster": over.mean()}

    def extra_loss(self, outs, step, batch, frozen_vars, rng):
        """Terms added to the UNO objective (SCKD); UNO adds none. `outs`: the two views'
        `_forward` outputs; `frozen_vars`: `teacher_vars` (SCKD's replica)."""
        return 0.0, {}

    def loss(self, params, batch_stats, batch, rng, teacher_vars, step):
        outs, stats = [], batch_stats
        # Every view through the model in turn (its BN statistics too, as UNO's per-crop
        # forward does): the two large views, then any small crops.
        for key, view_rng in zip(
            self.view_augments, jax.random.split(rng, len(self.view_augments))
        ):
            out, stats = self._forward(params, stats, batch[key], True, view_rng)
            outs.append(out)
        loss, per_head, m = self.uno_loss(outs, batch["label"])
        # The added terms (SCKD) see the two large views only, as without small crops.
        extra, m_extra = self.extra_loss(
            tuple(outs[:2]), step, batch, teacher_vars, jax.random.fold_in(rng, 2)
        )
        out1 = outs[0]
        loss = loss + extra
        decay = self.config.ncd.head_loss_decay
        ema = batch_stats["head_loss"]["ema"]
        # The first step seeds the running loss; then an exponential moving average.
        first = jnp.all(ema == 0)
        ema = jnp.where(first, per_head, decay * ema + (1 - decay) * per_head)
        stats = dict(stats, head_loss={"ema": jax.lax.stop_gradient(ema)})
        labeled = batch["label"] >= 0
        known_acc = jnp.sum((out1["known"].argmax(-1) == batch["label"]) * labeled) / jnp.maximum(
            labeled.sum(), 1
        )
        m = dict(
            m,
            **m_extra,
            best_head=jnp.argmin(ema),
            known_train_accuracy=known_acc,
            labeled_fraction=labeled.mean(),
        )
        return loss, (stats, m)

    # ----- evaluation --------------------------------------------------------------------------
    def eval_step(self, state, batch):
        out, _ = self._forward(state.params, state.batch_stats, batch["image"], False)
        return {"known": out["known"], "novel": out["novel"]}

    def _predict(self, state, batches):
        """Known [N, C_l] and novel [H, N, C_u] logits and labels of the real images."""
        return self._batched_eval.gather(
            state, batches=batches, keep=("label",), batch_axes={"novel": 1}
        )

    def evaluate(self, state):
        target, n = self.config.data.target, self.config.ncd
        best = int(np.argmin(np.asarray(jax.device_get(state.batch_stats["head_loss"]["ema"]))))
        train_novel = self._predict(
            state,
            self._eval_stream(target.train_split, self.novel, n.get("max_train_eval_examples", 0)),
        )
        test = self._predict(
            state,
            self._eval_stream(
                target.eval_split, self.known + self.novel, target.get("max_eval_examples", 0)
            ),
        )
        is_novel = test["label"] >= self.num_known
        res = {"best_head": best}
        heads_train = [
            metrics.cluster_accuracy(train_novel["label"], p.argmax(-1))[0]
            for p in train_novel["novel"]
        ]
        heads_test = [
            metrics.task_aware_accuracy(test["label"], p.argmax(-1), is_novel)
            for p in test["novel"]
        ]
        res["novel_train_accuracy"] = heads_train[best]
        res["novel_test_accuracy"] = heads_test[best]
        res["novel_train_accuracy_heads"] = heads_train
        res["novel_test_accuracy_heads"] = heads_test
        # Task-agnostic: argmax over [known; best novel head] on the whole test set, scored in
        # both conventions papers report (metrics module docstring), each under its own name.
        pred = np.concatenate([test["known"], test["novel"][best]], axis=-1).argmax(-1)
        agn = metrics.task_agnostic_accuracies(test["label"], pred, range(self.num_known))
        for convention, scores in agn.items():
            for part in ("all", "known", "novel"):
                res[f"{part}_accuracy_{convention}"] = scores[part]
        res["accuracy"] = res["novel_train_accuracy"]
        if jax.process_index() == 0:
            diagnostics.plot_confusion(
                fileio.join(self.workdir, "confusion.png"),
                test["label"],
                pred,
                agn["global"]["mapping"],
                self.num_known,
                self.num_novel,
            )
        return res

    def results(self, state):
        return dict(super().results(state), pretrain_workdir=self.warm_start_source() or "")


# ---------------------------------------------------------------------------------------------
# SCKD
# ---------------------------------------------------------------------------------------------


def _mean_entropy(q, weights):
    """Mean entropy of the rows of q over the rows with weight > 0, in units of log(C) (1 =
    uniform targets, 0 = one-hot), stop-gradient (a diagnostic)."""
    q = jax.lax.stop_gradient(q)
    h = -jnp.sum(jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0), -1)
    return jnp.sum(h * weights) / jnp.maximum(jnp.sum(weights), 1.0) / np.log(q.shape[-1])


class SCKD(UNO):
    """UNO + SCKD's cross-space terms; `sckd.variant` picks the mechanism.

    `replica` (default; sckd.md §6): a frozen replica E_r of the stage-1 encoder (read from the
    stage-1 workdir, never trained, never checkpointed: `teacher_vars`) bridges the spaces.
    Per view, over the global batch, S_ij = cos(E_r(x_l,i), f(x_u,j)) / max|S| between the
    labeled rows i and the unlabeled rows j; L_k->n distils q_j = softmax(α Σ_i S_ij z_N(x_l,i))
    into the novel heads on the unlabeled rows, L_n->k distils q_i = softmax(α Σ_j S_ij
    z_K(x_u,j)) into the known head on the labeled rows (z = cosine logits / ncd.temperature,
    targets stop-gradient; per novel head, averaged over heads and views). L = L_UNO +
    β (L_k->n + L_n->k).

    `relations` (§2-3's reconstruction from the abstract): L = L_UNO + w(t)(λ_SMI L_SMI +
    λ_SC L_SC) on the relation matrices of the two spaces (r^K: known-prototype probabilities
    or backbone features; r^N: novel-prototype probabilities or head embeddings), over the
    whole global batch (`samples = unlabeled` restricts them to the unlabeled rows,
    `direction = reliable` routes L_SC's two directions to the labeled / unlabeled rows),
    averaged over views and heads, w(t) a linear ramp over `sckd.ramp_steps`.

    With β = 0 (or λ = 0) the loss and its gradients are UNO's exactly.
    """

    name = "sckd"

    def __init__(self, config, workdir, mesh, teacher=None):
        super().__init__(config, workdir, mesh, teacher)
        s = config.sckd
        check_choice(s.variant, ("replica", "relations"), "sckd.variant")
        if s.variant == "replica":
            choices = (
                ("similarity", s.similarity, ("replica", "current")),
                ("weights", s.weights, ("similarity", "uniform", "random")),
                ("terms", s.terms, ("both", "known_to_novel", "novel_to_known")),
            )
        else:
            choices = (
                ("smi", s.smi, ("infonce", "none")),
                ("sc", s.sc, ("rel_kl", "none")),
                (
                    "direction",
                    s.direction,
                    ("both", "known_to_novel", "novel_to_known", "reliable"),
                ),
                ("space", s.space, ("probs", "embeddings")),
                ("samples", s.samples, ("all", "unlabeled")),
            )
        for key, value, allowed in choices:
            check_choice(value, allowed, f"sckd.{key}")

    @property
    def uses_replica(self) -> bool:
        s = self.config.sckd
        return s.variant == "replica" and s.similarity == "replica" and bool(s.beta)

    @functools.cached_property
    def teacher_vars(self):
        """The frozen replica E_r: the stage-1 encoder, read from the stage-1 workdir (so a
        resumed run gets the same one, and no checkpoint holds a copy); without a finished
        stage 1 (`ncd.pretrain.enabled = False`, or `build(prepare=False)`), the encoder's own
        initialisation."""
        if not self.uses_replica:
            return None
        source = self.warm_start_source()
        # An unfinished stage 1 stops a real run in `prepare`; a step built without it (a
        # benchmark on synthetic batches) gets the initialisation, as without a stage 1.
        if source and prerequisites.finished(source):
            variables = model_variables(source)
            if self.config.get("dtype", "float32") == "float64":  # as the state (init_variables)
                variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables)
        else:
            params, stats = jax.jit(self.init_variables)(self.init_rng())
            variables = {"params": params["model"], "batch_stats": stats["model"]}
        return parallel.replicate(variables, self.mesh)

    def extra_loss(self, outs, step, batch, frozen_vars, rng):
        if self.config.sckd.variant == "replica":
            return self._replica_terms(outs, batch, frozen_vars, rng)
        return self._relation_terms(outs, step, batch["label"])

    # ----- variant = replica --------------------------------------------------------------------
    def _similarity(self, out, images, labeled, frozen_vars, rng):
        """[B, B] S of one view: rows = labeled anchors, columns = unlabeled queries."""
        s = self.config.sckd
        lab = labeled.astype(jnp.float32)
        if s.similarity == "replica":
            _, feats = self.student.apply(frozen_vars, images, train=False)
            anchors = feats["pre_logits"]
        else:
            anchors = out["feats"]
        sim = losses.cross_similarity(anchors, out["feats"], lab, 1.0 - lab, s.normalize)
        pairs = labeled[:, None] & ~labeled[None, :]
        if s.weights == "uniform":
            sim = pairs.astype(sim.dtype)
        elif s.weights == "random":
            sim = jnp.where(pairs, jax.random.uniform(rng, sim.shape, sim.dtype), 0.0)
        return sim

    def _replica_terms(self, outs, batch, frozen_vars, rng):
        s, t = self.config.sckd, self.config.ncd.temperature
        labeled = batch["label"] >= 0
        lab = labeled.astype(jnp.float32)
        zero = jnp.asarray(0.0)
        if not s.beta:  # not computed at all: the graph, loss and gradients are UNO's
            return 0.0, {"k2n": zero, "n2k": zero}
        unl = 1.0 - lab
        pairs = labeled[:, None] & ~labeled[None, :]
        n_pairs = jnp.maximum(jnp.sum(pairs), 1)
        m = {k: zero for k in ("k2n", "n2k", "similarity_mean", "similarity_std")}
        m.update(k2n_target_entropy=zero, n2k_target_entropy=zero)
        views = len(outs)
        for v, (out, key) in enumerate(zip(outs, ("image", "image2"))):
            sim = self._similarity(
                out, batch[key], labeled, frozen_vars, jax.random.fold_in(rng, v)
            )
            # How much S tells the pairs apart: all-similar weights synthesise one target for
            # every row (the batch's mean logits), whatever the row.
            mean = jnp.sum(sim) / n_pairs
            m["similarity_mean"] += mean / views
            m["similarity_std"] += (
                jnp.sqrt(jnp.sum(jnp.where(pairs, (sim - mean) ** 2, 0.0)) / n_pairs) / views
            )
            if s.terms in ("both", "known_to_novel"):
                zn = out["novel"] / t  # [H, B, C_u]
                q = jax.vmap(lambda z: losses.synthesize_pseudo_labels(sim, z, s.alpha))(zn)
                kl = jax.vmap(lambda qh, z: losses.pseudo_label_kl(qh, z, s.kl_tau, unl))(q, zn)
                m["k2n"] += kl.mean() / views
                m["k2n_target_entropy"] += _mean_entropy(q[0], unl) / views
            if s.terms in ("both", "novel_to_known"):
                zk = out["known"] / t
                q = losses.synthesize_pseudo_labels(sim.T, zk, s.alpha)
                m["n2k"] += losses.pseudo_label_kl(q, zk, s.kl_tau, lab) / views
                m["n2k_target_entropy"] += _mean_entropy(q, lab) / views
        return s.beta * (m["k2n"] + m["n2k"]), m

    # ----- variant = relations ------------------------------------------------------------------
    def spaces(self, out):
        """-> (r^K [B, C_l or D], r^N [H, B, C_u or D']) of one view."""
        s = self.config.sckd
        if s.space == "embeddings":
            return _l2n(at_least_float32(out["feats"])), out["novel_z"]
        tau = s.space_temperature
        return jax.nn.softmax(out["known"] / tau, -1), jax.nn.softmax(out["novel"] / tau, -1)

    def _relation_terms(self, outs, step, labels):
        s = self.config.sckd
        # `samples = unlabeled`: labeled rows leave every anchor set and softmax (weight 0).
        w = (labels < 0).astype(jnp.float32) if s.samples == "unlabeled" else None
        if s.direction == "reliable":
            # Each space teaches where it has a training signal: the known space its relations
            # among the labeled rows, the novel space among the unlabeled rows.
            lab = (labels >= 0).astype(jnp.float32)
            sc_parts = (("known_to_novel", lab), ("novel_to_known", 1.0 - lab))
        else:
            sc_parts = ((s.direction, w),)
        ramp = (
            jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / s.ramp_steps)
            if s.ramp_steps > 0
            else jnp.asarray(1.0)
        )
        smi = sc = jnp.asarray(0.0)
        # A term switched off or weighted 0 is not computed: then the graph, loss and gradients
        # are UNO's bit for bit (a weight-0 term would still reorder float sums).
        use_smi, use_sc = s.smi == "infonce" and s.lambda_smi, s.sc == "rel_kl" and s.lambda_sc
        for out in outs:
            r_k, r_n = self.spaces(out)
            if use_smi:
                smi += jax.vmap(
                    lambda rn: losses.spatial_mutual_information(
                        r_k, rn, temperature=s.smi_temperature, weights=w
                    )
                )(r_n).mean() / len(outs)
            if use_sc:
                sc += jax.vmap(
                    lambda rn: sum(
                        losses.self_cooperation_loss(
                            r_k, rn, temperature=s.sc_temperature, direction=d, weights=wd
                        )
                        for d, wd in sc_parts
                    )
                )(r_n).mean() / len(outs)
        extra = ramp * (s.lambda_smi * smi + s.lambda_sc * sc)
        return extra, {"smi": smi, "sc": sc, "ramp": ramp}
