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

# >>> store: iproute2 (ip netns, tc) for simulated multi-host links; owned by src/scalai/store
# Without it (or without root), simulated hosts fall back to the stores' own rate limiter.
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  if ! command -v ip >/dev/null 2>&1 || ! command -v tc >/dev/null 2>&1; then
    echo "setup: installing system packages (iproute2)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq >/dev/null && apt-get install -y -qq iproute2 >/dev/null; } \
      || echo "setup: could not install iproute2; simulated hosts will use the transport rate limiter"
  fi
fi
# <<< store

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
