"""Mutation testing of the modules where a silent bug costs money or security.

``python3 tools/mutate.py [MODULE ...] [--jobs N]`` (docs/TESTING.md, "Mutation testing").

mutmut makes the mutants (its operators, its scope: code inside functions), but this
script runs them, because mutmut's own runner does not fit this suite: it selects tests
by what ran in the pytest process, and most of what these modules do runs in servers the
tests start as subprocesses (``python -m proxy serve``), which its trampolines neither
see nor reach when a test gives the server an environment of its own. So each mutant
here is a plain edit of the file in a private copy of the repository, and the copy's
tests run against it: in-process and subprocess servers alike import the mutated file.
The Lua scripts in proxy/limits/lua.py, which mutmut leaves alone (strings), get Lua
operators of their own (``lua_mutants``), and the Redis-backend tests run them.

Each module runs only the test files that exercise it (``TARGETS``), with ``-x``, so a
killed mutant costs one failing test, not the whole selection.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import fcntl
import json
import os
import queue
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import libcst as cst
from mutmut.mutation.file_mutation import create_mutations

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "mutants"


@dataclass(frozen=True)
class Target:
    """A module to mutate and the test files that must kill its mutants."""

    path: str
    tests: tuple[str, ...]  # pytest's arguments: test files or ids, and options
    # Mutate only these functions (None: all of the module's functions) ...
    functions: frozenset[str] | None = None
    # ... and, inside any function, the statements whose source contains this text.
    anchor: str | None = None


# pytest arguments, fastest killers first. test_teams.py runs each test on both backends
# ([memory] and [redis]); ``-k`` keeps the backend the module serves (it also matches
# test_redis.py by its file name).
_TEAMS = "tests/limits/test_teams.py"
_BATCH = "tests/limits/test_store_batch.py"
_REDIS = "tests/limits/test_redis.py"
_STORES = "tests/limits/test_store_lua.py"
_COSTS = "tests/limits/test_costs.py"
_BUDGETS = "tests/limits/test_budgets.py"
_BUDGET_STORES = "tests/limits/test_budget_store.py"
TARGETS: dict[str, Target] = {
    t.path.removeprefix("proxy/").removesuffix(".py").replace("/", "."): t
    for t in [
        Target(
            "proxy/limits/admission.py",
            (
                "tests/limits/test_usage.py",
                "tests/call/test_hot_path.py",
                "tests/limits/test_accounting.py",
                "tests/limits/test_accounting_outages.py",
                "tests/limits/test_ledger_replicas.py",
                "tests/call/test_output_caps.py",
                _TEAMS,
                _BATCH,
                _REDIS,
                _COSTS,
                _BUDGETS,
            ),
        ),
        Target("proxy/call/caps.py", ("tests/call/test_output_caps.py",)),
        Target(
            "proxy/limits/lua.py",
            (_STORES, _BUDGET_STORES, _BATCH, _TEAMS, _REDIS, _COSTS, _BUDGETS, "-k", "not memory"),
        ),
        Target(
            "proxy/limits/memory.py",
            (
                "tests/limits/test_store_memory.py",
                "tests/call/test_hot_path.py",
                _STORES,
                _BUDGET_STORES,
                _TEAMS,
                _COSTS,
                _BUDGETS,
                "-k",
                "not redis",
            ),
        ),
        Target(
            "proxy/limits/redis_store.py",
            (
                "tests/redis/test_resp.py",
                "tests/limits/test_store_redis.py",
                "tests/limits/test_ledger_replicas.py",
                _STORES,
                _BATCH,
                _TEAMS,
                _REDIS,
                _COSTS,
                _BUDGET_STORES,
                _BUDGETS,
                "-k",
                "not memory",
            ),
        ),
        Target("proxy/limits/refusal.py", (_BUDGETS, _TEAMS, "-k", "not redis")),
        Target("proxy/limits/budget_report.py", (_BUDGETS, "-k", "not redis")),
        Target(
            "proxy/config/budgets.py", ("tests/config/test_budgets.py", _BUDGETS, "-k", "not redis")
        ),
        Target(
            "proxy/limits/usage.py",
            (
                "tests/limits/test_usage.py",
                "tests/observe/test_metrics.py",
                "tests/limits/test_teams.py",
            ),
        ),
        Target(
            "proxy/limits/cost.py",
            (_COSTS, "-k", "rounded or memory"),
        ),
        Target(
            "proxy/config/prices.py",
            ("tests/config/test_prices.py", _COSTS, "-k", "not redis"),
        ),
        Target("proxy/call/sse.py", ("tests/call/test_sse_tap.py", "tests/call/test_streaming.py")),
        Target(
            "proxy/call/headers.py",
            (
                "tests/call/test_client_input.py",
                "tests/call/test_passthrough.py",
                "tests/http/test_server.py",
                _TEAMS,
                "-k",
                "not redis",
            ),
        ),
        Target(
            "proxy/call/auth.py",
            (
                "tests/call/test_client_input.py",
                _TEAMS,
                "tests/observe/test_prometheus.py",
                "-k",
                "not redis",
            ),
        ),
        Target("proxy/config/exposure.py", ("tests/config/test_exposure.py",)),
        Target(
            "proxy/routing/backoff.py",
            ("tests/call/test_resilience.py", "tests/call/test_timeouts.py"),
        ),
        Target(
            "proxy/routing/circuit.py",
            (
                "tests/routing/test_balance.py",
                "tests/routing/test_circuit_sharing.py",
                "tests/call/test_resilience.py",
            ),
        ),
        Target(
            "proxy/routing/circuit_sync.py",
            (
                "tests/routing/test_circuit_sync.py",
                "tests/routing/test_circuit_sharing.py",
                "tests/redis/test_redis_subscription.py",
            ),
        ),
    ]
}


@dataclass(frozen=True)
class Mutant:
    id: str  # module:number, stable while the module's source is
    path: str
    line: int  # first line the mutant changes
    code: str  # the whole mutated file
    diff: str


@dataclass
class Outcome:
    module: str
    seconds: float = 0.0
    killed: list[str] = field(default_factory=list)
    survived: list[str] = field(default_factory=list)
    timeout: list[str] = field(default_factory=list)


# ---- making mutants ---------------------------------------------------------------------


def python_mutants(target: Target, source: str) -> Iterator[tuple[int, str]]:
    """(first changed line, mutated file) for each of mutmut's mutations in scope."""
    module, mutations, _, _ = create_mutations(target.path, source)
    anchored = _anchored_lines(source, target.anchor)
    for mutation in mutations:
        function = mutation.contained_by_top_level_function
        if not isinstance(function, cst.FunctionDef):  # mutmut's scope: code in functions
            continue
        replaced = module.deep_replace(mutation.original_node, mutation.mutated_node)
        code = cst.ensure_type(replaced, cst.Module).code
        line = _first_changed_line(source, code)
        everything = target.functions is None and target.anchor is None
        if everything or function.name.value in (target.functions or ()) or line in anchored:
            yield line, code


