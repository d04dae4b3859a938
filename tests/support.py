"""Small helpers the test files share: hosts files, closed ports, processes by marker."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def write_hosts_file(tmp_path: Path, text: str, name: str = "hosts.toml") -> Path:
    """Write TEXT as a hosts file in TMP_PATH and return its path."""
    path = tmp_path / name
    path.write_text(text)
    return path


def closed_port() -> int:
    """Return a loopback TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def procs_with(marker: str) -> list[tuple[int, str]]:
    """Return (pid, command line) of live non-zombie processes, other than this one, whose
    argv contains MARKER: what a test looks for to prove no task was left running."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and marker.encode() in argv:
            found.append((int(entry), argv.replace(b"\0", b" ").decode(errors="replace")))
    return found
