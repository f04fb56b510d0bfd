"""SCKD's replica mechanism (sckd.md §6) as pure losses: similarity matrix, pseudo-label
synthesis both ways, their KL terms. Float64 NumPy references and the batch invariances."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers import as64, max_distance, record
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import losses as L

B, D, CK, CN = 16, 12, 5, 4


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def ref_similarity(a, q, normalize=True):
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = an @ qn.T
    return s / np.abs(s).max() if normalize else s


def ref_both_terms(replica_l, feats_u, zn_l, zn_u, zk_l, zk_u, alpha, tau):
    """The two terms written over the sliced labeled / unlabeled sets, as the sources write
    them: S [N, M]; L_k->n = mean_j KL(softmax(a S^T zN_l)_j || softmax(zN_u_j / tau));
    L_n->k = mean_i KL(softmax(a S zK_u)_i || softmax(zK_l_i / tau))."""
    s = ref_similarity(replica_l, feats_u)

    def kl(q, z):
        return float(np.mean(np.sum(q * (np.log(q) - np_log_softmax(z / tau)), -1)))

    k2n = kl(np_softmax(alpha * s.T @ zn_l), zn_u)
    n2k = kl(np_softmax(alpha * s @ zk_u), zk_l)
    return k2n, n2k


def inputs(seed=0, b=B):
    r = np.random.default_rng(seed)
    labeled = np.zeros(b, bool)
    labeled[r.permutation(b)[: b // 2 - 1]] = True  # unequal sets, interleaved
    return dict(
        replica=r.normal(size=(b, D)),
        feats=r.normal(size=(b, D)),
        zn=3 * r.normal(size=(b, CN)),
        zk=3 * r.normal(size=(b, CK)),
        labeled=labeled,
    )


def batch_terms(replica, feats, zn, zk, labeled, valid=None, alpha=0.1, tau=1.0):
    """Both terms over the whole (masked) batch, the way the method calls them."""
    lab = labeled.astype(replica.dtype)
    unl = 1.0 - lab
    if valid is not None:
        lab, unl = lab * valid, unl * valid
    s = L.cross_similarity(replica, feats, lab, unl)
    k2n = L.cross_space_distillation(s, zn, zn, alpha, tau, target_weights=unl)
    n2k = L.cross_space_distillation(s.T, zk, zk, alpha, tau, target_weights=lab)
    return jnp.stack([k2n, n2k])


def test_terms_against_float64_reference():
    with jax.enable_x64(True):
        for seed, alpha, tau in ((0, 0.1, 1.0), (1, 0.5, 2.0), (2, 1.0, 0.5)):
            x = inputs(seed)
            lab = x["labeled"]
            want = ref_both_terms(
                x["replica"][lab],
                x["feats"][~lab],
                x["zn"][lab],
                x["zn"][~lab],
                x["zk"][lab],
                x["zk"][~lab],
                alpha,
                tau,
            )
            got = batch_terms(*as64(list(x.values())), alpha=alpha, tau=tau)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-14)


def test_similarity_against_reference_and_normalisation():
    with jax.enable_x64(True):
        x = inputs(3)
        lab = x["labeled"]
        s = np.asarray(L.cross_similarity(x["replica"], x["feats"], lab, ~lab))
        np.testing.assert_allclose(
            s[np.ix_(lab, ~lab)],
            ref_similarity(x["replica"][lab], x["feats"][~lab]),
            rtol=1e-12,
            atol=1e-14,
        )
        assert np.all(s[~lab] == 0) and np.all(s[:, lab] == 0)  # only labeled x unlabeled
        assert abs(np.abs(s).max() - 1.0) < 1e-15
        raw = np.asarray(L.cross_similarity(x["replica"], x["feats"], normalize=False))
        np.testing.assert_allclose(
            raw, ref_similarity(x["replica"], x["feats"], False), rtol=1e-12, atol=1e-14
        )
        # cosine: invariant to each row's scale
        scaled = L.cross_similarity(
            x["replica"] * np.linspace(0.1, 9, B)[:, None], 7 * x["feats"], lab, ~lab
        )
        np.testing.assert_allclose(np.asarray(scaled), s, rtol=1e-12, atol=1e-14)


def test_synthesis_is_a_similarity_weighted_vote():
    """A target row puts its mass on the class the most similar sources vote for: two sources,
    the query identical to the first, sources confident in different classes."""
    a = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    q = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    s = L.cross_similarity(a, q)
    z = jnp.array([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    targets = np.asarray(L.synthesize_pseudo_labels(s, z, alpha=1.0))
    assert targets[0].argmax() == 0 and targets[1].argmax() == 1
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    # uniform similarity -> every target is the softmax of the summed source logits
    same = np.asarray(L.synthesize_pseudo_labels(jnp.ones((2, 2)), z, alpha=0.1))
    np.testing.assert_allclose(same[0], np_softmax(0.1 * z.sum(0)), rtol=1e-6)


def test_permutation_padding_and_scale_invariance():
    with jax.enable_x64(True):
        x = inputs(4)
        args = as64(list(x.values()))
        base = batch_terms(*args)
        perm = np.random.default_rng(5).permutation(B)  # shuffles both sets and their order
        permuted = batch_terms(*[a[perm] for a in args])
        record("SCKD replica terms, batch permuted", max_distance(base, permuted))
        np.testing.assert_allclose(np.asarray(permuted), np.asarray(base), rtol=1e-12)
        # padding rows (weight 0, garbage content) change nothing
        r = np.random.default_rng(6)
        padded = [
            jnp.concatenate([a, jnp.asarray(100 * r.normal(size=(3, *a.shape[1:])), a.dtype)])
            if a.dtype != bool
            else jnp.concatenate([a, jnp.array([True, False, True])])
            for a in args
        ]
        valid = jnp.concatenate([jnp.ones(B), jnp.zeros(3)])
        got = batch_terms(*padded, valid=valid)
        record("SCKD replica terms, 3 padding rows", max_distance(base, got))
        np.testing.assert_allclose(np.asarray(got), np.asarray(base), rtol=1e-12)
        # the terms do see real rows: one labeled row's novel logit moved changes L_k->n
        moved = args[2].at[int(np.flatnonzero(x["labeled"])[0]), 0].add(1.0)
        assert abs(float(batch_terms(args[0], args[1], moved, *args[3:])[0] - base[0])) > 1e-6


def test_sharded_equals_single_device():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert mesh.size == 8, "tests expect 8 fake CPU devices (tests/conftest.py)"
    shard = NamedSharding(mesh, P("data"))
    with jax.enable_x64(True):
        args = as64(list(inputs(7).values()))
        fn = jax.jit(batch_terms)
        want = batch_terms(*args)
        got = fn(*[jax.device_put(a, shard) for a in args])
    record("SCKD replica terms, 8 devices vs 1", max_distance(got, want))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12)


def test_gradients_reach_only_the_distilled_logits():
    """The similarity and the synthesised targets are stop-gradient: only the target rows'
    logits of the distilled head receive a gradient, and they do."""
    x = {
        k: jnp.asarray(v, jnp.float32) if v.dtype != bool else jnp.asarray(v)
        for k, v in inputs(8).items()
    }
    lab = x["labeled"].astype(jnp.float32)

    def k2n(replica, feats, source, target):
        s = L.cross_similarity(replica, feats, lab, 1 - lab)
        return L.cross_space_distillation(s, source, target, 0.1, 1.0, target_weights=1 - lab)

    g = jax.grad(k2n, argnums=(0, 1, 2, 3))(x["replica"], x["feats"], x["zn"], x["zn"])
    assert all(bool(jnp.all(gi == 0)) for gi in g[:3])
    gt = np.asarray(g[3])
    assert np.all(np.isfinite(gt)) and np.all(gt[x["labeled"]] == 0)
    assert np.all(np.abs(gt[~np.asarray(x["labeled"])]).sum(-1) > 0)


def test_kl_is_zero_when_student_matches_targets():
    z = jnp.asarray(np.random.default_rng(9).normal(size=(6, 4)), jnp.float32)
    assert abs(float(L.pseudo_label_kl(jax.nn.softmax(z), z))) < 1e-6
    assert float(L.pseudo_label_kl(jax.nn.softmax(z), -z)) > 0.1