def _anchored_lines(source: str, anchor: str | None) -> set[int]:
    """Lines of the statements in functions whose source contains ``anchor``."""
    if anchor is None:
        return set()
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for statement in node.body:
            text = ast.get_source_segment(source, statement) or ""
            if anchor in text and statement.end_lineno is not None:
                lines.update(range(statement.lineno, statement.end_lineno + 1))
    return lines


def _first_changed_line(before: str, after: str) -> int:
    pairs = zip(before.splitlines(), after.splitlines(), strict=False)
    for number, (old, new) in enumerate(pairs, 1):
        if old != new:
            return number
    return 1


# Lua tokens: comments and quoted strings are matched to be skipped; the rest are mutated.
_LUA_TOKEN = re.compile(
    r"(?P<skip>--[^\n]*|'[^'\n]*')"
    r"|(?P<number>\b\d+\b)"
    r"|(?P<word>\b(?:and|or|not)\b|math\.(?:min|max|floor|ceil))"
    r"|(?P<op><=|>=|==|~=|\.\.|<|>|\+|-|\*|/)"
)
_LUA_SWAPS = {
    "<=": ["<"],
    ">=": [">"],
    "<": ["<="],
    ">": [">="],
    "==": ["~="],
    "~=": ["=="],
    "+": ["-"],
    "-": ["+"],
    "*": ["/"],
    "/": ["*"],
    "and": ["or"],
    "or": ["and"],
    "not": [""],
    "math.min": ["math.max"],
    "math.max": ["math.min"],
    "math.floor": ["math.ceil"],
    "math.ceil": ["math.floor"],
}


