"""Helpers shared by the test modules (pytest puts this folder on sys.path)."""

import os

from kd_jax import config_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Random test inputs come from one fixed seed, so CI and every machine draw the same ones (a
# per-run seed made CI fail on the ~3 % of draws where a property needs more iterations).
# KD_TEST_SEED=<n> explores other draws; a failure message names the seed it used.
SEED = int(os.environ.get("KD_TEST_SEED", "0"))


def rng(offset=0):
    import numpy as np

    return np.random.default_rng(SEED + offset)


def close(actual, expected, rtol, atol, name=""):
    """assert_allclose in float64 whose message names the seed of the inputs."""
    import numpy as np

    np.testing.assert_allclose(
        np.asarray(actual, np.float64),
        np.asarray(expected, np.float64),
        rtol=rtol,
        atol=atol,
        err_msg=f"{name} KD_TEST_SEED={SEED}",
    )


def np_softmax(z):
    """float64 softmax over the last axis."""
    import numpy as np

    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def config(name, arg=None, **overrides):
    """configs/<name>[:arg] with dotted-key overrides, e.g. config("kd_mnist.py", "smoke",
    **{"teacher.workdir": path}); locked, as `python -m kd_jax.main` hands it over (existing
    keys can be set, a new one raises), so code that adds keys to it fails here too."""
    c = config_utils.load_config(os.path.join(ROOT, "configs", name), arg)
    for key, value in overrides.items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    c.lock()
    return c


def max_distance(a, b) -> float:
    """Largest absolute difference between two pytrees of arrays (compared in float64)."""
    import jax
    import numpy as np

    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def record(what: str, distance: float) -> float:
    """Appends `what: distance` to the JSON-lines file named by $KD_TEST_RECORD (if set), so
    one suite run lists every invariance test's distance, correct and deliberately broken."""
    path = os.environ.get("KD_TEST_RECORD")
    if path:
        import json

        with open(path, "a") as f:
            f.write(json.dumps({"what": what, "distance": float(distance)}) + "\n")
    return distance


def as64(tree):
    """Floating arrays of `tree` as float64 jax arrays, the rest as jax arrays (call inside
    `jax.enable_x64(True)`: the invariance tests' precision)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    return jax.tree.map(
        lambda a: (
            jnp.asarray(a, jnp.float64)
            if np.issubdtype(np.asarray(a).dtype, np.floating)
            else jnp.asarray(a)
        ),
        tree,
    )
