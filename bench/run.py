"""The benchmark runs and the offline A/B comparison: quality, cost and speed side by side in one run.

``prunerec bench --profile cpu|gpu`` fine-tunes the dense model, runs the PruneRec stages (plus the vocab
stage), the TRSP depth variant, RecBole SASRec on the identical split and MostPop, all scored on the same
seeded test users (LOO, history 10, full catalog, 20 beams, history excluded); then serves dense, pruned and
pruned + vocab through the real HTTP service on 127.0.0.1, one server per arm (so that each arm's peak
memory is its own), at concurrency 1 and 16, and overloads dense + pruned together (the load check of
:mod:`bench.harness`). Everything lands in ``bench/results/<profile>/``:
``report.json`` (the shape below), ``report.md`` and two plots. Every step is resumable (finished artifacts
and evaluations are reused).

``prunerec compare A B`` does the same for two artifacts, plus a paired test on per-user NDCG@10.

report.json::

    {"protocol": {...},
     "models": {"<name>": {"artifact", "params": {"total", "embedding", "non_embedding"}, "artifact_bytes",
                           "metrics": {"ndcg@10", "hr@10", ...}, "latency_ms": {"p50", "p99"},
                           "throughput_rps", "peak_rss_bytes", "macs_per_token", "flops_per_request"}},
     "load": {"requests", "by_status", "goodput_rps", "late_200", "server": {"shed", ...}, "drain_s", ...},
     "ratios": {"retention_ndcg@10", "non_embedding_pruned_fraction", "speedup_p50", "throughput_gain",
                "flops_ratio", ...}}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from bench.harness import LoadCheck, load_check, request_payloads, serve_and_measure
from bench.report import flops_per_request, macs_per_token, model_entry, paired_test, per_user_ndcg, write_report
from llmrec.artifact import artifact_identity, read_manifest
from llmrec.configs import merge
from recdata.prep import PreparedData

logger = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    """One benchmark run; the profile scales the work, never the protocol (history 10, 20 beams, full catalog)."""

    profile: str = "cpu"
    """cpu (<= 60 min on 2 cores, seeded users, SASRec capped) or gpu (one GPU, every user)."""
    model: str = "smollm2-135m"
    """Base model to fine-tune (the embedded default, or a local HF directory)."""
    max_history: int = 10
    """History length of the fine-tuned models (titles in a prompt; SASRec sees 50)."""
    select_metric: Literal["loss", "ndcg@10"] | None = None
    """Model selection of the dense fine-tuning: loss or ndcg@10 (None: the training profile's)."""
    output: str | None = None
    """Report directory [bench/results/<profile>]."""
    work: str | None = None
    """Artifacts and evaluations [runs/bench-<profile>]; re-running resumes from it."""
    users: int | None = 300
    """Seeded test users for every quality number (None = all)."""
    sasrec_epochs: int = 5
    """Most SASRec epochs (early stopping may end it sooner)."""
    latency_requests: int = 24
    """Requests per concurrency level and arm in the latency measurement."""
    throughput_requests: int = 64
    """Requests per arm at each concurrency level above 1 (at least ``latency_requests``): several full batches,
    so that the throughput is the steady state's, not the first and last partial batches'."""
    flops_requests: int = 8
    """Latency users whose requests' matmul FLOPs are counted per served arm (flops_per_request; the dense /
    pruned ratio, flops_ratio, is what speedup_p50 and throughput_gain reach at equal FLOP/s)."""
    concurrency: list[int] = field(default_factory=lambda: [1, 16])
    """Concurrent clients of the latency measurement."""
    serve_batch_size: int = 16
    """Requests the service decodes together per arm (its --max-batch-size) in the latency measurement."""
    head: str = "catalog"
    """Head mode for quality and serving (the default, catalog, was chosen from bench/results/catalog_vocab_cpu.json)."""
    assist: bool = True
    """Train D3's SASRec assistant for the dense and the pruned model (`prunerec assist`, the training profile of
    the same name) and report the assisted rows (dense+assist, pruned+assist) beside the pure ones. The served
    arms then carry it: serving is measured as the service runs them (assisted)."""
    peft: bool = False
    """Also compare PrunePEFT's LoRA placement with plain LoRA (q, v) at the same trainable-parameter count."""
    peft_epochs: float | None = None
    """Epochs of each LoRA arm (None: the training profile's); both arms get the same budget."""
    calibration_samples: int | None = None
    """Calibration samples of each pruning stage (None = the pruning profile's own)."""
    load_seconds: float = 60.0
    """Length of the load check: 64 clients, closed loop, against dense and pruned served at 50/50 with
    deadlines (see :class:`LoadCheck`); 0 skips it."""
    load_deadline_ms: float = 5000.0
    """Deadline of every request of the load check."""
    decoder_users: int = 16
    """Users of the decoder comparison (bench.decoders: our lean and stock steps against HF generate with
    prefix_allowed_tokens_fn, dense and pruned, the full head, 20 beams); 0 skips it."""
    device: str | None = None
    """cpu or cuda for compression, evaluation, SASRec and serving (default: the profile's; cpu profile: auto)."""
    seed: int = 0
    """Seed of the user sample and of every stage."""


BENCH_PROFILES: dict[str, dict[str, Any]] = {
    # <= 60 minutes on 2 CPU cores (the fine-tuning and compression profiles named cpu).
    # Head ablations and the greedy layer search cost passes over the calibration set: 16 samples (the pruning
    # profile has 32) keep the whole run inside the hour.
    "cpu": {"users": 300, "sasrec_epochs": 5, "latency_requests": 24, "calibration_samples": 16, "load_seconds": 45.0},
    # the full-size pipeline on one GPU: every user, SASRec to convergence.
    # peft_epochs 1: the two LoRA arms are a comparison of placements at one budget, and two more full
    # trainings would not fit the 20 minutes.
    "gpu": {"users": None, "sasrec_epochs": 50, "latency_requests": 200, "device": "cuda", "peft": True, "peft_epochs": 1.0,
            "decoder_users": 64,
            "load_seconds": 30.0, "load_deadline_ms": 2000.0, "concurrency": [1, 16, 64], "serve_batch_size": 64},
}


def bench_config(profile: str, **given: Any) -> BenchConfig:
    """The profile's configuration with the values given (None: not given) over it."""
    if profile not in BENCH_PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(BENCH_PROFILES)}")
    config: BenchConfig = merge(BenchConfig, BENCH_PROFILES[profile], given, profile=profile)
    if str(config.device or "").startswith("cuda"):
        import torch

        if not torch.cuda.is_available():  # fail now, not after the CPU has fine-tuned for the gpu profile
            raise ValueError(f"the {profile} profile runs on CUDA and none is available here; pass --device cpu to "
                             "run it on the CPU anyway (hours), or use --profile cpu")
    return config


