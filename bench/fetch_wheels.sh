#!/usr/bin/env bash
# Download, on a machine with network, the wheels bench/gpu.sh installs on the GPU machine
# (which has torch, triton, transformers, safetensors and tokenizers but no network):
#   diffusers        the reference loop's UNet and VAE (bench/reference.py)
#   open-clip-torch  only for its CLIP BPE vocabulary file: minti finds the file without
#                    importing open_clip, so none of its heavy deps (timm, torchvision, ftfy)
#   huggingface_hub  diffusers 0.42 needs >= 1.32; gpu.sh installs it only if the machine's
#                    own copy is too old for `import diffusers` (transformers also uses it)
#   pillow           diffusers imports PIL at import time; installed only if missing. Binary,
#                    so one wheel per CPython the GPU machine might run (3.10 to 3.13).
# diffusers, open-clip-torch and huggingface_hub are pinned to the versions installed for PYTHON
# (the ones this checkout is tested with), when it has them.
#
#   bash bench/fetch_wheels.sh            # -> .whl/ in the repository root (never committed)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST"

pinned() {  # "name==version" of the locally installed distribution, else just "name"
    "$PYTHON" - "$1" <<'EOF'
import sys, importlib.metadata as md
try:
    print(f"{sys.argv[1]}=={md.version(sys.argv[1])}")
except md.PackageNotFoundError:
    print(sys.argv[1])
EOF
}

download() {  # download PYTHON_VERSION SPEC...
    local py=$1; shift
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$DEST" "$@"
}

download 3.12 "$(pinned diffusers)" "$(pinned open-clip-torch)" "$(pinned huggingface_hub)"
for py in 3.10 3.11 3.12 3.13; do  # any recent Pillow serves diffusers' import: not pinned
    download "$py" pillow || echo "no Pillow wheel for CPython $py (skipped)"
done
ls -l "$DEST"
du -sh "$DEST"
