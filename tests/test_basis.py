"""The basis of real updates: layout, least-squares fit, composition over a Predict phase."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import _basis


@functools.partial(jax.jit, static_argnames=("groups", "sketch"))
def _pushed(basis, u, decay, groups=(0, 1), sketch=1):
    """``_basis.push`` of ``u`` with its inner products, as a real step pushes (jitted:
    one program instead of op by op)."""
    return _basis.push(basis, u, _basis.gram(basis, u, groups, 2, sketch), decay)


def _tree(rng, shapes=((5, 3), (7,))):
    return {f"p{i}": jnp.asarray(rng.normal(size=s), jnp.float32) for i, s in enumerate(shapes)}


def _logical(basis, size):
    """The directions in logical order, as numpy, per leaf."""
    idx = np.asarray(_basis.physical_index(basis.head, size))
    return [np.stack([np.asarray(b) for b in v])[idx] for v in _basis.slots(basis)]


@pytest.mark.parametrize("size", [2, 3, 4])
def test_push_keeps_last_ema_and_older_updates(size):
    rng = np.random.default_rng(0)
    params = _tree(rng)
    groups = (0, 1)
    basis = _basis.init(params, size, "float32", 2)
    history, ema = [], None
    for _ in range(6):
        u = _tree(rng)
        basis = _pushed(basis, u, 0.8, groups)
        history.append(u)
        ema = u if ema is None else jax.tree.map(lambda m, x: 0.8 * m + 0.2 * x, ema, u)
    for leaf, dirs in zip(["p0", "p1"], _logical(basis, size), strict=True):
        np.testing.assert_allclose(dirs[0], history[-1][leaf], rtol=1e-6)
        np.testing.assert_allclose(dirs[1], ema[leaf], rtol=1e-5)
        for lag in range(1, size - 1):
            np.testing.assert_allclose(dirs[1 + lag], history[-1 - lag][leaf], rtol=1e-6)


def test_a_restarted_ema_starts_at_the_update_and_its_gram_follows():
    """``push(..., restart=True)`` (the first observation after a quiet stretch): the
    EMA direction is the update itself, the older directions move on as usual, and the
    tracked Gram matrix matches the directions' inner products."""
    rng = np.random.default_rng(2)
    basis = _basis.init(_tree(rng), 3, "float32", 2)
    for _ in range(4):
        basis = _pushed(basis, _tree(rng), 0.9)
    u = _tree(rng)
    restarted = jax.jit(
        lambda b, u: _basis.push(b, u, _basis.gram(b, u, (0, 1), 2, 1), 0.9, restart=True)
    )(basis, u)
    before = _logical(basis, 3)
    for gi, (leaf, dirs) in enumerate(zip(["p0", "p1"], _logical(restarted, 3), strict=True)):
        np.testing.assert_allclose(dirs[0], u[leaf], rtol=1e-6)
        np.testing.assert_allclose(dirs[1], u[leaf], rtol=1e-6)  # the EMA: the update alone
        np.testing.assert_allclose(dirs[2], before[gi][0], rtol=1e-6)  # the last one before
        flat = dirs.reshape(3, -1)
        np.testing.assert_allclose(np.asarray(restarted.gram[gi]), flat @ flat.T, rtol=1e-4)


def test_tracked_gram_matches_direct_inner_products():
    rng = np.random.default_rng(1)
    params = _tree(rng)
    basis = _basis.init(params, 3, "float32", 2)
    for _ in range(5):
        u = _tree(rng)
        basis = _pushed(basis, u, 0.9)
    for gi, dirs in enumerate(_logical(basis, 3)):
        flat = dirs.reshape(3, -1)
        np.testing.assert_allclose(np.asarray(basis.gram[gi]), flat @ flat.T, rtol=1e-4)


def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(2)
    params = _tree(rng, ((40, 10), (30,)))
    basis = _basis.init(params, 3, "float32", 2)
    for _ in range(3):
        u = _tree(rng, ((40, 10), (30,)))
        basis = _pushed(basis, u, 0.5)
    truth = jnp.asarray([[0.7, -0.2, 0.4], [1.5, 0.3, -0.8]], jnp.float32)
    target = _basis.combine(basis, truth, (0, 1), params)
    coefs, r2 = _basis.fit(_basis.gram(basis, target, (0, 1), 2), 1e-8)
    np.testing.assert_allclose(np.asarray(coefs), np.asarray(truth), atol=1e-3)
    np.testing.assert_allclose(np.asarray(r2), 1.0, atol=1e-4)


