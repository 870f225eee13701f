"""Sharding the hybrid step over a device mesh: data parallel, FSDP, or a custom rule.

The hybrid's state is mostly parameter-shaped (the wrapped optimizer's moments, the
basis of directions with a leading basis axis, the snapshot) and otherwise small
(phase machine, statistics, predictor, monitor, bandit, residuals): the former follow the
parameters' shardings, the latter are replicated. ``hybrid_step`` itself needs no
change: the ``lax.cond`` between the real and the predicted branch is compiled once for
the whole mesh, and XLA inserts the collectives (the gradient and the Gram products are
reduced across the mesh)::

    from hybrid_jax import sharding as hs

    mesh = hs.data_mesh()                                   # 1-D mesh "data", Auto axes
    p_sh = hs.param_shardings(params, mesh, "fsdp")
    s_sh = hs.state_shardings(tx, params, p_sh, mesh)
    b_sh = hs.batch_sharding(mesh)
    params = jax.device_put(params, p_sh)
    state = jax.jit(tx.init, out_shardings=s_sh)(params)
    step = hs.make_sharded_hybrid_step(loss_fn, tx, p_sh, s_sh, b_sh)
    params, state, metrics = step(params, state, jax.device_put(batch, b_sh))

Multi-host: call ``jax.distributed.initialize(coordinator_address=..., num_processes=...,
process_id=...)`` (or with no arguments where the cluster is detected) in every process
before anything else touches JAX, then build the mesh over ``jax.devices()`` (all
processes' devices; ``data_mesh`` does). Every process runs the same program: the
same params initialisation (e.g. ``jax.jit(init, out_shardings=p_sh)(key)``, or
``jax.device_put`` of the same host values), ``jax.jit(tx.init, out_shardings=s_sh)``,
the same step function and the same number of steps. Only the data differ: each
process feeds its own slice of the global batch, assembled into one global array with
``jax.make_array_from_process_local_data(b_sh, local_batch)``. Metrics come back
replicated, so every process can read them; ``hj.Checkpointer`` saves and restores
sharded arrays (restore into ``jax.ShapeDtypeStruct`` targets carrying the shardings).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ._state import HybridState
from ._step import hybrid_step
from ._transform import PredictiveTransformation

PyTree = Any
Rule = str | Callable[[tuple[Any, ...], Any], PartitionSpec]

__all__ = [
    "batch_sharding",
    "data_mesh",
    "make_sharded_hybrid_step",
    "param_shardings",
    "state_shardings",
]


def data_mesh(devices: Sequence[jax.Device] | None = None, axis: str = "data") -> Mesh:
    """A one-dimensional mesh over ``devices`` with an ``Auto`` axis.

    ``jax.make_mesh`` makes ``Explicit`` axes by default in this JAX, under which
    sharded types flow through the user's loss function and many ordinary programs
    (an embedding gather of FSDP-sharded rows by data-sharded tokens, for one) are
    rejected; the shardings of this module are meant for ``Auto`` axes, where XLA
    propagates them.

    Args:
      devices: the devices, in mesh order; ``jax.devices()`` (every process's) if omitted.
      axis: the axis name.

    Returns:
      ``Mesh(devices, (axis,), axis_types=(AxisType.Auto,))``.
    """
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("data_mesh: no devices")
    return Mesh(np.array(devs, dtype=object), (axis,), axis_types=(AxisType.Auto,))


def param_shardings(
    params: PyTree, mesh: Mesh, rule: Rule = "replicated", *, axis: str = "data"
) -> PyTree:
    """Shardings of the parameters on ``mesh``.

    Args:
      params: the parameters: concrete arrays or ``jax.ShapeDtypeStruct`` leaves.
      mesh: the device mesh.
      rule: ``"replicated"`` (every leaf whole on every device: data parallel);
        ``"fsdp"`` (each leaf sharded along ``axis`` on its largest dimension whose size
        divides by the size of ``axis``, the first such on a tie; a leaf with no such
        dimension, scalars included, replicated); or a callable
        ``rule(path, leaf) -> PartitionSpec`` (``path`` as from
        ``jax.tree_util.tree_flatten_with_path``).
      axis: the mesh axis ``"fsdp"`` shards along.

    Returns:
      A pytree shaped like ``params`` of ``NamedSharding`` leaves.

    Raises:
      ValueError: an unknown rule or mesh axis, or a callable's spec that does not fit
        its leaf.
    """
    if isinstance(rule, str):
        if rule == "replicated":
            return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params)
        if rule != "fsdp":
            raise ValueError(
                f"param_shardings: rule must be 'replicated', 'fsdp' or a callable; got {rule!r}"
            )
        if axis not in mesh.shape:
            raise ValueError(
                f"param_shardings: mesh has no axis {axis!r}; it has {tuple(mesh.axis_names)}"
            )
        n = mesh.shape[axis]
        return jax.tree.map(lambda x: NamedSharding(mesh, _fsdp_spec(np.shape(x), n, axis)), params)
    if not callable(rule):
        raise ValueError(
            f"param_shardings: rule must be 'replicated', 'fsdp' or a callable; "
            f"got {type(rule).__name__}"
        )

    def custom(path: tuple[Any, ...], x: Any) -> NamedSharding:
        spec = rule(path, x)
        if not isinstance(spec, PartitionSpec):
            raise ValueError(
                f"param_shardings: the rule returned {type(spec).__name__} for "
                f"{jax.tree_util.keystr(path)}; expected a PartitionSpec"
            )
        sharding = NamedSharding(mesh, spec)
        try:
            sharding.check_compatible_aval(np.shape(x))  # rank only
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"param_shardings: {spec} does not fit "
                f"{jax.tree_util.keystr(path)} of shape {np.shape(x)}: {e}"
            ) from None
        return sharding

    return jax.tree_util.tree_map_with_path(custom, params)


def _fsdp_spec(shape: tuple[int, ...], n: int, axis: str) -> PartitionSpec:
    """``axis`` on the largest dimension divisible by ``n`` (first on ties), else ``P()``."""
    best = None
    for i, d in enumerate(shape):
        if d > 0 and d % n == 0 and (best is None or d > shape[best]):
            best = i
    if best is None:
        return PartitionSpec()
    spec: list[str | None] = [None] * len(shape)
    spec[best] = axis
    return PartitionSpec(*spec)


def state_shardings(tx: Any, params: PyTree, params_shardings: PyTree, mesh: Mesh) -> PyTree:
    """Shardings of ``tx.init(params)``: parameter-shaped parts like the parameters.

    For a ``hj.predictive`` state (``hj.HybridState``):

    - ``inner`` (the wrapped optax state): a leaf whose key path ends with a parameter's
      key path and has that parameter's shape (``mu``, ``nu``, trace, ... mirror the
      params tree) gets that parameter's sharding. A leaf that no path matches but
      whose shape is that of parameters all sharded alike gets their sharding too
      (this covers states that do not mirror the tree, with care: when parameters of
      that shape are sharded differently, the leaf is replicated). Other leaves
      (counts, scalars, ...) are replicated.
    - ``basis.ema``: the parameters' shardings; ``basis.ring``: ``PartitionSpec(None,
      *param_spec)`` per leaf (the leading ring axis whole on every device);
      ``basis.acc.total`` (``stride > 1``): the parameters' shardings; the rest of the
      basis is replicated.
    - ``snapshot``: the parameters' shardings.
    - everything else (phase machine, transport, encoder, predictor, statistics,
      counters, residuals, corrector, monitor, bandit): replicated.

    Any other optax transformation's state is treated like ``inner`` above.

    Args:
      tx: ``hj.predictive(...)`` or any optax transformation.
      params: the parameters (concrete or ``jax.ShapeDtypeStruct`` leaves).
      params_shardings: ``NamedSharding`` per parameter leaf (``param_shardings``).
      mesh: the mesh; replicated leaves get ``NamedSharding(mesh, PartitionSpec())``.

    Returns:
      A pytree of ``NamedSharding`` shaped like ``jax.eval_shape(tx.init, params)``.
    """
    p_leaves, s_leaves = _checked_leaves(params, params_shardings)
    abstract = jax.eval_shape(tx.init, params)
    rep = NamedSharding(mesh, PartitionSpec())
    by_path = {
        _path_key(path): (tuple(np.shape(x)), s)
        for (path, x), s in zip(p_leaves, s_leaves, strict=True)
    }
    by_shape: dict[tuple[int, ...], set[NamedSharding]] = {}
    for (_, x), s in zip(p_leaves, s_leaves, strict=True):
        by_shape.setdefault(tuple(np.shape(x)), set()).add(s)
    max_len = max((len(k) for k in by_path), default=0)

    def like_params(path: tuple[Any, ...], x: jax.ShapeDtypeStruct) -> NamedSharding:
        key, shape = _path_key(path), tuple(x.shape)
        for n in range(min(len(key), max_len), -1, -1):
            hit = by_path.get(key[len(key) - n :])
            if hit is not None and hit[0] == shape:
                return hit[1]
        alike = by_shape.get(shape)
        if shape and alike is not None and len(alike) == 1:
            return next(iter(alike))
        return rep

    def inner_shardings(tree: PyTree) -> PyTree:
        return jax.tree_util.tree_map_with_path(like_params, tree)

    if not isinstance(abstract, HybridState):
        return inner_shardings(abstract)
    out = jax.tree.map(lambda _: rep, abstract)
    ring = jax.tree.map(
        lambda s: NamedSharding(s.mesh, PartitionSpec(None, *s.spec)), params_shardings
    )
    return out._replace(
        inner=inner_shardings(abstract.inner),
        basis=out.basis._replace(
            ema=params_shardings,
            ring=ring,
            acc=None if out.basis.acc is None else out.basis.acc._replace(total=params_shardings),
        ),
        snapshot=params_shardings,
    )


def _checked_leaves(params: PyTree, params_shardings: PyTree) -> tuple[list, list]:
    """``params``' leaves with their paths and ``params_shardings``' leaves, checked to
    match and to be ``NamedSharding``s."""
    p_leaves, p_def = jax.tree_util.tree_flatten_with_path(params)
    s_leaves, s_def = jax.tree.flatten(params_shardings)
    if p_def != s_def:
        raise ValueError(
            f"state_shardings: params_shardings ({s_def}) is not shaped like params ({p_def})"
        )
    for s in s_leaves:
        if not isinstance(s, NamedSharding):
            raise ValueError(
                f"state_shardings: params_shardings must hold NamedSharding "
                f"leaves; got {type(s).__name__}"
            )
    return p_leaves, s_leaves


def _path_key(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(jax.tree_util.keystr((k,)) for k in path)


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """The batch sharded along its leading axis over ``axis`` of ``mesh``.

    Used as a prefix, it applies to every array of a batch pytree (e.g. ``(x, y)``);
    each array's leading size must divide by the size of ``axis``.

    Args:
      mesh: the mesh.
      axis: the mesh axis the batch is split over.

    Returns:
      ``NamedSharding(mesh, PartitionSpec(axis))``.
    """
    if axis not in mesh.shape:
        raise ValueError(
            f"batch_sharding: mesh has no axis {axis!r}; it has {tuple(mesh.axis_names)}"
        )
    return NamedSharding(mesh, PartitionSpec(axis))


def make_sharded_hybrid_step(
    loss_fn: Callable[..., Any],
    tx: PredictiveTransformation,
    params_shardings: PyTree,
    state_shardings: PyTree,
    batch_sharding: Any,
    *,
    has_aux: bool = False,
    aux_sharding: Any = None,
    donate: bool = True,
) -> Callable[..., Any]:
    """``hybrid_step`` jitted with input and output shardings, params and state donated.

    The result keeps params and state on their shardings step after step, so a whole
    run compiles once; the metrics come back replicated.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (see ``hj.hybrid_step``).
      tx: a transformation from ``hj.predictive``.
      params_shardings: ``NamedSharding`` per parameter leaf (``param_shardings``).
      state_shardings: ``NamedSharding`` per state leaf (``state_shardings``).
      batch_sharding: the batch's sharding, or a pytree prefix of the batch
        (``batch_sharding``).
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      aux_sharding: the sharding (or pytree prefix) of ``aux``; replicated if omitted.
      donate: donate the params and state buffers (the caller must not reuse them).

    Returns:
      ``step(params, state, batch) -> (params, state, metrics[, aux])``.
    """
    if not isinstance(tx, PredictiveTransformation):
        raise TypeError(f"tx must come from hj.predictive; got {type(tx).__name__}")
    leaves = jax.tree.leaves(params_shardings)
    if not leaves or not isinstance(leaves[0], NamedSharding):
        raise ValueError(
            "make_sharded_hybrid_step: params_shardings must hold NamedSharding leaves"
        )
    replicated = NamedSharding(leaves[0].mesh, PartitionSpec())
    out: tuple[Any, ...] = (params_shardings, state_shardings, replicated)
    if has_aux:
        out = (*out, replicated if aux_sharding is None else aux_sharding)
    fn = functools.partial(hybrid_step, loss_fn, tx, has_aux=has_aux)
    return jax.jit(
        fn,
        in_shardings=(params_shardings, state_shardings, batch_sharding),
        out_shardings=out,
        donate_argnums=(0, 1) if donate else (),
    )
