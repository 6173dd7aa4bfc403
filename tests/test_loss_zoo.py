"""The losses added for the loss zoo, each against values worked out by hand; the f-divergence
option, WPO weighting and mixtures; and every loss TRL also has against TRL's own code."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dpo_lab.errors import ConfigError
from dpo_lab.losses import LOSSES, PairedLogps, RunningMean, resolve


def sp(x: float) -> float:  # softplus: −log σ(−x) = log(1 + eˣ)
    return math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def paired(c, r, ct=1.0, rt=1.0, cs=None, rs=None, ca=None, ra=None, grad=False) -> PairedLogps:
    t = lambda x: None if x is None else torch.tensor([float(x)], requires_grad=grad)  # noqa: E731
    return PairedLogps(t(c), t(r), t(ct), t(rt), t(cs), t(rs), t(ca), t(ra))


# policy (−1, −3), reference (−2, −2): chosen log-ratio +1, rejected −1, h = 2.
POL, REF = (-1.0, -3.0), (-2.0, -2.0)


def run(name, policy, reference, **kw):
    return LOSSES[name](policy, reference, **kw)


def one(name, **kw) -> float:
    return run(name, paired(*POL), paired(*REF), **kw).losses.item()


# ----------------------------------------------------------------- f-divergences (loss=dpo)


def test_dpo_divergences_by_hand():
    # reverse KL: h = 2, β·h = 1
    assert one("dpo", beta=0.5, divergence="reverse_kl") == pytest.approx(sp(-1.0))
    # forward KL: f′ = 1 − 1/u: (1 − e⁻¹) − (1 − e) = e − e⁻¹
    assert one("dpo", beta=0.5, divergence="forward_kl") == pytest.approx(
        sp(-0.5 * (math.e - 1 / math.e))
    )
    # Jensen-Shannon: log σ(1) − log σ(−1) = 1
    assert one("dpo", beta=0.5, divergence="js_divergence") == pytest.approx(sp(-0.5))
    # α = 1/2: 2·(1 − e^−½) − 2·(1 − e^½) = 4·sinh(½)
    alpha = one("dpo", beta=0.5, divergence="alpha_divergence", divergence_alpha=0.5)
    assert alpha == pytest.approx(sp(-0.5 * 4 * math.sinh(0.5)))
    # α → 0 is reverse KL, α → 1 forward KL
    near0 = one("dpo", beta=0.5, divergence="alpha_divergence", divergence_alpha=1e-6)
    near1 = one("dpo", beta=0.5, divergence="alpha_divergence", divergence_alpha=1 - 1e-6)
    assert near0 == pytest.approx(sp(-1.0), rel=1e-4)
    assert near1 == pytest.approx(one("dpo", beta=0.5, divergence="forward_kl"), rel=1e-4)
    with pytest.raises(ConfigError, match="divergence='kl'.*reverse_kl, forward_kl"):
        one("dpo", beta=0.5, divergence="kl")
    with pytest.raises(ConfigError, match="divergence_alpha must be in"):
        one("dpo", beta=0.5, divergence="alpha_divergence", divergence_alpha=1.0)


# ----------------------------------------------------------------- paired, with a reference


def test_exo_pair_by_hand():
    # β·h = 1: q = (σ(1), σ(−1)) against p = (0.9, 0.1)
    qc, qr = sig(1.0), sig(-1.0)
    expected = qc * (math.log(qc) - math.log(0.9)) + qr * (math.log(qr) - math.log(0.1))
    assert one("exo_pair", beta=0.5, label_smoothing=0.1) == pytest.approx(expected)  # 0.19707
    # q = p makes the KL 0: β·h = log(0.9/0.1)
    h = math.log(9) / 0.5
    exact = run("exo_pair", paired(h / 2, -h / 2), paired(0, 0), beta=0.5, label_smoothing=0.1)
    assert exact.losses.item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ConfigError, match=r"\(0, 0.5\) for exo_pair"):
        one("exo_pair", beta=0.5, label_smoothing=0.0)


def test_nca_pair_by_hand():
    # rewards 0.5 and −0.5
    assert one("nca_pair", beta=0.5) == pytest.approx(sp(-0.5) + 0.5 * sp(0.5) + 0.5 * sp(-0.5))


def test_bco_pair_by_hand_with_its_running_shift():
    state = RunningMean().train()
    # batch 1: rewards 0.5 and −0.5 → δ = 0
    out = run("bco_pair", paired(*POL), paired(*REF), beta=0.5, state=state)
    assert out.losses.item() == pytest.approx(2 * sp(-0.5))
    assert out.metrics["delta"].item() == 0.0
    # batch 2: log-ratios 2 and 1, rewards 1 and 0.5 → δ = (0.5 − 0.5 + 1 + 0.5)/4 = 0.375
    out = run("bco_pair", paired(0, -1), paired(*REF), beta=0.5, state=state)
    assert out.losses.item() == pytest.approx(sp(-(1 - 0.375)) + sp(0.5 - 0.375))
    assert (state.mean, state.count) == (0.375, 4)
    # a non-finite reward (a step the non-finite guard skips) leaves δ alone
    run("bco_pair", paired(float("nan"), -1), paired(*REF), beta=0.5, state=state)
    assert state.mean == pytest.approx((0.375 * 4 + 0.5) / 5) and state.count == 5
    # validation reads δ, never moves it
    state.eval()
    out = run("bco_pair", paired(5, -5), paired(*REF), beta=0.5, state=state)
    assert out.metrics["delta"].item() == pytest.approx(0.4) and state.count == 5
    # it is checkpointed, and no cast reaches it (bf16 would round 0.123456789 to 0.12353515625)
    state.mean = 0.123456789
    fresh = RunningMean()
    fresh.load_state_dict(state.state_dict())
    fresh.to(torch.bfloat16)
    assert (fresh.mean, fresh.count) == (0.123456789, 5)
    # without a state (a stand-in call), a fresh one is read: δ = 0
    assert LOSSES["bco_pair"](paired(*POL), paired(*REF), beta=0.5).losses.item() == pytest.approx(
        2 * sp(-0.5)
    )


def test_sppo_hard_by_hand():
    assert one("sppo_hard", beta=0.5) == pytest.approx(0.0)  # log-ratios ±1 = targets ±1/(2β)
    assert one("sppo_hard", beta=0.25) == pytest.approx(2.0)  # targets ±2: (1 − 2)² + (−1 + 2)²


def test_aot_sorts_the_batch_by_hand():
    pol = PairedLogps(*map(torch.tensor, ([-1.0, -2.0], [-3.0, -1.0], [1.0, 1.0], [1.0, 1.0])))
    ref = PairedLogps(*map(torch.tensor, ([-2.0, -1.0], [-2.0, -4.0], [1.0, 1.0], [1.0, 1.0])))
    # margins: policy (2, −1) → sorted (−1, 2); reference (0, 3) → sorted (0, 3); Δ = (−1, −1)
    out = run("aot", pol, ref, beta=1.0)
    assert out.losses.tolist() == pytest.approx([sp(1.0), sp(1.0)])
    # per example it would have been Δ = (2, −4): sorting is the loss
    assert out.losses.tolist() != pytest.approx([sp(-2.0), sp(4.0)])
    smooth = run("aot", pol, ref, beta=1.0, label_smoothing=0.1)
    assert smooth.losses[0].item() == pytest.approx(0.9 * sp(1.0) + 0.1 * sp(-1.0))
    # unpaired: chosen log-ratios (1, −1) → (−1, 1); rejected (−1, 3) → (−1, 3); Δ = (0, −2)
    out = run("aot_unpaired", pol, ref, beta=1.0)
    assert out.losses.tolist() == pytest.approx([math.log(2), sp(2.0)])
    assert LOSSES["aot"].batchwise and LOSSES["aot_unpaired"].batchwise


def test_apo_by_hand():
    assert one("apo_zero", beta=0.5) == pytest.approx((1 - sig(0.5)) + sig(-0.5))
    assert one("apo_down", beta=0.5) == pytest.approx(sig(0.5) + (1 - sig(1.0)))


def test_discopop_by_hand():
    # β·h = 1, τ = 0.05: m = σ(20)
    m = sig(20.0)
    assert one("discopop", beta=0.5, tau=0.05) == pytest.approx(
        (1 - m) * sp(-1.0) + m * math.exp(-1)
    )
    # at the start (policy = reference, ρ = 0) the loss rises with the margin:
    # dL/dρ = (1 − log 2)/(4τ) − 3/4, positive for τ < (1 − log 2)/3 ≈ 0.10; the chosen log-prob's
    # gradient is β·that
    pol = paired(-2, -2, grad=True)
    run("discopop", pol, paired(*REF), beta=0.5, tau=0.05).losses.sum().backward()
    assert pol.chosen.grad.item() == pytest.approx(0.5 * ((1 - math.log(2)) / 0.2 - 0.75))
    with pytest.raises(ConfigError, match="tau"):
        one("discopop", beta=0.5, tau=0.0)


def test_sigmoid_norm_by_hand():
    # log-ratios 1 over 2 tokens, −1 over 4: 0.5 + 0.25
    out = run("sigmoid_norm", paired(*POL, ct=2, rt=4), paired(*REF), beta=1.0)
    assert out.losses.item() == pytest.approx(sp(-0.75))
    assert out.chosen_rewards.item() == pytest.approx(0.5)


def test_ld_dpo_by_hand():
    # policy: chosen −6 over 3 tokens (−5 over the 2 shared), rejected −8 over 2 (all shared)
    # reference: chosen −9 (−6 shared), rejected −7
    pol = paired(-6, -8, 3, 2, cs=-5, rs=-8)
    ref = paired(-9, -7, 3, 2, cs=-6, rs=-7)
    # α = ½: chosen −5 + ½·(−1) = −5.5 vs −6 + ½·(−3) = −7.5 → +2; rejected −8 vs −7 → −1; h = 3
    out = run("ld_dpo", pol, ref, beta=0.5, alpha=0.5)
    assert out.losses.item() == pytest.approx(sp(-1.5))
    assert out.chosen_rewards.item() == pytest.approx(1.0)
    # α = 1 is DPO on the sums: h = 3 + 1 = 4
    assert run("ld_dpo", pol, ref, beta=0.5, alpha=1.0).losses.item() == pytest.approx(sp(-2.0))
    # α = 0: only the shared length counts: h = (−5 + 6) − (−8 + 7) = 2
    assert run("ld_dpo", pol, ref, beta=0.5, alpha=0.0).losses.item() == pytest.approx(sp(-1.0))
    with pytest.raises(ValueError, match="precomputed reference"):
        run("ld_dpo", pol, paired(-9, -7, 3, 2), beta=0.5, alpha=0.5)
    assert LOSSES["ld_dpo"].token_split


# ----------------------------------------------------------------- reference-free


def test_cpo_by_hand():
    out = run("cpo", paired(*POL, ct=2), None, beta=0.5, alpha=1.0)
    assert out.losses.item() == pytest.approx(sp(-1.0) + 0.5)  # β·(−1 + 3) = 1; NLL 1/2 per token
    assert out.metrics["nll"].item() == pytest.approx(0.5)


def test_alphapo_by_hand_and_its_simpo_limit():
    # ā = −1 and −3; α = ½: r = (1 − e^{½})/½ and (1 − e^{3/2})/½
    rc, rr = (1 - math.exp(0.5)) / 0.5, (1 - math.exp(1.5)) / 0.5
    out = run("alphapo", paired(*POL), None, beta=1.0, alpha=0.5, gamma_beta_ratio=0.25)
    assert out.losses.item() == pytest.approx(sp(-(rc - rr - 0.25)))  # 0.00444
    assert out.chosen_rewards.item() == pytest.approx(rc)
    pol = paired(-2, -6, 4, 3)
    near = run("alphapo", pol, None, beta=2.0, alpha=1e-7, gamma_beta_ratio=0.25)
    simpo = run("simpo", pol, None, beta=2.0, gamma_beta_ratio=0.25)
    assert near.losses.item() == pytest.approx(simpo.losses.item(), rel=1e-5)
    zero = run("alphapo", pol, None, beta=2.0, alpha=0.0, gamma_beta_ratio=0.25)
    assert zero.losses.item() == pytest.approx(simpo.losses.item())


# ----------------------------------------------------------------- WPO weighting and mixtures


def test_wpo_weights_any_paired_loss_by_hand():
    spec, kw = resolve("dpo", {"beta": 0.5, "weighting": "wpo"})
    assert spec.aligned and kw == {"beta": 0.5}
    pol = paired(*POL, ca=-0.5, ra=-1.0, grad=True)
    out = spec(pol, paired(*REF), **kw)
    assert out.losses.item() == pytest.approx(sp(-1.0) * math.exp(-1.5))
    assert out.metrics["wpo_weight"].item() == pytest.approx(math.exp(-1.5))
    out.losses.sum().backward()  # the weight is detached: the gradient is the weighted DPO one
    assert pol.chosen.grad.item() == pytest.approx(-0.5 * sig(-1.0) * math.exp(-1.5))
    assert pol.chosen_aligned.grad is None
    simpo, kw = resolve("simpo", {"beta": 2.0, "gamma_beta_ratio": 0.25, "weighting": "wpo"})
    assert simpo(paired(*POL, ca=0, ra=0), None, **kw).losses.item() == pytest.approx(
        LOSSES["simpo"](paired(*POL), None, **kw).losses.item()
    )  # weight 1 where the policy would sample the pair itself
    with pytest.raises(ConfigError, match="aot sorts the batch"):
        resolve("aot", {"beta": 0.1, "weighting": "wpo"})
    with pytest.raises(ConfigError, match="kto takes unpaired data"):
        resolve("kto", {"beta": 0.1, "weighting": "wpo"})
    with pytest.raises(ConfigError, match="weighting='wp'"):
        resolve("dpo", {"beta": 0.1, "weighting": "wp"})


def test_mix_sums_its_components_by_hand():
    spec, kw = resolve(
        "mix",
        {"beta": 0.5, "components": [{"name": "dpo", "weight": 0.8}, {"name": "sft", "weight": 1.0},
                                     {"name": "bco_pair", "weight": 0.2}]},
    )  # fmt: skip
    assert spec.reference and spec.state is not None and kw == {"beta": 0.5}
    state = spec.state().train()
    out = spec(paired(*POL, ct=2), paired(*REF), state=state, **kw)
    dpo, sft, bco = sp(-1.0), 0.5, 2 * sp(-0.5)
    assert out.losses.item() == pytest.approx(0.8 * dpo + 1.0 * sft + 0.2 * bco)
    assert out.metrics["loss/dpo"].item() == pytest.approx(dpo)
    assert out.metrics["loss/sft"].item() == pytest.approx(sft)
    assert out.metrics["bco_pair/delta"].item() == 0.0 and state["bco_pair"].count == 2
    assert out.chosen_rewards.item() == pytest.approx(0.5)  # the first component's
    free, kw = resolve("mix", {"components": [{"name": "sft"}]})
    assert not free.reference and kw == {} and free.state is None
    # component keys are checked as a single loss's, and named by their place
    with pytest.raises(
        ConfigError, match=r"loss.components\[1\]: loss=ipo: unknown key\(s\) loss.alpha"
    ):
        resolve("mix", {"beta": 0.1, "components": [{"name": "dpo"}, {"name": "ipo", "alpha": 1}]})
    with pytest.raises(ConfigError, match=r"components\[0\].name='dpoo' is not a registered"):
        resolve("mix", {"beta": 0.1, "components": [{"name": "dpoo"}]})
    with pytest.raises(ConfigError, match=r"components\[0\].name=kto: a mixture takes paired"):
        resolve("mix", {"beta": 0.1, "components": [{"name": "kto"}]})
    with pytest.raises(ConfigError, match=r"components\[1\].name=dpo appears twice"):
        resolve("mix", {"beta": 0.1, "components": [{"name": "dpo"}, {"name": "dpo"}]})
    with pytest.raises(ConfigError, match=r"components\[0\].beta: every component takes the run"):
        resolve("mix", {"beta": 0.1, "components": [{"name": "dpo", "beta": 0.3}]})
    with pytest.raises(ConfigError, match="loss=mix: unknown key.*loss.compnents"):
        resolve("mix", {"beta": 0.1, "compnents": []})


# ----------------------------------------------------------------- against TRL's own code

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[dev]')")


def _per_token(n: torch.Tensor, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random per-token log-probs for rows with ``n`` completion tokens after a 3-token prompt,
    laid out as TRL's shifted (rows, T − 1) arrays, and the completion mask (rows, T)."""
    rows = n.shape[0]
    mask = torch.zeros(rows, T, dtype=torch.long)
    for i, k in enumerate(n.tolist()):
        mask[i, 3 : 3 + k] = 1
    lp = -torch.rand(rows, T - 1, generator=g) * 3 * mask[:, 1:]
    return lp, mask


