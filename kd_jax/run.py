"""A run is a chain of stages, each trained in its own workdir and finished when its
results.json says so: a teacher into `<workdir>/teacher`, then the student; NCD stage 1 into
`<workdir>/pretrain`, then discovery. `run` trains every unfinished stage of the plan
(`prerequisites.check`) in order, each through `train.train_and_evaluate`; `kd_jax.main` calls it.
"""

from __future__ import annotations

import ml_collections

from kd_jax import diagnostics, log, parallel, prerequisites, train


def run(config: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None) -> dict:
    """Trains the stages `config` needs that have not finished, then `config` itself in
    `workdir`; returns its results dict. `stop_after` (steps) applies to the last stage only,
    as in `train.train_and_evaluate`."""
    plan = prerequisites.check(config, workdir)  # every missing item named before any work
    parallel.maybe_initialize_distributed(config.get("distributed", False))
    if len(plan.stages) > 1:
        log.info(plan.describe())
    for stage in plan.stages[:-1]:
        out = train.train_and_evaluate(stage.config, stage.workdir)
        if "stopped_at" in out:  # preempted (SIGTERM): the next invocation resumes this stage
            return out
    results = train.train_and_evaluate(config, workdir, stop_after=stop_after)
    if "stopped_at" not in results:
        log.info(diagnostics.run_summary(results, workdir, config.get("reference", "")))
    return results
