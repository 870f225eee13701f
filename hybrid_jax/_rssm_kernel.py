"""One horizon step of the RSSM ensemble's rollout as a single GPU kernel (Pallas).

A rollout step is a chain of tiny dependent operations per member (a 5 x 256 GRU), so
on a GPU its cost is the number of kernels and the length of the chain, not arithmetic.
Written with XLA it takes six or seven kernels: the GRU's two products, the gates, the
prior's two layers with a layer norm between them, and the mode of the categorical.
Here it takes one, with a program per member and slice of ``WIDTH`` GRU units:

- the prior's first layer is linear in ``h``, so each program of the previous step
  leaves the product of *its* slice of ``h`` with that layer (``part``); a program sums
  those partial products, then computes the layer norm, SiLU, second layer and the mode
  of every categorical (each program of a member computes the same, from a few KB);
- then its slice of the GRU: the input product on the one-hot ``z``, the recurrent
  product on all of ``h`` (its columns of the recurrent kernel only), the gates;
- then its slice's partial product with the prior's first layer, for the next step.

No program waits for another within a step, so one launch per step suffices.

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

WIDTH = 16  # GRU units per program (80 programs for 5 members of 256)


class Weights(NamedTuple):
    """Member-stacked parameters as the one-kernel rollout step reads them."""

    w_hh: jax.Array  # (M, 3, hidden, hidden): the GRU's recurrent kernel, by gate
    w_pa: jax.Array  # (M, hidden, mlp): the prior's first layer
    prior_bias: jax.Array  # (M, mlp)
    norm_scale: jax.Array  # (M, mlp)
    norm_bias: jax.Array  # (M, mlp)
    w_logits: jax.Array  # (M, mlp, groups, classes)
    b_logits: jax.Array  # (M, groups, classes)
    w_in: jax.Array  # (M, 3, groups, classes, hidden): the GRU's input kernel, by gate
    b_in: jax.Array  # (M, 3, hidden)


def weights(params: dict[str, Any], groups: int, classes: int) -> Weights:
    """``Weights`` from member-stacked ``Member`` parameters (plain dicts)."""
    gru, prior = params["gru"], params["prior"]
    w_hh = gru["dense_h"]["kernel"]  # (M, hidden, 3 * hidden)
    m, hidden, _ = w_hh.shape
    w_i = gru["dense_i"]["kernel"]  # (M, Z, 3 * hidden)
    w_l = prior["b"]["kernel"]
    return Weights(
        w_hh=w_hh.reshape(m, hidden, 3, hidden).transpose(0, 2, 1, 3),
        w_pa=prior["a"]["kernel"],
        prior_bias=prior["a"]["bias"],
        norm_scale=prior["norm"]["scale"],
        norm_bias=prior["norm"]["bias"],
        w_logits=w_l.reshape(m, w_l.shape[1], groups, classes),
        b_logits=prior["b"]["bias"].reshape(m, groups, classes),
        w_in=w_i.reshape(m, groups, classes, 3, hidden).transpose(0, 3, 1, 2, 4),
        b_in=gru["dense_i"]["bias"].reshape(m, 3, hidden),
    )


def _kernel(eps, h_ref, part_ref, whh, wpa, pb, ns, nb, wl, bl, wi, bi, h_out, part_out, z_out):
    width = h_out.shape[-1]
    classes = bl.shape[-1]
    cols = pl.ds(pl.program_id(1) * width, width)
    # every load first, so that their latency overlaps (4.3 instead of 6.0 us on an H200)
    h, h_cols, part = h_ref[0, :], h_ref[0, cols], part_ref[0]
    w_rec = [whh[0, g] for g in range(3)]
    w_in = [wi[0, g] for g in range(3)]
    b_in = [bi[0, g, :] for g in range(3)]
    w_l, b_l, w_pa = wl[0], bl[0], wpa[0]
    p_b, n_s, n_b = pb[0, :], ns[0, :], nb[0, :]
    # this program's columns of the GRU's recurrent product (on all of h)
    hr, hz, hn = (jnp.sum(h[:, None] * w, axis=0) for w in w_rec)
    # the prior on h: its first layer is the sum of the previous step's partial products
    x = jnp.sum(part, axis=0) + p_b
    mean = jnp.mean(x)
    var = jnp.maximum(jnp.mean(x * x) - mean * mean, 0.0)  # one pass: two independent sums
    x = (x - mean) * jax.lax.rsqrt(var + eps) * n_s + n_b
    x = x * jax.nn.sigmoid(x)
    # every categorical at once: logits (groups, classes), their modes as one-hots
    logits = jnp.sum(x[:, None, None] * w_l, axis=0) + b_l
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    top = jnp.max(logits, axis=1)
    first = jnp.min(jnp.where(logits == top[:, None], iota, classes), axis=1)
    z = (iota == first[:, None]).astype(jnp.float32)
    z_out[0, 0] = z
    # the input product on z, the gates, this slice of the next state
    gates = [
        b + jnp.sum(jnp.sum(z[:, :, None] * w, axis=0), axis=0)
        for b, w in zip(b_in, w_in, strict=True)
    ]
    r = jax.nn.sigmoid(gates[0] + hr)
    u = jax.nn.sigmoid(gates[1] + hz)
    n = jnp.tanh(gates[2] + r * hn)
    h_new = (1.0 - u) * n + u * h_cols
    h_out[0, :] = h_new
    # its share of the next step's prior product
    part_out[0, 0, :] = jnp.sum(h_new[:, None] * w_pa, axis=0)


def partials(w: Weights, h: jax.Array) -> jax.Array:
    """The prior's first-layer product of ``h`` (M, hidden) as per-slice partial sums
    (M, hidden / WIDTH, mlp): the ``part`` that ``step`` reads."""
    m, hidden = h.shape
    hs = h.reshape(m, hidden // WIDTH, WIDTH)
    return jnp.einsum("mjs,mjsp->mjp", hs, w.w_pa.reshape(m, hidden // WIDTH, WIDTH, -1))


def supported(hidden: int, mlp: int, groups: int, classes: int) -> bool:
    """Whether the kernel handles these sizes (Triton blocks are powers of two)."""
    pow2 = lambda n: n >= 1 and n & (n - 1) == 0
    return all(map(pow2, (hidden, mlp, groups, classes))) and hidden >= WIDTH


def step(
    w: Weights, h: jax.Array, part: jax.Array, eps: float, interpret: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One rollout step as one kernel: ``(h, part)`` -> ``(h_next, part_next, z)``.

    A program per member and slice of ``WIDTH`` GRU units: each computes the mode of
    ``p(z | h)`` (from ``part``, the per-slice partial products of ``h`` with the
    prior's first layer), its slice of the GRU's next state, and that slice's partial
    product for the next step. ``z`` comes back once per slice (M, slices, G, C).
    """
    m, hidden = h.shape
    width = WIDTH
    nslice = hidden // width
    mlp = w.prior_bias.shape[-1]
    gc = w.b_logits.shape[1:]
    full = lambda *shape: pl.BlockSpec((1, *shape), lambda i, j: (i,) + (0,) * len(shape))
    call = pl.pallas_call(
        lambda *refs: _kernel(eps, *refs),
        grid=(m, nslice),
        in_specs=[
            full(hidden),
            full(nslice, mlp),
            pl.BlockSpec((1, 3, hidden, width), lambda i, j: (i, 0, 0, j)),
            pl.BlockSpec((1, width, mlp), lambda i, j: (i, j, 0)),
            full(mlp),
            full(mlp),
            full(mlp),
            full(mlp, *gc),
            full(*gc),
            pl.BlockSpec((1, 3, *gc, width), lambda i, j: (i, 0, 0, 0, j)),
            pl.BlockSpec((1, 3, width), lambda i, j: (i, 0, j)),
        ],
        out_specs=[
            pl.BlockSpec((1, width), lambda i, j: (i, j)),
            pl.BlockSpec((1, 1, mlp), lambda i, j: (i, j, 0)),
            pl.BlockSpec((1, 1, *gc), lambda i, j: (i, j, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((m, hidden), h.dtype),
            jax.ShapeDtypeStruct((m, nslice, mlp), h.dtype),
            jax.ShapeDtypeStruct((m, nslice, *gc), h.dtype),
        ],
        interpret=interpret or jax.default_backend() != "gpu",
    )
    return tuple(call(h, part, *w))