def evaluation_path(work: Path, name: str, head: str) -> Path:
    """Where the benchmark keeps a model's evaluation in its work directory: ``eval/NAME.json`` under the default
    head, ``eval/NAME@HEAD.json`` under another, so that a run with another ``--head`` on the same work directory
    keeps the first run's evaluations (and their per-user ranks) beside its own."""
    return work / "eval" / (f"{name}.json" if head == "catalog" else f"{name}@{head}.json")


def evaluate_cached(artifact: Path, data: PreparedData, users: int | None, seed: int, head: str, output: Path,
                    device: str | None, search: str = "beam", assist: bool | None = False) -> dict:
    """Evaluate (or reuse an evaluation written to ``output`` with the same protocol, of the same build of the
    artifact: a stage rebuilt at the same path since is evaluated again)."""
    from pruning.evaluate import EvalConfig
    from pruning.evaluate import run as evaluate

    identity = artifact_identity(artifact, assistant=assist is not False)
    if output.is_file():
        stored = json.loads(output.read_text())
        cached = stored["config"]
        if ((cached["users"], cached["seed"], cached["head"], cached.get("search", "beam"), cached.get("assist", False))
                == (users, seed, head, search, assist) and stored.get("artifact_identity") == identity):
            return stored
        logger.info("%s: %s holds another protocol or build", artifact, output)
    own = own_evaluation(artifact, data, users, seed, head, search, assist)
    if own is not None:
        own["artifact_identity"] = identity
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(own, indent=2))
        shutil.copyfile(Path(artifact) / "eval" / "test.ranks.csv", output.with_suffix(".ranks.csv"))
        return own
    result = evaluate(EvalConfig(artifact=str(artifact), users=users, seed=seed, head=head, output=str(output),
                                 batch_size=16, device=device, search=search, assist=assist), data)  # type: ignore[arg-type]
    result["artifact_identity"] = identity
    output.write_text(json.dumps(result, indent=2))
    return result


