"""Tests for kd_jax.losses: float64 NumPy references, properties, jit/vmap/grad, 8 devices.

Regenerate the stored golden values (only after an intended change of a loss):
    python tests/test_losses.py --regen-golden
Random inputs come from helpers.SEED (fixed; KD_TEST_SEED=<n> draws others).
"""

import functools
import os
import subprocess
import sys

if __name__ == "__main__":  # standalone (regen) runs get the same 8 fake devices as pytest
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import conftest  # noqa: F401

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SEED, as64, max_distance, record, rng
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import losses as L

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "losses_golden.npz")
RTOL, ATOL = 1e-5, 1e-6


def f32(x):
    return jnp.asarray(np.asarray(x, np.float32))


def close(actual, expected, rtol=RTOL, atol=ATOL, name=""):
    helpers.close(actual, expected, rtol, atol, name)


# ==========================================================================================
# float64 NumPy references (loops allowed; written from the papers' formulas)
# ==========================================================================================


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def np_softmax(x):
    return np.exp(np_log_softmax(x))


def np_normalize(v, eps=1e-12):
    v = np.asarray(v, np.float64)
    return v / max(np.linalg.norm(v), eps)


def np_huber(x):
    x = np.abs(x)
    return np.where(x < 1, 0.5 * x * x, x - 0.5)


def np_wmean(vals, w):
    vals, w = np.asarray(vals, np.float64), np.asarray(w, np.float64)
    return (vals * w).sum() / w.sum()


def ref_kd(zs, zt, tau, mask=None, mask_student=True, w=None):
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    b, c = zs.shape
    kls = []
    for i in range(b):
        keep = np.ones(c, bool) if mask is None else np.asarray(mask[i], bool)
        pt = np_softmax(zt[i, keep] / tau)
        lq = (
            np_log_softmax(zs[i, keep] / tau) if mask_student else np_log_softmax(zs[i] / tau)[keep]
        )
        kls.append(np.sum(pt * (np.log(pt) - lq)))
    return tau**2 * np_wmean(kls, np.ones(b) if w is None else w)


def ref_top_p_mask(zt, rho, k_max):
    zt = np.asarray(zt, np.float64)
    mask = np.zeros(zt.shape, bool)
    for i in range(zt.shape[0]):
        p = np_softmax(zt[i])
        order = np.argsort(-p, kind="stable")
        kept, cum = [], 0.0
        for cidx in order:
            if cum >= rho:
                break
            kept.append(cidx)
            cum += p[cidx]
        kept = kept[: max(1, min(len(kept), k_max))]
        mask[i, kept] = True
    return mask


def ref_feature(s, t, normalize, kind, w=None):
    s = np.asarray(s, np.float64).reshape(len(s), -1)
    t = np.asarray(t, np.float64).reshape(len(t), -1)
    vals = []
    for a, b in zip(s, t):
        if kind == "cosine":
            vals.append(1 - np_normalize(a) @ np_normalize(b))
            continue
        if normalize:
            a, b = np_normalize(a), np_normalize(b)
        vals.append(np.sum((a - b) ** 2) if kind == "l2sq" else np.mean(np_huber(a - b)))
    return np_wmean(vals, np.ones(len(s)) if w is None else w)


def ref_rkd_distance(s, t):
    def psi(x):
        x = np.asarray(x, np.float64)
        n = len(x)
        d = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                if i != j:
                    d[i, j] = np.sqrt(max(np.sum((x[i] - x[j]) ** 2), 1e-12))
        return d / d[d > 0].mean()

    return np_huber(psi(s) - psi(t)).mean()


def ref_rkd_angle(s, t):
    def phi(x):
        x = np.asarray(x, np.float64)
        n = len(x)
        out = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    out[i, j, k] = np_normalize(x[i] - x[j]) @ np_normalize(x[k] - x[j])
        return out

    return np_huber(phi(s) - phi(t)).mean()


def ref_sp(s, t):
    def g(x):
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        gram = x @ x.T
        return np.stack([np_normalize(r) for r in gram])

    b = len(s)
    return np.sum((g(s) - g(t)) ** 2) / b**2


def ref_pkt(s, t, eps=1e-7):
    def prob(x):
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        k = (x @ x.T + 1) / 2
        return k / k.sum(1, keepdims=True)

    ps, pt = prob(s), prob(t)
    return np.mean(pt * np.log((pt + eps) / (ps + eps)))


def ref_rel_probs(x, tau):
    x = np.asarray(x, np.float64)
    n = len(x)
    e = np.stack([np_normalize(r) for r in x])
    out = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        out.append((others, np_softmax(np.array([e[i] @ e[j] for j in others]) / tau)))
    return out


def ref_relation_kl(s, t, tau, w=None):
    kls = [
        np.sum(pt * (np.log(pt) - np.log(ps)))
        for (_, ps), (_, pt) in zip(ref_rel_probs(s, tau), ref_rel_probs(t, tau))
    ]
    return np_wmean(kls, np.ones(len(s)) if w is None else w)


def ref_info_nce(q, k, tau, symmetric=False):
    qn = np.stack([np_normalize(r) for r in np.asarray(q, np.float64)])
    kn = np.stack([np_normalize(r) for r in np.asarray(k, np.float64)])
    m = qn @ kn.T / tau
    fwd = [-np_log_softmax(m[i])[i] for i in range(len(m))]
    if not symmetric:
        return np.mean(fwd)
    bwd = [-np_log_softmax(m[:, i])[i] for i in range(len(m))]
    return np.mean(0.5 * (np.array(fwd) + np.array(bwd)))