def lua_mutants(source: str) -> Iterator[tuple[int, str]]:
    """Mutants of the Lua in the module's triple-quoted strings (not its docstring)."""
    tree = ast.parse(source)
    docstring = ast.get_docstring(tree, clean=False)
    offsets = _line_offsets(source)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        if node.value == docstring or node.end_col_offset is None or node.end_lineno is None:
            continue
        start = offsets[node.lineno - 1] + node.col_offset
        end = offsets[node.end_lineno - 1] + node.end_col_offset
        if not source.startswith('"""', start):
            continue
        for match in _LUA_TOKEN.finditer(source, start + 3, end - 3):
            token = match.group()
            if match.lastgroup == "number":
                swaps = [str(int(token) + 1)]
            else:
                swaps = _LUA_SWAPS.get(token, [])
            for swap in swaps:
                code = source[: match.start()] + swap + source[match.end() :]
                yield source.count("\n", 0, match.start()) + 1, code


def _line_offsets(source: str) -> list[int]:
    offsets = [0]
    for line in source.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    return offsets


def mutants_of(name: str) -> list[Mutant]:
    target = TARGETS[name]
    source = (ROOT / target.path).read_text()
    found = list(python_mutants(target, source))
    if name == "limits.lua":
        found += lua_mutants(source)
    return [
        Mutant(f"{name}:{number}", target.path, line, code, _diff(target.path, source, code))
        for number, (line, code) in enumerate(found, 1)
    ]


def _diff(path: str, before: str, after: str) -> str:
    lines = difflib.unified_diff(
        before.splitlines(), after.splitlines(), path, path, n=0, lineterm=""
    )
    return "\n".join(list(lines)[2:])


# ---- running them -----------------------------------------------------------------------


def make_runners(jobs: int) -> list[Runner]:
    """One private copy of the repository per job: each mutant edits a file of one."""
    runners: list[Runner] = []
    junk = shutil.ignore_patterns(".git", "mutants", "__pycache__", ".*_cache", ".hypothesis")
    for n in range(jobs):
        copy = OUT / f"work-{n}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(ROOT, copy, ignore=junk)
        _check_copy_is_imported(copy)
        runners.append(Runner(copy))
    return runners


