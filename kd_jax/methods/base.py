"""What every method shares: the train state, the optimizer, the student, the frozen teacher,
the target-domain streams and the eval step. A method module subclasses `Method` and writes
only its paper: its transfer data and its `loss`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from kd_jax import checkpoint, inference, log, metrics, models, parallel
from kd_jax.data import pipeline, segmnist
from kd_jax.teacher import FrozenTeacher, load_teacher, teacher_workdir


@flax.struct.dataclass
class TrainState:
    """Everything a train step changes. `params` / `batch_stats` hold `{"model": student, ...
    extra trainable heads}`; the teacher is never here (never differentiated or checkpointed)."""

    step: jnp.ndarray
    params: Any
    batch_stats: Any
    opt_state: Any


def make_schedule(opt: ml_collections.ConfigDict, num_steps: int):
    """Learning-rate schedule: `cosine` (with linear warm-up), `step` (×`decay_factor` at the
    fractions `decay_at` of training, the DFND/CIFAR convention) or `constant`."""
    lr, warmup = opt.lr, int(opt.get("warmup_steps", 0))
    if opt.schedule == "cosine":
        base = optax.cosine_decay_schedule(
            lr, max(num_steps - warmup, 1), alpha=opt.get("end_lr", 0.0) / lr
        )
    elif opt.schedule == "step":
        base = optax.piecewise_constant_schedule(
            lr, {int(f * num_steps) - warmup: opt.get("decay_factor", 0.1) for f in opt.decay_at}
        )
    elif opt.schedule == "constant":
        base = optax.constant_schedule(lr)
    else:
        raise ValueError(
            f"config.optimizer.schedule={opt.schedule!r}: use cosine, step or constant"
        )
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), base], [warmup])
    return base


def make_optimizer(
    opt: ml_collections.ConfigDict, schedule, trainable=None
) -> optax.GradientTransformation:
    """SGD with PyTorch's coupled weight decay (decay added to the gradient before momentum),
    or AdamW; `grad_clip` > 0 first clips the global gradient norm (PyTorch's
    `clip_grad_norm_` order: before weight decay and momentum).

    `trainable` (top-level student module names, e.g. ViT's `blocks_11`, `norm`) freezes every
    other student parameter; the heads beside the student always train. Empty: all train.
    """
    if opt.name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(opt.weight_decay),
            optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.get("nesterov", False)),
        )
    elif opt.name == "adamw":
        tx = optax.adamw(schedule, weight_decay=opt.weight_decay)
    else:
        raise ValueError(f"config.optimizer.name={opt.name!r}: use sgd or adamw")
    clip = float(opt.get("grad_clip", 0.0))
    if clip < 0:
        raise ValueError(f"config.optimizer.grad_clip={clip}: use 0 (off) or a positive norm")
    tx = optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx
    return freeze(tx, trainable) if trainable else tx


def freeze(tx: optax.GradientTransformation, trainable) -> optax.GradientTransformation:
    """`tx` on the heads and on the student modules named in `trainable`; zero updates
    elsewhere in the student (`params["model"]`)."""
    trainable = tuple(trainable)

    def label(path, _):
        keys = [getattr(p, "key", str(p)) for p in path]
        if keys[0] != "model" or (len(keys) > 1 and keys[1] in trainable):
            return "train"
        return "freeze"

    return optax.multi_transform(
        {"train": tx, "freeze": optax.set_to_zero()},
        lambda params: jax.tree_util.tree_map_with_path(label, params),
    )


class Method:
    """Base class. Subclasses set `name`, override `transfer_source`/`loss` and may add heads."""

    name = "base"
    uses_teacher = True
    views = 1  # augmented views per transfer image (2 for contrastive terms)
    transfer_data = True  # streams config.data.transfer (False: synthesises its own inputs)

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str,
        mesh,
        teacher: FrozenTeacher | None = None,
    ):
        """`teacher`: the frozen teacher of a method that `uses_teacher`; None reads it from the
        finished teacher workdir (`kd_jax.teacher.load_teacher`)."""
        self.config, self.workdir, self.mesh = config, workdir, mesh
        self.domain = pipeline.domain_from_config(config.data)
        # Per-pixel labels and metrics (`data.target.task`): segmentation models, mIoU.
        self.segmentation = self.domain.task == "segmentation"
        if self.segmentation != (config.model.name in models.SEGMENTATION_MODELS):
            raise ValueError(
                f"config.data.target.task={self.domain.task!r} but config.model.name="
                f"{config.model.name!r}: segmentation needs one of "
                f"{sorted(models.SEGMENTATION_MODELS)} and they need it"
            )
        self.local_batch = parallel.check_batch_size(config.batch_size, mesh)
        self.local_eval_batch = parallel.check_batch_size(
            config.eval_batch_size, mesh, "eval_batch_size"
        )
        self.student = models.create_model(
            config.model.name,
            config.num_classes,
            dtype=_dtype(config),
            conv=config.model.get("conv", "auto"),
            conv_groups=mesh.size,
        )
        self.teacher = None
        if self.uses_teacher:
            self.teacher = (
                teacher
                if teacher is not None
                else load_teacher(config, workdir, mesh, dtype=_dtype(config))
            )
        self.teacher_model = self.teacher.model if self.teacher else None
        self.teacher_info = self.teacher.info if self.teacher else {}

    @functools.cached_property
    def teacher_vars(self):
        """The frozen variables every step reads beside the state (never differentiated or
        checkpointed): the teacher's, or a method's own frozen network (SCKD's replica)."""
        return self.teacher.variables if self.teacher else None

    # ----- teacher -----------------------------------------------------------------------------
    def teacher_workdir(self) -> str:
        return teacher_workdir(self.config, self.workdir)

    def teacher_apply(self, teacher_vars, images):
        """Frozen teacher forward in eval mode (running BN statistics), no gradient."""
        logits, feats = self.teacher_model.apply(teacher_vars, images, train=False)
        return jax.lax.stop_gradient(logits), jax.tree.map(jax.lax.stop_gradient, feats)

    @functools.cached_property
    def transfer_spec(self):
        """`config.data.transfer`, with SegMNIST's canvas pool resolved to its shards."""
        return segmnist.pool_spec(self.config.data.transfer)

    @property
    def pool_teacher_model(self):
        """The teacher as the pool scorer (`pool.score_pool`) sees it: itself for
        classification; for segmentation `ImageLevel`, whose image "logits" are the log of
        the mean pixel probabilities (softmax = the teacher's soft pixel share per class)."""
        return ImageLevel(self.teacher_model) if self.segmentation else self.teacher_model

    # ----- state -------------------------------------------------------------------------------
    def warm_start_source(self) -> str | None:
        """A finished run whose weights a fresh state starts from (None: its initialisation)."""
        return None

    def warm_start(self, state: TrainState) -> TrainState:
        """Called once on a fresh (not resumed) state, outside jit: the sub-trees saved in
        `warm_start_source()` replace the initialisation (see `checkpoint.warm_start`)."""
        src = self.warm_start_source()
        if not src:
            return state
        params, stats, kept = checkpoint.warm_start(state.params, state.batch_stats, src)
        log.info(
            f"warm start from {src}; kept the initialisation of "
            f"{[k for k in kept if not k.startswith('batch_stats')]}",
            tag=self.name,
        )
        opt_state = jax.jit(self.tx.init, out_shardings=parallel.replicated(self.mesh))(params)
        return TrainState(step=state.step, params=params, batch_stats=stats, opt_state=opt_state)

    @functools.cached_property
    def heads(self) -> dict:
        """Trainable modules beside the student, {name: (module, example input)}; built once,
        possibly inside a jit trace, so the example inputs are numpy arrays (never tracers)."""
        return {}

    def build_optimizer(self, num_steps: int) -> None:
        self.schedule = make_schedule(self.config.optimizer, num_steps)
        self.tx = make_optimizer(self.config.optimizer, self.schedule)

    def init_rng(self):
        """The key `init_state` is called with (a pure function of `config.seed`)."""
        return jax.random.split(jax.random.PRNGKey(self.config.seed))[0]

    def init_state(self, rng) -> TrainState:
        params, batch_stats = self.init_variables(rng)
        return TrainState(
            step=jnp.asarray(0, jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=self.tx.init(params),
        )

    def init_variables(self, rng):
        """The initial (params, batch_stats) of the student ("model") and the heads."""
        size, ch = self.domain.image_size, self.domain.channels
        x = jnp.zeros((2, size, size, ch), jnp.float32)
        rng, key = jax.random.split(rng)
        variables = self.student.init(key, x, train=False)
        params = {"model": variables["params"]}
        batch_stats = {"model": variables.get("batch_stats", {})}
        for name, (module, example) in self.heads.items():
            rng, key = jax.random.split(rng)
            v = module.init(key, example, train=False)
            params[name] = v["params"]
            batch_stats[name] = v.get("batch_stats", {})
        if _dtype(self.config) == jnp.float64:
            # A float64 run is float64 throughout: parameters (float32 at init), BatchNorm
            # statistics and, through them, the optimizer state.
            params, batch_stats = _as_dtype((params, batch_stats), jnp.float64)
        return params, batch_stats

    def student_apply(self, params, batch_stats, images, train: bool, rng=None):
        """Student forward -> ((logits, features), new student batch_stats); `rng` feeds
        dropout (MobileNetV2, WRN with dropout) in training."""
        variables = {"params": params["model"], "batch_stats": batch_stats["model"]}
        if train:
            rngs = {"dropout": rng} if rng is not None else {"dropout": jax.random.PRNGKey(0)}
            outputs, updates = self.student.apply(
                variables, images, train=True, mutable=["batch_stats"], rngs=rngs
            )
            return outputs, updates["batch_stats"]
        return self.student.apply(variables, images, train=False), batch_stats["model"]

    def apply_head(self, name, params, batch_stats, x, train: bool):
        """Head `name` of `heads` on `x` -> (output, its new batch_stats)."""
        module = self.heads[name][0]
        stats = batch_stats.get(name, {})
        variables = {"params": params[name]}
        if stats:
            variables["batch_stats"] = stats
            if train:
                out, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
                return out, updates["batch_stats"]
        return module.apply(variables, x, train=train), stats

    # ----- the step ----------------------------------------------------------------------------
    def loss(self, params, batch_stats, batch, rng, teacher_vars, step):
        """-> (scalar loss, (new batch_stats, metrics dict)); `step` is the (traced) number
        of updates so far. Subclasses implement."""
        raise NotImplementedError

    def train_step(self, state: TrainState, teacher_vars, batch, base_rng):
        rng = jax.random.fold_in(base_rng, state.step)
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)
        (loss, (batch_stats, metrics)), grads = grad_fn(
            state.params, state.batch_stats, batch, rng, teacher_vars, state.step
        )
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm)
        return TrainState(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        ), metrics

    def eval_step(self, state: TrainState, batch):
        (logits, _), _ = self.student_apply(state.params, state.batch_stats, batch["image"], False)
        return _masked_hits(logits, batch)

    @functools.cached_property
    def _batched_eval(self) -> inference.BatchedApply:
        """`eval_step` compiled once, over padded eval batches."""
        return inference.BatchedApply(self.eval_step, self.mesh)

    def evaluate(self, state: TrainState) -> dict:
        """Metrics on the target eval split; must include `accuracy` (the headline number).
        Segmentation: `miou`, `pixel_accuracy` and `per_class_iou` from the confusion matrix
        summed over the eval set, and `accuracy` = pixel accuracy."""
        sums = self._batched_eval.sums(state, batches=self.eval_dataset())
        if self.segmentation:
            scores = metrics.segmentation_scores(sums["confusion"])
            return {"accuracy": scores["pixel_accuracy"], **scores}
        return {"accuracy": sums.get("correct", 0.0) / max(sums.get("count", 0.0), 1.0)}

    # ----- data --------------------------------------------------------------------------------
    def transfer_source(self):
        """-> (host-local raw dataset, host count) of the images the student trains on."""
        raise NotImplementedError

    def prepare(self) -> None:
        """One-off work before training (e.g. pool selection); results live in the workdir."""

    def update_transfer_set(self, state, step: int) -> bool:
        """Called before every step: a method may change the images it trains on (ODSD's
        adaptive refresh) and returns True, and the loop then rebuilds `train_batches(step)`."""
        del state, step
        return False

    def num_steps(self) -> int:
        return int(self.config.num_steps)

    def train_batches(self, start_step: int) -> Iterator[dict]:
        ds, count = self.transfer_source()
        counts = parallel.allgather_ints(count)
        steps_per_epoch = int(counts.min()) // self.local_batch
        self.transfer_size = int(counts.sum())
        return pipeline.train_iterator(
            ds,
            local_batch=self.local_batch,
            steps_per_epoch=steps_per_epoch,
            domain=self.domain,
            augment=self.config.data.augment,
            seed=self.config.seed,
            start_step=start_step,
            views=self.views,
            shuffle_buffer=self.config.data.get("shuffle_buffer", 16384),
            cache=self.config.data.get("cache", False),
        )

    def eval_dataset(self):
        target = self.config.data.target
        ds, count = pipeline.open_source(
            target, target.eval_split, jax.process_index(), jax.process_count()
        )
        limit = target.get("max_eval_examples", 0)
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

    def results(self, state) -> dict:
        """Extra entries for results.json."""
        return {}


def _dtype(config):
    name = config.get("dtype", "float32")
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
    if name not in dtypes:
        raise ValueError(f"config.dtype={name!r}: use float32, bfloat16 or float64")
    if name == "float64" and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "config.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 or run "
            "inside `jax.enable_x64(True)` (float64 runs are for invariance tests)"
        )
    return dtypes[name]