def ref_nt_xent(z1, z2, tau, labels=None):
    z = np.concatenate([np.asarray(z1, np.float64), np.asarray(z2, np.float64)])
    z = np.stack([np_normalize(r) for r in z])
    n2, b = len(z), len(z1)
    y = None if labels is None else np.concatenate([labels, labels])
    losses = []
    for a in range(n2):
        others = [j for j in range(n2) if j != a]
        lp = np_log_softmax(np.array([z[a] @ z[j] for j in others]) / tau)
        pos = [
            idx
            for idx, j in enumerate(others)
            if j == (a + b) % n2 or (y is not None and y[a] >= 0 and y[j] == y[a])
        ]
        losses.append(-np.mean(lp[pos]))
    return np.mean(losses)


def ref_sinkhorn(logits, n_iters, eps):
    q = np.exp(np.asarray(logits, np.float64) / eps).T  # [K, B], UNO layout
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def ref_swapped(l1, l2, t1, t2, tau):
    def ce(logits, t):
        return np.mean(
            [-np.sum(t[i] * np_log_softmax(logits[i] / tau)) for i in range(len(logits))]
        )

    l1, l2, t1, t2 = (np.asarray(a, np.float64) for a in (l1, l2, t1, t2))
    return 0.5 * (ce(l1, t2) + ce(l2, t1))


def ref_relation_matrix(r):
    r = np.asarray(r, np.float64)
    e = np.stack([np_normalize(x) for x in r])
    s = e @ e.T
    np.fill_diagonal(s, 0.0)
    return s


def ref_smi(rk, rn, tau):
    uk = np.stack([np_normalize(x) for x in ref_relation_matrix(rk)])
    un = np.stack([np_normalize(x) for x in ref_relation_matrix(rn)])
    m = uk @ un.T / tau
    b = len(m)
    return np.mean(
        [-0.5 * (np_log_softmax(m[i])[i] + np_log_softmax(m[:, i])[i]) for i in range(b)]
    )


def ref_sc(rk, rn, tau, direction="both"):
    out = ref_relation_kl(rn, rk, tau)
    if direction == "both":
        out += ref_relation_kl(rk, rn, tau)
    return out


# ==========================================================================================
# Inputs
# ==========================================================================================


def make_inputs(seed, b=8, c=10, d_s=12, d_t=16):
    r = np.random.default_rng(seed)
    labels = r.integers(0, 3, size=(b,)).astype(np.int32)
    lab_neg = labels.copy()
    lab_neg[::3] = -1
    return {
        "zs": (r.normal(size=(b, c)) * 2).astype(np.float32),
        "zt": (r.normal(size=(b, c)) * 3).astype(np.float32),
        "fs": r.normal(size=(b, d_s)).astype(np.float32),
        "ft": r.normal(size=(b, d_t)).astype(np.float32),
        "fs2": r.normal(size=(b, d_t)).astype(np.float32),
        "ncd1": np.tanh(r.normal(size=(b, 5))).astype(np.float32),
        "ncd2": np.tanh(r.normal(size=(b, 5))).astype(np.float32),
        "rk": np.asarray(jax.nn.softmax(r.normal(size=(b, 5)) * 2), np.float32),
        "rn": np.asarray(jax.nn.softmax(r.normal(size=(b, 4)) * 2), np.float32),
        "labels": labels,
        "lab_neg": lab_neg,
        "w_real": r.uniform(0.1, 2.0, size=(b,)).astype(np.float32),
    }


def golden_cases():
    """name -> function of the inputs dict (one value per loss, guarded by the golden file)."""
    return {
        "kd": lambda x: L.kd_loss(x["zs"], x["zt"], 4.0),
        "kd_mask_k3": lambda x: L.kd_loss(x["zs"], x["zt"], 4.0, L.class_drop_mask(x["zt"], k=3)),
        "kd_teacher_only_thr": lambda x: L.kd_loss(
            x["zs"], x["zt"], 2.0, L.class_drop_mask(x["zt"], threshold=0.05), mask_student=False
        ),
        "low_noise_targets": lambda x: L.low_noise_targets(x["zt"], 4.0, rho=0.9)[0],
        "lnr_loss": lambda x: L.soft_target_cross_entropy(
            x["zs"], L.low_noise_targets(x["zt"], 4.0, rho=0.9)[0], 4.0
        ),
        "feat_l2sq": lambda x: L.feature_loss(x["fs2"], x["ft"]),
        "feat_cosine": lambda x: L.feature_loss(x["fs2"], x["ft"], kind="cosine"),
        "feat_smooth_l1": lambda x: L.feature_loss(x["fs2"], x["ft"], False, "smooth_l1"),
        "rkd_distance": lambda x: L.rkd_distance_loss(x["fs"], x["ft"]),
        "rkd_angle": lambda x: L.rkd_angle_loss(x["fs"], x["ft"]),
        "sp": lambda x: L.similarity_preserving_loss(x["fs"], x["ft"]),
        "pkt": lambda x: L.pkt_loss(x["fs"], x["ft"]),
        "relation_kl": lambda x: L.relation_kl_loss(x["fs"], x["ft"], 0.5),
        "info_nce": lambda x: L.info_nce(x["fs2"], x["ft"], 0.1),
        "nt_xent": lambda x: L.nt_xent(x["fs"], x["fs2"][:, :12], 0.5),
        "supcon": lambda x: L.nt_xent(x["fs"], x["fs2"][:, :12], 0.5, positives=x["labels"]),
        "sinkhorn": lambda x: L.sinkhorn_knopp(x["ncd1"], 3, 0.05),
        "swapped": lambda x: L.swapped_prediction_loss(
            x["ncd1"], x["ncd2"], L.sinkhorn_knopp(x["ncd1"]), L.sinkhorn_knopp(x["ncd2"]), 0.1
        ),
        "smi": lambda x: L.spatial_mutual_information(x["rk"], x["rn"], 0.1),
        "sc": lambda x: L.self_cooperation_loss(x["rk"], x["rn"], 0.1),
    }


SCALES = np.array([[3.0, 1.0], [1.0, 0.2], [7.5, 0.01]], np.float32)


