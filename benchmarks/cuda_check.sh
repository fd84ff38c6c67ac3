#!/usr/bin/env bash
# The GPU half of a release check, in one run (CI has no GPU): the CUDA tests (compiled
# step in CUDA graphs included), the step-time benchmarks (issue 12's VGG table and the
# sizes users train), `singd overhead`, the published package on the same GPU, then the
# whole suite there. Reports and logs go to ${OUT:-cuda-check}/. Run from the repository
# root on a machine with PyTorch and one CUDA GPU; installs nothing from the network.
# For the comparison with the published package, bring its wheel (it needs nothing but
# torch): `pip download singd==0.0.5 --no-deps -d .published` here, then carry
# `.published` (git-ignored) to the GPU machine.
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
echo "== compiled step (Inductor, CUDA graphs)"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_compile.py -k cuda \
    2>&1 | tee "$out/compile_cuda.log" | tail -n 5
echo "== step time on the GPU"
timeout 200 python3 benchmarks/step_time.py --device cuda --repeats 3 --no-progress \
    --out "$out/step_time_cuda.md" >/dev/null 2>"$out/step_time_cuda.err"
tail -n 5 "$out/step_time_cuda.err"
echo "== sizes users train: resnet18 at 224², GPT-2-124M shape at 512 tokens (bf16)"
timeout 420 python3 benchmarks/large_models.py --device cuda --repeats 3 --no-progress \
    --out "$out/large_models_cuda.md" 2>"$out/large_models_cuda.err" | tail -n 40
echo "== the published package on the same GPU (step times)"
wheel=$(ls .published/singd-*.whl 2>/dev/null | head -n 1)
if [ -n "$wheel" ]; then
    python3 -m venv --system-site-packages /tmp/published &&
        /tmp/published/bin/pip install -q --no-deps --no-index "$wheel" &&
        timeout 420 python3 benchmarks/vs_published.py --published-python /tmp/published/bin/python \
            --what times --device cuda --rounds 3 --out "$out/vs_published_cuda.md" \
            2>"$out/vs_published_cuda.err" | tail -n 40
else
    echo "(no .published/singd-*.whl: skipped)"
fi
echo "== singd overhead on the GPU"
timeout 90 python3 -m singd.cli overhead --device cuda --no-progress \
    2>&1 | tee "$out/overhead_cuda.md" | tail -n 30
echo "== whole suite"
timeout 200 python3 -m pytest -q -p no:cacheprovider -n 16 2>&1 | tee "$out/suite.log" | tail -n 15
