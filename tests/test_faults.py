"""Faults end to end: hosts lost, frozen or broken; the head killed or interrupted.

Each test that kills or freezes a server gets fresh ones from `sshd_factory`; a hosts
file may list several servers, each standing in for a separate machine. All the
"machines" are this one, so a task's processes are visible in /proc and a test can
check that none is left behind (tasks carry a unique number like `sleep 37.102` as
a marker for that, with the session's pid appended by `own_number`: another suite may
run the same tests on the same machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sshd import SshServer
from support import (
    LOCAL_BLOCK,
    NO_HANG,
    Head,
    RunSshfan,
    assert_no_procs_soon,
    capturing_python,
    check_exit,
    closed_port,
    early_seqs,
    err_lines,
    host_block,
    journal_done,
    jsonl_records,
    kill_marked,
    numbered_tasks,
    own_number,
    procs_with,
    run_args,
    until_hosts_ran,
    wait_for,
    write_file,
)

import sshfan

MakeServer = Callable[..., SshServer]

# Its stubs are forks of the head; with an interpreter named, they are new Pythons that
# read the stub's source, as on an SSH host.
BLOCKS = {"fork": LOCAL_BLOCK, "exec": LOCAL_BLOCK + 'python = "python3"\n'}

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def assert_each_once_in_order(records: list[dict[str, object]], seqs: list[int]) -> None:
    """Assert the records are exactly one per seq in SEQS, in seq order."""
    got = [record["seq"] for record in records]
    assert got == seqs, f"records by seq: {got}"


def sleeping(seconds: str) -> int:
    """Count live `sleep SECONDS` processes (the marker a test's tasks sleep for)."""
    return sum(1 for _pid, argv in procs_with(seconds) if argv == f"sleep {seconds} ")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Head]]:
    """Return a starter of background sshfan heads; any left running are killed at teardown."""
    heads: list[Head] = []

    def start(args: list[str], name: str = "") -> Head:
        """Start one background head with ARGS (output files called NAME.std{out,err})."""
        head = Head(args, tmp_path, name)
        heads.append(head)
        return head

    try:
        yield start
    finally:
        for head in heads:
            head.stop()


def start_marked_run(
    server: SshServer, host: str, count: int, tmp_path: Path, spawn: Callable[..., Head]
) -> tuple[Head, Path, Path, Path, Path, Path]:
    """Start COUNT numbered tasks on one 2-slot host, each noting its start in a file;
    once 4 results are journaled return the head, tasks, hosts, output, journal, notes."""
    mark = tmp_path / "started.log"
    tasks = numbered_tasks(
        tmp_path / "tasks.txt", count, f"echo {{n}} >> {mark}; sleep 0.2; echo {{n}}"
    )
    hosts = write_file(tmp_path / "hosts.toml", host_block(server, host, slots=2))
    out = tmp_path / "out.txt"
    journal = Path(str(out) + ".journal")
    head = spawn(run_args(tasks, hosts, out))
    wait_for("4 results in the journal", lambda: len(journal_done(journal)) >= 4)
    return head, tasks, hosts, out, journal, mark


def expected_numbers(count: int) -> bytes:
    """Return the text output of tasks that each print their number."""
    return "".join(f"{n}\n" for n in range(1, count + 1)).encode()


# ---------------------------------------------------------------------------
# 1, 2: a host lost or frozen in the middle of a run
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_host_lost_mid_run(
    fault: str, sshd_factory: MakeServer, spawn: Callable[..., Head], tmp_path: Path
) -> None:
    """A host killed or frozen mid-run: its tasks move to the other host; every task once."""
    alpha, bravo = sshd_factory(), sshd_factory()
    count = 40
    tasks = numbered_tasks(tmp_path / "tasks.txt", count, "sleep 0.3; echo {n}")
    hosts = write_file(
        tmp_path / "hosts.toml",
        host_block(alpha, "alpha", keepalive=1) + host_block(bravo, "bravo", keepalive=1),
    )
    out = tmp_path / "out.jsonl"
    journal = Path(str(out) + ".journal")
    head = spawn(run_args(tasks, hosts, out, "--format", "jsonl"))
    try:
        wait_for(
            "a result from alpha in the journal",
            lambda: any(m["host"] == "alpha" for m in journal_done(journal).values()),
        )
        before = len(journal_done(journal))
        assert before < count - 8, "too little work left to move to bravo; make tasks slower"
        started = time.monotonic()
        if fault == "kill":
            alpha.kill()
        else:
            alpha.freeze()
        result = head.wait(45.0)
        elapsed = time.monotonic() - started
    finally:
        alpha.thaw()
        alpha.stop()
    check_exit(result, 0)
    assert elapsed < 45.0
    records = jsonl_records(out)
    assert_each_once_in_order(records, list(range(1, count + 1)))
    for record in records:
        assert record["stdout"] == f"{record['seq']}\n", record
        assert record["exit_code"] == 0, record
        assert record["host"] in ("alpha", "bravo"), record
    assert {r["host"] for r in records} == {"alpha", "bravo"}
    lost_lines = [line for line in err_lines(result.stderr) if "lost" in line]
    assert any("alpha" in line for line in lost_lines), result.stderr.decode()
    assert not [line for line in lost_lines if "bravo" in line], lost_lines
    assert b"Traceback" not in result.stderr


def test_host_lost_mid_output_leaves_no_partial_output(
    sshd_factory: MakeServer, spawn: Callable[..., Head], tmp_path: Path
) -> None:
    """A host killed while a task streams megabytes: the task runs again on the other
    host and the merged output holds each task's output once, whole, in order."""
    alpha, bravo = sshd_factory(), sshd_factory()
    marker = own_number("61.73")  # alpha's tasks stall here, half-way through their output
    mark = tmp_path / "alpha-streaming"
    count = 6
    # bravo's tasks first wait (up to 30 s) for alpha to be streaming, so that alpha
    # gets work however the two logins race.
    wait = f"i=0; while [ ! -e {mark} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done"
    lines = [
        f"if [ $WHO = bravo ]; then {wait}; fi; seq {n}00000 {n}99999; "
        f"if [ $WHO = alpha ]; then touch {mark}; sleep {marker}; fi; seq {n}000000 {n}099999"
        for n in range(1, count + 1)
    ]
    tasks = write_file(tmp_path / "tasks.txt", "\n".join(lines) + "\n")
    hosts = write_file(
        tmp_path / "hosts.toml",
        host_block(alpha, "alpha", slots=1, keepalive=1, env={"WHO": "alpha"})
        + host_block(bravo, "bravo", slots=1, keepalive=1, env={"WHO": "bravo"}),
    )
    out = tmp_path / "out.txt"
    head = spawn(run_args(tasks, hosts, out))
    try:
        wait_for("alpha streaming a task's output", mark.exists)
        alpha.kill()
        result = head.wait(45.0)
        assert_no_procs_soon(f"sleep {marker}")
    finally:
        kill_marked(f"sleep {marker}")
        alpha.stop()
    check_exit(result, 0)
    expected = b"".join(
        "".join(f"{i}\n" for i in range(n * 100000, n * 100000 + 100000)).encode()
        + "".join(f"{i}\n" for i in range(n * 1000000, n * 1000000 + 100000)).encode()
        for n in range(1, count + 1)
    )
    assert out.read_bytes() == expected
    assert b"lost host alpha" in result.stderr