def own_evaluation(artifact: Path, data: PreparedData, users: int | None, seed: int, head: str, search: str,
                   assist: bool | None) -> dict | None:
    """The artifact's own test evaluation (``<artifact>/eval/test.json`` and its ranks, which its stage or
    ``prunerec evaluate`` wrote) when it followed this protocol: the pure LLM only (``assist`` False: an
    assistant can be chosen again without rebuilding the artifact), the same data, users, seed, head, search,
    beams and masking. A rebuilt artifact replaces its whole directory, so what lies inside is of this build.
    None when there is none, or it differs."""
    from pruning.evaluate import EvalConfig

    path = Path(artifact) / "eval" / "test.json"
    if assist is not False or not (path.is_file() and path.with_suffix(".ranks.csv").is_file()):
        return None
    stored = json.loads(path.read_text())
    config, protocol = stored.get("config", {}), stored.get("protocol", {})
    defaults = EvalConfig(artifact=str(artifact))
    same = ((config.get("users") or 0) == (users or 0) and config.get("seed") == seed and config.get("head") == head
            and config.get("search", "beam") == search and config.get("split") == "test"
            and config.get("num_beams") == defaults.num_beams and config.get("exclude_history") == defaults.exclude_history
            and protocol.get("assisted") is False and protocol.get("dataset_fingerprint") == data.fingerprint)
    if not same:
        return None
    logger.info("reusing %s's own evaluation (%s): the same protocol", artifact, path)
    return stored


