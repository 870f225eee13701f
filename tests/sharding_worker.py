"""Subprocess side of ``tests/test_sharding.py`` (needs several CPU devices, hence its own
process: ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before JAX
starts).

    python tests/sharding_worker.py mesh OUT            # 8 local devices
    python tests/sharding_worker.py multihost OUT I PORT   # process I of 2, 4 devices each

It writes what it measured to ``OUT`` (``.npz`` arrays and a ``.json`` report); the test
asserts on them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hybrid_jax as hj
from hybrid_jax import sharding as hs
from hybrid_jax import tasks

MODEL = tasks.GPTConfig(vocab=256, seq_len=32, d_model=64, n_layers=2, n_heads=4)
BATCH = 16
# every phase within ~25 steps: Warmup 10, Full 5, then (Predict 2-4, Correct 2) x 5
CONFIG = hj.HybridConfig(
    warmup_steps=10,
    full_steps=5,
    correct_steps=2,
    min_horizon=2,
    max_horizon=4,
    confidence_threshold=0.0,
)


def loss_fn(params, tokens):
    return tasks.gpt_loss(params, tokens, MODEL)


def make_batches(n):
    train = tasks.byte_split(tasks.stdlib_text(200_000))[0]
    it = tasks.token_batches(train, BATCH, MODEL.seq_len, seed=0)
    return [next(it) for _ in range(n)]


def flat(tree, prefix):
    return {
        prefix + jax.tree_util.keystr(path): np.asarray(x)
        for path, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    }


def specs(tree):
    """``{key path: [partition spec as a list, fully replicated]}`` of every leaf."""
    return {
        jax.tree_util.keystr(path): [list(x.sharding.spec), bool(x.sharding.is_fully_replicated)]
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def run(kind, tx, params, batches, mesh=None):
    """Trains from ``params``; returns (params, state, stacked metrics, step fn, timings)."""
    if kind == "single":
        state = tx.init(params)
        step = hj.make_hybrid_step(loss_fn, tx)
        put = jnp.asarray
    else:
        rule = "replicated" if kind == "dp" else "fsdp"
        p_sh = hs.param_shardings(params, mesh, rule)
        s_sh = hs.state_shardings(tx, params, p_sh, mesh)
        b_sh = hs.batch_sharding(mesh)
        params = jax.device_put(params, p_sh)
        state = jax.jit(tx.init, out_shardings=s_sh)(params)
        step = hs.make_sharded_hybrid_step(loss_fn, tx, p_sh, s_sh, b_sh)
        put = lambda b: jax.device_put(b, b_sh)
    rows = []
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        params, state, m = step(params, state, put(b))
        rows.append(m)
        if i == 0:
            jax.block_until_ready(params)
            t1 = time.perf_counter()
    jax.block_until_ready((params, state))
    t2 = time.perf_counter()
    rows = jax.device_get(rows)
    metrics = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
    timing = {"first_step_s": t1 - t0, "steps_per_s": (len(batches) - 1) / (t2 - t1)}
    return params, state, metrics, step, timing


def bits_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b) or len(la) != len(lb):
        return False
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


def mesh_mode(out: Path) -> None:
    steps = int(os.environ.get("SHARDING_STEPS", "120"))
    assert len(jax.devices()) == 8, jax.devices()
    batches = make_batches(steps + 3)
    train, extra = batches[:steps], batches[steps:]
    tx = hj.predictive(optax.adamw(1e-3), CONFIG)
    mesh = hs.data_mesh()
    report = {"steps": steps, "devices": len(jax.devices()), "timing": {}, "cache_size": {}}
    arrays = {}
    results = {}
    for kind in ("single", "dp", "fsdp"):
        params0 = tasks.gpt_init(jax.random.key(0), MODEL)
        params, state, metrics, step, timing = run(kind, tx, params0, train, mesh)
        results[kind] = (params, state, step)
        report["timing"][kind] = timing
        report["cache_size"][kind] = step._cache_size()
        arrays.update(flat(params, f"{kind}/params"))
        arrays.update({f"{kind}/metrics/{k}": v for k, v in metrics.items()})
        print(
            f"[{kind}] compile+first step {timing['first_step_s']:.1f} s, "
            f"{timing['steps_per_s']:.1f} steps/s, cache {step._cache_size()}",
            flush=True,
        )

    params, state, step = results["fsdp"]
    report["fsdp_params_specs"] = specs(params)
    report["fsdp_state_specs"] = specs(state)
    report["dp_state_specs"] = specs(results["dp"][1])

    # per-device bytes of the state: FSDP against data parallel
    def device_bytes(tree):
        return int(sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree)))

    report["state_bytes_per_device"] = {
        "dp": device_bytes(results["dp"][1]),
        "fsdp": device_bytes(state),
    }

    # a sharded checkpoint round trip, restored into abstract targets with the shardings
    t0 = time.perf_counter()
    abstract = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )
    with hj.Checkpointer(out / "ckpt", config=CONFIG.to_dict()) as ck:
        ck.save(steps, params, state, force=True)
    with hj.Checkpointer(out / "ckpt", config=CONFIG.to_dict()) as ck:
        got = ck.restore(abstract(params), abstract(state))
    t_ckpt = time.perf_counter() - t0
    r_step, r_params, r_state, _ = got
    same_sharding = all(
        a.sharding == b.sharding
        for a, b in zip(
            jax.tree.leaves((r_params, r_state)), jax.tree.leaves((params, state)), strict=True
        )
    )
    ck_report = {
        "step": r_step,
        "state_type": type(r_state).__name__,
        "bits_equal": bits_equal((r_params, r_state), (params, state)),
        "same_sharding": same_sharding,
        "seconds": t_ckpt,
    }
    # the restored state resumes on the same compiled step, bit for bit
    p_a, s_a = params, state
    p_b, s_b = r_params, r_state
    b_sh = hs.batch_sharding(mesh)
    for b in extra:
        p_a, s_a, m_a = step(p_a, s_a, jax.device_put(b, b_sh))
        p_b, s_b, m_b = step(p_b, s_b, jax.device_put(b, b_sh))
    ck_report["resume_bits_equal"] = bits_equal((p_a, s_a, m_a), (p_b, s_b, m_b))
    ck_report["resume_cache_size"] = step._cache_size()
    report["checkpoint"] = ck_report
    print(f"[checkpoint] save + restore {t_ckpt:.1f} s", flush=True)

    np.savez(out / "mesh.npz", **arrays)
    (out / "mesh.json").write_text(json.dumps(report, indent=1))


def multihost_mode(out: Path, pid: int, port: int) -> None:
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=2,
        process_id=pid,
        initialization_timeout=60,
    )
    from jax.experimental import multihost_utils

    steps = int(os.environ.get("SHARDING_MH_STEPS", "24"))
    report = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": len(jax.devices()),
        "local_devices": len(jax.local_devices()),
    }
    mesh = hs.data_mesh()  # over all 8 devices of both processes
    tx = hj.predictive(optax.adamw(1e-3), CONFIG)
    init = lambda key: tasks.gpt_init(key, MODEL)
    p_sh = hs.param_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, "fsdp")
    params = jax.jit(init, out_shardings=p_sh)(jax.random.key(0))  # same values everywhere
    s_sh = hs.state_shardings(tx, params, p_sh, mesh)
    b_sh = hs.batch_sharding(mesh)
    state = jax.jit(tx.init, out_shardings=s_sh)(params)
    step = hs.make_sharded_hybrid_step(loss_fn, tx, p_sh, s_sh, b_sh)
    start = multihost_utils.process_allgather(params, tiled=True)  # host copy of the initial params
    batches = make_batches(steps)
    per = BATCH // jax.process_count()
    phases = []
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        local = b[pid * per : (pid + 1) * per]  # this process's slice of the global batch
        params, state, m = step(params, state, jax.make_array_from_process_local_data(b_sh, local))
        phases.append(int(m["phase"]))  # metrics are replicated: readable on every process
        if i == 0:
            t1 = time.perf_counter()
    jax.block_until_ready(params)
    t2 = time.perf_counter()
    report["first_step_s"] = t1 - t0
    report["steps_per_s"] = (steps - 1) / (t2 - t1)
    report["phases"] = phases
    report["cache_size"] = step._cache_size()
    report["basis_spec_embed"] = str(state.basis.ring["embed"].sharding.spec)
    report["local_shards_embed"] = len(params["embed"].addressable_shards)
    final = multihost_utils.process_allgather(params, tiled=True)

    # both processes save their shards into one checkpoint and restore them
    abstract = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )
    t0 = time.perf_counter()
    with hj.Checkpointer(out / "ckpt", config=CONFIG.to_dict()) as ck:
        ck.save(steps, params, state, force=True)
    with hj.Checkpointer(out / "ckpt", config=CONFIG.to_dict()) as ck:
        r_step, r_params, r_state, _ = ck.restore(abstract(params), abstract(state))
    pairs = list(
        zip(jax.tree.leaves((r_params, r_state)), jax.tree.leaves((params, state)), strict=True)
    )
    report["checkpoint"] = {
        "step": r_step,
        "seconds": time.perf_counter() - t0,
        "same_sharding": all(a.sharding == b.sharding for a, b in pairs),
        "local_bits_equal": all(
            sa.index == sb.index and np.asarray(sa.data).tobytes() == np.asarray(sb.data).tobytes()
            for a, b in pairs
            for sa, sb in zip(a.addressable_shards, b.addressable_shards, strict=True)
        ),
    }
    if pid == 0:
        # the same run on one local device, from the same initial values
        single = hj.make_hybrid_step(loss_fn, tx)
        p1 = jax.tree.map(jnp.asarray, start)
        s1 = tx.init(p1)
        ref_phases = []
        for b in batches:
            p1, s1, m1 = single(p1, s1, jnp.asarray(b))
            ref_phases.append(int(m1["phase"]))
        report["ref_phases"] = ref_phases
        np.savez(out / "multihost.npz", **flat(final, "sharded"), **flat(p1, "single"))
    (out / f"multihost{pid}.json").write_text(json.dumps(report, indent=1))
    print(
        f"[process {pid}] compile+first step {report['first_step_s']:.1f} s, "
        f"{report['steps_per_s']:.1f} steps/s; checkpoint {report['checkpoint']['seconds']:.1f} s",
        flush=True,
    )


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if mode == "mesh":
        mesh_mode(out)
    elif mode == "multihost":
        multihost_mode(out, int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
