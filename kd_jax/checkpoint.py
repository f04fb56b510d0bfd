"""The one checkpoint wrapper every method uses: Orbax, async, atomic, resumable.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save keeps its previous checkpoint. On a `gs://` workdir Orbax renames nothing: it writes the
step in place and commits it with a marker object written last (GCS object writes are atomic),
which is why a pod's workdir should be a gs:// URL, not a gcsfuse mount (where Orbax sees a
local path and renames, which gcsfuse carries out as a non-atomic copy of every object). A run
always resumes from the latest complete step of its workdir. Teachers are never saved with the student: a KD run reads them from the teacher's own
workdir (`load_variables`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from kd_jax import fileio


def _dir(workdir: str) -> str:
    return fileio.join(fileio.absolute(workdir), "checkpoints")


def _manager(directory: str, **kwargs) -> ocp.CheckpointManager:
    try:
        return ocp.CheckpointManager(epath.Path(directory), **kwargs)
    except ImportError as e:  # Orbax asks the bucket whether it has a hierarchical namespace
        if "google.cloud" not in str(e):
            raise
        raise ImportError(
            f"checkpoints in {directory!r}: Orbax reads gs:// checkpoint directories through "
            f"the google-cloud-storage package, which is not installed: "
            f"`pip install 'kd_jax[gcs]'` (or google-cloud-storage) ({e})"
        ) from e


class Checkpointer:
    """CheckpointManager over `workdir/checkpoints` with save/restore of a state pytree."""

    def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
        self.directory = _dir(workdir)
        self._manager = _manager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save
            ),
        )

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
    if not fileio.isdir(directory):
        raise FileNotFoundError(
            f"No checkpoints in {directory!r}: the teacher workdir must hold a finished "
            f"`teacher` run (or a converted teacher, see kd_jax.tools.convert_torch)."
        )
    with _manager(directory, item_handlers=ocp.StandardCheckpointHandler()) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory!r} holds no complete checkpoint.")
        # Restore onto this process's first device, not the saved shardings: a teacher trained
        # on one topology (1 GPU, 8 fake CPUs) is read on another (a pod, 2 processes), where
        # the saved device ids do not exist and a target-less restore fails.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            manager.item_metadata(step),
        )
        restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    restored = jax.device_get(restored)
    return {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}


def warm_start(params: Any, batch_stats: Any, source_workdir: str):
    """The sub-trees of a fresh state that the finished run in `source_workdir` also holds,
    loaded from it; -> (params, batch_stats, kept), `kept` the paths only the fresh state has
    (e.g. heads a stage-1 or self-supervised checkpoint lacks), which keep their
    initialisation. A shared path must have the same shape in both."""
    saved = load_variables(source_workdir)
    kept = []

    def merge(init, loaded, path):
        if isinstance(init, dict):
            if not isinstance(loaded, dict):
                raise ValueError(f"{source_workdir}: {path} is a leaf there but a module here")
            out = {}
            for k, v in init.items():
                if k in loaded:
                    out[k] = merge(v, loaded[k], f"{path}/{k}")
                else:
                    kept.append(f"{path}/{k}")
                    out[k] = v
            return out
        loaded = np.asarray(loaded)
        if tuple(loaded.shape) != tuple(init.shape):
            raise ValueError(
                f"{source_workdir}: {path} has shape {loaded.shape}, this config "
                f"builds {tuple(init.shape)} (check config.model / config.ncd)"
            )
        return jax.device_put(loaded.astype(init.dtype), init.sharding)

    params = merge(dict(params), dict(saved["params"]), "params")
    batch_stats = merge(dict(batch_stats), dict(saved.get("batch_stats") or {}), "batch_stats")
    return params, batch_stats, kept
