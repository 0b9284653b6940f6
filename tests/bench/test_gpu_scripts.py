"""bench/gpu_retention.sh and bench/gpu_wait.sh, the scripts a GPU lease runs, with a stand-in python3 that
records its command lines: the knobs reach the right options, the probe's settings fill what is not given, and
the wait returns with the results copied."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

STUB = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
  *--lease-settings*) echo "16 0.000141 8 0.000849" ;;
  *"bench.throughput --device"*) [ -n "${FAIL_PROBE:-}" ] && exit 1; echo '{}' > "${@: -1}" ;;
  *"cli.main train"*) [ -n "${FAIL_TRAIN:-}" ] && exit 1; out="${@: -1}"; mkdir -p "$out" && echo '{}' > "$out/prunerec.json" ;;
  *--dense-only*) mkdir -p "$WORK/retention-dense/eval" && echo '{"dense": 1}' > "$WORK/retention-dense/eval/dense.json" \
    && echo rank > "$WORK/retention-dense/eval/dense.ranks.csv" ;;
  *bench.retention*) all="$*"; work="${all##*--work }"; [ -f "${work%% *}/eval/dense.json" ] && echo "dense evaluation found" >> "$CALLS" ;;
esac
"""


def run_retention_script(tmp_path: Path, **knobs: str) -> list[str]:
    return run_script(tmp_path, "gpu_retention.sh", [str(tmp_path / "out")], knobs).calls


class Ran:
    def __init__(self, result: subprocess.CompletedProcess, calls: list[str]) -> None:
        self.result, self.calls = result, calls


def run_script(tmp_path: Path, script: str, arguments: list[str], knobs: dict[str, str], ok: bool = True) -> Ran:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "python3"
    stub.write_text(STUB)
    stub.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
           "WORK": str(tmp_path / "work"), **knobs}
    result = subprocess.run(["bash", str(ROOT / "bench" / script), *arguments], env=env,
                            capture_output=True, text=True, timeout=120)
    if ok:
        assert result.returncode == 0, result.stderr
        assert "== " in result.stdout and result.stdout.rstrip().endswith("done")
    return Ran(result, calls.read_text().splitlines() if calls.exists() else [])


def test_the_probe_picks_the_batches_and_rates_where_none_are_given(tmp_path):
    calls = run_retention_script(tmp_path, PROBE="1", EVERY_STAGE="1", TARGETS="0.955", DISTILL_EPOCHS="3")
    probe, settings, train, retention = calls
    assert "bench.throughput --device cuda --batch-size 2,8,16 --pack-tokens 2048" in probe
    assert "finetune compact packed,distill compact packed,distill compact catalog packed" in probe  # both losses
    assert "--lease-settings" in settings and "--distill-variant distill compact packed --arms 1" in settings
    assert "--batch-size 16 --lr 0.000141" in train and "--profile gpu" in train
    assert "--distill-batch-size 8 --distill-lr 0.000849" in retention
    assert "--distill-epochs 3" in retention and "--every-stage" in retention and "--targets 0.955" in retention
    # the dense model is there now: a second run trains nothing, and a given knob wins over the probe
    calls = run_retention_script(tmp_path, PROBE="1", DISTILL_BATCH="4", PRESET="prunerec", VOCAB="catalog")
    assert not any("cli.main train" in call for call in calls)
    retention = calls[-1]
    assert "--distill-batch-size 4" in retention
    assert "--distill-lr" not in retention  # a preset keeps its own rate
    assert "--distill-preset prunerec" in retention and "--distill-vocab catalog" in retention
    assert "--distill-variant distill compact catalog packed" in calls[0]  # the batch of the loss it runs
    assert "--every-stage" not in retention
    assert not any("bench.throughput --device" in call for call in calls)  # the probe's report is reused


def test_without_the_probe_only_the_knobs_given_reach_the_commands(tmp_path):
    calls = run_retention_script(tmp_path, TRAIN_BATCH="8", DISTILL_LR="0.0005")
    assert not any("bench.throughput" in call for call in calls)
    train, retention = calls
    assert "--batch-size 8" in train and "--lr" not in train
    assert "--distill-lr 0.0005" in retention and "--distill-batch-size" not in retention
    # the teacher's outputs computed once into WORK/teacher-outputs, unless asked to compute them on first use
    assert f"--distill-teacher-outputs {tmp_path / 'work' / 'teacher-outputs'}" in retention
    retention = run_retention_script(tmp_path, TEACHER_OUTPUTS="0")[-1]
    assert "bench.retention" in retention and "--distill-teacher-outputs" not in retention