def _sums(lp, mask, shared):
    m = mask[:, 1:].float()
    place = m.cumsum(1)
    return (lp * m).sum(1), (lp * m * (place <= shared[:, None])).sum(1)


def trl_dpo_loss(loss_type: str, seed: int = 0, B: int = 6, **args):
    """(TRL DPOTrainer._compute_loss's loss, our PairedLogps for the policy and the reference)
    on random per-token log-probs: TRL's own code path, with a stand-in model that returns the
    per-token log-probs and a stand-in accelerator, the reference precomputed."""
    from trl import DPOTrainer

    g = torch.Generator().manual_seed(seed)
    T = 12
    n = torch.randint(1, 8, (2 * B,), generator=g)  # chosen rows, then rejected rows
    lp, mask = _per_token(n, T, g)
    ref_lp, _ = _per_token(n, T, g)
    lss = -torch.rand(2 * B, T - 1, generator=g)  # log Σ_v p_v², for WPO
    shared = torch.minimum(n[:B], n[B:]).repeat(2)
    ld = args.get("ld_alpha")
    ref_sum, ref_shared = _sums(ref_lp, mask, shared)
    ref = ref_sum if ld is None else ref_shared + ld * (ref_sum - ref_shared)
    outputs = SimpleNamespace(
        log_probs=lp.clone().requires_grad_(True),
        entropy=torch.zeros_like(lp),
        mean_logits=torch.zeros_like(lp),
        is_top1=torch.zeros_like(lp, dtype=torch.bool),
        log_sum_sq_probs=lss,
    )
    cfg = dict(beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl",
               f_alpha_divergence_coef=0.5, ld_alpha=None, use_weighting=False,
               loss_weights=None, discopop_tau=0.05) | args  # fmt: skip
    ident = lambda x: x  # noqa: E731
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=ident, gather=ident),
        beta=cfg["beta"],
        precompute_ref_logps=True,
        loss_types=[loss_type] if isinstance(loss_type, str) else loss_type,
        loss_weights=cfg["loss_weights"]
        or [1.0] * (1 if isinstance(loss_type, str) else len(loss_type)),
        ld_alpha=cfg["ld_alpha"],
        f_divergence_type=cfg["f_divergence_type"],
        f_alpha_divergence_coef=cfg["f_alpha_divergence_coef"],
        label_smoothing=cfg["label_smoothing"],
        use_weighting=cfg["use_weighting"],
        aux_loss_enabled=False,
        args=SimpleNamespace(discopop_tau=cfg["discopop_tau"]),
        _metrics={"train": __import__("collections").defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * B, T, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
        "completion_mask": mask,
        "ref_chosen_logps": ref[:B],
        "ref_rejected_logps": ref[B:],
    }
    loss = DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, False)
    pol_sum, pol_shared = _sums(lp, mask, shared)
    m = mask[:, 1:].float()
    aligned = ((lp - lss) * m).sum(1) / n
    ours_pol = PairedLogps(pol_sum[:B], pol_sum[B:], n[:B].float(), n[B:].float(),
                           pol_shared[:B], pol_shared[B:], aligned[:B], aligned[B:])  # fmt: skip
    ours_ref = PairedLogps(ref_sum[:B], ref_sum[B:], n[:B].float(), n[B:].float(),
                           ref_shared[:B], ref_shared[B:])  # fmt: skip
    return loss.item(), ours_pol, ours_ref


