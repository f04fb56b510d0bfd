"""The one training loop every method runs: mesh -> method -> state -> step -> loop -> results.

`train_and_evaluate(config, workdir)` trains one stage (its teacher or NCD stage 1 must have
finished: `kd_jax.run.run` trains a whole chain); `build` gives benchmarks and tests the method,
its fresh state and the jitted step. A method (kd_jax/methods/<paper>.py) supplies the models,
the data and a pure `train_step`; this file knows no paper.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from kd_jax import checkpoint, config_utils, fileio, log, methods, parallel, prerequisites
from kd_jax.methods.base import Method, TrainState, evaluate_variables
from kd_jax.teacher import FrozenTeacher


class _Preemption:
    """SIGTERM (TPU maintenance / preemption) -> save a checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = None
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_process(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        return bool(parallel.allgather_ints(int(self.requested)).max())


class _Logger:
    """metrics.jsonl (one JSON object per line) + TensorBoard events, written by process 0.

    On a remote workdir (gs://) metrics.jsonl is rewritten whole rather than appended to (see
    `fileio.LineLog`); `flush()` writes what is pending, before each checkpoint and at the end.
    """

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.log = fileio.LineLog(fileio.join(workdir, "metrics.jsonl"))
        self.path = self.log.path
        self._tb = None
        if self.enabled:
            import tensorflow as tf  # takes gs:// logdirs natively

            self._tb = tf.summary.create_file_writer(fileio.join(workdir, "tensorboard"))

    def history(self) -> list[dict]:
        out = []
        for line in self.log.read_lines():
            try:
                out.append(json.loads(line))
            except ValueError:  # the last line of a run killed mid-write
                continue
        return out

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _py(v) for k, v in values.items()}}
        self.log.append(json.dumps(record))
        import tensorflow as tf

        with self._tb.as_default(step=int(step)):
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    tf.summary.scalar(k, v)
        self._tb.flush()

    def flush(self) -> None:
        if self.enabled:
            self.log.flush()


