#!/usr/bin/env bash
# Every check that needs a CUDA device, in one go, most important first; each writes its own file
# under OUT (default gpu_out/), so that what finished is kept if the time runs out:
#   versions.txt        the GPU, Python, torch, CUDA, transformers
#   tests.txt           the CUDA tests (no sync inside an update or an evaluation forward; GPU = CPU)
#   train.txt           per update of 32 stories, fp32 and bf16, against transformers; evaluation
#   run_bf16.txt        the whole ROCStories-shaped fine-tune in bf16, with its phase times
#   run_fp32.txt        the same in fp32
#   run_bf16_compile.txt  the same with --compile (bucketed lengths, CUDA graphs)
# Usage: bench/gpu_checks.sh [OUT]  (after bench/offline_wheels.sh's wheels are installed, if needed)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name())"
    "$py" -c "import transformers; print('transformers', transformers.__version__)"
} > "$out/versions.txt" 2>&1
"$py" -m pytest -q -p no:cacheprovider tests/test_train.py -k cuda > "$out/tests.txt" 2>&1
"$py" bench/benchmark.py --device cuda --only train --repeats 10 > "$out/train.txt" 2>&1
"$py" bench/benchmark.py --device cuda --only run --run_args "--amp bf16" > "$out/run_bf16.txt" 2>&1
"$py" bench/benchmark.py --device cuda --only run > "$out/run_fp32.txt" 2>&1
"$py" bench/benchmark.py --device cuda --only run --run_args "--amp bf16 --compile" > "$out/run_bf16_compile.txt" 2>&1
tail -n 3 "$out"/*.txt
