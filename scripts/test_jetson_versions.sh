#!/usr/bin/env bash
# The Jetson's Python, here: every test that needs no ROS (core, backends on the CPU, eval, CLI, token
# equality with transformers' generate) on Python 3.10 with the oldest versions scripts/requirements-jetson.txt
# allows, and torch at JetPack 6.1/6.2's version. First, that requirements-jetson.txt resolves for
# Python 3.10 / aarch64 without replacing JetPack's torch, TensorRT, CUDA or OpenCV.
#   bash scripts/test_jetson_versions.sh [PYTEST ARGS...]        (environment: ./.venv-py310)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv-py310"
# What JetPack 6.1/6.2 brings that the Jetson file leaves alone, at the nearest versions PyPI has for x86_64:
# torch 2.5.1 for NVIDIA's 2.5.0a0 (PyPI's build carries CUDA libraries; it runs on the CPU here),
# OpenCV 4.5 as Ubuntu 22.04's python3-opencv (JetPack's is 4.8), onnxruntime 1.20 as NVIDIA's Jetson builds.
JETPACK_PINS=(torch==2.5.1 opencv-python-headless==4.5.5.64 onnxruntime==1.20.1)

PY310=""
for cand in "$(command -v python3.10 || true)" "$HOME"/.pyenv/versions/3.10.*/bin/python3.10 \
            /root/.pyenv/versions/3.10.*/bin/python3.10; do
  if [ -n "$cand" ] && [ -x "$cand" ] && "$cand" --version >/dev/null 2>&1; then PY310="$cand"; break; fi
done
[ -n "$PY310" ] || { echo "test_jetson_versions.sh: Python 3.10 not found (JetPack 6's Python; install python3.10)" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || "$PY310" -m venv "$VENV"
"$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 10), sys.version'
quiet() { grep -v "^WARNING: Location" || true; }
"$VENV/bin/pip" install --disable-pip-version-check -q -U pip 2>&1 | quiet

echo "== requirements-jetson.txt for JetPack 6 (Python 3.10, aarch64)"
"$VENV/bin/python" scripts/jetson_requirements.py check

echo "== the oldest versions it allows, on Python 3.10"
"$VENV/bin/python" scripts/jetson_requirements.py oldest > "$VENV/oldest.txt"
"$VENV/bin/pip" install --disable-pip-version-check -q -r "$VENV/oldest.txt" "${JETPACK_PINS[@]}" \
  pytest pytest-timeout hypothesis 2>&1 | quiet
"$VENV/bin/python" - <<'PY'
import cv2, numpy, onnx, onnxruntime, sys, torch, transformers
print("Python", sys.version.split()[0], "numpy", numpy.__version__, "torch", torch.__version__, "transformers",
      transformers.__version__, "OpenCV", cv2.__version__, "onnx", onnx.__version__, "onnxruntime", onnxruntime.__version__)
assert numpy.__version__.startswith("1."), "numpy 2 in the Python 3.10 environment"
PY

echo "== tests that need no ROS"
export KOSMOS2_TESTS_WITHOUT_ROS=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
