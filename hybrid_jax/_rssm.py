"""The learned dynamics model: an ensemble of small RSSMs, trained online on real steps.

Each member is a recurrent state-space model in the style of DreamerV3 (Hafner et al.,
2023, "Mastering Diverse Domains through World Models"): a deterministic GRU path ``h``
and a categorical stochastic latent ``z`` (``latent_groups`` categoricals of
``latent_classes`` classes, straight-through samples, 1% uniform mix), with a prior
``p(z | h)`` and a posterior ``q(z | h, x)`` where ``x`` are the encoder's features of a
real step. Two heads read ``(h, z)``: the next step's change of log loss (scaled by a
running scale) and the next step's coefficients over the basis, per group.

Training (``observe``, on every real step after warmup): the observation enters a ring
window of the last ``window`` real steps; one optimizer step (Adam with gradient
clipping) on the window's loss by truncated back-propagation through time
(``lax.scan``), on every ``train_every``-th observation (the others only filter the
window with the current parameters, so that the rollout starts from the newest step):
squared errors of both heads against the next real step (pairs across a
Predict phase are left out), the decoder's reconstruction error, plus the KL terms
with free bits per categorical (``kl_dyn`` on ``sg(q) || p``, ``kl_rep`` on
``q || sg(p)``). Each member weighs each step by its own
bootstrap mask, so the members disagree where data is thin.

Prediction: after each training step the filtered latent is rolled out through the
prior (modes of ``p(z | h)``) for ``horizon`` steps, for every member (with
``rollout_kernel`` on a GPU, each step is one Pallas kernel: ``_rssm_kernel``). The
ensemble mean gives the coefficients and the loss change for each step of the next
Predict phase; the members' spread, relative to the mean's size (scale-free), is mapped to a
confidence by a recursive-least-squares calibration against the realised accuracy
(the cosine, clipped to [0, 1], between each one-step prediction and the real update
that followed), so that confidence means "expected accuracy".

The modules are Flax NNX; they cross ``jit`` as a static graph definition and a pytree
of member-stacked parameters (plain dicts), merged inside.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from . import _rssm_kernel
from ._encoder import n_features
from ._predictors import Observation, PredictContext, Prediction, Predictor, PredictorSpec
from .config import RSSMSettings

PyTree = Any


class Sizes(NamedTuple):
    """Sizes and rates of the dynamics model: ``hj.RSSMSettings``, the horizon, and the
    sizes a ``PredictorSpec`` gives at ``init``. Build it with ``sizes``: the defaults
    are those of ``hj.RSSMSettings``."""

    members: int
    hidden: int
    latent_groups: int
    latent_classes: int
    mlp: int
    window: int
    learning_rate: float
    grad_clip: float
    free_bits: float
    kl_dyn: float
    kl_rep: float
    bootstrap: float
    calibration_forget: float
    rollout_kernel: bool
    train_every: int
    horizon: int = 15
    seed: int = 0
    n_features: int = 0
    n_groups: int = 1
    basis_size: int = 2


def sizes(config: RSSMSettings | None = None, *, horizon: int = 15, **changes: Any) -> Sizes:
    """``Sizes`` from an ``hj.RSSMSettings`` (its defaults if omitted), with ``changes``."""
    return Sizes(**{**(config or RSSMSettings()).to_dict(), "horizon": horizon, **changes})


class _MLP(nnx.Module):
    def __init__(self, n_in: int, width: int, n_out: int, rngs: nnx.Rngs):
        self.a = nnx.Linear(n_in, width, rngs=rngs)
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.b = nnx.Linear(width, n_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.b(jax.nn.silu(self.norm(self.a(x))))


class Member(nnx.Module):
    """One RSSM: GRU core, prior, posterior, the two heads (as one output) and a decoder
    of the features (its reconstruction loss teaches the posterior what to keep)."""

    def __init__(self, s: Sizes, rngs: nnx.Rngs):
        z = s.latent_groups * s.latent_classes
        self.gru = nnx.GRUCell(z, s.hidden, rngs=rngs)
        self.prior = _MLP(s.hidden, s.mlp, z, rngs)
        self.post = _MLP(s.hidden + s.n_features, s.mlp, z, rngs)
        self.head = _MLP(s.hidden + z, s.mlp, 1 + s.n_groups * s.basis_size, rngs)
        self.decoder = _MLP(s.hidden + z, s.mlp, s.n_features, rngs)


class Window(NamedTuple):
    """The last ``window`` real observations, a ring (``head`` = newest slot)."""

    features: jax.Array  # (W, F)
    coefs: jax.Array  # (W, G, B) least-squares targets
    dlog: jax.Array  # (W,)
    valid: jax.Array  # (W,) bool
    consecutive: jax.Array  # (W,) bool: follows the previous slot's step directly
    boot: jax.Array  # (W, M) float32 bootstrap weights
    head: jax.Array  # int32


class RSSMState(NamedTuple):
    """State of the RSSM predictor (arrays only)."""

    params: PyTree  # member-stacked NNX parameters (plain dicts)
    opt_state: PyTree
    window: Window
    rollout_coefs: jax.Array  # (H, G, B) ensemble mean
    rollout_dlog: jax.Array  # (H,) predicted change of log loss
    rollout_spread: jax.Array  # (H,) relative ensemble spread of the coefficients
    calib_w: jax.Array  # (2,) confidence = clip(w0 + w1 * spread)
    calib_p: jax.Array  # (2, 2) RLS inverse covariance
    dlog_scale: jax.Array  # running RMS of the log-loss change
    train_loss: jax.Array  # last training loss (mean over members)
    updates: jax.Array  # int32: training steps taken
    observed: jax.Array  # int32: observations seen
    key: jax.Array  # uint32 key data


@functools.lru_cache(maxsize=16)
def _graphdef(s: Sizes) -> Any:
    return nnx.split(Member(s, nnx.Rngs(0)))[0]


def _probs(logits: jax.Array, s: Sizes) -> jax.Array:
    p = jax.nn.softmax(logits.reshape(s.latent_groups, s.latent_classes), -1)
    return 0.99 * p + 0.01 / s.latent_classes


def _kl(p: jax.Array, q: jax.Array, free_bits: float) -> jax.Array:
    """KL divergence summed over the latent's categoricals, each at least ``free_bits``."""
    return jnp.sum(jnp.maximum(jnp.sum(p * (jnp.log(p) - jnp.log(q)), -1), free_bits))


