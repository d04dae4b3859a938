"""What the performance work promises beyond speed: lazy imports, longest-first ordering
that keeps the output in seq order, and speculative copies that leave one result.

No timing is asserted here: the figures live in docs/performance.md, from tests/bench.py."""

from __future__ import annotations

import array
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd import SshServer, _generate_key
from support import RunSshfan, procs_with, write_hosts_file

import sshfan
from sshfan import (
    FLAG_CANCELLED,
    INPUT_HEAD,
    KIND_CANCEL,
    KIND_TASKS,
    DurationHistory,
    HostLoad,
    HostWindow,
    Scheduler,
    Task,
    Template,
    _Run,
    copy_pays,
    encode_tasks,
    end_share,
    is_slow,
    known_long_tasks,
    lanes,
    local_host,
    sheds,
)


def imported_modules(stderr: bytes) -> set[str]:
    """The module names a run listed with PYTHONPROFILEIMPORTTIME (python -X importtime)."""
    names = set()
    for line in stderr.decode(errors="replace").splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_local_run_imports_no_asyncssh_tqdm(tmp_path: Path, run_sshfan: RunSshfan) -> None:
    """A run on the local host never imports asyncssh (SSH only), tqdm (no terminal) nor a
    TOML parser (no hosts file)."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo one\necho two\n")
    done = run_sshfan(
        ["run", str(tasks), "-o", str(tmp_path / "out.txt")],
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert (tmp_path / "out.txt").read_bytes() == b"one\ntwo\n"
    modules = imported_modules(done.stderr)
    assert "asyncio" in modules  # the import listing was captured
    assert not {m for m in modules if m.split(".")[0] in ("asyncssh", "tqdm", "tomllib", "tomli")}


def test_asyncssh_import_runs_no_compiler_or_linker(tmp_path: Path) -> None:
    """Importing asyncssh for an SSH run looks its optional libraries up in the ld.so cache
    only: no gcc or ld is run (ctypes.util.find_library alone would run both for a library
    the cache lacks, as it does here for one that does not exist)."""
    calls = tmp_path / "calls"
    for tool in ("gcc", "cc", "ld"):
        script = tmp_path / tool
        script.write_text(f"#!/bin/sh\necho {tool} >> {calls}\nexit 1\n")
        script.chmod(0o755)
    probe = (
        "import ctypes.util, os, sys, sshfan\n"
        "ctypes.util.find_library('sshfan-no-such-library')\n"
        "print(os.path.exists(sys.argv[1]))\n"
        "os.unlink(sys.argv[1])\n"
        "sshfan._import_asyncssh()\n"
        "print(os.path.exists(sys.argv[1]), 'asyncssh' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["PATH"] = f"{tmp_path}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(Path(sshfan.__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", probe, str(calls)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False", "True"], done.stdout


def test_asyncssh_import_leaves_out_x509_and_keeps_it_importable(tmp_path: Path) -> None:
    """An SSH run's asyncssh comes without X.509 certificate support (OpenSSH has none; it
    is the largest part of asyncssh's import), offers OpenSSH's key types as before, and
    leaves nothing behind that would refuse a later import of asyncssh's X.509 module."""
    probe = (
        "import sys, sshfan\n"
        "sshfan._import_asyncssh()\n"
        "import asyncssh, asyncssh.public_key as pk\n"
        "print('cryptography.x509' in sys.modules, pk._x509_available)\n"
        "print('ssh-ed25519' in [a.decode() for a in pk.get_public_key_algs()])\n"
        "print('asyncssh.crypto.x509' in sys.modules)\n"  # no None left to refuse an import
    )
    env = dict(os.environ, PYTHONPATH=str(Path(sshfan.__file__).parent))
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "True", "False"], done.stdout


