"""Running like GNU parallel: --pipe chunks, --block sizes, --halt, where and how tasks run."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from sshd import SshServer
from support import GNU_PARALLEL, needs_parallel, run_parallel

import sshfan


def _chunk_sizes(path: Path, block: int) -> list[int]:
    """The sizes of the --pipe chunks sshfan cuts PATH into."""
    return [len(chunk) for chunk in sshfan._pipe_chunks(path, None, block)]


TRICKY_DATA = {
    "ragged": b"".join(b"x" * ((n * 37) % 41) + b"\n" for n in range(400)) + b"tail",
    "empty lines": b"\n" * 50 + b"a\n\n\nbb\n" + b"\n" * 30,
    "no trailing newline": b"one\ntwo\nthree",
    "exact blocks": b"123456789\n" * 30,
}


# Every (data, block) pair where each line fits in the block: where one does not, GNU
# parallel grows its block for the rest of the run (with a warning); sshfan does not.
FITTING = [
    (name, block)
    for name, data in sorted(TRICKY_DATA.items())
    for block in ("10", "64", "100", "1k", "0.3K")
    if max(len(line) for line in data.split(b"\n")) < sshfan._parse_size(block)
]


@pytest.mark.e2e
@needs_parallel
@pytest.mark.parametrize(("name", "block"), FITTING)
def test_pipe_chunks_end_where_gnu_parallels_do(tmp_path: Path, name: str, block: str) -> None:
    """Where every line fits in the block, the chunks are GNU parallel's, byte for byte."""
    data = TRICKY_DATA[name]
    path = tmp_path / "data"
    path.write_bytes(data)
    theirs = run_parallel(
        ["--pipe", "--block", block, "-k", "cat; echo ==="], cwd=tmp_path, input=data
    )
    ours = b"".join(
        chunk + b"===\n" for chunk in sshfan._pipe_chunks(path, None, sshfan._parse_size(block))
    )
    assert ours == theirs


def test_a_line_longer_than_the_block_goes_whole(tmp_path: Path) -> None:
    """A record is never split: a 31-byte line with --block 10 is one chunk of its own."""
    path = tmp_path / "data"
    path.write_bytes(b"a" * 30 + b"\nbb\ncc\n\n\n" + b"d" * 13 + b"\neeee")
    assert _chunk_sizes(path, 10) == [31, 8, 14, 4]
    assert b"".join(sshfan._pipe_chunks(path, None, 10)) == path.read_bytes()
    path.write_bytes(b"z" * 100)  # no line end at all: the whole file is one record
    assert _chunk_sizes(path, 7) == [100]


@needs_parallel
def test_block_sizes_read_as_gnu_parallel_reads_them(tmp_path: Path, run_sshfan) -> None:
    """1k is 1000 and 1K 1024, fractions count; inf, 0 and 2G get one line and exit 2."""
    assert [sshfan._parse_size(t) for t in ("1k", "1K", "3.1k", "1.5", "10M", "1g")] == [
        1000,
        1024,
        3100,
        1,
        10 * 1024 * 1024,
        10**9,
    ]
    data = tmp_path / "data"
    data.write_bytes(b"".join(b"%05d\n" % n for n in range(1000)))
    ours = run_sshfan(["run", str(data), "--pipe", "--block", "1k", "-c", "wc -c", "-o", "-"])
    assert ours.returncode == 0, ours.stderr
    theirs = run_parallel(
        ["--pipe", "--block", "1k", "-k", "wc -c"], cwd=tmp_path, input=data.read_bytes()
    )
    assert ours.stdout.split() == theirs.split()
    for bad in ("inf", "0", "-1", "2G", "lots"):
        refused = run_sshfan(["run", str(data), "--pipe", "--block", bad, "-c", "cat"])
        assert refused.returncode == 2, (bad, refused.stderr)
        assert refused.stderr.count(b"\n") == 1 and b"--block" in refused.stderr, refused.stderr