def test_an_arm_of_the_default_plan_prunes_one_point_without_targets(tmp_path):
    calls = run_retention_script(tmp_path, PLAN="default", DISTILL_LR="0.001")
    retention = calls[-1]
    assert "--plan default" in retention and "--targets" not in retention and "--distill-lr 0.001" in retention
    ran = run_script(tmp_path, "gpu_retention.sh", [str(tmp_path / "out")], {"PLAN": "default", "TARGETS": "0.9"}, ok=False)
    assert ran.result.returncode != 0 and "no TARGETS" in ran.result.stdout
    assert not any("bench.retention" in call for call in ran.calls)


@pytest.mark.parametrize("finished", [True, False])
def test_the_wait_returns_when_the_job_is_done_and_brings_its_results(tmp_path, finished):
    log = tmp_path / "job.log"
    log.write_text("== 10:00:00 train\nprogress 50%\r" + ("== 10:09:00 done\n" if finished else ""))
    results = tmp_path / "results"
    (results / "retention").mkdir(parents=True)
    (results / "probe.json").write_text("{}")
    (results / "retention" / "report.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_wait.sh"), str(log), str(results), "0"],
                            env={**os.environ, "OUT": str(out)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.rstrip().endswith("== done" if finished else "== running")
    assert (out / "probe.json").is_file() and (out / "retention" / "report.json").is_file()
    assert (out / "job.log").read_text() == log.read_text()


def test_the_wait_brings_at_most_eight_files_the_reports_first(tmp_path):
    """A device call brings back 8 files of $OUT and leaves out the rest whichever they are (the first lease,
    2026-11-27, lost three arms' reports to their report.md and plots; the second, three arms' logs): the
    results whole in one archive, every JSON report, then the log, then the other logs; what an earlier copy
    brought and this one does not choose is dropped."""
    log = tmp_path / "gpu.log"
    log.write_text("== 10:00:00 arms\n")
    results = tmp_path / "results"
    results.mkdir()
    for name in ("dense", "arm-a", "arm-b", "arm-c", "arm-d", "arm-e", "arm-f", "arm-g"):
        (results / f"{name}.log").write_text(name)
    out = tmp_path / "out"
    out.mkdir()

    def wait() -> set[str]:
        subprocess.run(["bash", str(ROOT / "bench" / "gpu_wait.sh"), str(log), str(results), "0"],
                       env={**os.environ, "OUT": str(out)}, capture_output=True, text=True, timeout=60, check=True)
        return {str(path.relative_to(out)) for path in out.rglob("*") if path.is_file()}

    early = wait()  # only logs so far: they fill the call
    assert len(early) == 8 and {"gpu.log", "results.tar.gz"} < early
    (results / "probe.json").write_text("{}")
    for arm in "abcde":
        (results / f"retention-{arm}").mkdir()
        for name in ("report.json", "report.md", "retention.png"):
            (results / f"retention-{arm}" / name).write_text(arm)
    late = wait()
    assert len(late) == 8
    assert {"probe.json", "gpu.log"} | {f"retention-{arm}/report.json" for arm in "abcde"} < late
    assert not any(name.endswith((".md", ".png")) for name in late)
    assert (out / "retention-e" / "report.json").read_text() == "e"
    with tarfile.open(out / "results.tar.gz") as archive:  # every file of the results, the logs left out above too
        packed = {os.path.normpath(member.name): archive.extractfile(member).read().decode()  # type: ignore[union-attr]
                  for member in archive.getmembers() if member.isfile()}
    every = {str(path.relative_to(results)): path.read_text() for path in results.rglob("*") if path.is_file()}
    assert packed == every and "arm-g.log" in packed and "retention-a/retention.png" in packed


def test_an_archive_too_large_to_come_back_keeps_the_reports_and_logs_or_is_left_out(tmp_path):
    """A device call brings back no file over 16 MiB: the archive drops the plots first, then itself."""
    log = tmp_path / "gpu.log"
    log.write_text("== 10:00:00 arms\n")
    results = tmp_path / "results"
    (results / "retention").mkdir(parents=True)
    (results / "retention" / "report.json").write_text("{}")
    (results / "arm-a.log").write_text("a")
    (results / "retention" / "retention.png").write_bytes(os.urandom(16 * 1024 * 1024))  # does not compress
    out = tmp_path / "out"
    out.mkdir()
    run = ["bash", str(ROOT / "bench" / "gpu_wait.sh"), str(log), str(results), "0"]
    subprocess.run(run, env={**os.environ, "OUT": str(out)}, capture_output=True, text=True, timeout=60, check=True)
    with tarfile.open(out / "results.tar.gz") as archive:
        assert {os.path.normpath(name) for name in archive.getnames() if "." in os.path.basename(name)} == {
            "retention/report.json", "arm-a.log"}
    (results / "big.log").write_bytes(os.urandom(16 * 1024 * 1024))
    subprocess.run(run, env={**os.environ, "OUT": str(out)}, capture_output=True, text=True, timeout=60, check=True)
    assert not (out / "results.tar.gz").exists()
    assert (out / "retention" / "report.json").is_file() and (out / "gpu.log").is_file()


def test_a_wait_killed_midway_has_already_brought_the_results(tmp_path):
    """A device call killed when the session's time runs out returns what is in $OUT: the wait must have copied
    the reports before its first 20-second sleep, not only when it returns."""
    log = tmp_path / "job.log"
    log.write_text("== 10:00:00 retention\n")
    results = tmp_path / "results" / "retention"
    results.mkdir(parents=True)
    (results / "report.json").write_text('{"protocol": {"complete": false}}')
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(["timeout", "3", "bash", str(ROOT / "bench" / "gpu_wait.sh"), str(log), str(results.parent), "600"],
                            env={**os.environ, "OUT": str(out)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 124  # killed while waiting
    assert (out / "retention" / "report.json").read_text() == '{"protocol": {"complete": false}}'
    assert (out / "job.log").is_file()


def test_arms_share_the_probe_and_the_dense_model_and_each_runs_its_own_retention(tmp_path):
    out = tmp_path / "out"
    ran = run_script(tmp_path, "gpu_arms.sh", [str(out), "base", "catalog:VOCAB=catalog", "deep:GRADUAL=2 HIDDEN=1"],
                     {"PROBE": "1", "EVERY_STAGE": "1", "TARGETS": "0.955"})
    calls = ran.calls
    assert sum("bench.throughput --device" in call for call in calls) == 1  # one probe
    assert sum("cli.main train" in call for call in calls) == 1  # one dense model
    settings = [call for call in calls if "--lease-settings" in call]
    assert len(settings) == 4 and all("--arms 3" in call for call in settings)  # the dense run's, then each arm's
    dense_only = [call for call in calls if "--dense-only" in call]  # the dense model evaluated once, before the arms
    assert len(dense_only) == 1 and "--users 0" in dense_only[0]
    retentions = {call.split("--output ")[1].split()[0].rsplit("/", 1)[1]: call for call in calls
                  if "bench.retention" in call and "--dense-only" not in call}
    assert set(retentions) == {"retention-base", "retention-catalog", "retention-deep"}
    assert calls.count("dense evaluation found") == 3  # each arm's retention starts with it in its WORK/eval
    for name in ("base", "catalog", "deep"):
        assert (tmp_path / "work" / f"retention-{name}" / "eval" / "dense.ranks.csv").is_file()
    assert all("--every-stage" in call and "--targets 0.955" in call for call in retentions.values())  # shared knobs
    assert "--distill-vocab catalog" in retentions["retention-catalog"] and "--distill-vocab" not in retentions["retention-base"]
    assert "--gradual 2" in retentions["retention-deep"] and "--distill-hidden-weight 1" in retentions["retention-deep"]
    assert "--work " + str(tmp_path / "work" / "retention-deep") in retentions["retention-deep"]
    assert all((out / f"arm-{name}.log").read_text().rstrip().endswith("done") for name in ("base", "catalog", "deep"))
    assert "arm catalog ended" in ran.result.stdout


def test_the_next_leases_arms_reach_their_options(tmp_path):
    """README "The next lease": base, lr, more rows a step and the default plan, each one change over the shared
    knobs (or over lr), base again with another training seed, and the changes combined; the default plan's arm
    gives no targets."""
    out = tmp_path / "out"
    arms = ["base:TARGETS=0.955", "lr:TARGETS=0.955 DISTILL_LR=1e-3", "batch:TARGETS=0.955 DISTILL_LR=1e-3 DISTILL_BATCH=8",
            "default:PLAN=default", "seed1:TARGETS=0.955 PRUNE_SEED=1",
            "combined:TARGETS=0.955 DISTILL_LR=1e-3 DISTILL_BATCH=8 DISTILL_MINUTES=1.5 DISTILL_EPOCHS=6 VOCAB=catalog"]
    names = ("base", "lr", "batch", "default", "seed1", "combined")
    ran = run_script(tmp_path, "gpu_arms.sh", [str(out), *arms],
                     {"TRAIN_MINUTES": "4", "DISTILL_MINUTES": "1", "DISTILL_EXAMPLES": "20000", "DISTILL_EPOCHS": "3",
                      "SASREC_EPOCHS": "0"})
    retentions = {call.split("--output ")[1].split()[0].rsplit("/", 1)[1]: call for call in ran.calls
                  if "bench.retention" in call and "--dense-only" not in call}
    assert set(retentions) == {f"retention-{name}" for name in names}
    assert "--plan default" in retentions["retention-default"] and "--targets" not in retentions["retention-default"]
    assert "--distill-lr 1e-3" in retentions["retention-lr"] and "--distill-lr" not in retentions["retention-base"]
    assert "--distill-batch-size 8" in retentions["retention-batch"] and "--distill-lr 1e-3" in retentions["retention-batch"]
    assert not any("--distill-batch-size" in retentions[f"retention-{name}"] for name in ("base", "lr", "default", "seed1"))
    assert "--prune-seed 1" in retentions["retention-seed1"]
    assert sum("--prune-seed" in call for call in retentions.values()) == 1
    combined = retentions["retention-combined"]
    assert all(option in combined for option in ("--distill-lr 1e-3", "--distill-batch-size 8", "--distill-minutes 1.5",
                                                 "--distill-vocab catalog"))
    for name in ("base", "lr", "batch", "default", "seed1"):
        assert "--distill-minutes 1 " in retentions[f"retention-{name}"]
    assert "--distill-epochs 6" in combined
    # every arm shares one teacher-outputs directory: one computation per loss vocabulary, not one per arm
    shared = f"--distill-teacher-outputs {tmp_path / 'work' / 'teacher-outputs'} "
    assert all(shared in call for call in retentions.values())
    assert all("--distill-epochs 3" in call for name, call in retentions.items() if name != "retention-combined")
    assert all("--every-stage" not in call for call in retentions.values())
    assert not any("FAILED" in (out / f"arm-{name}.log").read_text() for name in names)


@pytest.mark.parametrize("arms, complaint", [
    (["base", "base"], "given twice"), (["a:TRAIN_LR=1e-4"], "the whole run's"), (["a:vocab=catalog"], "not KNOB=VALUE"),
    (["a b"], "letters, digits"), ([], "usage")])
def test_arms_refuse_a_bad_spec_before_any_work(tmp_path, arms, complaint):
    ran = run_script(tmp_path, "gpu_arms.sh", [str(tmp_path / "out"), *arms], {}, ok=False)
    assert ran.result.returncode == 2 and complaint in ran.result.stderr
    assert ran.calls == []


def test_arms_stop_when_the_dense_model_fails_and_still_say_done(tmp_path):
    ran = run_script(tmp_path, "gpu_arms.sh", [str(tmp_path / "out"), "base"], {"FAIL_TRAIN": "1"}, ok=False)
    assert ran.result.returncode == 1 and "dense model FAILED" in ran.result.stdout
    assert ran.result.stdout.rstrip().endswith("done")  # bench/gpu_wait.sh returns at once
    assert not any("bench.retention" in call for call in ran.calls)


def test_arms_after_a_failed_probe_run_without_it_rather_than_probing_each(tmp_path):
    ran = run_script(tmp_path, "gpu_arms.sh", [str(tmp_path / "out"), "a", "b"], {"PROBE": "1", "FAIL_PROBE": "1"})
    assert sum("bench.throughput --device" in call for call in ran.calls) == 1  # the dense run's only
    assert "probe FAILED" in ran.result.stdout
    assert sum("bench.retention" in call and "--dense-only" not in call for call in ran.calls) == 2
