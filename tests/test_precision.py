"""Precision on CPU: every trainer.precision trains (32-true, bf16-mixed, fp16 with a GradScaler,
bf16-true), an fp16 overflow is the scaler's to skip, the lean LM head follows autocast in its
backward, and precomputed reference log-probs equal live ones under mixed precision."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import make_cfg

from dpo_lab.callbacks import NonFiniteGuard
from dpo_lab.logps import _LinearLogProbs
from dpo_lab.train import build

# fp16 with a GradScaler: Lightning turns precision=16-mixed into bf16-mixed on CPU, so the test
# gives it the plugin (and the scaler) a CUDA run gets from the string
FP16_SCALER = (
    "+trainer.plugins=[{_target_:lightning.pytorch.plugins.precision.MixedPrecision,"
    "precision:16-mixed,device:cpu,"
    "scaler:{_target_:torch.amp.GradScaler,device:cpu,init_scale:256}}]"
)
PRECISIONS = {
    "32-true": ["trainer.precision=32-true"],
    "bf16-mixed": ["trainer.precision=bf16-mixed"],
    "16-mixed": ["trainer.precision=null", FP16_SCALER],
    "bf16-true": ["trainer.precision=bf16-true"],
}
# first-step loss (identical weights, only the arithmetic differs) against 32-true's
LOSS_TOL = {"32-true": 0.0, "bf16-mixed": 2e-2, "16-mixed": 5e-3, "bf16-true": 5e-2}


def losses(out: Path) -> list[float]:
    with open(out / "metrics.csv", newline="") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def fit(out: Path, *overrides: str):
    run = build(
        make_cfg(
            out,
            "trainer.max_steps=4",
            "trainer.log_every_n_steps=1",
            "eval.num_prompts=0",
            "optim.scheduler=null",
            *overrides,
        )
    )
    start = {n: p.detach().clone() for n, p in run.module.policy.named_parameters()}
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return run, start


def first_row(out: Path) -> dict[str, str]:
    with open(out / "metrics.csv", newline="") as f:
        return next(r for r in csv.DictReader(f) if r.get("train/loss"))


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("fp32")
    fit(out, *PRECISIONS["32-true"])
    return losses(out)


LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0", "model.lr=5e-3"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_every_precision_trains_every_weight(tmp_path, precision, mode, fp32_losses):
    lora = LORA if mode == "lora" else []
    run, start = fit(tmp_path, *PRECISIONS[precision], *lora)
    assert run.trainer.global_step == 4
    unchanged = [  # against the start in the trained dtype (bf16-true casts it first)
        n
        for n, p in run.module.policy.named_parameters()
        if p.requires_grad and torch.equal(p.detach(), start[n].to(p.dtype))
    ]
    if precision == "bf16-true" and mode == "full":
        # bf16 weights, no fp32 masters: Adam's steps of about lr = 5e-4 are below half the
        # bf16 spacing of the norm weights (about 1.0: 2^-7), so those never move; the
        # matrices (about 0.03) do. Measured: 0 of each norm weight, 94-97% of each matrix.
        assert unchanged and all(n.endswith("norm.weight") for n in unchanged), unchanged
    else:
        assert not unchanged, unchanged  # an fp16 run whose scaler never steps fails here
    got = losses(tmp_path)
    assert len(got) == 4 and all(map(torch.isfinite, torch.tensor(got)))
    # step 0: the reference computes as the policy does (bf16-true casts both), so the implicit
    # reward is exactly 0 (bf16-true's fp32 reference gave -3.5e-4 before)
    step0 = first_row(tmp_path)
    assert float(step0["train/rewards/margins"]) == 0.0
    assert float(step0["train/rewards/chosen"]) == 0.0
    # step 0: the same weights (LoRA's B is 0), only the arithmetic differs
    assert abs(got[0] - fp32_losses[0]) <= LOSS_TOL[precision], (got[0], fp32_losses[0])
    # the trained weights: fp32 masters, except where the precision itself casts the model
    trained = {p.dtype for p in run.module.policy.parameters() if p.requires_grad}
    assert trained == ({torch.bfloat16} if precision == "bf16-true" else {torch.float32})
    if mode == "lora":
        assert all("lora_" in n for n, p in run.module.policy.named_parameters() if p.requires_grad)


def test_pure_fp16_is_refused_with_its_reason(tmp_path):
    from dpo_lab.errors import ConfigError
    from dpo_lab.train import check_config

    with pytest.raises(ConfigError, match="fp16 weights with no loss scaling"):
        check_config(make_cfg(tmp_path, "trainer.precision=16-true"))


@pytest.mark.slow
def test_an_fp16_overflow_is_skipped_by_the_scaler_and_counted(tmp_path):
    """An inf gradient under fp16 with a GradScaler is an ordinary overflow: the scaler skips
    that step and halves its scale; the run goes on, counts it, and raises nothing."""
    run = build(
        make_cfg(
            tmp_path,
            "trainer.max_steps=3",
            "trainer.log_every_n_steps=1",
            "eval.num_prompts=0",
            *PRECISIONS["16-mixed"],
        )
    )
    head = run.module.policy.lm_head.weight
    state: dict[str, torch.Tensor] = {}

    def overflow_at_step_1(grad):
        if run.trainer.global_step == 1:
            state["before"] = head.detach().clone()
            return torch.full_like(grad, float("inf"))
        return grad

    head.register_hook(overflow_at_step_1)
    scaler = run.trainer.precision_plugin.scaler
    scales = []

    import lightning as L

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            scales.append(scaler.get_scale())
            if trainer.global_step == 2:  # the step with the overflow: nothing moved
                state["after"] = head.detach().clone()

    run.trainer.callbacks.append(Watch())
    run.trainer.fit(run.module, datamodule=run.datamodule)
    guard = next(c for c in run.trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert run.trainer.global_step == 3 and guard.overflows == 1 and guard.skipped == 0
    assert torch.equal(state["before"], state["after"])
    assert scales[1] == scales[0] / 2  # the scaler saw the overflow and backed off
    assert float(run.trainer.callback_metrics["train/skipped_overflow"]) == 1.0


def test_lean_head_follows_autocast_in_backward():
    """Values and gradients of the recomputing LM head equal autograd through the same bf16
    autocast forward, and its backward matmuls run in bf16 as autograd's do (before, they ran
    in fp32 against a logsumexp of bf16 logits: grad_h off by 2.7e-3 relative here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    M, H, V = 64, 32, 500
    h = torch.randn(M, H, requires_grad=True)
    W = (torch.randn(V, H) * 0.2).requires_grad_()
    y, g = torch.randint(0, V, (M,)), torch.randn(M)

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("mm", "addmm", "bmm"):
                self.dtypes.add(args[0].dtype)
            return func(*args, **(kwargs or {}))

    def lean():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _LinearLogProbs.apply(h, W, None, y, 16)
        with MatmulDtypes() as mode:  # the backward's matmuls
            gh, gw = torch.autograd.grad((out * g).sum(), (h, W))
        return out.detach(), gh, gw, mode.dtypes

    def reference():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = torch.nn.functional.linear(h, W).float()
            out = logits.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
        gh, gw = torch.autograd.grad((out * g).sum(), (h, W))
        return out.detach(), gh, gw

    out, gh, gw, dtypes = lean()
    ref_out, ref_gh, ref_gw = reference()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert (out - ref_out).abs().max() < 1e-5
    assert rel(gh, ref_gh) < 1e-5
    # W's gradient sums 4 chunks' bf16 products in fp32 where autograd rounds one product to
    # bf16 once: within bf16's resolution (2^-8 = 3.9e-3), measured 2.4e-3
    assert rel(gw, ref_gw) < 4e-3
    assert dtypes == {torch.bfloat16}