def extra_cases():
    """More values checked against the float64 references (same compiled program)."""

    def dup(a, i, j):
        return a.at[i].set(a[j])

    def lnr(x, **kw):
        return L.low_noise_targets(x["zt"], 4.0, **kw)

    return {
        "mask_k3": lambda x: L.class_drop_mask(x["zt"], k=3),
        "mask_thr": lambda x: L.class_drop_mask(x["zt"], threshold=0.2),
        "kd_mask_k3_teacher": lambda x: L.kd_loss(
            x["zs"], x["zt"], 4.0, L.class_drop_mask(x["zt"], k=3), mask_student=False
        ),
        "kd_k1_teacher": lambda x: L.kd_loss(
            x["zs"], x["zt"], 4.0, L.class_drop_mask(x["zt"], k=1), mask_student=False
        ),
        "kd_w": lambda x: L.kd_loss(x["zs"], x["zt"], 3.0, weights=x["w_real"]),
        "lnr_t_05": lambda x: lnr(x, rho=0.5)[0],
        "lnr_m_05": lambda x: lnr(x, rho=0.5)[1],
        "lnr_m_09": lambda x: lnr(x, rho=0.9)[1],
        "lnr_m_topk2": lambda x: lnr(x, rule="top_k", k=2)[1],
        "lnr_m_thr": lambda x: lnr(x, rule="threshold", threshold=0.99)[1],
        "lnr_m_none": lambda x: lnr(x, rule="none")[1],
        **{
            f"feat_{n}_{k}": (lambda n, k: lambda x: L.feature_loss(x["fs2"], x["ft"], n, k))(n, k)
            for n, k in ((True, "smooth_l1"), (False, "l2sq"), (False, "cosine"))
        },
        "feat_w": lambda x: L.feature_loss(x["fs2"], x["ft"], weights=x["w_real"]),
        "feat_4d": lambda x: L.feature_loss(x["fs2"].reshape(8, 2, 2, 4), x["ft"].reshape(8, 4, 4)),
        "rkd_angle_c3": lambda x: L.rkd_angle_loss(x["fs"], x["ft"], chunk_size=3),
        "rkd_angle_gram": lambda x: L.rkd_angle_loss(x["fs"], x["ft"], chunk_size=3, method="gram"),
        "rkd_angle_gram_dup": lambda x: L.rkd_angle_loss(
            dup(x["fs"], 1, 0), dup(x["ft"], 3, 2), method="gram"
        ),
        "relkl_01": lambda x: L.relation_kl_loss(x["fs"], x["ft"], 0.1),
        "relkl_w": lambda x: L.relation_kl_loss(x["fs"], x["ft"], 0.5, weights=x["w_real"]),
        "info_nce_sym": lambda x: L.info_nce(x["fs2"], x["ft"], 0.2, symmetric=True),
        "supcon_neg": lambda x: L.nt_xent(x["fs"], x["fs2"][:, :12], 0.3, positives=x["lab_neg"]),
        "sinkhorn_1": lambda x: L.sinkhorn_knopp(x["ncd1"], 1, 0.05),
        "relation_matrix": lambda x: L.relation_matrix(x["rk"]),
        "sc_k2n": lambda x: L.self_cooperation_loss(x["rk"], x["rn"], 0.1, "known_to_novel"),
        "swapped_heads": lambda x: L.swapped_prediction_loss(
            jnp.stack([x["ncd1"], x["ncd1"] * 0.5]),
            jnp.stack([x["ncd2"], x["ncd2"]]),
            jnp.stack([L.sinkhorn_knopp(x["ncd1"])] * 2),
            jnp.stack([L.sinkhorn_knopp(x["ncd2"])] * 2),
            0.1,
        ),
        "rkd_distance_dup": lambda x: L.rkd_distance_loss(dup(x["fs"], 1, 0), dup(x["ft"], 3, 2)),
        "rkd_angle_dup": lambda x: L.rkd_angle_loss(dup(x["fs"], 1, 0), dup(x["ft"], 3, 2)),
        # zero at equality, invariances
        "zero_relkl": lambda x: L.relation_kl_loss(x["ft"], x["ft"], 0.5),
        "zero_relkl_scaled": lambda x: L.relation_kl_loss(2 * x["ft"], x["ft"], 0.5),
        "zero_sc": lambda x: L.self_cooperation_loss(x["rk"], x["rk"], 0.1),
        "zero_rkd_d": lambda x: L.rkd_distance_loss(x["ft"], x["ft"]),
        "zero_sp": lambda x: L.similarity_preserving_loss(x["ft"], x["ft"]),
        "zero_kd": lambda x: L.kd_loss(x["zt"], x["zt"]),
        # scale either feature set (one vmapped instance per loss keeps compile time down)
        **{
            f"scaled_rkd_{kind}": (
                lambda fn: (
                    lambda x: jax.vmap(lambda a, b: fn(x["fs"] * a, x["ft"] * b))(
                        SCALES[:, 0], SCALES[:, 1]
                    )
                )
            )(fn)
            for kind, fn in (("d", L.rkd_distance_loss), ("a", L.rkd_angle_loss))
        },
    }


@jax.jit
def compute_all(x):
    return {name: fn(x) for name, fn in {**golden_cases(), **extra_cases()}.items()}


_CACHE = {}


def values(seed=None):
    """All loss values on make_inputs(seed) (one compiled program, computed once per seed)."""
    seed = SEED if seed is None else seed
    if seed not in _CACHE:
        x = make_inputs(seed)
        _CACHE[seed] = (x, {k: np.asarray(v) for k, v in compute_all(x).items()})
    return _CACHE[seed]


_CACHE64 = {}


def values64():
    """All loss values on make_inputs(SEED) cast to float64, computed in float64 (invariances
    are checked here: reordering a float64 sum moves a value by ~1e-16, not ~1e-7)."""
    if not _CACHE64:
        x = make_inputs(SEED)
        with jax.enable_x64(True):
            _CACHE64.update({k: np.asarray(v) for k, v in compute_all(as64(x)).items()})
    return _CACHE64


