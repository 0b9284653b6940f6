"""The recommendation loss of artifacts on every validation user: a steadier yardstick for comparing
distillation settings than NDCG@10 on a few hundred users (a pruned model's 300-user NDCG@10 rests on 10-15
hits) or the 32 validation users of a cpu-profile stage's early stopping.

    python -m bench.valid_loss runs/sweep-lr1e-3/3-depth runs/sweep-lr3e-4/3-depth

Per artifact: the mean cross-entropy of the next item's title tokens (and the end token) at the response
positions, over one example per validation user, with the artifact's own prompt template and item tokens;
over the whole vocabulary, and with ``--vocab catalog`` also over the catalog's tokens (what the served
catalog head normalises over, and what ``prunerec prune --distill-vocab catalog`` distils on).
Prints JSON; both losses come from one forward pass a batch. (Two torch processes of two threads each on two cores run many times slower than one: run it on
a quiet machine or with OMP_NUM_THREADS=1.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.harness import emit_json
from llmrec.recommender import Recommender
from pruning.calibration import LossVocabulary, batches, catalog_vocabulary, mean_ces
from pruning.examples import split_examples
from recdata.prep import prepare
from recdata.sources import read_ml100k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vocab", choices=["full", "catalog"], default="full",
                        help="catalog: also the CE over the catalog's tokens (mean_ce_catalog)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args()
    data = prepare(read_ml100k())
    report = {}
    for artifact in args.artifacts:
        recommender = Recommender.from_artifact(artifact, device="cpu")  # the artifact's own prompt encoder
        examples = split_examples(data, recommender.encoder, args.split)
        rows = batches(examples, recommender.pad_id, args.batch_size)
        vocabularies: list[LossVocabulary | None] = [None]
        if args.vocab == "catalog":
            vocabularies.append(catalog_vocabulary(recommender.model, recommender.encoder, data, examples))
        losses = mean_ces(recommender.model, rows, vocabularies)  # one forward pass a batch for both
        report[artifact] = {"mean_ce": round(losses[0], 4), "users": len(examples), "split": args.split}
        if args.vocab == "catalog":
            report[artifact]["mean_ce_catalog"] = round(losses[1], 4)
    emit_json(report, Path(args.output) if args.output else None)


if __name__ == "__main__":
    main()
