"""The worker stub run locally as a subprocess, started with the real bootstrap line."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sshfan
from sshfan import (
    KIND_CONFIG,
    KIND_HELLO,
    KIND_OUTPUT,
    KIND_PING,
    KIND_PONG,
    KIND_RESULT,
    KIND_TASKS,
    FrameDecoder,
    encode_frame,
    encode_tasks,
)


class StubProcess:
    """A stub subprocess driven frame by frame, as the head drives it."""

    def __init__(
        self,
        slots: int = 2,
        timeout: float | None = None,
        banner: bool = False,
        login: str = "",
        python: tuple[str, ...] = (sys.executable,),
        **config: object,
    ) -> None:
        """Start the stub with the bootstrap line (run by PYTHON), ship its source, read
        its hello, send CONFIG."""
        source = sshfan.stub_payload()
        code = sshfan.bootstrap_code()
        argv = [*python, "-c", code]
        if banner:  # a login shell that prints before python starts
            argv = ["/bin/sh", "-c", 'echo "Welcome!"; exec "$0" "$@"', *argv]
        elif login:  # what a login shell does before python starts
            argv = ["/bin/sh", "-c", login + 'exec "$0" "$@"', *argv]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.decoder = FrameDecoder()
        self.frames: list[tuple[int, bytes]] = []
        self.send_raw(source)
        kind, payload = self.expect(KIND_HELLO)
        self.hello = json.loads(payload)
        config = {"slots": slots, "timeout": timeout, "env": {}, "workdir": None, **config}
        self.send(KIND_CONFIG, sshfan.encode_config(config))

    def send_raw(self, data: bytes) -> None:
        """Write bytes to the stub's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, kind: int, payload: bytes) -> None:
        """Send one frame."""
        self.send_raw(encode_frame(kind, payload))

    def expect(self, kind: int, deadline: float = 20.0) -> tuple[int, bytes]:
        """Read frames until one of KIND arrives (others are kept in self.frames)."""
        stop = time.monotonic() + deadline
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            for index, frame in enumerate(self.frames):
                if frame[0] == kind:
                    return self.frames.pop(index)
            left = stop - time.monotonic()
            assert left > 0, f"no frame of kind {kind} in {deadline} s"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 1 << 20)
                assert data, "stub closed its stdout: " + self.stderr()
                self.frames += self.decoder.feed(data)

    def results(self, count: int) -> dict[int, tuple]:
        """Collect COUNT results with their output pieces joined, by seq."""
        pieces: dict[tuple[int, int], bytes] = {}
        got: dict[int, tuple] = {}
        while len(got) < count:
            kind, payload = self.expect(KIND_RESULT)
            for other in [f for f in self.frames if f[0] == KIND_OUTPUT]:
                self.frames.remove(other)
                seq, stream = sshfan.OUTPUT_HEAD.unpack_from(other[1])
                data = other[1][sshfan.OUTPUT_HEAD.size :]
                pieces[seq, stream] = pieces.get((seq, stream), b"") + data
            seq, status, flags, duration, out, err, _slot = sshfan.decode_result(payload)
            got[seq] = (
                status,
                flags,
                pieces.get((seq, 1), b"") + out,
                pieces.get((seq, 2), b"") + err,
            )
        return got

    def stderr(self) -> str:
        """Whatever the stub wrote on stderr so far (non-blocking)."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        os.set_blocking(fd, False)
        try:
            return (os.read(fd, 65536) or b"").decode("utf-8", "replace")
        except BlockingIOError:
            return ""

    def close(self) -> int:
        """Close stdin (EOF) and wait for the stub to exit."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(10)


@pytest.fixture
def stub() -> StubProcess:
    """A running stub with 2 slots, closed after the test."""
    process = StubProcess()
    yield process
    if process.proc.poll() is None:
        process.proc.kill()
        process.proc.wait()


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_hello_reports_python_cpus_and_hostname(stub: StubProcess) -> None:
    """The stub's first frame says who it is."""
    assert stub.hello["python"] == ".".join(map(str, sys.version_info[:3]))
    assert stub.hello["cpus"] >= 1
    assert stub.hello["hostname"]
    assert stub.close() == 0