# (TRL loss type, TRL arguments, our loss, our kwargs)
SAME_AS_TRL = [
    ("sigmoid", {}, "dpo", {}),
    ("robust", {"label_smoothing": 0.2}, "dpo", {"label_smoothing": 0.2, "robust": True}),
    ("hinge", {"beta": 0.5}, "hinge", {}),
    ("ipo", {"beta": 0.5}, "ipo", {"average_log_ratios": True}),  # TRL's IPO: per-token form
    ("exo_pair", {"label_smoothing": 1e-3}, "exo_pair", {"label_smoothing": 1e-3}),
    ("nca_pair", {}, "nca_pair", {}),
    ("sppo_hard", {}, "sppo_hard", {}),
    ("aot", {}, "aot", {}),
    ("aot_unpaired", {"label_smoothing": 0.1}, "aot_unpaired", {"label_smoothing": 0.1}),
    ("apo_zero", {}, "apo_zero", {}),
    ("apo_down", {}, "apo_down", {}),
    ("discopop", {"beta": 0.05}, "discopop", {"tau": 0.05}),
    ("sigmoid_norm", {"beta": 1.0}, "sigmoid_norm", {}),
    ("sigmoid", {"ld_alpha": 0.3}, "ld_dpo", {"alpha": 0.3}),
    ("sigmoid", {"f_divergence_type": "forward_kl"}, "dpo", {"divergence": "forward_kl"}),
    ("sigmoid", {"f_divergence_type": "js_divergence"}, "dpo", {"divergence": "js_divergence"}),
    ("sigmoid", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}, "dpo",
     {"divergence": "alpha_divergence", "divergence_alpha": 0.7}),  # TRL's α = 1 − ours
]  # fmt: skip


