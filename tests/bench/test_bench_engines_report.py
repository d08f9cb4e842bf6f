"""docs/BENCHMARKS.md holds two benches' output: each rewrites only its own part."""

from __future__ import annotations

from bench.engine_report import BEGIN, END, kept, splice

MAIN = "# Benchmarks\n\nthe main bench's table\n"


def test_the_engines_bench_replaces_only_its_section() -> None:
    first = splice(MAIN, "## Local engines\n\nrun 1\n")
    assert first.startswith(MAIN) and "run 1" in first
    second = splice(first, "## Local engines\n\nrun 2\n")
    assert second.startswith(MAIN) and "run 2" in second and "run 1" not in second
    assert second.count(BEGIN) == second.count(END) == 1


def test_the_main_bench_carries_the_engines_section_over() -> None:
    with_engines = splice(MAIN, "## Local engines\n\nrun 1\n")
    rewritten = "# Benchmarks\n\na new table\n" + "\n" + kept(with_engines)
    assert "run 1" in rewritten and "the main bench's table" not in rewritten
    assert kept(MAIN) == ""
