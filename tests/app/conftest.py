"""Two tiny artifacts over the synthetic catalog: 'dense' (4 layers) and 'pruned' (2 layers)."""

from __future__ import annotations

import pytest
from helpers import tiny_llama

from llmrec.artifact import write_artifact
from recdata.prompts import compact_template


@pytest.fixture(scope="session")
def arms(tmp_path_factory, tokenizer, prepared):
    root = tmp_path_factory.mktemp("arms")
    manifest = {"template": compact_template().to_dict(), "max_history": 10, "stage": "finetune"}
    dense = write_artifact(root / "dense", tiny_llama(len(tokenizer), seed=1, layers=4), tokenizer, prepared.catalog, manifest)
    pruned = write_artifact(root / "pruned", tiny_llama(len(tokenizer), seed=2, layers=2), tokenizer, prepared.catalog,
                            {**manifest, "stage": "depth"})
    return {"dense": str(dense), "pruned": str(pruned)}

