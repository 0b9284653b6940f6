"""Pruning plans: per-stage keep ratios, or one target for the removed share of non-embedding parameters.

A plan turns ratios into uniform counts (KV groups, query heads per group, residual width, MLP width,
layers), predicts the parameter counts with :func:`pruning.surgery.count_parameters`, and is printed before
anything runs. With a single target, every ratio is scaled by one factor s (the largest s on a fine grid
whose plan removes at least the target), so the stages share the cut.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from pruning.surgery import Shape, count_parameters


@dataclass(frozen=True)
class KeepRatios:
    """Fraction kept by each cut (1.0 = untouched)."""

    kv_groups: float = 1.0
    """Share of KV groups kept per layer (GQA-aware: a kept group keeps its query heads, see heads_per_group)."""
    heads_per_group: float = 1.0
    """Share of query heads kept in each kept group."""
    hidden: float = 1.0
    """Share of the residual-stream width kept."""
    mlp: float = 1.0
    """Share of the MLP intermediate width kept."""
    layers: float = 1.0
    """Share of decoder layers kept."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 < value <= 1.0:
                raise ValueError(f"keep ratio {name} must be in (0, 1], got {value}")


DEFAULT_RATIOS = KeepRatios(kv_groups=1 / 3, heads_per_group=1.0, hidden=0.5, mlp=0.25, layers=1 / 3)
"""For SmolLM2-135M: 1 of 3 KV groups, hidden 576 -> 288, MLP 1536 -> 384, 30 -> 10 layers (95.5% removed)."""


def _round_to(value: float, multiple: int, minimum: int) -> int:
    return max(minimum, round(value / multiple) * multiple)


@dataclass(frozen=True)
class Plan:
    source: Shape
    target: Shape
    ratios: KeepRatios
    attention_bias: bool = False

    @property
    def source_params(self) -> dict[str, int]:
        return count_parameters(self.source, self.attention_bias)

    @property
    def target_params(self) -> dict[str, int]:
        return count_parameters(self.target, self.attention_bias)

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.target_params["non_embedding"] / self.source_params["non_embedding"]

    def after(self, stage: str) -> Shape:
        """The shape after a stage ('attn', 'mlp' or 'depth') when the stages run in that order."""
        shape = self.source
        if stage in ("attn", "mlp", "depth"):
            shape = replace(shape, heads=self.target.heads, kv_heads=self.target.kv_heads, hidden=self.target.hidden)
        if stage in ("mlp", "depth"):
            shape = replace(shape, intermediate=self.target.intermediate)
        if stage == "depth":
            shape = replace(shape, layers=self.target.layers)
        return shape

    def to_dict(self) -> dict:
        return {
            "source": asdict(self.source), "target": asdict(self.target), "ratios": asdict(self.ratios),
            "source_params": self.source_params, "target_params": self.target_params,
            "non_embedding_removed": round(self.removed_fraction, 4),
        }

    def describe(self) -> str:
        s, t = self.source, self.target
        rows = [
            ("KV groups / layer", s.kv_heads, t.kv_heads),
            ("query heads / layer", s.heads, t.heads),
            ("head dim", s.head_dim, t.head_dim),
            ("hidden (residual)", s.hidden, t.hidden),
            ("MLP width", s.intermediate, t.intermediate),
            ("layers", s.layers, t.layers),
            ("non-embedding params", self.source_params["non_embedding"], self.target_params["non_embedding"]),
            ("embedding params", self.source_params["embedding"], self.target_params["embedding"]),
        ]
        lines = [f"{'':<22}{'dense':>14}{'pruned':>14}"]
        lines += [f"{name:<22}{a:>14,}{b:>14,}" for name, a, b in rows]
        lines.append(f"non-embedding parameters removed: {100 * self.removed_fraction:.1f}%")
        return "\n".join(lines)