def test_runs_tasks_with_exact_output_status_and_signals(stub: StubProcess) -> None:
    """Exit codes, signals, stdout/stderr bytes and stdin from /dev/null, as sh -c gives them."""
    tasks = [
        (1, b"printf 'a\\nb'"),
        (2, b"echo err >&2; exit 7"),
        (3, b"kill -TERM $$"),
        (4, b"cat; echo done"),
        (5, "printf '\\377\\376'; echo ü".encode()),
        (6, b"head -c 3000000 /dev/zero"),
    ]
    stub.send(KIND_TASKS, encode_tasks(tasks))
    got = stub.results(len(tasks))
    assert got[1][0] == 0 and got[1][2] == b"a\nb"
    assert got[2][0] == 7 and got[2][3] == b"err\n"
    assert got[3][0] == -15
    assert got[4][2] == b"done\n"  # cat saw EOF at once: stdin is /dev/null
    assert got[5][2] == b"\xff\xfe" + "ü\n".encode()
    assert got[6][2] == b"\x00" * 3_000_000
    assert stub.close() == 0


def test_large_outputs_of_concurrent_tasks_arrive_byte_exact() -> None:
    """Outputs spanning many pieces, on both streams and from tasks running side by side,
    come back whole and unmixed while the stub reuses its piece buffers."""
    process = StubProcess(slots=3)
    tasks = [
        (1, b"seq 1 300000; seq 5 9 >&2"),
        (2, b"seq 7 150000 >&2; echo x"),
        (3, b"echo small"),
        (4, b"seq 2 2 400000"),
    ]
    process.send(KIND_TASKS, encode_tasks(tasks))
    got = process.results(len(tasks))

    def numbers(start: int, stop: int, step: int = 1) -> bytes:
        """What `seq` prints."""
        return "".join(f"{n}\n" for n in range(start, stop + 1, step)).encode()

    assert got[1][2] == numbers(1, 300000) and got[1][3] == numbers(5, 9)
    assert got[2][3] == numbers(7, 150000) and got[2][2] == b"x\n"
    assert got[3][2] == b"small\n"
    assert got[4][2] == numbers(2, 400000, 2)
    assert process.close() == 0


def test_ping_is_answered(stub: StubProcess) -> None:
    """A PING comes back as a PONG with the same bytes."""
    stub.send(KIND_PING, b"hello?")
    assert stub.expect(KIND_PONG) == (KIND_PONG, b"hello?")
    stub.close()


def test_banner_before_the_stub_does_not_break_the_protocol() -> None:
    """Text a login shell prints before python starts is skipped by the head's decoder."""
    process = StubProcess(banner=True)
    assert process.decoder.banner.startswith(b"Welcome!")
    process.send(KIND_TASKS, encode_tasks([(1, b"echo ok")]))
    assert process.results(1)[1][2] == b"ok\n"
    assert process.close() == 0


def test_runs_at_most_slots_tasks_at_once(tmp_path: Path) -> None:
    """With 2 slots, never more than 2 tasks run at the same time."""
    process = StubProcess(slots=2)
    log = tmp_path / "log"
    line = f"echo start >> {log}; sleep 0.2; echo end >> {log}".encode()
    process.send(KIND_TASKS, encode_tasks([(seq, line) for seq in range(1, 7)]))
    process.results(6)
    running = peak = 0
    for event in log.read_text().split():
        running += 1 if event == "start" else -1
        peak = max(peak, running)
    assert peak == 2
    process.close()


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    """A task past its timeout is killed with its children and reported as timed out."""
    process = StubProcess(slots=1, timeout=0.5)
    pidfile = tmp_path / "pid"
    process.send(KIND_TASKS, encode_tasks([(1, f"sleep 30 & echo $! > {pidfile}; wait".encode())]))
    status, flags, _, _ = process.results(1)[1]
    assert flags & sshfan.FLAG_TIMED_OUT
    assert status == -9
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    process.close()


def test_eof_on_stdin_kills_running_tasks_and_exits(tmp_path: Path) -> None:
    """When the head goes away the stub kills its tasks' process groups and exits."""
    process = StubProcess(slots=2)
    pidfile = tmp_path / "pid"
    process.send(KIND_TASKS, encode_tasks([(1, f"sleep 30 & echo $! > {pidfile}; wait".encode())]))
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child = int(pidfile.read_text())
    assert _alive(child)
    process.close()
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_eof_removes_the_uploads_the_head_left_unfinished(tmp_path: Path) -> None:
    """PARTS names the files being uploaded (all of them, each time): on EOF (the head
    gone) the stub removes those still named, and only those."""
    done, cut = tmp_path / "done.part", tmp_path / "cut \n.part"
    done.write_text("renamed into place since: not the stub's to remove")
    cut.write_text("half")
    process = StubProcess(slots=1)
    process.send(sshfan.KIND_PARTS, os.fsencode(done) + b"\0" + os.fsencode(cut))
    process.send(sshfan.KIND_PARTS, os.fsencode(cut))
    process.send(KIND_PING, b"read")  # answered once the frames before it were handled
    process.expect(KIND_PONG)
    assert done.exists() and cut.exists()
    assert process.close() == 0
    assert done.exists() and not cut.exists()


