"""A second reference point, compiled: nginx as a plain reverse proxy.

The issue's targets were set from a run in which Envoy, a compiled proxy, added
0.08 ms at c=1 and kept 91 % of direct throughput. Envoy is not in Debian's packages;
nginx is, and does the same job here: keep-alive connections to the upstream, the
body passed through, streams relayed as they arrive (``proxy_buffering off``), no
access log. Measured in the same run as the proxy, it shows what the machine and the
load generator leave to any proxy, compiled or not.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.procs import Child, accepts, wait_for

INSTALL_HINT = "apt-get install -y nginx"


def have_nginx() -> bool:
    return shutil.which("nginx") is not None


def nginx_conf(upstream_port: int, port: int, directory: Path) -> str:
    """One worker per core (nginx's ``auto``), in the foreground, every file it writes
    under ``directory``."""
    return f"""\
worker_processes auto;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {directory}/body;
  proxy_temp_path {directory}/proxy;
  upstream fake {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def start_nginx(upstream_port: int, port: int, tmp: Path) -> Child:
    directory = tmp / f"nginx-{port}"
    directory.mkdir()
    config = directory / "nginx.conf"
    config.write_text(nginx_conf(upstream_port, port, directory))
    argv = ["nginx", "-c", str(config), "-p", str(directory), "-e", str(directory / "error.log")]
    child = Child(argv, log=directory / "stderr.log")
    wait_for(lambda: accepts(port), "nginx")
    return child
