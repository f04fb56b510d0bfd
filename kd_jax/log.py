"""One logging path for kd_jax's progress and messages.

Every module logs through `logging.getLogger(__name__)` (a child of the `kd_jax` logger) or the
helpers below. The `kd_jax` logger prints `[kd_jax] message` lines to stdout, and only on
process 0 of a multi-host job, so a pod's workers do not repeat every line. Applications that
configure logging themselves can remove the handler (`logging.getLogger("kd_jax").handlers`).
"""

from __future__ import annotations

import logging
import sys

ROOT = "kd_jax"


class _MainProcessOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        import jax  # late: importing kd_jax.log must not initialise a backend

        return jax.process_index() == 0


class _Stdout(logging.StreamHandler):
    """Writes to the current `sys.stdout` (pytest and notebooks replace it after import)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):
        pass


def _setup() -> logging.Logger:
    logger = logging.getLogger(ROOT)
    if not any(getattr(h, "_kd_jax", False) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("[%(tag)s] %(message)s"))
        handler.addFilter(_MainProcessOnly())
        handler.addFilter(_default_tag)
        handler._kd_jax = True
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # absl / a notebook's root handler would print it twice
    return logger


def _default_tag(record: logging.LogRecord) -> bool:
    if not hasattr(record, "tag"):
        record.tag = ROOT
    return True


def info(message: str, tag: str = ROOT) -> None:
    """`[tag] message` on process 0 (tag: e.g. the method name for training progress)."""
    _setup().info(message, extra={"tag": tag})


def warning(message: str, tag: str = ROOT) -> None:
    _setup().warning(message, extra={"tag": tag})


def get(name: str) -> logging.Logger:
    """The logger of a kd_jax module (`get(__name__)`), printing through the same handler."""
    _setup()
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")
