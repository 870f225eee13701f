"""The RSSM ensemble on synthetic trajectories with known dynamics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import _encoder, _rssm
from hybrid_jax._predictors import Observation, PredictContext, PredictorSpec

G, B = 3, 2
F = _encoder.n_features(B)
SETTINGS = _rssm.sizes(
    members=5, hidden=64, mlp=64, window=16, horizon=5, learning_rate=1e-3, seed=0
)


def truth(theta):
    """Coefficients and log-loss change of the step after a step at phase ``theta``."""
    g = jnp.arange(G, dtype=jnp.float32)[:, None]
    coefs = jnp.concatenate([jnp.sin(theta + g), jnp.cos(theta + g)], axis=1)
    dlog = -0.02 * (1.0 + 0.5 * jnp.sin(theta))
    return coefs, dlog


def observation(t, prev_pred):
    """Real step ``t``: its features reveal the phase; its targets are the truth for ``t``."""
    theta = 0.15 * t
    coefs, dlog = truth(0.15 * (t - 1))
    feats = jnp.zeros((F,), jnp.float32).at[0].set(jnp.sin(theta)).at[1].set(jnp.cos(theta))
    cos = jnp.sum(prev_pred * coefs) / (jnp.linalg.norm(prev_pred) * jnp.linalg.norm(coefs) + 1e-9)
    return Observation(
        target_coefs=coefs,
        fit_r2=jnp.ones((G,)),
        loss=jnp.float32(1.0),
        log_loss_change=dlog,
        grad_norm=jnp.float32(1.0),
        update_norm=jnp.float32(1.0),
        cosine=jnp.float32(0.9),
        step=jnp.int32(t),
        gap=jnp.int32(1),
        realised_cosine=cos,
        features=feats,
    )


def run(pred, state, start, n):
    """Observes steps start..start+n-1; records the one-step predictions made before each."""

    def body(state, t):
        p, _ = pred.predict(state, PredictContext(jnp.int32(0), jnp.float32(0), jnp.float32(0)))
        obs = observation(t, p.coefs)
        out = (
            p.coefs,
            p.log_loss_change,
            p.confidence,
            obs.target_coefs,
            obs.log_loss_change,
            jnp.clip(obs.realised_cosine, 0, 1),
        )
        return pred.observe(state, obs), out

    return jax.lax.scan(body, state, jnp.arange(start, start + n))


@pytest.fixture(scope="module")
def trained():
    pred = _rssm.rssm(SETTINGS)
    state = pred.init(PredictorSpec(G, B, None))
    run_j = jax.jit(run, static_argnums=(0, 2, 3))
    state0 = state
    state, _ = run_j(pred, state, 1, 1500)
    _, held_out = run_j(pred, state, 1501, 300)  # keeps learning, but is scored before each step
    _, at_init = run_j(pred, state0, 1501, 300)
    return pred, state, held_out, at_init


@pytest.mark.slow
def test_one_step_loss_prediction_error_falls_5x(trained):
    _, _, held, init = trained
    err = lambda pred, out: float(jnp.mean((pred - out[4][1:]) ** 2))
    at_init = err(init[1][0], held)  # the untrained model's prediction, at every step
    learned = err(held[1][1:], held)
    print(f"1-step log-loss-change MSE: at init {at_init:.3g}, learned {learned:.3g}")
    assert learned * 5 <= at_init


@pytest.mark.slow
def test_predicted_coefficients_reach_cosine_09_on_held_out_steps(trained):
    _, _, held, _ = trained
    pred, true = held[0][1:].reshape(-1, G * B), held[3][1:].reshape(-1, G * B)
    cos = np.sum(pred * true, 1) / (np.linalg.norm(pred, axis=1) * np.linalg.norm(true, axis=1))
    assert float(np.mean(cos)) >= 0.9, float(np.mean(cos))


def expected_calibration_error(conf, acc, bins=10):
    conf, acc = np.asarray(conf), np.asarray(acc)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
    return sum(
        abs(conf[idx == b].mean() - acc[idx == b].mean()) * np.mean(idx == b)
        for b in range(bins)
        if np.any(idx == b)
    )


@pytest.mark.slow
def test_confidence_is_calibrated_against_realised_accuracy(trained):
    _, _, held, _ = trained
    ece = expected_calibration_error(held[2][1:], held[5][1:])
    print(f"calibration error (ECE, 10 bins) = {ece:.4f}")
    assert ece <= 0.1


@pytest.mark.slow
def test_ensemble_spread_is_larger_out_of_distribution(trained):
    _, state, _, _ = trained
    s = SETTINGS._replace(n_features=F, n_groups=G, basis_size=B)
    win = _rssm._chronological(state.window)
    key = jax.random.key(1)
    _, _, _, in_dist = _rssm.ensemble_rollout(s, state.params, win, key, state.dlog_scale)
    rng = np.random.default_rng(0)
    ood = win._replace(
        features=jnp.asarray(rng.choice([-5.0, 5.0], size=win.features.shape), jnp.float32)
    )
    _, _, _, out = _rssm.ensemble_rollout(s, state.params, ood, key, state.dlog_scale)
    assert float(out[0]) > 1.5 * float(in_dist[0]), (float(out[0]), float(in_dist[0]))


@pytest.mark.slow
def test_observe_and_predict_keep_shapes_and_compile_once():
    pred = _rssm.rssm(SETTINGS._replace(members=2, hidden=16, mlp=16, window=4))
    state = pred.init(PredictorSpec(G, B, None))
    observe = jax.jit(pred.observe)
    new = observe(state, observation(1, jnp.ones((G, B))))
    new = observe(new, observation(2, jnp.ones((G, B))))
    assert jax.tree.structure(new) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert observe._cache_size() == 1


@pytest.mark.slow
@pytest.mark.parametrize("horizon", [2, 15, 50])
def test_rollout_kernel_matches_the_module_rollout(horizon):
    """The Pallas rollout step (interpreted here; compiled through Triton on a GPU) gives
    the same head outputs as the plain rollout of ``_member_rollout``."""
    s = SETTINGS._replace(horizon=horizon, n_features=F, n_groups=G, basis_size=B)
    params = _rssm.rssm(s).init(PredictorSpec(G, B, None)).params
    k1, k2 = jax.random.split(jax.random.key(horizon))
    h = jax.random.normal(k1, (s.members, s.hidden))
    logits = 3.0 * jax.random.normal(k2, (s.members, s.latent_groups * s.latent_classes))
    # the filter's straight-through samples: one-hot up to rounding
    z = jax.vmap(lambda x: _rssm._sample(jax.random.key(1), _rssm._probs(x, s)))(logits)
    gd = _rssm._graphdef(s)
    # float32 products throughout (a GPU's default would give XLA's TensorFloat-32)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda p, h, z: _rssm._rollout(p, gd, s, h, z, kernel=True))(params, h, z)
        want = jax.jit(lambda p, h, z: _rssm._rollout(p, gd, s, h, z, kernel=False))(params, h, z)
    assert got.shape == (s.members, horizon, 1 + G * B)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_rollout_kernel_refuses_sizes_it_cannot_tile():
    s = SETTINGS._replace(hidden=48, n_features=F, n_groups=G, basis_size=B)
    with pytest.raises(ValueError, match="power-of-two"):
        _rssm._rollout(None, None, s, None, None, kernel=True)


@pytest.mark.slow
def test_train_every_trains_on_every_kth_observation_and_refilters_the_rest():
    pred = _rssm.rssm(SETTINGS._replace(members=2, hidden=16, mlp=16, window=4, train_every=3))
    state = pred.init(PredictorSpec(G, B, None))
    observe = jax.jit(pred.observe)
    params, rollouts = [], []
    for t in range(1, 8):
        state = observe(state, observation(t, jnp.ones((G, B))))
        params.append(jax.tree.leaves(state.params)[0])
        rollouts.append(state.rollout_coefs)
    assert int(state.observed) == 7 and int(state.updates) == 3  # observations 1, 4 and 7
    moved = [not np.array_equal(params[i], params[i - 1]) for i in range(1, 7)]
    assert moved == [False, False, True, False, False, True]
    # every observation refreshes the rollout from the newest filtered state
    assert all(not np.array_equal(rollouts[i], rollouts[i - 1]) for i in range(1, 7))
    assert observe._cache_size() == 1
