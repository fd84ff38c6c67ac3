#!/usr/bin/env bash
# The GPU half of a release check, in one run (CI has no GPU): the CUDA tests, the
# step-time benchmark and `singd overhead` on the GPU, then the whole suite there.
# Reports and logs go to ${OUT:-cuda-check}/. Run from the repository root on a machine
# with PyTorch and one CUDA GPU; installs nothing from the network.
set -uo pipefail
out=${OUT:-cuda-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD"
nvidia-smi -L
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 ||
    echo "(singd not installed: tests of the singd command will fail)"

echo "== CUDA tests"
# the device-parametrized tests' CUDA variants (the `device` fixture of tests/conftest.py)
timeout 150 python3 -m pytest -q -p no:cacheprovider -k cuda tests/structures/test_contract.py \
    tests/test_oracle.py tests/test_amp.py tests/test_contracts.py tests/test_guard.py \
    2>&1 | tee "$out/cuda_tests.log" | tail -n 25
echo "== step time on the GPU"
timeout 200 python3 benchmarks/step_time.py --device cuda --repeats 3 --no-progress \
    --out "$out/step_time_cuda.md" >/dev/null 2>"$out/step_time_cuda.err"
tail -n 5 "$out/step_time_cuda.err"
echo "== singd overhead on the GPU"
timeout 90 python3 -m singd.cli overhead --device cuda --no-progress \
    2>&1 | tee "$out/overhead_cuda.md" | tail -n 30
echo "== whole suite"
timeout 200 python3 -m pytest -q -p no:cacheprovider -n 16 2>&1 | tee "$out/suite.log" | tail -n 15
