"""End to end on the shrunk embedded task: artifacts, metric names, the frozen reference,
checkpoints without the reference, every registered loss training, and W&B offline."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from dpo_lab.losses import LOSSES
from dpo_lab.train import build, finish, train

README = Path(__file__).resolve().parents[1] / "README.md"

PAIRED_METRICS = [
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "ref_logps/chosen", "ref_logps/rejected",
]  # fmt: skip
PROBE_METRICS = [
    "probe/logps/chosen", "probe/logps/rejected", "probe/logratios/chosen",
    "probe/logratios/rejected", "probe/frac_chosen_below_ref", "probe/rewards/accuracies",
]  # fmt: skip


def header(path: Path) -> list[str]:
    with open(path) as f:
        return next(csv.reader(f))


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    from conftest import make_cfg

    out = tmp_path_factory.mktemp("dpo_run")
    summary = train(make_cfg(out))
    return out, summary


@pytest.mark.slow
def test_artifacts(dpo_run):
    out, summary = dpo_run
    for name in (
        "config.yaml",
        "metrics.csv",
        "probe.csv",
        "probe.png",
        "summary.json",
        "samples.jsonl",
        "final/config.json",
        "final/tokenizer.json",
    ):
        assert (out / name).exists(), name
    assert json.loads((out / "summary.json").read_text()) == pytest.approx(summary)
    assert summary["steps"] == 6  # 96 pairs / 16 per batch, 1 epoch
    assert 0.0 <= summary["val/rewards/accuracies"] <= 1.0
    rows = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert len(rows) == 16 * 2  # eval.num_prompts × eval.samples_per_prompt (the shrunk config)
    assert summary["eval/reward/reference"] == pytest.approx(
        sum(r["reference_reward"] for r in rows) / len(rows)
    )
    from PIL import Image  # matplotlib depends on pillow

    assert Image.open(out / "probe.png").size[0] > 300


@pytest.mark.slow
def test_metric_names_are_logged_and_documented(dpo_run):
    out, _ = dpo_run
    cols = set(header(out / "metrics.csv"))
    expected = {f"{s}/{m}" for s in ("train", "val") for m in PAIRED_METRICS} | set(PROBE_METRICS)
    expected |= {"eval/reward/policy", "eval/reward/reference", "eval/kl"}
    assert expected <= cols, expected - cols
    documented = documented_metrics()
    undocumented = sorted(c for c in cols if "/" in c and c not in documented)
    assert not undocumented, f"metrics missing from the README table: {undocumented}"


def documented_metrics() -> set[str]:
    """Names in the first column of the README's metrics table, ``{a,b}/x`` expanded."""
    text = README.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            m = re.match(r"\{([^}]*)\}(.*)", name)
            names |= {p + m.group(2) for p in m.group(1).split(",")} if m else {name}
    return names


@pytest.mark.slow
def test_probe_table(dpo_run):
    out, _ = dpo_run
    rows = list(csv.DictReader(open(out / "probe.csv")))
    steps = sorted({int(r["step"]) for r in rows})
    assert steps == [0, 2, 4, 6]  # step 0, every 2 steps, the last
    assert len(rows) == 16 * len(steps)
    step0 = [r for r in rows if r["step"] == "0"]
    for r in step0:  # before any update the policy is the reference
        assert float(r["policy_chosen_logps"]) == pytest.approx(float(r["reference_chosen_logps"]))
    last = [r for r in rows if int(r["step"]) == 6]
    assert any(float(r["policy_chosen_logps"]) != float(r["reference_chosen_logps"]) for r in last)


