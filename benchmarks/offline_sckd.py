"""Offline NCD benchmark (MNIST-5k, digits 0–4 known, 5–9 novel): k-means on the pretrained
features, UNO, SCKD and SCKD without L_SMI / without L_SC (`configs/sckd_mnist.py`).

    python benchmarks/offline_sckd.py [--seeds 0,1,2] [--out /tmp/kd/offline_sckd] [--set k=v ...]

One stage-1 run per seed (`sckd_mnist.py:pretrain`) is shared by every variant of that seed
(`ncd.pretrain.workdir`). Reports task-aware novel accuracy (unlabeled train part, held-out
test part; best head) and task-agnostic all / known / novel accuracy on the test part, mean ±
std over seeds; k-means has no known-class head, so only its task-aware columns are filled.
Writes benchmarks/results/offline_sckd.md and prints it. Runs are cached per workdir. About
3 minutes per seed and variant on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import harness  # noqa: E402

CONFIG = "configs/sckd_mnist.py"
VARIANTS = {
    "UNO": ("uno", {}),
    "SCKD": ("", {}),
    "SCKD w/o L_SMI": ("", {"sckd.smi": "none"}),
    "SCKD w/o L_SC": ("", {"sckd.sc": "none"}),
    # Diagnostics: the spec's L_SC direction (every row, both ways), the spec's weights, and
    # one-way self-cooperation only.
    "SCKD with the spec's L_SC (both ways on every row)": ("", {"sckd.direction": "both"}),
    "SCKD λ=1": ("", {"sckd.lambda_smi": 1.0, "sckd.lambda_sc": 1.0}),
    "SCKD L_SC known→novel only": ("", {"sckd.smi": "none", "sckd.direction": "known_to_novel"}),
    "SCKD L_SC novel→known only": ("", {"sckd.smi": "none", "sckd.direction": "novel_to_known"}),
}
COLUMNS = (
    "novel_train_accuracy",
    "novel_test_accuracy",
    "all_accuracy",
    "known_accuracy",
    "novel_accuracy",
)
HEADERS = (
    "task-aware novel (train)",
    "task-aware novel (test)",
    "task-agnostic all",
    "task-agnostic known",
    "task-agnostic novel",
)


def kmeans_baseline(pretrain_workdir: str, seed: int) -> dict:
    """sklearn KMeans (C_u clusters) on the novel images' pretrained `pre_logits` and on their
    known-space probabilities r^K (the relation structure L_SC's known -> novel direction
    teaches), fit on the unlabeled train part; Hungarian accuracy on it and on the novel test
    images. -> {"features": {...}, "known_space": {...}}."""
    import jax
    import numpy as np
    from sklearn.cluster import KMeans

    from kd_jax import checkpoint, config_utils, metrics, parallel
    from kd_jax.methods import get_method

    cache = os.path.join(pretrain_workdir, f"kmeans_spaces_seed{seed}.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    c = config_utils.load_config(os.path.join(ROOT, CONFIG), "pretrain")
    mesh = parallel.make_mesh(jax.devices()[:1])
    method = get_method("ncd_pretrain")(c, pretrain_workdir, mesh)
    saved = checkpoint.load_variables(pretrain_workdir)
    variables = {
        "params": saved["params"]["model"],
        "batch_stats": saved["batch_stats"].get("model", {}),
    }
    tau = c.sckd.space_temperature

    @jax.jit
    def forward(x):
        f = method.student.apply(variables, x, train=False)[1]["pre_logits"]
        cos, _ = method.apply_head("known", saved["params"], saved["batch_stats"], f, False)
        return f, jax.nn.softmax(cos / tau, -1)  # features, known space r^K (sckd.md §2)

    def features(split):
        feats, r_known, labels = [], [], []
        for b in method._eval_stream(split, method.novel).as_numpy_iterator():
            keep = b["mask"] > 0
            f, r = forward(b["image"])
            feats.append(np.asarray(f)[keep])
            r_known.append(np.asarray(r)[keep])
            labels.append(b["label"][keep])
        return np.concatenate(feats), np.concatenate(r_known), np.concatenate(labels)

    (x_train, r_train, y_train), (x_test, r_test, y_test) = (
        features(c.data.target.train_split),
        features(c.data.target.eval_split),
    )
    out = {}
    for key, train, test in (("features", x_train, x_test), ("known_space", r_train, r_test)):
        km = KMeans(n_clusters=method.num_novel, n_init=10, random_state=seed).fit(train)
        out[key] = {
            "novel_train_accuracy": metrics.cluster_accuracy(y_train, km.labels_)[0],
            "novel_test_accuracy": metrics.cluster_accuracy(y_test, km.predict(test))[0],
        }
    with open(cache, "w") as f:
        json.dump(out, f)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="/tmp/kd/offline_sckd")
    parser.add_argument("--variants", default=",".join(list(VARIANTS)[:5]))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="extra --config overrides for every discovery run, key=value",
    )
    # Defaults to the four table rows and the spec-direction diagnostic; add the others with
    # --variants.
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = dict(kv.split("=", 1) for kv in args.set)
    table = {"k-means (pretrained features)": [], "k-means (pretrained known space r^K)": []}
    for name in args.variants.split(","):
        table[name] = []
    for seed in seeds:
        pre = os.path.join(args.out, "pretrain", f"seed{seed}")
        harness.run(f"{CONFIG}:pretrain", pre, {"seed": seed})
        km = kmeans_baseline(pre, seed)
        table["k-means (pretrained features)"].append(km["features"])
        table["k-means (pretrained known space r^K)"].append(km["known_space"])
        for name in args.variants.split(","):
            arg, overrides = VARIANTS[name]
            workdir = os.path.join(args.out, name.replace(" ", "_").replace("/", ""), f"seed{seed}")
            table[name].append(
                harness.run(
                    f"{CONFIG}:{arg}" if arg else CONFIG,
                    workdir,
                    {"seed": seed, "ncd.pretrain.workdir": pre, **overrides, **extra},
                )
            )
    columns = {
        h: (lambda k: lambda rs: harness.mean_std([r.get(k) for r in rs]))(k)
        for h, k in zip(HEADERS, COLUMNS)
    }
    text = (
        f"# Offline NCD benchmark (MNIST-5k, 0–4 known / 5–9 novel)\n\n"
        f"`python benchmarks/offline_sckd.py --seeds {args.seeds}"
        + "".join(f" --set {kv}" for kv in args.set)
        + "`; accuracy in %, mean ± std over "
        f"{len(seeds)} seed(s) {seeds}; LeNet-5, `{CONFIG}`.\n\n"
        + harness.markdown(table, columns)
        + "\n"
    )
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "offline_sckd.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
