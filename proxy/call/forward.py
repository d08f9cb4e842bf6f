"""Step 5 of a call: the attempt loop over a model's targets and their endpoints.

For each target, in the order the model's strategy gives: up to ``retry.attempts``
attempts, each on the next endpoint the provider's balance prefers whose circuit
lets it through; between two attempts the upstream's Retry-After (up to
``max_retry_after``) or a full-jitter backoff. A wait that would run past the call's
budget, or a Retry-After above the maximum, moves on to the next target instead of
sleeping. A client error (4xx but 429) is the client's answer and ends the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from proxy.call.attempt import AttemptFailed, Upstream, attempt
from proxy.call.body import Body
from proxy.call.exchange import Exchange, Outcome
from proxy.call.final_error import Failure, all_failed
from proxy.call.headers import NOT_TO_UPSTREAM
from proxy.call.record import Attempt, CallRecord
from proxy.call.traced import traced_attempt
from proxy.config.model import Config, Endpoint, Model, Provider, RetryPolicy, Target
from proxy.engines.lease import served_by
from proxy.errors import CircuitOpen, EngineBusy, EngineUnavailable, ProviderUnavailable
from proxy.limits.cost import cost_micros
from proxy.observe.metrics import endpoint_label
from proxy.routing.backoff import backoff_delay
from proxy.routing.balance import call_hint
from proxy.routing.cache_aware import Choice
from proxy.routing.circuit import Passage


@dataclass(frozen=True)
class Call:
    """Everything step 5 needs, and nothing about who the caller is."""

    config: Config
    model: Model
    endpoint: str
    body: Body
    time_budget: float  # seconds across attempts (retry.budget, X-Request-Timeout)
    # provider name → extra headers for this caller (a team's OpenAI-Project, …)
    provider_headers: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # the client headers never forwarded; a team's also drop the scoping ones (headers.py)
    not_forwarded: AbstractSet[str] = NOT_TO_UPSTREAM


async def forward(exchange: Exchange, call: Call, record: CallRecord) -> Outcome:
    # time.monotonic, not loop.time(): asyncio.get_running_loop() costs a getpid()
    # system call per use on CPython 3.11, and this deadline meets no loop timer.
    run = _Run(exchange, call, record, deadline=time.monotonic() + call.time_budget)
    balancer = exchange.services.balancer
    targets = balancer.order(
        f"model:{call.model.id}",
        call.model.targets,
        call.model.strategy,
        key_of=_target_key,
        weight_of=lambda t: t.weight,
    )
    for number, target in enumerate(targets):
        if run.failures and time.monotonic() >= run.deadline:
            break
        provider = call.config.providers[target.provider]
        if number + 1 < len(targets) and run.spills(provider):
            continue
        with balancer.busy(_target_key(target)):
            response = await run.target(target, provider)
        if response is not None:
            return response
    return all_failed(call.model, run.failures)


def _url(endpoint: Endpoint) -> str:
    return endpoint.url


def _target_key(target: Target) -> str:
    return f"{target.provider}/{target.model}"


class _Run:
    """The state of one call's attempt loop."""

    def __init__(self, exchange: Exchange, call: Call, record: CallRecord, deadline: float):
        self.exchange, self.call, self.record, self.deadline = exchange, call, record, deadline
        self.failures: list[Failure] = []

    def spills(self, provider: Provider) -> bool:
        """A local engine whose queue would make this call wait past the model's
        ``spill_after``: the call goes to the next target instead, said in its attempts."""
        spill_after = self.call.model.spill_after
        if provider.engine is None or spill_after is None:
            return False
        queue = self.exchange.services.engines.supervisor(provider).queue
        wait = queue.estimated_wait(self.record.team)
        if wait <= spill_after:
            return False
        detail = f"estimated queue wait {wait:.1f}s > spill_after {spill_after:g}s"
        self.record.attempts.append(Attempt(provider.name, "-", "spilled", detail))
        return True

    async def target(self, target: Target, provider: Provider) -> Outcome | None:
        if provider.engine is None:
            return await self._target(target, provider)
        team = self.call.config.teams.get(self.record.team)
        try:
            # A local engine lends one ready replica for the whole call, stream included,
            # once the call's turn in its queue comes (awaiting it is not overhead).
            hint = call_hint(provider, self.call.body.fields, provider.engine.replicas)
            weight = team.weight if team else 1.0
            engines = self.exchange.services.engines
            async with contextlib.AsyncExitStack() as stack:
                with self.record.waiting():
                    served, choice = await stack.enter_async_context(
                        served_by(engines, provider, hint, self.record.team, weight, self.deadline)
                    )
                self._prefix_estimate(provider, choice)
                return await self._target(target, served)
        except EngineUnavailable as exc:
            self._fail(provider, "-", "failed", AttemptFailed("engine_unavailable", error=exc))
        except EngineBusy as exc:
            busy = AttemptFailed("engine_busy", error=exc, retry_after=exc.retry_after)
            self._fail(provider, "-", "failed", busy)
        return None

    async def _target(self, target: Target, provider: Provider) -> Outcome | None:
        if provider.missing_key_var:
            missing = ProviderUnavailable(
                f"Provider '{provider.name}' has no API key: the environment variable "
                f"{provider.missing_key_var} is not set."
            )
            self._fail(provider, "-", "failed", AttemptFailed("no_api_key", error=missing))
            return None
        policy = self.call.model.retry_for(provider)
        # Ask for the usage chunk of a stream the client did not ask it for, so that
        # streamed tokens are billed exactly; the tap strips it again.
        strip = (
            provider.stream_usage
            and self.call.body.fields.get("stream") is True
            and self.call.endpoint != "embeddings"
            and not self.call.body.wants_usage()
        )
        body = self.call.body.rewritten(target.model, include_usage=strip)
        self.record.price = target.price  # what this target's attempts cost
        endpoints = self._endpoints(provider)
        for number in range(policy.attempts):
            endpoint = await self._admitted(provider, endpoints, number)
            if endpoint is None:
                return None
            try:
                return await self._attempt(provider, endpoint, body, strip)
            except AttemptFailed as failed:
                if failed.usage is not None:  # a failure the upstream billed
                    self.record.cost += cost_micros(failed.usage, target.price)
                last = number + 1 == policy.attempts
                delay = None if last else self._delay(failed, policy, number + 1)
                self._fail(provider, endpoint.url, "failed" if delay is None else "retried", failed)
                if delay is None:
                    return None
                with self.record.waiting():  # not the proxy's overhead
                    await asyncio.sleep(delay)
        return None

    def _endpoints(self, provider: Provider) -> list[Endpoint]:
        """The provider's endpoints in the order its balance gives for this call."""
        # The hint only where a balance needs it: affinity's is a JSON dump per call,
        # cache_aware's a hash per block of the prompt.
        hint = call_hint(provider, self.call.body.fields, len(provider.endpoints))
        balancer, group = self.exchange.services.balancer, f"provider:{provider.name}"
        if hint is not None and hint.balance == "cache_aware":
            endpoints, choice = balancer.cache_aware(group, provider.endpoints, _url, hint)
            self._prefix_estimate(provider, choice)
            return endpoints
        return balancer.order(
            group,
            provider.endpoints,
            provider.balance,
            key_of=_url,
            weight_of=lambda e: e.weight,
            affinity=None if hint is None else hint.affinity,
        )

    def _prefix_estimate(self, provider: Provider, choice: Choice | None) -> None:
        if choice is not None:
            self.exchange.services.metrics.prefix_blocks(
                provider.name, choice.matched, choice.blocks
            )

    async def _admitted(
        self, provider: Provider, endpoints: list[Endpoint], number: int
    ) -> Endpoint | None:
        """The first endpoint from this attempt's turn on whose circuit lets a call through
        (a half-open one only if this call is elected the deployment's one probe)."""
        breakers = self.exchange.services.breakers
        lease = provider.timeouts.total
        for i in range(len(endpoints)):
            endpoint = endpoints[(number + i) % len(endpoints)]
            passage = breakers.admit(endpoint.url, lease)
            if passage is Passage.CLOSED:
                return endpoint
            if passage is Passage.PROBE and (
                breakers.claim_probe is None or await breakers.claim_probe(endpoint.url, lease)
            ):
                return endpoint
        self._fail(
            provider,
            "*",
            "circuit_open",
            AttemptFailed(
                "circuit_open",
                error=CircuitOpen(
                    f"Every endpoint of provider '{provider.name}' is cooling down after failures."
                ),
            ),
        )
        return None

    async def _attempt(
        self, provider: Provider, endpoint: Endpoint, body: bytes, strip_usage: bool
    ) -> Outcome:
        services = self.exchange.services
        breakers = services.breakers
        self.record.provider, self.record.endpoint = provider.name, endpoint.url
        was = breakers.state(endpoint.url)
        settled = False
        try:
            with services.balancer.busy(endpoint.url):
                target = Upstream(
                    provider,
                    endpoint,
                    self.call.endpoint,
                    self.call.provider_headers.get(provider.name, {}),
                    self.call.config.server.max_answer_bytes,
                    self.call.not_forwarded,
                )
                send = attempt if self.record.trace is None else traced_attempt
                response = await send(
                    self.exchange, services.upstream_client, target, body, self.record, strip_usage
                )
            breakers.succeeded(endpoint.url)
            settled = True
        except AttemptFailed as failed:
            if failed.endpoint_fault:
                breakers.failed(endpoint.url, provider.circuit)
                settled = True
            raise
        finally:
            if not settled:  # a 429, or the client went away: neither verdict
                breakers.released(endpoint.url)
            now = breakers.state(endpoint.url)
            if was == "half_open" and breakers.end_probe is not None:
                breakers.end_probe(endpoint.url)  # this call was the probe
            if now != was:
                services.metrics.circuit_changed(provider.name, endpoint_label(endpoint.url), now)
        self.record.attempts.append(
            Attempt(provider.name, endpoint.url, "ok", str(response.status))
        )
        return response

    def _delay(self, failed: AttemptFailed, policy: RetryPolicy, retry_number: int) -> float | None:
        """Seconds to wait before retrying this target, or None to move on to the next."""
        if failed.retry_after is not None:
            if failed.retry_after > policy.max_retry_after:
                return None
            delay = failed.retry_after
        else:
            delay = backoff_delay(policy, retry_number)
        remaining = self.deadline - time.monotonic()
        return delay if delay < remaining else None

    def _fail(self, provider: Provider, endpoint: str, outcome: str, failed: AttemptFailed) -> None:
        self.record.attempts.append(Attempt(provider.name, endpoint, outcome, failed.detail))
        self.failures.append(Failure(provider.name, failed))