@pytest.mark.slow
def test_final_loads_with_transformers(dpo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = dpo_run
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("moonrise was", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == len(tok)


def fit_steps(cfg):
    """Build a run and train it, keeping copies of the starting weights."""
    run = build(cfg)
    start = {k: v.clone() for k, v in run.module.policy.state_dict().items()}
    ref_start = (
        {k: v.clone() for k, v in run.module.reference.model.state_dict().items()}
        if run.module.reference is not None
        else None
    )
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return run, start, ref_start


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_trains_and_the_reference_stays_frozen(cfg_factory, name):
    run, start, ref_start = fit_steps(
        cfg_factory(
            f"loss={name}", "trainer.max_steps=2", "eval.num_prompts=0", "optim.scheduler=null"
        )
    )
    module = run.module
    assert run.trainer.global_step == 2
    changed = {
        k: not torch.equal(v, start[k])
        for k, v in module.policy.named_parameters()
        if v.requires_grad
    }
    assert all(changed.values()), [k for k, c in changed.items() if not c]
    if LOSSES[name].reference:
        assert module.reference is not None and not module.reference.model.training
        # the reference is not a submodule: not in the module's parameters or checkpoint
        ref_ids = {id(p) for p in module.reference.model.parameters()}
        assert not ref_ids & {id(p) for p in module.parameters()}
        for k, v in module.reference.model.state_dict().items():
            assert torch.equal(v, ref_start[k]), k
        assert all(
            not p.requires_grad and p.grad is None for p in module.reference.model.parameters()
        )
        opt_params = {id(p) for g in run.trainer.optimizers[0].param_groups for p in g["params"]}
        assert not opt_params & {id(p) for p in module.reference.model.parameters()}
    else:
        assert module.reference is None  # a reference-free loss never builds one


@pytest.mark.slow
def test_checkpoint_leaves_the_reference_out(cfg_factory, tmp_path):
    run, _, _ = fit_steps(cfg_factory("trainer.max_steps=2", "eval.num_prompts=0"))
    path = tmp_path / "x.ckpt"
    run.trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert state and all(k.startswith("policy.") for k in state)
    # and it loads back strictly into a freshly built module
    fresh = build(cfg_factory("trainer.max_steps=2", "eval.num_prompts=0"))
    ckpt = torch.load(path, weights_only=False)
    fresh.module.on_load_checkpoint(ckpt)
    fresh.module.load_state_dict(ckpt["state_dict"], strict=True)
    for k, v in fresh.module.policy.state_dict().items():
        assert torch.equal(v, run.module.policy.state_dict()[k])


@pytest.mark.slow
def test_wandb_offline(cfg_factory):
    cfg = cfg_factory("logger=wandb", "trainer.max_steps=2", "eval.num_prompts=4")
    run, _, _ = fit_steps(cfg)
    summary = finish(run, 0.0)
    out = Path(cfg.output_dir)
    assert (out / "metrics.csv").exists()  # CSV is always written
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert "eval/kl" in summary
    # beyond scalars: the samples table, the probe's per-example trajectories and its figure
    media = runs[0] / "files" / "media"
    (samples,) = (media / "table" / "eval").glob("samples_*.table.json")
    table = json.loads(samples.read_text())
    assert table["columns"] == [
        "prompt",
        "sample",
        "policy",
        "reference",
        "policy_reward",
        "reference_reward",
        "policy_logratio",
        "policy_capped",
    ]
    assert len(table["data"]) == 4 * 2  # prompts × samples per prompt
    (traj,) = (media / "table" / "probe").glob("trajectories_*.table.json")
    table = json.loads(traj.read_text())
    assert table["columns"][:2] == ["step", "example_id"] and "logratio_chosen" in table["columns"]
    assert len(table["data"]) == 16 * 2  # 16 probe pairs at steps 0 and 2
    assert any((media / "images" / "probe").glob("plot_*.png"))


@pytest.mark.slow
def test_the_default_learns(tmp_path):
    """The real default config (not shrunk) moves the policy toward the true reward."""
    from conftest import make_cfg

    cfg = make_cfg(tmp_path, "trainer.enable_progress_bar=false", small=False)
    summary = train(cfg)
    assert summary["eval/reward/policy"] > summary["eval/reward/reference"] + 0.3
    assert summary["val/rewards/accuracies"] > 0.6


@pytest.mark.slow
def test_a_local_model_directory_goes_through_the_hub_path(cfg_factory, tmp_path):
    """``model.name_or_path=<dir>`` loads with ``Auto*.from_pretrained``, as a hub id would."""
    run, start, _ = fit_steps(
        cfg_factory(
            f"model.name_or_path={local_model(tmp_path)}",
            "trainer.max_steps=2",
            "eval.num_prompts=0",
        )
    )
    assert run.module.policy.config.hidden_size == 32  # the local model, not the builtin one
    assert run.trainer.global_step == 2
    assert not torch.equal(
        run.module.policy.state_dict()["lm_head.weight"], start["lm_head.weight"]
    )


def readme_block(lang: str, after: str) -> str:
    text = README.read_text().split(after, 1)[1]
    return text.split(f"```{lang}\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_adding_a_loss_example_works(tmp_path):
    """The README's new-loss example, as written, registers, composes and trains two steps."""
    from conftest import make_cfg

    import dpo_lab.losses as losses

    code = readme_block("python", "### Adding a loss")
    yaml_text = readme_block("yaml", "### Adding a loss")
    name = re.search(r'@register_loss\("(\w+)"', code).group(1)
    conf = tmp_path / "conf" / "loss"
    conf.mkdir(parents=True)
    (conf / f"{name}.yaml").write_text(yaml_text)
    try:
        exec(compile(code, "README.md", "exec"), vars(losses))
        cfg = make_cfg(
            tmp_path / "run",
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            f"loss={name}",
            "trainer.max_steps=2",
            "eval.num_prompts=0",
        )
        assert cfg.loss.name == name
        run = build(cfg)
        run.trainer.fit(run.module, datamodule=run.datamodule)
        assert run.trainer.global_step == 2
    finally:
        losses.LOSSES.pop(name, None)


def local_model(tmp_path: Path) -> Path:
    from conftest import tiny_llama

    from dpo_lab.tasks.sentiment import build_tokenizer

    tok = build_tokenizer()
    tiny_llama(vocab=len(tok), seed=3).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "kto_local"])
def test_local_files_train_end_to_end(cfg_factory, tmp_path, kind):
    """A user's own file and model: dataset=local (pairs, DPO) and dataset=kto_local (KTO)."""
    import random

    from dpo_lab.tasks import sentiment

    rng = random.Random(0)
    rows = []
    for _ in range(40):
        p, a = sentiment.sample_review(rng)
        b = sentiment.sample_completion(rng, 0.5)
        if kind == "local":
            rows.append({"prompt": p, "chosen": a, "rejected": b})
        else:
            rows.append({"prompt": p, "completion": a, "label": sentiment.reward(p, a) > 0})
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loss = "kto" if kind == "kto_local" else "dpo"
    run, start, _ = fit_steps(
        cfg_factory(
            f"dataset={kind}",
            f"dataset.path={path}",
            "dataset.val_size=8",
            f"model.name_or_path={local_model(tmp_path)}",
            f"loss={loss}",
            "dataset.batch_size=8",
            "trainer.max_steps=2",
            "eval.num_prompts=0",
        )
    )
    assert run.trainer.global_step == 2
    assert len(run.datamodule.train_items) == 32
    assert (run.probe is None) == (kind == "kto_local")  # unpaired data has no pairs to probe
    assert not torch.equal(
        run.module.policy.state_dict()["lm_head.weight"], start["lm_head.weight"]
    )


@pytest.mark.slow
def test_a_row_with_an_empty_response_trains(cfg_factory, tmp_path):
    """The real hh-rlhf shape: an empty final response is kept (the completion is EOS alone),
    trained on and counted in the data metrics, not a bad row that stops the run."""
    import random

    from dpo_lab.tasks import sentiment

    rng = random.Random(0)
    rows = []
    for i in range(24):
        p, a = sentiment.sample_review(rng)
        b = "" if i in (0, 3) else sentiment.sample_completion(rng, 0.5)
        rows.append({"prompt": p, "chosen": a, "rejected": b})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = cfg_factory(
        "dataset=local",
        f"dataset.path={path}",
        f"dataset.val_path={path}",
        f"model.name_or_path={local_model(tmp_path)}",
        "dataset.batch_size=24",
        "trainer.max_steps=1",
        "trainer.log_every_n_steps=1",
        "eval.num_prompts=0",
        f"output_dir={out}",
    )
    run, _, _ = fit_steps(cfg)
    eos = run.tokenizer.eos_token_id
    empty = [it for it in run.datamodule.train_items if it["rejected_ids"] == [eos]]
    assert len(empty) == 2 and len(run.datamodule.train_items) == 24
    assert torch.isfinite(run.trainer.callback_metrics["train/loss"])
    (data_row,) = [
        r for r in csv.DictReader(open(out / "metrics.csv")) if r.get("data/empty_responses/train")
    ]
    assert data_row["data/empty_responses/train"] == "2"


@pytest.mark.slow
def test_gradient_checkpointing_trains(cfg_factory):
    run, start, _ = fit_steps(
        cfg_factory(
            "model.gradient_checkpointing=true", "trainer.max_steps=2", "eval.num_prompts=0"
        )
    )
    assert run.module.policy.is_gradient_checkpointing
    assert not torch.equal(
        run.module.policy.state_dict()["lm_head.weight"], start["lm_head.weight"]
    )
