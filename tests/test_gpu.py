"""The GPU path, run by ``scripts/gpu_check.sh`` on a lent CUDA device (``pytest -m gpu``);
skipped where there is no CUDA device.

Each test trains the shrunk embedded task through the command line, as a user would, under a
real GPU configuration: bf16-mixed and fp16 with its GradScaler (every trainable weight changes),
FSDP and DeepSpeed ZeRO-2/3 on one device (steps, probe, end-of-run evaluation, ``final/`` loading
in transformers and reproducing the policy's log-probs, kill and ``resume=auto``), LoRA on a bf16
base, the precomputed reference under bf16, online generation on CUDA, the lean LM-head path
against the naive one in bf16, and padding-free batches (per-sequence sdpa and, where
flash-attn is installed, flash_attention_2's variable-length kernel) against padded ones, and
RLHF: a reward model then PPO against it (bf16-mixed, 16-mixed), RLOO with LoRA on a bf16 base.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import env_with_tests, run_cli
from test_rlhf import _rl_rows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU = ["trainer=gpu", "trainer.log_every_n_steps=1", "optim.scheduler=null", "eval.num_prompts=8"]
STRATEGIES = {
    "fsdp": ["trainer=fsdp", "trainer.devices=1"],
    "zero2": ["trainer=deepspeed", "trainer.devices=1", "trainer.strategy.stage=2"],
    "zero3": ["trainer=deepspeed", "trainer.devices=1", "trainer.strategy.stage=3"],
}


def test_lean_head_equals_the_naive_path_in_bf16():  # first: in-process, quick
    """A real vocabulary (151,936, Qwen2.5's) on the GPU, bf16 autocast: the lean path's values
    and gradients against the full-logits path's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dpo_lab.logps import completion_logps

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Qwen2ForCausalLM(config).cuda()
    ids = torch.randint(0, 151936, (4, 96), device="cuda")
    att = torch.ones_like(ids)
    comp = torch.zeros_like(ids)
    comp[:, 32:] = 1
    out = {}
    for lean in (True, False):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logps, _ = completion_logps(model, ids, att, comp, lean=lean)
        logps.sum().backward()
        out[lean] = (
            logps.detach(),
            model.lm_head.weight.grad.float().clone(),
            model.model.layers[0].mlp.up_proj.weight.grad.float().clone(),
        )
    (a, ga, la), (b, gb, lb) = out[True], out[False]
    assert (a - b).abs().max() < 1e-2 * b.abs().max()
    assert ((ga - gb).norm() / gb.norm()) < 1e-2
    assert ((la - lb).norm() / lb.norm()) < 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_packed_equals_padded_on_cuda(attn):
    """Packed rows on the GPU under bf16 autocast, a GQA model with a sliding window shorter than
    some sequences: log-probs and gradients against the padded path's (bf16 tolerance), for the
    per-sequence sdpa and flash-attention's variable-length kernel."""
    import importlib.util

    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    from transformers import MistralConfig, MistralForCausalLM

    from dpo_lab.data.collate import pad_sequences
    from dpo_lab.logps import completion_logps
    from dpo_lab.packing import pack, prepare_model

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=32000, hidden_size=256, intermediate_size=512,
                           num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                           sliding_window=64)  # fmt: skip
    dtype = torch.bfloat16 if attn == "flash_attention_2" else torch.float32
    model = MistralForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype).cuda()
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 32000, (n,), generator=g).tolist()  # noqa: E731
    examples = [(ids(p), ids(c)) for p, c in [(5, 3), (90, 60), (20, 1), (130, 40), (7, 200)]]
    out = {}
    for packed in (False, True):
        model.zero_grad()
        if packed:
            prepare_model(model)
            batch = pack(examples)
            batch["attention_mask"] = None
        else:
            batch = pad_sequences(examples, 0)
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logps, tokens = completion_logps(model, **batch)
        logps.sum().backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad.float().clone()
        out[packed] = (logps.detach().float(), tokens, grad)
    (a, ta, ga), (b, tb, gb) = out[False], out[True]
    assert ta.tolist() == tb.tolist()
    assert (a - b).abs().max() < 2e-2 * a.abs().max()
    assert ((ga - gb).norm() / ga.norm()) < 2e-2


def train_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def final_probe_logps(out: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The probe's first and last policy log-probs (as trained) and the same pairs scored by
    ``final/`` loaded with transformers, under the same bf16 autocast."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_lab.data.collate import PreferenceCollator, encode_batch
    from dpo_lab.logps import paired_logps

    rows = list(csv.DictReader(open(out / "probe.csv", newline="")))
    last = max(int(r["step"]) for r in rows)
    start = torch.tensor([float(r["policy_chosen_logps"]) for r in rows if r["step"] == "0"])
    rows = [r for r in rows if int(r["step"]) == last]
    samples = {json.loads(x)["id"]: json.loads(x) for x in open(out / "probe_pairs.jsonl")}
    model = AutoModelForCausalLM.from_pretrained(out / "final").cuda().eval()
    tok = AutoTokenizer.from_pretrained(out / "final")
    items = []
    for i, r in enumerate(rows):
        s = samples[r["example_id"]]
        (p, c), (_, rj) = encode_batch(tok, [s["prompt"]] * 2, [s["chosen"], s["rejected"]])
        items.append(
            {
                "index": i,
                "id": r["example_id"],
                "prompt_ids": p,
                "chosen_ids": c,
                "rejected_ids": rj,
            }
        )
    batch = PreferenceCollator(tok.pad_token_id)(items)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        scored = paired_logps(model, batch).chosen.float().cpu()
    logged = torch.tensor([float(r["policy_chosen_logps"]) for r in rows])
    return start, logged, scored


@pytest.mark.parametrize(
    "precision, extra",
    [("bf16-mixed", []), ("16-mixed", []), ("bf16-mixed", ["dataset.padding_free=true"])],
    ids=["bf16-mixed", "16-mixed", "bf16-mixed-padding-free"],
)
def test_a_default_shaped_run_trains_every_weight(tmp_path, precision, extra):
    """Every trainable weight changes, the step-0 reward is 0 and the evaluation runs; with
    padding-free batches too (the evaluation then generates, unpacked, on the switched model)."""
    out = tmp_path / "run"
    run_cli(
        *GPU,
        f"trainer.precision={precision}",
        *extra,
        "trainer.max_steps=4",
        "+callbacks.weights._target_=gpu_helpers.WeightsChanged",
        f"+callbacks.weights.path={tmp_path / 'unchanged.json'}",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
        env=env_with_tests(),
    )
    assert json.loads((tmp_path / "unchanged.json").read_text()) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and "eval/kl" in summary
    assert_step0_reward_is_zero(out)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_sharded_strategy_on_one_gpu(tmp_path, strategy):
    """A few steps, the probe, the end-of-run evaluation, final/ reproducing the policy, then
    resume=auto continuing the checkpoint."""
    out = tmp_path / "run"
    common = [
        *GPU,
        *STRATEGIES[strategy],
        "model.dtype=float32",
        "checkpoint.every_n_steps=2",
        "trainer.max_epochs=5",
        "+callbacks.pairs._target_=gpu_helpers.ProbePairs",
        f"+callbacks.pairs.path={out / 'probe_pairs.jsonl'}",
    ]
    run_cli(
        *common, "trainer.max_steps=2", f"hydra.run.dir={out}", cwd=tmp_path, env=env_with_tests()
    )
    run_cli(
        *common,
        "trainer.max_steps=4",
        "resume=auto",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
        env=env_with_tests(),
    )
    steps = [int(r["step"]) for r in train_rows(out)]
    assert steps == [0, 1, 2, 3]  # each step once: resumed at 2, not started over
    assert_step0_reward_is_zero(out)
    if strategy != "zero2":  # the resumed steps are the straight run's (weights, AdamW state)
        straight = tmp_path / "straight"
        run_cli(
            *common,
            "trainer.max_steps=4",
            f"hydra.run.dir={straight}",
            cwd=tmp_path,
            env=env_with_tests(),
        )
        a = [float(r["train/loss"]) for r in train_rows(out)]
        b = [float(r["train/loss"]) for r in train_rows(straight)]
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-2, (a, b)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and "eval/kl" in summary and "probe/logps/chosen" in summary
    start, logged, scored = final_probe_logps(out)
    tol = 0.01 * logged.abs() + 0.05  # bf16 autocast in both
    assert ((logged - scored).abs() <= tol).all(), (logged - scored).abs().max()
    assert ((logged - start).abs() > tol).any()  # so the check tells trained from untrained


def test_lora_on_a_bf16_base(tmp_path):
    out = tmp_path / "run"
    run_cli(
        *GPU,
        "model.dtype=bfloat16",
        "model.lora.enabled=true",
        "model.lora.r=4",
        "model.lr=5e-3",
        "trainer.max_steps=3",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    from safetensors.torch import load_file

    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in adapter.values())
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())


def test_precomputed_reference_under_bf16_equals_live(tmp_path):
    for name, extra in (("live", []), ("pre", ["reference.precompute=true"])):
        run_cli(
            *GPU,
            "trainer.max_steps=3",
            "dataset.group_by_length=false",
            *extra,
            f"hydra.run.dir={tmp_path / name}",
            cwd=tmp_path,
        )
    live = [float(r["train/ref_logps/chosen"]) for r in train_rows(tmp_path / "live")]
    pre = [float(r["train/ref_logps/chosen"]) for r in train_rows(tmp_path / "pre")]
    assert max(abs(a - b) for a, b in zip(live, pre, strict=True)) < 1e-2


def test_online_generation_on_cuda(tmp_path):
    out = tmp_path / "run"
    run_cli(
        *GPU,
        "algo=online",
        "trainer.max_steps=2",
        "dataset.batch_size=8",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["online/pairs_total"] > 0 and "eval/kl" in summary


def assert_step0_reward_is_zero(out: Path) -> None:
    """Before any update the policy is the reference: the implicit reward is 0 where the
    reference computes as the policy does (the strategy's dtype; bf16 kernels may differ in the
    last bits between the two modules' layouts, hence 1e-3)."""
    first = train_rows(out)[0]
    assert abs(float(first["train/rewards/margins"])) < 1e-3, first["train/rewards/margins"]
    assert abs(float(first["train/rewards/chosen"])) < 1e-3, first["train/rewards/chosen"]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_reward_model_then_ppo_against_it_on_cuda(tmp_path, precision):
    """RLHF end to end on the GPU: a reward model trained under ``precision``, then PPO against
    it (the judge moved to the GPU, scoring token ids). Under 16-mixed the GradScaler goes through
    manual optimization. The first update's forward reproduces the rollout's log-probs under
    autocast (ratio ≈ 1), and the first rollout's KL is ≈ 0 (policy = reference)."""
    rm = tmp_path / "rm"
    run_cli(*GPU, f"trainer.precision={precision}", "algo=reward_model", "trainer.max_steps=6",
            f"hydra.run.dir={rm}", cwd=tmp_path)  # fmt: skip
    s = json.loads((rm / "summary.json").read_text())
    assert all(s[k] == s[k] for k in ("val/rm/loss", "val/rm/accuracies"))  # finite
    out = tmp_path / "ppo"
    run_cli(*GPU, f"trainer.precision={precision}", "algo=ppo", "algo.epochs=1",
            "algo.num_minibatches=1", "trainer.max_steps=3", "dataset.batch_size=8",
            "+algo.judge._target_=dpo_lab.online.RewardModelJudge",
            f"+algo.judge.name_or_path={rm / 'final'}", f"hydra.run.dir={out}",
            cwd=tmp_path)  # fmt: skip
    rows = _rl_rows(out)
    assert len(rows) == 3
    assert rows[0]["ppo/approx_kl"] < 1e-3, rows[0]
    assert abs(rows[0]["rl/kl"]) < 1e-2, rows[0]
    assert all(0 <= r["ppo/clipfrac"] <= 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and "eval/kl" in summary


def test_rloo_lora_on_a_bf16_base_on_cuda(tmp_path):
    out = tmp_path / "run"
    run_cli(*GPU, "algo=rloo", "model.dtype=bfloat16", "model.lora.enabled=true",
            "model.lora.dropout=0", "model.lora.r=4", "model.lr=5e-3", "trainer.max_steps=3",
            "dataset.batch_size=8", f"hydra.run.dir={out}", cwd=tmp_path)  # fmt: skip
    from safetensors.torch import load_file

    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())
    rows = _rl_rows(out)
    assert len(rows) == 3 and abs(rows[0]["rl/kl"]) < 1e-2