def regen_golden():
    """Golden outputs computed in float64 from the float32 inputs: no CPU's float32 rounding is
    stored, so a float64 run must reproduce them to ~1e-12 anywhere."""
    inputs = make_inputs(20240601)
    with jax.enable_x64(True):
        got = compute_all(as64(inputs))
    out = {f"in/{k}": v for k, v in inputs.items()}
    out.update({f"out/{name}": np.asarray(got[name]) for name in golden_cases()})
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    np.savez(GOLDEN, **out)
    print(f"wrote {len(golden_cases())} golden values to {GOLDEN}")


# ==========================================================================================
# Golden values and float64 references
# ==========================================================================================


def test_golden_file_matches():
    """The stored values (computed in float64): a float64 run reproduces them to ~1e-12 (any
    change of a loss shows); the float32 run is within float32 accuracy (1e-5, ~100x its
    rounding) of them."""
    data = np.load(GOLDEN)
    inputs = {k[3:]: data[k] for k in data.files if k.startswith("in/")}
    stored = {k[4:] for k in data.files if k.startswith("out/")}
    assert stored == set(golden_cases()), f"golden file out of date: {stored ^ set(golden_cases())}"
    got = compute_all(inputs)
    with jax.enable_x64(True):
        got64 = {k: np.asarray(v) for k, v in compute_all(as64(inputs)).items()}
    for name in golden_cases():
        want = data[f"out/{name}"]
        assert want.dtype == np.float64 or want.dtype == bool, (name, want.dtype)
        np.testing.assert_allclose(got64[name], want, rtol=1e-10, atol=1e-12, err_msg=name)
        # float32 vs float64: measured <= 2.1e-6 relative (Sinkhorn at epsilon 0.05), else <= 7e-7
        rtol = 1e-4 if name == "sinkhorn" else 1e-5
        np.testing.assert_allclose(np.asarray(got[name]), want, rtol=rtol, atol=1e-6, err_msg=name)


def test_kd_against_reference():
    x, v = values()
    zs, zt = x["zs"], x["zt"]
    close(v["kd"], ref_kd(zs, zt, 4.0))
    mask = v["mask_k3"]
    close(v["kd_mask_k3"], ref_kd(zs, zt, 4.0, mask))
    close(v["kd_mask_k3_teacher"], ref_kd(zs, zt, 4.0, mask, mask_student=False))
    close(v["kd_w"], ref_kd(zs, zt, 3.0, w=x["w_real"]))
    p = np.asarray(jax.nn.softmax(zt))
    thr = p >= 0.05
    thr[np.arange(8), p.argmax(1)] = True
    close(v["kd_teacher_only_thr"], ref_kd(zs, zt, 2.0, thr, mask_student=False))
    # teacher-only truncation with k = 1 is a pseudo-label cross-entropy (not zero)
    ce = -np.mean([np_log_softmax(zs[i] / 4.0)[zt[i].argmax()] for i in range(8)]) * 16
    close(v["kd_k1_teacher"], ce)


def test_class_drop_mask():
    x, v = values()
    zt = x["zt"]
    m = v["mask_k3"]
    assert (m.sum(1) == 3).all()
    for i in range(len(zt)):
        assert set(np.flatnonzero(m[i])) == set(np.argsort(-zt[i], kind="stable")[:3])
    p = np.asarray(jax.nn.softmax(zt.astype(np.float64)))
    expect = p >= 0.2
    expect[np.arange(len(zt)), p.argmax(1)] = True
    np.testing.assert_array_equal(v["mask_thr"], expect)
    with pytest.raises(ValueError):
        L.class_drop_mask(zt)


def test_kd_mask_properties_exact():
    x = make_inputs(SEED)
    zs, zt = x["zs"], x["zt"]
    plain = float(L.kd_loss(zs, zt, 4.0))
    assert float(L.kd_loss(zs, zt, 4.0, np.ones(zs.shape, bool))) == plain
    assert float(L.kd_loss(zs, zt, 4.0, L.class_drop_mask(zt, k=10))) == plain
    assert float(L.kd_loss(zs, zt, 4.0, L.class_drop_mask(zt, k=1))) == 0.0
    # rho = 1 with k_max = C is plain KD exactly; rule none with teacher-only masking too
    t, _ = L.low_noise_targets(zt, 4.0, rule="top_p", rho=1.0, k_max=10)
    assert float(L.soft_target_cross_entropy(zs, t, 4.0)) == plain
    kept = L.low_noise_targets(zt, 4.0, rule="none")[1]
    assert float(L.kd_loss(zs, zt, 4.0, kept, mask_student=False)) == plain


def test_low_noise_targets_against_reference():
    x, v = values()
    zs, zt = x["zs"], x["zt"]
    for rho, t, kept in (
        (0.5, v["lnr_t_05"], v["lnr_m_05"]),
        (0.9, v["low_noise_targets"], v["lnr_m_09"]),
    ):
        ref_mask = ref_top_p_mask(zt, rho, k_max=5)
        np.testing.assert_array_equal(kept, ref_mask)
        close(t.sum(1), np.ones(len(zt)))
        assert (t[~ref_mask] == 0).all()
        ref_t = np.zeros(zt.shape)
        for i in range(len(zt)):
            ref_t[i, ref_mask[i]] = np_softmax(zt[i, ref_mask[i]] / 4.0)
        close(t, ref_t)
        assert kept[np.arange(len(zt)), zt.argmax(1)].all()
    close(v["lnr_loss"], ref_kd(zs, zt, 4.0, ref_top_p_mask(zt, 0.9, 5), mask_student=False))
    assert (v["lnr_m_topk2"].sum(1) == 2).all()
    assert v["lnr_m_thr"][np.arange(len(zt)), zt.argmax(1)].all()
    assert v["lnr_m_none"].all()


