"""Options derived from the stage configs: every field an option with its documentation, one merge of
defaults < profile < options given, old names kept, the offline commands imported only when they run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import typer
from typer.testing import CliRunner

from cli.options import options_of, with_options
from llmrec.configs import apply_profile, merge

runner = CliRunner()


@dataclass
class Inner:
    lr: float = 0.1
    """Learning rate."""
    steps: int | None = None
    """Most steps."""


@dataclass
class Outer:
    output: str
    """Where to write."""
    mode: Literal["fast", "slow"] = "fast"
    """How to run."""
    flag: bool = True
    """Whether to do it."""
    names: list[str] = field(default_factory=lambda: ["a", "b"])
    """Names to use."""
    widths: list[int] = field(default_factory=lambda: [1])
    """Widths to try."""
    inner: Inner = field(default_factory=lambda: Inner(lr=0.5))
    """Nested settings."""


PROFILES: dict[str, dict[str, Any]] = {"quick": {"mode": "slow", "inner": {"steps": 7, "lr": 0.2}}}


def test_every_field_becomes_a_documented_option_with_its_default_and_profile_values():
    group = options_of(Outer, exclude=["output"], aliases={"inner.steps": "--steps"}, profiles=PROFILES)
    by_path = {spec.path: spec for spec in group.specs}
    assert set(by_path) == {"mode", "flag", "names", "widths", "inner.lr", "inner.steps"}
    assert by_path["inner.lr"].flags == ("--inner-lr",)
    assert "Learning rate." in by_path["inner.lr"].help and "default 0.5" in by_path["inner.lr"].help  # the parent's default
    assert "profile quick: 0.2" in by_path["inner.lr"].help
    assert by_path["inner.steps"].flags == ("--inner-steps", "--steps")
    assert by_path["flag"].flags == ("--flag/--no-flag",)
    assert "comma-separated" in by_path["names"].help


def test_a_field_without_documentation_cannot_become_an_option():
    @dataclass
    class Undocumented:
        size: int = 1

    with pytest.raises(ValueError, match="no docstring"):
        options_of(Undocumented)


def test_a_command_merges_defaults_then_profile_then_options_given():
    group = options_of(Outer, exclude=["output"], aliases={"inner.steps": "--steps"}, profiles=PROFILES)
    app = typer.Typer()
    seen: list[Outer] = []

    @app.command()
    @with_options(group)
    def run(output: str = typer.Option(..., help="Out."), profile: str | None = typer.Option(None, help="Preset."),
            **options: Any) -> None:
        seen.append(merge(Outer, PROFILES.get(profile or "", None), group.given(options), output=output))

    result = runner.invoke(app, ["--output", "o", "--profile", "quick", "--steps", "3", "--no-flag", "--widths", "2,4"])
    assert result.exit_code == 0, result.output
    config = seen[-1]
    assert config.mode == "slow"  # from the profile
    assert config.inner.steps == 3 and config.inner.lr == 0.2  # an option over the profile, the profile over the default
    assert config.flag is False and config.widths == [2, 4] and config.names == ["a", "b"]
    result = runner.invoke(app, ["--output", "o", "--mode", "medium"])
    assert result.exit_code != 0 and "medium" in result.output  # a Literal is a choice


def test_merge_keeps_a_nested_defaults_other_values_and_refuses_unknown_fields():
    config = merge(Outer, None, {"inner.steps": 2}, output="x")
    assert config.inner == Inner(lr=0.5, steps=2)  # lr stays the parent's default instance's
    with pytest.raises(ValueError, match="no field"):
        merge(Outer, {"colour": "red"}, None, output="x")
    updated = apply_profile(config, PROFILES, "quick")
    assert updated.inner == Inner(lr=0.2, steps=7) and updated.output == "x"
    with pytest.raises(ValueError, match="unknown profile"):
        apply_profile(config, PROFILES, "huge")


def test_the_prune_command_maps_options_profile_old_names_and_one_seed_to_the_config(tmp_path, prepared, monkeypatch):
    from cli.main import app
    from pruning import prune

    captured = []
    monkeypatch.setattr(prune, "run", lambda config, data: captured.append(config) or [])
    monkeypatch.setattr(prune, "summarize", lambda teacher, paths: [])
    prepared.save(tmp_path / "data")
    result = runner.invoke(app, ["prune", str(tmp_path / "teacher"), "-o", str(tmp_path / "run"), "--data", str(tmp_path / "data"),
                                 "--profile", "cpu", "--distill-steps", "5", "--keep-mlp", "0.5", "--seed", "3",
                                 "--trsp-lambda1", "0.2", "--no-evaluate", "--stages", "attn,mlp"])
    assert result.exit_code == 0, result.output
    config = captured[-1]
    assert config.distill.max_steps == 5 and config.distill.max_minutes == 20.0  # option; cpu profile
    assert config.ratios.mlp == 0.5 and config.ratios.hidden == 0.5  # the default plan's other ratios stay
    assert config.calibration.seed == config.distill.seed == config.trsp.seed == 3
    assert config.trsp.lambda1 == 0.2 and config.evaluate is False and config.stages == ["attn", "mlp"]
    assert config.calibration.samples == 32  # cpu profile


def test_commands_whose_packages_are_missing_say_so(monkeypatch):
    from cli import main

    monkeypatch.setitem(main.LAZY_COMMANDS, "train", "cli.not_installed_here")
    listing = runner.invoke(main.app, ["--help"])
    assert listing.exit_code == 0 and "train" in listing.output and "not available here" in listing.output
    result = runner.invoke(main.app, ["train"])
    assert result.exit_code == 2 and "not_installed_here" in result.output