@pytest.mark.slow
def test_precomputed_reference_equals_live_under_mixed_precision(tmp_path):
    """The cache scores under the run's autocast, as the live reference does inside the step:
    the same reference log-probs, so the same training (before: fp32 against bf16 values)."""
    common = ["trainer.precision=bf16-mixed", "dataset.group_by_length=false"]
    fit(tmp_path / "live", *common)
    fit(tmp_path / "pre", *common, "reference.precompute=true")

    def ref_logps(out):
        with open(out / "metrics.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("train/ref_logps/chosen")]
        return [float(r["train/ref_logps/chosen"]) for r in rows]

    live, pre = ref_logps(tmp_path / "live"), ref_logps(tmp_path / "pre")
    assert len(live) == len(pre) == 4
    assert max(abs(a - b) for a, b in zip(live, pre, strict=True)) < 1e-3, (live, pre)
    assert losses(tmp_path / "live") == pytest.approx(losses(tmp_path / "pre"), abs=1e-3)


def test_plugins_from_the_config_reach_the_trainer(tmp_path):
    run = build(make_cfg(tmp_path, *PRECISIONS["16-mixed"]))
    plugin = run.trainer.precision_plugin
    assert plugin.precision == "16-mixed" and plugin.scaler.get_scale() == 256


@pytest.mark.slow
def test_a_nan_that_no_loss_scale_removes_stops_the_run(tmp_path):
    """Under fp16, non-finite gradients from a finite loss are first the scaler's to skip; when
    they keep coming (a NaN no scale removes), the run stops rather than stall forever."""
    from dpo_lab.errors import NonFiniteError

    run = build(
        make_cfg(
            tmp_path,
            "trainer.max_steps=10",
            "eval.num_prompts=0",
            *PRECISIONS["16-mixed"],
        )
    )
    guard = next(c for c in run.trainer.callbacks if isinstance(c, NonFiniteGuard))
    guard.MAX_OVERFLOWS = 3
    head = run.module.policy.lm_head.weight
    head.register_hook(lambda g: torch.full_like(g, float("nan")) if run.trainer.global_step else g)
    with pytest.raises(NonFiniteError, match="3 steps in a row.*not an overflow"):
        run.trainer.fit(run.module, datamodule=run.datamodule)
    assert guard.overflows == 3


def test_the_guard_names_no_gradient_it_cannot_find():
    """A norm that is non-finite while no gradient here is (another process's shard under FSDP):
    the error says so. Before, next() without a default raised StopIteration inside the hook,
    which Lightning takes for the end of the epoch: training stopped silently."""
    from types import SimpleNamespace

    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    opt = torch.optim.SGD([p], lr=0.1)
    module = torch.nn.Module()
    module.w = p
    guard = NonFiniteGuard()
    err = guard._error(SimpleNamespace(global_step=3), module, opt, [], ["a"], bad_loss=False)
    assert "no single gradient here is non-finite" in str(err)
    err = guard._error(SimpleNamespace(global_step=3), module, opt, [torch.ones(())], [], True)
    assert "on another process" in str(err)
