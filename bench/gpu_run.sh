#!/usr/bin/env bash
# The GPU benchmark as run on the lent H100/H200 (no network there): install the carried pure-python wheels
# (.whl/), point the harness at the carried ComfyUI tree (.carry/ComfyUI), run the cases, keep the log.
# Usage: bash bench/gpu_run.sh OUT_DIR CASES [extra bench.run args]
#        bash bench/gpu_run.sh OUT_DIR tiers [extra bench.tiers args]   (the tier workflows)
set -uo pipefail
out=${1:?out dir}; cases=${2:-all}; shift 2 || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site SDXLOPT_COMFYUI="$PWD/.carry/ComfyUI" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "$cases" = tiers ]; then cmd=(python3 -m bench.tiers --out "$out/tiers.json" "$@")
else cmd=(python3 -m bench.run --cases "$cases" --out "$out/gpu.json" "$@"); fi
"${cmd[@]}" 2>&1 | grep -v -e "^WARNING:root" -e "it/s]" | tee "$out/log.txt"
