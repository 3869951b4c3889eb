#!/usr/bin/env bash
# The GPU benchmark as one command: hf_dpo defaults vs TRL defaults vs a plain MiniMind-recipe loop on a
# Qwen2.5-0.5B-shaped random-init model, bf16, max_length 2048 (docs/performance.md, "GPU benchmark").
#
#   bash benchmarks/gpu.sh download     # here, with a registry: fetch the wheels the GPU machine lacks into .whl/
#   bash benchmarks/gpu.sh              # there, offline: install .whl/ if present, run, print one table
#   HF_DPO_BENCH_INSTALL=0 bash benchmarks/gpu.sh --size gpu_tiny --cpu --steps 1 --warmup 1 --repeats 1  # the tests' CPU dry run
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
exec "$PYTHON" "$ROOT/benchmarks/bench.py" --preset gpu "$@"
