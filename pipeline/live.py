"""DVCLive as the training loop's curve log (rank 0 of every Train run: the `train` stage and each sweep trial).

A run's directory holds DVCLive's usual layout: one TSV per logged value under
`plots/metrics/` (`step<TAB>fid`, ...), the latest values in `metrics.json`, and the string
values (which FID metric `fid` is) in `params.yaml`. dvc.yaml declares the directory as a
cached output and its TSVs as plots, so `dvc plots diff` reads every experiment's copy.

Resume keeps the project's semantics, which DVCLive's own `resume=True` does not: the rows
logged after the checkpoint a run resumes from are dropped (they are logged again, the same,
by the resumed run), and `metrics.json` is rewritten to match.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable

import yaml

from msdm.diffusion_training import CurveLog
from msdm.io import atomic_path, atomic_write_json

METRICS_DIR = Path("plots") / "metrics"  # DVCLive's folder for log_metric's TSVs
# No DVC experiment is saved from a Train worker, no dvc.yaml or report is written (dvc.yaml
# declares the directory), and nothing is posted to Studio unless the user configured it.
LIVE_OPTIONS = {"save_dvc_exp": False, "dvcyaml": None, "report": None, "monitor_system": False}


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() and text.lstrip("-").isdigit() else value


def _tsv_rows(path: Path) -> list[tuple[int, Any]]:
    """(step, value) per row of one DVCLive TSV; a line cut short by a kill is skipped."""
    rows = []
    with open(path, newline="") as fh:
        for record in csv.DictReader(fh, delimiter="\t"):
            name = next((k for k in record if k not in ("step", "timestamp")), None)
            try:
                rows.append((int(record["step"]), _number(record[name])))
            except (TypeError, ValueError, KeyError):
                continue
    return rows


def _metric_files(directory: Path) -> dict[str, Path]:
    root = directory / METRICS_DIR
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.rglob("*.tsv"))}


def _params(directory: Path) -> dict[str, Any]:
    try:
        params = yaml.safe_load((directory / "params.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return params if isinstance(params, dict) else {}


def read_curve(directory: str | Path) -> list[dict]:
    """The rows a run logged to `directory`, one per logged step, in step order: `step`, then
    each value DVCLive holds for that step, then the run's string values."""
    directory = Path(directory)
    table: dict[int, dict] = {}
    for name, path in _metric_files(directory).items():
        for step, value in _tsv_rows(path):
            table.setdefault(step, {"step": step})[name] = value
    strings = _params(directory)
    return [{**table[s], **strings} for s in sorted(table)]


def truncate_curve(directory: Path, up_to_step: int) -> None:
    """Drop every row logged after `up_to_step` (each TSV rewritten atomically)."""
    for path in _metric_files(directory).values():
        kept = [(s, v) for s, v in _tsv_rows(path) if s <= up_to_step]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
            writer.writerow(["step", path.stem])
            writer.writerows(kept)


def summary_of(rows: list[dict]) -> dict:
    """metrics.json as DVCLive writes it: the last logged value of each metric, and the step."""
    summary: dict[str, Any] = {}
    for row in rows:
        summary.update({k: v for k, v in row.items() if not isinstance(v, str)})
    return summary


class DVCLiveCurve(CurveLog):
    """The loop's rows, logged with DVCLive to `directory` (absolute: Ray workers do not run
    in the repository), and handed to `on_row` (the W&B logger, when tracking is on).
    Without a directory the rows go to `on_row` only."""

    def __init__(self, directory: str | Path | None, on_row: Callable[[dict], None] | None = None):
        super().__init__()
        self.directory = Path(directory) if directory else None
        self.on_row = on_row
        self.live = None

    def start(self, resumed_step: int | None) -> None:
        if self.directory is None:
            return super().start(resumed_step)
        from dvclive import Live

        if resumed_step is None:  # a new run: DVCLive clears an earlier run's files
            self.rows = []
            self.live = Live(str(self.directory), resume=False, **LIVE_OPTIONS)
            return
        truncate_curve(self.directory, resumed_step)
        self.rows = read_curve(self.directory)
        metrics = self.directory / "metrics.json"
        if self.rows:
            atomic_write_json(summary_of(self.rows), metrics)
        else:
            metrics.unlink(missing_ok=True)
        self.live = Live(str(self.directory), resume=True, **LIVE_OPTIONS)

    def append(self, row: dict) -> None:
        super().append(row)
        if self.on_row is not None:
            self.on_row(row)
        if self.live is None:
            return
        self.live.step = int(row["step"])
        for key, value in row.items():
            if key == "step":
                continue
            if isinstance(value, str):
                self.live.log_param(key, value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self.live.log_metric(key, value)
        self.live.make_summary()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()
            self.live = None
