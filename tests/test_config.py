"""Every config group composes; user mistakes give a one-line error naming the key or file."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import make_cfg, run_cli
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError

from dpo_lab.errors import ConfigError
from dpo_lab.losses import LOSSES
from dpo_lab.train import check_config

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = [
    "model",
    "dataset",
    "loss",
    "optim",
    "trainer",
    "logger",
    "algo",
    "experiment",
    "hparams_search",
]


@pytest.mark.parametrize(
    "group, option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))],
)
def test_every_group_option_composes(tmp_path, group, option):
    # experiment=real_sentiment moves to another task: the shrinking overrides are the toy task's
    # the RLHF objectives compose with the algo that chooses them (and only with it)
    algo = {"bradley_terry": ["algo=reward_model"], "kl_regularized": ["algo=rloo"]}
    extra = algo.get(option, []) if group == "loss" else []
    cfg = make_cfg(
        tmp_path,
        f"{group}={option}",
        *extra,
        small=(group, option) != ("experiment", "real_sentiment"),
    )
    check_config(cfg)  # loss keys match the function, beta is valid, ...
    if group == "loss":
        assert cfg.loss.name == option


@pytest.mark.parametrize(
    "study, arm",
    [(p.parent.name, p.stem) for p in sorted((CONF / "arm").glob("*/*.yaml"))],
)
def test_every_study_arm_composes(tmp_path, study, arm):
    """Arms bundle a loss with its settings for one study's sweep (+arm/<study>=<arm>)."""
    cfg = make_cfg(tmp_path, f"+arm/{study}={arm}", "dataset.label_noise=0.2")
    _, kwargs = check_config(cfg)
    if arm in ("cdpo", "robust_dpo"):
        assert kwargs["label_smoothing"] == 0.2 and kwargs["robust"] == (arm == "robust_dpo")
    if study == "kto_binary":
        assert cfg.loss.name == "kto"
        full = make_cfg(tmp_path, f"+arm/{study}={arm}", small=False)  # the shrunk task sets 16
        assert full.dataset.batch_size == 64  # as many completions a step as DPO's 32 pairs
        assert cfg.dataset.source.feedback == ("binary" if arm == "kto_binary" else "pairs")


def test_every_registered_loss_has_a_yaml():
    from dpo_lab.losses import MIX
    from dpo_lab.rlhf import OBJECTIVE  # the RLHF algos' own objectives, not registry losses

    yamls = {p.stem for p in (CONF / "loss").glob("*.yaml")}
    assert yamls == set(LOSSES) | {MIX} | set(OBJECTIVE.values())


def test_beta_default_comes_from_the_loss_and_cli_wins(tmp_path):
    assert make_cfg(tmp_path).loss.beta == 0.1
    assert make_cfg(tmp_path, "loss=simpo").loss.beta == 2.0
    assert make_cfg(tmp_path, "loss=simpo", "beta=0.05").loss.beta == 0.05
    assert make_cfg(tmp_path, "beta=0.05", "loss=ipo").loss.beta == 0.05  # order does not matter


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["beta=0"], "beta must be a number > 0"),
        (["beta=-0.1"], "beta must be a number > 0"),
        (["loss=sft", "beta=0.1"], "loss=sft takes no beta"),
        (["loss.name=dpoo"], "registered: .*dpo"),
        (["probe.every_n_steps=0"], "probe"),
    ],
)
def test_bad_values_are_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(make_cfg(tmp_path, *overrides))


def test_unknown_keys_fail_loudly(tmp_path):
    with pytest.raises(ConfigCompositionException):
        make_cfg(tmp_path, "trainer.max_epoch=2")  # typo of max_epochs
    with pytest.raises(ConfigCompositionException):
        make_cfg(tmp_path, "loss=nonexistent")
    with pytest.raises(ConfigCompositionException):
        make_cfg(tmp_path, "model=nonexistent")
    with pytest.raises(ConfigError, match=r"loss\.gama.*accepted: beta, gamma_beta_ratio"):
        check_config(make_cfg(tmp_path, "loss=simpo", "+loss.gama=1.0"))
    cfg = make_cfg(tmp_path)
    with pytest.raises(ConfigAttributeError):
        cfg.trainer.max_epoch = 1  # struct mode holds after composition too


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(
        *args,
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
        check=False,
        env={"HYDRA_FULL_ERROR": "0"},
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["beta=0"], "dpo_lab: error: beta must be a number > 0 for loss=dpo, got 0"),
        (
            ["model.name_or_path=/no/such/model"],
            "dpo_lab: error: model.name_or_path='/no/such/model': no such model directory",
        ),
        (["model.name_or_path=builtin:imdb"], "unknown builtin; known: builtin:sentiment"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, expected):
    proc = cli(tmp_path, *args)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "dpo_lab: error" in line]) == 1


def test_cli_unknown_loss_lists_the_options(tmp_path):
    proc = cli(tmp_path, "loss=dpoo")
    assert proc.returncode != 0
    assert "Could not find 'loss/dpoo'" in proc.stderr
    assert "dpo" in proc.stderr and "simpo" in proc.stderr and "Traceback" not in proc.stderr


def test_chat_template_inline_or_from_a_file(tmp_path):
    from dpo_lab.train import read_chat_template

    inline = "{% for m in messages %}" + "x" * 5000 + "{{ m['content'] }}{% endfor %}"
    assert read_chat_template(inline) == inline  # long inline templates are not paths
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages }}")
    assert read_chat_template(str(f)) == "{{ messages }}"
    with pytest.raises(ConfigError, match="not a Jinja template and no such file"):
        read_chat_template(str(tmp_path / "missing.jinja"))


@pytest.mark.slow
def test_the_wheel_carries_every_module_and_config(tmp_path):
    """A non-editable install works: the built wheel holds every dpo_lab module and every yaml
    (a package missing from pyproject's list, as dpo_lab.callbacks once was, is only noticed
    outside an editable checkout)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # a clean copy: setuptools reuses a checkout's build/ directory
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(root / name, src / name)
    for name in ("dpo_lab", "conf"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(src)],
        check=True, capture_output=True, timeout=240,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("dpo_lab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(root)) for p in (root / "dpo_lab").rglob("*.py")}
    configs = {
        "dpo_lab/conf/" + str(p.relative_to(root / "conf")) for p in (root / "conf").rglob("*.yaml")
    }
    assert not modules - names, sorted(modules - names)
    assert not configs - names, sorted(configs - names)
