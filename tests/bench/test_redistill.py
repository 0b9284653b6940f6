"""bench.redistill: a stage's student distilled again from the dense teacher on the run's own examples."""

from __future__ import annotations

from helpers import TINY_PRUNE

from bench.redistill import redistill
from llmrec.configs import merge
from pruning.prune import PruneConfig, run


def test_a_stages_student_is_distilled_again_from_the_same_start(tmp_path, tiny_dense, prepared):
    config = merge(PruneConfig, None, {**TINY_PRUNE, "stages": ["attn"], "evaluate": False},
                   output=str(tmp_path / "run"), teacher=str(tiny_dense))
    student = str(run(config, prepared)[0])
    plain = redistill(student, str(tiny_dense), prepared, profile="cpu", seed=0, steps=3)
    pathed = redistill(student, str(tiny_dense), prepared, profile="cpu", seed=0, steps=3, teacher_paths=2)
    assert plain["steps"] == pathed["steps"] == 3 and plain["valid_steps"][0] == 0
    assert plain["valid_loss"][0] == pathed["valid_loss"][0]  # the same student on the same validation examples
    assert plain["valid_loss"][-1] != pathed["valid_loss"][-1]  # the path examples changed what it learnt
    assert pathed["teacher_paths"] == 2 and plain["teacher_paths"] == 0
    slower = redistill(student, str(tiny_dense), prepared, profile="cpu", seed=0, steps=3, lr=1e-5)
    assert plain["lr"] == 1e-3 and slower["lr"] == 1e-5  # the profile's rate unless one is given
    assert slower["valid_loss"][0] == plain["valid_loss"][0] and slower["valid_loss"][-1] != plain["valid_loss"][-1]