@pytest.mark.parametrize("where", ["default", "hosts file"])
def test_default_local_host_forks_its_stub(
    where: str, tmp_path: Path, run_sshfan: RunSshfan
) -> None:
    """The default local host's stub is a fork of the head (no second Python start-up),
    still a process between the head and the task; a local host whose hosts file names
    its `python` still starts that interpreter, with the stub's source."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("tr '\\0' ' ' < /proc/$PPID/cmdline\n")  # the stub's command line
    out = tmp_path / "out.txt"
    args = ["run", str(tasks), "-o", str(out)]
    if where == "hosts file":
        hosts = tmp_path / "hosts.toml"
        hosts.write_text('[[hosts]]\nname = "here"\nlocal = true\npython = "python3"\n')
        args += ["--hosts", str(hosts)]
    done = run_sshfan(args)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    stub = out.read_text()
    if where == "default":
        assert stub.endswith(f"-m sshfan {' '.join(args)} "), stub
    else:
        assert " -S -c " in stub and "sshfan-stub" in stub, stub


def test_forked_stub_catches_no_signal_of_the_program_that_forked_it() -> None:
    """A program using sshfan may catch a signal (SIGUSR1 here): a forked local stub does
    not run that program's handler, as an exec'd one would not; the signals it catches
    are its own (SIGTERM, SIGHUP and SIGCHLD; SIGINT, a terminal's, it leaves to the head).

    The program is a fresh Python: a local stub is forked only by a one-thread process,
    and the test runner may have threads of its own (pytest-xdist's workers do)."""
    program = r"""if True:
        import asyncio, signal, sys, sshfan
        signal.signal(signal.SIGUSR1, lambda signum, frame: None)
        host = sshfan.HostSpec(name="local", local=True, python=sys.executable, slots=1)
        command = "grep SigCgt /proc/$PPID/status; tr '\\0' ' ' < /proc/$PPID/cmdline"

        async def main():
            return [r async for r in sshfan.run_tasks_async([command], [host])]

        [result] = asyncio.run(main())
        sys.stdout.buffer.write(result.stdout)
    """
    ran = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        cwd=Path(sshfan.__file__).parent,
        timeout=60,
        check=True,
    )
    caught_line, argv = ran.stdout.decode().split("\n", 1)  # (argv: the program, lines)
    mask = int(caught_line.split()[1], 16)
    # (Not the C library's own, outside valid_signals: glibc catches 32 and 33 for threads.)
    caught = {n for n in signal.valid_signals() if mask >> (n - 1) & 1}
    assert "sshfan-stub" not in argv, "the stub was exec'd, not forked: nothing tested"
    assert caught == {signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD}, caught


# -- longest first (LPT) from the duration history ------------------------------------


def tasks_of(seqs: range) -> Iterator[Task]:
    """Fresh tasks numbered as SEQS, as read_tasks would stream them."""
    return (Task(seq, f"echo {seq}") for seq in seqs)


def test_scheduler_hands_known_long_tasks_first_one_per_free_slot() -> None:
    """Known-long tasks go first, at most one per free slot; the file's other tasks follow
    in order and the pulled ones are not handed out twice."""
    longest = [Task(9, "echo 9", long=True), Task(4, "echo 4", long=True)]
    scheduler = Scheduler(tasks_of(range(1, 11)), longest=longest)
    first = scheduler.take("a", 5, long_room=1)  # one free slot: one long task and no more
    assert [t.seq for t in first] == [9]
    second = scheduler.take("b", 5, long_room=2)  # the other long one, then short ones
    assert [t.seq for t in second] == [4, 1, 2, 3, 5]
    rest = scheduler.take("c", 100, long_room=2)
    assert [t.seq for t in rest] == [6, 7, 8, 10]
    assert scheduler.exhausted() and not scheduler.has_work()
    assert scheduler.drawn == 10


def test_scheduler_keeps_long_tasks_while_no_slot_is_free() -> None:
    """With no room for a long task, a host gets the file's tasks; the long one waits."""
    scheduler = Scheduler(tasks_of(range(1, 4)), longest=[Task(3, "echo 3", long=True)])
    assert [t.seq for t in scheduler.take("a", 2, long_room=0)] == [1, 2]
    assert scheduler.has_work() and scheduler.left_over() is None
    assert [t.seq for t in scheduler.take("a", 2, long_room=0)] == []  # 3 is pulled out
    assert scheduler.left_over() == 1 and not scheduler.exhausted()
    assert [t.seq for t in scheduler.take("a", 2, long_room=1)] == [3]
    assert scheduler.exhausted()


def test_history_round_trip_forgets_tasks_that_ran_short(tmp_path: Path) -> None:
    """Long tasks are remembered by their text; one that ran short since is forgotten."""
    path = tmp_path / "cache" / "durations"
    first = DurationHistory(path)
    first.load()
    for n in range(20):
        first.record(f"short {n}", 0.01)
    first.record("long a", 1.5)
    first.record("long b", 0.9)
    first.save(0.01)
    second = DurationHistory(path)
    second.load()
    assert set(second.known) == {second.key("long a"), second.key("long b")}
    assert second.known[second.key("long a")] == pytest.approx(1.5)
    second.record("long a", 0.01)  # no longer long
    second.save(0.01)
    third = DurationHistory(path)
    third.load()
    assert set(third.known) == {third.key("long b")}


def test_history_a_command_that_also_ran_short_is_not_long(tmp_path: Path) -> None:
    """One command run many times, a few of them long (on a slow host): it is not long,
    or every later run would hand all its copies out as long tasks."""
    path = tmp_path / "durations"
    history = DurationHistory(path)
    history.load()
    for _ in range(10):
        history.record("same", 0.3)
    history.record("same", 1.2)
    history.record("once", 1.2)
    history.save(0.3)
    again = DurationHistory(path)
    again.load()
    assert set(again.known) == {again.key("once")}


def test_history_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """However many long tasks runs see, the file keeps the MAX most recent."""
    monkeypatch.setattr(DurationHistory, "MAX", 10)
    monkeypatch.setattr(DurationHistory, "PER_RUN", 6)
    path = tmp_path / "durations"
    for run in range(4):
        history = DurationHistory(path)
        history.load()
        for n in range(8):
            history.record(f"run {run} task {n}", 1.0 + n)
        history.save(0.01)
    history = DurationHistory(path)
    history.load()
    assert len(history.known) == 10
    assert path.stat().st_size == len(DurationHistory.MAGIC) + 10 * DurationHistory.RECORD.size
    latest = {history.key(f"run 3 task {n}") for n in range(2, 8)}  # the run's 6 longest
    assert latest <= set(history.known)


def test_history_ignores_a_bad_file(tmp_path: Path) -> None:
    """A damaged history is no history (a cache), never an error."""
    path = tmp_path / "durations"
    path.write_bytes(DurationHistory.MAGIC + b"\x01\x02\x03")
    history = DurationHistory(path)
    history.load()
    assert history.known == {}


def test_known_long_tasks_skips_done_and_blank_lines(tmp_path: Path) -> None:
    """The pass over the file finds known tasks (rendered with --command), longest first,
    leaving out blank lines and tasks already journaled."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("a\n\nb\nc\nd\n")
    history = DurationHistory(None)
    for name, seconds in (("a", 2.0), ("b", 1.0), ("d", 3.0)):
        history.known[history.key(f"run {name}")] = seconds
    done = array.array("q", [-1] * 6)
    done[5] = 0  # d is done already
    found = known_long_tasks(tasks, done, history, Template("run {}"))
    assert [(t.seq, t.command, t.long) for t in found] == [(1, "run a", True), (3, "run b", True)]


def test_second_run_starts_the_long_task_first(tmp_path: Path, run_sshfan: RunSshfan) -> None:
    """On the second run of a list, its long task (last in the file) starts first on the
    one slot, and the output is still exact and in the file's order."""
    started = tmp_path / "started.txt"
    lines = [f"echo {n} >> {started}; echo out {n}" for n in range(1, 6)]
    lines.append(f"echo 6 >> {started}; sleep 0.3; echo out 6")
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.txt"
    expected = b"".join(b"out %d\n" % n for n in range(1, 7))
    for _ in range(2):
        started.write_text("")
        done = run_sshfan(["run", str(tasks), "-o", str(out), "--slots", "1"])
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        assert out.read_bytes() == expected
    assert started.read_text().split() == ["6", "1", "2", "3", "4", "5"]
    # --halt-on-error keeps the file's order, as GNU parallel's --halt does
    started.write_text("")
    done = run_sshfan(["run", str(tasks), "-o", str(out), "--slots", "1", "--halt-on-error"])
    assert done.returncode == 0 and out.read_bytes() == expected
    assert started.read_text().split() == ["1", "2", "3", "4", "5", "6"]


# -- the end of the run: a slow host's last tasks --------------------------------------


def busy_host(now: float, typical: float = 0.3, slots: int = 2, ran: float = 0.1) -> HostLoad:
    """A host whose every slot runs a task sent RAN seconds before NOW."""
    return HostLoad(slots, typical, (now - ran,) * slots)


def test_a_host_typical_duration_is_its_recent_median_not_skewed_by_long_tasks() -> None:
    """After its long tasks (LPT hands them out first) a host's typical task is a short
    one again, while the running mean still says long; nothing finished: unknown."""
    window = HostWindow(slots=2)
    assert window.typical() is None
    for duration in (1.5, 1.5, 0.05, 0.06, 0.05):
        window.observe(duration)
    assert window.typical() == 0.06  # the middle of 0.05, 0.05, 0.06, 1.5, 1.5
    assert window.mean_task is not None and window.mean_task > 0.5
    for _ in range(5):
        window.observe(1.2)
    assert window.typical() == 1.2
    # The long tasks LPT hands out first are long anywhere: they say nothing of the host.
    lpt = HostWindow(slots=2)
    lpt.observe(1.5, known_long=True)
    lpt.observe(1.5, known_long=True)
    assert lpt.typical() is None
    lpt.observe(0.05)
    assert lpt.typical() == 0.05


def test_only_a_markedly_slower_host_is_slow() -> None:
    """Slow: SLOW_HOST times the median of the others; noise between equal hosts, and
    hosts whose speed is not known yet, are not."""
    fast = [busy_host(0.0, 0.3) for _ in range(3)]
    assert is_slow(HostLoad(2, 1.2), fast)
    assert not is_slow(HostLoad(2, 0.36), fast)
    assert not is_slow(HostLoad(2, None), fast)
    assert not is_slow(HostLoad(2, 1.2), [HostLoad(2, None)])
    assert not is_slow(HostLoad(2, 1.2), [HostLoad(2, 0.0)])  # (no division by zero)


def test_a_local_host_stub_is_never_slow_next_to_another_of_its_stubs() -> None:
    """A local host's stubs (lanes) share one machine: one whose recent tasks ran longer
    is not slow next to another; next to a host of another name it may be."""

    class Stub:
        """A session as _Run._slow sees it: a host name (hashed by identity)."""

        def __init__(self, name: str) -> None:
            """Name the host."""
            self.name = name

    lane1, lane2, other = Stub("local"), Stub("local"), Stub("h2")
    loads = {lane1: HostLoad(2, 1.2), lane2: HostLoad(2, 0.3)}
    assert not _Run._slow(lane1, loads)  # type: ignore[arg-type]
    loads[other] = HostLoad(2, 0.3)
    assert _Run._slow(lane1, loads)  # type: ignore[arg-type]


def test_a_slow_host_takes_only_the_tasks_it_would_end_first() -> None:
    """Three hosts take 0.3 s a task, one 1.2 s, 2 slots each, the fast ones busy until
    now + 0.2. Of the last 4 tasks the slow host would end none first (1.2 s against
    0.5 s); of 30, two (its slots end at 1.2 s, the fast ones' 19th-24th at 1.4 s).
    Far from the end, or for a host that is not slow, the window decides."""
    now = 100.0
    fast = [busy_host(now) for _ in range(3)]
    slow = HostLoad(2, 1.2)
    assert end_share(slow, fast, left=4, now=now, want=3) == 0
    assert end_share(slow, fast, left=30, now=now, want=3) == 2
    assert end_share(slow, fast, left=30, now=now, want=1) == 1
    assert end_share(slow, fast, left=500, now=now, want=3) == 3  # far from the end
    assert end_share(busy_host(now, slots=2, ran=0.0), fast, left=4, now=now, want=3) == 3
    assert end_share(HostLoad(2, None), fast, left=4, now=now, want=3) == 3
    assert end_share(slow, [], left=4, now=now, want=3) == 3  # no other host: it must
    # Its queue counts: a slow host already holding a queued task takes none of 30.
    queued = HostLoad(2, 1.2, (now, now, now))
    assert end_share(queued, fast, left=30, now=now, want=3) == 0
    # A task running far past its host's typical duration may run as long again: that
    # slot is not about to free, and the slow host takes what the others cannot.
    stuck = [busy_host(now, ran=60.0) for _ in range(3)]
    assert end_share(slow, stuck, left=4, now=now, want=3) == 3


def test_a_slow_host_gives_back_a_queued_task_the_others_would_end_first() -> None:
    """A 1.2 s host with both slots running (0.2 s in) and one task queued, the fast hosts
    busy until now + 0.2 and nothing left to hand out: its queued task would start at
    now + 1.0 and end at 2.2, the others end it by 0.5: it gives it back. Far from the
    end, or with nothing queued, it keeps what it holds."""
    now = 10.0
    fast = [busy_host(now) for _ in range(3)]
    holding = HostLoad(2, 1.2, (now - 0.2, now - 0.2, now - 5.0))
    assert sheds(holding, fast, left=0, now=now)
    assert not sheds(holding, fast, left=500, now=now)
    assert not sheds(HostLoad(2, 1.2, (now - 0.2, now - 0.2)), fast, left=0, now=now)
    assert not sheds(HostLoad(2, 0.3, (now - 0.2, now - 0.2, now)), fast, left=0, now=now)


def test_a_copy_pays_where_it_ends_before_the_slow_copy_is_due() -> None:
    """A task 0.2 s into a 1.2 s host's run is due in 1.0 s: a 0.3 s host's copy ends
    first. One due sooner than a copy would end, or on a host that is not slow, is left."""
    now = 50.0
    fast, slow = HostLoad(2, 0.3), HostLoad(2, 1.2)
    assert copy_pays(slow, fast, sent=now - 0.2, now=now)
    assert not copy_pays(slow, fast, sent=now - 1.0, now=now)
    assert not copy_pays(HostLoad(2, 0.33), fast, sent=now, now=now)
    assert not copy_pays(HostLoad(2, None), fast, sent=now, now=now)
    assert not copy_pays(slow, HostLoad(2, None), sent=now, now=now)


# -- --speculate: backup copies of stragglers -------------------------------------------


def test_speculate_copies_a_straggler_and_kills_the_loser(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A task stuck on a slow host is copied to the idle one: that copy's result is the
    task's one result, the slow copy is killed with its group, and the output is exact."""
    marker = f"{31 + os.getpid() % 1000 / 1000:.3f}"  # h2's tasks sleep this long
    lines = [f"sleep ${{SLOW:-0.25}}; echo out {n}" for n in range(1, 13)]
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("\n".join(lines) + "\n")
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(sshd.hosts_toml(["h1", "h2"]) + f'env = {{ SLOW = "{marker}" }}\n')
    out = tmp_path / "out.txt"
    try:
        done = run_sshfan(["run", str(tasks), "-H", str(hosts), "-o", str(out), "--speculate"])
        err = done.stderr.decode(errors="replace")
        assert done.returncode == 0, err
        assert out.read_bytes() == b"".join(b"out %d\n" % n for n in range(1, 13))
        assert "warning" not in err and "protocol" not in err, err
        assert "backup copies started, " in err, err
        started, won = re.search(r"(\d+) backup copies started, (\d+) finished first", err).groups()
        assert started == won and int(won) >= 1
        # exactly one journaled result per task, each from the fast host
        listed = run_sshfan(["results", str(out), "--format", "jsonl"])
        records = [json.loads(line) for line in listed.stdout.splitlines()]
        assert sorted(r["seq"] for r in records) == list(range(1, 13))
        assert {r["host"] for r in records} == {"h1"}
        deadline = time.monotonic() + 10
        while procs_with(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not procs_with(marker), "the losing copy was left running"
    finally:
        for pid, _argv in procs_with(marker):  # never leave a 30 s sleeper to other tests
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_speculate_with_a_slow_host_gives_one_result_a_task_and_leaves_nothing(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A host 4x slower (not stuck) is held back at the end and its late tasks copied
    where they end first: whichever copy wins, each task has one result, the output is
    exact and no copy is left running."""
    marker = f"{0.6 + os.getpid() % 1000 / 100000:.5f}"  # h2's tasks sleep this long
    lines = [f"sleep ${{SLOW:-0.15}}; echo out {n}" for n in range(1, 11)]
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("\n".join(lines) + "\n")
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(sshd.hosts_toml(["h1", "h2"]) + f'env = {{ SLOW = "{marker}" }}\n')
    out = tmp_path / "out.jsonl"
    try:
        done = run_sshfan(
            ["run", str(tasks), "-H", str(hosts), "-o", str(out), "-f", "jsonl", "--speculate"]
        )
        err = done.stderr.decode(errors="replace")
        assert done.returncode == 0, err
        assert "warning" not in err and "protocol" not in err, err
        records = [json.loads(line) for line in out.read_bytes().splitlines()]
        assert [r["seq"] for r in records] == list(range(1, 11))
        assert [r["stdout"] for r in records] == [f"out {n}\n" for n in range(1, 11)]
        # The summary says how many copies started and won, none too.
        copies = re.search(r"--speculate: (\d+) backup copies started, (\d+) finished first", err)
        assert copies, err
        assert int(copies.group(1)) >= int(copies.group(2))
        deadline = time.monotonic() + 10
        while procs_with(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not procs_with(marker), "a losing copy was left running"
    finally:
        for pid, _argv in procs_with(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_retry_that_avoids_its_host_still_runs_on_a_slow_host_held_back(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """Near the end the slow host h2 is held back (h1 would end every task first), but
    the last task's retry avoids h1, where it failed: once nothing else runs, h2 takes
    it, and the run ends instead of waiting for a result that never comes."""
    flag = tmp_path / "failed-once"
    lines = [f"sleep ${{SLOW:-0.05}}; echo out {n}" for n in range(1, 30)]
    lines.append(
        f'if [ -z "$SLOW" ] && [ ! -e {flag} ]; then touch {flag}; exit 1; fi; echo out 30'
    )
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("\n".join(lines) + "\n")
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(sshd.hosts_toml(["h1", "h2"]) + 'env = { SLOW = "0.5" }\n')
    out = tmp_path / "out.txt"
    done = run_sshfan(
        ["run", str(tasks), "-H", str(hosts), "-o", str(out), "--retries", "2"], timeout=60
    )
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 0, err
    assert out.read_bytes() == b"".join(b"out %d\n" % n for n in range(1, 31))


def test_speculate_says_so_when_no_copy_was_needed(tmp_path: Path, run_sshfan: RunSshfan) -> None:
    """With --speculate the summary says how many copies started and won, none too."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo a\necho b\n")
    done = run_sshfan(["run", str(tasks), "-o", str(tmp_path / "out.txt"), "--speculate"])
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 0, err
    assert "sshfan: --speculate: 0 backup copies started, 0 finished first" in err, err


def test_stub_cancel_kills_a_running_task_and_answers_a_queued_one(tmp_path: Path) -> None:
    """CANCEL kills a running task's whole group at once (the stub goes on serving) and
    answers for a queued one without starting it: one RESULT each, flagged CANCELLED."""
    from test_stub import StubProcess

    marker = f"{41 + os.getpid() % 1000 / 1000:.3f}"
    stub = StubProcess(slots=1)
    try:
        child = f"sleep {marker} & sleep {marker}; wait"  # a group of two processes
        tasks = [(1, child.encode(), b""), (2, b"echo never", b""), (3, b"echo three", b"")]
        stub.send(KIND_TASKS, encode_tasks(tasks))
        deadline = time.monotonic() + 10
        while len(procs_with(marker)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(procs_with(marker)) == 3  # the shell and its two sleeps
        stub.send(KIND_CANCEL, INPUT_HEAD.pack(2))  # queued: answered, never run
        stub.send(KIND_CANCEL, INPUT_HEAD.pack(1))  # running: killed with its group
        results = stub.results(3)
        assert results[2][:3] == (-9, FLAG_CANCELLED, b"")
        assert results[1][1] & FLAG_CANCELLED
        assert results[3][:3] == (0, 0, b"three\n")  # the stub went on after both
        assert not procs_with(marker)
        stub.send(KIND_CANCEL, INPUT_HEAD.pack(3))  # finished already: no second RESULT
        stub.send(KIND_TASKS, encode_tasks([(4, b"echo four", b"")]))
        assert stub.results(1) == {4: (0, 0, b"four\n", b"")}
        assert stub.close() == 0
    finally:
        for pid, _argv in procs_with(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if stub.proc.poll() is None:
            stub.proc.kill()


def test_local_lanes_no_more_than_tasks() -> None:
    """A local run starts no more stubs than it has tasks; the slots stay the host's."""
    assert [lane.slots for lane in lanes(local_host(10), tasks=1)] == [10]
    assert [lane.slots for lane in lanes(local_host(10), tasks=2)] == [5, 5]
    assert [lane.slots for lane in lanes(local_host(10), tasks=100)] == [3, 3, 2, 2]


def test_speculate_a_failed_copy_leaves_the_other_to_decide(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A copy that fails while the other still runs does not decide the task: the copy
    on h1 succeeds (later) and is its one result, whichever host had it first. (The
    other host idles long before the failing copy ends: 11 x 0.25 s against 3 s.)"""
    lines = [f"sleep 0.25; echo out {n}" for n in range(1, 12)]
    lines.append('if [ -n "$FAIL" ]; then sleep 3; exit 1; fi; sleep 4; echo out 12')
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("\n".join(lines) + "\n")
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(sshd.hosts_toml(["h1", "h2"]) + 'env = { FAIL = "yes" }\n')
    out = tmp_path / "out.jsonl"
    done = run_sshfan(
        ["run", str(tasks), "-H", str(hosts), "-o", str(out), "-f", "jsonl", "--speculate"]
    )
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 0, err
    assert "1 backup copies started" in err, err  # one copy a task, even after a failure
    records = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert [r["seq"] for r in records] == list(range(1, 13))
    assert records[-1]["host"] == "h1" and records[-1]["stdout"] == "out 12\n"


# -- the SSH receive path (sshfan's fast path for a stub's data, section 8) -----------

# Sizes around SSH packets (sshd sends 32 KiB), asyncio's 256 KiB reads, the stub's
# 256 KiB output pieces and the 2 MiB channel window.
AWKWARD_SIZES = (0, 1, 32_759, 32_768 + 13, 262_143, 262_144 + 5, 2_097_152 - 3, 3_000_017)

# sha256 of the source of the asyncssh code the fast receive path reproduces or relies
# on, for each asyncssh version it is used with: a new version goes into
# sshfan.FAST_RECEIVE_ASYNCSSH only once its receive path has been read again.
FAST_RECEIVE_SOURCES = {
    "2.24.1": "13912cb7088051369a5d1daab096fa300103a205d745d2f084a7303098fe4769",
}


def random_files(directory: Path, sizes: tuple[int, ...]) -> list[Path]:
    """Files of random (incompressible) bytes of SIZES in DIRECTORY."""
    directory.mkdir(exist_ok=True)
    files = []
    for n, size in enumerate(sizes):
        path = directory / f"r{n}.bin"
        path.write_bytes(os.urandom(size))
        files.append(path)
    return files


@pytest.fixture
def fast_receive(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """Count the packets sshfan's fast receive path takes in this process, and the
    distinct AES-GCM key sets it takes them under (a rekey makes a new one)."""
    sshfan._fast_receive_class.cache_clear()
    cls = sshfan._fast_receive_class()
    if cls is None:  # (a newer asyncssh: its receive path is asyncssh's own, tested below)
        import asyncssh

        pytest.skip(f"asyncssh {asyncssh.__version__} gets no fast receive path")
    seen: dict = {"packets": 0, "ciphers": [], "connections": []}
    take = cls._recv_channel_data

    def counted(self: object) -> bool | None:
        """The fast path, counted."""
        cipher = self._recv_encryption._cipher  # type: ignore[attr-defined]
        taken = take(self)
        if taken:
            seen["packets"] += 1
            if not any(c is cipher for c in seen["ciphers"]):
                seen["ciphers"].append(cipher)
        return taken

    monkeypatch.setattr(cls, "_recv_channel_data", counted)
    use = sshfan._use_fast_receive

    def noted(conn: object) -> None:
        """Give CONN the path, and note its class."""
        use(conn)
        seen["connections"].append(type(conn))

    monkeypatch.setattr(sshfan, "_use_fast_receive", noted)
    yield seen
    sshfan._fast_receive_class.cache_clear()


def cat_results(hosts: Path, files: list[Path]) -> dict[int, sshfan.TaskResult]:
    """Run `cat FILE` for each of FILES (and the same to stderr) through the Python API."""
    commands = [f"cat {f}; cat {f} >&2" for f in files]
    return {r.seq: r for r in sshfan.run_tasks(commands, hosts=str(hosts))}


def test_ssh_output_is_byte_exact_through_a_run(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """Random bytes of awkward sizes come out of a run over SSH byte for byte, in order,
    stdout into the output file and stderr beside it in the jsonl records."""
    files = random_files(tmp_path / "data", AWKWARD_SIZES)
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(f"cat {f}\n" for f in files))
    hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1"], slots=2))
    out = tmp_path / "out.bin"
    done = run_sshfan(["run", str(tasks), "-H", str(hosts), "-o", str(out)])
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert out.read_bytes() == b"".join(f.read_bytes() for f in files)


def test_fast_receive_takes_a_stubs_data_byte_exact(
    sshd: SshServer, tmp_path: Path, fast_receive: dict
) -> None:
    """A stub's channel data goes through sshfan's fast receive path, and every task's
    stdout and stderr arrive whole."""
    import asyncssh

    files = random_files(tmp_path / "data", AWKWARD_SIZES)
    hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1"], slots=2))
    results = cat_results(hosts, files)
    for n, path in enumerate(files, 1):
        assert results[n].ok
        assert results[n].stdout == path.read_bytes() == results[n].stderr, path
    assert fast_receive["connections"] == [sshfan._fast_receive_class()]
    assert issubclass(fast_receive["connections"][0], asyncssh.SSHClientConnection)
    # Both streams, over 32 KiB packets: most of them came the fast way.
    assert fast_receive["packets"] > 2 * sum(AWKWARD_SIZES) // 32_768 * 0.9


def test_fast_receive_crosses_rekeys(tmp_path: Path, fast_receive: dict) -> None:
    """Key exchanges the server starts every 1 MB (OpenSSH's RekeyLimit) in the middle of
    a stub's output: asyncssh's own code takes them, the fast path goes on under each new
    key, and the bytes arrive whole."""
    server = SshServer(tmp_path / "sshd", "openssh")
    server.extra_config = ["RekeyLimit 1M"]
    with server:
        files = random_files(tmp_path / "data", (6_000_011, 32_768 + 13))
        hosts = write_hosts_file(tmp_path, server.hosts_toml(["h1"]))
        results = cat_results(hosts, files)
    for n, path in enumerate(files, 1):
        assert results[n].stdout == path.read_bytes() == results[n].stderr, path
    assert len(fast_receive["ciphers"]) >= 6  # 12 MB at 1 MB a key, the last keys idle
    assert fast_receive["packets"] > 12_000_000 // 32_768 * 0.9


def test_without_fast_receive_asyncssh_receives_as_ever(
    sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an asyncssh the fast receive path was not written against, the connection
    stays asyncssh's own, and the bytes arrive whole."""
    import asyncssh

    monkeypatch.setattr(sshfan, "FAST_RECEIVE_ASYNCSSH", ())
    sshfan._fast_receive_class.cache_clear()
    kinds: list[type] = []
    use = sshfan._use_fast_receive

    def noted(conn: object) -> None:
        """Leave CONN as it is (no fast path), and note its class."""
        use(conn)
        kinds.append(type(conn))

    monkeypatch.setattr(sshfan, "_use_fast_receive", noted)
    try:
        assert sshfan._fast_receive_class() is None
        files = random_files(tmp_path / "data", AWKWARD_SIZES)
        hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1"], slots=2))
        results = cat_results(hosts, files)
    finally:
        sshfan._fast_receive_class.cache_clear()
    for n, path in enumerate(files, 1):
        assert results[n].stdout == path.read_bytes() == results[n].stderr, path
    assert kinds == [asyncssh.SSHClientConnection]


def test_fast_receive_only_with_an_asyncssh_it_knows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast receive path is built only for the asyncssh versions it was written
    against, and only when the parts it relies on are there."""
    import asyncssh
    from asyncssh.crypto.cipher import GCMCipher

    try:
        monkeypatch.setattr(asyncssh, "__version__", "2.99.0")
        sshfan._fast_receive_class.cache_clear()
        assert sshfan._fast_receive_class() is None
        monkeypatch.setattr(asyncssh, "__version__", sshfan.FAST_RECEIVE_ASYNCSSH[0])
        monkeypatch.delattr(GCMCipher, "_update_iv")
        sshfan._fast_receive_class.cache_clear()
        assert sshfan._fast_receive_class() is None
    finally:
        monkeypatch.undo()
        sshfan._fast_receive_class.cache_clear()


def source_digest(parts: list[object]) -> str:
    """sha256 over the source of PARTS (asyncssh's functions and classes), in order."""
    import hashlib
    import inspect

    digest = hashlib.sha256()
    for part in parts:
        digest.update(inspect.getsource(part).encode())  # type: ignore[arg-type]
    return digest.hexdigest()


def fast_receive_source_digest() -> str:
    """sha256 over the source of the asyncssh code the fast receive path reproduces or
    relies on (the receive path from data_received to the channel's session)."""
    from asyncssh.channel import SSHChannel
    from asyncssh.connection import SSHConnection
    from asyncssh.crypto.cipher import GCMCipher
    from asyncssh.encryption import GCMEncryption
    from asyncssh.packet import SSHPacketHandler

    parts = [
        SSHConnection.data_received,
        SSHConnection._recv_data,
        SSHConnection._recv_pkthdr,
        SSHConnection._recv_packet,
        SSHConnection._finish_recv_packet,
        SSHPacketHandler.process_packet,
        SSHChannel._process_data,
        SSHChannel._accept_data,
        SSHChannel._deliver_data,
        GCMEncryption.decrypt_header,
        GCMEncryption.decrypt_packet,
        GCMCipher.__init__,
        GCMCipher._update_iv,
        GCMCipher.verify_and_decrypt,
    ]
    return source_digest(parts)


def test_fast_receive_versions_have_the_source_it_was_written_against() -> None:
    """Each asyncssh version the fast receive path is used with is one whose receive path
    was read for it: the installed one, if listed, has exactly that source."""
    import asyncssh

    assert set(sshfan.FAST_RECEIVE_ASYNCSSH) == set(FAST_RECEIVE_SOURCES)
    if asyncssh.__version__ not in FAST_RECEIVE_SOURCES:
        pytest.skip(f"asyncssh {asyncssh.__version__} gets no fast receive path")
    assert fast_receive_source_digest() == FAST_RECEIVE_SOURCES[asyncssh.__version__]


# -- the quicker login (section 8) -------------------------------------------------

# sha256 of the source of the asyncssh code the quick login replaces or relies on, for
# each asyncssh version it is used with (as FAST_RECEIVE_SOURCES above).
QUICK_LOGIN_SOURCES = {
    "2.24.1": "87a5afd7000b883f618db914234a8da33ac19242ca60a5085958d44f685d840c",
}


def quick_login_source_digest() -> str:
    """sha256 over the source of asyncssh's client auth the quick login stands in for."""
    from asyncssh import auth
    from asyncssh.connection import SSHClientConnection, SSHConnection

    parts = [
        auth.Auth,
        auth.ClientAuth,
        auth._ClientPublicKeyAuth,
        auth._ClientNullAuth,
        auth.lookup_client_auth,
        SSHClientConnection.try_next_auth,
        SSHClientConnection.public_key_auth_requested,
        SSHConnection.send_userauth_request,
        SSHConnection._process_userauth_failure,
        SSHConnection._process_service_accept,
    ]
    return source_digest(parts)


@pytest.fixture
def login_requests(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bool]]:
    """Every auth request this process's SSH clients send: (method, signed)."""
    from asyncssh.connection import SSHConnection

    sent: list[tuple[bytes, bool]] = []
    send = SSHConnection.send_userauth_request

    async def noted(self: object, method: bytes, *args: bytes, **kwargs: object) -> None:
        """Send the request, and note it."""
        sent.append((method, kwargs.get("key") is not None))
        await send(self, method, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SSHConnection, "send_userauth_request", noted)
    return sent


def login_hosts(sshd: SshServer, tmp_path: Path, identities: list[Path]) -> Path:
    """A hosts file for one entry on SSHD logging in with IDENTITIES, in that order."""
    text = sshd.hosts_toml(["h1"], identity=[str(i) for i in identities])
    return write_hosts_file(tmp_path, text)


def test_login_signs_a_held_key_at_once(
    sshd: SshServer, tmp_path: Path, login_requests: list
) -> None:
    """A key sshfan holds goes signed in the first request, no "none" and no unsigned
    offer before it; a key the server refuses costs one request, and the next one logs in."""
    if sshfan._quick_login_parts() is None:
        import asyncssh

        pytest.skip(f"asyncssh {asyncssh.__version__} logs in its own way (tested below)")
    stranger = tmp_path / "stranger_key"
    _generate_key(stranger)
    with pytest.raises(sshfan.RunError, match="no host is left"):
        list(sshfan.run_tasks(["echo hi"], hosts=str(login_hosts(sshd, tmp_path, [stranger]))))
    refused = list(login_requests)
    login_requests.clear()
    hosts = login_hosts(sshd, tmp_path, [stranger, sshd.client_key])
    results = sshfan.run_tasks(["echo hi"], hosts=str(hosts))
    assert [r.stdout for r in results] == [b"hi\n"]
    assert login_requests == [(b"publickey", True), (b"publickey", True)]
    # A refused key, then "none" last (the server's other methods come with its reply).
    assert refused == [(b"publickey", True), (b"none", False)]


def test_without_quick_login_asyncssh_logs_in_as_ever(
    sshd: SshServer, tmp_path: Path, login_requests: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an asyncssh the quick login was not written against, the login is asyncssh's
    own ("none", then the key offered, then signed) and works."""
    monkeypatch.setattr(sshfan, "QUICK_LOGIN_ASYNCSSH", ())
    sshfan._quick_login_parts.cache_clear()
    try:
        assert sshfan._quick_login_parts() is None
        hosts = login_hosts(sshd, tmp_path, [sshd.client_key])
        results = sshfan.run_tasks(["echo hi"], hosts=str(hosts))
    finally:
        sshfan._quick_login_parts.cache_clear()
    assert [r.stdout for r in results] == [b"hi\n"]
    assert login_requests == [(b"none", False), (b"publickey", False), (b"publickey", True)]


def test_quick_login_versions_have_the_source_it_was_written_against() -> None:
    """Each asyncssh version the quick login is used with is one whose client auth was
    read for it: the installed one, if listed, has exactly that source."""
    import asyncssh

    assert set(sshfan.QUICK_LOGIN_ASYNCSSH) == set(QUICK_LOGIN_SOURCES)
    if asyncssh.__version__ not in QUICK_LOGIN_SOURCES:
        pytest.skip(f"asyncssh {asyncssh.__version__} gets no quick login")
    assert quick_login_source_digest() == QUICK_LOGIN_SOURCES[asyncssh.__version__]
