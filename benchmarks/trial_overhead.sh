#!/usr/bin/env bash
# What a sweep trial costs beyond its training: a 2-trial Tune sweep of 4-step Ray Train runs
# (benchmarks/gpu_check.py bench_sweep, CPU), with Ray Train's per-run preemption watcher and
# metrics on ("default") and off ("lean"). Interleaved, ROUNDS rounds (default 2): absolute
# times on these VMs move by about 30%. On the 2-core Zen 4 VM (2026-12-03, 5 rounds) the sweep
# took 26.9 s on average by default and 26.6 s lean: no difference above the noise, so the
# pipeline keeps Ray's defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
for round in $(seq "${ROUNDS:-2}"); do
  for cfg in default lean; do
    flag=1; [ "$cfg" = lean ] && flag=0
    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=$flag RAY_TRAIN_METRICS_ENABLED=$flag .venv/bin/python -c "
import sys; sys.path.insert(0, 'benchmarks')
from gpu_check import bench_sweep
r = bench_sweep(False, 4)
print('round $round $cfg: sweep', round(r['seconds'], 1), 's; trials', [t['seconds'] for t in r.get('trials', [])], 's; error', r['error'])
" 2>/dev/null | grep '^round'
  done
done
