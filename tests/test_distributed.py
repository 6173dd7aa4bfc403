"""Past one process: DDP for real on CPU (two gloo processes) against one process with the same
global batch, the submitit launcher running a sweep, and the cluster presets."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import env_with_tests
from conftest import run_cli as cli

# Tolerance of the DDP equivalence: the two runs differ only in the order of floating-point
# sums (gradients averaged by all-reduce, metrics reduced across ranks).
DDP_ATOL = 1e-4


def train_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {
            int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")
        }


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trained weights in ``final/``: the whole model, or under LoRA the adapter."""
    from safetensors.torch import load_file

    final = run_dir / "final"
    lora = final / "adapter_model.safetensors"
    return load_file(lora if lora.exists() else final / "model.safetensors")


# LoRA under DDP: the adapter-disabled reference runs inside DDP's forward on every rank
LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0", "model.lr=5e-3"]


def two_processes_against_one(
    tmp_path: Path,
    strategy: list[str],
    extra: list[str],
    env: dict | None = None,
    two_only: tuple[str, ...] = (),
) -> tuple[Path, Path, dict, dict]:
    """One process with batch 16 against two with batch 8 under ``strategy`` (and ``two_only``):
    the same examples each step, so the same losses and final weights, and validation, split
    unevenly (47 pairs: 24 and 23), reduced to the same per-example means (not a mean of the two
    ranks' means)."""
    common = [
        "dataset.source.n_val=47",
        "trainer.max_epochs=1",  # 96 pairs / 16 a step = 6 steps, then validation
        "trainer.log_every_n_steps=1",
        "optim.scheduler=null",
        "eval.num_prompts=8",
        *extra,
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    cli(*common, "dataset.batch_size=16", f"hydra.run.dir={one}", cwd=tmp_path)
    cli(*common, *strategy, *two_only, "dataset.batch_size=8", f"hydra.run.dir={two}",
        cwd=tmp_path, env=env)  # fmt: skip
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert s1["steps"] == s2["steps"] == 6
    l1, l2 = train_losses(one), train_losses(two)
    assert sorted(l1) == sorted(l2) and len(l1) == 6
    for step in l1:
        assert abs(l1[step] - l2[step]) < DDP_ATOL, (step, l1[step], l2[step])
    w1, w2 = weights(one), weights(two)
    assert w1.keys() == w2.keys()
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < DDP_ATOL, worst
    for key in ("val/loss", "val/rewards/accuracies", "val/rewards/margins", "val/logps/chosen"):
        assert abs(s1[key] - s2[key]) < DDP_ATOL, (key, s1[key], s2[key])
    return one, two, s1, s2


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, two_only",
    [([], ("dataset.padding_free=true",)), (LORA, ())],
    ids=["full-two-packed", "lora"],
)
def test_ddp_two_processes_match_one_process_with_the_global_batch(tmp_path, extra, two_only):
    """The full-model arm also packs the two processes' batches (``dataset.padding_free``) and
    not the one process's: DDP and padding-free together change nothing but float sums."""
    one, two, s1, s2 = two_processes_against_one(tmp_path, DDP_CPU, extra, two_only=two_only)
    assert s1["global_batch_size"] == s2["global_batch_size"] == 16
    assert not (two / "final_rank1").exists() and "eval/kl" in s2  # one report, from rank 0


DDP_CPU = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
]
FSDP_CPU = [
    "trainer=fsdp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "trainer.strategy._target_=cpu_fsdp.CPUFSDPStrategy",  # tests/cpu_fsdp.py: FSDP1 on gloo
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [["reference.dtype=bfloat16"], ["reference.precompute=true"], LORA],
    ids=["fp32-policy-bf16-reference", "precomputed", "lora"],
)
def test_fsdp_two_processes_match_one_process_with_the_global_batch(tmp_path, extra):
    """FSDP for real on CPU (two gloo processes, one unit per decoder layer, full state dicts):
    the same steps as one process with the global batch, the probe and the closed-form-style
    calls outside the sharded forward working on every rank, the end-of-run evaluation on a
    gathered copy, and final/ the whole trained model."""
    one, two, s1, s2 = two_processes_against_one(tmp_path, FSDP_CPU, extra, env=env_with_tests())
    assert abs(s1["probe/logps/chosen"] - s2["probe/logps/chosen"]) < DDP_ATOL
    # the probe scored the same pairs on the sharded policy (every step, both ranks in step)
    p1 = list(csv.DictReader(open(one / "probe.csv")))
    p2 = list(csv.DictReader(open(two / "probe.csv")))
    assert [r["step"] for r in p1] == [r["step"] for r in p2]
    gap = max(
        abs(float(a["policy_chosen_logps"]) - float(b["policy_chosen_logps"]))
        for a, b in zip(p1, p2, strict=True)
    )
    assert gap < DDP_ATOL, gap
    assert s2["eval/reward/reference"] == s1["eval/reward/reference"] and "eval/kl" in s2


