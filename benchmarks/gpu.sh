#!/usr/bin/env bash
# The GPU benchmark as one command: hf_dpo defaults vs TRL defaults vs a plain MiniMind-recipe loop on a
# Qwen2.5-0.5B-shaped random-init model, then hf_dpo vs TRL on the real model's architecture (SmolLM2-135M's
# config, random init), bf16, max_length 2048 (docs/performance.md, "GPU benchmark").
#
#   bash benchmarks/gpu.sh download     # here, with a registry: fetch the wheels the GPU machine lacks into .whl/
#   bash benchmarks/gpu.sh              # there, offline: install .whl/ if present, run the checks, then the benchmark
#   HF_DPO_BENCH_INSTALL=0 bash benchmarks/gpu.sh --size gpu_tiny --cpu --steps 1 --warmup 1 --repeats 1 --same-process  # the tests' CPU dry run
#
# Any arguments other than `download` go to `bench.py --preset gpu` and override the preset.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/.whl"
PYTHON="${PYTHON:-python3}"

# What the GPU image lacks (TRL and the `datasets` it needs) and the versions the CPU suite was measured with
# (transformers; regex because transformers checks its version at import). torch, accelerate, tokenizers,
# huggingface_hub, pyarrow and pandas are taken from the image (/work/.library/device/KINDS.md lists them):
# torch's CUDA wheels alone are several times the 64 MiB a run may carry.
PINS=(trl==1.16.0 datasets==5.2.0 transformers==5.24.0 dill==0.4.1 multiprocess==0.70.19 regex==2026.5.9)

if [[ "${1:-}" == "download" ]]; then
    mkdir -p "$WHEELS"
    # The GPU machine's python is CPython 3.12 on x86-64; pip matches manylinux tags exactly, hence the list.
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "${PINS[@]}"
    du -sh "$WHEELS"
    exit 0
fi

# HF_DPO_BENCH_INSTALL=0 skips the install: the test suite's dry run uses this machine's own packages (the wheels
# are for the GPU image's CPython 3.12).
if [[ "${HF_DPO_BENCH_INSTALL:-1}" != 0 ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    # Offline: no index, no dependency resolution (each needed wheel is in PINS), into a private target.
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hf_dpo_site \
        "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/hf_dpo_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Fail in seconds, naming the missing piece, rather than minutes into the run.
"$PYTHON" -c "import torch, transformers, trl, datasets, hf_dpo; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| trl', trl.__version__, '| datasets', datasets.__version__, '| cuda', torch.cuda.is_available())" \
    || { echo "gpu.sh: a package is missing; run 'bash benchmarks/gpu.sh download' where pip works and carry .whl" >&2; exit 1; }

# First the numerical checks (benchmarks/gpu_checks.py, well under a minute on a GPU): the table below is only
# worth reading if the fast paths give the plain path's numbers on this device. A failed check does not stop
# the benchmark (a lent device is used once), but the command exits non-zero. `--cpu` in the arguments (the
# tests' dry run) runs them at their tiny size on the CPU; HF_DPO_BENCH_CHECKS=0 skips them.
CHECKS=(--size gpu)
JSON=""
previous=""
for arg in "$@"; do
    [[ "$arg" == "--cpu" ]] && CHECKS=(--size tiny --device cpu)
    [[ "$previous" == "--json" ]] && JSON="$arg"
    previous="$arg"
done
[[ -n "$JSON" ]] && CHECKS+=(--json "${JSON%.json}_checks.json")
checks_status=0
if [[ "${HF_DPO_BENCH_CHECKS:-1}" != 0 ]]; then
    "$PYTHON" "$ROOT/benchmarks/gpu_checks.py" "${CHECKS[@]}" || checks_status=$?
fi
# The preset's 420 s launch deadline keeps the benchmark within 8 minutes; the checks' time comes off it (an
# explicit --deadline in the arguments still wins: argparse keeps the last one).
"$PYTHON" "$ROOT/benchmarks/bench.py" --preset gpu --deadline "$(( SECONDS < 419 ? 420 - SECONDS : 1 ))" "$@"
if [[ "$checks_status" != 0 ]]; then
    echo "gpu.sh: some GPU checks failed (table above the benchmark's)" >&2
    exit "$checks_status"
fi
