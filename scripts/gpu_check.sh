#!/usr/bin/env bash
# The one command run on a lent GPU device (prepare with scripts/wheelhouse.sh on CPU first):
#
#   run(command="OUT=$OUT scripts/gpu_check.sh", carry=["wheelhouse"], timeout_s=570)
#
# installs what the image lacks from wheelhouse/ only (never a second torch), prints versions,
# runs `pytest -m gpu`, then the GPU benchmark (Qwen2.5-0.5B shape: live, precomputed and LoRA
# against TRL and TRL with Liger; then hh-rlhf-like lengths), and leaves the log, the test
# summary and the tables under $OUT. Each part has its own time limit, so that one slow part
# still leaves the others' results: about 9 minutes in all on an H100.
# GPU_CHECK_DRY=1 runs the plumbing on CPU (no install, tiny benchmark shapes) to check the script.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
section() { echo; echo "=== $* ($(date +%T))"; }
dry=${GPU_CHECK_DRY:-0}

section image
python --version
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
pip list 2>/dev/null > "$OUT/pip_list_image.txt"

if [ "$dry" != 1 ]; then
  section install from wheelhouse/
  wanted="hydra-core omegaconf matplotlib trl deepspeed liger-kernel"
  # datasets 5.x needs pyarrow >= 24 and huggingface-hub >= 1.31; an older image gets 4.x
  pip install -q --no-index --find-links wheelhouse $wanted datasets \
    || pip install -q --no-index --find-links wheelhouse $wanted "datasets<5"
  pip install -q --no-index --no-deps --no-build-isolation -e .
fi
python - <<'EOF'
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

section "gpu tests (pytest -m gpu)"
export DPO_LAB_CACHE=${DPO_LAB_CACHE:-/tmp/dpo_lab_cache}
timeout "${GPU_TESTS_TIMEOUT:-330}" python -m pytest -m gpu -q -rA -p no:cacheprovider \
  --junitxml "$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.txt" | tail -40
echo "gpu tests exit: ${PIPESTATUS[0]}"

section "benchmark: Qwen2.5-0.5B shape, bf16"
if [ "$dry" = 1 ]; then
  shape=(--device cpu --vocab 64 --hidden 16 --layers 1 --heads 2 --kv-heads 1 --batch 2
         --warmup 1 --steps 2 --tools dpo_lab)
else
  shape=(--device cuda --dtype bf16 --vocab 151936 --hidden 896 --layers 24 --heads 14
         --kv-heads 2 --intermediate 4864 --batch 8 --warmup 2 --steps 6
         --tools dpo_lab,trl,trl_liger)
fi
timeout "${BENCH_TIMEOUT:-150}" python scripts/benchmark.py "${shape[@]}" \
  --modes live,precomputed,lora | tee "$OUT/bench_qwen.md"

section "benchmark: hh-rlhf-like lengths, bf16"
timeout "${BENCH_TIMEOUT:-150}" python scripts/benchmark.py "${shape[@]}" --lengths hh \
  --modes live | tee "$OUT/bench_hh.md"

section done
ls -la "$OUT"
