#!/usr/bin/env bash
# Wheels the GPU device needs and its image lacks, for CPython 3.12 manylinux x86_64, into
# wheelhouse/ (git-ignored; the device tool carries it, 64 MiB at most):
#
#   scripts/wheelhouse.sh            # then, on the device: scripts/gpu_check.sh
#
# The device image has Python 3.12, torch 2.11 (CUDA 13), lightning 2.6.6, transformers 5.17,
# peft, accelerate, tokenizers, safetensors, pyarrow, triton and pytest, and no network. It lacks
# what the gpu tests and the GPU benchmark import: hydra-core, omegaconf (and antlr4),
# matplotlib (probe.png), datasets (TRL imports it), TRL, DeepSpeed (built here without its
# CUDA ops: DeepSpeed JIT-compiles them on the device where needed) and liger-kernel. Versions are
# the ones this project is tested with; where the image's own packages might not satisfy the
# newest (datasets 5.x wants huggingface-hub >= 1.31 and pyarrow >= 24), an older wheel is kept
# beside it and pip picks what fits. wandb, optuna and submitit are not needed for those runs:
# gpu_check.sh installs the project itself with --no-deps. Never a torch wheel: the image's
# torch is the one used.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-wheelhouse}
mkdir -p "$out"

# binary or pure wheels, for the device's interpreter and platform
wheels=(
  hydra-core==1.3.8 omegaconf==2.3.1
  matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1
  pillow==13.0.0 pyparsing==3.3.3 python-dateutil==2.9.0.post0 six==1.17.0
  datasets==5.2.0 datasets==4.7.0 dill==0.4.1 dill==0.4.0 multiprocess==0.70.19
  multiprocess==0.70.18 xxhash==4.1.0 pandas==2.3.3 tzdata==2026.6 pytz
  # datasets 4.x (for an image whose pyarrow < 24 or huggingface-hub < 1.31) also wants these
  httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0 sniffio idna certifi
  aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl
  trl==1.16.0
  einops==0.8.1 hjson==3.1.0 msgpack==1.1.2 ninja==1.13.0 py-cpuinfo==9.0.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions
  liger-kernel==0.8.5
)
for w in "${wheels[@]}"; do
  pip download --quiet --no-deps --only-binary=:all: --dest "$out" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any "$w"
done

# sdist-only packages, built here into pure-Python wheels
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
pip wheel --quiet --no-deps --wheel-dir "$build" antlr4-python3-runtime==4.9.3
# DeepSpeed without its CUDA ops (DS_BUILD_OPS=0): they are JIT-built on the device if used
DS_BUILD_OPS=0 DS_BUILD_AIO=0 DS_BUILD_GDS=0 pip wheel --quiet --no-deps --no-build-isolation \
  --wheel-dir "$build" deepspeed==0.19.8
cp "$build"/*.whl "$out"/

if ls "$out"/torch-* >/dev/null 2>&1; then
  echo "wheelhouse: a torch wheel slipped in; the device must use its own torch" >&2
  exit 1
fi
size=$(du -sm "$out" | cut -f1)
echo "wheelhouse: $(ls "$out" | wc -l) wheels, ${size} MiB in $out"
if [ "$size" -gt 60 ]; then
  echo "wheelhouse: over 60 MiB; the device tool carries 64 MiB with the working tree" >&2
  exit 1
fi
