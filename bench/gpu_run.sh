#!/usr/bin/env bash
# One call of the device tool on a lent GPU: build jmp_ext with CUDA, run the `cuda` tests, then
# bench/gpu_suite.py. Everything it measures comes back under $OUT (build log, test log, JSON).
#
# Prepare here first (the GPU image has torch, pybind11, scikit-build-core, cmake, ninja,
# pytest and pytest-benchmark, but not ase, lmdb or vesin, and nothing can be downloaded there):
#   pip download ase vesin lmdb --no-deps -d .gpu_wheels --python-version 3.12 \
#       --only-binary=:all: --platform manylinux2014_x86_64
# then call the device tool's run with
#   command="bash bench/gpu_run.sh", carry=[".gpu_wheels"], timeout_s=590
# The tests get at most 3 minutes, the suite what is left of 9.5; the suite writes its JSON
# after every section (and prints each model figure), so a cut run keeps what it measured.
set -uo pipefail
out=${OUT:-/tmp/jmp_ext_gpu}
mkdir -p "$out"
python3 -m pip install --quiet --no-deps --target /tmp/jmp_ext_pylib .gpu_wheels/*.whl
export PYTHONPATH=/tmp/jmp_ext_pylib:$PWD/python PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"

# Hopper only, to keep the build short.
if ! { cmake -S . -B build/gpu -G Ninja -DJMP_EXT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
         -DCMAKE_BUILD_TYPE=Release -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" &&
       cmake --build build/gpu -j "$(nproc)"; } >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  exit 1
fi
# The build and the self-check (radius graph vs ASE, the model on the GPU vs the CPU): ~10 s.
CUDA_LAUNCH_BLOCKING=1 timeout 60 python3 -m jmp_ext 2>&1 | tee "$out/self_check.log"

# Synchronous launches for the tests: a kernel's fault is reported by the op that launched it
# (the interaction indices, basis and radius graph fill check launches only, not execution).
CUDA_LAUNCH_BLOCKING=1 timeout 180 python3 -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 |
  tee "$out/cuda_tests.log" | tail -25
timeout $((570 - SECONDS)) python3 bench/gpu_suite.py --device cuda --compile --out "$out/gpu.json" 2>&1 | tee "$out/suite.log" | tail -60