def _py(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


@dataclasses.dataclass
class Built:
    """A method ready to train: `train_step(state, method.teacher_vars, global_batch, rng)` ->
    (state, metrics), jitted over the mesh with the state donated; `state` is freshly
    initialised (not restored, not warm-started)."""

    method: Method
    state: TrainState
    train_step: Callable


def build(
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh,
    teacher: FrozenTeacher | None = None,
    prepare: bool = True,
) -> Built:
    """The method of `config.method` (handed `teacher`, else reading its finished teacher
    workdir), its initial state and its jitted step. `prepare=False` skips the method's
    one-off data work (e.g. pool selection), for a step on synthetic batches."""
    method = methods.get_method(config.method)(config, workdir, mesh, teacher=teacher)
    if prepare:
        method.prepare()
    replicated = parallel.replicated(mesh)
    method.build_optimizer(method.num_steps())
    state = jax.jit(method.init_state, out_shardings=replicated)(method.init_rng())
    train_step = jax.jit(
        method.train_step, donate_argnums=(0,), out_shardings=(replicated, replicated)
    )
    return Built(method, state, train_step)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    stop_after: int | None = None,
    teacher: FrozenTeacher | None = None,
) -> dict:
    """Trains `config.method` in `workdir` (one stage), resuming from its latest checkpoint.

    Returns the results dict (also written to `workdir/results.json` when training finishes).
    `stop_after` ends this invocation after that many steps with a checkpoint, as a preemption
    would (tests use it to check that a resumed run equals an uninterrupted one). `teacher`
    hands a distillation method its teacher instead of reading it from the teacher workdir.
    Raises `prerequisites.UnfinishedPrerequisites` when a teacher or NCD stage-1 run it needs
    has not finished (`kd_jax.run.run` trains those first).
    """
    # Every missing teacher / pool / dataset is named at once, before any model or compile.
    plan = prerequisites.check(config, workdir, teacher_given=teacher is not None)
    if len(plan.stages) > 1:
        raise prerequisites.UnfinishedPrerequisites(plan)
    workdir = fileio.absolute(workdir)  # a gs:// workdir stays one (no gcsfuse needed)
    fileio.makedirs(workdir)

    # ----- mesh -------------------------------------------------------------------------------
    parallel.maybe_initialize_distributed(config.get("distributed", False))
    mesh = parallel.make_mesh()
    is_main = jax.process_index() == 0

    results_path = fileio.join(workdir, "results.json")
    if prerequisites.finished(workdir, config):
        done = fileio.read_json(results_path)
        log.info(
            f"{workdir} already finished ({config.method}); "
            f"final_accuracy={done.get('final_accuracy')}"
        )
        return done

    # ----- method (models, teacher, data), fresh state, jitted step ---------------------------
    built = build(config, workdir, mesh, teacher=teacher)
    method, state, train_step = built.method, built.state, built.train_step
    num_steps = method.num_steps()
    if is_main:
        fileio.write_json_atomic(fileio.join(workdir, "config.json"), config_utils.to_json(config))

    # ----- state: resume, or warm start ---------------------------------------------------------
    _, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    ckpt = checkpoint.Checkpointer(
        workdir,
        keep=config.get("keep_checkpoints", 2),
        async_save=config.get("async_checkpoints", True),
    )
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        log.info(f"resumed {workdir} at step {int(state.step)}")
    else:  # a fresh run may start from another run's weights (e.g. NCD stage 1 -> stage 2)
        state = method.warm_start(state)
    start_step = int(state.step)
    step_rng = parallel.replicate(step_rng, mesh)

    logger = _Logger(workdir)
    history = logger.history()
    evals = [h for h in history if "accuracy" in h]
    best = max([h["accuracy"] for h in evals], default=0.0)
    previous_wall = max([h.get("wall_seconds", 0.0) for h in history], default=0.0)

    def run_eval(state) -> dict:
        out = method.evaluate(state)
        if "accuracy" not in out:
            raise KeyError(f"{type(method).__name__}.evaluate must return an 'accuracy' entry")
        return out

    teacher_accuracy = None
    if method.teacher_model is not None:
        teacher_accuracy = method.teacher_info.get("final_accuracy")
        if teacher_accuracy is None:
            teacher_accuracy = evaluate_variables(
                method.teacher_model.apply, method.teacher_vars, method.eval_dataset(), mesh
            )

    # ----- loop -------------------------------------------------------------------------------
    batches = method.train_batches(start_step)
    log_every, eval_every = config.log_every, config.eval_every
    ckpt_every = config.checkpoint_every
    t0 = time.time()
    t_log, step_log, t_first = t0, start_step, t0
    images_per_step = config.batch_size
    accuracy = evals[-1]["accuracy"] if evals else None
    eval_values = {}
    pending = None
    step = start_step
    with _Preemption() as preemption:
        while step < num_steps:
            if method.update_transfer_set(state, step):
                batches = method.train_batches(step)
            local = next(batches)
            state, metrics = train_step(
                state, method.teacher_vars, parallel.global_batch(local, mesh), step_rng
            )
            step += 1
            pending = metrics
            if step == start_step + 1:  # throughput excludes compilation
                jax.block_until_ready(metrics)
                t_first = time.time()
            last = step == num_steps
            stopping = stop_after is not None and step - start_step >= stop_after
            preempted = (step % log_every == 0 or last) and preemption.any_process()
            if step % log_every == 0 or last or stopping or preempted or step % ckpt_every == 0:
                values = {k: float(v) for k, v in jax.device_get(pending).items()}
                bad = [k for k, v in values.items() if not math.isfinite(v)]
                if bad:
                    logger.flush()
                    ckpt.wait()
                    raise FloatingPointError(
                        f"non-finite {bad} at step {step} ({values}); the last good checkpoint "
                        f"(step {ckpt.latest_step()}) in {ckpt.directory} is kept"
                    )
                now = time.time()
                ips = (step - step_log) * images_per_step / max(now - t_log, 1e-9)
                eta = (num_steps - step) * (now - t_log) / max(step - step_log, 1)
                t_log, step_log = now, step
                values.update(
                    images_per_second=ips,
                    wall_seconds=previous_wall + now - t0,
                    lr=float(method.schedule(step - 1)),
                )
                if step % eval_every == 0 or last:
                    eval_values = run_eval(state)
                    accuracy = eval_values["accuracy"]
                    best = max(best, accuracy)
                    values.update(eval_values)
                logger.write(step, values)
                if is_main:
                    acc = f" acc {accuracy:.4f}" if "accuracy" in values else ""
                    log.info(
                        f"step {step}/{num_steps} loss "
                        f"{values['loss']:.4f}{acc} | {ips:.0f} img/s | ETA {eta:.0f}s",
                        tag=config.method,
                    )
            if step % ckpt_every == 0 or last or stopping or preempted:
                logger.flush()  # a resumed run reads the metrics up to its checkpoint
                ckpt.save(step, state, force=True)
            if stopping or preempted:
                ckpt.close()
                if preempted:
                    log.info(f"SIGTERM: saved step {step} in {ckpt.directory}; exiting")
                return {"stopped_at": step}
    ckpt.close()
    logger.flush()

    wall = previous_wall + time.time() - t0
    if accuracy is None or not eval_values:  # e.g. resumed after the last step was saved
        eval_values = run_eval(state)
        accuracy = eval_values["accuracy"]
        best = max(best, accuracy)
    results = {
        "method": config.method,
        "model": config.model.name,
        "num_classes": config.num_classes,
        "config": config_utils.to_json(config),
        "final_accuracy": accuracy,
        "best_accuracy": best,
        "steps": num_steps,
        "wall_seconds": wall,
        "images_per_second": (num_steps - start_step - 1)
        * images_per_step
        / max(time.time() - t_first, 1e-9),
    }
    if teacher_accuracy is not None:
        results["teacher_accuracy"] = teacher_accuracy
    results.update({k: v for k, v in eval_values.items() if k != "accuracy"})
    results.update(method.results(state))
    if is_main:
        fileio.write_json_atomic(results_path, results)
        log.info(
            f"done: final_accuracy={accuracy:.4f} best={best:.4f} "
            f"wall={wall:.0f}s -> {results_path}"
        )
    return results
