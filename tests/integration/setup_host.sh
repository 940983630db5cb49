#!/usr/bin/env bash
# Sets up the real AUTOMATIC1111 WebUI v1.10.1 for the integration tier, offline, on CPU.
#
#   tests/integration/setup_host.sh DEST [--webui EXISTING_CHECKOUT]
#
# DEST/webui and DEST/CLIP come from the tarballs in ../shared/webui-host (or DREAMARTIST_HOST_SOURCES), unless
# --webui names a checkout to use instead. DEST/venv gets the host's own pins (torch 2.1.2 + torchvision 0.16.2,
# requirements_versions.txt, CLIP built without isolation), then this extension's install.py run through the host
# exactly as the host runs it, then the test requirements; `pip check` must be clean. The same venv serves the host
# and pytest. DEST/hf is an offline Hugging Face cache with the CLIP-L tokenizer.
#
# Idempotent: a stamp of every input (tarballs, pins, install.py, this script) skips the installs when nothing
# changed, so a second run takes seconds. The last three lines printed are the environment to use:
#   export SD_WEBUI_DIR=...  export SD_WEBUI_PYTHON=...  export HF_HOME=...
set -euo pipefail

usage() { echo "usage: $0 DEST [--webui EXISTING_CHECKOUT]" >&2; exit 2; }
[ $# -ge 1 ] || usage
DEST=$(realpath -m "$1"); shift
WEBUI=""
while [ $# -gt 0 ]; do
    case "$1" in
        --webui) [ $# -ge 2 ] || usage; WEBUI=$(realpath -m "$2"); shift 2 ;;
        *) usage ;;
    esac
done

REPO=$(cd "$(dirname "$0")/../.." && pwd)
SOURCES=${DREAMARTIST_HOST_SOURCES:-$REPO/../shared/webui-host}
TOKENIZER=${CLIP_TOKENIZER_DIR:-$REPO/../shared/webui/clip-vit-large-patch14}
WEBUI_TAR="$SOURCES/stable-diffusion-webui-v1.10.1.tar.gz"
CLIP_TAR="$SOURCES/openai-clip-d50d76da.tar.gz"
VENV="$DEST/venv"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

say() { echo "[setup_host] $*" >&2; }
die() { echo "[setup_host] error: $*" >&2; exit 1; }
phase_started=$(date +%s)
phase() { local now; now=$(date +%s); say "$1 ($(( now - phase_started )) s)"; phase_started=$now; }

# gradio 3.41 answers 403 for any /file= path with a part starting with "." (the host's own script.js included)
case "$DEST/" in */.*) die "DEST must not lie in a hidden folder (gradio refuses to serve files from $DEST)" ;; esac
if [ -n "$WEBUI" ]; then
    case "$WEBUI/" in */.*) die "--webui must not lie in a hidden folder (gradio refuses to serve files from it)" ;; esac
fi
mkdir -p "$DEST"

# 1. sources: unpack into a temporary folder and rename, so an interrupted unpack never looks finished
unpack() {  # tarball, folder it unpacks to, final path
    local tarball=$1 inner=$2 final=$3 scratch
    [ -f "$final/.unpacked" ] && return 0
    [ -f "$tarball" ] || die "$tarball is missing (set DREAMARTIST_HOST_SOURCES to the folder with the host tarballs)"
    scratch=$(mktemp -d "$DEST/.unpack.XXXXXX")
    tar xzf "$tarball" -C "$scratch"
    [ -d "$scratch/$inner" ] || die "$tarball does not unpack to $inner/"
    touch "$scratch/$inner/.unpacked"
    rm -rf "$final"
    mv "$scratch/$inner" "$final"
    rm -rf "$scratch"
}
if [ -z "$WEBUI" ]; then
    WEBUI="$DEST/webui"
    unpack "$WEBUI_TAR" webui "$WEBUI"
fi
[ -f "$WEBUI/launch.py" ] && [ -d "$WEBUI/repositories/stable-diffusion-stability-ai" ] \
    || die "$WEBUI is not a webui checkout with repositories/"
unpack "$CLIP_TAR" CLIP "$DEST/CLIP"
phase "sources ready in $WEBUI"

# 2. the venv, skipped when the stamp of its inputs is unchanged
stamp=$( { cat "$0" "$WEBUI/requirements_versions.txt" "$REPO/install.py" "$REPO/requirements.txt" \
           "$REPO/requirements-test.txt"; cat "$WEBUI_TAR" "$CLIP_TAR" 2>/dev/null || true; } | sha256sum | cut -c1-16)
if [ -x "$PY" ] && [ "$(cat "$VENV/.dreamartist-stamp" 2>/dev/null)" = "$stamp" ]; then
    phase "venv up to date ($VENV)"
else
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install --quiet torch==2.1.2 torchvision==0.16.2
    "$PY" -m pip install --quiet -r "$WEBUI/requirements_versions.txt"
    "$PY" -m pip install --quiet wheel
    "$PY" -m pip install --quiet --no-build-isolation "$DEST/CLIP"
    phase "host requirements installed"

    # this extension's installer, the way the host's launch_utils runs it for each extension at start
    (cd "$WEBUI" && "$PY" -c "import sys, launch; launch.run_extension_installer(sys.argv[1])" "$REPO") >&2
    "$PY" -c "import peft, lpips" || die "install.py left peft or lpips missing"
    second=$(cd "$WEBUI" && "$PY" -c "import sys, launch; launch.run_extension_installer(sys.argv[1])" "$REPO" 2>&1)
    [ -z "$second" ] || die "install.py is not quiet on a second start: $second"
    "$PY" -m pip check >&2 || die "pip check fails after install.py"
    phase "install.py ran through the host (a second start printed nothing)"

    "$PY" -m pip install --quiet -r "$REPO/requirements-test.txt"
    echo "$stamp" > "$VENV/.dreamartist-stamp"
    phase "test requirements installed"
fi
"$PY" -m pip check >&2 || die "pip check fails in $VENV"

# 3. the CLIP-L tokenizer as an offline Hugging Face hub cache
[ -f "$TOKENIZER/vocab.json" ] || die "no CLIP tokenizer files in $TOKENIZER (set CLIP_TOKENIZER_DIR)"
"$PY" "$REPO/tests/integration/webui_host.py" "$TOKENIZER" "$DEST/hf"
phase "pip check clean; tokenizer cache in $DEST/hf"

echo "export SD_WEBUI_DIR=$WEBUI"
echo "export SD_WEBUI_PYTHON=$PY"
echo "export HF_HOME=$DEST/hf"