def plan_from_ratios(source: Shape, ratios: KeepRatios, attention_bias: bool = False, multiple: int = 8) -> Plan:
    kv = max(1, round(source.kv_heads * ratios.kv_groups))
    per_group = max(1, round(source.groups * ratios.heads_per_group))
    target = replace(
        source,
        kv_heads=kv,
        heads=kv * per_group,
        hidden=min(source.hidden, _round_to(source.hidden * ratios.hidden, multiple, multiple)),
        intermediate=min(source.intermediate, _round_to(source.intermediate * ratios.mlp, multiple, multiple)),
        layers=max(1, round(source.layers * ratios.layers)),
    )
    return Plan(source, target, ratios, attention_bias)


def plan_for_target(source: Shape, removed: float, attention_bias: bool = False) -> Plan:
    """The least aggressive uniformly scaled plan removing at least ``removed`` of the non-embedding params."""
    if not 0.0 <= removed < 1.0:
        raise ValueError(f"target must be in [0, 1), got {removed}")
    for step in range(1000, 0, -1):
        s = step / 1000
        ratios = KeepRatios(kv_groups=s, heads_per_group=1.0, hidden=s, mlp=s, layers=s)
        plan = plan_from_ratios(source, ratios, attention_bias)
        if plan.removed_fraction >= removed - 1e-12:
            return plan
    raise ValueError(f"no plan removes {removed:.1%} of the non-embedding parameters")


GRADUAL_STAGES = ("attn", "mlp", "depth")


def stage_scope(plan: dict, stage: str) -> dict:
    """The part of a plan (as :meth:`Plan.to_dict` writes it) that a stage's student depends on: the source
    shape and the shape after ``stage``. The attention stage's student is the same whatever the plan asks of
    the MLP or the depth, so plans that agree on the first cuts share those stages' artifacts (a plan sweep
    reuses its common prefix). A stage outside the three cuts, or a plan without shapes, is the whole plan."""
    if stage not in GRADUAL_STAGES or not {"source", "target"} <= plan.keys():
        return plan
    source = Shape(**plan["source"])
    after = Plan(source, Shape(**plan["target"]), KeepRatios()).after(stage)
    return {"source": asdict(source), "after": asdict(after)}


def gradual_plans(plan: Plan, stage: str, steps: int) -> list[Plan]:
    """Plans that take ``stage`` from its input shape to ``plan``'s in ``steps`` cuts (gradual pruning).

    Each dimension the stage cuts shrinks geometrically (the k-th of n cuts keeps start × (end/start)^(k/n),
    rounded as the plan rounds: the residual and MLP widths to multiples of 8), the last cut lands exactly on
    the plan. Plan k's target is the shape after cut k: the earlier stages' dimensions at the plan's, the
    later ones at the source's. One step, or a stage that is not a width or depth cut, gives ``[plan]``.
    """
    if steps < 1:
        raise ValueError(f"gradual steps must be >= 1, got {steps}")
    if steps == 1 or stage not in GRADUAL_STAGES:
        return [plan]
    previous = GRADUAL_STAGES.index(stage) - 1
    start = plan.after(GRADUAL_STAGES[previous]) if previous >= 0 else plan.source
    end = plan.after(stage)

    def towards(first: int, last: int, k: int, multiple: int = 1) -> int:
        if k == steps or first == last:
            return last
        return max(last, min(first, _round_to(first * (last / first) ** (k / steps), multiple, multiple)))

    plans = []
    for k in range(1, steps + 1):
        if stage == "attn":
            kv = towards(start.kv_heads, end.kv_heads, k)
            per_group = towards(start.groups, end.groups, k)
            target = replace(start, kv_heads=kv, heads=kv * per_group, hidden=towards(start.hidden, end.hidden, k, 8))
        elif stage == "mlp":
            target = replace(start, intermediate=towards(start.intermediate, end.intermediate, k, 8))
        else:
            target = replace(start, layers=towards(start.layers, end.layers, k))
        plans.append(Plan(plan.source, target, plan.ratios, plan.attention_bias))
    return plans


def has_attention_bias(config: object) -> bool:
    return bool(getattr(config, "attention_bias", False)) or getattr(config, "model_type", "") == "qwen2"

