"""Steps 2 and 3 of a call: the body's fields the proxy relies on, and the model it names.

The body itself is read, bounded, by the exchange that carries the call (proxy/call/exchange.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from proxy.call.body import Body, parse_body
from proxy.config.model import Config, Model, Team
from proxy.errors import InvalidRequest, ModelNotFound
from proxy.limits.usage import MAX_COUNT


@dataclass(frozen=True)
class Api:
    """One proxied API: its path below the provider's base_url and its required fields."""

    path: str
    required: tuple[str, ...]


CHAT = Api("chat/completions", ("messages",))
COMPLETIONS = Api("completions", ("prompt",))
EMBEDDINGS = Api("embeddings", ("input",))

# Known fields whose type the proxy itself depends on; everything else passes untouched.
_TYPES: dict[str, tuple[type, ...]] = {
    "messages": (list,),
    "stream": (bool,),
    "max_tokens": (int,),
    "max_completion_tokens": (int,),
    "n": (int,),
    "stream_options": (dict,),
}
# Counts the proxy multiplies into a token reservation, bounded by usage.MAX_COUNT: a
# refusal then prints them, where a 4000-digit n was a 500 (and Lua compares the product
# as a double).
_COUNTS = ("max_tokens", "max_completion_tokens", "n")


def time_budget(headers: Mapping[str, str], budget: float) -> float:
    """The model's retry budget, narrowed by the client's own ``X-Request-Timeout``."""
    asked = headers.get("X-Request-Timeout")
    try:
        seconds = float(asked) if asked else budget
    except ValueError:
        return budget
    return min(budget, seconds) if seconds > 0 else budget


def checked_body(raw: bytes, api: Api) -> Body:
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    body = parse_body(raw)
    fields = body.fields
    model = fields.get("model")
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model must be a non-empty string.", param="model")
    for name in api.required:
        if name not in fields:
            raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name)
    for name, types in _TYPES.items():
        value = fields.get(name)
        if value is not None and not _has_type(value, types):
            expected = " or ".join(t.__name__ for t in types)
            raise InvalidRequest(
                f"Invalid type for '{name}': expected {expected}, got {type(value).__name__}.",
                param=name,
            )
    for name in _COUNTS:
        value = fields.get(name)
        if isinstance(value, int) and value > MAX_COUNT:
            raise InvalidRequest(f"'{name}' must be at most {MAX_COUNT}.", param=name)
    return body


def _has_type(value: object, types: tuple[type, ...]) -> bool:
    # bool is an int in Python, not in JSON: `"max_tokens": true` is a type error.
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def resolve_model(config: Config, model_id: str, team: Team | None) -> Model:
    """The model a call names. One outside its team's ``models`` is answered exactly as
    an unknown one (the same 404, listing only the team's models): a team cannot learn
    which other models exist."""
    model = config.models.get(model_id)
    if model is None or (
        team is not None and team.models is not None and model_id not in team.models
    ):
        available = ", ".join(sorted(team_models(config, team))) or "none"
        raise ModelNotFound(
            f"The model '{model_id}' does not exist. Available models: {available}.",
            param="model",
        )
    return model


def team_models(config: Config, team: Team | None) -> list[str]:
    """The model ids ``team`` may call, in routes.yaml's order: every one for a team
    without ``models``, and without teams."""
    if team is None or team.models is None:
        return list(config.models)
    allowed = team.models
    return [model_id for model_id in config.models if model_id in allowed]