@pytest.mark.parametrize("trl_type,trl_args,name,kwargs", SAME_AS_TRL, ids=lambda x: str(x))
def test_same_as_trl(trl_type, trl_args, name, kwargs):
    for seed in range(3):
        theirs, pol, ref = trl_dpo_loss(trl_type, seed=seed, **trl_args)
        beta = trl_args.get("beta", 0.1)
        ours = LOSSES[name](pol, ref, beta=beta, **kwargs).losses.mean().item()
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6), (seed, ours, theirs)


def test_wpo_and_mix_same_as_trl():
    theirs, pol, ref = trl_dpo_loss("sigmoid", use_weighting=True)
    spec, kw = resolve("dpo", {"beta": 0.1, "weighting": "wpo"})
    assert spec(pol, ref, **kw).losses.mean().item() == pytest.approx(theirs, rel=1e-5)
    # TRL's MPO without its SFT term (TRL's sft averages over the batch's tokens, ours per
    # sequence) and with bco_pair at δ = 0 (TRL's DPO keeps no running shift)
    theirs, pol, ref = trl_dpo_loss(["sigmoid", "nca_pair"], loss_weights=[0.8, 0.2])
    parts = [{"name": "dpo", "weight": 0.8}, {"name": "nca_pair", "weight": 0.2}]
    spec, kw = resolve("mix", {"beta": 0.1, "components": parts})
    assert spec(pol, ref, **kw).losses.mean().item() == pytest.approx(theirs, rel=1e-5)


