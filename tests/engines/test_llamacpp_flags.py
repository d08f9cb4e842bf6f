"""The launcher's llama-server flags reach llama.cpp's own parameters (xllamacpp's
``CommonParams``, as the server is made from them)."""

from __future__ import annotations

import importlib
from pathlib import Path

from proxy.engines.llamacpp import _params, _parser


def test_flags_reach_the_server_s_parameters() -> None:
    xllamacpp = importlib.import_module("xllamacpp")
    argv = ["--model", "m.gguf", "--port", "9", "--parallel=3", "--cache-ram", "100", "-t", "1"]
    params = _params(xllamacpp, _parser().parse_args(argv), Path("m.gguf"))
    assert (params.n_parallel, params.cache_ram_mib, params.cpuparams.n_threads) == (3, 100, 1)
    assert params.model.path == "m.gguf"
    default = _params(xllamacpp, _parser().parse_args(argv[:4]), Path("m.gguf"))
    assert (default.n_parallel, default.cache_ram_mib) == (1, 8192)  # llama-server's default
