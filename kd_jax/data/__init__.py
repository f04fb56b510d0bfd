"""Data: TFRecord image shards, the offline benchmark, input pipelines.

Import-light on purpose: importing ``kd_jax.data`` loads neither TensorFlow nor the bundled
datasets. Submodules load what they need:

- ``kd_jax.data.shards``: ``write_shards`` / ``read_shards`` (TFRecord pools; imports TensorFlow).
- ``kd_jax.data.make_shards``: the ``python -m kd_jax.data.make_shards`` writer CLI.
- ``kd_jax.data.offline``: MNIST-5k and the open-world pool from bundled real images (no
  TensorFlow unless shards are written).
- ``kd_jax.data.pipeline``: tf.data input pipelines for training and evaluation.
- ``kd_jax.data.splits``: known / novel class splits of novel class discovery.

The names below are also reachable as attributes (``kd_jax.data.read_shards``), loaded on
first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "write_shards": "shards",
    "read_shards": "shards",
    "count_records": "shards",
    "read_ids": "shards",
    "read_manifest": "shards",
    "PoolSource": "shards",
    "TFRecordPool": "shards",
    "mnist5k": "offline",
    "build_offline_pool": "offline",
    "ensure_offline_pool_shards": "offline",
    "save_pool_preview": "offline",
    "RELATED_SOURCES": "offline",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
