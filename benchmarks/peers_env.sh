#!/usr/bin/env bash
# Make (once) and cache a virtualenv with llm-compressor (and auto-round), outside the repo;
# print its python.
#   benchmarks/peers_env.sh            -> prints e.g. ~/.cache/effml/peers-venv/bin/python
# llmcompressor 0.14 pins transformers (<=5.17-ish) and compressed-tensors 0.19, which clash with
# effml's own environment (transformers 5.24, compressed-tensors 0.20), hence its own venv.
# torch is installed first, pinned to the CPU wheel that lies on local disk, so that pip does
# not pull a CUDA build.
set -euo pipefail
LLMCOMPRESSOR_VERSION=${LLMCOMPRESSOR_VERSION:-0.14.0.1}
AUTOROUND_VERSION=${AUTOROUND_VERSION:-0.15.1}  # llmcompressor 0.14.0.1 needs auto-round >=0.14.1,<=0.15.1
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
VENV=${EFFML_PEERS_VENV:-$HOME/.cache/effml/peers-venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.effml-peers-llmc-$LLMCOMPRESSOR_VERSION-ar-$AUTOROUND_VERSION-torch-$TORCH_VERSION"

if [ ! -f "$STAMP" ]; then
    echo "peers_env: creating $VENV with llmcompressor==$LLMCOMPRESSOR_VERSION (a few minutes, once)" >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" >&2
    # llmcompressor depends on auto-round itself (its AutoRoundModifier); pin the version it allows
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "llmcompressor==$LLMCOMPRESSOR_VERSION" \
        "auto-round==$AUTOROUND_VERSION" >&2
    # pip may pull CUDA builds of torchvision / torchaudio; the text models here need none.
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 || true
    "$VENV/bin/python" -c "import llmcompressor, torch, transformers, compressed_tensors as ct; \
print('peers_env: llmcompressor', llmcompressor.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__, 'compressed-tensors', ct.__version__)" >&2
    touch "$STAMP"
fi
echo "$VENV/bin/python"
