"""dpo_lab against TRL on the same model, pairs and steps, each in its own subprocess.

    pip install -e ".[bench]"          # TRL, only for this script
    python scripts/benchmark.py        # CPU default: vocab 32000, hidden 256, 4 layers, 8 pairs
    python scripts/benchmark.py --device cuda --dtype bf16 --hidden 896 --layers 24 --heads 14

Both tools train the same randomly initialised Llama-style model (nothing is downloaded) on the
same synthetic pairs: a word-level vocabulary, so both tokenize the text to the same ids
(prompt P words, completions C words, + EOS). Each configuration runs in a fresh subprocess for
``--warmup`` + ``--steps`` optimizer steps; the table reports the median step's tokens/s
(tokens = 2·B·(P + C + 1): chosen and rejected sequences) and peak memory (the process's peak
RSS on CPU, peak allocated CUDA memory on GPU), and dpo_lab ÷ TRL ratios.

Rows: ``live`` (DPO, reference model run every step), ``precomputed`` (DPO with reference
log-probs computed before training: dpo_lab's named reference cache, TRL's
``precompute_ref_log_probs``), ``simpo`` (reference-free: dpo_lab ``loss=simpo``, TRL's
``CPOTrainer`` with ``loss_type="simpo"``), ``lora`` (the same LoRA adapters in both).

Tools: ``dpo_lab``, ``trl`` (TRL's defaults) and ``trl_liger`` (TRL with
``use_liger_kernel=True``; ``pip install liger-kernel``, CUDA only).

``--tie`` ties the input embedding and the LM head, as Qwen2.5-0.5B does. ``--results FILE``
appends each child's result as a JSON line as soon as it finishes, so a run cut short keeps
what it measured.

``--repeats N`` runs every child N times, in rounds, and reports each cell's median (and the
tokens/s range): on this shared 2-core machine one run per cell moved by up to 16% between
two invocations.

``--lengths hh`` draws each pair's lengths to match real preference data (Anthropic hh-rlhf
harmless-base with the Llama-2 tokenizer: a sequence's median 132 tokens, min 21, max 437 under
a 512 cap; a completion's median 27), where padding matters. Batches then differ, so each tool
trains two epochs over ``--batch × --steps`` pairs and only the second is timed: every tool and
layout is timed on exactly the same pairs, and tokens/s is their real (non-padding) tokens ÷ the
epoch's summed step times. ``--layouts`` adds dpo_lab rows for the same mode: ``padded`` (the
default), ``grouped`` (``dataset.group_by_length``) and ``packed`` (``dataset.padding_free``);
TRL pads (its ``padding_free`` is switched off in TRL 1.16).

On CUDA the table adds MFU = k·N·tokens/s ÷ 989 TFLOP/s (H100 dense bf16), with
N the parameters of every matmul (the decoder's and the LM head's; not the input embedding, a
lookup; attention's own score FLOPs are left out, so MFU is a slight underestimate) and k = 8
with a live reference (policy forward and
backward 6N, reference forward 2N), 6 otherwise (no reference forward; LoRA's frozen base still
costs its forward and the backward through its activations).

    python scripts/benchmark.py --device cuda --dtype bf16 --vocab 151936 --hidden 896 \
        --layers 24 --heads 14 --kv-heads 2 --intermediate 4864 --tie --batch 8 \
        --modes live,precomputed,lora --tools dpo_lab,trl,trl_liger     # the Qwen2.5-0.5B shape
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("live", "precomputed", "simpo", "lora")
LAYOUTS = ("padded", "grouped", "packed")
TOOLS = ("dpo_lab", "trl", "trl_liger")
PEAK_FLOPS = 989e12  # H100 SXM, dense bf16
MFU_FACTOR = {"live": 8, "precomputed": 6, "simpo": 6, "lora": 6}
DEFAULT_MODES = ("live", "precomputed", "simpo")
# LoRA settings of the "lora" mode, the same for both tools (reference = base, adapters off)
LORA = dict(r=16, alpha=32, dropout=0.05, target_modules="all-linear")


def make_assets(args: argparse.Namespace, root: Path) -> None:
    """A random-init Llama + word-level tokenizer + pairs, written once for every child."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(args.vocab - 3)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=max_length(args),
        tie_word_embeddings=args.tie,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = LlamaForCausalLM(config)
    # N for MFU: every matmul's weights, so the decoder and the LM head (tied or not: its matmul
    # costs the same), not the input embedding (a lookup)
    lookup = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    non_embedding = sum(p.numel() for p in model.parameters()) - lookup + head * args.tie
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    words = lambda n: " ".join(f"w{rng.randrange(args.vocab - 3)}" for _ in range(n))  # noqa: E731
    n_rows = args.batch * (args.steps if args.lengths == "hh" else args.warmup + args.steps + 2)
    lengths = []
    with open(root / "pairs.jsonl", "w") as f:
        for _ in range(n_rows):  # completions start with a space: TRL joins prompt + completion
            p, c, r = pair_lengths(args, rng)
            row = {"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)}
            f.write(json.dumps(row) + "\n")
            lengths += [p + c + 1, p + r + 1]  # each sequence, EOS included
    lengths.sort()
    stats = {
        "non_embedding_params": non_embedding,
        "tokens_per_step": args.batch * sum(lengths) / (len(lengths) / 2),
        "tokens_total": sum(lengths),
        "sequence_median": lengths[len(lengths) // 2],
        "sequence_min": lengths[0],
        "sequence_max": lengths[-1],
    }
    (root / "assets.json").write_text(json.dumps(stats))


def total_steps(args: argparse.Namespace) -> int:
    """Optimizer steps a child runs: warm-up and timed steps, or with variable lengths two
    epochs of ``--steps`` (the first is the warm-up)."""
    return 2 * args.steps if args.lengths == "hh" else args.warmup + args.steps


def check_epoch(args: argparse.Namespace, batches: int) -> None:
    """With variable lengths the timed epoch must be exactly every pair once (``--steps``
    batches), or the tokens counted would not be the tokens timed."""
    if args.lengths == "hh" and batches != args.steps:
        raise SystemExit(f"an epoch has {batches} batches, expected --steps={args.steps}")


def max_length(args: argparse.Namespace) -> int:
    return 512 + 8 if args.lengths == "hh" else args.prompt + args.completion + 8


def pair_lengths(args: argparse.Namespace, rng: random.Random) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) word counts: fixed, or drawn like hh-rlhf's (see docstring):
    log-normal completions (median 27) and prompts (median 93), each sequence kept within
    [21, 437] tokens with EOS, as measured on the real data."""
    if args.lengths == "fixed":
        return args.prompt, args.completion, args.completion
    import math

    while True:
        p = max(1, round(rng.lognormvariate(math.log(93), 0.7)))
        c, r = (max(1, round(rng.lognormvariate(math.log(27), 0.9))) for _ in range(2))
        if 21 <= p + min(c, r) + 1 and p + max(c, r) + 1 <= 437:
            return p, c, r


class _Timer:
    def __init__(self, device: str):
        self.device, self.times, self.t0 = device, [], 0.0

    def start(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.t0)


def child_dpo_lab(
    args: argparse.Namespace, mode: str, root: Path, layout: str = "padded"
) -> list[float]:
    import lightning as L
    from hydra import compose, initialize_config_module

    from dpo_lab.train import build

    timer = _Timer(args.device)

    class StepTimer(L.Callback):
        def on_train_start(self, trainer, *a):
            check_epoch(args, trainer.num_training_batches)

        def on_train_batch_start(self, *a):
            timer.start()

        def on_train_batch_end(self, *a):
            timer.stop()

    overrides = [
        f"output_dir={root / f'run_{mode}_{layout}'}",
        "dataset=local",
        f"dataset.path={root / 'pairs.jsonl'}",
        f"dataset.val_path={root / 'pairs.jsonl'}",
        f"dataset.batch_size={args.batch}",
        f"dataset.max_length={max_length(args)}",
        f"dataset.max_prompt_length={max_length(args)}",
        "dataset.cache_tokenized=false",
        f"model.name_or_path={root / 'model'}",
        f"model.attn_implementation={args.attn}",
        f"loss={'simpo' if mode == 'simpo' else 'dpo'}",
        f"reference.precompute={mode == 'precomputed'}",
        f"logps.recompute={not args.no_recompute}",
        f"trainer.max_steps={total_steps(args)}",
        f"dataset.group_by_length={layout == 'grouped'}",
        f"dataset.padding_free={layout == 'packed'}",
        "+trainer.limit_val_batches=0",
        "trainer.enable_checkpointing=false",
        "trainer.enable_progress_bar=false",
        "trainer.max_epochs=-1",
        "eval.num_prompts=0",
        "probe.size=8",
        "probe.every_n_steps=100000",
        "logger=csv",
        "optim.scheduler=null",
    ]
    if mode == "lora":
        overrides += ["model.lora.enabled=true"] + [f"model.lora.{k}={v}" for k, v in LORA.items()]
    if args.device == "cuda":
        overrides += ["trainer=gpu"] + (
            ["trainer.precision=bf16-mixed"]
            if args.dtype == "bf16"
            else ["trainer.precision=32-true"]
        )
    with initialize_config_module("dpo_lab.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    run = build(cfg)
    run.trainer.callbacks.append(StepTimer())
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return timer.times


def child_trl(args: argparse.Namespace, mode: str, root: Path, liger: bool = False) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    timer = _Timer(args.device)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timer.start()

        def on_step_end(self, *a, **k):
            timer.stop()

    rows = [json.loads(line) for line in open(root / "pairs.jsonl")]
    model = AutoModelForCausalLM.from_pretrained(root / "model", attn_implementation=args.attn)
    tok = AutoTokenizer.from_pretrained(root / "model")
    common = dict(
        output_dir=str(root / f"trl_{mode}"),
        per_device_train_batch_size=args.batch,
        max_steps=total_steps(args),
        learning_rate=5e-4,
        logging_steps=10_000,
        report_to="none",
        save_strategy="no",
        use_cpu=args.device == "cpu",
        bf16=args.dtype == "bf16",
        max_length=max_length(args),
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        use_liger_kernel=liger,
    )
    data = Dataset.from_list(rows)
    if mode == "simpo":
        try:  # TRL ≥ 1.x keeps CPO (and its SimPO loss) under trl.experimental
            from trl.experimental.cpo import CPOConfig, CPOTrainer
        except ImportError:
            from trl import CPOConfig, CPOTrainer

        config = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5, **common)
        trainer_cls = CPOTrainer
    else:
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(beta=0.1, precompute_ref_log_probs=mode == "precomputed", **common)
        trainer_cls = DPOTrainer
    extra = {}
    if mode == "lora":  # TRL's reference is then the base with the adapter disabled, like ours
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"],
            task_type="CAUSAL_LM",
        )
    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tok,
        callbacks=[StepTimer()],
        **extra,
    )
    check_epoch(args, len(trainer.get_train_dataloader()))
    trainer.train()
    return timer.times


def run_child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    if args.child == "dpo_lab":
        times = child_dpo_lab(args, args.mode, root, args.layout)
    else:
        times = child_trl(args, args.mode, root, liger=args.child == "trl_liger")
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB → MiB
    if len(times) != total_steps(args):
        raise SystemExit(f"timed {len(times)} steps, expected {total_steps(args)}")
    assets = json.loads((root / "assets.json").read_text())
    if args.lengths == "hh":  # the second epoch: every pair once, the same pairs for every tool
        timed = times[args.steps :]
        step = sum(timed) / len(timed)
        tokens_per_s = assets["tokens_total"] / sum(timed)
    else:
        timed = times[args.warmup :]
        step = statistics.median(timed)
        tokens_per_s = assets["tokens_per_step"] / step
    print(
        "RESULT "
        + json.dumps(
            {
                "tokens_per_s": tokens_per_s,
                "step_s": step,
                "steps_timed": len(timed),
                "peak_mib": peak,
            }
        ),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=None, help="default 4 × hidden")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: heads)")
    ap.add_argument("--tie", action="store_true", help="tie the input embedding and LM head")
    ap.add_argument("--results", default=None, help="append each child's result to this file")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--completion", type=int, default=128, help="completion tokens (before EOS)")
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument(
        "--lengths",
        choices=("fixed", "hh"),
        default="fixed",
        help="fixed: --prompt/--completion; hh: drawn like hh-rlhf's (see the docstring)",
    )
    ap.add_argument(
        "--no-recompute",
        action="store_true",
        help="dpo_lab: keep the LM head's logits for backward (logps.recompute=false)",
    )
    ap.add_argument(
        "--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, of {', '.join(MODES)}"
    )
    ap.add_argument("--tools", default="dpo_lab,trl")
    ap.add_argument(
        "--layouts",
        default=None,
        help=f"dpo_lab batch layouts, of {', '.join(LAYOUTS)} (default: padded; with --lengths "
        "hh all three)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of every child, in rounds; the table shows medians and, for several, "
        "the tokens/s range",
    )
    ap.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--layout", choices=LAYOUTS, default="padded", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_child(args)
    if args.repeats < 1:
        sys.exit(f"--repeats must be >= 1, got {args.repeats}")
    layouts = args.layouts or ("padded,grouped,packed" if args.lengths == "hh" else "padded")
    args.layouts = layouts.split(",")
    for layout in args.layouts:
        if layout not in LAYOUTS:
            sys.exit(f"--layouts: {layout!r} is not one of {', '.join(LAYOUTS)}")

    root = Path(tempfile.mkdtemp(prefix="dpo_lab_bench_"))
    make_assets(args, root)
    shared = (
        "vocab",
        "hidden",
        "intermediate",
        "layers",
        "heads",
        "kv_heads",
        "prompt",
        "completion",
        "batch",
        "warmup",
        "steps",
        "threads",
        "device",
        "dtype",
        "attn",
        "lengths",
    )
    passthrough = [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in shared
        if getattr(args, k) is not None
    ] + (["--tie"] if args.tie else [])
    env = {
        **os.environ,
        "DPO_LAB_CACHE": str(root / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(args.threads),
    }
    children = [
        (tool, mode, layout)
        for mode in args.modes.split(",")
        for tool in args.tools.split(",")
        for layout in (args.layouts if tool == "dpo_lab" else ["padded"])
    ]
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for rep in range(args.repeats):  # rounds over every child: slow spells hit each alike
        for tool, mode, layout in children:
            if tool not in TOOLS:
                sys.exit(f"--tools: {tool!r} is not one of {', '.join(TOOLS)}")
            cmd = [sys.executable, __file__, *passthrough, "--child", tool, "--mode", mode,
                   "--layout", layout, "--root", str(root)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                print(f"[{tool} {mode} {layout}] failed:\n  " + "\n  ".join(tail),
                      file=sys.stderr)  # fmt: skip
                continue
            r = json.loads(line[0][7:])
            runs.setdefault((tool, mode, layout), []).append(r)
            if args.results:  # kept even if this script is stopped before its table
                with open(args.results, "a") as f:
                    row = {"tool": tool, "mode": mode, "layout": layout, "repeat": rep, **r}
                    f.write(json.dumps(row) + "\n")
            print(
                f"[{tool:7} {mode:11} {layout:7} #{rep}] {r['tokens_per_s']:8.0f} tokens/s  "
                f"{r['peak_mib']:7.0f} MiB peak",
                file=sys.stderr,
                flush=True,
            )
    # each child's median over the repeats (tokens/s and peak memory separately)
    results = {
        key: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "peak_mib")}
        | {"spread": (min(r["tokens_per_s"] for r in rs), max(r["tokens_per_s"] for r in rs))}
        for key, rs in runs.items()
    }
    for key, rs in runs.items():
        if len(rs) < args.repeats:  # a cell whose median is over fewer runs says so
            print(f"[{' '.join(key)}] median of {len(rs)} of {args.repeats} runs", file=sys.stderr)

    mem = "peak CUDA alloc" if args.device == "cuda" else "peak RSS"
    assets = json.loads((root / "assets.json").read_text())
    shape = (
        f"{args.batch} pairs × (prompt {args.prompt} + completion {args.completion} + EOS)"
        if args.lengths == "fixed"
        else f"{args.batch} pairs a step, hh-like lengths (sequence median "
        f"{assets['sequence_median']}, min {assets['sequence_min']}, max "
        f"{assets['sequence_max']}; {assets['tokens_per_step']:.0f} real tokens a step)"
    )
    timing = (
        f"the second of two epochs of {args.steps} steps timed (every tool on the same pairs)"
        if args.lengths == "hh"
        else f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    if args.repeats > 1:
        timing += (
            f"; each cell the median of {args.repeats} runs in rounds, tokens/s range in brackets"
        )
    print(
        f"\nmodel: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads} heads ({args.kv_heads or args.heads} KV), intermediate "
        f"{args.intermediate or 4 * args.hidden}; N = {assets['non_embedding_params'] / 1e6:.1f}M "
        f"parameters in matmuls (decoder and LM head); {shape}; {args.device} {args.dtype}, "
        f"{args.threads} threads; {timing}; dpo_lab logps.recompute={not args.no_recompute}"
    )
    print(format_table(args, results, mem, assets["non_embedding_params"]))
    live = results.get(("dpo_lab", "live", "padded"))
    pre = results.get(("dpo_lab", "precomputed", "padded"))
    if live and pre:
        print(
            f"\ndpo_lab precomputed ÷ dpo_lab live: "
            f"{pre['tokens_per_s'] / live['tokens_per_s']:.2f}× tokens/s"
        )


def format_table(args: argparse.Namespace, results: dict, mem: str, n_params: int) -> str:
    """One row per mode and dpo_lab layout: dpo_lab against TRL (and TRL with Liger, where it
    ran), speed and memory ratios, with several layouts each layout against dpo_lab padded, and
    on CUDA each tool's MFU."""
    peers = [t for t in ("trl", "trl_liger") if t in args.tools.split(",")]
    # TRL 1.16's use_liger_kernel applies Liger's layer kernels only (TRL keeps its own chunked
    # LM head and forces Liger's fused cross-entropy off)
    names = {"trl": "TRL", "trl_liger": "TRL+Liger layers"}
    cuda = args.device == "cuda"
    several = len(args.layouts) > 1
    head = ["mode", "dpo_lab tokens/s"] + (["speed ÷ padded", "memory ÷ padded"] if several else [])
    trl_note = " (padded)" if several else ""  # TRL pads in every row (see the docstring)
    for t in peers:
        head += [f"{names[t]}{trl_note} tokens/s", f"speed ÷ {names[t]}{trl_note}"]
    head += [f"dpo_lab {mem} MiB"]
    for t in peers:
        head += [f"{names[t]} {mem} MiB", f"memory ÷ {names[t]}"]
    if cuda:
        head += [f"MFU {n}" for n in ["dpo_lab", *(names[t] for t in peers)]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(r: dict | None, k: str) -> str:
        if not r:
            return "—"
        lo, hi = r.get("spread", (r[k], r[k]))
        spread = f" ({lo:.0f}–{hi:.0f})" if k == "tokens_per_s" and args.repeats > 1 else ""
        return f"{r[k]:.0f}{spread}"

    for mode, layout in [(m, lay) for m in args.modes.split(",") for lay in args.layouts]:
        a = results.get(("dpo_lab", mode, layout))
        row = [mode if layout == "padded" else f"{mode}, {layout}", fmt(a, "tokens_per_s")]
        if several:
            p = results.get(("dpo_lab", mode, "padded"))
            for k in ("tokens_per_s", "peak_mib"):
                row += [f"{a[k] / p[k]:.2f}×" if a and p else "—"]
        for t in peers:
            b = results.get((t, mode, "padded"))
            ratio = f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}×" if a and b else "—"
            row += [fmt(b, "tokens_per_s"), ratio]
        row += [fmt(a, "peak_mib")]
        for t in peers:
            b = results.get((t, mode, "padded"))
            ratio = f"{a['peak_mib'] / b['peak_mib']:.2f}×" if a and b else "—"
            row += [fmt(b, "peak_mib"), ratio]
        if cuda:
            for t in ["dpo_lab", *peers]:
                r = results.get((t, mode, layout if t == "dpo_lab" else "padded"))
                mfu = MFU_FACTOR[mode] * n_params * r["tokens_per_s"] / PEAK_FLOPS if r else None
                row += [f"{100 * mfu:.1f}%" if r else "—"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
