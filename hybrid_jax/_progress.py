"""The progress display of ``hj.train``: a tqdm bar when installed, else a line per fetch."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._phases import PHASE_NAMES
from ._rows import Row


def progress_bar(
    enabled: bool, total: int, start: int, desc: str
) -> Callable[[Row | None, int], None]:
    """A progress callback ``(last_row, n_new)``; ``(None, 0)`` closes it."""
    if not enabled:
        return lambda row, n: None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - depends on the environment
        tqdm = None
    skipped = _skipped_share
    if tqdm is None:

        def line(row: Row | None, n: int) -> None:
            if row is not None:
                print(f"{desc} step {row['step'] + 1}/{total} {_describe(row, skipped(row))}")

        return line
    bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)

    def update(row: Row | None, n: int) -> None:
        if row is None:
            bar.close()
            return
        bar.set_postfix_str(_describe(row, skipped(row)), refresh=False)
        bar.update(n)

    return update


def _skipped_share(row: Row) -> float:
    """The share of the steps so far that ran no backward pass."""
    return 1.0 - row["backward_passes"] / max(row["step"] + 1, 1)


def _describe(row: Row, skipped: float) -> str:
    """The postfix of the bar: phase, loss, confidence and share skipped."""
    loss = row["loss"]
    loss_s = f"{loss:.4f}" if np.isfinite(loss) else "-"
    return (
        f"phase={PHASE_NAMES[row['phase']]} loss={loss_s} conf={row['confidence']:.2f} "
        f"skipped={skipped:.0%}"
    )
