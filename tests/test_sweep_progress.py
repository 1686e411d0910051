"""The sweep's console (pipeline.sweep_progress): a line per trial event and a line a minute. That Tune's
table comes once, at the end, is checked on a real sweep in test_reliability."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.tune.experiment import Trial

from pipeline.sweep_progress import SweepProgress


def trial(i: int, status: str, **result) -> SimpleNamespace:
    return SimpleNamespace(trial_id=f"t{i}", status=status, last_result=result,
                           config={"strategy": "const", "target": "x0", "seed": i})


class Recorded(SweepProgress):
    def emit(self, line: str) -> None:
        self.printed.append(line)


def recorded(*args, **kwargs) -> Recorded:
    progress = Recorded(*args, **kwargs)
    progress.printed = []
    return progress


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("pipeline.sweep_progress.time.monotonic", lambda: now[0])
    return now


def test_a_line_per_trial_event_and_a_status_line_a_minute(clock):
    progress = recorded(3, "fid_featurenet", every_s=60)
    printed = progress.printed
    trials = [trial(0, Trial.RUNNING), trial(1, Trial.PENDING)]

    def tick(seconds: float) -> list[str]:
        clock[0] += seconds
        printed.clear()
        if progress.should_report(trials):
            progress.report(trials, False)
        return list(printed)

    assert tick(1) == ["sweep: const x0 seed 0 started"]
    assert tick(10) == []  # nothing changed, and less than a minute since the last line
    trials[0].last_result = {"step": 100, "fid": 400.0}
    assert tick(55) == ["sweep: 0/3 trials done, 1 running: const x0 seed 0 at step 100  [1m06s]"]
    trials[0].status, trials[0].last_result = Trial.TERMINATED, {"step": 300, "fid": 123.45}
    trials[1].status = Trial.RUNNING
    assert tick(5) == ["sweep: const x0 seed 0 finished at step 300, fid_featurenet 123.5 (1/3 trials done)",
                       "sweep: const x0 seed 1 started"]
    trials[1].status = Trial.ERROR
    assert tick(5) == ["sweep: const x0 seed 1 failed (2/3 trials done; its error follows at the end)"]



def test_a_restored_sweep_reports_afresh(clock):
    import pickle

    progress = recorded(2)
    progress.report([trial(0, Trial.TERMINATED, step=8)], False)
    clock[0] += 5000
    restored = pickle.loads(pickle.dumps(progress))  # as Tuner.restore, in the resumed sweep's process
    restored.printed.clear()
    restored.report([trial(0, Trial.TERMINATED, step=8), trial(1, Trial.RUNNING)], False)
    assert restored.printed == ["sweep: const x0 seed 0 finished at step 8 (1/2 trials done)",
                                "sweep: const x0 seed 1 started"]


def test_a_trial_that_reported_nothing_yet_is_starting(clock):
    progress = recorded(1, every_s=60)
    trials = [trial(0, Trial.RUNNING)]
    progress.report(trials, False)
    clock[0] += 61
    progress.printed.clear()
    progress.report(trials, False)
    assert progress.printed == ["sweep: 0/1 trials done, 1 running: const x0 seed 0 starting (no step reported yet)"
                                "  [1m01s]"]