def test_bco_pair_at_zero_shift_same_as_trl():
    """TRL's DPO ``bco_pair`` has no running shift: ours agrees with δ held at 0 (a fresh state
    in eval mode, which only reads it)."""
    theirs, pol, ref = trl_dpo_loss("bco_pair")
    ours = LOSSES["bco_pair"](pol, ref, beta=0.1, state=RunningMean().eval())
    assert ours.losses.mean().item() == pytest.approx(theirs, rel=1e-5)


@pytest.mark.parametrize("name", ["cpo", "alphapo", "simpo", "orpo"])
def test_reference_free_same_as_trl_cpo(name):
    """CPO's preference term, AlphaPO and SimPO against TRL's CPOTrainer.cpo_loss, ORPO's
    odds-ratio term against ORPOTrainer.odds_ratio_loss (TRL adds the NLL elsewhere, averaged
    over the batch's tokens; ours is per sequence, so it is left out of the comparison)."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(0)
    pol = PairedLogps(-torch.rand(8, generator=g) * 20, -torch.rand(8, generator=g) * 20,
                      torch.randint(1, 9, (8,), generator=g).float(),
                      torch.randint(1, 9, (8,), generator=g).float())  # fmt: skip
    fake = SimpleNamespace(beta=2.0, label_smoothing=0.0, accelerator=SimpleNamespace(device="cpu"))
    if name == "cpo":
        fake.beta, fake.alpha, fake.loss_type = 0.1, 0.0, "sigmoid"
        theirs, *_ = CPOTrainer.cpo_loss(fake, pol.chosen, pol.rejected)
        ours = LOSSES["cpo"](pol, None, beta=0.1, alpha=0.0)
    elif name == "orpo":  # per-token averages in, and TRL's term is β·log σ(log odds ratio)
        avg_c, avg_r = pol.chosen / pol.chosen_tokens, pol.rejected / pol.rejected_tokens
        fake.beta = 0.1
        theirs, *_ = ORPOTrainer.odds_ratio_loss(fake, avg_c, avg_r)
        out = LOSSES["orpo"](pol, None, beta=0.1)
        assert (out.losses + avg_c).tolist() == pytest.approx((-theirs).tolist(), abs=1e-6)
        return
    else:  # TRL's simpo loss type averages the log-probs per token before the loss
        alpha = 0.25 if name == "alphapo" else 0.0
        fake.alpha, fake.loss_type, fake.simpo_gamma = alpha, "simpo", 0.25 * 2.0
        avg_c, avg_r = pol.chosen / pol.chosen_tokens, pol.rejected / pol.rejected_tokens
        theirs, *_ = CPOTrainer.cpo_loss(fake, avg_c, avg_r)
        kw = {"alpha": alpha} if name == "alphapo" else {}
        ours = LOSSES[name](pol, None, beta=2.0, gamma_beta_ratio=0.25, **kw)
    assert ours.losses.tolist() == pytest.approx(theirs.tolist(), rel=1e-5)


# ----------------------------------------------------------------- TR-DPO (callbacks=[...,tr_dpo])


def test_reference_update_by_hand():
    from dpo_lab.callbacks import ReferenceUpdate
    from dpo_lab.reference import LiveReference

    policy, ref_model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        policy.weight.fill_(1.0), policy.bias.fill_(1.0)
        ref_model.weight.fill_(3.0), ref_model.bias.fill_(-1.0)
    module = SimpleNamespace(
        policy=policy, reference=LiveReference(ref_model), log=lambda *a, **k: None
    )
    trainer = SimpleNamespace(global_step=0, strategy=None, is_global_zero=True)
    cb = ReferenceUpdate(every_n_steps=2, alpha=0.25)
    cb._start = {k: v.clone() for k, v in ref_model.state_dict().items()}
    for step in (1, 2, 2, 3, 4):  # step 2 twice: a second micro-batch of the same optimizer step
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module)
    # two updates: 3 → 0.25·1 + 0.75·3 = 2.5 → 0.25·1 + 0.75·2.5 = 2.125
    assert torch.allclose(ref_model.weight, torch.full((2, 2), 2.125)) and cb.updates == 2
    assert torch.allclose(ref_model.bias, torch.full((2,), 0.25 + 0.75 * (0.25 - 0.75)))  # −0.125
    state = cb.state_dict()  # no module seen by setup: nothing to save
    assert state["updates"] == 2 and state["reference"] is None
    cb.on_fit_end(trainer, module)  # the starting reference back, the moved one kept
    assert torch.equal(ref_model.weight, torch.full((2, 2), 3.0))
    assert torch.allclose(cb.state_dict()["reference"]["weight"], torch.full((2, 2), 2.125))
    with pytest.raises(ConfigError, match=r"alpha must be in \(0, 1\]"):
        ReferenceUpdate(every_n_steps=2, alpha=0.0)


@pytest.mark.slow
def test_tr_dpo_trains_against_a_moving_reference_and_reports_against_the_start(cfg_factory):
    from dpo_lab.callbacks import ReferenceUpdate
    from dpo_lab.train import build

    args = ("trainer.max_steps=4", "eval.num_prompts=0", "optim.scheduler=null")
    run = build(cfg_factory(*args, "callbacks=[default,tr_dpo]",
                            "callbacks.reference_update.every_n_steps=2",
                            "callbacks.reference_update.alpha=0.5"))  # fmt: skip
    cb = next(c for c in run.trainer.callbacks if isinstance(c, ReferenceUpdate))
    ref = run.module.reference.model
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    seen = []
    original = cb.on_train_batch_end

    def spy(trainer, pl_module, *a):
        original(trainer, pl_module, *a)
        w = next(iter(ref.parameters()))
        seen.append((trainer.global_step, w.detach().clone()))

    cb.on_train_batch_end = spy
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert cb.updates == 2
    w0 = next(iter(start.values()))
    moved = {step: not torch.equal(w, w0) for step, w in seen}
    assert moved == {1: False, 2: True, 3: True, 4: True}
    for k, v in ref.state_dict().items():  # put back for the evaluation
        assert torch.equal(v, start[k]), k
    # the final checkpoint (written after fitting) holds the moved reference, to extend from
    from dpo_lab.faults import SaveFinalState

    saver = next(c for c in run.trainer.callbacks if isinstance(c, SaveFinalState))
    states = torch.load(saver.path, weights_only=False)["callbacks"].values()
    saved = next(s for s in states if "updates" in s)
    assert saved["updates"] == 2
    assert not torch.equal(saved["reference"][next(iter(start))], w0)
    assert torch.equal(saved["reference"][next(iter(start))], seen[-1][1])
    # a precomputed reference cannot move: one line, before anything is scored
    from dpo_lab.train import check_config

    with pytest.raises(ConfigError, match="TR-DPO.*precompute"):
        check_config(cfg_factory(*args, "callbacks=[default,tr_dpo]", "reference.precompute=true"))
    lora = build(cfg_factory(*args, "callbacks=[default,tr_dpo]", "model.lora.enabled=true"))
    with pytest.raises(ConfigError, match="LoRA"):
        lora.trainer.fit(lora.module, datamodule=lora.datamodule)


@pytest.mark.slow
def test_mix_under_wpo_trains_logs_its_parts_and_checkpoints_its_state(cfg_factory, tmp_path):
    """MPO (dpo + bco_pair + sft) with WPO weights, two real steps: each component's loss, BCO's δ
    and the weights are logged; δ is in the checkpoint and comes back into a fresh module."""
    from dpo_lab.train import build

    run = build(cfg_factory("loss=mix", "loss.weighting=wpo", "trainer.max_steps=2",
                            "eval.num_prompts=0"))  # fmt: skip
    run.trainer.fit(run.module, datamodule=run.datamodule)
    logged = run.trainer.callback_metrics
    for name in ("train/loss/dpo", "train/loss/bco_pair", "train/loss/sft", "train/bco_pair/delta",
                 "train/wpo_weight"):  # fmt: skip
        assert name in logged and torch.isfinite(logged[name]), name
    # the SFT model's weight of the data's pairs: below 1, where its own samples weigh about 1
    assert 0 < logged["train/wpo_weight"].item() < 1
    state = run.module.loss_state["bco_pair"]
    assert state.count == 2 * 2 * 16  # 2 steps × 16 pairs × (chosen, rejected)
    path = tmp_path / "x.ckpt"
    run.trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert saved["loss_state.bco_pair._extra_state"] == {"mean": state.mean, "count": 64}
    fresh = build(cfg_factory("loss=mix", "trainer.max_steps=2", "eval.num_prompts=0"))
    fresh.module.load_state_dict(saved)
    assert fresh.module.loss_state["bco_pair"].count == 64


@pytest.mark.slow
def test_bco_shift_survives_a_bf16_true_resume_exactly(cfg_factory, tmp_path):
    """A bf16-true run resumed from its checkpoint continues from the exact float64 δ (Lightning
    loads the checkpoint before it casts the module to bf16)."""
    from dpo_lab.train import build

    args = ("loss=bco_pair", "trainer.precision=bf16-true", "eval.num_prompts=0",
            "trainer.max_epochs=2", "model.lr=0.02", "optim.scheduler=null")  # fmt: skip
    first = build(cfg_factory(*args, "trainer.max_steps=2"))
    first.trainer.fit(first.module, datamodule=first.datamodule)
    from dpo_lab.faults import SaveFinalState

    saved = first.module.loss_state
    # the checkpoint written inside the loop after the last step (mid-epoch, resumable)
    ckpt = next(c for c in first.trainer.callbacks if isinstance(c, SaveFinalState)).path
    again = build(cfg_factory(*args, "trainer.max_steps=3"))
    seen = []
    update = again.module.loss_state.update

    def spy(values):
        seen.append((again.module.loss_state.mean, again.module.loss_state.count))
        return update(values)

    again.module.loss_state.update = spy
    again.trainer.fit(again.module, datamodule=again.datamodule, ckpt_path=str(ckpt))
    assert seen[0] == (saved.mean, saved.count) and saved.count == 64
    assert saved.mean != float(torch.tensor(saved.mean, dtype=torch.bfloat16))  # bf16 would move it


def _two_process_running_mean(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    state = RunningMean().train()
    # ragged: rank 0 sees 3 values, rank 1 two (one of them non-finite, skipped everywhere)
    values = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, float("inf")])][rank]
    first = state.update(values)
    second = state.update(torch.tensor([4.0 * (rank + 1)]))  # 4 and 8
    torch.save({"first": first, "second": second, "count": state.count}, f"{out}/{rank}.pt")
    dist.barrier()  # neither leaves while the other still talks (gloo aborts on that)
    # and leave without running gloo's C++ teardown, which still aborted now and then
    # ("terminate called without an active exception", SIGABRT) after the barrier: the results
    # are on disk, and mp.spawn reads the exit status
    import os

    os._exit(0)


def test_running_mean_is_the_same_on_every_process(tmp_path):
    """BCO's δ over two gloo processes with batches of different sizes: each process folds in
    every process's finite values, so both keep the same δ (no buffer broadcast needed)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_process_running_mean, args=(port, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    assert got[0] == got[1]
    assert got[0]["first"] == pytest.approx(16 / 4)  # (1 + 2 + 3 + 10) / 4
    assert got[0]["second"] == pytest.approx(28 / 6) and got[0]["count"] == 6
