"""Workers that send what the head did not ask for, or stop answering: each is a protocol
or liveness failure of that host, never a task dropped from a run that ends 0.

The misbehaving worker is `fake_worker.py`, run as a local host's `python`; the healthy
host next to it is a real local stub (or, for the frozen stub, a real sshd)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sshd import SshServer
from support import (
    NO_HANG,
    RunSshfan,
    assert_no_procs_soon,
    check_exit,
    err_lines,
    host_block,
    journal_done,
    jsonl_records,
    kill_marked,
    numbered_tasks,
    own_number,
    run_args,
    sshfan_argv,
    sshfan_env,
    wait_for,
    write_file,
)

FAKE = Path(__file__).resolve().parent / "fake_worker.py"

# mode -> words the "lost host" warning must contain
MODES = {
    "cancelled": "reported cancelled",
    "timed-out": "reported timed out",
    "unknown-flags": "unknown flags",
    "duplicate": "second one",
    "result-unknown-seq": "not given",
    "output-unknown-seq": "not given",
    "output-bad-stream": "on stream 3",
    "hello-twice": "second hello",
    "pong-unasked": "pong for no ping",
    "dropped-unasked": "DROPPED without a DROP",
    "unknown-kind": "kind 99",
    "ping-from-stub": "kind 5",
    "error": "boom",
    "stall-mid-frame": "no answer from the stub",
}


def fake_host(tmp_path: Path, mode: str) -> str:
    """A [[hosts]] table for a local host whose `python` is the fake worker in MODE."""
    wrapper = write_file(
        tmp_path / f"fake-{mode}",
        f'#!/bin/sh\nexec {sys.executable} {FAKE} {mode} {tmp_path / "fake-ready"} "$@"\n',
        0o755,
    )
    return (
        f'[[hosts]]\nname = "fake"\nlocal = true\nslots = 1\nkeepalive = 3\n'
        f'python = "{wrapper}"\n\n'
    )


HEALTHY = '[[hosts]]\nname = "healthy"\nlocal = true\nslots = 1\n\n'


def gated_tasks(tmp_path: Path, count: int) -> Path:
    """COUNT tasks printing their number, each first waiting (10 s at most) for the fake
    worker to be configured: the healthy host cannot finish them all before it is."""
    ready = tmp_path / "fake-ready"
    wait = f"for i in $(seq 200); do [ -e {ready} ] && break; sleep 0.05; done"
    return numbered_tasks(tmp_path / "tasks.txt", count, wait + "; echo {n}")


@pytest.mark.parametrize("mode", list(MODES))
def test_unasked_frame_fails_the_host_and_its_tasks_run_elsewhere(
    mode: str, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """Each unrequested frame fails the fake host; the run ends 0, complete and exact."""
    hosts = write_file(tmp_path / "hosts.toml", fake_host(tmp_path, mode) + HEALTHY)
    count = 8
    tasks = gated_tasks(tmp_path, count)
    out = tmp_path / "out.jsonl"
    result = run_sshfan(run_args(tasks, hosts, out, "--format", "jsonl"), timeout=NO_HANG)
    check_exit(result, 0)
    records = jsonl_records(out)
    assert [r["seq"] for r in records] == list(range(1, count + 1))
    assert [r["stdout"] for r in records] == [f"{n}\n" for n in range(1, count + 1)]
    assert all(r["exit_code"] == 0 and not r["timed_out"] for r in records), records
    lost = [line for line in err_lines(result.stderr) if "lost host fake" in line]
    assert len(lost) == 1 and MODES[mode] in lost[0], result.stderr.decode()
    assert b"\x1b" not in result.stderr, "worker text must be printed escaped"
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("mode", ["cancelled", "timed-out"])
def test_unasked_frame_from_the_only_host_exits_3(
    mode: str, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """Alone, the misbehaving host leaves the run incomplete: exit 3, never 0 with a task
    missing; the task it misreported is not in the journal, so --resume reruns it."""
    hosts = write_file(tmp_path / "hosts.toml", fake_host(tmp_path, mode))
    tasks = numbered_tasks(tmp_path / "tasks.txt", 4, "echo {n}")
    out = tmp_path / "out.txt"
    result = run_sshfan(run_args(tasks, hosts, out), timeout=NO_HANG)
    check_exit(result, 3)
    assert any("lost host fake" in line for line in err_lines(result.stderr))
    assert 1 not in journal_done(Path(str(out) + ".journal"))
    assert b"--resume" in result.stderr


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stub_pid_of(pids: Path) -> int:
    """The first pid a task wrote (its $PPID: the stub that started it)."""
    return int(pids.read_text().split()[0])


def test_frozen_stub_under_a_healthy_sshd_is_lost(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """SIGSTOP one host's stub while its sshd stays healthy (SSH keepalives still answered):
    within about `keepalive` s the head gives the host up; its tasks finish on the other;
    and the head wakes the stopped stub (SIGCONT) so that it sees EOF and exits."""
    pids = tmp_path / "alpha-stub.pid"
    hosts = write_file(
        tmp_path / "hosts.toml",
        host_block(sshd, "alpha", slots=1, keepalive=3, env={"WHO": "alpha"})
        + host_block(sshd, "bravo", slots=1, keepalive=3, env={"WHO": "bravo"}),
    )
    count = 24
    line = f'[ "$WHO" = alpha ] && echo $PPID >> {pids}; sleep 0.25; echo {{n}}'
    tasks = numbered_tasks(tmp_path / "tasks.txt", count, line)
    out = tmp_path / "out.jsonl"
    head = subprocess.Popen(
        sshfan_argv(*run_args(tasks, hosts, out, "--format", "jsonl")),
        cwd=tmp_path,
        env=sshfan_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    stub = 0
    try:
        wait_for("a task on alpha", lambda: pids.exists() and pids.read_text().strip())
        stub = stub_pid_of(pids)
        os.kill(stub, signal.SIGSTOP)
        _, stderr = head.communicate(timeout=NO_HANG)
        wait_for("the frozen stub to be woken and exit", lambda: not alive(stub), timeout=15.0)
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        if stub:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stub, signal.SIGKILL)
                os.kill(stub, signal.SIGCONT)
    assert head.returncode == 0, stderr.decode(errors="replace")
    records = jsonl_records(out)
    assert [r["stdout"] for r in records] == [f"{n}\n" for n in range(1, count + 1)]
    lost = [line for line in err_lines(stderr) if "lost host alpha" in line]
    assert lost and "no answer from the stub" in lost[0], stderr.decode()
    assert not [line for line in err_lines(stderr) if "lost host bravo" in line]
    assert_no_procs_soon(f"{pids}")


def test_a_task_longer_than_keepalive_on_a_healthy_stub_is_not_lost(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A stub busy with a silent task for twice `keepalive` still answers the head's pings."""
    hosts = write_file(tmp_path / "hosts.toml", host_block(sshd, "solo", slots=1, keepalive=3))
    long = own_number("4.5")  # seconds: longer than keepalive, and this test's marker
    tasks = write_file(tmp_path / "tasks.txt", f"sleep {long}; echo long\necho short\n")
    out = tmp_path / "out.jsonl"
    try:
        result = run_sshfan(run_args(tasks, hosts, out, "--format", "jsonl"), timeout=NO_HANG)
    finally:
        kill_marked(f"sleep {long}")
    check_exit(result, 0)
    assert [r["stdout"] for r in jsonl_records(out)] == ["long\n", "short\n"]
    assert b"warning" not in result.stderr, result.stderr.decode()
    assert json.loads(out.read_text().splitlines()[0])["attempts"] == 1