def _onehot_mode(p: jax.Array) -> jax.Array:
    return jax.nn.one_hot(jnp.argmax(p, -1), p.shape[-1], dtype=p.dtype).reshape(-1)


def _sample(key: jax.Array, p: jax.Array) -> jax.Array:
    idx = jax.random.categorical(key, jnp.log(p), axis=-1)
    hard = jax.nn.one_hot(idx, p.shape[-1], dtype=p.dtype)
    return (hard + p - jax.lax.stop_gradient(p)).reshape(-1)  # straight-through


def _chronological(w: Window) -> Window:
    n = w.valid.shape[0]
    idx = jnp.mod(w.head + 1 + jnp.arange(n), n)
    return Window(*(a[idx] for a in w[:-1]), w.head)


def _member_loss(params, gd, s: Sizes, win: Window, boot: jax.Array, key, scale):
    """Window loss of one member and its filtered latent ``(h, z)`` at the newest step."""
    m = nnx.merge(gd, params)
    n = win.valid.shape[0]
    keys = jax.random.split(key, n)

    def body(carry, inp):
        h, z = carry
        x, k = inp
        h, _ = m.gru(h, z)
        prior = _probs(m.prior(h), s)
        post = _probs(m.post(jnp.concatenate([h, x])), s)
        z = _sample(k, post)
        hz = jnp.concatenate([h, z])
        out = m.head(hz)
        recon = jnp.mean(jnp.square(m.decoder(hz) - x))
        sg = jax.lax.stop_gradient
        kl_dyn = _kl(sg(post), prior, s.free_bits)
        kl_rep = _kl(post, sg(prior), s.free_bits)
        return (h, z), (out, recon + s.kl_dyn * kl_dyn + s.kl_rep * kl_rep)

    zdim = s.latent_groups * s.latent_classes
    init = (jnp.zeros((s.hidden,), jnp.float32), jnp.zeros((zdim,), jnp.float32))
    # unrolled (in blocks): a GPU while loop costs a host round trip per iteration
    (h, z), (outs, kl) = jax.lax.scan(body, init, (win.features, keys), unroll=min(n, 16))
    pred_dlog = outs[:-1, 0]
    pred_coefs = outs[:-1, 1:].reshape(n - 1, s.n_groups, s.basis_size)
    pair = win.valid[:-1] & win.valid[1:] & win.consecutive[1:]
    weight = pair * boot[1:]
    err = jnp.mean(jnp.square(pred_coefs - win.coefs[1:]), axis=(1, 2))
    err = err + jnp.square(pred_dlog - win.dlog[1:] / scale)
    pred_loss = jnp.sum(weight * err) / jnp.maximum(jnp.sum(weight), 1.0)
    latent_loss = jnp.sum(win.valid * kl) / jnp.maximum(jnp.sum(win.valid), 1.0)
    return pred_loss + latent_loss, (h, z)


