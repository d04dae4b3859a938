"""Small helpers the test files share: hosts files, closed ports, processes by marker, and a
stand-in for the worker's python that records what the head sends before the hello."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import sshfan


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


def capturing_python(path: Path, capture: Path, then: str) -> Path:
    """Write a stand-in for the worker's python that reads what the head sends unasked
    behind the stub's source (frames up to the first TASKS one) into CAPTURE, never says
    hello, and THEN: "fail" (exits 1, as a stub that breaks at start) or "hang" (waits
    for EOF: a host slow to say hello; it ends when the head gives it up)."""
    script = f"""#!{sys.executable} -S
import os, re, struct, sys
need = int(re.search(r"len\\(s\\)<(\\d+)", sys.argv[-1]).group(1))
def read(n):
    data = b""
    while len(data) < n:
        more = os.read(0, n - len(data))
        if not more:
            sys.exit(0)
        data += more
    return data
read(need)
frames = b""
while True:
    head = read(9)
    body = read(struct.unpack(">4sBI", head)[2])
    frames += head + body
    if head[4] == {sshfan.KIND_TASKS}:
        break
with open({str(capture)!r} + ".part", "wb") as f:
    f.write(frames)
os.rename({str(capture)!r} + ".part", {str(capture)!r})
if {then!r} == "fail":
    sys.stderr.write("stub broke at start\\n")
    sys.exit(1)
while os.read(0, 65536):
    pass
"""
    path.write_text(script)
    path.chmod(0o755)
    return path


def early_seqs(capture: Path) -> list[int]:
    """The seqs of the tasks in the TASKS frames a capturing_python read."""
    seqs: list[int] = []
    for kind, payload in sshfan.FrameDecoder(skip_banner=False).feed(capture.read_bytes()):
        if kind == sshfan.KIND_TASKS:
            seqs += [seq for seq, _command, _data in sshfan.decode_tasks(payload)]
    return seqs