def test_feature_loss_against_reference():
    x, v = values()
    s, t = x["fs2"], x["ft"]
    close(v["feat_l2sq"], ref_feature(s, t, True, "l2sq"))
    close(v["feat_cosine"], ref_feature(s, t, True, "cosine"))
    close(v["feat_smooth_l1"], ref_feature(s, t, False, "smooth_l1"))
    for normalize, kind in ((True, "smooth_l1"), (False, "l2sq"), (False, "cosine")):
        close(v[f"feat_{normalize}_{kind}"], ref_feature(s, t, normalize, kind))
    close(v["feat_w"], ref_feature(s, t, True, "l2sq", x["w_real"]))
    close(v["feat_4d"], ref_feature(s, t, True, "l2sq"))


def test_relational_against_reference():
    x, v = values()
    s, t = x["fs"], x["ft"]
    close(v["rkd_distance"], ref_rkd_distance(s, t))
    close(v["rkd_angle"], ref_rkd_angle(s, t))
    close(v["rkd_angle_c3"], ref_rkd_angle(s, t))  # chunks with padding anchors
    close(v["rkd_angle_gram"], ref_rkd_angle(s, t), rtol=1e-4)  # Gram expansion: approximate
    close(v["sp"], ref_sp(s, t))
    close(v["pkt"], ref_pkt(s, t))
    close(v["relation_kl"], ref_relation_kl(s, t, 0.5))
    close(v["relkl_01"], ref_relation_kl(s, t, 0.1))
    close(v["relkl_w"], ref_relation_kl(s, t, 0.5, x["w_real"]))


def test_rkd_duplicate_rows_reference():
    # identical rows: angle vectors stay zero; the distance clamps at 1e-6 in float64, but the
    # float32 expansion (like the float32 reference code) gives sqrt(rounding noise) ~ 1e-3 for
    # an identical pair, hence the looser tolerance for the distance.
    x, v = values()
    s, t = x["fs"].copy(), x["ft"].copy()
    s[1] = s[0]
    t[3] = t[2]
    close(v["rkd_distance_dup"], ref_rkd_distance(s, t), rtol=1e-3)
    close(v["rkd_angle_dup"], ref_rkd_angle(s, t))
    close(v["rkd_angle_gram_dup"], ref_rkd_angle(s, t), rtol=1e-4)


def test_contrastive_against_reference():
    x, v = values()
    q, k = x["fs2"], x["ft"]
    close(v["info_nce"], ref_info_nce(q, k, 0.1))
    close(v["info_nce_sym"], ref_info_nce(q, k, 0.2, True))
    z1, z2 = x["fs"], x["fs2"][:, :12]
    close(v["nt_xent"], ref_nt_xent(z1, z2, 0.5))
    close(v["supcon"], ref_nt_xent(z1, z2, 0.5, x["labels"]))
    close(v["supcon_neg"], ref_nt_xent(z1, z2, 0.3, x["lab_neg"]))


def test_ncd_against_reference():
    x, v = values()
    close(v["sinkhorn_1"], ref_sinkhorn(x["ncd1"], 1, 0.05), rtol=1e-4, atol=1e-6)
    close(v["sinkhorn"], ref_sinkhorn(x["ncd1"], 3, 0.05), rtol=1e-4, atol=1e-6)
    t1, t2 = ref_sinkhorn(x["ncd1"], 3, 0.05), ref_sinkhorn(x["ncd2"], 3, 0.05)
    close(v["swapped"], ref_swapped(x["ncd1"], x["ncd2"], t1, t2, 0.1))
    half = ref_swapped(0.5 * x["ncd1"], x["ncd2"], t1, t2, 0.1)
    close(v["swapped_heads"], 0.5 * (v["swapped"] + half))  # mean over the head axis
    close(v["relation_matrix"], ref_relation_matrix(x["rk"]))
    close(v["smi"], ref_smi(x["rk"], x["rn"], 0.1))
    close(v["sc"], ref_sc(x["rk"], x["rn"], 0.1))
    close(v["sc_k2n"], ref_sc(x["rk"], x["rn"], 0.1, "known_to_novel"))


def test_zero_for_identical_inputs():
    v = values64()
    for name in ("zero_relkl", "zero_relkl_scaled", "zero_sc", "zero_rkd_d", "zero_sp", "zero_kd"):
        assert abs(float(v[name])) < 1e-12, (name, float(v[name]))
    assert float(v["smi"]) >= 0 and float(v["sc"]) >= 0


def test_rkd_scale_invariance():
    v = values64()
    for kind in ("d", "a"):
        base = v["rkd_distance" if kind == "d" else "rkd_angle"]
        record(
            f"RKD-{kind} scale invariance (float64, relative)",
            np.max(np.abs(v[f"scaled_rkd_{kind}"] / base - 1)),
        )
        close(v[f"scaled_rkd_{kind}"], np.full(len(SCALES), base), rtol=1e-10, atol=0)


@jax.jit
def _sinkhorn_variants(logits, padded, w):
    return {
        "q3": L.sinkhorn_knopp(logits),
        "q200": L.sinkhorn_knopp(logits, n_iters=200),
        "q2000": L.sinkhorn_knopp(logits, n_iters=2000),
        "padded": L.sinkhorn_knopp(padded, weights=w),
        "tiny_eps": L.sinkhorn_knopp(logits * 50, epsilon=0.01),
    }


