"""`HybridConfig`: what a user sets, with nested groups for the basis, the RSSM, the
monitor and the bandit. Every value is validated at construction (``ValueError``)."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path
from typing import Any

from ._checks import plain, require, toml_value, unit
from ._settings import (
    CONFIDENCE_EMA_DECAY,
    CORRECTOR_FORGET,
    FEATURE_EMA_DECAY,
    GROUPS,
    LOSS_EMA_DECAY,
    RESIDUAL_BUFFER_SIZE,
    BanditSettings,
    BasisSettings,
    HorizonPolicies,
    MonitorSettings,
    Predictors,
    RSSMSettings,
    ScheduleSteps,
    _Settings,
)

__all__ = [
    "CONFIDENCE_EMA_DECAY",
    "CORRECTOR_FORGET",
    "FEATURE_EMA_DECAY",
    "LOSS_EMA_DECAY",
    "RESIDUAL_BUFFER_SIZE",
    "BanditSettings",
    "BasisSettings",
    "HybridConfig",
    "MonitorSettings",
    "RSSMSettings",
]


@dataclasses.dataclass(frozen=True, init=False)
class HybridConfig(_Settings):
    """What a user sets. Frozen; validated on construction; built by keyword.

    Phase machine (one step = one call of a step function or ``tx.update``)::

        Warmup(warmup_steps) -> Full(full_steps)
            -> [Predict(h) -> Correct(correct_steps)] x n -> Full ...

    A Predict phase starts at the end of a Full or Correct phase only when the
    predictor's confidence after the real step before the last one of the phase is at
    least ``confidence_threshold`` and fewer than ``max_consecutive_predicts`` Predict
    phases ran since the last Full phase; otherwise a Full phase follows. ``h`` is the
    horizon (see ``horizon_policy``). What a step measures acts on the step after it
    (the phase machine's one rule, ``hybrid_jax._phases``): after a non-finite real
    step, a rejected Predict phase or a non-finite prediction the next step predicts
    nothing (a predicted one applies nothing and ends its phase), and after a monitor
    warning or a rejected phase a Full phase follows the next step (inside a Full or
    Warmup phase: that phase's end, so that the kinds of a Full phase's steps are known
    when it starts). The Full phase after a rejected phase, and after a Full phase that
    ended without a Predict phase starting (the confidence too low), is backed off:
    ``full_steps`` times 2 to the number of such events, less one per accepted phase
    (at most 32 times ``full_steps``), and with ``observe_every > 2`` only its last
    ``full_steps`` steps are observed.

    Attributes:
      warmup_steps: real steps before anything is learned from (>= 0).
      full_steps: real steps of a Full phase (>= 1).
      correct_steps: real steps after each Predict phase (>= 1); the first verifies it.
      max_consecutive_predicts: Predict phases allowed between two Full phases (>= 1).
      min_horizon, max_horizon: shortest and longest Predict phase (1 <= min <= max).
      horizon_policy: ``"fixed"`` (``max_horizon``), ``"confidence"`` (from
        ``min_horizon`` at the threshold to ``max_horizon`` at confidence 1) or
        ``"bandit"`` (LinUCB over ``bandit.horizons``); every horizon is multiplied by
        the horizon scale (see ``horizon_shrink``).
      confidence_threshold: smallest confidence, in [0, 1], that starts a Predict phase.
      predictor: ``"last_update"``, ``"extrapolate"``, ``"rssm"``, ``"linefit"`` or
        ``"snoo"`` (``hybrid_jax.predictors``, default arguments; ``"linefit"`` needs
        ``basis=BasisSettings(size=4, stride=S > 1)``); a custom ``hj.Predictor`` can be
        passed to ``hj.predictive`` instead.
      observe_every: of every this many real steps (>= 1) the hybrid observes two in a
        row (learns from them); the others are the optimizer's step with the safety
        checks. A step that verifies a Predict phase, or that ends a phase after which
        one may start, is always observed; a Full or Warmup phase longer than
        ``full_steps`` (a backed-off one, the warmup) observes only in its last
        ``full_steps`` steps (``hybrid_jax._phases.quiet``), so that a predictor that
        does not pay, once backed off, costs little more than the wrapped optimizer.
        1 and 2 observe every real step. The default
        8 keeps a run's cost within 3% of the wrapped optimizer's on the GPU LM (an
        observed real step costs 4.5% more than an AdamW step there;
        ``benchmarks/end_to_end.md``).
      verify_tolerance: a guard: a Predict phase is rolled back when, on the real step
        after it, ``loss(new) > (1 + verify_tolerance) * loss(snapshot)`` (>= 0).
        A phase within it that the cost rule rejects is rolled back only if it did not
        lower the loss; either way the run backs off as after a rollback.
      predict_cost_ratio: what a predicted step costs, the verification's share
        included, as a fraction of a real step (>= 0). A Predict phase of ``h`` steps is
        accepted only if, besides the guard, its loss decrease on the verifying batch
        (one the prediction was not fitted on) is at least this times the decrease the
        ``h`` real steps it replaced were expected to make:
        ``loss(snapshot) - loss(new) >= predict_cost_ratio * loss(snapshot) *
        (1 - exp(h * min(trend, 0)))``, where ``trend`` is the running per-real-step
        change of the log loss level. Where the trend is not negative the phase must
        not raise the loss; 0 switches the rule off (only the guard applies). The
        default 1.0 asks a phase for as much as the real steps it replaced did: with
        ``max_horizon=4`` it is the setting measured safest on the digits MLP
        (``benchmarks/digits_quality.md``). The measured costs would allow less where
        prediction pays: a predicted step costs 0.03-0.07 of a real step on a GPU and
        the verification's forward pass 0.16-0.33 (``benchmarks/step_cost.md``), i.e.
        0.08-0.14 per predicted step over phases of 15 and 4 steps; on small CPU models
        0.25-0.7. Rejections by this rule are counted (metric ``cost_rejections``).
      monitor_every: during Predict, a forward pass every this many predicted steps
        for the monitor (0: never).
      horizon_shrink: factor of the horizon scale at each monitor caution, in (0, 1].
        The scale starts at its floor (``min_horizon / max_horizon``: a first phase is a
        probe of ``min_horizon`` steps), falls back to it at each rejected phase and doubles
        (up to 1) at each accepted phase (``hybrid_jax._stages.PROBE_AFTER_ROLLBACK``).
      correct_predictions: apply the residual corrector's affine correction.
      schedule_steps: what the wrapped optimizer's schedules count: ``"global"`` (every
        step, predicted ones included, so that a schedule over a run of N steps ends at
        step N) or ``"real"`` (its own updates only). Only schedule counts change
        (``scale_by_schedule``, ``inject_hyperparams``); Adam's own count, which its bias
        correction divides by, keeps counting the updates its moments have seen.
      basis: ``BasisSettings``.
      rssm: ``RSSMSettings`` (used with ``predictor="rssm"``).
      monitor: ``MonitorSettings``, or ``None`` to switch the divergence monitor off.
      bandit: ``BanditSettings`` (used with ``horizon_policy="bandit"``).
    """

    warmup_steps: int = 100
    full_steps: int = 20
    correct_steps: int = 5
    max_consecutive_predicts: int = 5
    min_horizon: int = 1
    max_horizon: int = 4
    horizon_policy: HorizonPolicies = "fixed"
    confidence_threshold: float = 0.85
    predictor: Predictors = "last_update"
    observe_every: int = 8
    verify_tolerance: float = 0.02
    predict_cost_ratio: float = 1.0
    monitor_every: int = 0
    horizon_shrink: float = 0.5
    correct_predictions: bool = False
    schedule_steps: ScheduleSteps = "global"
    basis: BasisSettings = dataclasses.field(default_factory=BasisSettings)
    rssm: RSSMSettings = dataclasses.field(default_factory=RSSMSettings)
    monitor: MonitorSettings | None = dataclasses.field(default_factory=MonitorSettings)
    bandit: BanditSettings = dataclasses.field(default_factory=BanditSettings)

    def validate(self) -> None:
        n = "HybridConfig"
        for name in (
            "full_steps",
            "correct_steps",
            "max_consecutive_predicts",
            "min_horizon",
            "observe_every",
        ):
            require(n, name, getattr(self, name), getattr(self, name) >= 1, "must be >= 1")
        require(n, "warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "must be >= 0")
        require(
            n,
            "max_horizon",
            self.max_horizon,
            self.max_horizon >= self.min_horizon,
            f"must be >= min_horizon ({self.min_horizon})",
        )
        unit(n, "confidence_threshold", self.confidence_threshold, closed_top=True)
        tol = self.verify_tolerance
        require(n, "verify_tolerance", tol, math.isfinite(tol) and tol >= 0, "must be >= 0")
        r = self.predict_cost_ratio
        why = "must be finite and >= 0 (0 switches the cost rule off)"
        require(n, "predict_cost_ratio", r, math.isfinite(r) and r >= 0, why)
        require(n, "monitor_every", self.monitor_every, self.monitor_every >= 0, "must be >= 0")
        x = self.horizon_shrink
        require(n, "horizon_shrink", x, math.isfinite(x) and 0 < x <= 1, "must be in (0, 1]")
        self._validate_basis()
        if self.horizon_policy == "bandit":
            inside = all(self.min_horizon <= h <= self.max_horizon for h in self.bandit.horizons)
            require(
                n,
                "bandit",
                self.bandit.horizons,
                inside,
                f"horizons must lie within [min_horizon, max_horizon] = "
                f"[{self.min_horizon}, {self.max_horizon}]",
            )

    def _validate_basis(self) -> None:
        stride = self.basis.stride
        if stride > 1 and self.observe_every > 2:
            raise ValueError(
                f"HybridConfig: basis.stride {stride} sums every real update into its "
                f"displacements, so it needs every real step observed: set "
                f"observe_every <= 2 (got {self.observe_every}) or basis.stride = 1"
            )
        if self.predictor == "linefit" and (stride < 2 or self.basis.size < 4):
            raise ValueError(
                f"HybridConfig: predictor='linefit' (4 snapshots) needs a basis of "
                f"displacements: basis=BasisSettings(size=4, stride=S) with S > 1; got "
                f"size {self.basis.size}, stride {stride}"
            )

    # -- serialisation -----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain ``dict`` (groups as nested dicts, the monitor switched
        off as ``None``)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, _Settings) else plain(v)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HybridConfig:
        """Builds a config from a ``dict`` (groups as nested dicts; ``monitor``: ``None``,
        ``false`` or ``"off"`` switches it off); unknown keys raise ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"HybridConfig.from_dict expects a dict; got {type(d).__name__}")
        values = dict(d)
        for name, group in GROUPS.items():
            if name not in values:
                continue
            v = values[name]
            if name == "monitor" and (v is None or v is False or v == "off"):
                values[name] = None
            elif isinstance(v, dict):
                values[name] = group.from_dict(v)
        return cls(**values)

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HybridConfig:
        """Parses a config from a JSON string."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"HybridConfig: invalid JSON: {e}") from None
        return cls.from_dict(d)

    def to_toml(self) -> str:
        """The config as a TOML document: the top-level fields, then one table per group
        (the monitor switched off is written ``monitor = "off"``)."""
        top, tables = [], []
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                body = "".join(f"{kk} = {toml_value(vv)}\n" for kk, vv in v.items())
                tables.append(f"\n[{k}]\n{body}")
            else:
                top.append(f"{k} = {toml_value('off' if v is None else v)}\n")
        return "".join(top) + "".join(tables)

    @classmethod
    def from_toml(cls, text: str) -> HybridConfig:
        """Parses a config from a TOML document; a ``[hybrid]`` table is accepted too."""
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"HybridConfig: invalid TOML: {e}") from None
        if set(d) == {"hybrid"} and isinstance(d["hybrid"], dict):
            d = d["hybrid"]
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | Path) -> HybridConfig:
        """Reads a config from a ``.json`` or ``.toml`` file (errors name the file)."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"HybridConfig: no such config file: {p}")
        if p.suffix not in (".json", ".toml"):
            raise ValueError(f"HybridConfig: config file must end in .json or .toml; got {p.name}")
        try:
            return (
                cls.from_json(p.read_text())
                if p.suffix == ".json"
                else cls.from_toml(p.read_text())
            )
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
