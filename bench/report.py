"""The benchmark report: per-user NDCG (recdata.metrics) and the paired test, cost columns (parameters, bytes,
multiply-adds), ratios, report.json / report.md and the plots.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llmrec.artifact import read_manifest
from recdata.metrics import ndcg_per_user

logger = logging.getLogger(__name__)


logger = logging.getLogger(__name__)

NDCG_K = 10


def per_user_ndcg(ranks: list[int | None] | pd.Series, k: int = NDCG_K) -> np.ndarray:
    """NDCG@k per user from 0-based ranks (−1, None or NaN = missed): :func:`recdata.metrics.ndcg_per_user`."""
    return ndcg_per_user(list(ranks), k)


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Paired comparison of per-user NDCG (same users, same order): mean difference (B − A) with a 95%
    bootstrap interval, Wilcoxon signed-rank p-value (zero differences split) and paired t-test p-value."""
    from scipy import stats

    if a.shape != b.shape or a.size == 0:
        raise ValueError("the paired test needs the same non-empty set of users for both models")
    difference = b - a
    rng = np.random.default_rng(0)
    resampled = difference[rng.integers(0, difference.size, size=(2000, difference.size))].mean(1)
    result: dict[str, Any] = {"users": int(a.size), "mean_a": float(a.mean()), "mean_b": float(b.mean()),
              "mean_difference": float(difference.mean()),
              "ci95": [float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))],
              "users_better_b": int((difference > 0).sum()), "users_better_a": int((difference < 0).sum())}
    if np.any(difference != 0):
        result["wilcoxon_p"] = float(stats.wilcoxon(a, b, zero_method="zsplit").pvalue)
        result["ttest_p"] = float(stats.ttest_rel(a, b).pvalue)
    else:
        result["wilcoxon_p"] = result["ttest_p"] = 1.0
    return result


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------


def artifact_bytes(directory: str | Path) -> int:
    """Bytes on disk of what an artifact ships (evaluation outputs left out)."""
    root = Path(directory)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "eval" not in p.relative_to(root).parts)


def model_entry(artifact: str | Path, evaluation: dict, repo_root: Path | None = None) -> dict[str, Any]:
    """A report entry for an LLM artifact from its manifest and an evaluation result."""
    manifest = read_manifest(artifact)
    path = Path(artifact).resolve()
    shown = str(path.relative_to(repo_root)) if repo_root and path.is_relative_to(repo_root) else str(artifact)
    return {"artifact": shown, "params": manifest["params"], "artifact_bytes": artifact_bytes(artifact),
            "metrics": evaluation["metrics"], "vocab_size": evaluation["protocol"].get("vocab_size")}