def test_a_host_failing_right_after_its_last_result_still_completes_the_run(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """The result before the bad frame is journaled and counts: a one-task run whose only
    host sends that result twice ends complete (exit 0, output exact), the host reported."""
    hosts = write_file(tmp_path / "hosts.toml", fake_host(tmp_path, "duplicate"))
    tasks = write_file(tmp_path / "tasks.txt", "echo only\n")
    out = tmp_path / "out.txt"
    result = run_sshfan(run_args(tasks, hosts, out), timeout=NO_HANG)
    check_exit(result, 0)
    assert out.read_bytes() == b"only\n"
    assert any("lost host fake" in line for line in err_lines(result.stderr))


def frames_to_ready_session(frames: list[bytes], asked_drop: bool = False) -> tuple[str, str]:
    """Feed FRAMES to a ready HostSession holding tasks 1 and 2 (no transport, no run);
    return its state and error reason."""
    import asyncio

    import sshfan

    async def scenario() -> tuple[str, str]:
        """Drive the session by hand, as its transport would."""
        session = sshfan.HostSession(sshfan.HostSpec(name="w", local=True), None)
        session.hello = {"proto": sshfan.PROTO_VERSION}
        session.protocol.move(sshfan.HostState.READY)
        for seq in (1, 2):
            session.in_flight[seq] = sshfan.Task(seq, f"echo {seq}")
        if asked_drop:
            session.drop_queued()
        session.on_data(b"".join(frames))
        return session.state.value, session.error.reason if session.error else ""

    return asyncio.run(scenario())


def test_frames_the_head_asked_for_keep_the_host() -> None:
    """The control case: a DROPPED answering a DROP, naming held tasks, is accepted."""
    from sshfan import KIND_DROPPED, encode_frame

    state, reason = frames_to_ready_session([encode_frame(KIND_DROPPED, b"[2]")], asked_drop=True)
    assert (state, reason) == ("ready", "")


@pytest.mark.parametrize(
    ("payload", "asked", "words"),
    [
        (b"[2]", False, "without a DROP"),
        (b"[7]", True, "task 7 it does not hold"),
        (b"[2, 2]", True, "bad list"),
        (b'{"a": 1}', True, "bad list"),
    ],
)
def test_unasked_dropped_fails_the_host(payload: bytes, asked: bool, words: str) -> None:
    """DROPPED without a DROP, or naming tasks never sent (or twice), is a protocol error."""
    from sshfan import KIND_DROPPED, encode_frame

    state, reason = frames_to_ready_session([encode_frame(KIND_DROPPED, payload)], asked)
    assert state == "lost" and words in reason, reason


def test_printable_escapes_control_characters_only() -> None:
    """Worker text is shown with its control characters escaped, the rest untouched."""
    import sshfan

    text = "ok é ✓ \x1b[2J\tbell\x07\r\n\u202e\x9b"
    assert sshfan._printable(text) == "ok é ✓ \\x1b[2J\\tbell\\x07\\r\\n\\u202e\\x9b"
    assert sshfan._printable("plain text") == "plain text"


def test_check_prints_a_workers_error_escaped(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """`sshfan check` shows a worker's error text with its escape sequences defused."""
    hosts = write_file(tmp_path / "hosts.toml", fake_host(tmp_path, "error"))
    result = run_sshfan(["check", "--hosts", str(hosts)], timeout=NO_HANG)
    assert result.returncode == 1, result.stderr.decode()
    assert b"\x1b" not in result.stdout + result.stderr
    assert b"boom \\x1b[31mred" in result.stdout, result.stdout.decode()
