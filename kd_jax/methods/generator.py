"""Generator-based data-free KD (DAFL, DFAD, DeepInversion-style BN matching) on the one loop.

A generator G (z -> an image in the teacher's domain, `kd_jax.models.generator`) and the student
are trained alternately inside one jitted step, the shape of Fast-Datafree's
`datafree/synthesis/*` + `datafree_kd.py`: every baseline is one objective with its own weights.

    step t:  g_steps × generator update   L_G = w_oh·L_oh + w_a·L_a + w_ie·L_ie
                                                 − w_adv·L_adv + w_bn·L_bn
             s_steps × student update      on G(z) for fresh z: KD (T = kd.temperature) or L1
                                           between logits (DFAD), images stop-gradient

The teacher is frozen (eval mode, running BatchNorm statistics; its outputs carry gradients to
G, its weights are never differentiated). Presets (`default_config(preset)`):

* `dafl`: one-hot + activation + information entropy, student KD (Chen et al., ICCV 2019).
* `dfad`: adversarial (G maximises the student–teacher L1 logit gap), student L1
  (Fang et al., 2019).
* `deepinv`: BatchNorm statistics + one-hot + adversarial, student KD; DeepInversion's
  objective (Yin et al., CVPR 2020) with a generator, as Fast-Datafree's `deepinv` weights
  (bn 10, oh 1, adv 1, T 20) — a teacher with BatchNorm only.

State: `params` / `batch_stats` = {"model": student, "generator": G}; `opt_state` =
{"student": ..., "generator": ...} (both checkpointed, so a run resumes exactly). There is no
transfer set: the batch stream carries only the latent vectors of a step, `{"z": [B, K, nz]}`
(K = g_steps + s_steps), drawn on the host as a pure function of (seed, step) — so a resumed
run sees the same z, and the batch axis is sharded over the mesh like any image batch.
Diagnostics at each eval: `samples.png` (a grid of generated images with the teacher's
labels) in the workdir, and the teacher's class histogram of generated images in
metrics.jsonl (`generated_class_histogram`, `generated_class_entropy`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kd_jax import config_utils, fileio, log, losses, models, parallel
from kd_jax.methods.base import Method, TrainState, _as_dtype, _dtype, make_optimizer, make_schedule
from kd_jax.models.bn_inputs import apply_with_bn_inputs

PRESETS = ("dafl", "dfad", "deepinv")
TERMS = ("one_hot", "activation", "entropy", "adversarial", "bn")


def default_config(preset: str = "dafl") -> ml_collections.ConfigDict:
    """`config.generator` of a preset (weights, student loss, step counts); the config files
    set the dataset's learning rates and latent size beside it."""
    config_utils.check_choice(preset, PRESETS, "generator.preset")
    weights = {
        "dafl": {"one_hot": 1.0, "activation": 0.1, "entropy": 5.0 / math.log(10.0)},
        "dfad": {"adversarial": 1.0},
        "deepinv": {"bn": 10.0, "one_hot": 1.0, "adversarial": 1.0},
    }[preset]
    return ml_collections.ConfigDict(
        {
            "preset": preset,
            "model": "dcgan",
            "latent_dim": 100,
            "ngf": 64,
            "g_steps": 1,  # generator updates per step
            "s_steps": 1,  # student updates per step, each on freshly generated images
            "weights": ml_collections.ConfigDict({t: float(weights.get(t, 0.0)) for t in TERMS}),
            # teacher feature of the activation term: DAFL's LeNet-5 uses the 120-d conv3
            # output (`stage3`), its ResNets the pooled features (`pre_logits`)
            "activation_feature": "pre_logits",
            "student_loss": "l1" if preset == "dfad" else "kd",  # kd (kd.temperature) | l1
            "optimizer": ml_collections.ConfigDict(
                {
                    "name": "adamw",  # Adam (weight_decay 0), as every reference code
                    "lr": 1e-3,
                    "weight_decay": 0.0,
                    "schedule": "constant",
                    "warmup_steps": 0,
                    "decay_at": (0.4, 0.8),
                    "decay_factor": 0.1,
                    "grad_clip": 0.0,
                }
            ),
            "samples": 64,  # images in samples.png
            "eval_images": 1024,  # generated images of the eval-time class histogram
        }
    )


