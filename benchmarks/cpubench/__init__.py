"""The CPU benchmark harness behind `benchmarks/run_all.py` (issue 7).

One module per benchmark; each exposes `run(ctx) -> list[Figure]` and times the project's
own code (msdm, pipeline), never a copy of it. See docs/performance.md for how to read them.
"""