@pytest.mark.slow
def test_fsdp_resume_equals_an_uninterrupted_run(tmp_path):
    """FSDP's full checkpoints (weights and AdamW state gathered from both processes) resume
    exactly: stopped at step 4, resumed to 8, against 8 straight."""
    resume_against_straight(tmp_path, FSDP_CPU, env=env_with_tests())


@pytest.mark.slow
def test_online_generation_on_an_fsdp_sharded_policy(tmp_path):
    """Each process samples from the sharded policy: every decoder layer gathers its weights at
    every forward, so the processes must run as many forwards though their samples end at
    different lengths (transformers' synced_gpus); without it, a hang or a collective error."""
    out = tmp_path / "run"
    cli(
        *FSDP_CPU,
        "algo=online",
        "algo.max_new_tokens=48",  # samples end (EOS) at different lengths on each process
        "dataset.batch_size=4",
        "trainer.max_steps=2",
        "eval.num_prompts=4",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
        env=env_with_tests(),
        timeout=120,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["online/pairs_total"] > 0 and "eval/kl" in summary
    assert summary["eval/length/policy"] < 48  # samples do end before the cap


FP16_SCALER = (
    "+trainer.plugins=[{_target_:lightning.pytorch.plugins.precision.MixedPrecision,"
    "precision:16-mixed,device:cpu,scaler:{_target_:torch.amp.GradScaler,device:cpu,"
    "init_scale:256}}]"
)
MATRIX = {  # (strategy, precision) cells that run on CPU; the README's matrix lists the others
    ("ddp", "bf16-mixed"): [*DDP_CPU, "trainer.precision=bf16-mixed"],
    ("ddp", "16-mixed"): [*DDP_CPU, "trainer.precision=null", FP16_SCALER],
    ("ddp", "bf16-true"): [*DDP_CPU, "trainer.precision=bf16-true"],
    ("fsdp", "bf16-true"): [*FSDP_CPU, "trainer.precision=bf16-true"],
}
QUICK = [
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "optim.scheduler=null",
    "eval.num_prompts=0",
    "~callbacks.probe",
    "+trainer.limit_val_batches=0",
]


@pytest.fixture(scope="module")
def fp32_reference(tmp_path_factory):
    """One process, fp32, the global batch: what every cell should come close to."""
    runs = {}
    for mode, extra in (("full", []), ("lora", LORA)):
        out = tmp_path_factory.mktemp(f"fp32_{mode}")
        cli(*QUICK, *extra, "dataset.batch_size=16", f"hydra.run.dir={out}", cwd=out)
        runs[mode] = out
    return runs


def start_weights(tmp_path: Path) -> dict[str, torch.Tensor]:
    """The embedded SFT base every run starts from (the shrunk task, built once per session)."""
    from conftest import make_cfg
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from dpo_lab.models import resolve_name_or_path

    cfg = make_cfg(tmp_path / "unused")
    source = OmegaConf.to_container(cfg.dataset.source, resolve=True)
    return load_file(
        Path(resolve_name_or_path(cfg.model.name_or_path, source)) / "model.safetensors"
    )


# LoRA in one DDP cell and the FSDP one: each precision with LoRA runs in one process
# (tests/test_precision.py) and DDP with LoRA in 32-true (above); two more two-process LoRA
# cells cost CI a minute and cover no other code path
LORA_CELLS = (("ddp", "bf16-mixed"), ("fsdp", "bf16-true"))
CELLS = [(c, "full") for c in MATRIX] + [(c, "lora") for c in LORA_CELLS]


@pytest.mark.slow
@pytest.mark.parametrize("cell, mode", CELLS, ids=["-".join((*c, m)) for c, m in CELLS])
def test_precision_and_strategy_matrix(tmp_path, cell, mode, fp32_reference):
    """Each cell trains as one fp32 process with the same examples does: at step 0 the implicit
    reward is exactly 0 (the reference computes as the policy does), losses and gradient norms
    are finite, every trained weight moved, and each weight's update is the fp32 one's to within
    the precision (relative difference of the updates, not of the weights: a cell that did not
    train fails)."""
    out = tmp_path / "run"
    extra = LORA if mode == "lora" else []
    cli(*QUICK, *extra, *MATRIX[cell], "dataset.batch_size=8", f"hydra.run.dir={out}",
        cwd=tmp_path, env=env_with_tests())  # fmt: skip
    with open(out / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 3
    assert float(rows[0]["train/rewards/chosen"]) == float(rows[0]["train/rewards/margins"]) == 0
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert all(0 < float(r["train/grad_norm"]) < math.inf for r in rows)
    w, ref = weights(out), weights(fp32_reference[mode])
    if mode == "lora":  # B starts at 0: its value is its update
        updates = {k: (w[k].float(), ref[k].float()) for k in w if "lora_B" in k}
    else:
        start = start_weights(tmp_path)
        updates = {k: (w[k].float() - start[k], ref[k].float() - start[k]) for k in w}
    if cell[1] == "bf16-true" and mode == "full":
        # bf16 weights, no fp32 masters (FSDP flattens the already-cast bf16 module): an update
        # below half their resolution rounds away. The norm weights (about 1.0, spacing 2^-7)
        # do not move at lr 5e-4; the matrices do.
        lost = {
            k
            for k, (_, u_ref) in updates.items()
            if u_ref.abs().max() < 2**-8 * start[k].abs().mean()
        }
        assert lost == {k for k in updates if k.endswith("norm.weight")}, lost
        bf16 = torch.bfloat16  # final/ may hold them as fp32 (FSDP's gathered copy)
        assert all(torch.equal(w[k].to(bf16), start[k].to(bf16)) for k in lost)  # not moved
        updates = {k: v for k, v in updates.items() if k not in lost}
    assert updates and all(u.abs().max() > 0 for u, _ in updates.values())
    for k, (u, u_ref) in updates.items():  # measured up to 0.21 (bf16 embeddings)
        rel = ((u - u_ref).norm() / u_ref.norm()).item()
        assert rel < 0.35, (k, rel)


def test_fsdp_refuses_a_policy_of_two_dtypes(tmp_path):
    from conftest import make_cfg

    from dpo_lab.errors import ConfigError
    from dpo_lab.train import build

    cfg = make_cfg(tmp_path, *FSDP_CPU, "model.dtype=bfloat16", "model.lora.enabled=true")
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    with pytest.raises(ConfigError, match=r"trainer=fsdp flattens .* bfloat16 and float32"):
        build(cfg)


def rank1_ties(prompt: str, completion: str) -> float:
    """A judge that scores every sample of process 1 the same: all its prompts tie."""
    import torch.distributed as dist

    from dpo_lab.tasks.sentiment import reward

    if dist.is_initialized() and dist.get_rank() == 1:
        Path(f"tied_rank1_{dist.get_rank()}").touch()
        return 0.0
    return reward(prompt, completion)


@pytest.mark.slow
def test_online_ddp_with_a_process_whose_prompts_all_tie_goes_on(tmp_path):
    """Process 1's prompts all tie, process 0's do not. Returning None on one process only left
    DDP's gradient all-reduce (and the metric reductions) waiting: a hang. Now the tied process
    trains a stand-in pair with weight 0 and both go on."""
    out = tmp_path / "run"
    cli(
        *DDP_CPU,
        "algo=online",
        "+algo.judge._target_=test_distributed.rank1_ties",
        "+algo.judge._partial_=true",
        "algo.max_new_tokens=6",
        "dataset.batch_size=4",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "eval.num_prompts=0",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
        env=env_with_tests(),
        timeout=240,
    )
    assert (tmp_path / "tied_rank1_1").exists()  # process 1 did tie
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["online/pairs_total"] > 0  # process 0 trained


class KLRecorder:
    """Records, on each process, the KTO reference point z0 each training step used."""

    def __init__(self, path: str):
        import lightning as L

        outer = self

        class _Callback(L.Callback):
            def on_fit_start(self, trainer, pl_module):
                import dataclasses

                spec, seen = pl_module.loss, []
                outer.seen = seen

                def recording(policy, reference, **kw):
                    if pl_module.training:  # the rows z0 is estimated from, before the clamp
                        raw = (policy.kl - reference.kl).mean()
                        seen.append([len(policy.kl), len(policy.completion), float(raw)])
                    return spec.fn(policy, reference, **kw)

                pl_module.loss = dataclasses.replace(spec, fn=recording)

            def on_train_end(self, trainer, pl_module):
                Path(f"{path}.{trainer.global_rank}").write_text(json.dumps(outer.seen))

        self.callback = _Callback()


def kl_recorder(path: str):
    return KLRecorder(path).callback


@pytest.mark.slow
def test_kto_reference_point_is_estimated_over_every_process(tmp_path):
    """z0 from the KL rows of both processes: each step, each process's loss sees the 16 KL
    rows of both 8-example batches and both estimate the same value (each its own 8 before)."""
    record = tmp_path / "z0"
    cli(
        *DDP_CPU,
        "loss=kto",
        "dataset.batch_size=8",
        "trainer.max_steps=3",
        "optim.scheduler=null",
        "eval.num_prompts=0",
        "+callbacks.z0._target_=test_distributed.kl_recorder",
        f"+callbacks.z0.path={record}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env=env_with_tests(),
    )
    z0 = [json.loads(Path(f"{record}.{rank}").read_text()) for rank in (0, 1)]
    assert len(z0[0]) == len(z0[1]) == 3
    assert all(rows == 16 and batch == 8 for rows, batch, _ in z0[0] + z0[1])
    assert [v for *_, v in z0[0]] == [v for *_, v in z0[1]]
    assert any(v != 0 for *_, v in z0[0][1:])  # after an update the policy has moved


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    cli(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "beta=0.1,0.2",
        "trainer.max_steps=2",
        "eval.num_prompts=4",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    summaries = sorted(
        (json.loads(p.read_text()) for p in sweep.glob("*/summary.json")), key=lambda s: s["beta"]
    )
    assert [s["beta"] for s in summaries] == [0.1, 0.2]
    assert all(s["steps"] == 2 for s in summaries)
    assert any((sweep / ".submitit").iterdir())  # the jobs went through submitit


def test_cluster_presets_compose():
    from hydra import compose, initialize_config_module

    with initialize_config_module("dpo_lab.conf", version_base="1.3"):
        slurm = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        ddp = compose("train", overrides=["trainer=ddp"])
        fsdp = compose("train", overrides=["trainer=fsdp"])
        ds = compose("train", overrides=["trainer=deepspeed"])
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    for key in ("partition", "gpus_per_node", "nodes", "timeout_min", "tasks_per_node"):
        assert key in launcher
    assert launcher.tasks_per_node == launcher.gpus_per_node
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.precision == "bf16-mixed"
    assert fsdp.trainer.strategy._target_.endswith("FSDPStrategy")
    assert (
        ds.trainer.strategy._target_.endswith("DeepSpeedStrategy")
        and ds.trainer.strategy.stage == 3
    )

    from hydra.utils import instantiate

    from dpo_lab.models import _is_decoder_layer

    policy = instantiate(fsdp.trainer.strategy.auto_wrap_policy)
    assert callable(policy)
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    m = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=16,
            hidden_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=16,
        )
    )
    assert sum(_is_decoder_layer(x) for x in m.modules()) == 2


@pytest.mark.slow
def test_ddp_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path):
    """Each rank's loader skips its own processed batches: stop two processes at step 4 of a
    6-step epoch, resume to step 8 (crossing the epoch end), compare with 8 steps straight."""
    resume_against_straight(tmp_path, DDP_CPU)


def resume_against_straight(tmp_path: Path, strategy: list[str], env: dict | None = None):
    """Two processes stopped at step 4 of a 6-step epoch and resumed to step 8 (across the
    epoch end) equal 8 steps straight: losses step by step and the final weights."""
    run = [
        *strategy,
        "dataset.batch_size=8",
        "trainer.max_epochs=5",
        "trainer.log_every_n_steps=1",
        "optim.scheduler=null",
        "eval.num_prompts=0",
        "checkpoint.every_n_steps=2",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli(*run, "trainer.max_steps=8", f"hydra.run.dir={straight}", cwd=tmp_path, env=env)
    cli(*run, "trainer.max_steps=4", f"hydra.run.dir={resumed}", cwd=tmp_path, env=env)
    cli(*run, "trainer.max_steps=8", "resume=auto", f"hydra.run.dir={resumed}", cwd=tmp_path,
        env=env)  # fmt: skip
    l1, l2 = train_losses(straight), train_losses(resumed)
    assert sorted(l1) == sorted(l2) == list(range(8))
    for step in l1:
        assert abs(l1[step] - l2[step]) < DDP_ATOL, (step, l1[step], l2[step])
    w1, w2 = weights(straight), weights(resumed)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < DDP_ATOL