def _as_dtype(tree, dtype):
    """Floating leaves of `tree` cast to `dtype` (integers, e.g. step counters, unchanged)."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def _masked_hits(logits, batch) -> dict:
    """{correct, count} of one padded batch (padding rows weigh 0); segmentation logits
    [B, H, W, C] count pixels (ignore-index pixels not) and add the batch's `confusion`."""
    if logits.ndim == 4:
        pred, label = jnp.argmax(logits, -1), batch["label"]
        confusion = metrics.confusion_matrix(label, pred, logits.shape[-1], batch["mask"])
        return {
            "confusion": confusion,
            "correct": jnp.trace(confusion).astype(jnp.float32),
            "count": jnp.sum(confusion).astype(jnp.float32),
        }
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"correct": jnp.sum(correct * batch["mask"]), "count": jnp.sum(batch["mask"])}


class ImageLevel:
    """A segmentation model seen as an image classifier by the pool scorer: `apply` returns
    (log mean_pixels softmax(z), features), so the pooled `pre_logits` tap and the per-image
    statistics (`pred` = the class with the largest soft pixel share) keep their meaning."""

    def __init__(self, model):
        self.model = model

    def apply(self, variables, images, train: bool = False):
        logits, feats = self.model.apply(variables, images, train=train)
        share = jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), -1), axis=(1, 2))
        return jnp.log(jnp.maximum(share, 1e-30)), feats


def evaluate_variables(apply_fn, variables, batches, mesh) -> float:
    """Accuracy of a (teacher) model on padded eval batches; used for teacher_accuracy."""

    def step(variables, batch):
        logits, _ = apply_fn(variables, batch["image"], train=False)
        return _masked_hits(logits, batch)

    sums = inference.BatchedApply(step, mesh).sums(variables, batches=batches)
    return sums.get("correct", 0.0) / max(sums.get("count", 0.0), 1.0)
