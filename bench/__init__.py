"""The benchmark (issue: performance) lives here."""