def test_sinkhorn_marginals():
    logits = f32(np.tanh(rng(4).normal(size=(24, 6))))
    padded = jnp.concatenate([logits, jnp.ones((8, 6))])
    w = jnp.asarray(np.r_[np.ones(24), np.zeros(8)], jnp.float32)
    v = {k: np.asarray(a) for k, a in _sinkhorn_variants(logits, padded, w).items()}
    close(v["q3"].sum(1), np.ones(24), rtol=1e-5)
    assert (v["q3"] >= 0).all()
    close(v["q200"].sum(1), np.ones(24), rtol=1e-5)
    # 200 iterations follow the float64 recursion; they need not have converged (on ~3 % of
    # random draws the columns are still 0.3 % off), 2000 iterations have on every draw tried
    close(v["q200"], ref_sinkhorn(np.asarray(logits), 200, 0.05), rtol=1e-4, atol=2e-5)
    close(v["q2000"].sum(0), np.full(6, 24 / 6), rtol=1e-3)
    # padded rows get nothing and change nothing
    close(v["padded"][:24], v["q3"])
    assert (v["padded"][24:] == 0).all()
    # no overflow with tiny epsilon
    assert np.isfinite(v["tiny_eps"]).all()
    close(v["tiny_eps"].sum(1), np.ones(24), rtol=1e-5)


RELATIONAL = {
    "rkd_distance": lambda s, t, w=None: L.rkd_distance_loss(s, t, weights=w),
    "rkd_angle": lambda s, t, w=None: L.rkd_angle_loss(s, t, weights=w),
    "rkd_angle_gram": lambda s, t, w=None: L.rkd_angle_loss(s, t, weights=w, method="gram"),
    "sp": lambda s, t, w=None: L.similarity_preserving_loss(s, t, weights=w),
    "pkt": lambda s, t, w=None: L.pkt_loss(s, t, weights=w),
    "relation_kl": lambda s, t, w=None: L.relation_kl_loss(s, t, 0.5, weights=w),
    "info_nce": lambda s, t, w=None: L.info_nce(s, t[:, :12], 0.1, weights=w),
    "nt_xent": lambda s, t, w=None: L.nt_xent(s, t[:, :12], 0.5, weights=w),
    # pseudo-labels derived from the rows themselves, so they follow any permutation
    "supcon": lambda s, t, w=None: L.nt_xent(
        s, t[:, :12], 0.5, positives=(s[:, 0] > 0).astype(jnp.int32), weights=w
    ),
    "smi": lambda s, t, w=None: L.spatial_mutual_information(s, t, 0.1, weights=w),
    "sc": lambda s, t, w=None: L.self_cooperation_loss(s, t, 0.1, weights=w),
    "feature": lambda s, t, w=None: L.feature_loss(s, t[:, :12], weights=w),
}

ROWWISE = {
    "kd": lambda zs, zt, w=None: L.kd_loss(zs, zt, 4.0, weights=w),
    "kd_mask": lambda zs, zt, w=None: L.kd_loss(zs, zt, 4.0, L.class_drop_mask(zt, k=3), weights=w),
    "lnr": lambda zs, zt, w=None: L.soft_target_cross_entropy(
        zs, L.low_noise_targets(zt, 4.0)[0], 4.0, weights=w
    ),
    "swapped": lambda zs, zt, w=None: L.swapped_prediction_loss(
        zs, zt, L.sinkhorn_knopp(zs, weights=w), L.sinkhorn_knopp(zt, weights=w), 0.1, weights=w
    ),
}

# float64 references of the same calls (on the rows that are kept)
REF = {
    "rkd_distance": lambda s, t, zs, zt: ref_rkd_distance(s, t),
    "rkd_angle": lambda s, t, zs, zt: ref_rkd_angle(s, t),
    "rkd_angle_gram": lambda s, t, zs, zt: ref_rkd_angle(s, t),
    "sp": lambda s, t, zs, zt: ref_sp(s, t),
    "pkt": lambda s, t, zs, zt: ref_pkt(s, t),
    "relation_kl": lambda s, t, zs, zt: ref_relation_kl(s, t, 0.5),
    "info_nce": lambda s, t, zs, zt: ref_info_nce(s, t[:, :12], 0.1),
    "nt_xent": lambda s, t, zs, zt: ref_nt_xent(s, t[:, :12], 0.5),
    "supcon": lambda s, t, zs, zt: ref_nt_xent(s, t[:, :12], 0.5, (s[:, 0] > 0).astype(int)),
    "smi": lambda s, t, zs, zt: ref_smi(s, t, 0.1),
    "sc": lambda s, t, zs, zt: ref_sc(s, t, 0.1),
    "feature": lambda s, t, zs, zt: ref_feature(s, t[:, :12], True, "l2sq"),
    "row_kd": lambda s, t, zs, zt: ref_kd(zs, zt, 4.0),
    "row_kd_mask": lambda s, t, zs, zt: ref_kd(
        zs, zt, 4.0, np.argsort(np.argsort(-zt, 1, kind="stable"), 1) < 3
    ),
    "row_lnr": lambda s, t, zs, zt: ref_kd(zs, zt, 4.0, ref_top_p_mask(zt, 0.9, 5), False),
    "row_swapped": lambda s, t, zs, zt: ref_swapped(
        zs, zt, ref_sinkhorn(zs, 3, 0.05), ref_sinkhorn(zt, 3, 0.05), 0.1
    ),
    "sinkhorn_w": lambda s, t, zs, zt: ref_sinkhorn(np.tanh(zs[:, :6]), 3, 0.05),
}


@jax.jit
def VG(s, t, zs, zt, w):
    """Values and gradients of every batch loss, one compiled program (shape [8, ...])."""
    out = {}
    for name, fn in RELATIONAL.items():
        out[name], (out["gs/" + name], out["gt/" + name]) = jax.value_and_grad(fn, (0, 1))(s, t, w)
    for name, fn in ROWWISE.items():
        out["row_" + name], out["gz/" + name] = jax.value_and_grad(fn)(zs, zt, w)
    out["sinkhorn"] = L.sinkhorn_knopp(jnp.tanh(zs[:, :6]))
    out["sinkhorn_w"] = L.sinkhorn_knopp(jnp.tanh(zs[:, :6]), weights=w)
    # teacher-only low-noise KD with degenerate teachers; cosine feature loss at zero vectors
    lnr_t = lambda z: L.soft_target_cross_entropy(z, L.low_noise_targets(zt, 4.0)[0], 4.0)
    out["lnr_t"], out["gz/lnr_t"] = jax.value_and_grad(lnr_t)(zs)
    cos0 = lambda a: L.feature_loss(a * 0.0, jnp.zeros_like(a), kind="cosine")
    out["cos0"], out["gs/cos0"] = jax.value_and_grad(cos0)(s)
    return out


