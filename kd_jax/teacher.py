"""The frozen teacher a distillation method is handed: its model, its variables and what its run
recorded. `load_teacher` only reads a finished teacher workdir; `kd_jax.run` trains one first.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import ml_collections

from kd_jax import checkpoint, fileio, models, parallel, prerequisites


@dataclasses.dataclass
class FrozenTeacher:
    """`variables` = {"params", "batch_stats"} (replicated over the mesh); `info` = the teacher
    run's results.json ({} or None values for a teacher not read from disk)."""

    model: nn.Module
    variables: Any
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def final_accuracy(self) -> float | None:
        return self.info.get("final_accuracy")


def teacher_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where the run in `workdir` reads its teacher: `teacher.workdir`, else <workdir>/teacher."""
    return config.teacher.workdir or fileio.join(workdir, "teacher")


def load_teacher(config: ml_collections.ConfigDict, workdir: str, mesh, *, dtype) -> FrozenTeacher:
    """The teacher of the run in `workdir`, read from its finished workdir (never trained here:
    `MissingPrerequisites` when it has not finished). `dtype`: the run's compute dtype."""
    tcfg = config.teacher
    path = teacher_workdir(config, workdir)
    if not prerequisites.finished(path):
        raise prerequisites.MissingPrerequisites([prerequisites.missing_teacher(config, workdir)])
    info = fileio.read_json(fileio.join(path, "results.json"))
    arch = info.get("model", tcfg.model)
    if tcfg.model and arch != tcfg.model:
        raise ValueError(f"config.teacher.model={tcfg.model!r} but {path!r} holds a {arch!r}")
    num_classes = info.get("num_classes", config.num_classes)
    if num_classes != config.num_classes:
        raise ValueError(
            f"the teacher in {path!r} has {num_classes} classes but "
            f"config.num_classes={config.num_classes}"
        )
    model = models.create_model(
        arch, num_classes, dtype=dtype, conv=config.model.get("conv", "auto"), conv_groups=mesh.size
    )
    return FrozenTeacher(model, parallel.replicate(model_variables(path), mesh), info)


def model_variables(workdir: str) -> dict:
    """{"params", "batch_stats"} of the network (`model`, no heads) saved in `workdir`."""
    saved = checkpoint.load_variables(workdir)
    return {
        "params": saved["params"]["model"],
        "batch_stats": saved["batch_stats"].get("model", {}),
    }
