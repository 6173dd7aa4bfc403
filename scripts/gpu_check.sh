#!/usr/bin/env bash
# The GPU check, run on a lent device after scripts/wheelhouse.sh has run on CPU. Two calls,
# back to back (the machine is given back after 30 s idle), each well inside the 10-minute limit
# of one command and together about 10 of the 15 device minutes, with a start:
#
#   run(command="OUT=$OUT scripts/gpu_check.sh tests", carry=["wheelhouse"], timeout_s=420)
#   run(command="OUT=$OUT scripts/gpu_check.sh bench", carry=["wheelhouse"], timeout_s=330)
#
# Each call installs what the image lacks from wheelhouse/ alone (never a second torch; a no-op
# the second time), prints versions, then runs its part, leaving the log, the test report and
# the benchmark's tables and per-run JSON lines under $OUT as they come (a part cut short keeps
# what it measured). `all` runs both parts in one call.
# GPU_CHECK_DRY=1 runs the plumbing on CPU (no install, tiny benchmark shapes).
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check_$part.log") 2>&1
section() { echo; echo "=== $* ($(date +%T))"; }
dry=${GPU_CHECK_DRY:-0}
py=python3
command -v "$py" >/dev/null || py=python

section "image"
$py --version
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$py -m pip list 2>/dev/null > "$OUT/pip_list_image.txt"

if [ "$dry" != 1 ]; then
  section "install from wheelhouse/"
  pip_install() { $py -m pip install -q --no-index --find-links wheelhouse "$@"; }
  # what the tests cannot run without, alone, so that an optional package's conflict costs
  # only that package
  pip_install hydra-core omegaconf matplotlib || { echo "core install failed"; exit 1; }
  pip_install --no-deps --no-build-isolation -e . || { echo "project install failed"; exit 1; }
  # datasets 5.x needs pyarrow >= 24 and huggingface-hub >= 1.31; an older image gets 4.x
  pip_install datasets || pip_install "datasets<5" || echo "datasets: not installed"
  for pkg in trl deepspeed liger-kernel; do pip_install "$pkg" || echo "$pkg: not installed"; done
fi
$py - <<'EOF'
import importlib.metadata as md
import torch
names = ["torch", "lightning", "transformers", "peft", "trl", "deepspeed", "liger-kernel",
         "datasets", "hydra-core", "dpo_lab"]
for n in names:
    try:
        print(f"{n:14} {md.version(n)}")
    except md.PackageNotFoundError:
        print(f"{n:14} (missing)")
print(f"cuda           {torch.version.cuda}, device: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
EOF
export DPO_LAB_CACHE=${DPO_LAB_CACHE:-/tmp/dpo_lab_cache}

if [ "$part" = tests ] || [ "$part" = all ]; then
  section "gpu tests (pytest -m gpu)"
  per_test=()
  $py -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=120)
  # -v: each result is in the log as it comes, so a cut-short run still says what passed
  timeout "${GPU_TESTS_TIMEOUT:-360}" $py -m pytest -m gpu -v -rA -p no:cacheprovider \
    "${per_test[@]}" --junitxml "$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.txt" | tail -60
  echo "gpu tests exit: ${PIPESTATUS[0]}"
fi

if [ "$part" = bench ] || [ "$part" = all ]; then
  if [ "$dry" = 1 ]; then
    shape=(--device cpu --vocab 64 --hidden 16 --layers 1 --heads 2 --kv-heads 1 --batch 2
           --warmup 1 --steps 2)
    tools=dpo_lab
    peers=dpo_lab
  else  # Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads (2 KV), intermediate 4864, tied, 151,936
    shape=(--device cuda --dtype bf16 --vocab 151936 --hidden 896 --layers 24 --heads 14
           --kv-heads 2 --intermediate 4864 --tie --batch 8 --warmup 2 --steps 5)
    tools=dpo_lab,trl,trl_liger
    peers=dpo_lab,trl
  fi
  bench() {  # name, then benchmark.py arguments; the table at the end, JSON lines as they come
    local name=$1; shift
    timeout "${BENCH_TIMEOUT:-140}" $py scripts/benchmark.py "${shape[@]}" \
      --results "$OUT/$name.jsonl" "$@" | tee "$OUT/$name.md"
  }
  section "benchmark: Qwen2.5-0.5B shape, live reference, against TRL and TRL+Liger"
  bench bench_live --modes live --tools "$tools"
  section "benchmark: precomputed reference and LoRA, against TRL"
  bench bench_pre_lora --modes precomputed,lora --tools "$peers"
  section "benchmark: hh-rlhf-like lengths, live reference"
  bench bench_hh --lengths hh --modes live --tools "$peers"
fi

section "done"
ls -la "$OUT"
