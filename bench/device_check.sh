#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (driver + nvcc): install, then run the CUDA parity checks against
# transformers eager and the CUDA benchmark (bench/device_check.py). Exit 1 if any parity case fails.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader
python3 -c "import ernie_compile, transformers" 2>/dev/null || python3 -m pip install -q -e ".[test]"
python3 bench/device_check.py "$@"
