"""Inference over a stream of padded, masked batches, jit-compiled once per function.

Every pass that is not a train step runs through `BatchedApply`: evaluation, the teacher's
accuracy, NCD evaluation, ODSD's refresh scoring and the pool's teacher pass. A batch is a
dict of host arrays with a `mask` (1 = a real row, 0 = padding, e.g. from
`pipeline.eval_batches`); its numeric entries are sharded along the batch axis of the mesh
(`parallel.global_batch`), string entries stay on the host.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np

from kd_jax import parallel


class BatchedApply:
    """`fn(*args, batch) -> outputs`, or with `carry=True` `fn(*args, batch, carry) ->
    (outputs, carry)` (state threaded through the batches), compiled once with its outputs
    replicated on `mesh` and applied to every batch of a stream."""

    def __init__(self, fn, mesh, *, carry: bool = False):
        self.mesh, self.carry = mesh, carry
        self._fn = jax.jit(fn, out_shardings=parallel.replicated(mesh))

    def _device_batch(self, local: dict) -> dict:
        return parallel.global_batch(
            {k: v for k, v in local.items() if np.asarray(v).dtype.kind not in "OSU"}, self.mesh
        )

    def sums(self, *args, batches) -> dict:
        """Every output summed over the batches: scalars as Python floats, arrays (e.g. a
        segmentation confusion matrix) as float64 NumPy arrays; `fn` applies the mask itself
        (e.g. {"correct": Σ mask·hit, "count": Σ mask})."""
        totals = {}
        for local in _numpy(batches):
            for k, v in self._fn(*args, self._device_batch(local)).items():
                v = np.asarray(v, np.float64)
                totals[k] = totals.get(k, 0.0) + (float(v) if v.ndim == 0 else v)
        return totals

    def gather(
        self,
        *args,
        batches,
        keep: tuple = (),
        batch_axes: dict | None = None,
        pad_to: int | None = None,
        carry=None,
    ):
        """The real rows (mask > 0) of every output, concatenated over the batches as host
        numpy arrays, plus the host batch entries named in `keep` (e.g. `id`, `source`).

        `batch_axes` gives an output's batch axis when it is not 0 (e.g. {"novel": 1} for
        [H, B, K] logits); `pad_to` pads a short batch to that many rows (mask 0). With
        `carry=True` returns (rows, final carry). No batch at all gives {}.
        """
        axes = batch_axes or {}
        parts, masks = [], []
        for local in _numpy(batches):
            if pad_to:
                local = _pad(local, pad_to)
            device = self._device_batch(local)
            if self.carry:
                out, carry = self._fn(*args, device, carry)
            else:
                out = self._fn(*args, device)
            out = dict(parallel.to_host(out), **{k: np.asarray(local[k]) for k in keep})
            parts.append(out)
            masks.append(np.asarray(local["mask"]) > 0)
        rows = {}
        if parts:
            real = np.concatenate(masks)
            for k in parts[0]:
                axis = axes.get(k, 0) if k not in keep else 0
                rows[k] = np.compress(
                    real, np.concatenate([p[k] for p in parts], axis=axis), axis=axis
                )
        return (rows, carry) if self.carry else rows


def _numpy(batches: Iterable):
    """A tf.data dataset or any iterable of dicts of host arrays."""
    return batches.as_numpy_iterator() if hasattr(batches, "as_numpy_iterator") else batches


def _pad(local: dict, rows: int) -> dict:
    """Zero rows appended (mask 0) so every batch has the same shape: one compilation."""
    n = len(local["mask"])
    if n >= rows:
        return local
    return {
        k: np.concatenate(
            [np.asarray(v), np.zeros((rows - n,) + np.shape(v)[1:], np.asarray(v).dtype)]
        )
        for k, v in local.items()
    }
