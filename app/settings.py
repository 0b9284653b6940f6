"""Service settings from the environment (``PRUNEREC_*``) or the command line (pydantic-settings)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the service needs; artifact paths come from here, never from a request."""

    model_config = SettingsConfigDict(env_prefix="PRUNEREC_", env_nested_delimiter="__")

    models: dict[str, str] = Field(default_factory=dict)
    """Arm name -> artifact directory, e.g. PRUNEREC_MODELS='{"dense": "runs/dense", "pruned": "runs/pruned"}'."""
    weights: dict[str, float] = Field(default_factory=dict)
    """Traffic share per arm (normalised); default: equal shares."""
    salt: str = "prunerec"
    """Salt of the sticky assignment hash (change it to reshuffle users)."""
    shadow: str | None = None
    """An arm that answers a copy of every request off the response path (logged, never returned)."""
    admin_token: str | None = None
    """Bearer token for /admin routes; admin routes are disabled without one."""
    device: str | None = None
    """cpu or cuda (default: cuda when available, in bf16; else cpu, fp32)."""
    torch_threads: int | None = Field(default=None, ge=1)
    """CPU threads of torch's intra-op pool on the model thread (default: torch's choice, one per core); for
    several replicas on one many-core host. On 2 cores one thread did not pay for the pruned model through
    the service (231 vs 208 ms p50 per top-10 request), though it did in process (218 vs 269 ms)."""
    num_beams: int = 20
    """Beams per request (the list a request gets is the top-k of this search)."""
    head: str = "catalog"
    """Next-token normalisation while decoding: 'full' (exact) or 'catalog' (LM head over catalog tokens only)."""
    max_k: int = 50
    max_history: int = 200
    """Longest history a request may send (the prompt uses the artifact's last N items)."""
    max_batch_size: int = 16
    """Requests decoded together per arm."""
    max_wait_ms: float = 5.0
    """How long a batch waits for more requests after the first arrives."""
    max_body_bytes: int = 65536
    warmup: bool = True
    """Run one request per arm before reporting ready."""

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in value.values()):
            raise ValueError("traffic weights must be non-negative")
        return value

    @model_validator(mode="after")
    def _arms_exist(self) -> Settings:
        unknown = (set(self.weights) | ({self.shadow} if self.shadow else set())) - set(self.models)
        if unknown:
            raise ValueError(f"weights/shadow name arms without a model: {sorted(unknown)}")
        return self

    def effective_weights(self) -> dict[str, float]:
        arms = [a for a in self.models if a != self.shadow] or list(self.models)
        weights = {a: self.weights.get(a, 1.0 if not self.weights else 0.0) for a in arms}
        total = sum(weights.values())
        if total <= 0:
            raise ValueError("traffic weights sum to zero")
        return {a: w / total for a, w in weights.items()}
