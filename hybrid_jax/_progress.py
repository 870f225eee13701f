"""The progress display of ``hj.train``: a tqdm bar when installed, else a line per fetch.

It says "compiling" until the first step has run. A hybrid's bar shows the phase, the
loss, the predictor's confidence and the share of backward passes saved so far; a plain
optimizer's bar shows only the loss.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._phases import PHASE_NAMES
from ._rows import Row

COMPILING = "compiling (the first step)..."


def progress_bar(
    enabled: bool, total: int, start: int, desc: str, *, plain: bool = False
) -> Callable[[Row | None, int], None]:
    """A progress callback ``(last_row, n_new)``; ``(None, 0)`` closes it.

    Args:
      enabled: ``False`` gives a callback that shows nothing.
      total: the run's total steps.
      start: the steps already done (a resumed run).
      desc: the label in front of the bar.
      plain: the run is a plain optimizer's (no phases, no predictions).

    Returns:
      The callback.
    """
    if not enabled:
        return lambda row, n: None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - depends on the environment
        tqdm = None
    if tqdm is None:
        print(f"{desc}: {COMPILING}", flush=True)

        def line(row: Row | None, n: int) -> None:
            if row is not None:
                print(f"{desc} step {row['step'] + 1}/{total} {describe(row, plain=plain)}")

        return line
    bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)
    bar.set_postfix_str(COMPILING, refresh=True)

    def update(row: Row | None, n: int) -> None:
        if row is None:
            bar.close()
            return
        bar.set_postfix_str(describe(row, plain=plain), refresh=False)
        bar.update(n)

    return update


def saved_share(row: Row) -> float:
    """The share of the steps so far that ran no backward pass (backward passes saved)."""
    return 1.0 - row["backward_passes"] / max(row["step"] + 1, 1)


def describe(row: Row, *, plain: bool = False) -> str:
    """The postfix of the bar: the loss; for a hybrid also the phase, the confidence
    and the share of backward passes saved."""
    loss = row["loss"]
    loss_s = f"{loss:.4f}" if np.isfinite(loss) else "-"
    if plain:
        return f"loss={loss_s}"
    return (
        f"phase={PHASE_NAMES[row['phase']]} loss={loss_s} "
        f"confidence={row['confidence']:.2f} backward passes saved={saved_share(row):.0%}"
    )
