"""moto's standalone S3 server on 127.0.0.1 (a real HTTP server speaking S3): started by the test
fixtures (tests/conftest.py) and by benchmarks/object_store.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3_server(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """The server process and its endpoint URL, once it answers (RuntimeError if it does not)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, **(extra_env or {})}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return server, endpoint
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("the moto S3 server did not start (pip install 'moto[server]')") from None
            time.sleep(0.2)
