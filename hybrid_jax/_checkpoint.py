"""Checkpoints of params + the whole optimizer state + config, with orbax's ``CheckpointManager``.

On-disk layout (one directory per saved step, written atomically by orbax)::

    <directory>/
      <step>/                  e.g. 50/, 100/
        params/                orbax StandardSave (OCDBT/Zarr) of the params pytree
        state/                 orbax StandardSave of the state pytree (e.g. hj.HybridState)
        config/metadata        JSON: the run's configuration dict
        extra/metadata         JSON: the caller's extra dict (encoded, see below)
        layout/metadata        JSON: key paths, shapes and dtypes of params and state,
                               PRNG key implementations, save time, format version
        _CHECKPOINT_METADATA   orbax's own
      <step>.corrupt/          a step found unreadable by ``restore``, moved aside

Typed PRNG keys (``jax.random.key``) anywhere in params or state are saved as their
``jax.random.key_data`` (uint32) and rebuilt with ``jax.random.wrap_key_data`` using the
key implementation of the restore target, so they round-trip transparently; raw uint32
keys (``jax.random.PRNGKey``) are ordinary arrays. In ``extra``, numpy/JAX arrays and
typed keys are encoded as tagged JSON objects and decoded back on restore.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ._packing import unpack_state

PyTree = Any

FORMAT_VERSION = 1
_ITEMS = ("params", "state", "config", "extra", "layout")
_ARRAY_TAG = "__ndarray__"
_KEY_TAG = "__prng_key__"


class Checkpointer:
    """Saves and restores params + state + config with an orbax ``CheckpointManager``.

    Saves are synchronous by default: ``save`` returns once the checkpoint is on disk.
    With ``async_save=True`` orbax copies the arrays to the host, returns, and writes in
    a background thread; the next ``save``, ``restore``, ``wait`` and ``close`` wait for
    it. A save at a step that already exists replaces it; steps are expected to increase.

    Args:
      directory: where the checkpoints live; made absolute with ``Path.resolve()``.
      config: the run's configuration as a JSON-able dict (e.g. ``HybridConfig.to_dict()``
        plus anything else that must match on resume). Restoring a checkpoint saved
        under a different config raises ``ValueError``.
      keep: how many of the latest checkpoints to keep (>= 1).
      every: ``save`` writes only when ``step % every == 0`` unless forced (>= 1).
      async_save: write in the background (see above).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        config: dict[str, Any],
        keep: int = 3,
        every: int = 50,
        async_save: bool = False,
    ) -> None:
        if not isinstance(config, Mapping):
            raise ValueError(f"Checkpointer: config must be a dict; got {type(config).__name__}")
        try:
            self.config = json.loads(json.dumps(dict(config), sort_keys=True))
        except (TypeError, ValueError) as e:
            raise ValueError(f"Checkpointer: config must be JSON-able: {e}") from None
        if not _is_int(keep) or keep < 1:
            raise ValueError(f"Checkpointer: keep must be an int >= 1; got {keep!r}")
        if not _is_int(every) or every < 1:
            raise ValueError(f"Checkpointer: every must be an int >= 1; got {every!r}")
        self.directory = Path(directory).resolve()
        self.keep = keep
        self.every = every
        self.async_save = bool(async_save)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=self.async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=_ITEMS, options=options)

    # -- saving --------------------------------------------------------------
    def save(
        self,
        step: int,
        params: PyTree,
        state: PyTree,
        *,
        extra: dict[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves a checkpoint when ``force`` or ``step % every == 0``.

        Args:
          step: the step the checkpoint belongs to (>= 0), e.g. the steps done so far.
          params: any pytree of arrays.
          state: any pytree of arrays (NamedTuples included, e.g. ``hj.HybridState``);
            typed PRNG keys are handled (see the module docstring); a packed state
            (``make_dispatched_step(pack_state=True)``) is saved as the state it holds.
          extra: a JSON-able dict stored beside (data position, a PRNG key as data,
            wall-clock, a reason such as ``"emergency"``); numpy/JAX arrays and typed
            keys inside it are encoded and come back as numpy arrays and typed keys.
          force: save whatever the step (e.g. an emergency checkpoint).

        Returns:
          Whether a checkpoint was written (with ``async_save``: started).
        """
        if not isinstance(step, int | np.integer) or isinstance(step, bool) or step < 0:
            raise ValueError(f"Checkpointer.save: step must be an int >= 0; got {step!r}")
        step = int(step)
        if extra is not None and not isinstance(extra, Mapping):
            raise ValueError(
                f"Checkpointer.save: extra must be a dict or None; got {type(extra).__name__}"
            )
        if not force and step % self.every != 0:
            return False
        encoded_extra = _encode_json({} if extra is None else dict(extra), "extra")
        state = unpack_state(state)  # a packed state is saved as the state it holds
        params_saved = _keys_to_data(params)
        state_saved = _keys_to_data(state)
        layout = {
            "format": FORMAT_VERSION,
            "step": int(step),
            "saved_at": time.time(),
            "params": _layout(params),
            "state": _layout(state),
        }
        self._manager.wait_until_finished()
        if step in self._manager.all_steps():
            self._manager.delete(step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params_saved),
                state=ocp.args.StandardSave(state_saved),
                config=ocp.args.JsonSave(self.config),
                extra=ocp.args.JsonSave(encoded_extra),
                layout=ocp.args.JsonSave(layout),
            ),
            force=True,
        )
        if not self.async_save:
            self._manager.wait_until_finished()
        return True

    def wait(self) -> None:
        """Blocks until any background save has been written."""
        self._manager.wait_until_finished()

    # -- restoring -----------------------------------------------------------
    def restore(
        self, params_like: PyTree, state_like: PyTree
    ) -> tuple[int, PyTree, PyTree, dict[str, Any]] | None:
        """Restores the latest good checkpoint into the structure of the targets.

        Steps are tried from the latest down. A step whose files are missing, truncated
        or otherwise unreadable gives a ``warnings.warn`` naming it, is moved aside to
        ``<step>.corrupt`` and the previous step is tried.

        Args:
          params_like: the params' structure: concrete arrays or abstract ones
            (``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape``); shardings of
            the targets are used where given.
          state_like: the same for the state; NamedTuple types survive.

        Returns:
          ``(step, params, state, extra)``, or ``None`` if there is no good checkpoint.

        Raises:
          ValueError: the checkpoint was saved under a different config (the differing
            keys and both values are named), or with params/state of another structure,
            shape or dtype.
        """
        self._manager.wait_until_finished()
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        for n, step in enumerate(steps):
            earlier = steps[n + 1] if n + 1 < len(steps) else None
            try:
                meta = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        config=ocp.args.JsonRestore(),
                        extra=ocp.args.JsonRestore(),
                        layout=ocp.args.JsonRestore(),
                    ),
                )
                stored_config = meta.config
                extra = _decode_json(meta.extra)
                layout = meta.layout
                if not isinstance(stored_config, dict) or not isinstance(layout, dict):
                    raise ValueError("config or layout is not a JSON object")
                stored_params, stored_state = list(layout["params"]), list(layout["state"])
            except Exception as e:  # any failure to read means a bad step
                self._set_aside(step, e, earlier)
                continue
            self._check_config(step, stored_config)
            _check_layout(step, "params", stored_params, params_like)
            _check_layout(step, "state", stored_state, state_like)
            try:
                arrays = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(_restore_target(params_like)),
                        state=ocp.args.StandardRestore(_restore_target(state_like)),
                    ),
                )
                params = _data_to_keys(arrays.params, params_like)
                state = _data_to_keys(arrays.state, state_like)
            except Exception as e:  # any failure to read means a bad step
                self._set_aside(step, e, earlier)
                continue
            return int(step), params, state, extra
        return None

    def _check_config(self, step: int, stored: dict[str, Any]) -> None:
        diffs = _dict_diff(stored, self.config)
        if diffs:
            lines = "; ".join(f"{k}: stored {a}, current {b}" for k, a, b in diffs)
            raise ValueError(
                f"Checkpointer: the checkpoint at step {step} in {self.directory} was saved "
                f"under a different config ({lines}); refusing to load it"
            )

    def _set_aside(self, step: int, error: Exception, earlier: int | None) -> None:
        src = self.directory / str(step)
        dst = self.directory / f"{step}.corrupt"
        n = 1
        while dst.exists():
            dst = self.directory / f"{step}.corrupt.{n}"
            n += 1
        moved = ""
        if jax.process_index() == 0:
            try:
                src.rename(dst)
                moved = f"; moved it to {dst.name}"
            except OSError:
                pass
        message = str(error).splitlines()[0][:300] if str(error) else ""
        then = (
            f"trying the earlier checkpoint at step {earlier}"
            if earlier is not None
            else "no earlier checkpoint to fall back to"
        )
        warnings.warn(
            f"Checkpointer: checkpoint at step {step} in {self.directory} is incomplete or "
            f"corrupted ({type(error).__name__}: {message}){moved}; {then}",
            RuntimeWarning,
            stacklevel=3,
        )
        self._manager.reload()

    # -- bookkeeping ---------------------------------------------------------
    def all_steps(self) -> list[int]:
        """The steps saved (and not moved aside), ascending."""
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The latest step saved, or ``None``."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- PRNG keys -----------------------------------------------------------------
def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(x: Any) -> str:
    if isinstance(x, jax.Array):
        return str(jax.random.key_impl(x))
    return str(x.dtype._impl.name)  # abstract key (ShapeDtypeStruct)


def _keys_to_data(tree: PyTree) -> PyTree:
    """Replaces typed PRNG keys by their uint32 ``key_data``."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(restored: PyTree, like: PyTree) -> PyTree:
    """Rebuilds typed keys where ``like`` has them, with ``like``'s implementation."""

    def convert(x: Any, ref: Any) -> Any:
        if _is_key(ref):
            return jax.random.wrap_key_data(x, impl=_key_impl(ref))
        return x

    return jax.tree.map(convert, restored, like)


# -- structure -------------------------------------------------------------------
def _layout(tree: PyTree) -> list[list[Any]]:
    """``[key path, shape, dtype]`` per leaf; typed keys as ``key<impl>``."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_key(x):
            dtype = f"key<{_key_impl(x)}>"
        else:
            dtype = str(np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x))
        out.append([jax.tree_util.keystr(path), list(np.shape(x)), dtype])
    return out


def _check_layout(step: int, what: str, stored: Any, like: PyTree) -> None:
    current = _layout(like)
    stored = [list(e) for e in stored]
    if stored == current:
        return
    old = {e[0]: e[1:] for e in stored}
    new = {e[0]: e[1:] for e in current}
    diffs = [
        f"{k}: stored {_fmt_leaf(old.get(k))}, target {_fmt_leaf(new.get(k))}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ] or ["the order of the leaves differs"]
    shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 8 else "")
    raise ValueError(
        f"Checkpointer: the {what} saved at step {step} do not match the {what} to restore "
        f"into ({shown})"
    )


def _fmt_leaf(entry: Any) -> str:
    if entry is None:
        return "<missing>"
    shape, dtype = entry
    return f"{dtype}{list(shape)}"


def _restore_target(like: PyTree) -> PyTree:
    """Abstract restore targets: shapes, dtypes (key data for keys), shardings where known."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(x: Any) -> Any:
        if not isinstance(x, jax.Array | jax.ShapeDtypeStruct):
            return x  # numpy arrays and scalars restore as such
        sharding = getattr(x, "sharding", None) or default
        if _is_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(target, like)


# -- JSON ------------------------------------------------------------------------
def _encode_json(x: Any, where: str) -> Any:
    """Makes ``x`` JSON-able; arrays and typed keys become tagged objects."""
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise ValueError(f"Checkpointer: {where} has a non-str key {k!r}")
            out[k] = _encode_json(v, f"{where}[{k!r}]")
        return out
    if isinstance(x, list | tuple):
        return [_encode_json(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if x is None or isinstance(x, bool | int | float | str):
        return x
    if _is_key(x):
        return {_KEY_TAG: _key_impl(x), "data": _encode_json(jax.random.key_data(x), where)}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray | jax.Array):
        a = np.asarray(x)
        return {_ARRAY_TAG: a.tolist(), "dtype": str(a.dtype), "shape": list(a.shape)}
    raise ValueError(
        f"Checkpointer: {where} is not JSON-able ({type(x).__name__}); use numbers, "
        "strings, lists, dicts or arrays"
    )


def _decode_json(x: Any) -> Any:
    if isinstance(x, dict):
        if _ARRAY_TAG in x:
            return np.asarray(x[_ARRAY_TAG], dtype=x["dtype"]).reshape(x["shape"])
        if _KEY_TAG in x:
            return jax.random.wrap_key_data(_decode_json(x["data"]), impl=x[_KEY_TAG])
        return {k: _decode_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode_json(v) for v in x]
    return x


def _dict_diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """Differing keys of two JSON dicts (dotted for nested ones) with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            name = f"{prefix}.{k}" if prefix else k
            if k not in a:
                out.append((name, "<missing>", repr(b[k])))
            elif k not in b:
                out.append((name, repr(a[k]), "<missing>"))
            else:
                out.extend(_dict_diff(a[k], b[k], name))
        return out
    if _json_equal(a, b):
        return []
    return [(prefix or "<config>", repr(a), repr(b))]


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
