"""Helpers the test files share: running sshfan, hosts files, closed ports, exit checks,
journals, processes by marker, and a stand-in for the worker's python that records what
the head sends before the hello. Fixtures are in conftest.py; servers in sshd.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sshd import SshServer

import sshfan

REPO_ROOT = Path(__file__).resolve().parent.parent
NO_HANG = 60.0  # seconds: a generous bound that only a hang exceeds
LOCAL_BLOCK = '[[hosts]]\nname = "here"\nlocal = true\nslots = 2\n'  # this machine, no SSH

# The type of conftest's `run_sshfan` fixture: run(args, input=, timeout=, cwd=, env=).
RunSshfan = Callable[..., "subprocess.CompletedProcess[bytes]"]


# -- running sshfan ------------------------------------------------------------


def sshfan_argv(*args: str) -> list[str]:
    """The command line that runs this checkout's sshfan with ARGS."""
    return [sys.executable, "-m", "sshfan", *args]


def sshfan_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with this checkout first on PYTHONPATH, EXTRA on top."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def sshfan_command(bin_dir: Path) -> Path:
    """Write BIN_DIR/sshfan, a stand-in for the installed entry point, running this checkout."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    command = bin_dir / "sshfan"
    command.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m sshfan "$@"\n')
    command.chmod(0o755)
    return command


def check_exit(result: subprocess.CompletedProcess[bytes], code: int) -> None:
    """Assert sshfan exited with code, showing its stderr if not."""
    assert result.returncode == code, (
        f"exit {result.returncode}, expected {code}; stderr:\n"
        f"{result.stderr.decode(errors='replace')[-4000:]}"
    )


def err_lines(stderr: bytes) -> list[str]:
    """Return the non-empty lines of sshfan's stderr."""
    return [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]


def run_args(tasks: Path, hosts: Path, out: Path, *extra: str) -> list[str]:
    """Return `sshfan run` arguments for TASKS on HOSTS into OUT."""
    return ["run", str(tasks), "--hosts", str(hosts), "-o", str(out), "--no-progress", *extra]


class Head:
    """`python -m sshfan ...` running in the background, its output going to files."""

    def __init__(self, args: list[str], workdir: Path, name: str = "") -> None:
        """Start sshfan with ARGS in WORKDIR (in its own session); NAME its output files."""
        self.stdout_path = workdir / f"{name or f'head-{time.monotonic_ns()}'}.stdout"
        self.stderr_path = self.stdout_path.with_suffix(".stderr")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                sshfan_argv(*args),
                cwd=workdir,
                env=sshfan_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    def signal(self, signum: int) -> None:
        """Send a signal to the head process (only)."""
        self.proc.send_signal(signum)

    def wait(self, timeout: float = NO_HANG) -> subprocess.CompletedProcess[bytes]:
        """Wait for the head to exit (failing the test if it hangs) and return what it did."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(
                f"sshfan did not exit within {timeout:g} s; stderr:\n"
                f"{self.stderr_path.read_text(errors='replace')[-4000:]}"
            )
        return subprocess.CompletedProcess(
            self.proc.args, self.proc.returncode, self.stdout_path.read_bytes(), self.stderr()
        )

    def stderr(self) -> bytes:
        """What the head has written on stderr so far."""
        return self.stderr_path.read_bytes()

    def stop(self) -> None:
        """SIGKILL the head's process group if it is still running, and reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def wait_for(
    what: str,
    predicate: Callable[[], object],
    proc: subprocess.Popen[bytes] | None = None,
    timeout: float = NO_HANG,
) -> None:
    """Poll predicate until it is true; fail naming WHAT after TIMEOUT seconds, or as soon
    as PROC (the sshfan that should make it true) has exited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"sshfan exited {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


# -- files: hosts, tasks, outputs, journals -------------------------------------


def write_file(path: Path, text: str, mode: int = 0o644) -> Path:
    """Write text to path with the given mode and return the path."""
    path.write_text(text)
    path.chmod(mode)
    return path


def write_hosts_file(tmp_path: Path, text: str, name: str = "hosts.toml") -> Path:
    """Write TEXT as a hosts file in TMP_PATH and return its path."""
    path = tmp_path / name
    path.write_text(text)
    return path


def defaults_file(server: SshServer, tmp_path: Path, extra: str = "") -> Path:
    """A hosts file with only SERVER's [defaults] (user, port, key), and EXTRA after them."""
    return write_hosts_file(tmp_path, server.hosts_toml([]) + extra)


def toml_str(value: str | Path) -> str:
    """Encode a string as a TOML basic string (JSON's escapes are valid TOML)."""
    return json.dumps(str(value))


def host_block(server: SshServer, name: str, slots: int = 2, **extra: object) -> str:
    """Return a [[hosts]] table for one host on SERVER, with extra keys as given."""
    values: dict[str, object] = {
        "name": name,
        "address": server.host,
        "port": server.port,
        "user": server.user,
        "identity": str(server.client_key),
        "known_hosts": str(server.known_hosts),
        "slots": slots,
    }
    values.update(extra)
    lines = ["[[hosts]]"]
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            lines.append(f"{key} = {value!r}")
        elif isinstance(value, dict):
            inner = ", ".join(f"{k} = {toml_str(v)}" for k, v in value.items())
            lines.append(f"{key} = {{ {inner} }}")
        else:
            lines.append(f"{key} = {toml_str(str(value))}")
    return "\n".join(lines) + "\n\n"


