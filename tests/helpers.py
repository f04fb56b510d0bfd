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


def write_fake_nyuv2(root, train, test, shape=(12, 16), seed=0):
    """A DFAD-format NYUv2 folder, what `kd_jax.data.convert_nyuv2` reads: `splits.mat` listing
    the 1-based indices `train` / `test` in that order and, per index (ascending), a random RGB
    image `480_640/IMAGE/<idx - 1>.png` of `shape` and a random label (0 = unlabeled, 1..13)
    `nyuv2-meta-data/<split>_labels_13/new_nyu_class13_<idx:04d>.png`. Returns {idx: label}."""
    import numpy as np
    from PIL import Image
    from scipy.io import savemat

    root = str(root)
    os.makedirs(os.path.join(root, "480_640", "IMAGE"))
    for split in ("train", "test"):
        os.makedirs(os.path.join(root, "nyuv2-meta-data", f"{split}_labels_13"))
    savemat(
        os.path.join(root, "nyuv2-meta-data", "splits.mat"),
        {"trainNdxs": [[i] for i in train], "testNdxs": [[i] for i in test]},
    )
    gen = np.random.default_rng(seed)
    labels = {}
    split_of = {**{i: "train" for i in train}, **{i: "test" for i in test}}
    for idx in sorted(split_of):
        image = gen.integers(0, 256, (*shape, 3), dtype=np.uint8)
        labels[idx] = gen.integers(0, 14, shape).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(root, "480_640", "IMAGE", f"{idx - 1}.png"))
        name = f"new_nyu_class13_{idx:04d}.png"
        labels_dir = os.path.join(root, "nyuv2-meta-data", f"{split_of[idx]}_labels_13")
        Image.fromarray(labels[idx]).save(os.path.join(labels_dir, name))
    return labels


def write_teacher(workdir, model, num_classes, variables):
    """A finished teacher workdir holding `variables` of `model` (what `export_teacher` writes),
    for tests of a student's path that need no trained teacher."""
    import json

    import numpy as np

    from kd_jax import checkpoint

    state = {
        "step": np.asarray(0, np.int32),
        "params": {"model": variables["params"]},
        "batch_stats": {"model": variables["batch_stats"]},
        "opt_state": {},
    }
    ckpt = checkpoint.Checkpointer(str(workdir), keep=1, async_save=False)
    ckpt.save(0, state, force=True)
    ckpt.close()
    info = {"method": "teacher", "model": model, "num_classes": num_classes}
    with open(os.path.join(str(workdir), "results.json"), "w") as f:
        json.dump(info, f)