@jax.jit
def _BATCH_GLOBAL(s, t, zs, zt, w):
    """The batch-relational losses and Sinkhorn-Knopp (the part of VG that is batch-global)."""
    out = {name: fn(s, t, w) for name, fn in RELATIONAL.items() if name != "feature"}
    out["sinkhorn"] = L.sinkhorn_knopp(jnp.tanh(zs[:, :6]))
    out["sinkhorn_w"] = L.sinkhorn_knopp(jnp.tanh(zs[:, :6]), weights=w)
    return out


def close_dicts(got, want, keys=None, **kw):
    for name in want if keys is None else keys:
        close(got[name], want[name], name=name, **kw)


def _base():
    x = make_inputs(SEED)
    return f32(x["fs"]), f32(x["ft"]), f32(x["zs"]), f32(x["zt"])


def _base64():
    """_base()'s arrays as float64 (call inside `jax.enable_x64(True)`)."""
    return tuple(as64(a) for a in _base())


TIGHT = {"rtol": 1e-11, "atol": 1e-13}  # float64: reordering sums moves values by ~1e-16


PAD = np.array([2, 7])  # weight-0 garbage rows: one inside the batch, one appended at the end
KEEP = np.setdiff1d(np.arange(8), PAD)


def test_zero_weight_rows_change_nothing():
    """Rows with weight 0 (garbage, in the middle: anchors and partners) change nothing, in
    float64: the value equals the float64 reference on the kept rows, and they receive zero
    gradient. The same garbage rows at weight 1 change every batch loss."""
    r = rng(6)
    with jax.enable_x64(True):
        s, t, zs, zt = _base64()
        garbage = lambda a: a.at[PAD].set(jnp.asarray(r.normal(size=(2,) + a.shape[1:]) * 10))
        w = jnp.ones(8).at[PAD].set(0.0)
        inputs = [garbage(a) for a in (s, t, zs, zt)]
        got = {k: np.asarray(v) for k, v in VG(*inputs, w).items()}
        counted = {k: np.asarray(v) for k, v in VG(*inputs, jnp.ones(8)).items()}
    np_in = [np.asarray(a)[KEEP] for a in (s, t, zs, zt)]
    worst = 0.0
    for name, ref in REF.items():
        want = ref(*np_in)
        value = got[name][KEEP] if name == "sinkhorn_w" else got[name]
        close(value, want, name=name, **TIGHT)
        worst = max(worst, float(np.max(np.abs(value - want) / np.maximum(np.abs(want), 1e-3))))
    record("weight-0 rows vs float64 reference on the kept rows (relative)", worst)
    off = min(abs(float(counted[n]) / float(got[n]) - 1) for n in RELATIONAL if n != "feature")
    record("weight-0 rows given weight 1 (broken), smallest relative change", off)
    assert off > 1e-9, off
    assert (got["sinkhorn_w"][PAD] == 0).all()
    for key, g in got.items():
        if key.startswith(("gs/", "gt/", "gz/")) and key not in ("gz/lnr_t", "gs/cos0"):
            assert (g[PAD] == 0).all(), key


def test_permutation_invariance():
    """Permuting the batch permutes per-row outputs and gradients and leaves batch losses
    unchanged, in float64; permuting only the student's rows (broken pairing) changes them."""
    perm = rng(5).permutation(8)
    with jax.enable_x64(True):
        s, t, zs, zt = _base64()
        w = jnp.ones(8)
        got, want = VG(s[perm], t[perm], zs[perm], zt[perm], w), VG(s, t, zs, zt, w)
        unpaired = VG(s[perm], t, zs[perm], zt, w)
    worst = 0.0
    for key in want:
        if key in ("lnr_t", "gz/lnr_t", "cos0", "gs/cos0"):
            continue
        equivariant = key.startswith(("gs/", "gt/", "gz/")) or key.startswith("sinkhorn")
        expected = want[key][perm] if equivariant else want[key]
        close(got[key], expected, name=key, **TIGHT)
        worst = max(worst, max_distance(got[key], expected))
    record("batch permutation, every loss value and gradient", worst)
    off = min(abs(float(unpaired[n]) - float(want[n])) for n in RELATIONAL)
    record("student rows permuted alone (broken pairing), smallest change", off)
    assert off > 1e-9, off


def test_jit_equals_eager_and_vmap():
    """Eager (op by op) equals jit, and vmap over a leading axis equals separate calls, in
    float64; adding 1e-7 to one input moves the values by over 100x the tolerance."""
    data = np.load(GOLDEN)
    with jax.enable_x64(True):
        inputs = as64({k[3:]: data[k] for k in data.files if k.startswith("in/")})
        jitted = {k: np.asarray(v) for k, v in compute_all(inputs).items()}
        nudged = {
            k: np.asarray(v)
            for k, v in compute_all({**inputs, "fs": inputs["fs"].at[0, 0].add(1e-7)}).items()
        }
        worst = 0.0
        # eager, op by op: one case per public function (the rest share their code paths)
        names = (
            "kd_mask_k3",
            "lnr_loss",
            "feat_cosine",
            "rkd_distance",
            "rkd_angle",
            "sp",
            "pkt",
            "relation_kl",
            "info_nce",
            "supcon",
            "swapped",
            "smi",
            "sc",
        )
        for name in names:
            eager = np.asarray(golden_cases()[name](inputs))
            close(eager, jitted[name], name=name, **TIGHT)
            worst = max(worst, float(np.max(np.abs(eager - jitted[name]) / np.abs(jitted[name]))))
        record("eager vs jit, 13 losses (relative)", worst)
        moved = [
            float(np.max(np.abs(nudged[n] - jitted[n]) / np.abs(jitted[n])))
            for n in ("rkd_distance", "rkd_angle", "sp", "relation_kl")
        ]
        record("one input + 1e-7 (broken), smallest relative change", min(moved))
        assert min(moved) > 100 * TIGHT["rtol"], moved
        # vmap over a leading axis (e.g. heads / groups)
        s, t, zs, zt = _base64()
        got = jax.jit(
            jax.vmap(lambda a, b, c, d: (L.relation_kl_loss(a, b, 0.5), L.kd_loss(c, d)))
        )(jnp.stack([s, 2 * s]), jnp.stack([t, t]), jnp.stack([zs, zt]), jnp.stack([zt, zs]))
        close(got[0], [L.relation_kl_loss(s, t, 0.5), L.relation_kl_loss(2 * s, t, 0.5)], **TIGHT)
        close(got[1], [L.kd_loss(zs, zt), L.kd_loss(zt, zs)], **TIGHT)


