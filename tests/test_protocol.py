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
from collections.abc import Callable
from pathlib import Path

import pytest
from sshd import SshServer
from test_faults import (
    NO_HANG,
    assert_no_procs_soon,
    check_exit,
    err_lines,
    host_block,
    journal_done,
    jsonl_records,
    kill_marked,
    numbered_tasks,
    run_args,
    wait_for,
    write_file,
)

RunSshfan = Callable[..., "subprocess.CompletedProcess[bytes]"]

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


def stub_pid_of(pids: Path) -> int:
    """The first pid a task wrote (its $PPID: the stub that started it)."""
    return int(pids.read_text().split()[0])


def test_frozen_stub_under_a_healthy_sshd_is_lost(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """SIGSTOP one host's stub while its sshd stays healthy (SSH keepalives still answered):
    within about `keepalive` s the head gives the host up; its tasks finish on the other."""
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
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    head = subprocess.Popen(
        [sys.executable, "-m", "sshfan", *run_args(tasks, hosts, out, "--format", "jsonl")],
        cwd=tmp_path,
        env=env,
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
    tasks = write_file(tmp_path / "tasks.txt", "sleep 4.5; echo long\necho short\n")
    out = tmp_path / "out.jsonl"
    try:
        result = run_sshfan(run_args(tasks, hosts, out, "--format", "jsonl"), timeout=NO_HANG)
    finally:
        kill_marked("sleep 4.5")
    check_exit(result, 0)
    assert [r["stdout"] for r in jsonl_records(out)] == ["long\n", "short\n"]
    assert b"warning" not in result.stderr, result.stderr.decode()
    assert json.loads(out.read_text().splitlines()[0])["attempts"] == 1
