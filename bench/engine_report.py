"""The section ``python3 -m bench engines`` writes into docs/BENCHMARKS.md: its table,
the issue's targets judged on it, and how to read it. It is written as the
section ``engines`` (bench/sections.py), which the main bench keeps when it rewrites the
file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.engine_load import Tally, Workload
from bench.report import Machine
from bench.stats import percentile

# The reference rows (bench/engines.py): the label after round_robin when its replicas
# were sent every system prompt before the calls (--warm-reference), and the label of
# the row whose client placed the calls itself (--pinned-reference).
WARMED = ", prompts pre-cached"
PINNED = "pinned: system prompt k on replica k mod 2"


@dataclass(frozen=True)
class Row:
    workload: str
    balance: str
    tally: Tally
    engine_hit: float  # prompt tokens the engines reused / all prompt tokens
    estimate: float | None  # cache_aware's own estimate of its block hits

    @property
    def p50(self) -> float:
        return percentile(self.tally.ttft, 50)

    @property
    def p90(self) -> float:
        return percentile(self.tally.ttft, 90)

    @property
    def tokens_per_second(self) -> float:
        return self.tally.completion_tokens / self.tally.seconds if self.tally.seconds else 0.0

    def __str__(self) -> str:
        return (
            f"TTFT p50 {self.p50:.2f} s p90 {self.p90:.2f} s, "
            f"{self.tokens_per_second:.1f} tokens/s, engine hit {self.engine_hit:.0%}, "
            f"{len(self.tally.ttft)} calls ({self.tally.failed} failed) "
            f"in {self.tally.seconds:.0f} s"
        )


def document(
    about: Machine,
    load_after: str,
    seconds: float,
    loads: Sequence[Workload],
    rows: list[Row],
    cache_ram: int | None = None,
    argv: Sequence[str] = (),
    stagger: float | None = None,
) -> str:
    title, cache = "", "its default host cache of 8 GiB"
    if stagger:
        title = f", conversations {stagger:g} s apart"
    command = "`" + " ".join(["python3 -m bench engines", *argv]) + "`"
    if cache_ram is not None:
        title += f", a prompt cache of {cache_ram} MiB"
        cache = f"its host cache of past prompts limited to {cache_ram} MiB (`--cache-ram`)"
    references = [row.balance.endswith(WARMED) or row.balance == PINNED for row in rows]
    if any(references):
        title += f", with {'references' if sum(references) > 1 else 'a reference'}"
    lines = [
        f"## Local engines: cache-aware routing (issue 23){title}",
        "",
        f"Measured by {command}: two replicas of the shipped SmolLM2-135M engine (llama.cpp "
        f"from xllamacpp), one thread and one slot each, prompt cache on with {cache}; a "
        "fresh proxy and engines per row.",
        "",
        f"- date: {about.date}; run took {seconds:.0f} s; machine: {about.cores} cores, "
        f"{about.cpu}",
        f"- load average (1, 5, 15 min) before / after: {about.load_before} / {load_after}",
        *(f"- {_describe(load)}" for load in loads),
        "",
        "| workload | balance | TTFT p50 (s) | TTFT p90 (s) | tokens/s | engines' prompt "
        "cache hit | proxy's estimate | calls (failed) | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *(_line(row) for row in rows),
        "",
        "### Targets",
        "",
        *targets(rows),
        "",
        NOTES,
    ]
    return "\n".join(lines) + "\n"


def _describe(load: Workload) -> str:
    shape = (
        f"{load.conversations} conversations of {load.turns} turns over {load.systems} system "
        f"prompts of {load.system_words:,} words"
        if load.system_words
        else f"{load.conversations} single calls, each its own prompt"
    )
    return (
        f"{load.name}: {shape}, questions of {load.question_words} words, one started every "
        f"{load.stagger:g} s, max_tokens {load.max_tokens}, temperature 0, streamed"
    )


def _line(row: Row) -> str:
    estimate = "-" if row.estimate is None else f"{row.estimate:.0%}"
    return (
        f"| {row.workload} | {row.balance} | {row.p50:.2f} | {row.p90:.2f} | "
        f"{row.tokens_per_second:.1f} | {row.engine_hit:.0%} | {estimate} | "
        f"{len(row.tally.ttft)} ({row.tally.failed}) | {row.tally.seconds:.0f} |"
    )


def targets(rows: list[Row]) -> list[str]:
    a = {r.balance: r for r in rows if r.workload.startswith("A")}
    b = {r.balance: r for r in rows if r.workload.startswith("B")}
    out = []
    if {"cache_aware", "round_robin"} <= a.keys():
        ca, rr = a["cache_aware"], a["round_robin"]
        out.append(
            f"- A: cache_aware's TTFT p90 at least 2x better than round_robin's: "
            f"{ca.p90:.2f} s against {rr.p90:.2f} s ({_x(rr.p90, ca.p90)}): "
            f"{_verdict(rr.p90 >= 2 * ca.p90)}"
        )
    if {"cache_aware", "affinity"} <= a.keys():
        ca, af = a["cache_aware"], a["affinity"]
        out.append(
            f"- A: and better than affinity's: {ca.p90:.2f} s against {af.p90:.2f} s: "
            f"{_verdict(ca.p90 < af.p90)}"
        )
    warmed = [r for r in a.values() if r.balance.endswith(WARMED)]
    if warmed and "cache_aware" in a:
        ca, ref = a["cache_aware"], warmed[0]
        out.append(
            f"- A, reference: round_robin with every system prompt already on both replicas "
            f"(no cold prefill left for any placement to save) has TTFT p90 {ref.p90:.2f} s, "
            f"cache_aware {ca.p90:.2f} s ({_x(ref.p90, ca.p90)} of it)"
        )
    if {PINNED, "cache_aware", "round_robin"} <= a.keys():
        ca, rr, pin = a["cache_aware"], a["round_robin"], a[PINNED]
        out.append(
            f"- A, reference: every call of system prompt k sent to replica k mod 2 (each "
            f"prompt's cold prefill paid once, the prompts split evenly, each conversation "
            f"on one replica: the placement cache_aware aims at) has TTFT p90 "
            f"{pin.p90:.2f} s, {_x(rr.p90, pin.p90)} better than round_robin's; "
            f"cache_aware {ca.p90:.2f} s ({_x(ca.p90, pin.p90)} the pinned placement's)"
        )
    if {"cache_aware", "least_busy"} <= b.keys():
        ca, lb = b["cache_aware"], b["least_busy"]
        close = ca.p90 <= 1.1 * lb.p90 and ca.tokens_per_second >= 0.9 * lb.tokens_per_second
        out.append(
            f"- B: cache_aware within 10 % of least_busy: TTFT p90 {ca.p90:.2f} s against "
            f"{lb.p90:.2f} s, {ca.tokens_per_second:.1f} tokens/s against "
            f"{lb.tokens_per_second:.1f}: "
            f"{_verdict(close)}"
        )
    return out


def _x(slow: float, fast: float) -> str:
    return f"{slow / fast:.1f}x" if fast > 0 else "-"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


NOTES = """How to read it:

- TTFT is from sending the request to the first content token of the stream, through
  the proxy, queueing included: each replica has one slot, so calls wait in the
  proxy's queue for a free one (set never to refuse here), except those cache_aware
  stacks on a busy replica that holds their prefix, which wait in that llama.cpp.
- tokens/s: the completion tokens of all calls over the run's wall time (the arrivals
  are paced, so it is bounded by the pace as much as by the engines).
- The engines' prompt cache hit is what llama.cpp reports in its `/metrics`: prompt
  tokens it took from its cache over all prompt tokens. llama.cpp keeps the last
  prompt of each slot and a host-memory cache of earlier prompts (8 GiB by default,
  `--cache-ram`). With the default, a replica that served a system prompt once can
  restore it for any later call: the balances differ most in how many replicas pay a
  cold prefill of each prompt and in whether a conversation's history is where its
  next turn goes. With a smaller cache, one that holds fewer prompts than the replica
  is sent, a replica evicts what it will need again unless the calls sharing a prefix
  keep to one replica.
- The proxy's estimate is cache_aware's own: the share of the calls' prompt blocks
  its index held on the replica it chose (`llm_proxy_prefix_blocks_total`).
- Reference rows, where present: *pinned* sends every call of system prompt k to
  replica k mod 2, through the proxy (two engines of one replica each; the client
  picks the model): each prompt's cold prefill is paid once, the four prompts split two
  and two, every conversation stays on one replica. It is the placement cache_aware
  aims at, with no estimate to get wrong, so what it gains over round_robin is what
  placement can gain in that run. *prompts pre-cached* is round_robin on replicas that
  were each sent every system prompt before the calls: no cold prefill is left, so it
  shows what the cold prefills cost.
- The machine is shared with other jobs (see the load average); the targets compare
  rows of the same run. A row that another job slowed shows as an outlier among rows
  that do the same work (workload B has no concurrency to speak of: its four rows
  should agree).
- Scale: workload A has the issue's 40 conversations unless `--conversations` says
  otherwise (see its line above). On one thread a cold prefill of one of its
  1,450-token system prompts takes 9-19 s on this 2-core machine, depending on the
  day (about 80-160 prompt tokens a second, where the issue expected 0.3-1 s): the
  replicas run saturated, and the TTFT figures are mostly queueing behind prefills."""