def test_timeouts_read_as_gnu_parallel_reads_them() -> None:
    """Seconds, or s m h d units summed (a bare number after a unit is seconds); parallel's
    N% is refused in one line."""
    seconds = sshfan._parse_seconds
    assert [seconds(t) for t in ("30", "1.5", "1m30s", "1m30", "2h", "1D", ".5m")] == [
        30,
        1.5,
        90,
        90,
        7200,
        86400,
        30,
    ]
    for bad in ("200%", "1x", "m", ""):
        with pytest.raises(sshfan.UsageError, match="--timeout"):
            seconds(bad)


@needs_parallel
def test_timeout_with_units_kills_what_gnu_parallels_kills(tmp_path: Path, run_sshfan) -> None:
    """--timeout 0.1m: the task still sleeping is killed, the other's output is kept."""
    tasks = tmp_path / "tasks"
    tasks.write_text("echo a\nsleep 60; echo b\n")
    ours = run_sshfan(["run", str(tasks), "--timeout", "0.1m", "-o", "-"])
    theirs = run_parallel(["-k", "--timeout", "0.1m"], input=tasks.read_bytes(), status=1)
    assert ours.returncode == 1, ours.stderr
    assert ours.stdout == theirs == b"a\n"


@needs_parallel
def test_pipe_dash_n_is_gnu_parallels_records_per_chunk(tmp_path: Path, run_sshfan) -> None:
    """--pipe -N 3 (sshfan's --lines) cuts chunks of 3 lines, as parallel's -N does."""
    data = tmp_path / "data"
    data.write_bytes(b"".join(b"%d\n" % n for n in range(1, 8)) + b"a\r\nlast")
    command = "echo {#}; od -c"
    ours = run_sshfan(["run", str(data), "--pipe", "-N", "3", "-c", command, "-o", "-"])
    assert ours.returncode == 0, ours.stderr
    theirs = run_parallel(["--pipe", "-N", "3", "-k", command], input=data.read_bytes())
    assert ours.stdout == theirs