class PhaseClock:
    """Wall-clock minutes per benchmark phase, so the report shows where the time went."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.minutes: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        logger.info("bench phase: %s", name)
        try:
            yield
        finally:
            self.minutes[name] = round(self.minutes.get(name, 0.0) + (time.monotonic() - started) / 60, 2)
            logger.info("bench phase %s: %.1f min", name, self.minutes[name])

    def total(self) -> float:
        return round((time.monotonic() - self.started) / 60, 1)


def run_bench(config: BenchConfig, data: PreparedData) -> list[Path]:
    """The whole benchmark (see the module docstring); returns the report files."""
    from bench import sasrec
    from pruning.evaluate import sample_users
    from pruning.prune import run as prune
    from pruning.stages import reconstruction_key
    from pruning.train import PROFILES as TRAIN_PROFILES
    from pruning.train import TrainConfig
    from pruning.train import run as train

    work = Path(config.work or f"runs/bench-{config.profile}")
    output = Path(config.output or f"bench/results/{config.profile}")
    # A re-run reuses what the work directory holds; its minutes then cover only the work left to do.
    resumed = work.is_dir() and any(work.iterdir())
    clock = PhaseClock()
    dense = work / "0-dense"
    with clock.phase("fine-tune"):
        if not (dense / "prunerec.json").is_file():
            train(merge(TrainConfig, TRAIN_PROFILES[config.profile], {"select_metric": config.select_metric},
                        output=str(dense), model=config.model, seed=config.seed, profile=config.profile,
                        max_history=config.max_history), data)
    greedy_config = _prune_config(config, work, dense, stages=["attn", "mlp", "depth", "vocab"])
    trsp_config = _prune_config(config, work, dense, stages=["attn", "mlp", "depth"], depth_method="trsp")
    with clock.phase("prune (attn, mlp, greedy depth, vocab)"):
        stages = prune(greedy_config, data)
    with clock.phase("prune (trsp depth)"):
        trsp = prune(trsp_config, data)[-1]
    named = {"dense": dense, **{p.name: p for p in stages}, "pruned": stages[2], "pruned+vocab": stages[3],
             "trsp": trsp}
    named.pop(stages[2].name)
    named.pop(stages[3].name)
    repo_root = Path.cwd().resolve()
    models: dict[str, dict] = {}
    evaluations: dict[str, dict] = {}
    with clock.phase("evaluate"):
        for name, path in named.items():
            evaluations[name] = evaluate_cached(path, data, config.users, config.seed, config.head, evaluation_path(work, name, config.head), config.device)
            models[name] = model_entry(path, evaluations[name], repo_root)
    if config.assist:
        from pruning.stages import carry_assistant

        with clock.phase("assistant"):
            for name, source in (("dense", None), ("pruned", dense)):
                _assistant(config, data, named[name], source)
                evaluations[f"{name}+assist"] = evaluate_cached(named[name], data, config.users, config.seed, config.head,
                                                                evaluation_path(work, f"{name}+assist", config.head), config.device,
                                                                assist=True)
                models[f"{name}+assist"] = model_entry(named[name], evaluations[f"{name}+assist"], repo_root)
                models[f"{name}+assist"]["assisted"] = evaluations[f"{name}+assist"]["protocol"]["assist_weight"]
            # the vocab cut ran before the pruned model had its assistant; its catalog-head scores are the pruned
            # model's, so that assistant and weight hold for it as they are, and the served arms compare alike
            carry_assistant(named["pruned"], named["pruned+vocab"])
    pairs = sample_users(data.splits["test"], config.users, config.seed)
    if config.assist:  # the assistant alone on the same users: what the LLM adds to it
        from pruning.assist import assistant_metrics

        models["assistant"] = {"artifact": None, "params": {"total": None, "embedding": None, "non_embedding": None},
                               "metrics": assistant_metrics(dense, data, pairs)}
    sasrec_config = sasrec.SASRecConfig(output=str(work / "sasrec"), epochs=config.sasrec_epochs, device=config.device or "cpu")
    with clock.phase("sasrec"):
        sasrec_result = _cached(work / "sasrec" / "result.json", {"config": asdict(sasrec_config), "users": config.users, "seed": config.seed},
                                lambda: sasrec.run(sasrec_config, data, users=pairs))
    models["sasrec"] = {"artifact": None, "params": {"total": sasrec_result["params"], "embedding": None, "non_embedding": None},
                        "metrics": sasrec_result["metrics"], "epochs_run": sasrec_result["epochs_run"],
                        # RecBole's evaluator on every test user, history not masked (see bench.sasrec)
                        "recbole_test_unmasked": sasrec_result.get("test_recbole"),
                        "minutes": sasrec_result["minutes"]}
    if config.peft:
        with clock.phase("peft"):
            for name, path in _peft_arms(config, data, work).items():
                evaluations[name] = evaluate_cached(path, data, config.users, config.seed, config.head, evaluation_path(work, name, config.head), config.device)
                models[name] = model_entry(path, evaluations[name], repo_root)
    models["mostpop"] = {"artifact": None, "params": {"total": 0, "embedding": 0, "non_embedding": 0},
                         "metrics": evaluations["dense"]["mostpop"]}
    payloads = request_payloads(data, pairs[: config.latency_requests])
    busy = request_payloads(data, pairs[: max(config.latency_requests, config.throughput_requests)])
    counted = [data.history(int(u), int(p)).tolist() for u, p in pairs[: config.flops_requests]]
    with clock.phase("serve"):
        keys = serving_keys({name: named[name] for name in SERVED_ARMS}, config, len(payloads), len(busy))
        for name in SERVED_ARMS:
            models[name]["serving"] = _cached(work / "serving" / f"{name}.json", keys[name], lambda name=name: serve_and_measure(
                name, str(named[name]), payloads, config.concurrency, config.head, max_batch_size=config.serve_batch_size,
                device=config.device, throughput_payloads=busy))
            models[name]["macs_per_token"] = macs_per_token(named[name], config.head)
            models[name]["flops_per_request"] = _cached(
                work / "serving" / f"{name}-flops.json", {**keys[name], "flops_requests": len(counted)},
                lambda name=name: flops_per_request(named[name], counted, config.head, config.device))
    decoders = None
    if config.decoder_users:
        with clock.phase("decoders"):
            decoders = {name: _cached(work / "decoders" / f"{name}.json",
                                      {"artifact": str(named[name]), "identity": artifact_identity(named[name]),
                                       "users": config.decoder_users, "seed": config.seed,
                                       "device": config.device, "batch": config.serve_batch_size},
                                      lambda name=name: _decoders(named[name], data, pairs[: config.decoder_users], config))
                        for name in ("dense", "pruned")}
    load = None
    if config.load_seconds:
        check = LoadCheck(seconds=config.load_seconds, deadline_ms=config.load_deadline_ms)
        arms = {"dense": str(named["dense"]), "pruned": str(named["pruned"])}
        with clock.phase("load check"):
            load = _cached(work / "serving" / "load.json", load_key(arms, check, config),
                           lambda: load_check(arms, request_payloads(data, pairs), check, config.head, device=config.device))
    sampled = len(pairs) < len(data.splits["test"])
    report = {
        "protocol": {
            "profile": config.profile, "dataset": data.name, "split": "leave-one-out (test)", "users": len(pairs),
            "users_sampled": sampled, "seed": config.seed, "history_length": config.max_history, "num_beams": 20,
            "ranking": "full catalog, history excluded", "head": config.head,
            "serving": f"HTTP on 127.0.0.1, one server per arm, head={config.head}, top-10, concurrency "
                       f"{config.concurrency}: {len(payloads)} requests at 1, {len(busy)} at each level above "
                       f"(each after an untimed burst at its level); batching {keys[SERVED_ARMS[0]]['batching']}",
            "compression": {"calibration": asdict(greedy_config.calibration), "distill_per_stage": asdict(greedy_config.distill),
                            "reconstruction": reconstruction_key(greedy_config) if greedy_config.reconstruct else None,
                            "trsp": asdict(trsp_config.trsp)},
            "sasrec": f"RecBole 1.2.1, CE loss, max {config.sasrec_epochs} epochs, early stopping on valid NDCG@10",
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs", "minutes": clock.total(),
            "phase_minutes": clock.minutes, "resumed": resumed,
            "sample_check": sample_check(data, pairs) if sampled else None,
            "config": asdict(config),
        },
        "models": models,
        "load": load,
        "decoders": decoders,
    }
    return write_report(report, output)


def _decoders(artifact: Path, data: PreparedData, pairs: np.ndarray, config: BenchConfig) -> dict[str, Any]:
    """bench.decoders on one artifact: the lean and stock steps (and the graphs step on CUDA) and HF generate, same
    users and batch size."""
    from bench.decoders import compare_decoders
    from llmrec.recommender import Recommender

    recommender = Recommender.from_artifact(artifact, device=config.device)
    histories = [data.history(int(u), int(p)).tolist() for u, p in pairs]
    # on a GPU the recorded step is the default ('auto'): time it beside the lean and stock steps
    extra = ["graphs"] if recommender.device.type == "cuda" else []
    return compare_decoders(recommender, histories, batch_size=config.serve_batch_size, extra_steps=extra)


def sample_check(data: PreparedData, pairs: np.ndarray) -> dict[str, float]:
    """How representative the user sample is: MostPop (no model, so free) on the sample against every test user.

    A sample of a few hundred users can be easier or harder than the whole split (on ml-100k the cpu profile's
    300 users give MostPop NDCG@10 0.059 against 0.045 for all 943), which every absolute figure inherits;
    ratios between models scored on the same users are what the sample is for."""
    from pruning.evaluate import mostpop_metrics

    every = data.splits["test"]
    sample, _ = mostpop_metrics(data, pairs, True, [10], 20)
    whole, _ = mostpop_metrics(data, every, True, [10], 20)
    return {"mostpop_ndcg@10_sample": sample["ndcg@10"], "mostpop_ndcg@10_all_users": whole["ndcg@10"],
            "mostpop_hr@10_sample": sample["hr@10"], "mostpop_hr@10_all_users": whole["hr@10"],
            "all_users": len(every)}


SERVED_ARMS = ("dense", "pruned", "pruned+vocab")
"""The arms served over HTTP; their latency ratios (speedup_p50, throughput_gain) compare them."""


def serving_keys(arms: dict[str, Path], config: BenchConfig, requests: int, busy_requests: int) -> dict[str, dict]:
    """Per served arm, what its cached serving figures must agree on. Every key holds every arm's build, so that
    a rebuilt arm has all of them served again: the ratios compare arms served side by side in one run, never a
    fresh figure with one an earlier run measured under another load (which gave 7.4× where side by side gave
    9.2×, 2026-11-26)."""
    identities = {name: artifact_identity(path, assistant=True) for name, path in arms.items()}
    batching = service_batching()
    # "timing": levels above 1 timed after an untimed burst (bench.harness.measure_level, since 2026-11-27)
    shared = {"head": config.head, "batching": batching, "timing": "steady-state levels", "requests": requests,
              "busy_requests": busy_requests, "levels": config.concurrency, "users": config.users, "seed": config.seed,
              "device": config.device, "batch": config.serve_batch_size, "served_together": identities}
    return {name: {"artifact": str(path), "identity": identities[name],
                   "assist_weight": (read_manifest(path).get("assistant") or {}).get("weight"), **shared}
            for name, path in arms.items()}


def service_batching() -> dict[str, Any]:
    """The batching settings the served arms' service reads from this environment (app.settings)."""
    from app.settings import Settings

    service = Settings()
    return {name: getattr(service, name) for name in ("max_wait_ms", "solo_after", "parallel_batches")}


