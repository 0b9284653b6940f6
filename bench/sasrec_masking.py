"""How much masking each user's past moves the baselines: SASRec and MostPop, every test user, both ways.

    python -m bench.sasrec_masking --epochs 5 --output bench/results/sasrec_masking_cpu.json

RecBole's evaluator masks no history for sequential models; prunerec's protocol excludes the whole past (for
the LLMs, MostPop and SASRec alike). This trains the benchmark's SASRec once (RecBole, CE loss, the `cpu`
bench profile's epochs) and reports, on ml-100k's leave-one-out test split (all users): RecBole's own test
figures (unmasked), ours with the past excluded, and the same for the 300-user sample the `cpu` benchmark
scores; and MostPop masked and unmasked. The README's "Masking the past" paragraph quotes its output.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from bench.harness import emit_json
from bench.sasrec import SASRecConfig
from bench.sasrec import run as sasrec
from pruning.evaluate import mostpop_metrics, sample_users
from recdata.metrics import rank_metrics
from recdata.prep import prepare
from recdata.sources import read_ml100k


def _pick(metrics: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: metrics[k] for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sample", type=int, default=300, help="the benchmark's user sample (seed 0)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    data = prepare(read_ml100k())
    every = data.splits["test"]
    sample = sample_users(every, args.sample, 0)
    with tempfile.TemporaryDirectory() as work:
        result = sasrec(SASRecConfig(output=work, epochs=args.epochs), data)
    position = {(int(u), int(p)): i for i, (u, p) in enumerate(every)}
    sample_ranks = [result["ranks"][position[(int(u), int(p))]] for u, p in sample]
    keys = ("ndcg@10", "hr@10")
    report = {
        "protocol": f"ml-100k leave-one-out test, {len(every)} users (sample: {len(sample)}, seed 0), full catalog",
        "sasrec_epochs_run": result["epochs_run"],
        "sasrec_recbole_unmasked": {"ndcg@10": result["test_recbole"]["ndcg@10"], "hr@10": result["test_recbole"]["hit@10"]},
        "sasrec_masked": _pick(result["metrics"], keys),
        "sasrec_masked_sample": _pick(rank_metrics(sample_ranks), keys),
    }
    for masked in (False, True):
        name = "masked" if masked else "unmasked"
        report[f"mostpop_{name}"] = _pick(mostpop_metrics(data, every, masked, [10], 20)[0], keys)
        report[f"mostpop_{name}_sample"] = _pick(mostpop_metrics(data, sample, masked, [10], 20)[0], keys)
    emit_json(report, args.output)


if __name__ == "__main__":
    main()
