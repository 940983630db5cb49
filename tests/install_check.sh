#!/usr/bin/env bash
# The pyproject install path as a user takes it: a fresh venv with the host's torch, then
# `pip install -e ".[standalone]"`, then the installed `dreamartist` command from another folder.
# Proves that the declared dependency ranges resolve to versions that work together (issue 9: they resolved
# transformers 5.x, which needs torch >= 2.6). Usage: tests/install_check.sh [work folder] (default: a temp folder).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -ge 1 ]; then
    work="$1"
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT  # a venv of ~5 GB: not kept when it was ours
fi
mkdir -p "$work/elsewhere"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet torch==2.1.2 torchvision==0.16.2 2>&1 | { grep -v "is ignored" || true; }
"$work/venv/bin/python" -m pip install --quiet -e "$repo[standalone]" 2>&1 | { grep -v "is ignored" || true; }
"$work/venv/bin/python" -m pip check
"$work/venv/bin/python" -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|diffusers|huggingface.hub|numpy|matplotlib) "
cd "$work/elsewhere"  # not the repository: the package must come from the install, not the working folder
"$work/venv/bin/dreamartist" train --demo --out "$work/demo" --steps 2 --save-every 0 --preview-every 0
"$work/venv/bin/dreamartist" generate --demo --concepts "$work/demo" --out "$work/generated" --steps 2
"$work/venv/bin/python" -m dreamartist_ext --version
test -f "$work/demo/embeddings/dreamdemo.safetensors" && test -f "$work/generated/000000-0.png"
echo "install check passed in $work"
