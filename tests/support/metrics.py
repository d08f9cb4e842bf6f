"""Read a /metrics scrape back as numbers the tests can assert on."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Labels = dict[str, str]


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of every sample of ``name`` whose labels include ``labels``."""
        return sum(
            value
            for sample, got, value in self.samples
            if sample == name and labels.items() <= got.items()
        )

    def names(self) -> set[str]:
        return {name for name, _, _ in self.samples}


async def scrape(http: aiohttp.ClientSession, url: str) -> Scrape:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return Scrape(await resp.text())
