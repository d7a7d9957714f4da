"""What the DNS labs (tests/dnsmasq.py, tests/dnssec.py) share: a port free for both
UDP and TCP on 127.0.0.1, a daemon run in the foreground with its output in a log
file, and starting one on such a port until it answers."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ForegroundServer", "free_udp_tcp_port", "start_answering"]


def free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (DNS servers listen on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free UDP+TCP port on 127.0.0.1")


@dataclass
class ForegroundServer:
    """One daemon in the foreground, its stderr (and stdout) in a log file."""

    argv: list[str]
    log_path: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True)

    def exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def start_answering(make: Callable[[int], ForegroundServer], answers: Callable[[int], bool],
                    *, wait: float = 20.0) -> ForegroundServer:
    """``make(port)`` on a free port and start it, until ``answers(port)``; on another
    port when the first was taken meanwhile (the log says "in use"), at most 5 times.
    RuntimeError with the server's log if it never answers."""
    last, name = "", ""
    for _ in range(5):
        port = free_udp_tcp_port()
        server = make(port)
        server.port = port
        name = Path(server.argv[0]).name
        server.start()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not server.exited():
            if answers(port):
                return server
            time.sleep(0.05)
        last = server.log()
        server.stop()
        if "in use" not in last:
            break
    raise RuntimeError(f"{name} did not start:\n{last}")