def load_key(arms: dict[str, str], check: LoadCheck, config: BenchConfig) -> dict[str, Any]:
    """What the cached load check must agree on: the arms' builds (with their assistants), the check, the head,
    the device, the users and the service's batching."""
    identities = {name: artifact_identity(path, assistant=True) for name, path in arms.items()}
    return {"arms": arms, "identities": identities, "check": asdict(check), "head": config.head, "device": config.device,
            "users": config.users, "batching": service_batching()}


def _cached(path: Path, key: dict, compute: Any) -> Any:
    """The result stored at ``path`` if it was computed with the same key, else compute and store it."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == json.loads(json.dumps(key)):
            return stored["result"]
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "result": result}, default=str))
    return result


def _peft_arms(config: BenchConfig, data: PreparedData, work: Path) -> dict[str, Path]:
    """Plain LoRA on q/v and PrunePEFT's placement at the same trainable-parameter count, same training."""
    from peft import LoraConfig, get_peft_model

    from llmrec.model import load_model
    from pruning.peft_search import PeftSearchConfig, search
    from pruning.train import PROFILES as TRAIN_PROFILES
    from pruning.train import TrainConfig
    from pruning.train import run as train

    base = load_model(config.model, device="cpu").model
    plain = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    budget = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    searched = work / "peft" / "search.json"
    if not searched.is_file():
        search(PeftSearchConfig(output=str(searched), model=config.model, budget_params=budget, seed=config.seed), data,
               device=config.device)
    targets = json.loads(searched.read_text())["target_modules"]
    arms = {"lora": (["q_proj", "v_proj"]), "lora-prunepeft": targets}
    paths = {}
    for name, modules in arms.items():
        path = work / "peft" / name
        if not (path / "prunerec.json").is_file():
            profile = TRAIN_PROFILES[config.profile]
            lr = max(profile.get("lr", TrainConfig.lr), 1e-3)  # LoRA wants a higher rate than full fine-tuning
            train(merge(TrainConfig, profile, {"epochs": config.peft_epochs}, output=str(path), model=config.model,
                        seed=config.seed, profile=config.profile, method="lora", lora_r=8, lora_alpha=16,
                        lora_targets=list(modules), lr=lr), data)
        paths[name] = path
    return paths