# ---------------------------------------------------------------------------
# 3: hosts failing at start
# ---------------------------------------------------------------------------


def new_key(path: Path) -> Path:
    """Generate an ed25519 key pair at path (private) and path.pub; return path."""
    subprocess.run(
        ["ssh-keygen", "-t", "ed25519", "-N", "", "-q", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path


def broken_hosts(server: SshServer, tmp_path: Path) -> dict[str, tuple[str, list[str]]]:
    """Return host blocks that each fail at start, with words their warning must contain."""
    other = new_key(tmp_path / "other_key")
    key_type, key_b64 = other.with_name("other_key.pub").read_text().split()[:2]
    wrong_known = write_file(
        tmp_path / "wrong_known_hosts", f"[127.0.0.1]:{server.port} {key_type} {key_b64}\n"
    )
    empty_known = write_file(tmp_path / "empty_known_hosts", "")
    old_python = write_file(
        tmp_path / "old-python",
        "#!/bin/sh\n"
        "echo '  File \"<string>\", line 1' >&2\n"
        "echo '    import sys;exec(compile(sys.stdin.buffer.read(9)))' >&2\n"
        "echo 'SyntaxError: invalid syntax' >&2\n"
        "exit 1\n",
        0o755,
    )
    dead_port = closed_port()
    return {
        "closedport": (
            host_block(server, "closedport", port=dead_port, connect_timeout=5),
            ["connect"],
        ),
        "wrongkey": (host_block(server, "wrongkey", identity=str(other)), ["auth"]),
        "keymismatch": (
            host_block(server, "keymismatch", known_hosts=str(wrong_known)),
            ["host key"],
        ),
        "unknownhost": (
            host_block(server, "unknownhost", known_hosts=str(empty_known)),
            ["host key", "ssh-keyscan"],
        ),
        "nopython": (
            host_block(server, "nopython", python="/nonexistent/python3"),
            ["/nonexistent/python3", "not found"],
        ),
        "oldpython": (host_block(server, "oldpython", python=str(old_python)), ["too old"]),
        "falsepython": (host_block(server, "falsepython", python="/bin/false"), ["bootstrap"]),
    }


def gated_tasks(path: Path, count: int, stderr: Path, warnings: int) -> Path:
    """Write COUNT tasks printing their number; task 1 first waits for WARNINGS warning lines.

    The run cannot end before every broken host has been reported, however slow the
    machine (the wait gives up after 30 s, and the test then fails on the count).
    """
    gate = (
        f"for i in $(seq 300); do [ $(grep -c warning {stderr}) -ge {warnings} ] && break; "
        "sleep 0.1; done"
    )
    lines = [f"{gate}; echo 1"] + [f"echo {n}" for n in range(2, count + 1)]
    path.write_text("\n".join(lines) + "\n")
    return path


def warning_lines(stderr: bytes, name: str) -> list[str]:
    """Return the warning lines on stderr that name host NAME."""
    return [
        line
        for line in err_lines(stderr)
        if "warning" in line.lower() and name in line.replace(":", " ").split()
    ]


def test_hosts_failing_at_start_are_skipped(
    sshd: SshServer, spawn: Callable[..., Head], tmp_path: Path
) -> None:
    """Each host that cannot start is skipped with one warning naming it and why; run succeeds."""
    broken = broken_hosts(sshd, tmp_path)
    text = "".join(block for block, _words in broken.values()) + host_block(sshd, "good", slots=1)
    hosts = write_file(tmp_path / "hosts.toml", text)
    count = 6
    tasks = gated_tasks(tmp_path / "tasks.txt", count, tmp_path / "head.stderr", len(broken))
    out = tmp_path / "out.jsonl"
    result = spawn(run_args(tasks, hosts, out, "--format", "jsonl"), "head").wait()
    check_exit(result, 0)
    records = jsonl_records(out)
    assert_each_once_in_order(records, list(range(1, count + 1)))
    assert {r["host"] for r in records} == {"good"}
    assert [r["stdout"] for r in records] == [f"{n}\n" for n in range(1, count + 1)]
    for name, (_block, words) in broken.items():
        lines = warning_lines(result.stderr, name)
        assert len(lines) == 1, f"{name}: expected one warning line, got {lines}"
        for word in words:
            assert word in lines[0], f"{name}: {word!r} not in {lines[0]!r}"
    assert not warning_lines(result.stderr, "good")
    assert b"Traceback" not in result.stderr


def test_missing_workdir_fails_that_host_naming_it(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A workdir that does not exist on the worker: that host fails with a line naming
    the directory (stage "workdir", not a stub traceback's text); the other goes on."""
    missing = tmp_path / "no-such-dir"
    # "fine" starts only once the stub on "nowhere" has exited: the run cannot end first.
    gone = tmp_path / "nowhere-exited"
    first = write_file(tmp_path / "first-python", f'#!/bin/sh\npython3 "$@"\ntouch {gone}\n', 0o755)
    wait = f"for i in $(seq 300); do [ -e {gone} ] && break; sleep 0.05; done"
    then = write_file(tmp_path / "then-python", f'#!/bin/sh\n{wait}\nexec python3 "$@"\n', 0o755)
    hosts = write_file(
        tmp_path / "hosts.toml",
        host_block(sshd, "nowhere", workdir=str(missing), python=str(first))
        + host_block(sshd, "fine", python=str(then)),
    )
    count = 6
    tasks = numbered_tasks(tmp_path / "tasks.txt", count, "echo {n}")
    out = tmp_path / "out.txt"
    result = run_sshfan(run_args(tasks, hosts, out), timeout=NO_HANG)
    check_exit(result, 0)
    assert out.read_bytes() == expected_numbers(count)
    lines = [line for line in err_lines(result.stderr) if "warning" in line and "nowhere" in line]
    assert lines and f"workdir: {missing} does not exist" in lines[0], result.stderr.decode()
    assert b"Error" not in result.stderr, result.stderr.decode()


def test_all_hosts_failing_exits_3(sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """When no host can start the run exits 3 quickly, giving each host's reason; journal kept."""
    broken = broken_hosts(sshd, tmp_path)
    hosts = write_file(tmp_path / "hosts.toml", "".join(b for b, _w in broken.values()))
    marker = tmp_path / "ran"
    tasks = write_file(tmp_path / "tasks.txt", f"touch {marker}\necho two\n")
    out = tmp_path / "out.txt"
    started = time.monotonic()
    result = run_sshfan(run_args(tasks, hosts, out), timeout=NO_HANG)
    assert time.monotonic() - started < 30.0
    check_exit(result, 3)
    for name, (_block, words) in broken.items():
        lines = warning_lines(result.stderr, name)
        assert len(lines) == 1, f"{name}: expected one warning line, got {lines}"
        for word in words:
            assert word in lines[0], f"{name}: {word!r} not in {lines[0]!r}"
    # Nothing ran: the advice is to fix the hosts and run again, not to --resume.
    assert b"run the command again" in result.stderr
    assert b"--resume" not in result.stderr
    assert b"Traceback" not in result.stderr
    assert Path(str(out) + ".journal").exists()
    assert not marker.exists()


def test_frozen_host_at_start_is_skipped(
    sshd: SshServer, sshd_factory: MakeServer, spawn: Callable[..., Head], tmp_path: Path
) -> None:
    """A host that accepts TCP but never answers SSH is skipped after connect_timeout."""
    frozen = sshd_factory()
    frozen.freeze()
    try:
        hosts = write_file(
            tmp_path / "hosts.toml",
            host_block(frozen, "frozen", connect_timeout=2) + host_block(sshd, "good", slots=1),
        )
        count = 4
        tasks = gated_tasks(tmp_path / "tasks.txt", count, tmp_path / "head.stderr", 1)
        out = tmp_path / "out.txt"
        result = spawn(run_args(tasks, hosts, out), "head").wait()
    finally:
        frozen.thaw()
    check_exit(result, 0)
    assert out.read_bytes() == expected_numbers(count)
    lines = warning_lines(result.stderr, "frozen")
    assert len(lines) == 1 and "connect" in lines[0], lines


def test_host_still_starting_when_run_ends_is_reported(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A host whose start fails only after the run is done is still named on stderr."""
    slow = write_file(
        tmp_path / "slow-missing-python",
        "#!/bin/sh\nsleep 3\necho 'python3: not found' >&2\nexit 127\n",
        0o755,
    )
    hosts = write_file(
        tmp_path / "hosts.toml",
        host_block(sshd, "good", slots=1) + host_block(sshd, "slowstart", python=str(slow)),
    )
    tasks = write_file(tmp_path / "tasks.txt", "echo quick\n")
    out = tmp_path / "out.txt"
    result = run_sshfan(run_args(tasks, hosts, out), timeout=NO_HANG)
    check_exit(result, 0)
    assert out.read_bytes() == b"quick\n"
    # Skipped with a warning, or at least listed in the summary: never silently dropped,
    # and never shown as a healthy host (it did not start).
    lines = [
        line for line in err_lines(result.stderr) if "slowstart" in line.replace(":", " ").split()
    ]
    assert lines, result.stderr.decode(errors="replace")
    assert not [line for line in lines if line.rstrip().endswith(" ok")], lines


# ---------------------------------------------------------------------------
# 4: the head killed, then --resume
# ---------------------------------------------------------------------------


def test_head_killed_then_resume(
    sshd_factory: MakeServer,
    spawn: Callable[..., Head],
    run_sshfan: RunSshfan,
    tmp_path: Path,
) -> None:
    """After SIGKILL of the head, --resume runs only what was not journaled; output complete."""
    server = sshd_factory()
    count = 30
    started = start_marked_run(server, "solo", count, tmp_path, spawn)
    head, tasks, hosts, out, journal, mark = started
    head.proc.kill()
    head.wait()
    journaled = set(journal_done(journal))
    assert 4 <= len(journaled) < count, journaled
    assert_no_procs_soon(str(mark))

    # Resuming against another tasks file is refused, and leaves the journal alone.
    other = numbered_tasks(tmp_path / "other.txt", count, "echo other {n}")
    before = journal.read_bytes()
    refused = run_sshfan(run_args(other, hosts, out, "--resume"), timeout=NO_HANG)
    check_exit(refused, 2)
    lines = err_lines(refused.stderr)
    assert len(lines) == 1 and "journal" in lines[0], lines
    assert journal.read_bytes() == before
    assert b"other" not in mark.read_bytes()

    # So is resuming after the tasks file itself was edited.
    original = tasks.read_bytes()
    tasks.write_bytes(original + b"echo added\n")
    refused = run_sshfan(run_args(tasks, hosts, out, "--resume"), timeout=NO_HANG)
    check_exit(refused, 2)
    assert "journal" in " ".join(err_lines(refused.stderr))
    assert journal.read_bytes() == before
    tasks.write_bytes(original)

    result = run_sshfan(run_args(tasks, hosts, out, "--resume"), timeout=NO_HANG)
    check_exit(result, 0)
    assert out.read_bytes() == expected_numbers(count)
    runs = Counter(int(line) for line in mark.read_text().split())
    assert set(runs) == set(range(1, count + 1))
    for n in journaled:
        assert runs[n] == 1, f"task {n} was journaled before the kill but ran {runs[n]} times"
    assert max(runs.values()) <= 2, runs
    assert set(journal_done(journal)) == set(range(1, count + 1))

    # Resuming a finished run runs nothing and renders the same output.
    marks = mark.read_bytes()
    again = run_sshfan(run_args(tasks, hosts, out, "--resume"), timeout=NO_HANG)
    check_exit(again, 0)
    assert out.read_bytes() == expected_numbers(count)
    assert mark.read_bytes() == marks


def test_all_hosts_lost_then_resume_elsewhere(
    sshd_factory: MakeServer,
    spawn: Callable[..., Head],
    run_sshfan: RunSshfan,
    tmp_path: Path,
) -> None:
    """The only host dies: exit 3, journal kept; --resume on another host finishes the rest."""
    first = sshd_factory()
    count = 20
    started = start_marked_run(first, "doomed", count, tmp_path, spawn)
    head, tasks, hosts, out, journal, mark = started
    first.kill()
    result = head.wait(30.0)
    check_exit(result, 3)
    lines = err_lines(result.stderr)
    assert any("lost" in line and "doomed" in line for line in lines), lines
    assert b"--resume" in result.stderr
    assert b"Traceback" not in result.stderr
    journaled = set(journal_done(journal))
    assert 4 <= len(journaled) < count

    second = sshd_factory()
    other_hosts = write_file(tmp_path / "hosts2.toml", host_block(second, "spare", slots=2))
    resumed = run_sshfan(run_args(tasks, other_hosts, out, "--resume"), timeout=NO_HANG)
    check_exit(resumed, 0)
    assert out.read_bytes() == expected_numbers(count)
    runs = Counter(int(line) for line in mark.read_text().split())
    assert set(runs) == set(range(1, count + 1))
    assert all(runs[n] == 1 for n in journaled), runs


def test_torn_journal_record_is_rerun(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """A journal whose last record was torn (head killed mid-write): --resume reruns that task."""
    count = 6
    mark = tmp_path / "started.log"
    tasks = numbered_tasks(tmp_path / "tasks.txt", count, f"echo {{n}} >> {mark}; echo {{n}}")
    hosts = write_file(tmp_path / "hosts.toml", LOCAL_BLOCK)
    out = tmp_path / "out.txt"
    journal = Path(str(out) + ".journal")
    check_exit(run_sshfan(run_args(tasks, hosts, out), timeout=NO_HANG), 0)
    done = journal_done(journal)
    assert set(done) == set(range(1, count + 1))
    last = list(done)[-1]  # the DONE record nearest the end of the file
    with open(journal, "r+b") as handle:
        handle.truncate(journal.stat().st_size - 3)
    assert last not in journal_done(journal)
    out.unlink()
    result = run_sshfan(run_args(tasks, hosts, out, "--resume"), timeout=NO_HANG)
    check_exit(result, 0)
    assert out.read_bytes() == expected_numbers(count)
    runs = Counter(int(line) for line in mark.read_text().split())
    assert runs == Counter({n: 2 if n == last else 1 for n in range(1, count + 1)}), runs


# ---------------------------------------------------------------------------
# 5: SIGINT / SIGTERM to the head
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "where"),
    [
        (signal.SIGINT, "ssh"),
        (signal.SIGTERM, "ssh"),
        (signal.SIGINT, "exec"),
        (signal.SIGINT, "fork"),
    ],
    ids=["SIGINT-ssh", "SIGTERM-ssh", "SIGINT-exec", "SIGINT-fork"],
)
def test_interrupted_head_kills_tasks_then_resumes(
    signum: int,
    where: str,
    sshd_factory: MakeServer,
    spawn: Callable[..., Head],
    run_sshfan: RunSshfan,
    tmp_path: Path,
) -> None:
    """SIGINT/SIGTERM: exit 130 naming --resume, running tasks killed; --resume finishes."""
    # A number unique per case, to find the task processes.
    sleeper = own_number(f"37.{100 + signum}{['ssh', 'exec', 'fork'].index(where)}")
    go = tmp_path / "go"
    mark = tmp_path / "started.log"
    quick = [f"echo {n} >> {mark}; echo {n}" for n in range(1, 5)]
    slow = [
        f"echo {n} >> {mark}; if [ -e {go} ]; then echo {n}; else sleep {sleeper}; fi"
        for n in range(5, 9)
    ]
    tasks = write_file(tmp_path / "tasks.txt", "\n".join(quick + slow) + "\n")
    block = host_block(sshd_factory(), "solo", slots=2) if where == "ssh" else BLOCKS[where]
    hosts = write_file(tmp_path / "hosts.toml", block)
    out = tmp_path / "out.txt"
    journal = Path(str(out) + ".journal")
    head = spawn(run_args(tasks, hosts, out))
    try:
        wait_for("two sleeping tasks", lambda: sleeping(sleeper) >= 2)
        wait_for("the quick tasks in the journal", lambda: len(journal_done(journal)) >= 4)
        head.signal(signum)
        result = head.wait(30.0)
        check_exit(result, 130)
        assert b"--resume" in result.stderr
        assert b"Traceback" not in result.stderr
        assert_no_procs_soon(sleeper)
    finally:
        kill_marked(f"sleep {sleeper}")
    assert set(journal_done(journal)) == {1, 2, 3, 4}

    go.touch()
    resumed = run_sshfan(run_args(tasks, hosts, out, "--resume"), timeout=NO_HANG)
    check_exit(resumed, 0)
    assert out.read_bytes() == expected_numbers(8)
    runs = Counter(int(line) for line in mark.read_text().split())
    assert all(runs[n] == 1 for n in range(1, 5)), runs


def test_ctrl_c_to_the_whole_group_is_the_heads_to_handle(
    spawn: Callable[..., Head], tmp_path: Path
) -> None:
    """SIGINT to the head's whole process group, as a terminal's Ctrl-C sends it, with the
    local host's forked stubs in that group: exit 130, tasks killed, and no stub reported
    lost (they used to die of it themselves: "lost one of its 4 stubs")."""
    sleeper = own_number("37.9")
    hosts = write_file(tmp_path / "hosts.toml", BLOCKS["fork"].replace("slots = 2", "slots = 4"))
    tasks = write_file(tmp_path / "tasks.txt", f"sleep {sleeper}\n" * 6)
    head = spawn(run_args(tasks, hosts, tmp_path / "out.txt"))
    try:
        wait_for("four sleeping tasks", lambda: sleeping(sleeper) >= 4)
        os.killpg(head.proc.pid, signal.SIGINT)
        result = head.wait(30.0)
        check_exit(result, 130)
        assert b"lost one of its" not in result.stderr, result.stderr
        assert b"(lost " not in result.stderr, result.stderr  # the summary's host row
        assert b"Traceback" not in result.stderr
        assert_no_procs_soon(sleeper)
    finally:
        kill_marked(f"sleep {sleeper}")


# ---------------------------------------------------------------------------
# 6: no orphans
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["ssh", "exec", "fork"])
def test_head_killed_leaves_no_orphans(
    where: str, sshd_factory: MakeServer, spawn: Callable[..., Head], tmp_path: Path
) -> None:
    """After SIGKILL of the head, every task process (children too) is gone within 5 s."""
    sleeper = own_number({"ssh": "41.5", "exec": "41.6", "fork": "41.8"}[where])
    block = host_block(sshd_factory(), "solo", slots=2) if where == "ssh" else BLOCKS[where]
    hosts = write_file(tmp_path / "hosts.toml", block)
    line = f"sh -c 'sleep {sleeper}; echo x' ; sleep {sleeper}"
    tasks = write_file(tmp_path / "tasks.txt", f"{line}\n{line}\n{line}\n")
    head = spawn(run_args(tasks, hosts, tmp_path / "out.txt"))
    try:
        # Each running task is its shell, the inner sh and that sh's sleep.
        wait_for("two running tasks", lambda: sleeping(sleeper) >= 2)
        head.proc.kill()
        head.wait()
        assert_no_procs_soon(sleeper)
    finally:
        kill_marked(f"sleep {sleeper}")


@pytest.mark.parametrize("where", ["exec", "fork"])
def test_head_and_local_stubs_killed_as_a_group_leave_no_task_behind(
    where: str, spawn: Callable[..., Head], tmp_path: Path
) -> None:
    """SIGKILL to the head's whole process group (local stubs included, as a CI job
    timeout sends it): the stubs' wardens still kill every task."""
    sleeper = own_number("41.7" if where == "exec" else "41.9")
    hosts = write_file(tmp_path / "hosts.toml", BLOCKS[where])
    line = f"sh -c 'sleep {sleeper}; echo x' ; sleep {sleeper}"
    tasks = write_file(tmp_path / "tasks.txt", f"{line}\n{line}\n{line}\n")
    head = spawn(run_args(tasks, hosts, tmp_path / "out.txt"))
    try:
        wait_for("two running tasks", lambda: sleeping(sleeper) >= 2)
        head.stop()  # os.killpg(head's group, SIGKILL)
        assert_no_procs_soon(sleeper)
    finally:
        kill_marked(f"sleep {sleeper}")


@pytest.mark.parametrize("where", ["ssh", "exec", "fork"])
def test_a_stub_killed_outright_leaves_no_task_behind(
    where: str, sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """SIGKILL a stub while its task runs a child: the stub cannot clean up, so its
    warden kills the task's process group; the task reruns on the other host (or
    stub), the run ends 0, and no task process, stub or warden is left."""
    sleeper = own_number({"ssh": "43.5", "exec": "43.6", "fork": "43.7"}[where])
    flag = tmp_path / "killed-once"
    python = tmp_path / "bin" / "python3"  # this test's own name for Python (see below)
    python.parent.mkdir()
    python.symlink_to(Path(sys.executable).resolve())
    if where == "ssh":
        blocks = host_block(sshd, "one", slots=1, python=str(python))
        blocks += host_block(sshd, "two", slots=1, python=str(python))
    elif where == "exec":
        blocks = LOCAL_BLOCK + f"python = {json.dumps(str(python))}\n"  # 2 slots: two stubs
    else:
        blocks = BLOCKS["fork"]
    hosts = write_file(tmp_path / "hosts.toml", blocks)
    killer = (
        f"test -e {flag} || {{ touch {flag}; sleep {sleeper} & sleep 0.3; "
        f"kill -9 $PPID; sleep {sleeper}; }}; echo ok"
    )
    lines = ["echo 1", killer, "echo 3", "echo 4"]
    tasks = write_file(tmp_path / "tasks.txt", "\n".join(lines) + "\n")
    out = tmp_path / "out.txt"
    # This run's stubs and wardens, told apart by their command line from the stubs of
    # other runs on this machine (another test suite's, started at any moment): an exec'd
    # stub's names this test's Python; a forked one's is the head's, which names TASKS.
    marker = str(tasks) if where == "fork" else str(python)
    try:
        result = run_sshfan(run_args(tasks, hosts, out), timeout=NO_HANG)
        check_exit(result, 0)
        assert flag.exists(), "the killer task ran"
        assert out.read_text().split() == ["1", "ok", "3", "4"]
        assert_no_procs_soon(sleeper)
        # This run's stubs and their wardens are gone too.
        deadline = time.monotonic() + 5.0
        while (left := procs_with(marker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"stubs or wardens left behind: {left}"
    finally:
        kill_marked(f"sleep {sleeper}")


@pytest.mark.parametrize("where", ["ssh", "exec", "fork"])
def test_timeout_kills_task_and_children(
    where: str, sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """--timeout 1: the task is recorded timed out, exit 1, and none of its processes remain."""
    sleeper = own_number({"ssh": "42.5", "exec": "42.6", "fork": "42.7"}[where])
    block = host_block(sshd, "solo", slots=2) if where == "ssh" else BLOCKS[where]
    hosts = write_file(tmp_path / "hosts.toml", block)
    tasks = write_file(
        tmp_path / "tasks.txt", f"echo before\nsh -c 'sleep {sleeper}; echo x'; sleep {sleeper}\n"
    )
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    try:
        result = run_sshfan(
            run_args(tasks, hosts, out, "--format", "jsonl", "--timeout", "1"), timeout=NO_HANG
        )
        elapsed = time.monotonic() - started
        assert_no_procs_soon(sleeper)
    finally:
        kill_marked(f"sleep {sleeper}")
    check_exit(result, 1)
    assert elapsed < 20.0
    first, second = jsonl_records(out)
    assert (first["seq"], first["stdout"], first["timed_out"]) == (1, "before\n", False)
    assert second["seq"] == 2
    assert second["timed_out"] is True
    # Killed by a signal: exit_code is 128 + the signal's number, as the contract says.
    assert second.get("signal") in (signal.SIGKILL, signal.SIGTERM), second
    assert second["exit_code"] == 128 + int(second["signal"]), second  # type: ignore[call-overload]
    assert second["stdout"] == ""
    assert 0.9 <= float(second["duration_s"]) < 10.0  # type: ignore[arg-type]


@pytest.mark.parametrize("where", ["ssh", "local"])
def test_timeout_kills_children_outside_the_process_group(
    where: str, sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """GNU timeout moves itself to a group of its own, setsid to a session of its own;
    both still hold the task's pipes. Each timed-out task is killed with all of them and
    counts as one timed-out task (the stub used to crash on it, on every host, forever)."""
    mark = own_number("44.5" if where == "ssh" else "44.6")
    block = host_block(sshd, "solo", slots=3) if where == "ssh" else LOCAL_BLOCK
    hosts = write_file(tmp_path / "hosts.toml", block)
    lines = [
        "echo before",
        f"timeout 60 sleep {mark}1",
        f"setsid sleep {mark}2",
        f"sh -c 'setsid sleep {mark}3 & sleep {mark}4'",
        "echo after",
    ]
    tasks = write_file(tmp_path / "tasks.txt", "\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    try:
        result = run_sshfan(
            run_args(tasks, hosts, out, "--format", "jsonl", "--timeout", "1"), timeout=NO_HANG
        )
        assert_no_procs_soon(f"sleep {mark}")
    finally:
        kill_marked(f"sleep {mark}")
    check_exit(result, 1)
    records = jsonl_records(out)
    assert_each_once_in_order(records, [1, 2, 3, 4, 5])
    assert [r["timed_out"] for r in records] == [False, True, True, True, False]
    assert (records[0]["stdout"], records[4]["stdout"]) == ("before\n", "after\n")
    assert all(r["attempts"] == 1 for r in records), records
    assert b"3 timed out" in result.stderr, result.stderr.decode()
    assert b"warning" not in result.stderr and b"Traceback" not in result.stderr


# ---------------------------------------------------------------------------
# 7: --retries
# ---------------------------------------------------------------------------


def test_retry_succeeds_second_time(sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """A task failing once then succeeding, with --retries 2 (two tries, as GNU
    parallel counts): exit 0 and attempts 2."""
    flag = tmp_path / "failed-once"
    hosts = write_file(tmp_path / "hosts.toml", host_block(sshd, "solo", slots=1))
    tasks = write_file(
        tmp_path / "tasks.txt",
        f"echo first\ntest -e {flag} || {{ touch {flag}; exit 1; }}; echo ok\n",
    )
    out = tmp_path / "out.jsonl"
    result = run_sshfan(run_args(tasks, hosts, out, "--format", "jsonl", "--retries", "2"))
    check_exit(result, 0)
    first, second = jsonl_records(out)
    assert (first["attempts"], first["stdout"]) == (1, "first\n")
    assert (second["seq"], second["attempts"], second["exit_code"]) == (2, 2, 0)
    assert second["stdout"] == "ok\n"


def test_retry_goes_to_another_host(sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """With two hosts, a retried task runs on the host it did not fail on."""
    flag = tmp_path / "failed-once"
    who = tmp_path / "who.log"
    hosts = write_file(
        tmp_path / "hosts.toml",
        host_block(sshd, "hosta", slots=1, env={"WHO": "hosta"})
        + host_block(sshd, "hostb", slots=1, env={"WHO": "hostb"}),
    )
    tasks = write_file(
        tmp_path / "tasks.txt",
        f'echo "$WHO" >> {who}; test -e {flag} || {{ touch {flag}; exit 1; }}; echo "$WHO"\n',
    )
    out = tmp_path / "out.jsonl"
    result = run_sshfan(run_args(tasks, hosts, out, "--format", "jsonl", "--retries", "2"))
    check_exit(result, 0)
    tries = who.read_text().split()
    assert len(tries) == 2, tries
    assert tries[0] != tries[1], f"the retry ran on the same host: {tries}"
    (record,) = jsonl_records(out)
    assert record["attempts"] == 2
    assert record["host"] == tries[1]
    assert record["stdout"] == f"{tries[1]}\n"


def test_retries_exhausted(sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """A task that always fails, with --retries 3: three attempts, its exit code kept, exit 1."""
    count = tmp_path / "tries.log"
    hosts = write_file(tmp_path / "hosts.toml", host_block(sshd, "solo", slots=1))
    tasks = write_file(tmp_path / "tasks.txt", f"echo ok\necho try >> {count}; exit 7\n")
    out = tmp_path / "out.jsonl"
    result = run_sshfan(run_args(tasks, hosts, out, "--format", "jsonl", "--retries", "3"))
    check_exit(result, 1)
    first, second = jsonl_records(out)
    assert (first["attempts"], first["exit_code"]) == (1, 0)
    assert (second["attempts"], second["exit_code"]) == (3, 7)
    assert count.read_text().split() == ["try"] * 3


def test_local_host_retries_on_its_other_stubs(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """The local host runs over several stubs that count as one host: a failed task is
    retried there (not held back for a host other than `local`), and one row reports it."""
    flag = tmp_path / "failed-once"
    parents = tmp_path / "parents.log"
    lines = [f"echo $PPID >> {parents}; sleep 0.05"] * 12
    lines.append(f"test -e {flag} || {{ touch {flag}; exit 1; }}; echo ok")
    tasks = write_file(tmp_path / "tasks.txt", "\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["run", str(tasks), "-o", str(out), "--no-progress", "-j", "2", "--format", "jsonl"]
    result = run_sshfan([*args, "--retries", "2"], timeout=NO_HANG)
    check_exit(result, 0)
    records = jsonl_records(out)
    assert [r["seq"] for r in records] == list(range(1, 14))
    assert (records[-1]["attempts"], records[-1]["stdout"]) == (2, "ok\n")
    assert {r["host"] for r in records} == {"local"}
    assert len(set(parents.read_text().split())) == 2, "two slots: two stubs"
    summary_rows = [
        line for line in result.stderr.decode().splitlines() if line.split()[:1] == ["local"]
    ]
    assert len(summary_rows) == 1, result.stderr.decode()


def test_losing_one_local_stub_is_not_losing_the_local_host(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A task kills its own stub: its lane is lost, the tasks it held run on the other
    lane, and the summary reports the local host as ok, with the lost stub noted."""
    flag = tmp_path / "killed-once"
    lines = [f"sleep 0.05; echo {n}" for n in range(1, 7)]
    lines.append(f"test -e {flag} || {{ touch {flag}; kill -9 $PPID; }}; echo 7")
    lines += [f"sleep 0.05; echo {n}" for n in range(8, 13)]
    tasks = write_file(tmp_path / "tasks.txt", "\n".join(lines) + "\n")
    out = tmp_path / "out.txt"
    result = run_sshfan(["run", str(tasks), "-o", str(out), "--no-progress", "-j", "2"])
    check_exit(result, 0)
    assert flag.exists(), "the stub was killed"
    assert out.read_text().split() == [str(n) for n in range(1, 13)]
    stderr = result.stderr.decode()
    assert "lost host local" not in stderr, stderr
    row = [line for line in stderr.splitlines() if line.split()[:1] == ["local"]]
    assert len(row) == 1 and "ok (lost 1 of its stubs" in row[0], stderr
    assert row[0].split()[3] != "0", "the lost stub's tasks are counted as lost"


def test_tasks_queued_behind_a_long_task_move_to_an_idle_stub(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """After short tasks, a long one holds the tasks queued behind it; once its host
    has gone quiet, an idle host takes them back (the long task waits to see them)."""
    marks = [tmp_path / "m1", tmp_path / "m2"]
    seen = " && ".join(f"[ -e {m} ]" for m in marks)
    lines = [f"echo q{n}" for n in range(1, 11)]
    lines.append(f"for i in $(seq 300); do {seen} && break; sleep 0.1; done; {seen} && echo saw")
    lines += [f"touch {m}" for m in marks]
    tasks = write_file(tmp_path / "tasks.txt", "\n".join(lines) + "\n")
    out = tmp_path / "out.txt"
    result = run_sshfan(["run", str(tasks), "-o", str(out), "--no-progress", "-j", "2"])
    check_exit(result, 0)
    assert out.read_text().split() == [f"q{n}" for n in range(1, 11)] + ["saw"]


# ---------------------------------------------------------------------------
# 8: protocol damage
# ---------------------------------------------------------------------------

JUNK = {
    "bad-magic": b"this is not a frame\n",
    # A well-formed header announcing a RESULT far over the frame size cap.
    "oversized": sshfan.FRAME_HEADER.pack(sshfan.FRAME_MAGIC, sshfan.KIND_RESULT, 0xFFFFFFF0),
}


def corrupter(path: Path, junk: bytes) -> Path:
    """Write a `python` for a host that runs the real one but injects JUNK into its output."""
    # The junk goes in after the third write (hello, pong, then results): between frames.
    script = f"""#!/bin/sh
python3 "$@" | python3 -c '
import os
reads = 0
while True:
    data = os.read(0, 65536)
    if not data:
        break
    os.write(1, data)
    reads += 1
    if reads == 3:
        os.write(1, bytes.fromhex("{junk.hex()}"))
'
"""
    return write_file(path, script, 0o755)


def test_login_banner_is_skipped(sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """Text printed before the stub starts (like a login banner) does not disturb the run."""
    python = write_file(
        tmp_path / "banner-python",
        '#!/bin/sh\necho "Welcome to the banner host"\nprintf "motd \\245SF\\n"\n'
        'exec python3 "$@"\n',
        0o755,
    )
    hosts = write_file(tmp_path / "hosts.toml", host_block(sshd, "banner", python=str(python)))
    count = 10
    tasks = numbered_tasks(tmp_path / "tasks.txt", count, "echo {n}")
    out = tmp_path / "out.txt"
    result = run_sshfan(run_args(tasks, hosts, out), timeout=NO_HANG)
    check_exit(result, 0)
    assert out.read_bytes() == expected_numbers(count)


@pytest.mark.parametrize("junk", list(JUNK))
def test_corrupt_stream_fails_host_over_to_healthy_one(
    junk: str, sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """Junk in the middle of a host's frames: that host fails with "protocol", work moves on."""
    python = corrupter(tmp_path / "corrupt-python", JUNK[junk])
    hosts = write_file(
        tmp_path / "hosts.toml",
        host_block(sshd, "broken", python=str(python)) + host_block(sshd, "healthy"),
    )
    count = 20
    tasks = numbered_tasks(tmp_path / "tasks.txt", count, "sleep 0.1; echo {n}")
    out = tmp_path / "out.jsonl"
    result = run_sshfan(run_args(tasks, hosts, out, "--format", "jsonl"), timeout=NO_HANG)
    check_exit(result, 0)
    records = jsonl_records(out)
    assert_each_once_in_order(records, list(range(1, count + 1)))
    assert [r["stdout"] for r in records] == [f"{n}\n" for n in range(1, count + 1)]
    broken = [line for line in err_lines(result.stderr) if "broken" in line and "lost" in line]
    assert broken, result.stderr.decode()
    assert any("protocol" in line for line in broken), broken


@pytest.mark.parametrize("junk", list(JUNK))
def test_corrupt_stream_without_healthy_host_exits_3(
    junk: str, sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """Junk in the only host's frames: exit 3 with a protocol message, never a hang."""
    python = corrupter(tmp_path / "corrupt-python", JUNK[junk])
    hosts = write_file(tmp_path / "hosts.toml", host_block(sshd, "broken", python=str(python)))
    tasks = numbered_tasks(tmp_path / "tasks.txt", 20, "sleep 0.1; echo {n}")
    out = tmp_path / "out.txt"
    started = time.monotonic()
    result = run_sshfan(run_args(tasks, hosts, out), timeout=NO_HANG)
    assert time.monotonic() - started < 30.0
    check_exit(result, 3)
    lines = [line for line in err_lines(result.stderr) if "broken" in line]
    assert any("protocol" in line for line in lines), result.stderr.decode()
    assert b"--resume" in result.stderr
    assert b"Traceback" not in result.stderr


def test_stub_killed_on_one_host(sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """A task that SIGKILLs its stub loses that host; its tasks finish on the other one."""
    hosts = write_file(
        tmp_path / "hosts.toml",
        host_block(sshd, "victim", slots=2, env={"WHO": "victim"})
        + host_block(sshd, "survivor", slots=2, env={"WHO": "survivor"}),
    )
    lock = tmp_path / "stub-killed"
    count = 20
    # A task's parent is the stub: the first task to run on the victim kills its stub.
    # Tasks first wait until both hosts have started one, so the victim gets work however
    # the two logins race.
    gate = until_hosts_ran(tmp_path / "seen", 2)
    killer = f'if [ "$WHO" = victim ] && mkdir {lock} 2>/dev/null; then kill -9 $PPID; fi'
    tasks = numbered_tasks(tmp_path / "tasks.txt", count, f"{gate}; {killer}; echo {{n}}")
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    result = run_sshfan(run_args(tasks, hosts, out, "--format", "jsonl"), timeout=NO_HANG)
    assert time.monotonic() - started < 30.0
    assert lock.is_dir(), "no task ran on the victim host; the test proved nothing"
    check_exit(result, 0)
    records = jsonl_records(out)
    assert_each_once_in_order(records, list(range(1, count + 1)))
    assert [r["stdout"] for r in records] == [f"{n}\n" for n in range(1, count + 1)]
    lost = [line for line in err_lines(result.stderr) if "lost" in line and "victim" in line]
    assert lost, result.stderr.decode(errors="replace")
    assert b"Traceback" not in result.stderr


def test_stub_killed_everywhere_exits_3(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A task that kills every stub it runs under: all hosts lost, exit 3, no hang, clear lines."""
    hosts = write_file(
        tmp_path / "hosts.toml", host_block(sshd, "first", slots=1) + host_block(sshd, "second")
    )
    tasks = write_file(tmp_path / "tasks.txt", "echo fine\nkill -9 $PPID; sleep 0.3\necho end\n")
    out = tmp_path / "out.txt"
    started = time.monotonic()
    result = run_sshfan(run_args(tasks, hosts, out, "--retries", "0"), timeout=NO_HANG)
    assert time.monotonic() - started < 30.0
    check_exit(result, 3)
    lines = err_lines(result.stderr)
    for name in ("first", "second"):
        assert any("lost" in line and name in line for line in lines), (name, lines)
    assert b"--resume" in result.stderr
    assert b"Traceback" not in result.stderr
    assert 2 not in journal_done(Path(str(out) + ".journal"))


def test_a_host_whose_run_ends_while_it_connects_gives_up_at_once() -> None:
    """The run ending (finish) while a host is still connecting must not leave that host
    waiting for a hello it will never read: it used to hold the end of the run for the
    whole 30 s hello wait when the cancel of its opener was swallowed by wait_for."""
    import asyncio

    async def scenario() -> str:
        """Open a local stub, end the run during the connect; open() must end well inside
        the 30 s hello wait (wait_for raises TimeoutError otherwise)."""
        spec = sshfan.HostSpec(name="local", local=True, python=sys.executable, slots=1)
        session = sshfan.HostSession(spec, None)
        opening = asyncio.ensure_future(session.open(sshfan.Pacing()))
        await asyncio.sleep(0)  # open() is now starting the stub process
        session.finish()
        with pytest.raises(sshfan.HostError, match="the run ended"):
            await asyncio.wait_for(opening, 20)
        return session.state.value

    assert asyncio.run(scenario()) == "abandoned"


# ---------------------------------------------------------------------------
# tasks sent ahead of the hello (send_early)
# ---------------------------------------------------------------------------


def test_tasks_sent_before_a_failed_hello_run_elsewhere_exactly_once(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A host gets its CONFIG and first tasks behind the stub's source, before its hello;
    when its stub then fails, those tasks run on the other host, once each, first tries."""
    capture = tmp_path / "sent-to-bad"
    python = capturing_python(tmp_path / "failing-python", capture, "fail")
    hosts = write_file(
        tmp_path / "hosts.toml",
        host_block(sshd, "bad", slots=2, python=str(python)) + host_block(sshd, "good", slots=2),
    )
    count = 20
    tasks = numbered_tasks(tmp_path / "tasks.txt", count, "echo {n}")
    out = tmp_path / "out.jsonl"
    result = run_sshfan(run_args(tasks, hosts, out, "--format", "jsonl"), timeout=NO_HANG)
    check_exit(result, 0)
    sent_early = early_seqs(capture)
    assert sent_early, "no task went to the host before its hello"
    records = jsonl_records(out)
    assert_each_once_in_order(records, list(range(1, count + 1)))
    assert [r["stdout"] for r in records] == [f"{n}\n" for n in range(1, count + 1)]
    assert {r["host"] for r in records} == {"good"}
    assert {r["attempts"] for r in records} == {1}  # a host failing at start is no failed try
    lines = warning_lines(result.stderr, "bad")
    assert len(lines) == 1 and "bootstrap" in lines[0], lines
    assert f"{count} of {count} tasks done" in result.stderr.decode()


def test_a_host_slow_to_say_hello_is_given_up_when_the_run_waits_on_it(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A host holding tasks sent ahead of its hello, with no hello coming, is given up once
    the other host idles with nothing left to do: its tasks run there, once each. Its hello
    wait is 600 s (connect_timeout 300): only the give-up ends the run within NO_HANG."""
    capture = tmp_path / "sent-to-slow"
    python = capturing_python(tmp_path / "silent-python", capture, "hang")
    hosts = write_file(
        tmp_path / "hosts.toml",
        host_block(sshd, "slow", slots=1, python=str(python), connect_timeout=300)
        + host_block(sshd, "good", slots=1),
    )
    count = 6
    # Every task waits until the slow host holds its first tasks: the good host cannot
    # finish the run before the slow one has something the run would wait on.
    gate = f"for i in $(seq 600); do [ -e {capture} ] && break; sleep 0.05; done"
    tasks = numbered_tasks(tmp_path / "tasks.txt", count, gate + "; echo {n}")
    out = tmp_path / "out.jsonl"
    result = run_sshfan(run_args(tasks, hosts, out, "--format", "jsonl"), timeout=NO_HANG)
    check_exit(result, 0)
    sent_early = early_seqs(capture)
    assert sent_early, "no task went to the slow host before its hello"
    records = jsonl_records(out)
    assert_each_once_in_order(records, list(range(1, count + 1)))
    assert [r["stdout"] for r in records] == [f"{n}\n" for n in range(1, count + 1)]
    assert {r["host"] for r in records} == {"good"}
    assert {r["attempts"] for r in records} == {1}
    lines = warning_lines(result.stderr, "slow")
    assert len(lines) == 1 and "no hello" in lines[0], lines
    assert f"{count} of {count} tasks done" in result.stderr.decode()
    assert_no_procs_soon(str(python))


def test_a_retry_line_says_whether_the_task_timed_out_or_failed(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """With --retries, the line for a task tried again says why: timed out, or failed with
    its exit status (a timed-out task's status is the kill's, which says nothing)."""
    tasks = write_file(tmp_path / "tasks.txt", "sleep 30\nexit 3\n")
    out = tmp_path / "out.txt"
    result = run_sshfan(
        ["run", str(tasks), "-o", str(out), "--timeout", "0.5", "--retries", "2"], timeout=NO_HANG
    )
    check_exit(result, 1)
    lines = err_lines(result.stderr)
    assert any(line.startswith("sshfan: task 1 timed out on ") for line in lines), lines
    assert any(line.startswith("sshfan: task 2 failed (exit 3) on ") for line in lines), lines
