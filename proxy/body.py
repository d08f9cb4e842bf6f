"""The request body: parsed once to read what the proxy needs, rewritten only at ``model``.

Bytes through, not objects: the top-level object is scanned key by key with the
stdlib's C scanner, remembering where each ``"model"`` value sits in the text. The
upstream receives the client's text unchanged except for those spans, so every
field the proxy does not know (tools, response_format, logit_bias, big integers,
floats, key order, whitespace) arrives exactly as the client wrote it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from proxy.errors import InvalidRequest

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


@dataclass(frozen=True)
class Body:
    text: str
    fields: dict[str, Any]
    model_spans: tuple[tuple[int, int], ...]

    def with_model(self, model: str) -> bytes:
        """The original body with every top-level ``model`` value replaced."""
        if self.fields.get("model") == model:
            return self.text.encode()
        parts: list[str] = []
        last = 0
        for start, end in self.model_spans:
            parts += [self.text[last:start], json.dumps(model, ensure_ascii=False)]
            last = end
        parts.append(self.text[last:])
        return "".join(parts).encode()


def parse_body(raw: bytes) -> Body:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid UTF-8 (byte {exc.start}).") from None
    try:
        fields, spans = _scan_object(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc.msg} "
            f"(line {exc.lineno}, column {exc.colno})."
        ) from None
    except RecursionError:
        raise InvalidRequest("The JSON body of your request is nested too deeply.") from None
    return Body(text=text, fields=fields, model_spans=tuple(spans))


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _expect(text: str, pos: int, char: str, what: str) -> int:
    if pos >= len(text) or text[pos] != char:
        raise json.JSONDecodeError(f"Expecting {what}", text, pos)
    return pos + 1


def _scan_object(text: str) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    fields: dict[str, Any] = {}
    spans: list[tuple[int, int]] = []
    pos = _expect(text, _skip(text, 0), "{", "a JSON object")
    pos = _skip(text, pos)
    if pos < len(text) and text[pos] == "}":
        pos += 1
    else:
        while True:
            pos = _expect(text, pos, '"', "property name enclosed in double quotes")
            key, pos = json.decoder.scanstring(text, pos)  # type: ignore[attr-defined]
            pos = _skip(text, _expect(text, _skip(text, pos), ":", "':' delimiter"))
            value, end = _value(text, pos)
            if key == "model":
                spans.append((pos, end))
            fields[key] = value
            pos = _skip(text, end)
            if pos < len(text) and text[pos] == "}":
                pos += 1
                break
            pos = _skip(text, _expect(text, pos, ",", "',' delimiter"))
    if _skip(text, pos) != len(text):
        raise json.JSONDecodeError("Extra data", text, pos)
    return fields, spans


def _value(text: str, pos: int) -> tuple[Any, int]:
    try:
        value, end = _DECODER.scan_once(text, pos)  # type: ignore[attr-defined]
    except StopIteration:
        raise json.JSONDecodeError("Expecting value", text, pos) from None
    return value, end
