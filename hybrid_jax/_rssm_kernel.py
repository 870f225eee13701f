"""One horizon step of the RSSM ensemble's rollout as a single GPU kernel (Pallas).

A rollout step is a chain of tiny dependent operations per member (a 5 x 256 GRU), so
on a GPU its cost is the number of kernels, not arithmetic. Written with XLA it takes
six or seven: the GRU's two products, the gates, the prior's two layers with a layer
norm between them, and the mode of the categorical. Here it takes two: XLA's product of
``h`` with ``[recurrent kernel | prior's first layer]`` (every member at once), then
this kernel, one program per member, for the rest: the prior's layer norm, SiLU and
second layer, the mode of each categorical, the GRU's input product on that one-hot
``z`` (the sum of the chosen rows: only those are read) and the gates.

It is used where ``HybridConfig.rssm_rollout_kernel`` asks for it (off by default: JAX
0.11 deprecates the Pallas Triton backend). ``step`` runs the kernel through Triton on a
GPU; elsewhere (and with ``interpret=True``) Pallas interprets it, which the tests use
to check it against the plain rollout.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


class Weights(NamedTuple):
    """A member-stacked view of the parameters one rollout step reads."""

    w_h: jax.Array  # (M, hidden, 4 * hidden): [W_hr | W_hz | W_hn | W_pa, zero padding]
    prior_bias: jax.Array  # (M, mlp)
    norm_scale: jax.Array  # (M, mlp)
    norm_bias: jax.Array  # (M, mlp)
    w_logits: jax.Array  # (M, mlp, Z)
    b_logits: jax.Array  # (M, Z)
    w_in: jax.Array  # (M, 3, Z, hidden): the GRU's input kernel, by gate
    b_in: jax.Array  # (M, 3, hidden)


def weights(params: dict[str, Any]) -> Weights:
    """``Weights`` from member-stacked ``Member`` parameters (plain dicts)."""
    gru, prior = params["gru"], params["prior"]
    w_hh = gru["dense_h"]["kernel"]  # (M, hidden, 3 * hidden)
    m, hidden, _ = w_hh.shape
    w_pa = prior["a"]["kernel"]  # (M, hidden, mlp)
    pad = jnp.zeros((m, hidden, hidden - w_pa.shape[-1]), w_pa.dtype)
    w_i = gru["dense_i"]["kernel"]  # (M, Z, 3 * hidden)
    z = w_i.shape[1]
    return Weights(
        w_h=jnp.concatenate([w_hh, w_pa, pad], axis=-1),
        prior_bias=prior["a"]["bias"],
        norm_scale=prior["norm"]["scale"],
        norm_bias=prior["norm"]["bias"],
        w_logits=prior["b"]["kernel"],
        b_logits=prior["b"]["bias"],
        w_in=w_i.reshape(m, z, 3, hidden).transpose(0, 2, 1, 3),
        b_in=gru["dense_i"]["bias"].reshape(m, 3, hidden),
    )


def supported(hidden: int, mlp: int, groups: int, classes: int) -> bool:
    """Whether the kernel handles these sizes (Triton blocks are powers of two)."""
    pow2 = lambda n: n >= 1 and n & (n - 1) == 0
    return all(map(pow2, (hidden, mlp, classes, groups * classes))) and mlp <= hidden


def _kernel(groups, classes, eps, h_ref, hw_ref, pb, ns, nb, wl, bl, wi, bi, h_out, z_out):
    hidden = h_ref.shape[-1]
    mlp = pb.shape[-1]
    # the prior's first layer (its product came in with the GRU's), layer norm, SiLU
    x = hw_ref[0, pl.ds(3 * hidden, mlp)] + pb[0, :]
    mean = jnp.mean(x)
    var = jnp.mean(jnp.square(x - mean))
    x = (x - mean) * jax.lax.rsqrt(var + eps) * ns[0, :] + nb[0, :]
    x = x * jax.nn.sigmoid(x)
    # per categorical: logits, mode (first maximum), its one-hot and its input rows
    gates = [bi[0, g, :] for g in range(3)]
    for k in range(groups):
        cols = pl.ds(k * classes, classes)
        logits = jnp.sum(x[:, None] * wl[0, :, cols], axis=0) + bl[0, cols]
        iota = jax.lax.broadcasted_iota(jnp.int32, (classes,), 0)
        first = jnp.min(jnp.where(logits == jnp.max(logits), iota, classes))
        z_out[0, cols] = (iota == first).astype(jnp.float32)
        for g in range(3):  # only the chosen row of the input kernel is read
            gates[g] = gates[g] + wi[0, g, k * classes + first, :]
    h = h_ref[0, :]
    hr = hw_ref[0, pl.ds(0, hidden)]
    hz = hw_ref[0, pl.ds(hidden, hidden)]
    hn = hw_ref[0, pl.ds(2 * hidden, hidden)]
    r = jax.nn.sigmoid(gates[0] + hr)
    u = jax.nn.sigmoid(gates[1] + hz)
    n = jnp.tanh(gates[2] + r * hn)
    h_out[0, :] = (1.0 - u) * n + u * h


def step(
    w: Weights, h: jax.Array, groups: int, classes: int, eps: float, interpret: bool = False
) -> tuple[jax.Array, jax.Array]:
    """One rollout step for every member: ``h`` (M, hidden) -> ``(h_next, z_next)``.

    ``z_next`` is the one-hot mode of ``p(z | h)`` (M, groups * classes) and ``h_next``
    the GRU's state after reading it.
    """
    m, hidden = h.shape
    zdim = groups * classes
    hw = jnp.einsum("mh,mhk->mk", h, w.w_h)  # one batched product for every member
    row = lambda *shape: pl.BlockSpec((1, *shape), lambda i: (i,) + (0,) * len(shape))
    mlp = w.prior_bias.shape[-1]
    call = pl.pallas_call(
        lambda *refs: _kernel(groups, classes, eps, *refs),
        grid=(m,),
        in_specs=[
            row(hidden),
            row(4 * hidden),
            row(mlp),
            row(mlp),
            row(mlp),
            row(mlp, zdim),
            row(zdim),
            row(3, zdim, hidden),
            row(3, hidden),
        ],
        out_specs=[row(hidden), row(zdim)],
        out_shape=[
            jax.ShapeDtypeStruct((m, hidden), h.dtype),
            jax.ShapeDtypeStruct((m, zdim), h.dtype),
        ],
        interpret=interpret or jax.default_backend() != "gpu",
    )
    return tuple(call(h, hw, *w[1:]))
