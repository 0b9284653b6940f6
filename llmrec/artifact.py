"""The prunerec artifact (DESIGN.md §5): a directory that stock transformers loads, plus the catalog and a
manifest.

Layout: ``config.json``, ``model.safetensors``, ``generation_config.json``, tokenizer files,
``catalog.parquet`` (item_id, title) and ``prunerec.json`` (prompt template, history length, dataset
fingerprint, lineage, parameter counts, metrics, library versions, creation time).

Writes go to a hidden staging directory beside the target and are renamed into place, so a crash never
leaves a half-written directory that looks complete; an existing artifact at the target is replaced only
after the new one is fully written. Only safetensors are written or read.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from recdata.catalog import Catalog

logger = logging.getLogger(__name__)

MANIFEST = "prunerec.json"
CATALOG = "catalog.parquet"
FORMAT_VERSION = 1


def parameter_counts(model: PreTrainedModel) -> dict[str, int]:
    """Unique parameters: total, embedding (input embedding + an untied LM head), non-embedding."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
    embedding_params = {id(model.get_input_embeddings().weight)}
    output = model.get_output_embeddings()
    if output is not None:
        embedding_params.add(id(output.weight))
    from llmrec.item_tokens import item_tokens_of

    item_tokens = item_tokens_of(model)
    if item_tokens is not None:  # the item vectors are embeddings too (the frozen SASRec table is a buffer)
        embedding_params.update(id(p) for name, p in item_tokens.named_parameters() if not name.startswith("base."))
    embedding = sum(
        p.numel() for p in {id(p): p for p in model.parameters() if id(p) in embedding_params}.values()
    )
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("prunerec", "torch", "transformers", "peft", "accelerate"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_artifact(
    directory: str | Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    catalog: Catalog,
    manifest: dict[str, Any],
    extra_tokenizers: dict[str, PreTrainedTokenizerBase] | None = None,
) -> Path:
    """Write an artifact atomically and return its path.

    ``manifest`` must hold at least ``template`` (a PromptTemplate dict) and ``max_history``; parameter
    counts, versions, the catalog fingerprint and the creation time are added here. ``extra_tokenizers``
    are saved in sub-directories (the vocab stage keeps the unpruned tokenizer this way).
    """
    directory = Path(directory)
    for key in ("template", "max_history"):
        if key not in manifest:
            raise ValueError(f"artifact manifest needs {key!r}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(directory)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.staging-", dir=directory.parent))
    try:
        staging.chmod(_directory_mode())  # mkdtemp makes it 0700: the artifact would be readable by its owner only
        from llmrec import item_tokens

        with item_tokens.detached(model) as items:  # stock from_pretrained loads the model files alone
            model.save_pretrained(staging, safe_serialization=True)
            if items is not None:
                manifest = {**manifest, "item_tokens": item_tokens.save(items, staging)}
        tokenizer.save_pretrained(staging)
        for relative, extra in (extra_tokenizers or {}).items():
            extra.save_pretrained(staging / relative)
        catalog.save(staging / CATALOG)
        full = {
            "format_version": FORMAT_VERSION,
            **manifest,
            "params": parameter_counts(model),
            "catalog": {"items": len(catalog), "fingerprint": catalog.fingerprint()},
            "versions": library_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (staging / MANIFEST).write_text(json.dumps(full, indent=2, default=str))
        swap_in(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote artifact %s", directory)
    return directory


def swap_in(staging: Path, directory: Path) -> None:
    """Rename a fully written ``staging`` directory to ``directory``; an existing one is moved aside first and
    removed only after the rename, so a reader never finds a half-written directory at that path."""
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        old.rmdir()
        directory.rename(old)
        staging.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(directory)


def _directory_mode() -> int:
    """0o777 less the process umask (what ``mkdir`` would give)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def remove_stale_staging(directory: str | Path) -> list[Path]:
    """Remove what an interrupted :func:`write_artifact` of ``directory`` left beside it (``.<name>.staging-*``,
    ``.<name>.old-*``); returns the removed paths. One writer per artifact directory is assumed."""
    directory = Path(directory)
    if not directory.parent.is_dir():
        return []
    stale = [p for pattern in (f".{directory.name}.staging-*", f".{directory.name}.old-*") for p in directory.parent.glob(pattern)]
    for path in stale:
        logger.info("removing %s, left by an interrupted write", path)
        shutil.rmtree(path, ignore_errors=True)
    return stale


def is_artifact(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / MANIFEST).is_file() and (directory / CATALOG).is_file()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a prunerec artifact (no {MANIFEST})")
    return json.loads(path.read_text())


def artifact_identity(directory: str | Path, assistant: bool = False) -> dict[str, Any]:
    """What tells one build of an artifact from another written later at the same path: its creation time and,
    with ``assistant``, its assistant's weight and training. Results cached by artifact path (the benchmark's
    evaluations and serving figures) carry it, so a rebuilt artifact is measured again, never reported from a
    stale cache. The manifest's ``metrics``, which evaluations add, are not part of it."""
    manifest = read_manifest(directory)
    # the manifest's time has whole seconds; the weight files' (size, mtime in ns) tell apart two builds in one
    weights = {path.name: [path.stat().st_size, path.stat().st_mtime_ns] for path in sorted(Path(directory).glob("*.safetensors"))}
    identity: dict[str, Any] = {"created": manifest.get("created"), "weights": weights}
    if assistant:
        entry = manifest.get("assistant") or {}
        identity["assistant"] = {key: entry.get(key) for key in ("weight", "training", "config")} if entry else None
    return json.loads(json.dumps(identity, default=str))


def update_manifest(directory: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge fields into an artifact's manifest (atomic replace of the one file)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    manifest.update(fields)
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.replace(directory / MANIFEST)
    return manifest
