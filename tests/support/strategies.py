"""Hypothesis strategies the body-splicing tests share: JSON values whose objects use a
given set of keys, and the whitespace a client may put between tokens."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

SPACES = st.sampled_from(["", " ", "\n  ", "\t"])


def json_values(keys: list[str]) -> st.SearchStrategy[Any]:
    """Nested JSON values (no NaN) whose objects take their keys from ``keys``."""
    key = st.sampled_from(keys)
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(key, inner, max_size=3),
        max_leaves=12,
    )