def test_eof_kills_what_a_task_started_in_a_session_of_its_own(tmp_path: Path) -> None:
    """A child that left the task's session (setsid) but holds its output pipe dies too."""
    process = StubProcess(slots=1)
    pidfile = tmp_path / "pid"
    command = f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 30'; echo never"
    process.send(KIND_TASKS, encode_tasks([(1, command.encode())]))
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child = int(pidfile.read_text())
    assert _alive(child)
    assert process.close() == 0
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_corrupt_frame_from_the_head_ends_the_stub_with_an_error(stub: StubProcess) -> None:
    """The stub does not guess at garbage: it reports an ERROR frame and exits."""
    stub.send_raw(b"this is not a frame at all")
    kind, payload = stub.expect(sshfan.KIND_ERROR)
    assert b"bad magic" in payload
    assert stub.proc.wait(10) != 0


def test_tasks_get_the_default_sigpipe_and_stdin_data(stub: StubProcess) -> None:
    """The stub ignores SIGPIPE, its tasks do not (`yes | head` is quiet); stdin data arrives."""
    stub.send(KIND_TASKS, encode_tasks([(1, b"yes | head -n 1"), (2, b"wc -c", b"x" * 200_000)]))
    got = stub.results(2)
    assert got[1][0] == 0 and got[1][2] == b"y\n" and got[1][3] == b""
    assert got[2][2].strip() == b"200000"
    assert stub.close() == 0


def _pythons() -> dict[str, str]:
    """The Pythons 3.6+ this machine has (python3.N on PATH, pyenv's versions, this one),
    one of each version: the versions a stub must run on."""
    paths = [sys.executable, *(shutil.which(f"python3.{minor}") for minor in range(6, 20))]
    paths += sorted(str(p) for p in Path("~/.pyenv/versions").expanduser().glob("3.*/bin/python3"))
    found: dict[str, str] = {}
    for path in filter(None, paths):
        probe = [path, "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]
        ran = subprocess.run(probe, capture_output=True, text=True)
        if ran.returncode == 0:  # (a version manager's shim may name one it does not run)
            found.setdefault(ran.stdout.strip(), path)
    return found


def test_the_stub_runs_on_every_python_found() -> None:
    """The shipped stub, from source or compiled, on each Python 3.6+ this machine has:
    its hello, CONFIG (env, workdir, shell, timeout), a task's stdin, a timeout, only fds
    0-2 and SIGPIPE's default in a task (Pythons before 3.8 start tasks by subprocess)."""
    config = {"env": {"X_TEST": "v"}, "workdir": "/", "shell": "sh"}
    tasks = [
        (1, b"echo $X_TEST $SSHFAN_SEQ; pwd"),
        (2, b"wc -c", b"y" * 100_000),
        (3, b"sleep 30"),
        (4, b"yes | head -n 1; ls /proc/self/fd | wc -l"),
    ]
    pythons = _pythons()
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" in pythons
    for python in pythons.values():
        stub = StubProcess(slots=2, timeout=0.5, python=(python, "-S"), **config)
        try:
            assert stub.hello["proto"] == sshfan.PROTO_VERSION, python
            stub.send(KIND_TASKS, encode_tasks(tasks))
            got = stub.results(len(tasks))
            assert stub.close() == 0, python
        finally:
            stub.proc.kill()
            stub.proc.wait()
        assert got[1][2] == b"v 1\n/\n" and got[2][2].strip() == b"100000", python
        assert got[3][1] == sshfan.FLAG_TIMED_OUT, python
        assert got[4][2:4] == (b"y\n4\n", b""), (python, got[4])  # fds 0-2 and ls's


# Prints the session of the shell that runs it (field 6 of /proc/PID/stat).
SESSION_OF_SHELL = b"read -r p c s pp g sid x < /proc/$$/stat; echo $sid"


def test_tasks_get_only_fds_0_to_2_in_a_session_of_their_own() -> None:
    """A descriptor the stub inherited (its login shell opened it) does not reach its
    tasks, as none of the stub's own do; each task's shell leads a session of its own."""
    stub = StubProcess(slots=1, login="exec 7</dev/null 8>/dev/null; ")
    try:
        task = b"ls /proc/self/fd | tr '\\n' ' '; echo; " + SESSION_OF_SHELL + b" $$"
        stub.send(KIND_TASKS, encode_tasks([(1, task)]))
        status, _, out, err = stub.results(1)[1][:4]
        assert status == 0, err
        fds, session = out.split(b"\n")[:2]
        assert fds.split() == [b"0", b"1", b"2", b"3"]  # 3: ls's own listing
        sid, pid = session.split()
        assert sid == pid
        assert stub.close() == 0
    finally:
        stub.proc.kill()
        stub.proc.wait()


@pytest.mark.parametrize("epoll", [True, False])
def test_poller_reports_ready_and_hung_up_fds_by_label(epoll: bool) -> None:
    """The stub's Poller, with epoll and with poll (a worker without epoll): a readable
    pipe, a writable one, nothing when nothing is ready, and a hang-up counts as ready."""
    poller = sshfan.Poller()
    if not epoll:
        poller.epoll, poller.poll = False, select.poll()
    read, write = os.pipe()
    try:
        poller.register(read, False, "in")
        assert poller.select(0.01) == []
        poller.register(write, True, "out")
        assert poller.select(None) == [(write, "out")]
        os.write(write, b"x")
        assert sorted(poller.select(0)) == sorted([(read, "in"), (write, "out")])
        poller.unregister(write)
        os.close(write)
        write = -1
        assert os.read(read, 1) == b"x"
        assert poller.select(1.0) == [(read, "in")]  # the writer hung up
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)


