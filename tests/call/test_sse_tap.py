"""The SSE tap however the upstream cuts its stream: the client's bytes and the usage the
proxy bills must not depend on where TCP reads happened to split it.

The tap has two ways to find event ends (a split on LF-only data, a regex when a CR
is in play); random streams mixing both, cut at random points, check they agree.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.call.sse import SseTap

USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def _chunk(text: str, null_usage: bool) -> dict[str, object]:
    payload: dict[str, object] = {"choices": [{"index": 0, "delta": {"content": text}}]}
    if null_usage:
        payload["usage"] = None
    return payload


EVENTS = st.lists(
    st.one_of(
        st.builds(_chunk, st.text(max_size=8), st.booleans()).map(
            lambda p: "data: " + json.dumps(p)
        ),
        st.just(": keep-alive comment"),
        st.just("event: ping"),
    ),
    max_size=8,
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int], bytes]:
    """A stream, the cuts its reads make, and what the client gets with usage stripped:
    the same events without the usage-only chunk and without any "usage": null."""
    end = draw(st.sampled_from(["\n\n", "\r\n\r\n", "\r\r"]))
    events = draw(EVENTS)
    usage = "data: " + json.dumps({"choices": [], "usage": USAGE})
    data = "".join(line + end for line in [*events, usage, "data: [DONE]"]).encode()
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    stripped = "".join(line.replace(', "usage": null', "") + end for line in events)
    return data, cuts, (stripped + "data: [DONE]" + end).encode()


def _through(tap: SseTap, data: bytes, cuts: list[int]) -> bytes:
    out, start = [], 0
    for cut in [*cuts, len(data)]:
        out.append(tap.feed(data[start:cut]))
        start = cut
    out.append(tap.finish())
    return b"".join(out)


@settings(max_examples=300)
@given(streams())
def test_cuts_change_neither_the_bytes_nor_the_bill(
    stream: tuple[bytes, list[int], bytes],
) -> None:
    data, cuts, stripped = stream
    for strip in (False, True):
        whole, cut = SseTap(strip), SseTap(strip)
        expected = _through(whole, data, [])
        assert _through(cut, data, cuts) == expected
        assert cut.usage == whole.usage and cut.usage is not None
        assert cut.usage.completion_tokens == 5
        assert cut.data_events == whole.data_events
        if not strip:
            assert expected == data  # the client gets the upstream's bytes as they are
        else:  # only what the proxy's own request added is gone
            assert expected == stripped


def test_a_stream_without_usage_is_estimated_at_one_token_per_content_event() -> None:
    tap = SseTap(strip_usage=True)
    events = [_chunk(text, False) for text in ["", "The", " capital", " is", " Paris", ""]]
    data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    assert _through(tap, data + b"data: [DONE]\n\n", [7, 50]) == data + b"data: [DONE]\n\n"
    assert tap.usage is None  # nothing reported: the ledger books an estimate
    assert tap.data_events == 6  # [DONE] is not an event of the answer
    assert tap.estimated_completion() == 4  # less the role and the finish events


def test_an_event_that_never_ends_is_held_up_to_1_mib_then_passed_on() -> None:
    # Not SSE: the tap must not hold it (and the client's bytes) for ever, nor lose
    # or add a byte when it lets go.
    tap = SseTap(strip_usage=True)
    head = b"data: " + b"x" * ((1 << 20) - 6)
    assert tap.feed(head) == b""  # 1 MiB exactly: still held
    assert tap.feed(b"y") == head + b"y"
    assert tap.feed(b"z\n\ndata: [DONE]") == b"z\n\n"
    assert tap.finish() == b"data: [DONE]"


def test_an_unended_last_event_reaches_the_client_once() -> None:
    last = b'data: {"choices": [{"index": 0, "delta": {"content": "!"}}]}'
    chunk = b"data: {}\n\n" + last
    plain = SseTap(strip_usage=False)  # every chunk went to the client as it came ...
    assert plain.feed(chunk) == chunk
    assert plain.finish() == b""  # ... so the end adds nothing
    stripping = SseTap(strip_usage=True)  # whole events only: the end releases the rest
    assert stripping.feed(chunk) == b"data: {}\n\n"
    assert stripping.finish() == last
    assert plain.data_events == stripping.data_events == 2


def test_usage_is_read_however_the_data_lines_are_written() -> None:
    # SSE allows "data:" without its space and a payload over several data lines.
    usage = json.dumps(USAGE).encode()
    for event in (
        b'data:{"choices": [], "usage": ' + usage + b"}\n\n",
        b'data: {"choices": [],\ndata: "usage": ' + usage + b"}\n\n",
    ):
        tap = SseTap(strip_usage=False)
        tap.feed(event)
        assert tap.usage is not None and tap.usage.prompt_tokens == 3, event


def test_the_null_usage_the_proxy_caused_is_cut_out_exactly() -> None:
    tap = SseTap(strip_usage=True)
    event = b'data: {"choices": [{"delta": {"content": "x"}}], "usage": null}\n\n'
    assert tap.feed(event) == b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'
    assert tap.estimated_completion() == 0  # one event: no more than the role's
