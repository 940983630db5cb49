#!/usr/bin/env bash
# The GPU check of issue 10 on a machine with torch, transformers and peft but no diffusers and no internet.
#
#   bash bench/gpu_check.sh download [PYTHON_VERSION ...]   # here, with internet: wheels into .whl/ (git-ignored)
#   bash bench/gpu_check.sh run [gpu_check.py options ...]  # there: install what is missing from .whl/, run the check
#
# download: diffusers 0.31.0 (pure Python), huggingface_hub 0.36.2 (only installed where the machine's is older than
# diffusers needs) and Pillow 10.4.0 for each Python version asked (default 3.10 3.11 3.12 3.13; the trainer reads
# images with it, and torch/transformers do not need it), manylinux2014 x86_64 wheels, no dependencies: the other
# dependencies of diffusers (numpy, safetensors, regex, requests, filelock) are transformers' too. matplotlib (the
# loss plot) is not carried: gpu_check.py skips the plot where it is missing.
#
# run: pip install --no-index --no-deps --target /tmp/site of the carried packages this Python lacks, then
# PYTHONPATH=/tmp/site python bench/gpu_check.py, writing $OUT/gpu_check.json. With the run tool:
#   carry [".whl"], command `bash bench/gpu_check.sh run`
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/.whl"
PYTHON="${PYTHON:-python3}"
SITE="${GPU_CHECK_SITE:-/tmp/site}"

download() {
    local versions=("$@")
    [ ${#versions[@]} -gt 0 ] || versions=(3.10 3.11 3.12 3.13)
    rm -rf "$WHEELS"
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary :all: -d "$WHEELS" \
        diffusers==0.31.0 huggingface_hub==0.36.2
    for version in "${versions[@]}"; do
        "$PYTHON" -m pip download --quiet --no-deps --only-binary :all: --python-version "$version" \
            --platform manylinux2014_x86_64 -d "$WHEELS" Pillow==10.4.0
    done
    ls -l "$WHEELS"
    du -sh "$WHEELS"
}

run() {
    [ -d "$WHEELS" ] || { echo "no $WHEELS: run 'bash bench/gpu_check.sh download' first and carry .whl" >&2; exit 2; }
    "$PYTHON" --version
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    # what this Python lacks: a package not installed at all, or huggingface_hub older than diffusers 0.31 needs
    local missing
    missing="$("$PYTHON" - <<'EOF'
import importlib.metadata as md

def version_tuple(text):
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())

import os
needed = []
for name, minimum in (("diffusers", "0.31.0"), ("huggingface_hub", "0.23.2"), ("Pillow", None)):
    try:
        if os.environ.get("GPU_CHECK_FORCE_INSTALL"):  # to try the install path on a machine that has them
            raise md.PackageNotFoundError(name)
        have = md.version(name)
    except md.PackageNotFoundError:
        needed.append(name)
        continue
    if minimum and version_tuple(have) < version_tuple(minimum):
        needed.append(name)
print(" ".join(needed))
EOF
)"
    echo "installing from .whl: ${missing:-nothing}"
    if [ -n "$missing" ]; then
        mkdir -p "$SITE"
        if "$PYTHON" -m pip --version >/dev/null 2>&1; then
            # shellcheck disable=SC2086  # one word per package
            "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" --target "$SITE" $missing
        else  # no pip: a wheel is a zip of the files to put on the path
            "$PYTHON" - "$WHEELS" "$SITE" $missing <<'EOF'
import sys, zipfile
from pathlib import Path
wheels, site, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
for name in names:
    prefix = name.lower().replace("-", "_")
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(prefix + "-")
             and ("-py3-none-any" in w.name or f"-{tag}-" in w.name)]
    if not found:
        raise SystemExit(f"no wheel of {name} for {tag} in {wheels}")
    zipfile.ZipFile(found[0]).extractall(site)
    print("extracted", found[0].name)
EOF
        fi
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1
    cd "$ROOT"
    "$PYTHON" bench/gpu_check.py "$@"
}

command="${1:-}"
shift || true
case "$command" in
    download) download "$@" ;;
    run) run "$@" ;;
    *) echo "usage: bash bench/gpu_check.sh download [PYTHON_VERSION ...] | run [gpu_check.py options]" >&2
       exit 2 ;;
esac