def _assistant(config: BenchConfig, data: PreparedData, artifact: Path, source: Path | None) -> None:
    """Give ``artifact`` its assistant unless it has one: trained here, or ``source``'s reused (its weight is
    still chosen for this artifact's LLM)."""
    from pruning.assist import PROFILES as ASSIST_PROFILES
    from pruning.assist import AssistConfig
    from pruning.assist import run as assist

    entry = read_manifest(artifact).get("assistant")
    if entry and "inherited" not in entry.get("training", {}):  # an inherited one's weight was the teacher's
        return
    assist(merge(AssistConfig, ASSIST_PROFILES[config.profile], {"device": config.device}, artifact=str(artifact),
                 source=str(source) if source is not None else None, seed=config.seed, head=config.head), data)


def _prune_config(bench: BenchConfig, work: Path, dense: Path, **settings: Any) -> Any:
    """The compression run of the bench: the pruning profile of the same name, the bench's users and device."""
    from pruning.prune import PROFILES as PRUNE_PROFILES
    from pruning.prune import PruneConfig

    return merge(PruneConfig, PRUNE_PROFILES[bench.profile], {"calibration.samples": bench.calibration_samples},
                 output=str(work), teacher=str(dense), evaluate=False, eval_users=bench.users, device=bench.device,
                 **settings)