def _environment() -> dict[str, str]:
    # No bytecode: a mutant of the same size written within the second of the previous
    # one would otherwise run from the previous one's stale .pyc.
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def _check_copy_is_imported(copy: Path) -> None:
    found = subprocess.run(
        [sys.executable, "-c", "import proxy; print(proxy.__file__)"],
        cwd=copy,
        env=_environment(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).is_relative_to(copy):
        raise SystemExit(f"the copy in {copy} imports proxy from {found}, not its own")


_PRELOADED_PLUGINS = "ignore::pytest.PytestAssertRewriteWarning"  # tools/fork_runner.py


class Runner:
    """A fork runner (tools/fork_runner.py) working in one private copy of the repository."""

    def __init__(self, copy: Path):
        self.copy = copy
        self._child: int | None = None  # the pytest run under way, in its own process group
        self._process = subprocess.Popen(
            [sys.executable, str(ROOT / "tools" / "fork_runner.py")],
            cwd=copy,
            env=_environment(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )

    def run(self, tests: Sequence[str], timeout: float) -> str:
        """'killed', 'survived' or 'timeout' for the copy as it stands."""
        assert self._process.stdin is not None
        args = ["-x", "-q", "-p", "no:cacheprovider", "-W", _PRELOADED_PLUGINS, *tests]
        self._process.stdin.write(json.dumps(args).encode() + b"\n")
        pid = self._child = json.loads(self._answer(60))["pid"]
        try:
            code = json.loads(self._answer(timeout))["code"]
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # the child and the servers it started
            self._answer(60)
            return "timeout"
        finally:
            self._child = None
        return "survived" if code == 0 else "killed"

    def _answer(self, timeout: float) -> bytes:
        """One line from the runner, read unbuffered so that select() tells the truth."""
        assert self._process.stdout is not None
        fd, line, end = self._process.stdout.fileno(), b"", time.monotonic() + timeout
        while not line.endswith(b"\n"):
            if not select.select([fd], [], [], max(0.0, end - time.monotonic()))[0]:
                raise TimeoutError
            byte = os.read(fd, 1)
            if not byte:
                raise SystemExit(f"the fork runner in {self.copy} ended")
            line += byte
        return line

    def close(self) -> None:
        """End the runner, and a test run of it still going (after a Ctrl-C)."""
        if self._child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._child, signal.SIGKILL)
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._process.wait()


def run_mutant(
    runners: queue.Queue[Runner], mutant: Mutant, tests: Sequence[str], timeout: float
) -> str:
    runner = runners.get()
    file = runner.copy / mutant.path
    original = file.read_text()
    try:
        file.write_text(mutant.code)
        return runner.run(tests, timeout)
    finally:
        file.write_text(original)
        runners.put(runner)


def run_module(name: str, runners: queue.Queue[Runner], jobs: int, only: set[str]) -> Outcome:
    target, started = TARGETS[name], time.monotonic()
    mutants = [m for m in mutants_of(name) if not only or m.id in only]
    baseline, runner = time.monotonic(), runners.get()
    try:  # the unmutated tests must pass, and tell how long a survivor takes
        if runner.run(target.tests, timeout=1800) != "survived":
            raise SystemExit(f"{name}: the tests fail without any mutant: {target.tests}")
    finally:
        runners.put(runner)
    timeout = 3 * (time.monotonic() - baseline) + 30
    print(f"{name}: {len(mutants)} mutants, tests {' '.join(target.tests)}", flush=True)
    outcome = Outcome(name)
    pool = ThreadPoolExecutor(jobs)
    try:
        verdicts = pool.map(lambda m: run_mutant(runners, m, target.tests, timeout), mutants)
        for mutant, verdict in zip(mutants, verdicts, strict=True):
            getattr(outcome, verdict).append(mutant.id)
            if verdict != "killed":
                print(f"  {verdict} {mutant.id} line {mutant.line}\n{mutant.diff}", flush=True)
    finally:  # after a Ctrl-C, start no other mutant
        pool.shutdown(wait=False, cancel_futures=True)
    outcome.seconds = round(time.monotonic() - started, 1)
    print(report([outcome]).splitlines()[-1], flush=True)
    return outcome


def report(outcomes: Sequence[Outcome]) -> str:
    rows = ["| module | mutants | killed | survived | timeout | minutes |", "|---" * 6 + "|"]
    for o in outcomes:
        total = len(o.killed) + len(o.survived) + len(o.timeout)
        rows.append(
            f"| {o.module} | {total} | {len(o.killed)} | {len(o.survived)} "
            f"| {len(o.timeout)} | {o.seconds / 60:.1f} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(TARGETS)}")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument("--only", nargs="+", default=[], help="mutant ids (module:number)")
    parser.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # mutmut reads its settings from pyproject.toml in the current directory
    only = set(args.only)
    names = args.modules or sorted({i.split(":")[0] for i in only}) or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; known: {', '.join(TARGETS)}")
    if args.list:
        for mutant in (m for n in names for m in mutants_of(n) if not only or m.id in only):
            print(f"{mutant.id} line {mutant.line}\n{mutant.diff}")
        return 0
    OUT.mkdir(exist_ok=True)
    lock = (OUT / "lock").open("w")
    try:  # a second run would delete and rewrite the copies this one is testing in
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit("another tools/mutate.py run is using mutants/; wait for it") from None
    runners = make_runners(args.jobs)
    free: queue.Queue[Runner] = queue.Queue()
    for runner in runners:
        free.put(runner)
    try:
        outcomes = [run_module(name, free, args.jobs, only) for name in names]
    finally:
        for runner in runners:
            runner.close()
    (OUT / "result.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    print(report(outcomes))
    return 0 if all(not o.survived and not o.timeout for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
