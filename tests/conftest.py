"""Tests run tiny models, for which one intra-op thread beats two (no sync overhead, and the
2-core CI machine also runs Ray workers and stage subprocesses)."""
import os

# The same for the processes the tests start (stages under `dvc repro`, Ray's workers inherit it
# too): with both cores busy, a 2-thread OpenMP pool spins at its barriers waiting for a
# descheduled sibling. Measured on the 2-core Zen 5 VM, whole suite: 617 -> 522 CPU-s, 311 ->
# 275 s (docs/performance.md, "The test suite"). A Ray Train worker still sets its threads from
# the CPUs Ray assigns it (pipeline.ray_train), so the tests of that stay as they were.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402 - after the variable: OpenMP reads it once, at load

import pipeline  # noqa: F401 - Ray's environment settings (pipeline.cluster), before any test module imports Ray

torch.set_num_threads(1)

# The longest files first: under `pytest -n auto --dist loadfile` (make test) each goes to its
# own worker at the start, and the short files fill the other worker around them. Started
# late, the end-to-end file alone would decide the suite's wall time.
LONGEST_FIRST = ("test_pipeline_e2e.py", "test_reliability.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept
