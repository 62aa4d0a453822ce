#!/usr/bin/env bash
# Clinical configs on a GPU: wall time, peak memory and throughput per phase, beside the
# memory estimate (bench/gpu_scale.py). Writes bench/results/gpu_scale_<date>.json; without a
# CUDA GPU it says so and exits 2. Run from the repository root after ./run setup.
set -euo pipefail
cd "$(dirname "$0")"
exec ../.venv/bin/python gpu_scale.py --results "results/gpu_scale_$(date +%F).json" "$@"
