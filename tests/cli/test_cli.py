"""The CLI: documented options, promised errors, and an end-to-end smoke test on the real SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from helpers import save_model_dir, tiny_llama
from typer.testing import CliRunner

from cli.main import app
from llmrec.artifact import read_manifest, write_artifact
from recdata.prompts import compact_template

runner = CliRunner()


@pytest.mark.parametrize("command", ["data", "train", "evaluate", "recommend", "prune", "pipeline", "peft-search", "vocab-check", "serve",
                                     "assist"])
def test_every_command_documents_its_options(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "--help" in result.output
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    params = [p for p in click_command.params if p.name != "help"]
    assert params
    undocumented = [p.name for p in params if not getattr(p, "help", None)]
    assert not undocumented, undocumented


def test_data_command_writes_a_prepared_dataset(tmp_path):
    result = runner.invoke(app, ["data", "-o", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["users"] == 943 and summary["test_samples"] == 943
    assert (tmp_path / "d" / "prepared.json").is_file()


def test_data_command_reports_bad_files_without_traceback(tmp_path):
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\tnoon\n")
    (tmp_path / "x.item").write_text("item_id:token\ttitle:token_seq\n2\tTwo\n")
    result = runner.invoke(app, ["data", "-o", str(tmp_path / "d"), "--source", "recbole",
                                 "--interactions", str(tmp_path / "x.inter"), "--items", str(tmp_path / "x.item")])
    assert result.exit_code == 2
    assert "x.inter, line 2, column 'timestamp'" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["data", "-o", str(tmp_path / "d"), "--source", "table"])
    assert result.exit_code == 2 and "needs --interactions and --items" in result.output


def test_recommend_and_evaluate_on_a_tiny_artifact(tmp_path, tokenizer, prepared):
    prepared.save(tmp_path / "data")
    manifest = {"template": compact_template().to_dict(), "max_history": 10}
    path = write_artifact(tmp_path / "art", tiny_llama(len(tokenizer)), tokenizer, prepared.catalog, manifest)
    result = runner.invoke(app, ["recommend", str(path), "--history", "i1", "--history", "Babe (1995)", "--k", "3", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 3 and not {"i1", "i6"} & {r["item_id"] for r in rows}
    result = runner.invoke(app, ["recommend", str(path), "--history", "nope", "--history", "i1"])
    assert result.exit_code == 2 and "unknown items: 'nope'" in result.output
    result = runner.invoke(app, ["evaluate", str(path), "--data", str(tmp_path / "data"), "--num-beams", "20", "--users", "8"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((path / "eval" / "test.json").read_text())
    assert metrics["protocol"]["users"] == 8 and metrics["protocol"]["num_beams"] == 20
    assert 0.0 <= metrics["metrics"]["ndcg@10"] <= 1.0 and "ndcg@10" in metrics["mostpop"]
    assert (path / "eval" / "test.ranks.csv").is_file()


def test_assist_command_trains_chooses_a_weight_and_recommend_uses_it(tmp_path, tokenizer, prepared):
    prepared.save(tmp_path / "data")
    manifest = {"template": compact_template().to_dict(), "max_history": 10}
    path = write_artifact(tmp_path / "art", tiny_llama(len(tokenizer)), tokenizer, prepared.catalog, manifest)
    result = runner.invoke(app, ["recommend", str(path), "--history", "i1", "--assist"])
    assert result.exit_code == 2 and "carries no assistant" in result.output
    result = runner.invoke(app, ["assist", str(path), "--data", str(tmp_path / "data"), "--profile", "tiny",
                                 "--weights", "0,1,3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    entry = read_manifest(path)["assistant"]
    assert entry["weight"] in (0.0, 1.0, 3.0) and f"weight {entry['weight']}" in result.output
    assert set(entry["valid_ndcg@10_by_weight"]) == {"0.0", "1.0", "3.0"}
    result = runner.invoke(app, ["recommend", str(path), "--history", "i1", "--assist", "--json"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["assist", str(path), "--data", str(tmp_path / "data"), "--weight", "-2"])
    assert result.exit_code == 2 and "weight must be >= 0" in result.output


def test_train_reports_a_missing_model(tmp_path):
    result = runner.invoke(app, ["train", "-o", str(tmp_path / "o"), "--model", str(tmp_path / "nothing"), "--profile", "tiny"])
    assert result.exit_code == 2 and "no Hugging Face model" in result.output


@pytest.mark.slow
def test_smollm2_converts_loads_and_recommends_top5(tmp_path):
    """The embedded default end to end: GGUF -> safetensors cache, tokenizer round trip, top-5 for an ml-100k user."""
    from transformers import AutoTokenizer

    from llmrec.model import load_model
    from recdata.prep import prepare
    from recdata.sources import read_ml100k

    loaded = load_model()
    assert loaded.model.config.model_type == "llama" and loaded.model.config.num_hidden_layers == 30
    assert loaded.tokenizer.eos_token == "<|im_end|>"
    reloaded = AutoTokenizer.from_pretrained(loaded.path)
    titles = ["Toy Story (1995)", "Usual Suspects, The (1995)", "Müller's Büro (1986)"]
    assert [reloaded(t)["input_ids"] for t in titles] == [loaded.tokenizer(t)["input_ids"] for t in titles]
    data = prepare(read_ml100k())
    manifest = {"template": compact_template().to_dict(), "max_history": 10, "stage": "base"}
    path = write_artifact(tmp_path / "smol", loaded.model, loaded.tokenizer, data.catalog, manifest)
    user, position = data.splits["test"][0]
    history = [data.catalog.item_ids[i] for i in data.history(int(user), int(position))[-10:]]
    args = ["recommend", str(path), "--k", "5", "--json"] + [a for h in history for a in ("--history", h)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 5 and len({r["item_id"] for r in rows}) == 5
    assert all(r["title"] in data.catalog.titles for r in rows) and not set(history) & {r["item_id"] for r in rows}
    with torch.no_grad():
        assert torch.isfinite(torch.tensor([r["score"] for r in rows])).all()


def test_pipeline_command_fine_tunes_prunes_and_reports(tmp_path, tokenizer, prepared):
    from helpers import tiny_qwen2

    prepared.save(tmp_path / "data")
    base = save_model_dir(tmp_path / "base", tiny_qwen2(len(tokenizer), layers=4), tokenizer)
    result = runner.invoke(app, ["pipeline", "-o", str(tmp_path / "run"), "--data", str(tmp_path / "data"),
                                 "--model", str(base), "--profile", "tiny", "--target", "0.6", "--eval-users", "8"])
    assert result.exit_code == 0, result.output
    def not_strict(name: str) -> None:
        raise AssertionError(f"summary.json holds {name}, which strict JSON readers (jq, browsers) refuse")

    summary = json.loads((tmp_path / "run" / "summary.json").read_text(), parse_constant=not_strict)
    assert [row["name"] for row in summary] == ["dense", "1-attn", "2-mlp", "3-depth", "MostPop"]
    assert summary[-1]["non_embedding_removed"] is None
    assert summary[3]["non_embedding_removed"] >= 0.6
    assert all("ndcg@10" in row for row in summary)
    assert "3-depth" in result.output and "NDCG/dense" in result.output
    # a second invocation resumes: no artifact is written again
    created = [read_manifest(tmp_path / "run" / name)["created"] for name in ("0-dense", "1-attn", "2-mlp", "3-depth")]
    stamps = [(tmp_path / "run" / name / "model.safetensors").stat().st_mtime_ns for name in ("0-dense", "3-depth")]
    again = runner.invoke(app, ["pipeline", "-o", str(tmp_path / "run"), "--data", str(tmp_path / "data"),
                                "--model", str(base), "--profile", "tiny", "--target", "0.6", "--eval-users", "8"])
    assert again.exit_code == 0, again.output
    assert [read_manifest(tmp_path / "run" / n)["created"] for n in ("0-dense", "1-attn", "2-mlp", "3-depth")] == created
    assert [(tmp_path / "run" / n / "model.safetensors").stat().st_mtime_ns for n in ("0-dense", "3-depth")] == stamps


def test_prune_command_rejects_bad_stages_and_ratios(tmp_path, tokenizer, prepared):
    prepared.save(tmp_path / "data")
    manifest = {"template": compact_template().to_dict(), "max_history": 10}
    path = write_artifact(tmp_path / "art", tiny_llama(len(tokenizer)), tokenizer, prepared.catalog, manifest)
    result = runner.invoke(app, ["prune", str(path), "-o", str(tmp_path / "r"), "--data", str(tmp_path / "data"), "--stages", "mlp,attn"])
    assert result.exit_code == 2 and "order" in result.output
    result = runner.invoke(app, ["prune", str(path), "-o", str(tmp_path / "r"), "--keep-mlp", "1.5"])
    assert result.exit_code == 2 and "keep ratio mlp" in result.output


def test_serve_start_up_errors_are_one_line_and_early(tmp_path, tokenizer, prepared, monkeypatch):
    import socket

    monkeypatch.delenv("PRUNEREC_MODELS", raising=False)
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2 and "no arms" in result.output
    result = runner.invoke(app, ["serve", "--models", "a=x", "--port", "70000"])
    assert result.exit_code == 2 and "65535" in result.output
    result = runner.invoke(app, ["serve", "--models", "a=x", "--weights", "a=nan"])
    assert result.exit_code == 2 and "finite" in result.output
    manifest = {"template": compact_template().to_dict(), "max_history": 10, "stage": "finetune"}
    artifact = write_artifact(tmp_path / "dense", tiny_llama(len(tokenizer)), tokenizer, prepared.catalog, manifest)
    loaded = []
    from app.registry import Registry

    monkeypatch.setattr(Registry, "load", lambda self, name: loaded.append(name))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", "--models", f"dense={artifact}", "--port", str(port)])
    assert result.exit_code == 2 and "cannot listen" in result.output and loaded == []  # before any model loads


def test_serve_exits_with_1_when_a_model_fails_to_load(tmp_path, tokenizer, prepared):
    import subprocess
    import sys

    manifest = {"template": compact_template().to_dict(), "max_history": 10, "stage": "finetune"}
    artifact = write_artifact(tmp_path / "dense", tiny_llama(len(tokenizer)), tokenizer, prepared.catalog, manifest)
    (artifact / "model.safetensors").write_bytes(b"not safetensors")
    done = subprocess.run([sys.executable, "-m", "cli", "serve", "--models", f"dense={artifact}", "--port", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "failed to load" in done.stderr


def test_artifacts_are_readable_by_others(tmp_path, tokenizer, prepared):
    import os
    import stat

    old = os.umask(0o022)
    try:
        manifest = {"template": compact_template().to_dict(), "max_history": 10}
        artifact = write_artifact(tmp_path / "a", tiny_llama(len(tokenizer)), tokenizer, prepared.catalog, manifest)
    finally:
        os.umask(old)
    assert stat.S_IMODE(artifact.stat().st_mode) == 0o755


def test_the_service_socket_disables_nagle_on_accepted_connections():
    """A kept-alive connection's responses must not wait for the client's delayed ACK (that added ~40 ms to every
    request after the first): the listening socket says it is TCP, so asyncio (uvicorn's loop) sets TCP_NODELAY
    on each accepted connection; a taken port fails at bind."""
    import asyncio
    import socket

    from cli.main import listening_socket

    sock = listening_socket("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError):
            listening_socket("127.0.0.1", taken.getsockname()[1]).close()
    finally:
        taken.close()

    async def accepted_nodelay() -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class Protocol(asyncio.Protocol):
            def connection_made(self, transport):  # type: ignore[override]
                seen.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Protocol, sock=sock)
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay())


def test_python_m_pruning_cli_is_the_command_line_the_shared_gpu_scripts_name():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pruning.cli", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "prune" in done.stdout and "train" in done.stdout
