"""The promoting ASHA scheduler's decisions, driven by a stand-in for Tune's controller (no Ray started).

The real searches in test_tune.py run it end to end; here each rule is pinned on a small script of results."""

from __future__ import annotations

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from deepfake.asha import PromotingASHA, limit_active, milestones


class FakeTrial:
    def __init__(self, trial_id: str):
        self.trial_id, self.status, self.has_reported_at_least_once = trial_id, Trial.PENDING, False


class FakeController:
    def __init__(self):
        self.trials: list[FakeTrial] = []
        self.stopped: list[str] = []

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        trial.status = Trial.TERMINATED
        self.stopped.append(trial.trial_id)


def _sched(n: int, max_t: int = 9, rf: int = 3, conc: int = 2) -> tuple[PromotingASHA, FakeController]:
    s = PromotingASHA(
        time_attr="epoch", metric="val_acc", mode="max", max_t=max_t, grace_period=1,
        reduction_factor=rf, num_samples=n, max_concurrent=conc,
    )  # fmt: skip
    return s, FakeController()


def _add(s: PromotingASHA, c: FakeController, trial_id: str) -> FakeTrial:
    t = FakeTrial(trial_id)
    c.trials.append(t)
    s.on_trial_add(c, t)
    return t


def _report(s: PromotingASHA, c: FakeController, t: FakeTrial, epoch: int, acc: float) -> str:
    t.status, t.has_reported_at_least_once = Trial.RUNNING, True
    decision = s.on_trial_result(c, t, {"epoch": epoch, "val_acc": acc})
    if decision == TrialScheduler.PAUSE:
        t.status = Trial.PAUSED
    return decision


def test_milestones():
    assert milestones(9, 1, 3) == [1, 3]
    assert milestones(16, 1, 4) == [1, 4]
    assert milestones(2, 2, 2) == []
    with pytest.raises(ValueError):
        milestones(9, 0, 3)


def test_trials_pause_at_rungs_and_only_the_top_third_is_promoted():
    s, c = _sched(6)
    accs = {"t0": 0.60, "t1": 0.55, "t2": 0.80, "t3": 0.50, "t4": 0.70, "t5": 0.52}
    t0, t1 = _add(s, c, "t0"), _add(s, c, "t1")
    # the first two arrive at rung 1: a third of two results is nobody, and more trials are coming
    assert _report(s, c, t0, 1, accs["t0"]) == TrialScheduler.PAUSE
    assert _report(s, c, t1, 1, accs["t1"]) == TrialScheduler.PAUSE
    assert s.paused == {"t0", "t1"}
    # paused trials hold no slot, so the searcher adds one; with nothing promotable it is the one to run
    t2 = _add(s, c, "t2")
    assert s.choose_trial_to_run(c) is t2
    assert _report(s, c, t2, 1, accs["t2"]) == TrialScheduler.CONTINUE  # 3 results: the best goes on at once
    assert _report(s, c, t2, 2, 0.81) == TrialScheduler.CONTINUE  # epoch 2 is not a rung
    t3 = _add(s, c, "t3")
    assert _report(s, c, t3, 1, accs["t3"]) == TrialScheduler.PAUSE
    t4 = _add(s, c, "t4")
    assert _report(s, c, t4, 1, accs["t4"]) == TrialScheduler.PAUSE  # 5 results: top 1 only (t2)
    t5 = _add(s, c, "t5")
    t5.status = Trial.RUNNING
    assert s.choose_trial_to_run(c) is None  # t2 and t5 run: no slot (max_concurrent 2)
    assert _report(s, c, t5, 1, accs["t5"]) == TrialScheduler.PAUSE
    # six results at rung 1: the top two go on; t2 already did, t4 (0.70) resumes in the slot t5 left
    assert s.choose_trial_to_run(c) is t4
    assert "t4" not in s.paused and s.paused == {"t0", "t1", "t3", "t5"}
    t4.status = Trial.PENDING
    assert s.choose_trial_to_run(c) is None  # t2 and t4 busy
    assert s.rungs[1] == accs


def test_a_finished_search_promotes_its_best_and_stops_the_rest():
    s, c = _sched(3)
    a, b, d = (_add(s, c, x) for x in ("a", "b", "d"))
    assert _report(s, c, a, 1, 0.6) == TrialScheduler.PAUSE
    assert _report(s, c, b, 1, 0.7) == TrialScheduler.PAUSE
    # all trials started: a rung promotes at least its best, even with fewer than rf results
    assert _report(s, c, d, 1, 0.5) == TrialScheduler.PAUSE
    assert s.choose_trial_to_run(c) is b
    b.status = Trial.RUNNING
    assert _report(s, c, b, 3, 0.75) == TrialScheduler.CONTINUE  # alone at rung 3 and the search is final
    b.status = Trial.TERMINATED  # ran its full budget
    assert s.choose_trial_to_run(c) is None
    assert sorted(c.stopped) == ["a", "d"] and not s.paused


def test_min_mode_ranks_low_values_first():
    s = PromotingASHA(
        time_attr="epoch", metric="val_loss", mode="min", max_t=3, grace_period=1,
        reduction_factor=2, num_samples=2, max_concurrent=1,
    )  # fmt: skip
    c = FakeController()
    hi, lo = _add(s, c, "hi"), _add(s, c, "lo")
    s.on_trial_result(c, hi, {"epoch": 1, "val_loss": 2.0})
    hi.status = Trial.PAUSED
    lo.status, lo.has_reported_at_least_once = Trial.RUNNING, True
    assert s.on_trial_result(c, lo, {"epoch": 1, "val_loss": 0.5}) == TrialScheduler.CONTINUE


class CountingSearcher(Searcher):
    def __init__(self):
        super().__init__(metric="val_acc", mode="max")
        self.n = 0

    def suggest(self, trial_id):
        self.n += 1
        return {"x": self.n}

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


def test_limiters_do_not_count_paused_trials():
    paused: set[str] = set()
    lim = limit_active(CountingSearcher(), 1, paused)
    assert lim.suggest("a") == {"x": 1}
    assert lim.suggest("b") is None  # one live trial fills the limit
    paused.add("a")
    assert lim.suggest("b") == {"x": 2}  # paused: its slot is free
    lim.on_trial_complete("a")  # a paused trial that is stopped still reaches the searcher and leaves
    assert lim.live_trials == {"b"}

    gen = limit_active(None, 1, paused)
    gen._trial_generator = [FakeTrial("g1"), FakeTrial("g2")]  # stands in for the variants of an experiment
    assert gen.next_trial().trial_id == "g1" and gen.next_trial() is None
    paused.add("g1")
    assert gen.next_trial().trial_id == "g2" and gen.max_concurrent == 1


def test_the_ray_internals_the_limiters_read_still_exist():
    """Fails loudly on a Ray upgrade that renames what deepfake.asha reads (its one use of Tune internals)."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from deepfake import asha

    for searcher in (BasicVariantGenerator(max_concurrent=2), ConcurrencyLimiter(OptunaSearch(), 2)):
        live = asha.live_trials(searcher)
        assert isinstance(live, set) and live == set()
    assert set(asha.RAY_INTERNALS) == {ConcurrencyLimiter, BasicVariantGenerator}