def test_transition_composes_like_pushing_the_predicted_updates():
    """The virtual basis of a Predict phase equals the basis after really pushing."""
    rng = np.random.default_rng(3)
    params = _tree(rng)
    size, decay, groups = 3, 0.7, (0, 1)
    basis = _basis.init(params, size, "float32", 2)
    for _ in range(4):
        u = _tree(rng)
        basis = _pushed(basis, u, decay, groups)
    frozen, pushed = basis, basis
    transport = jnp.broadcast_to(jnp.eye(size), (2, size, size))
    for _ in range(4):
        c = jnp.asarray(rng.normal(size=(2, size)), jnp.float32)
        want = _basis.combine(pushed, c, groups, params)
        got = _basis.combine(frozen, jnp.einsum("gb,gbc->gc", c, transport), groups, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
        pushed = _pushed(pushed, want, decay, groups)
        transport = jnp.einsum("gij,gjk->gik", _basis.transition(c, decay), transport)


def test_norm_from_gram_matches_direct_norm():
    rng = np.random.default_rng(4)
    params = _tree(rng)
    basis = _basis.init(params, 2, "float32", 2)
    for _ in range(3):
        u = _tree(rng)
        basis = _pushed(basis, u, 0.9)
    c = jnp.asarray([[0.3, 1.2], [-0.5, 0.1]], jnp.float32)
    d = _basis.combine(basis, c, (0, 1), params)
    direct = np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(d)))
    assert float(_basis.norm(basis, c)) == pytest.approx(direct, rel=1e-4)


def test_spd_solve_matches_numpy():
    rng = np.random.default_rng(5)
    m = rng.normal(size=(6, 4, 4))
    a = m @ np.swapaxes(m, -1, -2) + 0.1 * np.eye(4)
    b = rng.normal(size=(6, 4))
    got = _basis.spd_solve(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np.linalg.solve(a, b[..., None])[..., 0], rtol=2e-3)


def test_sample_rows_takes_strided_rows_of_the_flattened_leaf():
    x = jnp.arange(6 * 4 * 5, dtype=jnp.float32).reshape(6, 4, 5)
    rows, factor = _basis.sample_rows(x, 4)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(x).reshape(24, 5)[::4])
    assert factor == 24 / 6
    for small in (jnp.ones((7,)), jnp.ones((3, 5)), jnp.ones(())):  # vectors, few rows
        same, one = _basis.sample_rows(small, 4)
        assert same is small and one == 1.0
    assert _basis.sample_rows(x, 1)[0] is x


def test_sketched_gram_estimates_the_exact_one_and_keeps_an_exact_fit():
    rng = np.random.default_rng(5)
    shapes = ((512, 64), (64,))
    params = _tree(rng, shapes)
    groups = (0, 1)
    exact = sketched = _basis.init(params, 3, "float32", 2)
    for _ in range(3):
        u = _tree(rng, shapes)
        exact = _pushed(exact, u, 0.5, groups)
        sketched = _pushed(sketched, u, 0.5, groups, sketch=8)

    # square norms within 10%, cosines within 0.05 (4096 of 32768 elements sampled)
    def norms_and_cosines(gram):
        d = np.sqrt(np.diagonal(np.asarray(gram), axis1=1, axis2=2))
        return d, np.asarray(gram) / (d[:, :, None] * d[:, None, :])

    (d_s, cos_s), (d_e, cos_e) = norms_and_cosines(sketched.gram), norms_and_cosines(exact.gram)
    np.testing.assert_allclose(d_s[0] ** 2, d_e[0] ** 2, rtol=0.1)
    np.testing.assert_allclose(cos_s[0], cos_e[0], atol=0.05)
    np.testing.assert_allclose(np.asarray(sketched.gram[1]), np.asarray(exact.gram[1]), rtol=1e-5)
    # an update in the basis' span: the sketched fit still recovers it exactly
    truth = jnp.asarray([[0.7, -0.2, 0.4], [1.5, 0.3, -0.8]], jnp.float32)
    target = _basis.combine(sketched, truth, groups, params)
    coefs, r2 = _basis.fit(_basis.gram(sketched, target, groups, 2, 8), 1e-8)
    np.testing.assert_allclose(np.asarray(coefs), np.asarray(truth), atol=1e-3)
    np.testing.assert_allclose(np.asarray(r2), 1.0, atol=1e-4)
