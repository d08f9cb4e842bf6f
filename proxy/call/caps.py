"""Step 3b of a call: the model's output cap (``models.ID.max_tokens`` in routes.yaml).

A client may name the cap ``max_tokens`` or, in chat, ``max_completion_tokens`` (OpenAI's
newer name; its reasoning models take no other). Either field above the model's limit is
refused, both when both are given, with ``param`` naming the one that is. A call that
names neither (or gives both as null) gets the model's default, written into the body it
sends (proxy/call/body.py: the client's bytes, with one member added or a null replaced)
and reserved at admission. It goes in under the model's ``field``, ``max_tokens`` unless
routes.yaml says otherwise: every OpenAI-compatible server takes that name (vLLM,
llama.cpp, the hosted ones, OpenAI's own non-reasoning models), and a model routed to
OpenAI's reasoning models, which refuse it, sets ``field: max_completion_tokens``. The
proxy does not guess it from the client or the upstream model's name. /v1/completions
has only ``max_tokens``, so it always gets that one; embeddings generate nothing and
have no cap.
"""

from __future__ import annotations

from proxy.call.body import Body
from proxy.call.request import CHAT, EMBEDDINGS, Api
from proxy.config.model import MAX_TOKENS_FIELDS, Model
from proxy.errors import InvalidRequest


def capped(body: Body, model: Model, api: Api) -> Body:
    """``body`` if it keeps within the model's cap, with the default added if it names
    none; InvalidRequest if it asks for more than the limit."""
    cap = model.max_tokens
    if cap is None or api.path == EMBEDDINGS.path:
        return body
    fields = body.fields
    asked = [(name, fields[name]) for name in MAX_TOKENS_FIELDS if fields.get(name) is not None]
    for name, value in asked:
        # checked_body let only integers through; zero or less is the upstream's to refuse.
        if cap.limit is not None and value > cap.limit:
            raise InvalidRequest(
                f"{name} is too large: {value}. The model '{model.id}' allows at most "
                f"{cap.limit} completion tokens; lower {name}.",
                param=name,
            )
    if asked:
        return body
    return body.with_field(cap.field if api.path == CHAT.path else "max_tokens", cap.default)
