"""ASHA with promotions (Li et al., "A System for Massively Parallel Hyperparameter Tuning", MLSys 2020).

Ray's `ASHAScheduler` is the paper's *stopping* variant: a trial that reaches a rung goes on whenever it beats
the cutoff of the results recorded there so far, so the first trials at every rung always go on, and with a
handful of trials (8 on a laptop) about half of them run the full budget. The *promotion* variant here pauses
every trial at every rung and resumes a paused trial only once it ranks in the top `1/reduction_factor` of its
rung; a free slot goes to the most advanced promotable trial first and to a new trial otherwise.

A search has a finite number of trials, so once all of them have been started a rung promotes at least its
best trial (the paper's algorithm, run forever, would otherwise leave the last rungs waiting for company), and
when nothing runs and nothing can be promoted, the paused trials are stopped: that is how the search ends.

Pausing needs trials that resume from their last checkpoint (ours report one every epoch). Tune does not save
a scheduler's state, so after `deepfake tune --resume` every trial that was paused resumes once, then pauses
at its next rung as usual.

Paused trials would hold a `ConcurrencyLimiter` slot for ever, so the searchers are wrapped by `limit_active`,
which counts only the trials that run or wait to run.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher

log = logging.getLogger(__name__)


def milestones(max_t: int, grace_period: int, reduction_factor: int) -> list[int]:
    """Rungs below the full budget: grace, grace*rf, grace*rf^2, ... (< max_t)."""
    if grace_period < 1 or reduction_factor < 2 or max_t < 1:
        raise ValueError("need grace_period >= 1, reduction_factor >= 2 and max_t >= 1")
    out, m = [], grace_period
    while m < max_t:
        out.append(m)
        m *= reduction_factor
    return out


class PromotingASHA(FIFOScheduler):
    """Pause trials at rungs; resume the top 1/rf of each rung (see the module docstring)."""

    _supports_buffered_results = False  # a PAUSE must take effect at the rung, not a few results later

    def __init__(
        self,
        *,
        time_attr: str,
        metric: str,
        mode: str,
        max_t: int,
        grace_period: int,
        reduction_factor: int,
        num_samples: int,
        max_concurrent: int = 0,
    ):
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be min or max, got {mode!r}")
        self._time_attr, self._metric, self._mode = time_attr, metric, mode
        self._rf = reduction_factor
        self._milestones = milestones(max_t, grace_period, reduction_factor)
        self._rungs: dict[int, dict[str, float]] = {m: {} for m in self._milestones}  # higher is better
        self._promoted: dict[int, set[str]] = {m: set() for m in self._milestones}
        self._num_samples = num_samples
        self._max_concurrent = max_concurrent
        self._added = 0
        self.paused: set[str] = set()  # shared with the searcher's limiter (limit_active)

    @property
    def rungs(self) -> dict[int, dict[str, float]]:
        return self._rungs

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return (metric is None or metric == self._metric) and (mode is None or mode == self._mode)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._added += 1

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self.paused.discard(trial.trial_id)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        it, value = result.get(self._time_attr), result.get(self._metric)
        if it not in self._rungs or value is None or trial.trial_id in self._rungs[it]:
            return TrialScheduler.CONTINUE
        self._rungs[it][trial.trial_id] = value if self._mode == "max" else -value
        # The slot this trial frees goes to the most advanced promotable trial; if that is this one, go on.
        if self._next_promotion(tune_controller) == (it, trial.trial_id):
            self._promoted[it].add(trial.trial_id)
            return TrialScheduler.CONTINUE
        self.paused.add(trial.trial_id)
        log.debug("trial %s paused at %s %s", trial.trial_id, self._time_attr, it)
        return TrialScheduler.PAUSE

    def _all_started(self, tune_controller) -> bool:
        # a PENDING trial without results has not started yet (a promoted one has)
        return self._added >= self._num_samples and not any(
            t.status == Trial.PENDING and not t.has_reported_at_least_once for t in tune_controller.get_trials()
        )

    def _next_promotion(self, tune_controller) -> tuple[int, str] | None:
        """(rung, trial id) of the trial to promote next, highest rung first."""
        final = self._all_started(tune_controller)
        for m in reversed(self._milestones):
            rung = self._rungs[m]
            quota = len(rung) // self._rf
            if final:
                quota = max(1, quota)
            for tid in sorted(rung, key=rung.__getitem__, reverse=True)[:quota]:
                if tid not in self._promoted[m]:
                    return m, tid
        return None

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        trials = {t.trial_id: t for t in tune_controller.get_trials()}
        busy = [
            t for t in trials.values() if t.status in (Trial.RUNNING, Trial.PENDING) and t.trial_id not in self.paused
        ]
        if self._max_concurrent and len(busy) >= self._max_concurrent:
            return None
        while (nxt := self._next_promotion(tune_controller)) is not None:
            m, tid = nxt
            trial = trials.get(tid)
            if trial is not None and trial.status == Trial.PAUSED:
                self._promoted[m].add(tid)
                self.paused.discard(tid)
                log.info("trial %s promoted from %s %s", tid, self._time_attr, m)
                return trial
            if trial is None or trial.status in (Trial.TERMINATED, Trial.ERROR):
                self._promoted[m].add(tid)  # gone: let the next one in line have its place
                continue
            return None  # still saving its checkpoint on the way to PAUSED: wait for it
        for t in trials.values():
            if t.status == Trial.PENDING:
                return t
        if not busy and self._all_started(tune_controller):
            for t in trials.values():  # nothing runs and nothing can be promoted: the search is over
                if t.status == Trial.PAUSED:
                    log.info("trial %s stopped at its last rung", t.trial_id)
                    self.paused.discard(t.trial_id)
                    tune_controller.stop_trial(t)
        return None

    def debug_string(self) -> str:
        sizes = ", ".join(f"{m}: {len(r)}" for m, r in self._rungs.items())
        return f"PromotingASHA: rungs {{{sizes}}}, {len(self.paused)} paused"


# The one place this module reads Ray Tune internals: the set of a searcher's live (not yet completed) trial
# ids, which the limiters below count minus the paused ones. tests/test_asha.py checks these attributes exist,
# so a Ray upgrade that renames them fails that test loudly instead of letting a search hang.
RAY_INTERNALS = {ConcurrencyLimiter: "live_trials", BasicVariantGenerator: "_live_trials"}


def live_trials(searcher: ConcurrencyLimiter | BasicVariantGenerator) -> set[str]:
    """The trial ids `searcher` counts against its concurrency limit (Ray Tune internals, see RAY_INTERNALS)."""
    for cls, attr in RAY_INTERNALS.items():
        if isinstance(searcher, cls):
            try:
                return getattr(searcher, attr)
            except AttributeError:
                raise RuntimeError(
                    f"ray.tune {cls.__name__} has no {attr!r} any more (a Ray upgrade?): deepfake.asha's limiter "
                    "needs updating; use --trial-scheduler asha-stop or hyperband meanwhile"
                ) from None
    raise TypeError(f"not a Ray Tune limiter: {type(searcher).__name__}")


class _ActiveLimiter(ConcurrencyLimiter):
    """A ConcurrencyLimiter that does not count paused trials."""

    def __init__(self, searcher: Searcher, max_concurrent: int, paused: set[str]):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self._paused = paused

    def suggest(self, trial_id: str) -> dict | None:
        if len(live_trials(self) - self._paused) >= self.max_concurrent:
            return None
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            live_trials(self).add(trial_id)
            self.num_unfinished_live_trials += 1
        return suggestion


class _ActiveVariantGenerator(BasicVariantGenerator):
    """BasicVariantGenerator whose max_concurrent does not count paused trials."""

    def __init__(self, paused: set[str], **kwargs: Any):
        super().__init__(**kwargs)
        self._paused = paused

    def next_trial(self):
        limit = self.max_concurrent
        if limit > 0 and len(live_trials(self) - self._paused) >= limit:
            return None
        self.max_concurrent = 0  # the parent would count paused trials too
        try:
            return super().next_trial()
        finally:
            self.max_concurrent = limit


def limit_active(searcher: Searcher | None, max_concurrent: int, paused: set[str], **variant_kwargs: Any):
    """Limit concurrency to running trials: `searcher` behind an `_ActiveLimiter`, or (None) random search."""
    if searcher is None:
        return _ActiveVariantGenerator(paused, max_concurrent=max_concurrent, **variant_kwargs)
    return _ActiveLimiter(searcher, max_concurrent, paused)
