"""Method registry: one module per paper, one shared loop (kd_jax.train)."""

from __future__ import annotations

import importlib

_METHODS = {
    "teacher": "kd_jax.methods.teacher:Teacher",
    "kd": "kd_jax.methods.kd:KD",
    "odsd": "kd_jax.methods.odsd:ODSD",
    "eikd": "kd_jax.methods.eikd:EIKD",
    "ncd_pretrain": "kd_jax.methods.sckd:NCDPretrain",
    "uno": "kd_jax.methods.sckd:UNO",
    "sckd": "kd_jax.methods.sckd:SCKD",
    "generator": "kd_jax.methods.generator:Generator",
}


def get_method(name: str):
    if name not in _METHODS:
        raise ValueError(f"config.method={name!r} is unknown; available: {sorted(_METHODS)}")
    module, cls = _METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
