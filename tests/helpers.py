"""Helpers shared by the test modules (pytest puts this folder on sys.path)."""
import os

from kd_jax import config_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(name, arg=None, **overrides):
    """configs/<name>[:arg] with dotted-key overrides, e.g. config("kd_mnist.py", "smoke",
    **{"teacher.workdir": path})."""
    c = config_utils.load_config(os.path.join(ROOT, "configs", name), arg)
    for key, value in overrides.items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return c