def _mesh():
    devs = np.array(jax.devices())
    assert devs.size == 8, "tests expect 8 fake CPU devices (tests/conftest.py)"
    return Mesh(devs, ("data",))


def test_sharded_equals_single_device():
    """The batch sharded over 8 devices (global-view jit) gives the 1-device values, in
    float64; one device's row moved by 0.1 does not."""
    shard = NamedSharding(_mesh(), P("data"))
    with jax.enable_x64(True):
        s, t, zs, zt = _base64()
        w = jnp.ones(8).at[PAD].set(0.0)
        args = (s, t, zs, zt, w)
        want = _BATCH_GLOBAL(*args)  # single device
        sharded = [jax.device_put(a, shard) for a in args]
        assert all(len(a.addressable_shards) == 8 for a in sharded)
        got = _BATCH_GLOBAL(*sharded)
        broken = _BATCH_GLOBAL(jax.device_put(s.at[3].add(0.1), shard), *sharded[1:])
    close_dicts(got, want, keys=list(got), **TIGHT)
    record("loss values, batch sharded over 8 devices vs 1", max_distance(got, want))
    off = min(abs(float(broken[n]) - float(want[n])) for n in RELATIONAL if n != "feature")
    record("loss values, one device's row + 0.1 (broken), smallest change", off)
    assert off > 1e-9, off  # 1e8 x the float64 distance: data-dependent, never near it


def _degenerate_feature_sets():
    r = rng(8)
    same = np.tile(r.normal(size=(1, 12)), (8, 1)).astype(np.float32)
    zeros = r.normal(size=(8, 12)).astype(np.float32)
    zeros[[0, 3]] = 0.0
    all_zero = np.zeros((8, 12), np.float32)
    dup = r.normal(size=(8, 12)).astype(np.float32)
    dup[1] = dup[0]
    return [same, zeros, all_zero, dup]


def _assert_finite(tree, what):
    for leaf in jax.tree.leaves(tree):
        a = np.asarray(leaf)
        assert np.isfinite(a).all() and np.abs(a).max() < 1e6, what


def test_gradients_finite_on_degenerate_inputs():
    """Identical features, zero vectors, duplicates; one-hot / zero logits: finite everything."""
    normal = f32(rng(9).normal(size=(8, 16)))
    onehot = f32(np.eye(10)[np.arange(8) % 10] * 1e4)
    noisy = f32(rng(10).normal(size=(8, 10)))
    logit_pairs = [
        (onehot, onehot),
        (noisy, onehot),
        (onehot, jnp.zeros((8, 10))),
        (jnp.zeros((8, 10)), onehot),
    ]
    feats = _degenerate_feature_sets()
    cases = [(f32(f), t) for f in feats for t in (normal, None)]
    for i, (s, t) in enumerate(cases):
        t = jnp.concatenate([s, s[:, :4]], axis=1) if t is None else t
        zs, zt = logit_pairs[i % len(logit_pairs)]
        _assert_finite(VG(s, t, zs, zt, jnp.ones(8)), f"case {i}")


def test_teacher_is_stop_gradient():
    s, t, zs, zt = _base()
    got = VG(s, t, zs, zt, jnp.ones(8))
    for name in (
        "rkd_distance",
        "rkd_angle",
        "rkd_angle_gram",
        "sp",
        "pkt",
        "relation_kl",
        "feature",
    ):
        assert float(jnp.abs(got["gt/" + name]).max()) == 0.0, name
        assert float(jnp.abs(got["gs/" + name]).max()) > 0, name
    for name in ("info_nce", "nt_xent", "smi", "sc"):  # symmetric roles: both sides learn
        assert float(jnp.abs(got["gt/" + name]).max()) > 0, name
    g = jax.grad(lambda rk: L.self_cooperation_loss(rk, jnp.ones((8, 3)), 0.1, "known_to_novel"))(s)
    assert float(jnp.abs(g).max()) == 0.0  # known space is the stop-gradient teacher


def test_rkd_angle_memory_budget():
    """B = 1024, D = 512: value_and_grad (forward included) stays under 2 GiB (XLA analysis).

    (method="gram" uses the same chunking with smaller temporaries; see the benchmark.)"""
    spec = jax.ShapeDtypeStruct((1024, 512), jnp.float32)
    for method in ("exact",):
        fn = jax.value_and_grad(functools.partial(L.rkd_angle_loss, method=method))
        mem = jax.jit(fn).lower(spec, spec).compile().memory_analysis()
        if mem is None:
            pytest.skip("memory analysis unavailable")
        peak = mem.temp_size_in_bytes + mem.output_size_in_bytes
        assert peak < 2 * 2**30, peak


def test_import_is_light():
    code = (
        "import kd_jax.losses, kd_jax.sampling, sys; "
        "bad = [m for m in ('tensorflow', 'flax') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


if __name__ == "__main__":
    if "--regen-golden" in sys.argv:
        regen_golden()
    else:
        sys.exit(pytest.main([__file__, "-q"]))
