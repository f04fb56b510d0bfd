"""How good are SCKD's synthesised pseudo-labels? Reads finished `sckd_mnist.py` discovery runs
and scores, on the novel (unlabeled) train images, the targets L_k->n hands the novel head
against those UNO's own Sinkhorn targets and the novel head itself give.

    python benchmarks/sckd_targets.py WORKDIR [WORKDIR ...] [--labeled 64]

For each run: the replica (its stage-1 encoder) and the final state; batches as in training
(`--labeled` labeled rows, the rest unlabeled, one view, no augmentation). Printed per run:
the Hungarian accuracy of argmax q_u (L_k->n's targets), of the targets S would give with its
shared part removed (each column centred; a probe, not a switch), and of the novel head's argmax
on the same images, the share of the commonest target class (1/C_u = balanced, 1 = one class for every
image), the targets' mean entropy / log C_u, and S's mean and spread over the pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def score_run(workdir: str, labeled: int, batch: int = 128) -> dict:
    import jax
    import ml_collections
    import numpy as np

    from kd_jax import checkpoint, losses, metrics, parallel
    from kd_jax.methods import get_method

    with open(os.path.join(workdir, "config.json")) as f:
        c = ml_collections.ConfigDict(json.load(f))
    mesh = parallel.make_mesh(jax.devices()[:1])
    m = get_method("sckd")(c, workdir, mesh)
    saved = checkpoint.load_variables(workdir)
    replica = jax.device_get(m.teacher_vars) if m.teacher_vars is not None else None
    t, s = c.ncd.temperature, c.sckd

    @jax.jit
    def forward(images):
        out, _ = m._forward(saved["params"], saved["batch_stats"], images, False)
        anchors = (
            m.student.apply(replica, images, train=False)[1]["pre_logits"]
            if replica is not None
            else out["feats"]
        )
        return out["feats"], anchors, out["novel"][0] / t

    def arrays(classes):
        feats, anchors, zn, labels = [], [], [], []
        for b in m._eval_stream(c.data.target.train_split, classes).as_numpy_iterator():
            keep = b["mask"] > 0
            f, a, z = forward(b["image"])
            feats.append(np.asarray(f)[keep])
            anchors.append(np.asarray(a)[keep])
            zn.append(np.asarray(z)[keep])
            labels.append(b["label"][keep])
        return [np.concatenate(x) for x in (feats, anchors, zn, labels)]

    _, lab_anchor, lab_zn, _ = arrays(m.known)
    unl_feats, _, unl_zn, unl_y = arrays(m.novel)
    rng = np.random.default_rng(0)
    targets, centred, sims = [], [], []
    for start in range(0, len(unl_y), batch - labeled):
        j = np.arange(start, min(start + batch - labeled, len(unl_y)))
        i = rng.choice(len(lab_zn), labeled, replace=False)
        sim = losses.cross_similarity(lab_anchor[i], unl_feats[j], normalize=s.normalize)
        targets.append(np.asarray(losses.synthesize_pseudo_labels(sim, lab_zn[i], s.alpha)))
        # What is left once the part of S every column shares is removed (each unlabeled
        # image's similarity to a labeled one relative to its mean similarity): not a switch
        # of the method, a probe of what information S carries.
        sim_c = sim - sim.mean(axis=0, keepdims=True)
        centred.append(np.asarray(losses.synthesize_pseudo_labels(sim_c, lab_zn[i], s.alpha)))
        sims.append(np.asarray(sim).ravel())
    q = np.concatenate(targets)
    qc = np.concatenate(centred)
    sims = np.concatenate(sims)
    entropy = -(q * np.log(np.maximum(q, 1e-30))).sum(-1).mean() / np.log(q.shape[-1])
    share = np.bincount(q.argmax(-1), minlength=q.shape[-1]).max() / len(q)
    return {
        "target_accuracy": metrics.cluster_accuracy(unl_y, q.argmax(-1))[0],
        "centred_S_target_accuracy": metrics.cluster_accuracy(unl_y, qc.argmax(-1))[0],
        "novel_head_accuracy": metrics.cluster_accuracy(unl_y, unl_zn.argmax(-1))[0],
        "commonest_target_share": float(share),
        "target_entropy": float(entropy),
        "similarity_mean": float(sims.mean()),
        "similarity_std": float(sims.std()),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--labeled", type=int, default=64)
    args = p.parse_args()
    keys = None
    for w in args.workdirs:
        r = score_run(w, args.labeled)
        if keys is None:
            keys = list(r)
            print("| run | " + " | ".join(keys) + " |")
            print("|---|" + "---|" * len(keys))
        print(f"| {w} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |", flush=True)


if __name__ == "__main__":
    main()
