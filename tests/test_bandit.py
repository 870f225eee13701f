"""The discounted LinUCB bandit: exact inverses, learning, forgetting, safety, one trace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import _bandit as bandit

K, D, T = 5, 6, 2000
select, update = jax.jit(bandit.select), jax.jit(bandit.update)


@pytest.mark.parametrize("discount", [1.0, 0.9])
def test_sherman_morrison_matches_dense_inverse(discount):
    rng = np.random.default_rng(0)
    ridge = 0.5
    state = bandit.init(3, 4, ridge=ridge)
    a = np.stack([ridge * np.eye(4)] * 3)
    b = np.zeros((3, 4))
    for _ in range(120):
        arm, x, r = int(rng.integers(3)), rng.normal(size=4), float(rng.normal())
        state = update(state, arm, jnp.asarray(x, jnp.float32), r, discount)
        a = discount * a + (1 - discount) * ridge * np.eye(4)
        a[arm] += np.outer(x, x)
        b = discount * b
        b[arm] += r * x
    inv = np.linalg.inv(a)
    scale = np.abs(inv).max()
    np.testing.assert_allclose(np.asarray(state.a_inv), inv, atol=2e-5 * scale)
    np.testing.assert_allclose(np.asarray(state.b), b, rtol=1e-4, atol=1e-4)
    assert state.a_inv.dtype == jnp.float32 and state.pulls.dtype == jnp.int32
    assert int(state.pulls.sum()) == 120


def problem(seed):
    thetas = np.random.default_rng(seed).normal(size=(K, D)).astype(np.float32)
    return jnp.asarray(thetas), jnp.asarray(np.roll(thetas, 2, axis=0))


@jax.jit
def best_arm_picked(before, after, alpha, discount, key):
    """Rounds of a linear contextual problem whose arms switch to ``after`` halfway."""

    def body(state, inp):
        t, k = inp
        kx, kn = jax.random.split(k)
        x = jax.random.normal(kx, (D,)).at[0].set(1.0)  # a bias feature
        means = jnp.where(t < T // 2, before, after) @ x
        arm, _ = bandit.select(state, x, alpha)
        reward = means[arm] + 0.1 * jax.random.normal(kn)
        return bandit.update(state, arm, x, reward, discount), arm == jnp.argmax(means)

    _, best = jax.lax.scan(body, bandit.init(K, D), (jnp.arange(T), jax.random.split(key, T)))
    return best


def last_quarter(best):
    return float(jnp.mean(best[-T // 4 :]))


@pytest.mark.parametrize("seed", [0, 1])
def test_learns_stationary_problem(seed):
    thetas, _ = problem(seed)
    plain = last_quarter(best_arm_picked(thetas, thetas, 0.5, 1.0, jax.random.key(seed)))
    assert plain >= 0.9  # measured 0.986 and 0.982
    slow = last_quarter(best_arm_picked(thetas, thetas, 0.5, 0.99, jax.random.key(seed)))
    assert slow >= 0.8  # forgetting costs some accuracy: measured 0.938 and 0.904


@pytest.mark.parametrize("seed", [0, 1])
def test_discount_recovers_after_change(seed):
    before, after = problem(seed)
    key = jax.random.key(seed)
    forgetting = last_quarter(best_arm_picked(before, after, 0.5, 0.99, key))
    plain = last_quarter(best_arm_picked(before, after, 0.5, 1.0, key))
    assert forgetting >= 0.8  # measured 0.950 and 0.896
    assert forgetting >= plain + 0.3  # plain LinUCB stays stuck: measured 0.398 and 0.336


def test_ties_and_untried_arms():
    state = bandit.init(3, 2)
    x = jnp.ones(2)
    assert int(select(state, x, 1.0)[0]) == 0  # all untried: lowest index
    state = update(state, 0, x, 1.0, 1.0)
    assert int(select(state, x, 1.0)[0]) == 1  # untried arms first
    state = update(state, 1, x, 0.0, 1.0)
    state = update(state, 2, x, 0.0, 1.0)
    arm, scores = select(state, x, 0.0)
    assert int(arm) == 0 and scores.shape == (3,)
    state = update(state, 0, x, -1.0, 1.0)  # arm 0 back to a mean of 0
    arm, scores = select(state, x, 0.0)
    assert float(scores[0]) == float(scores[1]) == 0.0  # a tie: the lowest index wins
    assert int(arm) == 0


@pytest.mark.parametrize(
    "arm, context, reward, discount",
    [
        (1, [1.0, 2.0], jnp.nan, 0.9),
        (1, [1.0, 2.0], jnp.inf, 0.9),
        (1, [jnp.nan, 2.0], 1.0, 0.9),
        (1, [1.0, -jnp.inf], 1.0, 0.9),
        (1, [1.0, 2.0], 1.0, jnp.nan),
        (7, [1.0, 2.0], 1.0, 0.9),
    ],
)
def test_invalid_observation_leaves_state_unchanged(arm, context, reward, discount):
    state = update(bandit.init(3, 2), 0, jnp.array([0.5, 1.0]), 2.0, 0.9)
    after = update(
        state, arm, jnp.asarray(context, jnp.float32), jnp.float32(reward), jnp.float32(discount)
    )
    for new, old in zip(after, state, strict=True):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_validation():
    with pytest.raises(ValueError, match="n_arms"):
        bandit.init(0, 3)
    with pytest.raises(ValueError, match="dim"):
        bandit.init(2, 0)
    with pytest.raises(ValueError, match="ridge"):
        bandit.init(2, 3, ridge=0.0)
    with pytest.raises(ValueError, match="discount"):
        bandit.update(bandit.init(2, 3), 0, jnp.ones(3), 1.0, 1.5)


def test_remember_records_pending_decision():
    state = bandit.remember(bandit.init(2, 3), jnp.int32(1), jnp.arange(3.0))
    assert int(state.last_arm) == 1
    np.testing.assert_array_equal(np.asarray(state.last_context), [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(np.asarray(state.pulls), [0, 0])


def test_select_and_update_trace_once():
    traces = {"select": 0, "update": 0}

    def counted_select(state, x, alpha):
        traces["select"] += 1
        return bandit.select(state, x, alpha)

    def counted_update(state, arm, x, reward, discount):
        traces["update"] += 1
        return bandit.update(state, arm, x, reward, discount)

    jit_select, jit_update = jax.jit(counted_select), jax.jit(counted_update)
    state = bandit.init(4, 3)
    rng = np.random.default_rng(0)
    for i in range(6):
        x = jnp.asarray(rng.normal(size=3), jnp.float32)
        arm, _ = jit_select(state, x, jnp.float32(0.5 + i))
        state = jit_update(state, arm, x, jnp.float32(rng.normal()), jnp.float32(0.95))
    assert traces == {"select": 1, "update": 1}
