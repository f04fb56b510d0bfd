"""FLOPs from XLA's cost analysis of compiled (never run) programs: a method's train step and the
teacher's forward. Shared by benchmarks/step_throughput.py and benchmarks/offline_cost.py.

The FLOPs functions (`step_cost`, `teacher_forward_flops`) lower and compile only: the state and
the teacher are shapes (`abstract_build`), nothing is initialised or executed, no checkpoint or
pool is read. `build` (step_throughput.py, which times the step) initialises a real state and a
teacher with random weights (speed and FLOPs do not depend on them).

Counting rules: XLA's cost analysis counts a loop body once, so the step is compiled with XLA's
own convolutions (`model.conv = "xla"`, the direct convolutions' multiply-adds) rather than the
CPU's chunked ones (a loop over the batch); a generator method's g_steps / s_steps updates are
unrolled Python loops inside its step, so all of them are counted. The per-device SPMD program is
counted, so the step's FLOPs are taken on the mesh given (a 1-device mesh counts the whole step
once; on n devices the replicated optimizer update is counted n times).
"""

from __future__ import annotations

import copy

import numpy as np


def flops_of(compiled) -> float | None:
    """The `flops` entry of a compiled program's cost analysis (None where not implemented)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends / versions do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    value = (cost or {}).get("flops")
    return float(value) if value and value > 0 else None


def one_device_mesh():
    import jax

    from kd_jax import parallel

    return parallel.make_mesh(jax.devices()[:1])


def random_teacher(config, mesh, abstract: bool = False):
    """`config.teacher.model` with random weights, replicated on `mesh`, as a FrozenTeacher;
    `abstract`: their shapes only (jax.ShapeDtypeStruct), for lowering without initialising."""
    import jax
    import jax.numpy as jnp

    from kd_jax import models, parallel
    from kd_jax.teacher import FrozenTeacher

    size, channels = config.data.image_size, config.data.channels
    model = models.create_model(
        config.teacher.model,
        config.num_classes,
        dtype=jnp.dtype(config.dtype),
        conv=config.model.get("conv", "auto"),
        conv_groups=mesh.size,
    )
    x = np.zeros((1, size, size, channels), np.float32)
    init = lambda: model.init(jax.random.PRNGKey(1), x, train=False)
    v = jax.eval_shape(init) if abstract else jax.device_get(init())
    variables = {"params": v["params"], "batch_stats": v.get("batch_stats", {})}
    if abstract:
        return FrozenTeacher(model, _replicated_shapes(variables, mesh), {"final_accuracy": None})
    return FrozenTeacher(model, parallel.replicate(variables, mesh), {"final_accuracy": None})


def _replicated_shapes(tree, mesh):
    import jax

    from kd_jax import parallel

    rep = parallel.replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), tree)


def build(config, mesh):
    """`train.build` of `config` with a random teacher and without the method's data work."""
    from kd_jax import train

    return train.build(
        config, "/tmp/kd_jax_xla_cost_unused", mesh, teacher=random_teacher(config, mesh),
        prepare=False,
    )  # fmt: skip


def abstract_build(config, mesh):
    """`build` with the state and the teacher as shapes only: what lowering needs, without
    running any initialisation (that would cost more than compiling the step)."""
    import jax

    from kd_jax import methods, parallel, train

    teacher = random_teacher(config, mesh, abstract=True)
    method = methods.get_method(config.method)(
        config, "/tmp/kd_jax_xla_cost_unused", mesh, teacher=teacher
    )
    method.build_optimizer(method.num_steps())
    state = _replicated_shapes(jax.eval_shape(method.init_state, method.init_rng()), mesh)
    rep = parallel.replicated(mesh)
    step = jax.jit(method.train_step, donate_argnums=(0,), out_shardings=(rep, rep))
    return train.Built(method, state, step)


def synthetic_batch(method, config, mesh, seed: int = 0) -> dict:
    """A global batch of the step's input shapes: the latent vectors of a generator method, else
    random images (a second view for two-view methods), labels and ids."""
    from kd_jax import parallel

    batch, size, channels = config.batch_size, config.data.image_size, config.data.channels
    rng = np.random.default_rng(seed)
    if hasattr(method, "latents"):  # a generator method's batch: its latent vectors only
        local = {"z": method.latents(0)}
    else:
        segmentation = config.data.target.get("task") == "segmentation"
        local = {
            "image": rng.normal(size=(batch, size, size, channels)).astype(np.float32),
            "label": rng.integers(0, config.num_classes, (batch, size, size)).astype(np.int32)
            if segmentation
            else rng.integers(0, config.num_classes, batch).astype(np.int64),
            "id": np.arange(batch, dtype=np.int64),
        }
    if getattr(method, "views", 1) == 2:
        local["image2"] = rng.normal(size=(batch, size, size, channels)).astype(np.float32)
    return parallel.global_batch(local, mesh)


def step_inputs(built, config, mesh) -> tuple:
    """(global batch, replicated rng) for `built.train_step` on synthetic data."""
    import jax

    from kd_jax import parallel

    batch = synthetic_batch(built.method, config, mesh)
    return batch, parallel.replicate(jax.random.PRNGKey(2), mesh)


def lower_step(built, config, mesh):
    """The jitted step of `built`, lowered on a synthetic batch (not compiled, not run)."""
    batch, key = step_inputs(built, config, mesh)
    return built.train_step.lower(built.state, built.method.teacher_vars, batch, key)


def xla_conv(config):
    """A copy of `config` with XLA's own convolutions (see the module docstring)."""
    c = copy.deepcopy(config)
    c.model.conv = "xla"
    return c


def step_cost(config, mesh=None) -> dict:
    """{"flops": FLOPs of one train step of `config` (per-device program on `mesh`, default one
    device), "extra_params": trainable parameters beside the student (a generator, a
    projector head), "student_params"}; compile-only."""
    import jax

    mesh = mesh or one_device_mesh()
    c = xla_conv(config)
    built = abstract_build(c, mesh)
    flops = flops_of(lower_step(built, c, mesh).compile())
    params = built.state.params
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    return {
        "flops": flops,
        "student_params": count(params["model"]),
        "extra_params": count({k: v for k, v in params.items() if k != "model"}),
        "extra_modules": sorted(k for k in params if k != "model"),
    }


def teacher_forward_flops(config, batch: int = 256, mesh=None) -> float | None:
    """FLOPs per image of the teacher's eval-mode forward (the pool pass's network), from the
    cost analysis of that forward compiled at `batch` images; compile-only."""
    import jax

    from kd_jax import parallel

    mesh = mesh or one_device_mesh()
    c = xla_conv(config)
    teacher = random_teacher(c, mesh, abstract=True)
    size, channels = c.data.image_size, c.data.channels
    x = parallel.global_batch({"image": np.zeros((batch, size, size, channels), np.float32)}, mesh)
    fwd = jax.jit(lambda v, x: teacher.model.apply(v, x, train=False))
    flops = flops_of(fwd.lower(teacher.variables, x["image"]).compile())
    return None if flops is None else flops * mesh.size / batch
