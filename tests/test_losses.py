"""Each loss against values worked out by hand, gradient signs, and registry-wide properties."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from dpo_lab.errors import ConfigError
from dpo_lab.losses import LOSSES, PairedLogps, UnpairedLogps, bind_loss_kwargs, get_loss

CONF = Path(__file__).resolve().parents[1] / "conf" / "loss"


def paired(chosen, rejected, chosen_tokens=1.0, rejected_tokens=1.0, grad=False) -> PairedLogps:
    t = lambda x: torch.tensor([float(x)], requires_grad=grad)  # noqa: E731
    return PairedLogps(t(chosen), t(rejected), t(chosen_tokens), t(rejected_tokens))


def softplus(x: float) -> float:  # −log σ(−x) = log(1 + eˣ)
    return math.log1p(math.exp(x))


# policy (−1, −3), reference (−2, −2): chosen log-ratio +1, rejected −1, h = 2.
POL, REF = (-1.0, -3.0), (-2.0, -2.0)


def run(name, policy, reference, **kw):
    return LOSSES[name](policy, reference, **kw)


def test_dpo_by_hand():
    out = run("dpo", paired(*POL), paired(*REF), beta=0.5)  # β·h = 1
    assert out.losses.item() == pytest.approx(softplus(-1.0))  # −log σ(1) = 0.31326
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)
    # Δ = 0 gives log 2, for any β
    assert run("dpo", paired(-5, -7), paired(-5, -7), beta=3.0).losses.item() == pytest.approx(
        math.log(2)
    )


def test_cdpo_and_robust_by_hand():
    eps = 0.1
    right, wrong = softplus(-1.0), softplus(1.0)  # −log σ(1), −log σ(−1)
    cdpo = run("dpo", paired(*POL), paired(*REF), beta=0.5, label_smoothing=eps)
    assert cdpo.losses.item() == pytest.approx(0.9 * right + 0.1 * wrong)  # 0.413262
    robust = run("dpo", paired(*POL), paired(*REF), beta=0.5, label_smoothing=eps, robust=True)
    assert robust.losses.item() == pytest.approx((0.9 * right - 0.1 * wrong) / 0.8)  # 0.188262
    with pytest.raises(ConfigError, match="label_smoothing"):
        run("dpo", paired(*POL), paired(*REF), beta=0.5, label_smoothing=0.5)


def test_ipo_by_hand():
    out = run("ipo", paired(*POL), paired(*REF), beta=0.5)  # h = 2, target 1/(2β) = 1
    assert out.losses.item() == pytest.approx(1.0)
    # per-token form: chosen log-ratio 1/2 tokens, rejected −1/4 tokens → h = 0.75
    pol = paired(*POL, chosen_tokens=2, rejected_tokens=4)
    avg = run("ipo", pol, paired(*REF), beta=0.5, average_log_ratios=True)
    assert avg.losses.item() == pytest.approx((0.75 - 1.0) ** 2)


def test_hinge_by_hand():
    assert run("hinge", paired(*POL), paired(*REF), beta=0.5).losses.item() == 0.0  # 1 − 1
    assert run("hinge", paired(*POL), paired(*REF), beta=0.25).losses.item() == pytest.approx(0.5)


def test_dpop_by_hand():
    # chosen above the reference: no penalty, same as DPO
    same = run("dpop", paired(*POL), paired(*REF), beta=0.5)
    assert same.losses.item() == pytest.approx(softplus(-1.0))
    # chosen log-ratio −1 (penalty 1), rejected −3: h = 2, β·(2 − 50·1) = −4.8
    out = run("dpop", paired(-3, -5), paired(*REF), beta=0.1, lambda_=50.0)
    assert out.losses.item() == pytest.approx(softplus(4.8))


def test_rpo_by_hand():
    out = run("rpo", paired(*POL, chosen_tokens=2), paired(*REF), beta=0.5, alpha=1.0)
    assert out.losses.item() == pytest.approx(softplus(-1.0) + 0.5)  # NLL = 1/2 per token


def test_simpo_by_hand():
    # averages −2/4 = −0.5 and −6/3 = −2; β = 2 → rewards −1 and −4; margin 3 − γ 0.5
    out = run("simpo", paired(-2, -6, 4, 3), None, beta=2.0, gamma_beta_ratio=0.25)
    assert out.losses.item() == pytest.approx(softplus(-2.5))  # 0.078889
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-1.0, -4.0))
    # γ moves with β: at β = 4, γ = 1; rewards −2 and −8, margin 6 − 1
    out = run("simpo", paired(-2, -6, 4, 3), None, beta=4.0, gamma_beta_ratio=0.25)
    assert out.losses.item() == pytest.approx(softplus(-5.0))


def test_orpo_by_hand():
    # per-token probabilities 1/2 and 1/4: odds 1 and 1/3, log odds ratio log 3
    out = run("orpo", paired(math.log(0.5), math.log(0.25)), None, beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(2) - 0.1 * math.log(0.75))  # 0.721915
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(math.log(3))


def test_sft_by_hand():
    assert run("sft", paired(-3, -1, 3, 1), None).losses.item() == pytest.approx(1.0)


def unpaired(completion, desirable, kl, grad=False) -> UnpairedLogps:
    c = torch.tensor(completion, requires_grad=grad)
    k = torch.tensor(kl, requires_grad=grad)
    return UnpairedLogps(c, torch.ones_like(c), torch.tensor(desirable), k)


def test_kto_by_hand():
    # r = [1, −1]; KL rows: policy −3, reference −4 → z₀ = 1
    pol = unpaired([-1.0, -2.0], [True, False], [-3.0, -3.0])
    ref = unpaired([-2.0, -1.0], [True, False], [-4.0, -4.0])
    out = run("kto", pol, ref, beta=1.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert out.losses.tolist() == pytest.approx([1 - sig(0.0), 1 - sig(2.0)])
    assert out.metrics["kl"].item() == pytest.approx(1.0)
    # weights scale each side
    w = run("kto", pol, ref, beta=1.0, desirable_weight=2.0, undesirable_weight=0.5)
    assert w.losses.tolist() == pytest.approx([2 * (1 - sig(0.0)), 0.5 * (1 - sig(2.0))])


def test_kto_reference_point_is_clamped_and_detached():
    pol = unpaired([-1.0, -2.0], [True, False], [-5.0, -5.0], grad=True)
    ref = unpaired([-2.0, -1.0], [True, False], [-4.0, -4.0])  # KL estimate −1 → z₀ = 0
    out = run("kto", pol, ref, beta=1.0)
    assert out.metrics["kl"].item() == 0.0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert out.losses.tolist() == pytest.approx([1 - sig(1.0), 1 - sig(1.0)])
    out.losses.sum().backward()
    assert pol.kl.grad is None  # no gradient through z₀
    assert pol.completion.grad is not None


def test_kto_needs_two_examples():
    one = unpaired([-1.0], [True], [-1.0])
    with pytest.raises(ValueError, match="at least 2 examples"):
        run("kto", one, one, beta=0.1)


# ------------------------------------------------------------------ registry-wide properties


def default_kwargs(name: str) -> dict:
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    kw = {k: v for k, v in cfg["loss"].items() if k != "name"}
    if "beta" in kw:
        kw["beta"] = cfg["beta"]
    return kw


def inputs(spec, grad: bool):
    if spec.data == "unpaired":
        pol = unpaired([-4.0, -6.0, -5.0, -7.0], [True, False, True, False], [-9.0] * 4, grad)
        ref = unpaired([-4.5, -5.5, -5.0, -6.5], [True, False, True, False], [-9.5] * 4)
    else:

        def mk(c, r, g):
            chosen = torch.tensor([c, c - 1.0], requires_grad=g)
            rejected = torch.tensor([r, r + 0.5], requires_grad=g)
            # shared prefixes: chosen (5, 7) and rejected (6, 4) tokens share (5, 4) tokens
            shares = torch.tensor([1.0, 4 / 7]), torch.tensor([5 / 6, 1.0])
            return PairedLogps(
                chosen, rejected, torch.tensor([5.0, 7.0]), torch.tensor([6.0, 4.0]),
                chosen * shares[0], rejected * shares[1],
                torch.tensor([-0.2, -0.4]), torch.tensor([-0.3, -0.1]),
            )  # fmt: skip

        pol, ref = mk(-6.0, -7.0, grad), mk(-6.5, -6.5, False)
    return pol, (ref if spec.reference else None)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_has_a_matching_yaml(name):
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    assert cfg["loss"]["name"] == name
    spec = get_loss(name)
    bind_loss_kwargs(spec, default_kwargs(name))  # yaml keys are the function's parameters
    doc = spec.fn.__doc__ or ""
    assert "arXiv" in doc or name == "sft", f"{name}: docstring must cite its paper"


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_shape_finite_detached(name):
    spec = get_loss(name)
    pol, ref = inputs(spec, grad=True)
    out = spec(pol, ref, **default_kwargs(name))
    B = 4 if spec.data == "unpaired" else 2
    assert out.losses.shape == (B,)
    assert torch.isfinite(out.losses).all()
    assert not out.chosen_rewards.requires_grad
    assert out.rejected_rewards is None or not out.rejected_rewards.requires_grad
    assert all(not v.requires_grad for v in out.metrics.values())


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_gradient_sign(name):
    """Raising a preferred completion's log-prob lowers the loss; a dispreferred one's raises it.

    (SFT ignores the rejected completion, and the hinge can be flat; APO-down pushes the chosen
    completion down by design; DiscoPOP rises with the margin just above 0, so it is checked
    past that region: all checked as such.)
    """
    spec = get_loss(name)
    pol, ref = inputs(spec, grad=True)
    kw = default_kwargs(name)
    if name == "hinge":
        kw["beta"] = 0.01  # inside the margin, so the hinge is not flat
    if name == "discopop":
        kw["beta"] = 1.0  # β·h = 1, past the non-monotone region around 0 (test_discopop_by_hand)
    spec(pol, ref, **kw).losses.sum().backward()
    if spec.data == "unpaired":
        g, d = pol.completion.grad, pol.desirable
        assert (g[d] < 0).all() and (g[~d] > 0).all()
    elif name == "apo_down":
        assert (pol.chosen.grad > 0).all() and (pol.rejected.grad > 0).all()
        assert (pol.rejected.grad > pol.chosen.grad).all()  # rejected down further
    else:
        assert (pol.chosen.grad < 0).all()
        if name == "sft":
            assert pol.rejected.grad is None or (pol.rejected.grad == 0).all()
        else:
            assert (pol.rejected.grad > 0).all()


def test_reference_free_losses_take_no_reference():
    free = {n for n, s in LOSSES.items() if not s.reference}
    assert {"simpo", "orpo", "sft"} <= free
    for name in free:
        spec = get_loss(name)
        pol, _ = inputs(spec, grad=False)
        spec(pol, None, **default_kwargs(name))  # runs with no reference at all


def test_unknown_and_missing_keys_are_named():
    spec = get_loss("dpo")
    with pytest.raises(
        ConfigError, match=r"loss\.label_smoothin.*accepted: beta, divergence, .*label_smoothing"
    ):
        bind_loss_kwargs(spec, {"beta": 0.1, "label_smoothin": 0.1})
    with pytest.raises(ConfigError, match=r"missing key\(s\) loss\.beta"):
        bind_loss_kwargs(spec, {})
    with pytest.raises(ConfigError, match="registered: .*dpo.*simpo"):
        get_loss("dpoo")
