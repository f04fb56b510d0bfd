"""What every method shares: the train state, the optimizer, the student, the frozen teacher,
the target-domain streams and the eval step. A method module subclasses `Method` and writes
only its paper: its transfer data and its `loss`.
"""
from __future__ import annotations

from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from kd_jax import models, parallel
from kd_jax.data import pipeline
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
        base = optax.cosine_decay_schedule(lr, max(num_steps - warmup, 1),
                                           alpha=opt.get("end_lr", 0.0) / lr)
    elif opt.schedule == "step":
        base = optax.piecewise_constant_schedule(
            lr, {int(f * num_steps) - warmup: opt.get("decay_factor", 0.1) for f in opt.decay_at})
    elif opt.schedule == "constant":
        base = optax.constant_schedule(lr)
    else:
        raise ValueError(f"config.optimizer.schedule={opt.schedule!r}: use cosine, step or constant")
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), base], [warmup])
    return base


def make_optimizer(opt: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
    """SGD with PyTorch's coupled weight decay (decay added to the gradient before momentum),
    or AdamW; `grad_clip` > 0 first clips the global gradient norm (PyTorch's
    `clip_grad_norm_` order: before weight decay and momentum)."""
    if opt.name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(opt.weight_decay),
                         optax.sgd(schedule, momentum=opt.momentum or None,
                                   nesterov=opt.get("nesterov", False)))
    elif opt.name == "adamw":
        tx = optax.adamw(schedule, weight_decay=opt.weight_decay)
    else:
        raise ValueError(f"config.optimizer.name={opt.name!r}: use sgd or adamw")
    clip = float(opt.get("grad_clip", 0.0))
    if clip < 0:
        raise ValueError(f"config.optimizer.grad_clip={clip}: use 0 (off) or a positive norm")
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx


class Method:
    """Base class. Subclasses set `name`, override `transfer_source`/`loss` and may add heads."""

    name = "base"
    uses_teacher = True
    views = 1  # augmented views per transfer image (2 for contrastive terms)

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh,
                 teacher: FrozenTeacher | None = None):
        """`teacher`: the frozen teacher of a method that `uses_teacher`; None reads it from the
        finished teacher workdir (`kd_jax.teacher.load_teacher`)."""
        self.config, self.workdir, self.mesh = config, workdir, mesh
        self.domain = pipeline.domain_from_config(config.data)
        self.local_batch = parallel.check_batch_size(config.batch_size, mesh)
        self.local_eval_batch = parallel.check_batch_size(config.eval_batch_size, mesh,
                                                          "eval_batch_size")
        self.student = models.create_model(config.model.name, config.num_classes,
                                           dtype=_dtype(config),
                                           conv=config.model.get("conv", "auto"),
                                           conv_groups=mesh.size)
        self.teacher = None
        if self.uses_teacher:
            self.teacher = (teacher if teacher is not None
                            else load_teacher(config, workdir, mesh, dtype=_dtype(config)))
        self.teacher_model = self.teacher.model if self.teacher else None
        self.teacher_vars = self.teacher.variables if self.teacher else None
        self.teacher_info = self.teacher.info if self.teacher else {}

    # ----- teacher -----------------------------------------------------------------------------
    def teacher_workdir(self) -> str:
        return teacher_workdir(self.config, self.workdir)

    def teacher_apply(self, teacher_vars, images):
        """Frozen teacher forward in eval mode (running BN statistics), no gradient."""
        logits, feats = self.teacher_model.apply(teacher_vars, images, train=False)
        return jax.lax.stop_gradient(logits), jax.tree.map(jax.lax.stop_gradient, feats)

    # ----- state -------------------------------------------------------------------------------
    def warm_start(self, state: TrainState) -> TrainState:
        """Called once on a fresh (not resumed) state, outside jit: a method may load weights of
        another finished run into it (host arrays, so no large constants enter a compiled
        init). Default: unchanged."""
        return state

    def heads(self) -> dict:
        """Extra trainable modules beside the student ({name: (module, example input)})."""
        return {}

    def build_optimizer(self, num_steps: int) -> None:
        self.schedule = make_schedule(self.config.optimizer, num_steps)
        self.tx = make_optimizer(self.config.optimizer, self.schedule)

    def init_state(self, rng) -> TrainState:
        size, ch = self.domain.image_size, self.domain.channels
        x = jnp.zeros((2, size, size, ch), jnp.float32)
        rng, key = jax.random.split(rng)
        variables = self.student.init(key, x, train=False)
        params = {"model": variables["params"]}
        batch_stats = {"model": variables.get("batch_stats", {})}
        for name, (module, example) in self.heads().items():
            rng, key = jax.random.split(rng)
            v = module.init(key, example, train=False)
            params[name] = v["params"]
            batch_stats[name] = v.get("batch_stats", {})
        if _dtype(self.config) == jnp.float64:
            # A float64 run is float64 throughout: parameters (float32 at init), BatchNorm
            # statistics and, through them, the optimizer state.
            params, batch_stats = _as_dtype((params, batch_stats), jnp.float64)
        return TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                          batch_stats=batch_stats, opt_state=self.tx.init(params))

    def student_apply(self, params, batch_stats, images, train: bool, rng=None):
        """Student forward; `rng` feeds dropout (MobileNetV2, WRN with dropout) in training."""
        variables = {"params": params["model"], "batch_stats": batch_stats["model"]}
        if train:
            rngs = {"dropout": rng} if rng is not None else {"dropout": jax.random.PRNGKey(0)}
            (logits, feats), updates = self.student.apply(
                variables, images, train=True, mutable=["batch_stats"], rngs=rngs)
            return logits, feats, updates["batch_stats"]
        logits, feats = self.student.apply(variables, images, train=False)
        return logits, feats, batch_stats["model"]

    def head_apply(self, name, params, batch_stats, x, train: bool, new_stats: dict):
        module = self.heads()[name][0]
        variables = {"params": params[name], "batch_stats": batch_stats[name]}
        if train and batch_stats[name]:
            out, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
            new_stats[name] = updates["batch_stats"]
            return out
        new_stats[name] = batch_stats[name]
        return module.apply(variables, x, train=train)

    # ----- the step ----------------------------------------------------------------------------
    def loss(self, params, batch_stats, batch, rng, teacher_vars):
        """-> (scalar loss, (new batch_stats, metrics dict)). Subclasses implement."""
        raise NotImplementedError

    def train_step(self, state: TrainState, teacher_vars, batch, base_rng):
        rng = jax.random.fold_in(base_rng, state.step)
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)
        (loss, (batch_stats, metrics)), grads = grad_fn(
            state.params, state.batch_stats, batch, rng, teacher_vars)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm)
        return TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                          opt_state=opt_state), metrics

    def eval_step(self, state: TrainState, batch):
        logits, _, _ = self.student_apply(state.params, state.batch_stats, batch["image"], False)
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"correct": jnp.sum(correct * batch["mask"]), "count": jnp.sum(batch["mask"])}

    def evaluate(self, state: TrainState) -> dict:
        """Metrics on the target eval split; must include `accuracy` (the headline number)."""
        if not hasattr(self, "_eval_step"):
            self._eval_step = jax.jit(self.eval_step,
                                      out_shardings=parallel.replicated(self.mesh))
        correct = count = 0.0
        for local in self.eval_dataset().as_numpy_iterator():
            out = self._eval_step(state, parallel.global_batch(local, self.mesh))
            correct += float(out["correct"])
            count += float(out["count"])
        return {"accuracy": correct / max(count, 1.0)}

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
            ds, local_batch=self.local_batch, steps_per_epoch=steps_per_epoch, domain=self.domain,
            augment=self.config.data.augment, seed=self.config.seed, start_step=start_step,
            views=self.views, shuffle_buffer=self.config.data.get("shuffle_buffer", 16384),
            cache=self.config.data.get("cache", False))

    def eval_dataset(self):
        target = self.config.data.target
        ds, count = pipeline.open_source(target, target.eval_split, jax.process_index(),
                                         jax.process_count())
        limit = target.get("max_eval_examples", 0)
        if limit:  # a quick eval on the first examples of each host's share
            count = min(count, -(-limit // jax.process_count()))
        counts = parallel.allgather_ints(count)
        return pipeline.eval_batches(ds, host_count=count, max_host_count=int(counts.max()),
                                     local_batch=self.local_eval_batch, domain=self.domain)

    def results(self, state) -> dict:
        """Extra entries for results.json."""
        return {}


def _dtype(config):
    name = config.get("dtype", "float32")
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
    if name not in dtypes:
        raise ValueError(f"config.dtype={name!r}: use float32, bfloat16 or float64")
    if name == "float64" and not jax.config.read("jax_enable_x64"):
        raise ValueError("config.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 or run "
                         "inside `jax.enable_x64(True)` (float64 runs are for invariance tests)")
    return dtypes[name]


def _as_dtype(tree, dtype):
    """Floating leaves of `tree` cast to `dtype` (integers, e.g. step counters, unchanged)."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def evaluate_variables(apply_fn, variables, batches, mesh) -> float:
    """Accuracy of a (teacher) model on padded eval batches; used for teacher_accuracy."""
    @jax.jit
    def step(variables, batch):
        logits, _ = apply_fn(variables, batch["image"], train=False)
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return jnp.sum(correct * batch["mask"]), jnp.sum(batch["mask"])

    correct = count = 0.0
    for local in batches.as_numpy_iterator():
        c, n = step(variables, parallel.global_batch(local, mesh))
        correct, count = correct + float(c), count + float(n)
    return correct / max(count, 1.0)