def until_hosts_ran(seen: Path, hosts: int) -> str:
    """A shell command for the front of a task: note $SSHFAN_HOST in SEEN, then wait (a
    minute at most) until HOSTS different hosts have started a task. Tasks that must
    spread over hosts then do so however slowly those hosts connect, with no race."""
    return (
        f"echo $SSHFAN_HOST >> {seen}; i=0; "
        f"while [ $(sort -u {seen} | wc -l) -lt {hosts} ] && [ $i -lt 600 ]; "
        "do sleep 0.1; i=$((i+1)); done"
    )


def numbered_tasks(path: Path, count: int, line: str) -> Path:
    """Write COUNT tasks made from LINE with {n} replaced by the task's number (1-based)."""
    path.write_text("".join(line.format(n=n) + "\n" for n in range(1, count + 1)))
    return path


def jsonl_records(path: Path) -> list[dict[str, object]]:
    """Read a jsonl output file into records."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def journal_done(path: Path) -> dict[int, dict[str, object]]:
    """Read (without changing) a journal file: each done task's metadata by seq."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    done: dict[int, dict[str, object]] = {}
    offset = 0
    head = sshfan.FRAME_HEADER.size
    while offset + head <= len(data):
        magic, kind, length = sshfan.FRAME_HEADER.unpack_from(data, offset)
        assert magic == sshfan.FRAME_MAGIC, f"journal corrupt at byte {offset}"
        if offset + head + length > len(data):
            break  # a record still being written
        if kind == sshfan.KIND_DONE:
            start = offset + head
            (meta_len,) = sshfan.DONE_HEAD.unpack_from(data, start)
            meta_start = start + sshfan.DONE_HEAD.size
            meta = json.loads(data[meta_start : meta_start + meta_len])
            done[int(meta["seq"])] = meta
        offset += head + length
    return done


# -- GNU parallel, to compare with ------------------------------------------------


def _find_gnu_parallel() -> str | None:
    """The path of GNU parallel (not moreutils' parallel), or None."""
    path = shutil.which("parallel")
    if path is None:
        return None
    version = subprocess.run([path, "--version"], capture_output=True, timeout=30)
    return path if version.stdout.startswith(b"GNU parallel") else None


GNU_PARALLEL = _find_gnu_parallel()
# CI sets SSHFAN_REQUIRE_PARALLEL=1: there a comparison with parallel fails, never skips.
PARALLEL_REQUIRED = os.environ.get("SSHFAN_REQUIRE_PARALLEL") == "1"
needs_parallel = pytest.mark.skipif(
    GNU_PARALLEL is None and not PARALLEL_REQUIRED, reason="GNU parallel is not installed"
)


def run_parallel(
    args: list[str],
    *,
    cwd: Path | None = None,
    input: bytes | None = None,  # named as in subprocess.run
    status: int | None = 0,
) -> bytes:
    """Run GNU parallel with ARGS (no citation notice) and return its stdout; STATUS is the
    exit status it must end with (its number of failed jobs), None for any."""
    assert GNU_PARALLEL is not None, "GNU parallel is required here but not installed"
    done = subprocess.run(
        [GNU_PARALLEL, "--will-cite", *args], input=input, capture_output=True, cwd=cwd, timeout=120
    )
    if status is not None:
        assert done.returncode == status, done.stderr.decode(errors="replace")
    return done.stdout


# -- the network and processes ----------------------------------------------------


def closed_port() -> int:
    """Return a loopback TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def own_number(base: str) -> str:
    """BASE (a number such as 43.5) with this test session's pid appended: a number of
    seconds to sleep that marks a test's processes, which no other suite running on the
    same machine at the same time uses."""
    return f"{base}{os.getpid():07d}"


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


def assert_no_procs_soon(marker: str, timeout: float = 5.0) -> None:
    """Assert that within TIMEOUT seconds no process with MARKER in its argv is left."""
    deadline = time.monotonic() + timeout
    while (left := procs_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left behind after {timeout:g} s: {left}"


def kill_marked(marker: str) -> None:
    """SIGKILL leftover task processes this test started (identified by its unique marker)."""
    for pid, _argv in procs_with(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- a stand-in for the worker's python -----------------------------------------------


def capturing_python(path: Path, capture: Path, then: str) -> Path:
    """Write a stand-in for the worker's python that reads what the head sends unasked
    behind the stub's source (frames up to the first TASKS one) into CAPTURE, never says
    hello, and THEN: "fail" (exits 1, as a stub that breaks at start) or "hang" (waits
    for EOF: a host slow to say hello; it ends when the head gives it up)."""
    script = f"""#!{sys.executable} -S
import os, struct, sys
def read(n):
    data = b""
    while len(data) < n:
        more = os.read(0, n - len(data))
        if not more:
            sys.exit(0)
        data += more
    return data
_, n_source, n_code = struct.unpack(">4sII", read(12))  # the stub's header, then the stub
read(n_source + n_code)
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
