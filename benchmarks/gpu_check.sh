#!/usr/bin/env bash
# The GPU check: one prepared command for a lent CUDA machine with no network (docs/benchmarks.md, "GPU check").
#
#   benchmarks/gpu_check.sh --fetch-wheels   # here, with PyPI: the packages the GPU image lacks, into .whl/
#   benchmarks/gpu_check.sh [OUT]            # there: CUDA tests, then the bf16 scaling sweep; results in OUT
#   benchmarks/gpu_check.sh --dry-run [OUT]  # anywhere: the same steps on the CPU at tiny sizes (a test runs it)
#
# Step 1 runs tests/test_cuda.py (every mixer on the GPU against the CPU, bf16 autocast, SDPA's flash backend, the
# optional mamba-ssm / causal-conv1d / flash-attn kernels where importable). Step 2 runs benchmarks/encoder_scaling.py
# under bf16 autocast at 4K, 16K and 64K tokens for every state-space kind against LED, full and block-local attention.
# Everything lands in OUT (default gpu_check_results/): environment.txt, cuda_tests.log, cuda_tests.xml and the
# sweep's CSV, markdown and PNG. Budget: about 8 minutes on one H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON_SET=${PYTHON:-}
PYTHON=${PYTHON:-python3}
WHEELS=.whl

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # The GPU image has torch, accelerate, huggingface_hub, tokenizers, safetensors, sentencepiece, pandas, pyarrow and
    # pytest (Python 3.12), but an older transformers and no datasets. The versions are this machine's (.venv), which
    # the test suite passed with. pyarrow stays out: its wheel alone (55 MB) would break the device tool's 64 MiB.
    versions=$(.venv/bin/python - <<'EOF'
import importlib.metadata as md
for name in ("transformers", "datasets", "dill", "multiprocess", "fsspec", "regex"):
    print(f"{name}=={md.version(name)}")
EOF
    ) || { echo "gpu_check: run 'make venv' first: the wheels take the versions installed in .venv" >&2; exit 1; }
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2086
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$WHEELS" $versions || exit 1
    du -sh "$WHEELS"
    echo "Carry $WHEELS with the working tree (the device tool's carry: [\"$WHEELS\"]), then run benchmarks/gpu_check.sh"
    exit 0
fi

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
    [[ -z "${PYTHON_SET:-}" && -x .venv/bin/python ]] && PYTHON=.venv/bin/python  # the project's own environment
fi
OUT=$(realpath -m "${1:-gpu_check_results}")
mkdir -p "$OUT"

if ((DRY_RUN)); then
    export SCROLLS_SSM_TEST_DEVICE=cpu
    SWEEP=(--device cpu --size tiny --lengths 256 --repeats 1 --timeout 120)
else
    if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        echo "gpu_check: no CUDA device is visible to torch; use --dry-run for the CPU rehearsal" >&2
        exit 1
    fi
    if [[ -d "$WHEELS" ]]; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$WHEELS"/*.whl || { echo "gpu_check: installing $WHEELS failed" >&2; exit 1; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    SWEEP=(--device cuda --size small --lengths 4096 16384 65536 --repeats 2 --timeout 60)
fi
# The project from this checkout, without installing it (the GPU machine cannot fetch its build requirements).
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

{
    date -u
    "$PYTHON" - <<'EOF'
import platform, pyarrow, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"pyarrow {pyarrow.__version__}")
print("cuda:", torch.cuda.is_available() and torch.cuda.get_device_name(0))
for name in ("mamba_ssm", "causal_conv1d", "flash_attn"):
    try:
        module = __import__(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as error:  # noqa: BLE001 - any failure means the PyTorch path serves the op
        print(f"{name}: not importable ({type(error).__name__}: {error})")
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} 2>&1 | tee "$OUT/environment.txt"
"$PYTHON" -c "import scrolls_ssm" || { echo "gpu_check: the project does not import here (see above)" >&2; exit 1; }

echo "== 1/2 CUDA tests"
timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" -m cuda tests/test_cuda.py \
    --junitxml "$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log"
tests_status=${PIPESTATUS[0]}

echo "== 2/2 scaling sweep (${SWEEP[*]})"
timeout 420 "$PYTHON" benchmarks/encoder_scaling.py "${SWEEP[@]}" --out "$OUT" \
    --kinds s4d mamba2 mamba gss-hybrid ffn-only led attention local-attention 2>&1 | tee "$OUT/sweep.log"
sweep_status=${PIPESTATUS[0]}

echo "gpu_check: tests exit $tests_status, sweep exit $sweep_status; results in $OUT"
exit $((tests_status || sweep_status))
