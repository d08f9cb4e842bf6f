"""accounting.ledger_path and ledger_interval: where the embedded ledger's file is, read
with the other keys of routes.yaml (relative to the file, the state directory, null)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.load import ConfigError, load_config, parse_config
from proxy.config.model import Accounting

BASE = (
    "providers: {p: {base_url: 'http://127.0.0.1:9/v1'}}\n"
    "models: {m: {targets: [{provider: p, model: x}]}}\n"
)


def _load(tmp_path: Path, accounting: str, env: dict[str, str] | None = None) -> Accounting:
    path = tmp_path / "conf" / "routes.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(BASE + accounting)
    return load_config(path, env or {}).accounting


def test_the_default_file_is_beside_routes_yaml(tmp_path: Path) -> None:
    accounting = _load(tmp_path, "")
    assert accounting.ledger_path == str(tmp_path / "conf" / "ledger.sqlite3")
    assert accounting.ledger_interval == 1.0


def test_the_state_directory_takes_the_default_file(tmp_path: Path) -> None:
    accounting = _load(tmp_path, "", {"PROXY_STATE_DIR": "/var/lib/llm-proxy"})
    assert accounting.ledger_path == "/var/lib/llm-proxy/ledger.sqlite3"
    # A path in the file wins over the state directory.
    named = _load(tmp_path, "accounting: {ledger_path: /srv/l.db}", {"PROXY_STATE_DIR": "/x"})
    assert named.ledger_path == "/srv/l.db"


def test_a_relative_path_is_beside_routes_yaml_and_null_is_off(tmp_path: Path) -> None:
    relative = _load(tmp_path, "accounting: {ledger_path: state/l.db, ledger_interval: 250ms}")
    assert relative.ledger_path == str(tmp_path / "conf" / "state" / "l.db")
    assert relative.ledger_interval == 0.25
    assert _load(tmp_path, "accounting: {ledger_path: null}").ledger_path is None


def test_a_config_not_read_from_a_file_keeps_its_ledger_in_memory() -> None:
    assert parse_config(BASE, {}).accounting.ledger_path is None
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + "accounting: {ledger_path: l.db}", {})
    assert caught.value.errors == [
        "accounting.ledger_path: must be absolute when not read from a file"
    ]


@pytest.mark.parametrize(
    ("accounting", "error"),
    [
        ("{ledger_path: ''}", "accounting.ledger_path: must not be empty"),
        ("{ledger_path: [a]}", "accounting.ledger_path: must be a string, got list"),
        ("{ledger_interval: 0}", "accounting.ledger_interval: must be a positive duration"),
        ("{ledger_paht: x}", "accounting.ledger_paht: unknown key (did you mean 'ledger_path'?)"),
    ],
)
def test_bad_values_are_refused_with_their_path(
    tmp_path: Path, accounting: str, error: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, f"accounting: {accounting}")
    assert any(error in e for e in caught.value.errors), caught.value.errors
