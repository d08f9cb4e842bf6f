"""The docs check: every example of README.md is run, as an operator would run it.

The README's run line serves the repository's routes.yaml (its llama.cpp engine
included) and every `curl`, `python3 -m proxy` command and Python example is run
against it as written, with only the port changed; every YAML block is a whole
routes.yaml that `python3 -m proxy check` accepts. A command that is not run is
exempt by its first word, for a reason written below; a new kind of command fails
`test_every_command_is_run_or_exempt` until it is run or exempted here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import ProxyProcess, free_port, stop_process
from tests.support.markdown import github_anchors

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ADDRESS = "127.0.0.1:8080"

# What an operator runs: the default server (the front), not both of the suite's servers.
pytestmark = [pytest.mark.timeout(180), pytest.mark.front_only]

# Commands not run here, and why. Their files are checked elsewhere.
EXEMPT = {
    "python3 -m venv": "sets up a shell; CI installs into a fresh machine",
    "python3 -m pip": "the install; .ci/run runs the test line on a fresh checkout",
    "python3 -m pytest": "the test line itself",
    "python3 -m bench": "ten minutes of load; tests/bench runs its parts",
    "export": "deployment secrets for compose",
    "docker": "no container engine in CI; tests/test_deploy.py checks the files",
    "cp deploy/k8s": "deployment secrets for kubectl",
    "kubectl": "no cluster in CI; tests/test_deploy.py checks the kustomization",
}


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int


@dataclass(frozen=True)
class Command:
    text: str
    line: int

    @property
    def id(self) -> str:
        return f"L{self.line}:{self.text[:40]}"


def blocks() -> list[Block]:
    text = README.read_text()
    found = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, match.start()) + 2
        found.append(Block(match.group(1), match.group(2), line))
    return found


def commands() -> list[Command]:
    """The shell commands of the README's sh blocks: continuations joined, comments cut,
    `a && b` split into its parts."""
    found = []
    for block in blocks():
        if block.lang != "sh":
            continue
        joined = block.text.replace("\\\n", " ")
        for offset, line in enumerate(joined.splitlines()):
            line = re.sub(r"\s+#[^'\"]*$", "", line).strip()
            for part in line.split(" && "):
                if part.strip():
                    found.append(Command(" ".join(part.split()), block.line + offset))
    return found


def exemption(command: Command) -> str | None:
    return next((why for start, why in EXEMPT.items() if command.text.startswith(start)), None)


def runnable() -> list[Command]:
    return [c for c in commands() if exemption(c) is None and not c.text.startswith(". ")]


def test_every_command_is_run_or_exempt() -> None:
    """Each command is a curl or a python3 -m proxy command (run below), or exempt."""
    assert len(commands()) >= 12  # the parse found the README's examples
    for command in runnable():
        assert command.text.startswith(("curl ", "python3 -m proxy ")), command
    assert {b.lang for b in blocks()} <= {"sh", "yaml", "python", ""}, "a block of a new kind"
    assert not [b for b in blocks() if b.lang == ""][1:], "one plain block: the layout"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The README's run line: the repository's routes.yaml, as it is, on a free port
    (its ledger file in a temporary state directory, not beside routes.yaml)."""
    run = next(c for c in commands() if c.text.startswith("python3 -m proxy serve"))
    assert run.text == "python3 -m proxy serve --config routes.yaml"
    state = {"PROXY_STATE_DIR": str(tmp_path_factory.mktemp("state"))}
    process = ProxyProcess(ROOT / "routes.yaml", free_port(), env=state)
    try:
        deadline = time.monotonic() + 90
        while _get(process.url + "/readyz") != 200:
            assert time.monotonic() < deadline, f"not ready:\n{process.log()}"
            assert process.process.poll() is None, process.log()
            time.sleep(0.2)
        yield f"127.0.0.1:{process.port}"
    finally:
        process.stop()
        process.log_path.unlink(missing_ok=True)


def _get(url: str) -> int:
    result = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url], capture_output=True, text=True
    )
    return int(result.stdout or 0)


def _run(command: str, address: str) -> subprocess.CompletedProcess[str]:
    argv = shlex.split(command.replace(ADDRESS, address))
    if argv[0] == "python3":
        argv[0] = sys.executable
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)


CURLS = [c for c in runnable() if c.text.startswith("curl ")]


@pytest.mark.parametrize("command", CURLS, ids=[c.id for c in CURLS])
def test_each_curl_answers_as_the_readme_says(command: Command, served: str) -> None:
    result = _run(command.text, served)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    if '"stream": true' in command.text:
        events = [line for line in out.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) > 2, out
        assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"
    elif "no-such-model" in command.text:
        error = json.loads(out)["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert error["type"] == "invalid_request_error"
        assert error["message"].startswith(
            "The model 'no-such-model' does not exist. Available models: "
        ), error
    elif command.text.endswith("/v1/models"):
        assert "smollm2" in [m["id"] for m in json.loads(out)["data"]]
    else:
        reply = json.loads(out)
        assert reply["choices"][0]["message"]["content"], reply


def test_the_python_example_answers_plain_and_streamed(served: str) -> None:
    (example,) = [b for b in blocks() if b.lang == "python"]
    code = example.text.replace(ADDRESS, served)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    answer, story = result.stdout.split("\n", 1)
    assert answer.strip() and story.strip(), result.stdout


def test_check_and_keygen_as_written() -> None:
    (check,) = [c for c in runnable() if c.text.startswith("python3 -m proxy check")]
    result = _run(check.text, ADDRESS)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr
    (keygen,) = [c for c in runnable() if c.text.startswith("python3 -m proxy keygen")]
    result = _run(keygen.text, ADDRESS)
    assert result.returncode == 0, result.stderr
    assert re.search(r"sk-proxy-\S{20,}", result.stdout)
    assert re.search(r'\{name: laptop, hash: "sha256:[0-9a-f]{64}"\}', result.stdout)


def test_the_workers_example_serves_on_every_worker(tmp_path: Path) -> None:
    """`serve --workers 2` as written, but on a free port: two workers listen."""
    (command,) = [c for c in runnable() if "--workers" in c.text]
    port = free_port()
    argv = shlex.split(command.text.replace("--port 8080", f"--port {port}"))
    log = tmp_path / "workers.log"
    with open(log, "wb") as out:
        env = {**os.environ, "PROXY_STATE_DIR": str(tmp_path)}
        process = subprocess.Popen(
            [sys.executable, *argv[1:]], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env
        )
        try:
            deadline = time.monotonic() + 60
            while log.read_text().count("proxy listening on") < 2:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            assert _get(f"http://127.0.0.1:{port}/healthz") == 200
        finally:
            assert stop_process(process) == 0, log.read_text()


YAMLS = [b for b in blocks() if b.lang == "yaml"]


@pytest.mark.parametrize("block", YAMLS, ids=[f"L{b.line}" for b in YAMLS])
def test_each_yaml_block_is_a_valid_routes_yaml(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(block.text)
    env = {"PATH": "/usr/bin:/bin", "PRIME_API_KEY": "k", "WANDB_API_KEY": "k"}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_link_of_the_readme_and_docs_resolves() -> None:
    """A link to a file names one that exists, and its #anchor a heading in it."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: {target}"
            if anchor:
                assert anchor in github_anchors(linked.read_text()), f"{page.name}: {target}"