def _member_rollout(params, gd, s: Sizes, h: jax.Array, z: jax.Array) -> jax.Array:
    """Head outputs (H, 1 + G*B) along a rollout through the prior's modes."""
    m = nnx.merge(gd, params)

    def body(carry, _):
        h, z = carry
        h_next, _ = m.gru(h, z)
        return (h_next, _onehot_mode(_probs(m.prior(h_next), s))), (h, z)

    # only the recurrence is sequential: the head reads every step's (h, z) at once after
    # the loop; unrolled (in blocks) so that XLA fuses across steps
    _, (hs, zs) = jax.lax.scan(body, (h, z), None, length=s.horizon, unroll=min(s.horizon, 16))
    return m.head(jnp.concatenate([hs, zs], axis=-1))


def _rollout(params, gd, s: Sizes, h, z, kernel: bool | None = None) -> jax.Array:
    """Every member's rollout: head outputs (M, H, 1 + G*B).

    With ``s.rollout_kernel`` on a GPU (``kernel=None``), each horizon step after the
    first is one Pallas kernel (``_rssm_kernel``) for every member; otherwise
    ``_member_rollout`` under ``vmap``. ``kernel=True`` forces the kernel (interpreted
    off the GPU), ``False`` the plain rollout.
    """
    if kernel is None:
        kernel = s.rollout_kernel and jax.default_backend() == "gpu"
    sizes = (s.hidden, s.mlp, s.latent_groups, s.latent_classes)
    if kernel and not _rssm_kernel.supported(*sizes):
        raise ValueError(f"the rollout kernel needs power-of-two sizes; got {s}")
    if not kernel or s.horizon == 1:
        return jax.vmap(lambda p, h, z: _member_rollout(p, gd, s, h, z))(params, h, z)
    eps = nnx.merge(gd, jax.tree.map(lambda x: x[0], params)).prior.norm.epsilon
    w = _rssm_kernel.weights(params, s.latent_groups, s.latent_classes)

    def body(carry, _):  # the kernel is interpreted off the GPU (see ``_rssm_kernel.step``)
        h, part = carry
        h_next, part_next, z_next = _rssm_kernel.step(w, h, part, eps)
        return (h_next, part_next), (h, z_next[:, 0].reshape(h.shape[0], -1))

    h1 = jax.vmap(lambda p, h, z: nnx.merge(gd, p).gru(h, z)[0])(params, h, z)
    n = s.horizon - 1
    init = (h1, _rssm_kernel.partials(w, h1))
    # unrolled (in blocks): a GPU while loop costs a host round trip per iteration
    _, (hs, zs) = jax.lax.scan(body, init, None, length=n, unroll=min(n, 16))
    hs = jnp.concatenate([h[:, None], jnp.swapaxes(hs, 0, 1)], axis=1)
    zs = jnp.concatenate([z[:, None], jnp.swapaxes(zs, 0, 1)], axis=1)
    return jax.vmap(lambda p, hz: nnx.merge(gd, p).head(hz))(
        params, jnp.concatenate([hs, zs], axis=-1)
    )


