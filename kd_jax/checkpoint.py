"""The one checkpoint wrapper every method uses: Orbax, async, atomic, resumable.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save keeps its previous checkpoint. A run always resumes from the latest complete step of its
workdir. Teachers are never saved with the student: a KD run reads them from the teacher's own
workdir (`load_variables`).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


def _dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    """CheckpointManager over `workdir/checkpoints` with save/restore of a state pytree."""

    def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
        self.directory = _dir(workdir)
        self._manager = ocp.CheckpointManager(
            epath.Path(self.directory),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, force: bool = False) -> None:
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore(self, template: Any, step: int | None = None) -> Any:
        """Restores into `template`'s structure, dtypes and shardings (abstract arrays suffice)."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def load_variables(workdir: str, step: int | None = None) -> dict:
    """Reads `{'params', 'batch_stats'}` of a finished run (a teacher) as host numpy arrays."""
    directory = _dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No checkpoints in {directory!r}: the teacher workdir must hold a finished "
            f"`teacher` run (or a converted teacher, see kd_jax.tools.convert_torch).")
    with ocp.CheckpointManager(epath.Path(directory),
                               item_handlers=ocp.StandardCheckpointHandler()) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory!r} holds no complete checkpoint.")
        # Restore onto this process's first device, not the saved shardings: a teacher trained
        # on one topology (1 GPU, 8 fake CPUs) is read on another (a pod, 2 processes), where
        # the saved device ids do not exist and a target-less restore fails.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                manager.item_metadata(step))
        restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    restored = jax.device_get(restored)
    return {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
