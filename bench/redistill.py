"""One compression stage's distillation run again from an artifact it wrote, with the run's own settings or others.

    python -m bench.redistill runs/cpu60-paths-seed1/3-depth --teacher runs/cpu60 --profile cpu --seed 1 \
        --steps 100 [--teacher-paths 4] [--lr 3e-4] [--output OUT.json]

A stage that early stopping ended at step 0 keeps its undistilled cut (``prunerec prune`` writes the best
student), so its artifact is the cut itself: this distils that student from the dense teacher again on the
examples the run drew (:func:`pruning.prune.shared_data` with the profile, the seed and the options given; the
teacher paths too with ``--teacher-paths``), with early stopping off, and prints the validation history. It
answers whether a stage's outcome came from its starting point or from a setting (PruneRec, arXiv 2507.07064,
§3.5 recovers every stage by distillation from the dense teacher). Writes nothing but the JSON.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.harness import emit_json
from llmrec.artifact import read_manifest
from llmrec.model import load_model
from pruning import distill
from pruning.prune import PruneConfig, apply_profile, shared_data
from recdata.prep import PreparedData
from recdata.prompts import PromptTemplate


def redistill(student: str, teacher: str, data: PreparedData, profile: str = "cpu", seed: int = 0, steps: int = 100,
              teacher_paths: int = 0, device: str = "cpu", lr: float | None = None) -> dict[str, Any]:
    """Distil ``student`` from ``teacher`` for ``steps`` steps (no early stopping; ``lr``: the profile's rate when
    None); returns the record."""
    # the stage's run directory: where the run saved its teacher paths (read back, not decoded again)
    config = apply_profile(PruneConfig(output=str(Path(student).parent), teacher=teacher), profile)
    settings = replace(config.distill, seed=seed, max_steps=steps, patience=0, teacher_paths=teacher_paths,
                       lr=lr if lr is not None else config.distill.lr)
    config = replace(config, distill=settings, calibration=replace(config.calibration, seed=seed))
    manifest = read_manifest(teacher)
    loaded = load_model(teacher, device=device, dtype=torch.float32)
    for parameter in loaded.model.parameters():
        parameter.requires_grad_(False)
    shared = shared_data(config, data, loaded.model, loaded.tokenizer, PromptTemplate.from_dict(manifest["template"]),
                         int(manifest["max_history"]), manifest.get("max_prompt_tokens"), needs_calibration=False)
    model = load_model(student, device=device, dtype=torch.float32).model
    with tempfile.TemporaryDirectory() as checkpoints:
        _, record = distill.run(settings, model, shared.cache, shared.valid, Path(checkpoints) / "ckpt",
                                path_indices=shared.path_indices)
    return {"student": student, "teacher": teacher, "profile": profile, "seed": seed, "teacher_paths": teacher_paths,
            "lr": settings.lr,
            "steps": record["steps"], "valid_loss": [round(h["valid_loss"], 4) for h in record["valid_history"]],
            "valid_steps": [h["step"] for h in record["valid_history"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student", help="a stage's artifact (its student is distilled again)")
    parser.add_argument("--teacher", required=True, help="the dense artifact the run distilled from")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (prunerec prune --seed)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--teacher-paths", type=int, default=0, help="prunerec prune --distill-teacher-paths")
    parser.add_argument("--lr", type=float, default=None, help="distillation rate [the profile's]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cli.common import load_data

    report = redistill(args.student, args.teacher, load_data(None), args.profile, args.seed, args.steps,
                       args.teacher_paths, args.device, args.lr)
    emit_json(report, Path(args.output) if args.output else None)


if __name__ == "__main__":
    main()