def test_chunks_larger_than_a_frame_reach_the_task_whole(
    sshd: SshServer, tmp_path: Path, run_sshfan
) -> None:
    """--block 10M works: a 9 MiB line and 10M chunks travel in several frames, unchanged."""
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(sshd.hosts_toml(["h1"], slots=2))
    data = tmp_path / "data"
    line = b"".join(b"%08x" % n for n in range(9 * 1024 * 1024 // 8))
    data.write_bytes(line + b"\n" + b"short\n" * 3 + line[: 3 * 1024 * 1024] + b"\n")
    result = run_sshfan(
        ["run", str(data), "--hosts", str(hosts), "--pipe", "--block", "1M"]
        + ["-c", "sha256sum", "-o", "-", "--no-progress"]
    )
    assert result.returncode == 0, result.stderr
    chunks = list(sshfan._pipe_chunks(data, None, 1024 * 1024))
    assert [len(c) for c in chunks] == [len(line) + 1, 18, 3 * 1024 * 1024 + 1]
    sums = [row.split()[0].decode() for row in result.stdout.splitlines()]
    assert sums == [hashlib.sha256(c).hexdigest() for c in chunks]


def test_a_stub_holds_its_queue_after_a_failure_until_released(tmp_path: Path) -> None:
    """With hold = "fail" nothing queued starts after a failed task until the head says."""
    from test_stub import StubProcess

    stub = StubProcess(slots=1, hold="fail")
    try:
        marker = tmp_path / "second-ran"
        tasks = [(1, b"exit 3"), (2, b"touch " + str(marker).encode()), (3, b"true")]
        stub.send(sshfan.KIND_TASKS, sshfan.encode_tasks(tasks))
        assert stub.results(1)[1][0] == 3
        # The stub starts queued tasks before it reads a frame: by its PONG, an unheld
        # queue would have started task 2.
        stub.send(sshfan.KIND_PING, b"x")
        stub.expect(sshfan.KIND_PONG)
        assert not marker.exists()
        stub.send(sshfan.KIND_RELEASE, sshfan.INPUT_HEAD.pack(1))
        assert sorted(stub.results(2)) == [2, 3]
        assert marker.exists()
        assert stub.close() == 0
    finally:
        stub.proc.kill()
        stub.proc.wait()


HALT_TASKS = [0, 1, 0, 1, 0, 0]  # exit codes, task by task


def _halt_files(tmp_path: Path, tag: str) -> tuple[Path, Path]:
    """A tasks file whose task N touches file N and exits as HALT_TASKS says; its directory."""
    where = tmp_path / tag
    where.mkdir()
    tasks = where / "tasks.txt"
    tasks.write_text(
        "".join(f"touch {where}/ran{n}; exit {code}\n" for n, code in enumerate(HALT_TASKS, 1))
    )
    return tasks, where


def _ran(where: Path) -> list[int]:
    """Which tasks ran (the files they touched)."""
    return sorted(int(p.name[3:]) for p in where.glob("ran*"))


@needs_parallel
@pytest.mark.parametrize(
    "halt",
    ["soon,fail=1", "now,fail=1", "soon,fail=2", "soon,success=2", "now,success=1", "2"]
    + ["soon,done=3", "soon,fail=30%"],
)
def test_halt_with_one_slot_runs_the_tasks_gnu_parallel_runs(
    tmp_path: Path, run_sshfan, halt: str
) -> None:
    """-j 1: the same tasks run as under GNU parallel --halt, and none after it halts."""
    tasks, theirs = _halt_files(tmp_path, "parallel")
    result = subprocess.run(
        [GNU_PARALLEL, "--will-cite", "-j1", "--halt", halt],
        stdin=tasks.open("rb"),
        capture_output=True,
        check=False,
    )
    parallel_failed = result.returncode != 0
    tasks, ours = _halt_files(tmp_path, "sshfan")
    mine = run_sshfan(["run", str(tasks), "-j", "1", "--halt", halt, "-o", "-", "--no-progress"])
    assert _ran(ours) == _ran(theirs), mine.stderr
    # Exit 0 means every task ran and exited 0: a halt always leaves some unrun here
    # (parallel exits 0 after success=N; sshfan's exit 1 is a documented difference).
    assert parallel_failed == (",success=" not in halt), result.stderr
    assert mine.returncode == 1 and b"--halt" in mine.stderr, mine.stderr


@needs_parallel
@pytest.mark.parametrize("halt", ["soon,fail=1", "soon,success=1"])
def test_halt_with_two_slots_runs_the_tasks_gnu_parallel_runs(
    tmp_path: Path, run_sshfan, halt: str
) -> None:
    """-j 2 on this machine: tasks start in file order over the two slots, as parallel's
    do, so a halt stops the same ones (a long first task, a failing second one: fail=1
    runs tasks 1-2, success=1 runs 1-3) and the output is parallel -k's."""
    outputs = []
    for tag in ("parallel", "sshfan"):
        where = tmp_path / tag
        where.mkdir()
        tasks = where / "tasks.txt"
        tasks.write_text(
            f"sleep 0.5; touch {where}/ran1; echo one\n"
            f"touch {where}/ran2; echo two; exit 1\n"
            f"touch {where}/ran3; echo three\n"
            f"touch {where}/ran4; echo four\n"
        )
        if tag == "parallel":
            outputs.append(
                run_parallel(["-k", "-j2", "--halt", halt, "::::", str(tasks)], status=None)
            )
        else:
            mine = run_sshfan(
                ["run", str(tasks), "-j", "2", "--halt", halt, "-o", "-", "--no-progress"]
            )
            assert mine.returncode == 1, mine.stderr
            outputs.append(mine.stdout)
    assert _ran(tmp_path / "sshfan") == _ran(tmp_path / "parallel")
    assert outputs[1] == outputs[0]
    assert outputs[0] == (b"one\ntwo\n" if "fail" in halt else b"one\ntwo\nthree\n")


@needs_parallel
def test_a_retry_under_halt_runs_before_the_tasks_after_it(tmp_path: Path, run_sshfan) -> None:
    """-j1 --retries --halt: parallel tries a failed task again before it starts the next
    one, so the halt comes before task 3 starts; sshfan's queue does the same."""
    outputs, logs = [], []
    for tag in ("parallel", "sshfan"):
        where = tmp_path / tag
        where.mkdir()
        tasks = where / "tasks.txt"
        tasks.write_text(f"echo 1\necho 2; exit 1\ntouch {where}/ran3; echo 3\n")
        log = where / "joblog"
        args = ["-j1", "--retries", "2", "--halt", "soon,fail=1", "--joblog", str(log)]
        if tag == "parallel":
            outputs.append(run_parallel(["-k", *args, "::::", str(tasks)], status=None))
        else:
            mine = run_sshfan(["run", str(tasks), *args, "-o", "-", "--no-progress"])
            assert mine.returncode == 1, mine.stderr
            outputs.append(mine.stdout)
        logs.append([row.split(b"\t")[0] for row in log.read_bytes().splitlines()[1:]])
    assert outputs[1] == outputs[0] == b"1\n2\n"
    assert logs[1] == logs[0] == [b"1", b"2"]  # one row per task: its last try
    assert not (tmp_path / "sshfan" / "ran3").exists()


def test_halt_on_error_over_ssh_starts_nothing_after_the_failure(
    sshd: SshServer, tmp_path: Path, run_sshfan
) -> None:
    """--halt-on-error with one slot: tasks exiting 0 1 0 run the first two only, over SSH."""
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(sshd.hosts_toml(["h1"], slots=1))
    tasks, where = _halt_files(tmp_path, "ssh")
    result = run_sshfan(
        ["run", str(tasks), "--hosts", str(hosts), "--halt-on-error", "-o", "-", "--no-progress"]
    )
    assert result.returncode == 1, result.stderr
    assert _ran(where) == [1, 2]
    assert b"4 task(s) not run" in result.stderr


def test_halt_now_kills_the_running_tasks_and_bad_halts_are_refused(
    tmp_path: Path, run_sshfan
) -> None:
    """now,fail=1 kills what runs beside the failure; a malformed --halt is exit 2."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(f"sleep 30; touch {tmp_path}/slept\nsleep 0.2; exit 5\n" + "true\n" * 5)
    result = run_sshfan(
        ["run", str(tasks), "-j", "2", "--halt", "now,fail=1", "-o", "-", "--no-progress"]
    )
    assert result.returncode == 1, result.stderr
    assert not (tmp_path / "slept").exists()
    assert b"--halt now,fail=1" in result.stderr
    for bad in ("later,fail=1", "soon,fail=0", "soon,fail=1.5", "soon,oops=1", "soon,fail=101%"):
        refused = run_sshfan(["run", str(tasks), "--halt", bad])
        assert refused.returncode == 2 and refused.stderr.count(b"\n") == 1, refused.stderr


def test_local_tasks_run_in_the_current_directory_as_the_readme_says(
    tmp_path: Path, run_sshfan
) -> None:
    """`ls *.log > logs.txt; sshfan run logs.txt -c 'gzip -9 {}'` works away from $HOME."""
    here = tmp_path / "project"
    here.mkdir()
    for name in ("app 1.log", "b.log"):
        (here / name).write_text("log line\n" * 100)
    subprocess.run("ls *.log > logs.txt", shell=True, cwd=here, check=True)
    env = {"HOME": str(tmp_path / "elsewhere")}
    result = run_sshfan(["run", "logs.txt", "-c", "gzip -9 {}", "--no-progress"], cwd=here, env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in here.glob("*.gz")) == ["app 1.log.gz", "b.log.gz"]


@needs_parallel
def test_workdir_and_shell_as_gnu_parallel(tmp_path: Path, run_sshfan) -> None:
    """--workdir DIR (created), --wd ., and --shell bash run where and how parallel's do."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("pwd\necho ${BASH_VERSION:+bash}\n")
    for wd in ("made/here", "."):
        ours = run_sshfan(["run", str(tasks), "--wd", wd, "--shell", "bash", "-o", "-"])
        assert ours.returncode == 0, ours.stderr
        theirs = run_parallel(["-k", "--wd", wd], cwd=tmp_path, input=tasks.read_bytes())
        assert ours.stdout.splitlines()[0] == theirs.splitlines()[0]
        assert ours.stdout.splitlines()[1] == b"bash"
    assert (tmp_path / "made" / "here").is_dir()
    plain = run_sshfan(["run", str(tasks), "-o", "-"])
    assert plain.stdout == f"{tmp_path}\n\n".encode()  # /bin/sh by default, here
    for bad in (["--wd", "..."], ["--shell", ""], ["--lines", "3"]):
        refused = run_sshfan(["run", str(tasks), *bad])
        assert refused.returncode == 2 and refused.stderr.count(b"\n") == 1, refused.stderr


def test_workdir_dot_is_the_path_below_home(tmp_path: Path, monkeypatch) -> None:
    """--wd . on a remote host: the current path below home, or the absolute one (parallel)."""
    home = tmp_path / "home"
    (home / "src" / "proj").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    remote, local = sshfan.HostSpec(name="r"), sshfan.HostSpec(name="l", local=True)
    monkeypatch.chdir(home / "src" / "proj")
    assert sshfan._workdir_for(remote, ".") == "src/proj"
    assert sshfan._workdir_for(local, ".") == str(home / "src" / "proj")
    monkeypatch.chdir(home)
    assert sshfan._workdir_for(remote, ".") == "."
    monkeypatch.chdir(tmp_path)
    assert sshfan._workdir_for(remote, ".") == str(tmp_path)
    assert sshfan._workdir_for(remote, "logs") == "logs"


def test_remote_tasks_start_in_the_login_directory_and_shell_key(
    sshd: SshServer, tmp_path: Path, run_sshfan
) -> None:
    """Over SSH a task starts where `ssh host pwd` does; the shell key picks its shell;
    a shell the worker lacks fails that host, naming the shell."""
    login_dir = subprocess.run(
        [*sshd.ssh_argv(), "pwd"], capture_output=True, check=True, timeout=60
    ).stdout
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(sshd.hosts_toml(["h1"], slots=1, shell="bash"))
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("pwd\necho ${BASH_VERSION:+bash}\n")
    result = run_sshfan(["run", str(tasks), "--hosts", str(hosts), "-o", "-", "--no-progress"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == login_dir + b"bash\n"
    hosts.write_text(sshd.hosts_toml(["h1"], slots=1, shell="/no/such/shell"))
    failed = run_sshfan(["run", str(tasks), "--hosts", str(hosts), "-o", "-", "--no-progress"])
    assert failed.returncode == 3 and b"/no/such/shell" in failed.stderr, failed.stderr


def test_summary_lists_the_first_failures_and_points_at_the_rest(
    tmp_path: Path, run_sshfan
) -> None:
    """Failures are listed by seq (the first five, whatever order they ended in), then a
    line names the command that lists them all; `results` exits 1 for them."""
    tasks = tmp_path / "tasks.txt"
    # Later tasks end first: the first five to fail are not the first five by seq.
    tasks.write_text("".join(f"sleep 0.{9 - n}; echo t{n} >&2; exit {n}\n" for n in range(1, 9)))
    out = tmp_path / "out.txt"
    result = run_sshfan(["run", str(tasks), "-j", "8", "-o", str(out), "--no-progress"])
    assert result.returncode == 1
    listed = [
        line.split()[2] for line in result.stderr.decode().splitlines() if "failed: task" in line
    ]
    assert listed == ["1", "2", "3", "4", "5"]
    pointer = f"and 3 more failed: sshfan results {out} --failed"
    assert pointer.encode() in result.stderr, result.stderr
    shown = run_sshfan(["results", str(out), "--failed"])
    assert shown.returncode == 1
    assert [
        row.split()[0] for row in shown.stdout.decode().splitlines()[1:] if "stderr" not in row
    ] == [str(n) for n in range(1, 9)]


def test_dash_h_is_help_and_help_names_its_arguments(run_sshfan) -> None:
    """-h prints the help as --help does; the metavars are TASKS, OUTPUT, HOSTS, FORMAT;
    `results` documents its exit status."""
    for args in (["-h"], ["run", "-h"], ["results", "-h"], ["check", "-h"]):
        short, long = run_sshfan(args), run_sshfan([*args[:-1], "--help"])
        assert short.returncode == 0 and short.stdout == long.stdout, short.stderr
    text = run_sshfan(["run", "-h"], env={"COLUMNS": "200"}).stdout.decode()
    for name in ("TASKS", "OUTPUT", "HOSTS", "FORMAT"):
        assert name in text
    assert "Exit status" in run_sshfan(["results", "-h"], env={"COLUMNS": "200"}).stdout.decode()


@pytest.mark.e2e
def test_progress_bar_moves_during_long_tasks_and_ends_on_the_summary(tmp_path: Path) -> None:
    """On a terminal the bar is redrawn while 3 s tasks run (elapsed time advancing),
    counts what runs (2, not what was handed out), keeps its counts' width, and its last
    frame has the summary's numbers."""
    from test_ecosystem import _run_in_terminal

    tasks = tmp_path / "tasks.txt"
    tasks.write_text("sleep 3\nsleep 3; exit 3\n")
    shown = _run_in_terminal(["run", str(tasks), "-j", "2", "-o", str(tmp_path / "o")], tmp_path)
    frames = [f for f in shown.decode().split("\r") if "/2 [" in f]
    waiting = {f.split("[", 1)[1][:5] for f in frames if " 0/2 [" in f}
    assert len(waiting) >= 2, frames  # several elapsed times while the long tasks ran
    running = {int(f.split("running=")[1].split()[0]) for f in frames if "running=" in f}
    assert 2 in running and max(running) <= 2, running
    postfixes = {len(f.split("failed=", 1)[1]) for f in frames if "failed=" in f}
    assert len(postfixes) == 1, frames
    last = frames[-1]
    assert "2/2 [" in last and "failed=1 running=0 done: local=2" in last, last
    assert "2 of 2 tasks done: 1 ok, 1 failed" in shown.decode()


def test_a_host_that_ran_tasks_is_not_reported_skipped(tmp_path: Path, run_sshfan) -> None:
    """The run ends while some of a local host's stubs and a whole host are still starting:
    the host that did the work is ok, the other one was not used (and is not 'skipped').
    The stubs still starting never come up on their own (the run's end kills them), so no
    timing decides which host is up when the run ends."""
    first_fast = tmp_path / "first_fast.py"
    first_fast.write_text(
        "#!/usr/bin/env python3\nimport os, sys, time\n"
        f"try:\n    os.mkdir({str(tmp_path / 'first')!r})\nexcept FileExistsError:\n"
        "    time.sleep(120)\nos.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    slow = tmp_path / "slow.py"
    slow.write_text(
        "#!/usr/bin/env python3\nimport os, sys, time\ntime.sleep(120)\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    for script in (first_fast, slow):
        script.chmod(0o755)
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(
        f'[[hosts]]\nname = "here"\nlocal = true\nslots = 4\npython = "{first_fast}"\n\n'
        f'[[hosts]]\nname = "late"\nlocal = true\nslots = 1\npython = "{slow}"\n'
    )
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo one\n")
    result = run_sshfan(["run", str(tasks), "--hosts", str(hosts), "-o", "-", "--no-progress"])
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stderr.decode().splitlines()]
    rows = {line.split()[0]: line for line in lines if line.split()[:1] in (["here"], ["late"])}
    assert rows["here"].split()[1] == "1" and rows["here"].endswith("  ok"), rows
    assert rows["late"].endswith("not used: the run ended before it was up"), rows
    assert b"skipped" not in result.stderr


def test_resume_failed_reruns_only_the_failed_tasks(tmp_path: Path, run_sshfan) -> None:
    """--resume-failed keeps the tasks that succeeded and runs the failed ones again; the
    output stays in task order, and a later --resume counts the task by its last run."""
    flag = tmp_path / "fixed"
    counter = tmp_path / "runs"
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(
        "".join(
            f"echo {n} >> {counter}; echo out{n}; "
            + (f"test -e {flag} || exit 4\n" if n in (2, 4) else "true\n")
            for n in range(1, 6)
        )
    )
    out = tmp_path / "out.txt"
    args = ["run", str(tasks), "-o", str(out), "--no-progress", "-j", "2"]
    first = run_sshfan(args)
    assert first.returncode == 1
    assert out.read_text() == "".join(f"out{n}\n" for n in range(1, 6))
    flag.touch()
    counter.write_text("")
    again = run_sshfan([*args, "--resume-failed"])
    assert again.returncode == 0, again.stderr
    assert sorted(counter.read_text().split()) == ["2", "4"]
    assert out.read_text() == "".join(f"out{n}\n" for n in range(1, 6))
    assert b"3 from the journal" in again.stderr
    later = run_sshfan([*args, "--resume"])
    assert later.returncode == 0 and b"5 from the journal" in later.stderr, later.stderr
    assert b"failed" not in later.stderr.split(b"from the journal")[1].split(b"\n")[0]


def test_large_pipe_chunks_are_queued_few_at_a_time(tmp_path: Path) -> None:
    """With --block 10M a host queues one chunk beyond its slots: memory stays bounded by
    the chunks in flight, however long the file."""
    opts = sshfan.RunOptions("data", [], "-", pipe=True, command="cat", block=10 * 1024 * 1024)
    assert sshfan.max_ahead(opts) == 1
    assert (
        sshfan.max_ahead(
            sshfan.RunOptions("data", [], "-", pipe=True, command="cat", block=1024**2)
        )
        == 16
    )
    assert sshfan.max_ahead(sshfan.RunOptions("tasks", [], "-")) == sshfan.HostWindow.MAX_AHEAD
    window = sshfan.HostWindow(slots=4)
    window.max_ahead = 1
    window.start_ahead = 64
    assert window.ahead() == 1 and window.want() == 5
    window.observe(0.0001)  # tiny tasks would ask for many more
    assert window.ahead() == 1


@needs_parallel
def test_resume_failed_reruns_what_gnu_parallels_does(tmp_path: Path, run_sshfan) -> None:
    """After a run where tasks 2 and 4 failed, --resume-failed runs those two again in
    sshfan as in GNU parallel (its joblog), and nothing else."""
    reran = {}
    for tool in ("parallel", "sshfan"):
        where = tmp_path / tool
        where.mkdir()
        tasks = where / "tasks.txt"
        tasks.write_text(
            "".join(
                f"echo {n} >> {where}/runs; "
                + ("test -e fixed || exit 4\n" if n in (2, 4) else "true\n")
                for n in range(1, 7)
            )
        )
        for second in (False, True):
            if second:
                (where / "fixed").touch()
                (where / "runs").write_text("")
            if tool == "parallel":
                extra = ["--resume-failed"] if second else []
                failed = 0 if second else 2  # tasks 2 and 4, until `fixed` exists
                run_parallel(
                    ["-j2", "--joblog", "jl", *extra],
                    cwd=where,
                    input=tasks.read_bytes(),
                    status=failed,
                )
            else:
                extra = ["--resume-failed"] if second else []
                run_sshfan(["run", "tasks.txt", "-j", "2", "-o", "out", *extra], cwd=where)
        reran[tool] = sorted((where / "runs").read_text().split())
    assert reran["sshfan"] == reran["parallel"] == ["2", "4"]


@needs_parallel
@pytest.mark.parametrize("retries", ["1", "3"])
def test_retries_count_the_tries_as_gnu_parallel(tmp_path: Path, run_sshfan, retries: str) -> None:
    """--retries N: a task that always fails is tried as many times as GNU parallel tries
    it (N in all, not N more), and the output is the same."""
    counts, outputs = [], []
    for tag in ("parallel", "sshfan"):
        where = tmp_path / tag
        where.mkdir()
        tries = where / "tries"
        tasks = where / "tasks.txt"
        tasks.write_text(f"echo ok\necho try >> {tries}; echo out; exit 3\n")
        if tag == "parallel":
            args = ["-k", "-j1", "--retries", retries, "::::", str(tasks)]
            outputs.append(run_parallel(args, status=None))
        else:
            args = ["run", str(tasks), "-j1", "--retries", retries, "-o", "-", "--no-progress"]
            mine = run_sshfan(args)
            assert mine.returncode == 1, mine.stderr
            outputs.append(mine.stdout)
        counts.append(len(tries.read_text().split()))
    assert counts[1] == counts[0] == int(retries)
    assert outputs[1] == outputs[0]