def rollout_summary(outs: jax.Array, s: Sizes) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Ensemble mean coefficients (H, G, B), mean log-loss change (H,) in units of the
    running scale, and the relative spread (H,) from member outputs (M, H, 1 + G*B)."""
    coefs = outs[..., 1:].reshape(*outs.shape[:2], s.n_groups, s.basis_size)
    mean = jnp.mean(coefs, 0)
    spread = jnp.sqrt(jnp.mean(jnp.var(coefs, 0), axis=(1, 2)))
    size = jnp.sqrt(jnp.mean(jnp.square(mean), axis=(1, 2)))
    return mean, jnp.mean(outs[..., 0], 0), spread / (size + 1e-6)


def ensemble_rollout(
    s: Sizes, params: PyTree, win: Window, key: jax.Array, scale: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Filters a window (chronological order) with every member and rolls out.

    Returns:
      ``(loss (M,), coefs (H, G, B), dlog (H,) in units of ``scale``, spread (H,))``
      and is differentiable in ``params`` through the loss only.
    """
    gd = _graphdef(s)
    keys = jax.random.split(key, s.members)
    loss, (h, z) = jax.vmap(lambda p, b, k: _member_loss(p, gd, s, win, b, k, scale))(
        params, win.boot.T, keys
    )
    coefs, dlog, spread = rollout_summary(_rollout(params, gd, s, h, z), s)
    return loss, coefs, dlog, spread


def rssm(config: RSSMSettings | Sizes | None = None, *, horizon: int = 15) -> Predictor:
    """The RSSM-ensemble predictor (see the module docstring).

    Args:
      config: an ``hj.RSSMSettings`` (default: its defaults).
      horizon: the longest rollout (``HybridConfig.max_horizon``).

    Returns:
      A ``Predictor`` named ``"rssm"``.
    """
    if isinstance(config, Sizes):
        settings = config
    else:
        settings = sizes(config, horizon=horizon)
    return Predictor(
        "rssm", functools.partial(_init, settings), functools.partial(_observe, settings), _predict
    )


def _sized(settings: Sizes, state: RSSMState) -> Sizes:
    """The sizes with those of the state's window and rollout filled in."""
    _, g, b = state.rollout_coefs.shape
    return settings._replace(n_features=state.window.features.shape[1], n_groups=g, basis_size=b)


def _optimizer(s: Sizes) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(s.grad_clip), optax.adam(s.learning_rate))


def _init(settings: Sizes, spec: PredictorSpec) -> RSSMState:
    """Members initialised from ``seed``, an empty window, a rollout of the last update."""
    s = settings._replace(
        n_features=n_features(spec.basis_size), n_groups=spec.n_groups, basis_size=spec.basis_size
    )
    keys = jax.random.split(jax.random.key(s.seed), s.members + 1)
    params = jax.vmap(lambda k: nnx.to_pure_dict(nnx.split(Member(s, nnx.Rngs(k)))[1]))(keys[1:])
    w, g, b, f, m = s.window, s.n_groups, s.basis_size, s.n_features, s.members
    window = Window(
        jnp.zeros((w, f), jnp.float32),
        jnp.zeros((w, g, b), jnp.float32),
        jnp.zeros((w,), jnp.float32),
        jnp.zeros((w,), bool),
        jnp.zeros((w,), bool),
        jnp.zeros((w, m), jnp.float32),
        jnp.full((), w - 1, jnp.int32),
    )
    last = jnp.zeros((g, b), jnp.float32).at[:, 0].set(1.0)
    return RSSMState(
        params=params,
        opt_state=jax.vmap(_optimizer(s).init)(params),
        window=window,
        rollout_coefs=jnp.broadcast_to(last, (s.horizon, g, b)),
        rollout_dlog=jnp.zeros((s.horizon,), jnp.float32),
        rollout_spread=jnp.ones((s.horizon,), jnp.float32),
        calib_w=jnp.asarray([0.0, 0.0], jnp.float32),
        calib_p=jnp.eye(2, dtype=jnp.float32) * 10.0,
        dlog_scale=jnp.asarray(1e-2, jnp.float32),
        train_loss=jnp.asarray(jnp.nan, jnp.float32),
        updates=jnp.zeros((), jnp.int32),
        observed=jnp.zeros((), jnp.int32),
        key=jax.random.key_data(keys[0]),
    )


def _calibrate(s: Sizes, state: RSSMState, obs: Observation) -> tuple[jax.Array, jax.Array]:
    """Recursive least squares: the last one-step spread -> the realised accuracy."""
    acc = jnp.clip(obs.realised_cosine, 0.0, 1.0)
    use = jnp.isfinite(acc) & (obs.gap == 1) & (state.updates > 0)
    x = jnp.stack([jnp.float32(1.0), state.rollout_spread[0]])
    lam = s.calibration_forget
    px = state.calib_p @ x
    gain = px / (lam + x @ px)
    w_new = state.calib_w + gain * (acc - x @ state.calib_w)
    p_new = (state.calib_p - jnp.outer(gain, px)) / lam
    return jnp.where(use, w_new, state.calib_w), jnp.where(use, p_new, state.calib_p)


