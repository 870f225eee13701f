"""Refreshes what the repository shows without running anything: the notebooks' stored
outputs, and the example plots of a 200-step and a 20,000-step run.

    python3 notebooks/refresh.py            # both (about 6 minutes on 2 idle CPU cores)
    python3 notebooks/refresh.py notebooks  # execute every notebook, store its outputs
    python3 notebooks/refresh.py notebooks 04_how_to.ipynb   # only the ones named
    python3 notebooks/refresh.py plots      # notebooks/figures/run_200/, run_20000/

Notebooks run in place (their folder as working directory, this checkout's
``hybrid_jax`` first on the path) and are written back with their outputs, figures
included. The plots train the main job's setup (``python3 -m hybrid_jax``: the digits
MLP, the hybrid with the main job's config beside plain AdamW, lr 1e-3, batch 64, seed
0) through ``hj.train`` and draw them with ``hj.report.plot_run``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIGURES = HERE / "figures"
# The main job's config (``python3 -m hybrid_jax``).
MAIN_JOB_CONFIG = dict(
    warmup_steps=50, full_steps=10, correct_steps=3, min_horizon=1, max_horizon=4
)
PLOT_RUNS = (200, 20_000)  # steps of the example runs


def refresh_notebooks(names: list[str]) -> None:
    """Executes the notebooks (all of ``notebooks/*.ipynb`` if ``names`` is empty) and
    writes them back with their outputs; execution timings are not stored."""
    import nbformat
    from nbclient import NotebookClient

    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    paths = [HERE / n for n in names] if names else sorted(HERE.glob("*.ipynb"))
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"refresh.py: no such notebook: {path}")
        nb = nbformat.read(path, as_version=4)
        t0 = time.perf_counter()
        NotebookClient(
            nb,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(HERE)}},
            record_timing=False,
        ).execute()
        for cell in nb.cells:
            cell.get("metadata", {}).pop("execution", None)
        nbformat.write(nb, path)
        size = path.stat().st_size / 1024
        print(f"{path.name}: {time.perf_counter() - t0:.0f} s, {size:.0f} KiB")


def refresh_plots(runs: tuple[int, ...] = PLOT_RUNS) -> None:
    """Trains the main job's two arms for each length in ``runs`` and writes their plots
    to ``notebooks/figures/run_<steps>/``, with the comparison table as ``summary.txt``."""
    sys.path.insert(0, str(ROOT))
    import jax
    import optax

    import hybrid_jax as hj
    from hybrid_jax import tasks

    split = tasks.digits(seed=0)
    x_test, y_test = jax.numpy.asarray(split.x_test), jax.numpy.asarray(split.y_test)
    eval_fn = jax.jit(lambda p: tasks.mlp_loss(p, (x_test, y_test)))
    eval_fn(tasks.mlp_init(jax.random.key(0)))  # compiled here, not inside the timed run

    def data(start: int):
        return tasks.batches(split.x_train, split.y_train, 64, 0, start)

    for steps in runs:
        arms = {
            "hybrid": hj.predictive(optax.adamw(1e-3), hj.HybridConfig(**MAIN_JOB_CONFIG)),
            "adamw": optax.adamw(1e-3),
        }
        rows, summaries = {}, {}
        for name, tx in arms.items():
            t0 = time.perf_counter()
            res = hj.train(
                tasks.mlp_loss,
                tx,
                tasks.mlp_init(jax.random.key(0)),
                data,
                steps=steps,
                eval_fn=eval_fn,
                eval_every=max(1, steps // 20),
                sync_every=min(steps, 500),
                progress=False,
            )
            rows[name], summaries[name] = res.rows, hj.report.summary(res.rows)
            print(f"{steps} steps, {name}: {time.perf_counter() - t0:.0f} s")
        out = FIGURES / f"run_{steps}"
        paths = hj.report.plot_run(
            rows["hybrid"], out, baseline_rows=rows["adamw"], baseline_name="adamw"
        )
        (out / "summary.txt").write_text(hj.report.compare(summaries) + "\n")
        print("wrote", *(str(p.relative_to(ROOT)) for p in paths))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("what", nargs="?", choices=("all", "notebooks", "plots"), default="all")
    ap.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    args = ap.parse_args(argv)
    if args.what in ("all", "plots"):
        refresh_plots()
    if args.what in ("all", "notebooks"):
        refresh_notebooks(args.names)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
