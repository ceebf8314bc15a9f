#!/usr/bin/env bash
# One install procedure for every place the project runs: `make` (laptop, CI) and the Dockerfile.
#   scripts/install.sh [VENV_DIR]
# Creates VENV_DIR (default .venv), installs the locked dependency set with uv, then the project itself.
# Environment:
#   JOINTDISTILL_INSTALL=editable (default: a checkout you work in) | package (a copy for an image)
#   JOINTDISTILL_ORT_GPU=1.31.1   replace onnxruntime by onnxruntime-gpu of that version (the CUDA image)
#   UV_COMPILE_BYTECODE=0         skip compiling the dependencies' bytecode (default: compiled)
# Skips everything when VENV_DIR was built from the same lock and pyproject (a stamp file holds their hash),
# so a repeated `make test` costs nothing and CI only reinstalls when the lock changes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$here/.venv}"
python="${PYTHON:-python3}"
uv_version="0.13.9"
lock="$here/requirements.lock"
stamp="$venv/.jointdistill-install"

mode="${JOINTDISTILL_INSTALL:-editable}"
ort_gpu="${JOINTDISTILL_ORT_GPU:-}"
case "$mode" in editable|package) ;; *) echo "install: JOINTDISTILL_INSTALL=$mode: expected editable or package" >&2; exit 2;; esac

want="$( (cat "$lock" "$here/pyproject.toml"; echo "$mode $ort_gpu") | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/jointdistill" ]]; then
    echo "install: $venv is up to date with requirements.lock"
    exit 0
fi

echo "install: building $venv from requirements.lock"
rm -f "$stamp"
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$uv_version"
# --exact removes packages that are no longer in the lock, so the venv equals the lock.
# Bytecode is compiled at install (uv's UV_COMPILE_BYTECODE, on unless set to 0): where PYTHONDONTWRITEBYTECODE is
# set (CI, containers), every process would otherwise compile torch, kfp and dvc from source at each start, and
# the tests start hundreds.
UV_COMPILE_BYTECODE="${UV_COMPILE_BYTECODE:-1}" "$venv/bin/uv" pip sync --quiet --python "$venv/bin/python" "$lock"
if [[ "$mode" == editable ]]; then
    "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --no-deps -e "$here"
else
    "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --no-deps --no-cache "$here"
fi
if [[ -n "$ort_gpu" ]]; then
    # Both wheels provide the `onnxruntime` module: the GPU build must replace the CPU one, not sit beside it.
    "$venv/bin/uv" pip uninstall --quiet --python "$venv/bin/python" onnxruntime
    "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --no-deps "onnxruntime-gpu==$ort_gpu"
fi
# Reinstall uv: pip sync removed it (it is a bootstrap tool, not a locked dependency).
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$uv_version"
echo "$want" > "$stamp"
echo "install: done"