def ratios(models: dict[str, dict], dense: str = "dense", pruned: str = "pruned") -> dict[str, float]:
    a, b = models.get(dense), models.get(pruned)
    if not a or not b:
        return {}
    out = {
        "retention_ndcg@10": b["metrics"]["ndcg@10"] / a["metrics"]["ndcg@10"] if a["metrics"]["ndcg@10"] else float("nan"),
        "non_embedding_pruned_fraction": 1 - b["params"]["non_embedding"] / a["params"]["non_embedding"],
    }
    if "latency_ms" in a and "latency_ms" in b:
        out["speedup_p50"] = a["latency_ms"]["p50"] / b["latency_ms"]["p50"]
        out["throughput_gain"] = b["throughput_rps"] / a["throughput_rps"]
    if a.get("flops_per_request") and b.get("flops_per_request"):  # the ceiling of the two speed ratios above
        out["flops_ratio"] = a["flops_per_request"] / b["flops_per_request"]

    def ndcg(name: str) -> float | None:
        entry = models.get(name)
        return entry["metrics"]["ndcg@10"] if entry and entry.get("metrics") else None

    sasrec = ndcg("sasrec")
    for name, key in ((dense, "dense_ndcg@10_vs_sasrec"), (f"{dense}+assist", "dense_assisted_ndcg@10_vs_sasrec"),
                      (f"{pruned}+assist", "pruned_assisted_ndcg@10_vs_sasrec")):
        value = ndcg(name)
        if sasrec and value is not None:
            out[key] = value / sasrec
    assisted_dense, assisted_pruned = ndcg(f"{dense}+assist"), ndcg(f"{pruned}+assist")
    if assisted_dense and assisted_pruned is not None:
        out["assisted_retention_ndcg@10"] = assisted_pruned / assisted_dense
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(report: dict) -> str:
    """report.md: the protocol, the quality table, the cost table and the ratios."""
    lines = [f"# prunerec benchmark: {report['protocol'].get('profile', 'compare')}", ""]
    phases = report["protocol"].get("phase_minutes", {})
    lines += ["## Protocol", ""] + [f"- {k}: {v}" for k, v in report["protocol"].items() if k != "phase_minutes"] + [""]
    if phases:
        lines += ["## Time (minutes of this run)", "", "| phase | minutes |", "| --- | ---: |"]
        lines += [f"| {name} | {minutes:.1f} |" for name, minutes in phases.items()]
        lines += [f"| total | {report['protocol'].get('minutes', sum(phases.values())):.1f} |", ""]
    lines += ["## Quality (same users)", "", "| model | NDCG@1 | NDCG@5 | NDCG@10 | NDCG@20 | HR@1 | HR@5 | HR@10 | HR@20 | MRR@20 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in report["models"].items():
        m = entry.get("metrics", {})
        cells = [m.get(f"ndcg@{k}") for k in (1, 5, 10, 20)] + [m.get(f"hr@{k}") for k in (1, 5, 10, 20)] + [m.get("mrr@20")]
        lines.append(f"| {name} | " + " | ".join(_fmt(c) for c in cells) + " |")
    unmasked = report["models"].get("sasrec", {}).get("recbole_test_unmasked")
    if unmasked:
        lines += ["", f"SASRec by RecBole's own evaluator (every test user, past items not masked): NDCG@10 "
                      f"{_fmt(unmasked.get('ndcg@10'))}, HR@10 {_fmt(unmasked.get('hit@10'))}."]
    lines += ["", "## Cost", "", "| model | params | embedding | non-embedding | artifact MB | MACs/token | GFLOP/request "
              "| peak RSS MB | p50 ms (c1) | p99 ms (c1) | req/s (c1) | p50 ms (c16) | req/s (c16) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in report["models"].items():
        p = entry.get("params", {})
        serving = entry.get("serving", {})
        c1, c16 = serving.get("c1", {}), serving.get("c16", {})
        size = entry.get("artifact_bytes")
        rss = serving.get("peak_rss_bytes")
        cells = [p.get("total"), p.get("embedding"), p.get("non_embedding"), size / 1e6 if size else None,
                 entry.get("macs_per_token"), entry["flops_per_request"] / 1e9 if entry.get("flops_per_request") else None,
                 rss / 1e6 if rss else None,
                 c1.get("latency_ms", {}).get("p50"), c1.get("latency_ms", {}).get("p99"), c1.get("throughput_rps"),
                 c16.get("latency_ms", {}).get("p50"), c16.get("throughput_rps")]
        lines.append(f"| {name} | " + " | ".join(_fmt(c, 1) if isinstance(c, float) else _fmt(c) for c in cells) + " |")
    served = {name: entry["serving"] for name, entry in report["models"].items() if entry.get("serving", {}).get("c1")}
    if served:
        lines += ["", "## Serving at every concurrency level", "",
                  "| model | clients | p50 ms | p99 ms | req/s | best req/s | GPU peak MB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, serving in served.items():
            levels = sorted(int(k[1:]) for k in serving if k.startswith("c") and k[1:].isdigit())
            gpu = serving.get("gpu_peak_bytes")
            for level in levels:
                row = serving[f"c{level}"]
                cells = [level, row["latency_ms"]["p50"], row["latency_ms"]["p99"], row["throughput_rps"],
                         serving.get("best_throughput_rps"), gpu / 1e6 if gpu else None]
                lines.append(f"| {name} | " + " | ".join(_fmt(c, 1) if isinstance(c, float) else _fmt(c) for c in cells) + " |")
    load = report.get("load")
    if load:
        server = load["server"]
        lines += ["", "## Overload (load check)", "",
                  f"{load['clients']} clients for {load['seconds']:.0f} s against {', '.join(load['arms'])} at equal weights, "
                  f"every request with a {load['deadline_ms']:.0f} ms deadline; {load['leavers']} of the clients give up "
                  "after 0.5 s.", "",
                  "| requests | answered 200 | late 200 | client timeouts | goodput req/s | 503 queue full | 503 deadline | 503 > deadline/10 "
                  "| client left | dropped before decoding | caller gone mid-batch | p99 ms 200 | p99 ms 503 | drain s |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                  "| " + " | ".join(_fmt(c, 1) if isinstance(c, float) else _fmt(c) for c in [
                      load["requests"], load["answered_200"], load["late_200"], load["client_timeouts"], load["goodput_rps"],
                      server["shed"]["queue_full"], server["shed"]["deadline"], load["slow_503"], server["shed"]["client_left"],
                      server["dropped_before_decoding"], sum(server["decoded_after_caller_left"].values()),
                      load["latency_ms_200"]["p99"], load["latency_ms_503"]["p99"], load["drain_s"]]) + " |"]
    decoders = report.get("decoders")
    if decoders:
        lines += ["", "## Decoders (bench.decoders: full head, 20 beams, top 10, no exclusion, no assistant)", "",
                  "| model | users | ours, lean step users/s | ours, stock step users/s | HF generate users/s | lean / generate "
                  "| lean = stock lists | top-10 overlap lean vs generate | identical lists lean vs generate |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, entry in decoders.items():
            rates, vs = entry["users_per_s"], entry.get("generate_vs", {}).get("ours_lean", {})
            cells = [entry["users"], rates.get("ours_lean"), rates.get("ours_stock"), rates.get("hf_generate"),
                     entry.get("lean_speedup_vs_generate"), entry["lean_vs_stock"]["identical_lists"],
                     vs.get("top10_overlap"), vs.get("identical_lists")]
            lines.append(f"| {name} | " + " | ".join(_fmt(c, 2) if isinstance(c, float) else _fmt(c) for c in cells) + " |")
        wide = {name: e for name, e in decoders.items() if "ours_lean_wide" in e["users_per_s"]}
        if wide:  # the lean step over every row, one token a step (BeamSearchConfig.narrow off)
            lines += ["", "The lean step without narrowing (every row, one token a step), users/s: " + ", ".join(
                f"{n} {_fmt(e['users_per_s']['ours_lean_wide'], 2)} (narrowed {_fmt(e['narrow_speedup'], 2)}× faster, "
                f"identical lists {_fmt(e['lean_wide_vs_stock']['identical_lists'])})" for n, e in wide.items())]
        recorded = {name: e["users_per_s"]["ours_graphs"] for name, e in decoders.items() if "ours_graphs" in e["users_per_s"]}
        if recorded:  # on CUDA the default step records the lean step as a CUDA graph
            lines += ["", "The graphs step (CUDA), users/s: " + ", ".join(f"{n} {_fmt(r, 2)}" for n, r in recorded.items())]
    if report.get("ratios"):
        lines += ["", "## Ratios (pruned vs dense; the LLM rows vs SASRec)", ""] + [f"- {k}: {_fmt(v, 3)}" for k, v in report["ratios"].items()]
    if report.get("paired_test"):
        lines += ["", "## Paired test on per-user NDCG@10", ""] + [f"- {k}: {v}" for k, v in report["paired_test"].items()]
    return "\n".join(lines) + "\n"


def plots(report: dict, directory: Path) -> list[Path]:
    """NDCG@10 against non-embedding parameters (every model), and p50 latency against parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    points: dict[tuple[float, float], list[str]] = {}
    for name, entry in report["models"].items():
        params = entry.get("params", {}).get("non_embedding")
        ndcg = entry.get("metrics", {}).get("ndcg@10")
        if ndcg is None:
            continue
        if not params:  # no LLM parameter count (SASRec, MostPop): a labelled horizontal reference line
            style = {"mostpop": ":", "sasrec": "--"}.get(name, "-.")
            ax.axhline(ndcg, linestyle=style, color="grey", linewidth=1, label=f"{name} ({ndcg:.3f})")
            continue
        points.setdefault((params, ndcg), []).append(name)
    chain = [n for n in ("dense", "1-attn", "2-mlp", "pruned") if n in report["models"]]
    if len(chain) > 1 and all(report["models"][n].get("params", {}).get("non_embedding") for n in chain):
        ax.plot([report["models"][n]["params"]["non_embedding"] for n in chain],
                [report["models"][n]["metrics"]["ndcg@10"] for n in chain], color="tab:blue", alpha=0.4,
                linewidth=1, label="PruneRec stages")
    for (params, ndcg), names in points.items():  # models at the same point (pruned, pruned+vocab) share a label
        ax.scatter(params, ndcg, color="tab:orange" if any("trsp" in n for n in names) else "tab:blue", zorder=3)
        # the lower of two models of one size (TRSP under greedy depth) is labelled below its point
        below = any(x == params and y > ndcg for x, y in points)
        ax.annotate(", ".join(names), (params, ndcg), fontsize=8, xytext=(4, -11 if below else 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("NDCG@10")
    ax.set_ylim(bottom=0)
    ax.set_title("Quality against size")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    written.append(directory / "ndcg_vs_params.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    served = {n: e for n, e in report["models"].items() if e.get("serving", {}).get("c1")}
    if served:
        fig, ax = plt.subplots(figsize=(7.2, 4.6))
        levels = sorted({int(k[1:]) for e in served.values() for k in e["serving"] if k.startswith("c")})
        for level, marker in zip(levels, ("o", "s", "^", "D"), strict=False):
            xs = [e["params"]["total"] for e in served.values() if f"c{level}" in e["serving"]]
            ys = [e["serving"][f"c{level}"]["latency_ms"]["p50"] for e in served.values() if f"c{level}" in e["serving"]]
            ax.scatter(xs, ys, marker=marker, label=f"concurrency {level}", zorder=3)
        for name, entry in served.items():
            x, y = entry["params"]["total"], entry["serving"]["c1"]["latency_ms"]["p50"]
            ax.annotate(name, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (total)")
        ax.set_ylabel("top-10 latency p50, ms")
        ax.set_title("Latency against size (HTTP, 127.0.0.1)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(directory / "latency_vs_params.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def write_report(report: dict, directory: Path, pair: tuple[str, str] = ("dense", "pruned")) -> list[Path]:
    """report.json, report.md and the plots; returns the paths written. ``pair`` names the models the
    ratios compare (reference first)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, entry in report["models"].items():  # the flat fields the report promises
        serving = entry.get("serving", {})
        if serving.get("c1"):
            entry["latency_ms"] = serving["c1"]["latency_ms"]
            entry["throughput_rps"] = serving.get("c16", serving["c1"])["throughput_rps"]
        logger.debug("report entry %s", name)
    report["ratios"] = ratios(report["models"], *pair)
    for name, entry in (report.get("decoders") or {}).items():  # our decoder against the papers' way (HF generate)
        if entry.get("lean_speedup_vs_generate"):
            report["ratios"][f"{name}_lean_vs_generate_users_per_s"] = entry["lean_speedup_vs_generate"]
        rates = entry.get("users_per_s", {})
        if rates.get("ours_graphs") and rates.get("hf_generate"):  # on CUDA: the recorded step, the default there
            report["ratios"][f"{name}_graphs_vs_generate_users_per_s"] = rates["ours_graphs"] / rates["hf_generate"]
    (directory / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (directory / "report.md").write_text(markdown(report))
    return [directory / "report.json", directory / "report.md", *plots(report, directory)]


def macs_per_token(artifact: str | Path | Any, head: str, context: int = 64) -> int:
    """Multiply-adds of one cached decoding step at ``context`` tokens (projections counted by torch's
    FlopCounterMode; CPU SDPA kernels are not counted) plus the LM-head rows the head mode uses × hidden
    size. ``artifact`` is a directory or a loaded :class:`llmrec.recommender.Recommender`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from llmrec.recommender import Recommender

    recommender = artifact if isinstance(artifact, Recommender) else Recommender.from_artifact(artifact, device="cpu")
    model = recommender.model
    ids = torch.full((1, context), int(recommender.encoder.end_id), dtype=torch.long)
    with torch.no_grad():
        cache = model.model(input_ids=ids, use_cache=True).past_key_values
        counter = FlopCounterMode(display=False)
        with counter:
            model.model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    rows = model.config.vocab_size if head == "full" else int(recommender.trie.vocabulary.numel())
    return int(counter.get_total_flops() // 2 + rows * model.config.hidden_size)


def flops_per_request(artifact: str | Path | Any, histories: list[list[int]], head: str, device: str | None = None) -> float:
    """Matmul FLOPs of one top-10 request as the service answers it (20 beams, ``head``, the history excluded,
    the artifact's assistant when it carries one, the default decoding step), averaged over ``histories`` one
    at a time; counted by torch's FlopCounterMode (the prompt pass's fused attention kernel is not counted:
    a few percent). Side by side, the dense / pruned ratio is the most a wall-clock speedup can reach while
    both models run their multiply-adds equally fast."""
    from torch.utils.flop_counter import FlopCounterMode

    from llmrec.recommender import Recommender

    recommender = artifact if isinstance(artifact, Recommender) else Recommender.from_artifact(artifact, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        for history in histories:
            recommender.recommend([history], k=10, exclude=[history], batch_size=1, head=head)
    return counter.get_total_flops() / max(len(histories), 1)
