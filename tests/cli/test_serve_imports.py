"""`prunerec serve` starts the service without the offline packages, and the serving images carry exactly
the packages it imports (DESIGN.md §2: `app` never imports `pruning`, `bench` or peft)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from helpers import tiny_llama

from llmrec.artifact import write_artifact
from recdata.prompts import compact_template

REPO = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = {"recdata", "llmrec", "pruning", "app", "cli", "bench"}

# Runs the real `prunerec serve` entry point; uvicorn's Server.run is replaced by a TestClient session that
# waits for readiness and asks for one list, then prints the project packages and peft found in sys.modules.
SCRIPT = """
import json, sys, time
import uvicorn

PACKAGES, ARTIFACT = set(json.loads(sys.argv[1])), sys.argv[2]

def run(self, sockets=None):
    from fastapi.testclient import TestClient
    with TestClient(self.config.app) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.05)
        status = client.post("/v1/recommend", json={"user_id": "u", "history": ["i1"], "k": 3}).status_code
    loaded = sorted({m.split(".")[0] for m in sys.modules} & PACKAGES | ({"peft"} & set(sys.modules)))
    print(json.dumps({"status": status, "loaded": loaded}))

uvicorn.Server.run = run
from cli.main import run_cli
sys.argv = ["prunerec", "serve", "--models", "dense=" + ARTIFACT, "--port", "0"]
run_cli()
"""


def served_packages(artifact: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(sorted(PROJECT_PACKAGES)), str(artifact)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_serve_imports_only_the_serving_packages_and_the_images_copy_exactly_those(tmp_path, tokenizer, prepared):
    manifest = {"template": compact_template().to_dict(), "max_history": 10, "stage": "finetune"}
    artifact = write_artifact(tmp_path / "dense", tiny_llama(len(tokenizer)), tokenizer, prepared.catalog, manifest)
    result = served_packages(artifact)
    assert result["status"] == 200
    assert result["loaded"] == ["app", "cli", "llmrec", "recdata"]  # no pruning, bench or peft
    for image in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (REPO / "docker" / image).read_text()
        copied = set(re.findall(r"^COPY (\w+) \1$", text, flags=re.MULTILINE))
        assert copied == set(result["loaded"]), (image, copied)
