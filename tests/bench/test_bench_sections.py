"""docs/BENCHMARKS.md holds the main run's table and sections that runs of their own
write (``python3 -m bench fairness``): neither run may erase the other's figures."""

from __future__ import annotations

from pathlib import Path

from bench.sections import kept_sections, write_section


def test_a_section_run_replaces_its_own_section_and_the_main_run_keeps_it(tmp_path: Path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nmain table, run 1\n")
    write_section(out, "fairness", "## Fairness\n\nratio 1.75x\n")
    write_section(out, "other", "## Other\n\nfigure 1\n")
    write_section(out, "fairness", "## Fairness\n\nratio 1.50x\n")
    text = out.read_text()
    assert "ratio 1.75x" not in text
    assert text.index("main table, run 1") < text.index("ratio 1.50x") < text.index("figure 1")

    out.write_text(kept_sections(out, "# Benchmarks\n\nmain table, run 2\n"))
    text = out.read_text()
    assert "main table, run 1" not in text
    assert text.index("main table, run 2") < text.index("ratio 1.50x") < text.index("figure 1")
    assert text.count("<!-- section:fairness -->") == 1