class Generator(Method):
    name = "generator"
    transfer_data = False  # synthesises its inputs: no config.data.transfer to check or read

    def __init__(self, config, workdir, mesh, teacher=None):
        super().__init__(config, workdir, mesh, teacher=teacher)
        g = config.generator
        self.g = g
        config_utils.check_choice(g.student_loss, ("kd", "l1"), "generator.student_loss")
        unknown = set(g.weights) - set(TERMS)
        if unknown:
            raise ValueError(f"config.generator.weights: unknown terms {sorted(unknown)}; {TERMS}")
        if min(int(g.g_steps), int(g.s_steps)) < 1:
            raise ValueError("config.generator.g_steps and s_steps must be >= 1")
        if g.weights.bn > 0 and not jax.tree.leaves(self.teacher_vars.get("batch_stats", {})):
            raise ValueError(
                f"config.generator.weights.bn={g.weights.bn}: the teacher "
                f"({config.teacher.model}) has no BatchNorm statistics to match; use a "
                f"BatchNorm teacher (e.g. the `wrn` pair) or set the weight to 0"
            )
        self.generator = models.create_generator(
            g.model,
            self.domain.image_size,
            self.domain.channels,
            g.latent_dim,
            ngf=g.ngf,
            dtype=_dtype(config),
            conv=config.model.get("conv", "auto"),
            conv_groups=mesh.size,
        )
        self.steps_per_update = int(g.g_steps) + int(g.s_steps)

    # ----- state -------------------------------------------------------------------------------
    def build_optimizer(self, num_steps: int) -> None:
        s_steps, g_steps = int(self.g.s_steps), int(self.g.g_steps)
        student = make_schedule(self.config.optimizer, num_steps * s_steps)
        self.tx = make_optimizer(self.config.optimizer, student)
        self.schedule = lambda step: student(step * s_steps)  # per loop step (the log's lr)
        self.g_tx = make_optimizer(
            self.g.optimizer, make_schedule(self.g.optimizer, num_steps * g_steps)
        )

    def init_variables(self, rng):
        params, batch_stats = super().init_variables(rng)
        z = jnp.zeros((2, int(self.g.latent_dim)), jnp.float32)
        v = self.generator.init(jax.random.fold_in(rng, 7), z, train=False)
        gen = (v["params"], v["batch_stats"])
        if _dtype(self.config) == jnp.float64:
            gen = _as_dtype(gen, jnp.float64)
        params["generator"], batch_stats["generator"] = gen
        return params, batch_stats

    def init_state(self, rng) -> TrainState:
        params, batch_stats = self.init_variables(rng)
        opt_state = {
            "student": self.tx.init({"model": params["model"]}),
            "generator": self.g_tx.init(params["generator"]),
        }
        return TrainState(
            step=jnp.asarray(0, jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
        )

    # ----- networks ----------------------------------------------------------------------------
    def generate(self, g_params, g_stats, z):
        """G(z) in training mode (batch statistics) -> (images, G's new batch_stats)."""
        images, updates = self.generator.apply(
            {"params": g_params, "batch_stats": g_stats}, z, train=True, mutable=["batch_stats"]
        )
        return images, updates["batch_stats"]

    def _teacher_forward(self, teacher_vars, images, with_bn: bool):
        """Teacher in eval mode *with* gradient to the images (its weights constant)."""
        teacher_vars = jax.lax.stop_gradient(teacher_vars)
        if with_bn:
            (logits, feats), taps = apply_with_bn_inputs(
                self.teacher_model, teacher_vars, images, train=False
            )
            return logits, feats, taps
        logits, feats = self.teacher_model.apply(teacher_vars, images, train=False)
        return logits, feats, []

    # ----- the objectives ----------------------------------------------------------------------
    def generator_loss(
        self, g_params, g_stats, student_params, student_stats, z, rng, teacher_vars
    ):
        """L_G of the preset's weights on G(z) -> (scalar, (G's new batch_stats, metrics))."""
        w = self.g.weights
        images, new_g_stats = self.generate(g_params, g_stats, z)
        t_logits, t_feats, taps = self._teacher_forward(teacher_vars, images, w.bn > 0)
        terms = {}
        if w.one_hot:
            terms["one_hot"] = losses.one_hot_loss(t_logits)
        if w.activation:
            feature = self.g.activation_feature
            if feature not in t_feats:
                raise KeyError(
                    f"config.generator.activation_feature={feature!r}: the teacher's taps are "
                    f"{sorted(t_feats)}"
                )
            terms["activation"] = losses.activation_loss(t_feats[feature])
        if w.entropy:
            terms["entropy"] = losses.information_entropy_loss(t_logits)
        if w.adversarial:
            # the student in training mode (batch statistics, as DFAD's student.train()); its
            # BatchNorm updates are dropped: a generator update changes only the generator
            (s_logits, _), _ = self.student_apply(student_params, student_stats, images, True, rng)
            terms["adversarial"] = -losses.adversarial_loss(s_logits, t_logits)
        if w.bn:
            terms["bn"] = losses.bn_statistics_loss(
                [(*losses.batch_moments(x), mean, var) for _, x, mean, var in taps]
            )
        loss = sum(w[k] * v for k, v in terms.items())
        metrics = {f"g_{k}": v for k, v in terms.items()}
        return loss, (new_g_stats, metrics)

    def loss(self, params, batch_stats, batch, rng, teacher_vars, step):
        """The student's loss on a batch of (generated) images: KD or the L1 logit gap."""
        del step
        t_logits, _ = self.teacher_apply(teacher_vars, batch["image"])
        (s_logits, _), new_stats = self.student_apply(
            params, batch_stats, batch["image"], True, rng=rng
        )
        if self.g.student_loss == "kd":
            value = losses.kd_loss(s_logits, t_logits, temperature=self.config.kd.temperature)
        else:
            value = losses.adversarial_loss(s_logits, t_logits)
        agree = (s_logits.argmax(-1) == t_logits.argmax(-1)).mean()
        counts = jnp.bincount(t_logits.argmax(-1), length=self.config.num_classes)
        return value, (
            {"model": new_stats},
            {"s_loss": value, "teacher_agreement": agree, "class_balance": _balance(counts)},
        )

    # ----- the two updates and the step --------------------------------------------------------
    def generator_update(self, state: TrainState, teacher_vars, z, rng):
        """One Adam step of G on L_G(G(z)); the student and its statistics unchanged."""
        grad_fn = jax.value_and_grad(self.generator_loss, has_aux=True)
        (loss, (g_stats, metrics)), grads = grad_fn(
            state.params["generator"],
            state.batch_stats["generator"],
            state.params,
            state.batch_stats,
            z,
            rng,
            teacher_vars,
        )
        updates, g_opt = self.g_tx.update(
            grads, state.opt_state["generator"], state.params["generator"]
        )
        params = dict(
            state.params, generator=optax.apply_updates(state.params["generator"], updates)
        )
        return state.replace(
            params=params,
            batch_stats=dict(state.batch_stats, generator=g_stats),
            opt_state=dict(state.opt_state, generator=g_opt),
        ), dict(metrics, g_loss=loss, g_grad_norm=optax.global_norm(grads))

    def student_update(self, state: TrainState, teacher_vars, z, rng):
        """One student step on stop-gradient G(z) (G's statistics not updated: only the
        student changes)."""
        images, _ = self.generate(state.params["generator"], state.batch_stats["generator"], z)
        images = jax.lax.stop_gradient(images)
        student = {"model": state.params["model"]}
        stats = {"model": state.batch_stats["model"]}
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)
        (loss, (new_stats, metrics)), grads = grad_fn(
            student, stats, {"image": images}, rng, teacher_vars, state.step
        )
        updates, s_opt = self.tx.update(grads, state.opt_state["student"], student)
        student = optax.apply_updates(student, updates)
        return state.replace(
            params=dict(state.params, **student),
            batch_stats=dict(state.batch_stats, **new_stats),
            opt_state=dict(state.opt_state, student=s_opt),
        ), dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))

    def train_step(self, state: TrainState, teacher_vars, batch, base_rng):
        """g_steps generator updates, then s_steps student updates, each on its own z."""
        rng = jax.random.fold_in(base_rng, state.step)
        z, k, metrics = batch["z"], 0, {}
        for _ in range(int(self.g.g_steps)):
            state, m = self.generator_update(
                state, teacher_vars, z[:, k], jax.random.fold_in(rng, k)
            )
            metrics.update(m)
            k += 1
        for _ in range(int(self.g.s_steps)):
            state, m = self.student_update(state, teacher_vars, z[:, k], jax.random.fold_in(rng, k))
            metrics.update(m)
            k += 1
        return state.replace(step=state.step + 1), metrics

    # ----- data: latent vectors only -----------------------------------------------------------
    def transfer_source(self):
        raise NotImplementedError("the generator method has no transfer set (see train_batches)")

    def latents(self, step: int) -> np.ndarray:
        """This host's share of step `step`'s z [local B, K, nz]: a pure function of
        (seed, step), the same on any number of devices or hosts."""
        shape = (self.config.batch_size, self.steps_per_update, int(self.g.latent_dim))
        z = np.random.default_rng([int(self.config.seed), int(step)]).standard_normal(
            shape, np.float32
        )
        start = jax.process_index() * self.local_batch
        return z[start : start + self.local_batch]

    def train_batches(self, start_step: int) -> Iterator[dict]:
        self.transfer_size = 0
        step = start_step
        while True:
            yield {"z": self.latents(step)}
            step += 1

    # ----- diagnostics -------------------------------------------------------------------------
    @functools.cached_property
    def _sample_fn(self):
        def sample(params, batch_stats, teacher_vars, z):
            images, _ = self.generate(params["generator"], batch_stats["generator"], z)
            logits, _ = self.teacher_apply(teacher_vars, images)
            return images, logits.argmax(-1)

        return jax.jit(sample, out_shardings=parallel.replicated(self.mesh))

    def evaluate(self, state: TrainState) -> dict:
        """Student accuracy + the teacher's class histogram of `eval_images` generated images
        (batches of `batch_size`, as in training); writes samples.png."""
        out = super().evaluate(state)
        n, batch = int(self.g.eval_images), int(self.config.batch_size)
        rng = np.random.default_rng([int(self.config.seed), 2**31 - 1])
        counts = np.zeros(self.config.num_classes, np.int64)
        first = None
        for _ in range(max(1, -(-n // batch))):
            z = rng.standard_normal((batch, int(self.g.latent_dim)), np.float32)
            z = parallel.replicate(z, self.mesh)
            images, labels = jax.device_get(
                self._sample_fn(state.params, state.batch_stats, self.teacher_vars, z)
            )
            counts += np.bincount(labels, minlength=self.config.num_classes)
            if first is None:
                first = (images, labels)
        hist = counts / counts.sum()
        out["generated_class_histogram"] = hist.tolist()
        out["generated_class_entropy"] = float(-np.sum(hist[hist > 0] * np.log(hist[hist > 0])))
        if jax.process_index() == 0:
            save_samples(
                fileio.join(self.workdir, "samples.png"),
                first[0][: int(self.g.samples)],
                first[1][: int(self.g.samples)],
                title=f"{self.g.preset}: step {int(state.step)}",
            )
        return out

    def results(self, state) -> dict:
        return {
            "generator_params": int(sum(x.size for x in jax.tree.leaves(state.params["generator"])))
        }


def _balance(counts):
    """Entropy of the class histogram / log K (1 = balanced, 0 = one class)."""
    p = counts / jnp.maximum(counts.sum(), 1)
    ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return ent / math.log(max(counts.shape[0], 2))


def save_samples(path: str, images: np.ndarray, labels: np.ndarray, title: str = "") -> None:
    """A grid of images [N, H, W, C] (each min–max scaled to [0, 1]) titled by label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 1.0 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        x = np.asarray(images[i], np.float64)
        x = (x - x.min()) / max(x.max() - x.min(), 1e-12)
        ax.imshow(x[..., 0] if x.shape[-1] == 1 else x, cmap="gray" if x.shape[-1] == 1 else None)
        ax.set_title(str(int(labels[i])), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fileio.save_figure_atomic(path, fig)
    plt.close(fig)
    log.info(f"wrote {path}", tag="generator")


def offline_config(config_file: str, preset: str, flags: set) -> ml_collections.ConfigDict:
    """The offline benchmark's generator run (configs/dafl_mnist.py, dfad_mnist.py): LeNet-5 ->
    LeNet-5-half (or, with `wrn`, WRN-10-1 -> WRN-10-1-half), the teacher chained from
    teacher_mnist.py, and `config.generator` of `preset` with the MNIST settings of its paper."""
    smoke = "smoke" in flags
    c = config_utils.offline_student(config_file, "generator", smoke=smoke)
    c.data.transfer.source = "none"  # not read: the generator method synthesises its inputs
    c.generator = default_config(preset)
    c.generator.activation_feature = "stage3"  # DAFL's LeNet-5 feature: the 120-d conv3 output
    if "wrn" in flags:
        c.model.name, c.teacher.model = "wrn10_1_half", "wrn10_1"
        c.teacher.train.model.name = "wrn10_1"
        c.generator.activation_feature = "pre_logits"
    elif preset == "deepinv":
        raise ValueError(
            f"{config_file}: `deepinv` matches BatchNorm statistics; LeNet-5 has none: add `wrn`"
        )
    return c


def cifar_config(arg, config_file: str, dataset: str) -> ml_collections.ConfigDict:
    """configs/generator_cifar10.py / generator_cifar100.py: `preset` (dafl | dfad | deepinv)
    × one pair of the five-pair grid (`config_utils.CIFAR_PAIRS`), teacher chained from
    teacher_<dataset>.py; each preset with its paper's CIFAR settings (cited in the file)."""
    flags = config_utils.parse_arg(
        arg, PRESETS + tuple(config_utils.CIFAR_PAIRS) + ("smoke",), config_file
    )
    chosen = [p for p in PRESETS if p in flags]
    if len(chosen) > 1:
        raise ValueError(f"{config_file}: pick one preset of {list(PRESETS)}, got {chosen}")
    preset = chosen[0] if chosen else "dafl"
    teacher, student = config_utils.cifar_pair(flags, config_file)
    smoke = "smoke" in flags
    c = config_utils.base_config()
    c.method = "generator"
    c.model.name, c.teacher.model = student, teacher
    c.teacher.train = config_utils.sibling(
        config_file, f"teacher_{dataset}.py", teacher + (",smoke" if smoke else "")
    )
    config_utils.cifar_data(c, dataset)
    c.data.transfer.source = "none"  # not read: the generator synthesises its inputs
    c.generator = default_config(preset)
    c.optimizer.update(lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="step")
    if preset == "dafl":
        # DAFL README (CIFAR-10 / -100 commands): batch 1024, lr_G 0.02, lr_S 0.1 (SGD),
        # latent 1000, oh 0.05 / 0.5, ie 5 / 20 (log10 -> / ln 10 here), a 0.01 / 0.1;
        # 2,000 epochs there, 80k steps here (the kd_cifar schedule's length).
        ten = dataset == "cifar10"
        c.batch_size, c.num_steps = 1024, 80000
        c.generator.latent_dim = 1000
        c.generator.optimizer.lr = 0.02
        c.generator.weights.update(
            one_hot=0.05 if ten else 0.5,
            entropy=(5.0 if ten else 20.0) / math.log(10.0),
            activation=0.01 if ten else 0.1,
        )
        c.kd.temperature = 1.0
    else:
        # DFAD (VainF/Data-Free-Adversarial-Distillation, DFAD_cifar.py as recalled: batch 256,
        # nz 256, lr_S 0.1 SGD wd 5e-4, lr_G 1e-3 Adam, 5 student steps per generator step,
        # 500 epochs × 50 iterations); deepinv: Fast-Datafree scripts/deepinv_cifar.sh weights
        # (bn 10, oh 1, adv 1, T 20) on the same generator schedule.
        c.batch_size, c.num_steps = 256, 25000
        c.generator.latent_dim = 256
        c.generator.s_steps = 5
        c.generator.optimizer.update(lr=1e-3, schedule="step", decay_at=(0.4, 0.8))
        if preset == "deepinv":
            c.kd.temperature = 20.0
    c.log_every, c.eval_every, c.checkpoint_every = 100, 2000, 2000
    if smoke:
        c.batch_size, c.eval_batch_size, c.num_steps = 16, 16, 2
        c.generator.ngf, c.generator.eval_images, c.generator.samples = 8, 16, 16
        c.data.target.max_eval_examples = 32
        c.log_every = c.eval_every = c.checkpoint_every = 2
    return c
