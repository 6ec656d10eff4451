#!/usr/bin/env bash
# Set up scalai on a fresh machine: system packages (as root), a virtual environment in
# .venv, the CPU build of torch, then scalai itself with its test and FUSE extras.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="${SCALAI_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  # FUSE: fusermount3 and libfuse3.so.3 (the binding, mfusepy, is ctypes: nothing to compile).
  if ! command -v fusermount3 >/dev/null 2>&1 || ! dpkg -s libfuse3-3 >/dev/null 2>&1; then
    echo "setup: installing system packages (fuse3)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq fuse3 >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
# torch first, pinned to the CPU wheel this machine holds; a bare 'torch' requirement
# would otherwise pull a multi-GB CUDA build.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==${TORCH_VERSION}"
  "$VPY" -m pip install -q "torch==${TORCH_VERSION}"
fi
echo "setup: installing scalai"
extras="dev"
if [ -e /dev/fuse ] && command -v fusermount3 >/dev/null 2>&1; then extras="dev,fuse"; fi
"$VPY" -m pip install -q -e ".[${extras}]"
echo "setup: done (.venv/bin/scalai)"