def _push(s: Sizes, win: Window, obs: Observation, boot: jax.Array) -> Window:
    """The observation written into the window's ring."""
    head = jnp.mod(win.head + 1, s.window)
    ok = jnp.all(jnp.isfinite(obs.target_coefs))
    dlog = jnp.where(jnp.isfinite(obs.log_loss_change), obs.log_loss_change, 0.0)
    return Window(
        win.features.at[head].set(jnp.where(jnp.isfinite(obs.features), obs.features, 0.0)),
        win.coefs.at[head].set(jnp.where(ok, obs.target_coefs, 0.0)),
        win.dlog.at[head].set(dlog),
        win.valid.at[head].set(ok),
        win.consecutive.at[head].set(obs.gap == 1),
        win.boot.at[head].set(boot),
        head,
    )


def _learn(s: Sizes, state: RSSMState, win: Window, key: jax.Array, scale: jax.Array):
    """One training step of every member on the window (every ``train_every``-th
    observation; the others only filter the window with the current parameters).
    Returns ``(params, opt_state, loss, h, z, trained)``."""
    gd = _graphdef(s)
    chrono = _chronological(win)
    member_keys = jax.random.split(key, s.members)
    grad_fn = jax.value_and_grad(_member_loss, has_aux=True)

    def train(params, opt_state):
        def one(p, boot, k):
            return grad_fn(p, gd, s, chrono, boot, k, scale)

        (loss, (h, z)), grads = jax.vmap(one)(params, chrono.boot.T, member_keys)
        updates, opt_state = jax.vmap(_optimizer(s).update)(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, jnp.mean(loss), h, z

    def filter_only(params, opt_state):
        def one(p, boot, k):
            return _member_loss(p, gd, s, chrono, boot, k, scale)[1]

        h, z = jax.vmap(one)(params, chrono.boot.T, member_keys)
        return params, opt_state, state.train_loss, h, z

    trained = jnp.mod(state.observed, s.train_every) == 0
    if s.train_every == 1:
        return (*train(state.params, state.opt_state), trained)
    out = jax.lax.cond(trained, train, filter_only, state.params, state.opt_state)
    return (*out, trained)


def _observe(settings: Sizes, state: RSSMState, obs: Observation) -> RSSMState:
    """Calibrate, push the observation into the window, train (or filter), roll out."""
    s = _sized(settings, state)
    key = jax.random.wrap_key_data(state.key)
    key, k_boot, k_train = jax.random.split(key, 3)
    calib_w, calib_p = _calibrate(s, state, obs)
    boot = jax.random.bernoulli(k_boot, s.bootstrap, (s.members,)).astype(jnp.float32)
    win = _push(s, state.window, obs, boot)
    dlog = win.dlog[win.head]
    scale = jnp.maximum(jnp.sqrt(0.99 * state.dlog_scale**2 + 0.01 * dlog**2), 1e-6)
    params, opt_state, loss, h, z, trained = _learn(s, state, win, k_train, scale)
    coefs, dlog_units, spread = rollout_summary(_rollout(params, _graphdef(s), s, h, z), s)
    return RSSMState(
        params=params,
        opt_state=opt_state,
        window=win,
        rollout_coefs=coefs,
        rollout_dlog=dlog_units * scale,
        rollout_spread=spread,
        calib_w=calib_w,
        calib_p=calib_p,
        dlog_scale=scale,
        train_loss=loss,
        updates=state.updates + trained.astype(jnp.int32),
        observed=state.observed + 1,
        key=jax.random.key_data(key),
    )


def _predict(state: RSSMState, ctx: PredictContext) -> tuple[Prediction, RSSMState]:
    """The rollout's step ``ctx.k``, its confidence from the calibration."""
    k = jnp.clip(ctx.k, 0, state.rollout_dlog.shape[0] - 1)
    x = jnp.stack([jnp.float32(1.0), state.rollout_spread[k]])
    conf = jnp.where(state.updates > 0, jnp.clip(state.calib_w @ x, 0.0, 1.0), 0.0)
    return Prediction(state.rollout_coefs[k], state.rollout_dlog[k], conf), state
