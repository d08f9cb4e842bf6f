"""The request body: parsed once to read what the proxy needs, rewritten only where it must.

Bytes through, not objects: the fields are read with one ``json.loads``; only a body
that must change is scanned key by key with the stdlib's C scanner, to find where the
``model`` and ``stream_options`` values (and a null ``max_tokens`` the model's default
replaces) sit in the text and where the object closes. The upstream receives the
client's text unchanged except at those spans, and with the fields the proxy adds
appended before the closing brace, so every field the proxy does not know (tools,
response_format, logit_bias, big integers, floats, key order, whitespace) arrives
exactly as the client wrote it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from proxy.errors import InvalidRequest

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"
# The top-level fields the proxy reads. Given twice, the proxy would route, limit and
# bill on the last, and an upstream that keeps the first would serve what was never
# routed (a model outside the team's model_limits, say): refused.
READ_FIELDS = frozenset(
    ("model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n")
).union(("messages", "prompt", "input"))  # these three for the token estimate


class _Repeated(dict[str, Any]):
    """An object that gave some key more than once (its last value kept, as json does)."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        seen: set[str] = set()
        self.repeated: set[str] = set()
        for key, _ in pairs:
            (self.repeated if key in seen else seen).add(key)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: a dict, marked when a key repeats. The hook runs for
    every object, nested ones too (their repeats are the upstream's business). Measured
    with timeit (CPython 3.11), it adds about 3 us to json.loads of a 2 KB chat body (6
    objects; 4 us without it) and 10 us to a 2.3 KB body with 6 tools (32 objects; 11
    us without it). The cheap tests tried instead cost as much: counting each field's
    quoted name (and backslash-u escapes, which can spell one) is a scan of the body per
    name, 5 to 7 us on the chat body; one regular expression for all of them, 7 us; a
    loop over the top-level keys alone, scanning each value in C, 16 us."""
    obj = dict(pairs)
    return obj if len(obj) == len(pairs) else _Repeated(pairs)


@dataclass(frozen=True)
class Body:
    text: str
    fields: dict[str, Any]
    # Fields the proxy sets that the client's text lacks or gives as null (a model's
    # default max_tokens): in ``fields`` already, written into the text by rewritten().
    added: tuple[tuple[str, Any], ...] = ()

    def with_field(self, name: str, value: Any) -> Body:
        """This body with ``name`` set, for a field the client did not give (or gave as
        null): the upstream receives the client's bytes with that one member added."""
        return Body(self.text, {**self.fields, name: value}, (*self.added, (name, value)))

    def wants_usage(self) -> bool:
        """Whether the client itself asked for the usage chunk of a stream."""
        options = self.fields.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    def rewritten(self, model: str, include_usage: bool = False) -> bytes:
        """The original body with ``model`` replaced, the added fields written in and, if
        asked, usage requested. A field already in the text is replaced where it stands;
        the others are appended, in order, just before the object's closing brace."""
        changes: dict[str, Any] = dict(self.added)
        if self.fields.get("model") != model:
            changes["model"] = model
        append_usage = include_usage and not self.wants_usage()
        if append_usage and "stream_options" in self.fields:
            options = self.fields["stream_options"]
            kept = options if isinstance(options, dict) else {}
            changes["stream_options"] = {**kept, "include_usage": True}
            append_usage = False
        if not changes and not append_usage:
            return self.text.encode()
        spans, close, empty = _spliceable(self.text, changes)
        parts: list[str] = []
        last = 0
        for key, start, end in spans:
            parts += [self.text[last:start], json.dumps(changes[key], ensure_ascii=False)]
            last = end
        parts.append(self.text[last:close])
        found = {key for key, _, _ in spans}
        appended = [f"{_compact(k)}:{_compact(v)}" for k, v in changes.items() if k not in found]
        if append_usage:
            appended.append('"stream_options":{"include_usage":true}')
        if appended:
            parts.append(("" if empty else ",") + ",".join(appended))
        parts.append(self.text[close:])
        return "".join(parts).encode()


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def parse_body(raw: bytes) -> Body:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid UTF-8 (byte {exc.start}).") from None
    try:
        fields = json.loads(text, object_pairs_hook=_object)
        if not isinstance(fields, dict):
            raise json.JSONDecodeError("Expecting a JSON object", text, _skip(text, 0))
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc.msg} "
            f"(line {exc.lineno}, column {exc.colno})."
        ) from None
    except RecursionError:
        raise InvalidRequest("The JSON body of your request is nested too deeply.") from None
    except ValueError:  # Python's own bound on int(): an integer of more than 4300 digits
        raise InvalidRequest(
            f"The JSON body of your request has an integer of more than "
            f"{sys.get_int_max_str_digits()} digits."
        ) from None
    if type(fields) is _Repeated:
        _refuse_repeated(fields.repeated)
    return Body(text=text, fields=fields)


def _refuse_repeated(repeated: set[str]) -> None:
    read = sorted(repeated & READ_FIELDS)
    if read:
        raise InvalidRequest(
            f"The JSON body of your request gives '{read[0]}' more than once; give it once.",
            param=read[0],
        )


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _expect(text: str, pos: int, char: str, what: str) -> int:
    if pos >= len(text) or text[pos] != char:
        raise json.JSONDecodeError(f"Expecting {what}", text, pos)
    return pos + 1


def _spliceable(text: str, keys: Collection[str]) -> tuple[list[tuple[str, int, int]], int, bool]:
    """(key, start, end) of the values of ``keys``, where the object closes, and whether
    it is empty: the object is valid JSON already, so only positions are found here."""
    spans: list[tuple[str, int, int]] = []
    pos = _skip(text, _expect(text, _skip(text, 0), "{", "a JSON object"))
    empty = pos < len(text) and text[pos] == "}"
    if not empty:
        while True:
            pos = _expect(text, pos, '"', "property name enclosed in double quotes")
            key, pos = json.decoder.scanstring(text, pos)  # type: ignore[attr-defined]
            pos = _skip(text, _expect(text, _skip(text, pos), ":", "':' delimiter"))
            end = _value_end(text, pos)
            if key in keys:
                spans.append((key, pos, end))
            pos = _skip(text, end)
            if pos < len(text) and text[pos] == "}":
                break
            pos = _skip(text, _expect(text, pos, ",", "',' delimiter"))
    return spans, pos, empty


def _value_end(text: str, pos: int) -> int:
    try:
        _, end = _DECODER.scan_once(text, pos)  # type: ignore[attr-defined]
    except StopIteration:
        raise json.JSONDecodeError("Expecting value", text, pos) from None
    return int(end)
