"""The sweep's console: a line per trial that starts, ends or fails, a line a minute, and Tune's table at the end.

Tune's own reporter prints its whole table (a row per trial) every `max_report_frequency`
seconds: a 20-minute default sweep filled the console with about 800 lines, and a trial's end
was hard to spot in them.
"""
from __future__ import annotations

import time

from ray.tune import CLIReporter
from ray.tune.experiment import Trial

DONE = (Trial.TERMINATED, Trial.ERROR)


def trial_label(trial: Trial) -> str:
    c = trial.config
    return f"{c.get('strategy')} {c.get('target')} seed {c.get('seed')}"


def fid_text(result: dict, metric: str) -> str:
    fid = result.get("fid")
    return f", {metric} {fid:.1f}" if isinstance(fid, (int, float)) else ""


def where(trial: Trial) -> str:
    step = (trial.last_result or {}).get("step")
    return f"at step {step}" if step is not None else "starting (no step reported yet)"


def elapsed_text(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class SweepProgress(CLIReporter):
    """Tune progress reporter (Tune asks `should_report`, then calls `report`)."""

    def __init__(self, total: int | None = None, metric: str = "fid", every_s: float = 60.0):
        super().__init__(parameter_columns=["strategy", "target", "seed"],
                         metric_columns={"step": "step", "fid": "FID"}, max_progress_rows=100,
                         sort_by_metric=False, print_intermediate_tables=True)
        # Tune learns of trials as the search algorithm hands them out: the grid's size is the total
        self.total, self.metric, self.every_s = total, metric, every_s
        self.status: dict[str, str] = {}
        self.start = self.last_line = time.monotonic()

    def __setstate__(self, state: dict) -> None:
        # Tuner.restore unpickles the reporter of the interrupted sweep: its clock and the statuses
        # it printed belong to that process
        self.__dict__.update(state)
        self.status = {}
        self.start = self.last_line = time.monotonic()

    def should_report(self, trials: list[Trial], done: bool = False) -> bool:
        changed = any(self.status.get(t.trial_id) != t.status for t in trials)
        return done or changed or time.monotonic() - self.last_line >= self.every_s

    def report(self, trials: list[Trial], done: bool, *sys_info: str) -> None:
        for line in self.lines(trials, done):
            self.emit(line)
        if done:
            super().report(trials, done, *sys_info)

    def emit(self, line: str) -> None:
        print(line, flush=True)

    def lines(self, trials: list[Trial], done: bool) -> list[str]:
        now = time.monotonic()
        finished, total = sum(t.status in DONE for t in trials), max(self.total or 0, len(trials))
        out = []
        for t in trials:
            before, self.status[t.trial_id] = self.status.get(t.trial_id), t.status
            if before == t.status:
                continue
            result = t.last_result or {}
            if t.status == Trial.RUNNING:
                out.append(f"sweep: {trial_label(t)} started")
            elif t.status == Trial.TERMINATED:
                out.append(f"sweep: {trial_label(t)} finished at step {result.get('step', '?')}"
                           f"{fid_text(result, self.metric)} ({finished}/{total} trials done)")
            elif t.status == Trial.ERROR:
                out.append(f"sweep: {trial_label(t)} failed ({finished}/{total} trials done; "
                           f"its error follows at the end)")
        if not done and now - self.last_line >= self.every_s:
            running = [t for t in trials if t.status == Trial.RUNNING]
            at = "; ".join(f"{trial_label(t)} {where(t)}" for t in running)
            out.append(f"sweep: {finished}/{total} trials done, {len(running)} running"
                       f"{': ' + at if at else ''}  [{elapsed_text(now - self.start)}]")
        if out:
            self.last_line = now
        return out