@pytest.mark.parametrize("direct", [True, False])
def test_start_process_as_popen_would(direct: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """start_process with os.posix_spawn and with subprocess (Python < 3.8): the task's
    stdio as given, its own session, the exec's error raised in the caller."""
    monkeypatch.setattr(sshfan, "SPAWN_DIRECT", [direct])
    read, write = os.pipe()
    try:
        with open(os.devnull, "rb") as devnull:
            stdio = (devnull.fileno(), write, write)
            argv = [b"sh", b"-c", b"echo $SSHFAN_X; " + SESSION_OF_SHELL]
            pid = sshfan.start_process(b"/bin/sh", argv, {"SSHFAN_X": "given"}, stdio)
            with pytest.raises(FileNotFoundError):
                sshfan.start_process(b"/nonexistent/sh", argv, {}, stdio)
        os.close(write)
        write = -1
        out = b""
        while chunk := os.read(read, 4096):
            out += chunk
        assert os.waitpid(pid, 0)[1] == 0
        assert out.split() == [b"given", str(pid).encode()]
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)


def test_drop_read_with_the_tasks_before_it_still_starts_what_slots_take() -> None:
    """A rebalancing DROP arriving in the same read as TASKS starts a free slot's task and
    gives back only the rest (else head and stub can hand the same tasks back and forth)."""
    stub = StubProcess(slots=1)
    try:
        tasks = encode_frame(KIND_TASKS, encode_tasks([(n, b"echo %d" % n) for n in (1, 2, 3)]))
        stub.send_raw(tasks + encode_frame(sshfan.KIND_DROP, b""))
        _, payload = stub.expect(sshfan.KIND_DROPPED)
        assert json.loads(payload) == [2, 3]
        got = stub.results(1)
        assert got[1][0] == 0 and got[1][2] == b"1\n"
        assert stub.close() == 0
    finally:
        stub.proc.kill()
        stub.proc.wait()


def test_halting_drop_starts_nothing_more() -> None:
    """A DROP for --halt-on-error gives back every task not started, even with a free slot."""
    stub = StubProcess(slots=1)
    try:
        tasks = encode_frame(KIND_TASKS, encode_tasks([(n, b"echo %d" % n) for n in (1, 2)]))
        stub.send_raw(tasks + encode_frame(sshfan.KIND_DROP, b"halt"))
        _, payload = stub.expect(sshfan.KIND_DROPPED)
        assert json.loads(payload) == [1, 2]
        assert stub.close() == 0
        assert not [f for f in stub.frames if f[0] == KIND_RESULT]
    finally:
        stub.proc.kill()
        stub.proc.wait()


def test_frames_sent_right_behind_the_source_reach_the_stub() -> None:
    """The head may send CONFIG and tasks before the hello, in the same write as the source:
    the bootstrap must read exactly the source and leave the frames to the stub."""
    source = sshfan.stub_payload()
    code = sshfan.bootstrap_code()
    config = {"slots": 1, "timeout": None, "env": {}, "workdir": None}
    data = (
        source
        + encode_frame(KIND_CONFIG, sshfan.encode_config(config))
        + encode_frame(KIND_TASKS, encode_tasks([(1, b"echo early")]))
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code], input=data, capture_output=True, timeout=30
    )
    frames = FrameDecoder().feed(proc.stdout)
    assert [kind for kind, _ in frames][0] == KIND_HELLO
    results = [sshfan.decode_result(p) for kind, p in frames if kind == KIND_RESULT]
    # EOF right behind the task kills it, so only its arrival is certain: it was seen.
    assert [r[0] for r in results] == [1], proc.stderr.decode()
