#!/usr/bin/env bash
# Every GPU benchmark in one go, under 8 minutes on one H100 (random weights at real sizes):
#   python -m minti doctor               versions, GPU limits, kernel paths, kernel self-test
#   bench/attention.py                   minti flash attention vs SDPA, SD 1.5/2.1/XL shapes
#   bench/memory.py  --memory auto, low  SD 1.5 512², SD 2.1 768² (and SDXL 1024² if time is left)
#   bench/step.py                        SD 1.5 512², SD 2.1 768²: ms/step vs the diffusers example
# Each run's output goes to NAME.log and its JSON to NAME.json in $OUT when set, else
# bench/results/. A run that fails or times out does not stop the others; the script exits
# non-zero at the end if any did.
#
#   bash bench/fetch_wheels.sh     # once, on a machine with network: .whl/ (diffusers, open-clip-torch)
#   bash bench/gpu.sh              # on the GPU machine, with .whl/ carried along
#
# Environment: PYTHON (python3), OUT, BENCH_BUDGET_S (450: no run starts or runs past it),
# BENCH_SMOKE=1 (memory/step at SD 1.5 128² only: checks the script itself, e.g. on a CPU),
# MINTI_COMMIT (printed when the copy has no .git).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
DEST=${OUT:-$ROOT/bench/results}
BUDGET=${BENCH_BUDGET_S:-450}
SMOKE=${BENCH_SMOKE:-0}
mkdir -p "$DEST"
failed=()

echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'none (no nvidia-smi)')"
commit=${MINTI_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if git rev-parse -q HEAD >/dev/null 2>&1 && ! git diff --quiet HEAD -- 2>/dev/null; then
    commit="$commit (+ uncommitted changes)"
fi
echo "commit: $commit"
echo "date:   $(date -u '+%Y-%m-%d %H:%M UTC')"

# minti from this checkout: the repository root on the path is enough (minti/__init__.py
# mounts kernels/ as minti.kernels itself).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

# Wheels the GPU machine lacks. The machine's own packages win: a wheel is installed only if
# its module is missing (found, not imported: open_clip is only needed for its vocabulary
# file, and importing it would need timm and torchvision). huggingface_hub only if diffusers
# cannot be imported with the machine's own (diffusers 0.42 needs hub >= 1.32).
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=${WHEEL_SITE:-/tmp/site}
    export PYTHONPATH="$SITE:$PYTHONPATH"
    for wheel in .whl/*.whl; do
        name=$(basename "$wheel"); name=${name%%-*}
        case $name in
            pillow) module=PIL ;;
            open_clip_torch) module=open_clip ;;
            huggingface_hub) continue ;;
            *) module=$name ;;
        esac
        has_module "$module" && continue
        # an incompatible wheel (Pillow for another CPython) is refused by pip: try the next
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheel" 2>/dev/null \
            && echo "installed $(basename "$wheel")"
    done
    if ! "$PY" -c "from diffusers import AutoencoderKL, UNet2DConditionModel" 2>/dev/null \
            && compgen -G ".whl/huggingface_hub-*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .whl/huggingface_hub-*.whl \
            && echo "installed $(basename .whl/huggingface_hub-*.whl) (the machine's was too old for diffusers)"
    fi
fi
"$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, available: {torch.cuda.is_available()})")
for name in ("triton", "transformers", "diffusers"):
    try:
        print(f"{name} {__import__(name).__version__}")
    except Exception as e:  # the run that needs it will fail and be counted
        print(f"{name}: NOT importable ({type(e).__name__}: {e})")
from minti.loading.tokenizer import openclip_vocab_path
import minti.kernels
import minti.models.backends
print(f"minti {__import__('minti').__version__}, CLIP vocabulary {openclip_vocab_path()}")
EOF
[ $? -eq 0 ] || failed+=("imports")

# run NAME LIMIT_S OPTIONAL CMD...: tee output to NAME.log, its last line to NAME.json if it is
# JSON. Never past the budget: an optional run (SDXL) that does not fit is skipped, a required
# one is cut short and counted as failed.
run() {
    local name=$1 limit=$2 optional=$3; shift 3
    local left=$((BUDGET - SECONDS))
    rm -f "$DEST/$name.json"  # never leave an older run's numbers under this run's name
    if [ "$left" -lt "$limit" ]; then
        if [ "$optional" = 1 ]; then
            echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left (needs ${limit}s)"
            return
        fi
        limit=$left
    fi
    if [ "$limit" -lt 10 ]; then
        echo "=== $name: FAILED, out of time (${left}s left)"
        failed+=("$name (out of time)")
        return
    fi
    echo "=== $name (timeout ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$DEST/$name.log"
    local rc=${PIPESTATUS[0]}
    local last
    last=$(tail -n 1 "$DEST/$name.log")
    if [ "${last:0:1}" = "{" ]; then
        printf '%s\n' "$last" >"$DEST/$name.json"
    fi
    echo "--- $name: exit $rc after $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))")
}

# doctor first: versions, the GPU and its limits, which path each op takes, and a self-test
# of every kernel against the torch path, so a run on a new GPU shows them before any number.
run doctor 90 0 "$PY" -m minti doctor

# memory.py/step.py print their JSON (--json) and are kept from writing their own files
# (memory.py names its file by model and resolution only: auto and low would overwrite).
BENCH=(env -u OUT "$PY")

if [ "$SMOKE" = 1 ]; then
    sizes=("sd15 128")
else
    sizes=("sd15 512" "sd21 768")
fi
# attention.py pays most of the Triton compiling and autotuning (28 kernel variants, from 7
# head-dim layouts x fwd, two dK/dV kinds and dQ, x up to 5 configs, more where lengths are not
# multiples of 16); the later runs find both in Triton's disk cache. It saves its
# JSON after every shape, so a cut-short run keeps what it timed.
run attention 200 0 env OUT="$DEST" "$PY" bench/attention.py
for size in "${sizes[@]}"; do
    set -- $size
    for mode in auto low; do
        run "memory-$1-$2-$mode" 120 0 "${BENCH[@]}" bench/memory.py --model "$1" --resolution "$2" --memory "$mode" --json
    done
    run "step-$1-$2" 150 0 "${BENCH[@]}" bench/step.py --model "$1" --resolution "$2" --json
done
if [ "$SMOKE" != 1 ]; then
    for mode in auto low; do
        run "memory-sdxl-1024-$mode" 150 1 "${BENCH[@]}" bench/memory.py --model sdxl --resolution 1024 --memory "$mode" --json
    done
fi

echo
echo "results in $DEST:"
ls -1 "$DEST"/*.json 2>/dev/null | sed 's/^/  /'
echo "total ${SECONDS}s"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all runs passed"