def compare(a: str, b: str, data: PreparedData, output: Path, users: int | None = 300, seed: int = 0,
            head: str = "full", latency_requests: int = 24, concurrency: list[int] | None = None,
            serve: bool = True, device: str | None = None, assist: bool | None = False) -> dict:
    """Offline A/B of two artifacts: quality on the same users, a paired test on per-user NDCG@10, cost."""
    from pruning.evaluate import sample_users

    names = {"A": Path(a), "B": Path(b)}
    models: dict[str, dict] = {}
    ndcg: dict[str, np.ndarray] = {}
    histories: dict[str, int] = {}
    for name, path in names.items():
        result = evaluate_cached(path, data, users, seed, head, output / "eval" / f"{name}.json", device, assist=assist)
        histories[name] = result["protocol"]["history_length"]
        models[name] = model_entry(path, result, Path.cwd().resolve())
        ranks = pd.read_csv((output / "eval" / f"{name}.json").with_suffix(".ranks.csv"))
        ndcg[name] = per_user_ndcg(ranks["rank"].tolist())
    pairs = sample_users(data.splits["test"], users, seed)
    if serve:
        payloads = request_payloads(data, pairs[:latency_requests])
        for name, path in names.items():
            models[name]["serving"] = serve_and_measure(name, str(path), payloads, concurrency or [1, 16], head, device=device,
                                                        assist=assist)
    report = {
        "protocol": {"compare": {"A": str(a), "B": str(b)}, "dataset": data.name, "users": len(pairs), "seed": seed,
                     "history_length": histories["A"] if histories["A"] == histories["B"] else histories,
                     "num_beams": 20, "head": head, "ranking": "full catalog, history excluded",
                     "assist": assist},
        "models": models,
        "paired_test": paired_test(ndcg["A"], ndcg["B"]),
    }
    write_report(report, output, ("A", "B"))
    return report
