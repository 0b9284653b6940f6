"""Request and response models of the API: strict (no coercion), with the limits the code enforces.

The request models are built per service (:func:`recommend_request_model`) because their limits come from
the settings (``max_k``, ``max_history``, ``max_deadline_ms``); the OpenAPI document therefore states the
limits of the service that serves it. Strings must be valid Unicode: a lone UTF-16 surrogate (``"\\ud800"``
in JSON) is rejected with 422 rather than reaching code that encodes it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictStr,
    WithJsonSchema,
)


def _valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("string is not valid Unicode (it holds a lone UTF-16 surrogate)") from None
    return value


def _json_integer(value: Any) -> Any:
    """A JSON integer: a whole number (``3`` or ``3.0``, as JSON Schema counts them), never a boolean or a
    string (``true`` and ``"5"`` were once taken as 1 and 5)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a JSON integer (not a string or a boolean)")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be a whole number")
        return int(value)
    return value


def _item_ref(value: Any) -> str:
    """A history entry as the catalog looks it up: a string, or a whole non-negative number as its id."""
    if isinstance(value, str):
        return _valid_unicode(value)
    number = _json_integer(value)
    if number < 0:
        raise ValueError("an integer item id must be >= 0")
    return str(number)


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
Integer = Annotated[int, BeforeValidator(_json_integer)]
ItemRef = Annotated[
    str,
    PlainValidator(_item_ref),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer", "minimum": 0}],
                    "description": "A catalog item id (string, or a non-negative integer id) or an exact catalog title."}),
]


class StrictModel(BaseModel):
    """No coercion (``"5"`` is not 5, ``true`` is not 1) and no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid")


def recommend_request_model(max_k: int, max_history: int, default_deadline_ms: float, max_deadline_ms: float) -> type[BaseModel]:
    """The body of POST /v1/recommend under one service's limits."""

    class RecommendRequest(StrictModel):
        user_id: Text = Field(min_length=1, max_length=256, description="Stable user id (drives A/B assignment).")
        history: list[ItemRef] = Field(
            min_length=1, max_length=max_history,
            description="Past items, oldest first: catalog item ids or exact titles (the prompt uses the last few).",
        )
        k: Integer = Field(min(10, max_k), ge=1, le=max_k, description="Items to return.")
        exclude_history: StrictBool = Field(True, description="Never recommend an item of the history.")
        deadline_ms: Annotated[float, Field(gt=0, le=max_deadline_ms, allow_inf_nan=False)] | None = Field(
            None,
            description=f"Answer within this many milliseconds or get 503 (default {default_deadline_ms:g}); "
                        "a request past its deadline is never decoded.",
        )

    return RecommendRequest


class Item(BaseModel):
    item_id: str
    title: str
    score: float


class RecommendResponse(BaseModel):
    request_id: str
    user_id: str
    arm: str
    model_version: str
    items: list[Item]


class FeedbackRequest(StrictModel):
    request_id: Text = Field(min_length=1, max_length=64, description="The request_id of a served list.")
    item_id: Text = Field(min_length=1, max_length=256, description="An item of that list.")
    event: Literal["click", "purchase"]


class FeedbackResponse(BaseModel):
    recorded: bool = Field(description="False when this event for this item of this list was already recorded.")
    arm: str


def weights_request_model(arms: list[str]) -> type[BaseModel]:
    """The body of POST /admin/weights: a weight per arm of this service (the schema names the arms)."""

    names: Any = {"propertyNames": {"enum": sorted(arms)}} if arms else None

    class WeightsRequest(StrictModel):
        weights: dict[Text, Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]] = Field(
            min_length=1, description="Traffic weight per arm (normalised; arms left out get 0). Not all zero.",
            json_schema_extra=names,
        )

    return WeightsRequest


class WeightsResponse(BaseModel):
    weights: dict[str, float]


class ReloadResponse(BaseModel):
    reloaded: bool
    version: str


class ReloadFailure(BaseModel):
    reloaded: Literal[False]
    error: str
    serving: str = Field(description="The version that keeps serving.")


class Problem(BaseModel):
    where: str
    problem: str


class ErrorBody(BaseModel):
    """Every error answer: a message, and for some errors the details."""

    detail: str
    problems: list[Problem] | None = Field(None, description="422 from validation: each field at fault.")
    unknown: list[str] | None = Field(None, description="422 for unknown history items: those items.")
    reason: str | None = Field(None, description="503: queue_full, deadline or client_left.")


class Health(BaseModel):
    status: Literal["alive"]


class Readiness(BaseModel):
    ready: bool
    arms: dict[str, str] = Field(description="Arm -> model version of the arms loaded so far.")
    error: str | None = Field(None, description="Why loading failed, if it did.")


class ArmInfo(BaseModel):
    arm: str
    version: str
    artifact: str
    stage: str | None
    params: dict[str, Any] | None
    metrics: dict[str, Any]
    catalog_items: int
    device: str
    assist_weight: float | None = Field(None, description="Weight of the arm's SASRec assistant in its scores "
                                        "(D3's assisted decoding); null when the arm serves the pure LLM.")
    last_reload_error: str | None


class ModelsResponse(BaseModel):
    arms: list[ArmInfo]
    weights: dict[str, float]
    shadow: str | None


class LatencySummary(BaseModel):
    p50: float | None
    p95: float | None = None
    p99: float | None = None


class ArmReport(BaseModel):
    requests: int = Field(description="Requests answered or failed (not shed).")
    errors: int
    shed: dict[str, int] = Field(description="Requests answered 503 without a list, by reason.")
    served_lists: int
    clicked_lists: int = Field(description="Served lists with at least one click.")
    feedback: dict[str, int] = Field(description="Distinct (list, item, event) feedback events.")
    ctr: float = Field(description="clicked_lists / served_lists.")
    ctr_ci95: list[float] = Field(description="Wilson 95% interval of the CTR.")
    latency_ms: LatencySummary
    observed_share: float
    intended_share: float


class ShadowReport(BaseModel):
    requests: int
    errors: int
    latency_ms: LatencySummary


class ABReport(BaseModel):
    total_requests: int
    arms: dict[str, ArmReport]
    shadow: dict[str, ShadowReport]
    salt: str


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses, all with the :class:`ErrorBody` model."""
    descriptions = {
        400: "Malformed request (e.g. a header that is not valid)", 401: "Missing or wrong bearer token",
        403: "Admin routes are disabled (no admin token configured)", 404: "Not found",
        409: "Conflict", 413: "Request body too large", 422: "Invalid request (the body names the problem)",
        503: "Not ready, overloaded (queue full) or past the deadline; see Retry-After",
    }
    return {status: {"model": ErrorBody, "description": descriptions[status]} for status in statuses}
