#!/usr/bin/env bash
# GPU check for one H100/H200 (about 6 minutes): vit-b/2 bf16 throughput and MFU, a Ray
# Train fit with use_gpu: true, a 2-trial Tune sweep whose trials are Ray Train runs with
# sweep.use_gpu: true (200 steps each), a short FID evaluation on the GPU.
#
# On a machine without this project's packages (the lent GPU machine has torch but not Ray),
# put Python 3.12 wheels of ray, torch-fidelity and their missing dependencies in .whl/
# (see README "Performance"); they are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-results/bench}"
mkdir -p "$out_dir"
if [ -d .whl ] && ! python3 -c "import ray, torch_fidelity" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu_check.py --out "$out_dir/gpu_check.json"
