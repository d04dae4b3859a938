"""The journal and the merged output under adversity: exit 0 means every result is in
the output, exact (README "When things fail").

Resume of a finished run with large outputs, `sshfan results` beside a live run, an
output or journal that is the tasks file, two runs on one output, a rerun that cannot
start, a full disk, options that change what the output looks like, and a seeded
kill-and-resume torture run over two SSH hosts.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sshd import SshServer
from support import (
    LOCAL_BLOCK,
    NO_HANG,
    Head,
    RunSshfan,
    check_exit,
    closed_port,
    err_lines,
    host_block,
    journal_done,
    run_args,
    sshfan_argv,
    sshfan_env,
    wait_for,
    write_file,
)

import sshfan

MIB = 1024 * 1024


def big_task(seq: int, size: int, char: str = "") -> str:
    """A task line printing SIZE bytes of one letter (its seq's), then a newline."""
    letter = char or "abcdefghijklmnopqrstuvwxyz"[seq % 26]
    return f"head -c {size} /dev/zero | tr '\\0' {letter}; echo"


def big_expected(sizes: list[int]) -> bytes:
    """The text output of big_task for each size, in order."""
    return b"".join(
        "abcdefghijklmnopqrstuvwxyz"[seq % 26].encode() * size + b"\n"
        for seq, size in enumerate(sizes, 1)
    )


def write_tasks(path: Path, lines: list[str]) -> Path:
    """Write one task per line and return the path."""
    path.write_text("".join(line + "\n" for line in lines))
    return path


def one_line(result: subprocess.CompletedProcess[bytes], code: int, *needles: str) -> str:
    """Assert exit CODE, no traceback and one stderr line holding every needle; return it."""
    check_exit(result, code)
    text = result.stderr.decode(errors="replace")
    assert "Traceback" not in text, text
    lines = err_lines(result.stderr)
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(*paths: Path) -> list[tuple[int, int, bytes] | None]:
    """Each file's (device, inode, bytes), or None where it does not exist."""
    shot: list[tuple[int, int, bytes] | None] = []
    for path in paths:
        try:
            st = path.stat()
            shot.append((st.st_dev, st.st_ino, path.read_bytes()))
        except FileNotFoundError:
            shot.append(None)
    return shot


# ---------------------------------------------------------------------------
# 1: resume of a run whose tasks are all journaled
# ---------------------------------------------------------------------------


def test_resume_of_a_finished_run_with_large_outputs_is_exact(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """Every task journaled, outputs of 3 MB: --resume renders them all, byte for byte
    (the copier thread used to lose its journal under it and the output came out cut)."""
    sizes = [3_000_000, 10, 2_000_000, 3_000_000]
    tasks = write_tasks(tmp_path / "tasks.txt", [big_task(n, s) for n, s in enumerate(sizes, 1)])
    hosts = write_file(tmp_path / "hosts.toml", LOCAL_BLOCK)
    out = tmp_path / "out.txt"
    check_exit(run_sshfan(run_args(tasks, hosts, out), timeout=NO_HANG), 0)
    expected = big_expected(sizes)
    assert out.read_bytes() == expected
    for _again in range(3):  # the old race lost a different amount each time
        out.unlink()
        result = run_sshfan(run_args(tasks, hosts, out, "--resume"), timeout=NO_HANG)
        check_exit(result, 0)
        assert out.stat().st_size == len(expected)
        assert out.read_bytes() == expected


# ---------------------------------------------------------------------------
# a full disk
# ---------------------------------------------------------------------------


def limited_run(args: list[str], cwd: Path, max_bytes: int) -> subprocess.CompletedProcess[bytes]:
    """Run sshfan with ARGS, no file it writes allowed past MAX_BYTES (writes then fail
    with EFBIG, as on a full disk they fail with ENOSPC)."""

    def limit() -> None:
        """In the child: cap the size of files it writes."""
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return subprocess.run(
        sshfan_argv(*args),
        cwd=cwd,
        env=sshfan_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=NO_HANG,
        preexec_fn=limit,
        check=False,
    )


def done_count(stderr: bytes) -> int:
    """The N of the summary's 'N of M tasks done'."""
    line = next(line for line in err_lines(stderr) if " tasks done" in line)
    return int(line.split()[1])


def test_a_full_disk_is_one_line_naming_the_file_and_resume_finishes(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """The journal cannot grow: exit 3, the error once, naming the file; the summary counts
    what the journal holds; --resume (with room again) finishes the run exactly."""
    sizes = [100_000] * 30
    tasks = write_tasks(tmp_path / "tasks.txt", [big_task(n, s) for n, s in enumerate(sizes, 1)])
    hosts = write_file(tmp_path / "hosts.toml", LOCAL_BLOCK)
    out = tmp_path / "out.txt"
    journal = Path(f"{out}.journal")
    result = limited_run(run_args(tasks, hosts, out), tmp_path, 1_000_000)
    check_exit(result, 3)
    text = result.stderr.decode(errors="replace")
    assert "Traceback" not in text, text
    errors = [line for line in err_lines(result.stderr) if "cannot write" in line]
    assert len(errors) == 1, text
    assert f"{journal}: " in errors[0] or f"{out}: " in errors[0], errors
    assert "File too large" in errors[0], errors
    recorded = journal_done(journal)
    assert 0 < len(recorded) < len(sizes)
    assert done_count(result.stderr) == len(recorded)
    resumed = run_sshfan(run_args(tasks, hosts, out, "--resume"), timeout=NO_HANG)
    check_exit(resumed, 0)
    assert out.read_bytes() == big_expected(sizes)


def test_an_output_that_cannot_be_written_ends_3_and_the_journal_resumes(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """-o /dev/full (then --joblog /dev/full): exit 3 with one line naming it (not
    exit 0); the journal then renders the whole output on --resume."""
    sizes = [3_000_000, 5, 1_500_000]
    tasks = write_tasks(tmp_path / "tasks.txt", [big_task(n, s) for n, s in enumerate(sizes, 1)])
    hosts = write_file(tmp_path / "hosts.toml", LOCAL_BLOCK)
    journal = tmp_path / "run.journal"
    args = ["--journal", str(journal)]
    result = run_sshfan(run_args(tasks, hosts, Path("/dev/full"), *args), timeout=NO_HANG)
    check_exit(result, 3)
    errors = [line for line in err_lines(result.stderr) if "cannot write" in line]
    assert len(errors) == 1 and "/dev/full: No space left on device" in errors[0], errors
    out = tmp_path / "out.txt"
    joblog = ["--joblog", "/dev/full"]
    result = run_sshfan(run_args(tasks, hosts, out, "--resume", *args, *joblog))
    check_exit(result, 3)
    errors = [line for line in err_lines(result.stderr) if "cannot write" in line]
    assert len(errors) == 1 and "/dev/full: No space left on device" in errors[0], errors
    resumed = run_sshfan(run_args(tasks, hosts, out, "--resume", *args), timeout=NO_HANG)
    check_exit(resumed, 0)
    assert out.read_bytes() == big_expected(sizes)


# ---------------------------------------------------------------------------
# 2, 9: `sshfan results` only reads
# ---------------------------------------------------------------------------


def test_results_beside_a_live_run_never_changes_it(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """`sshfan results` again and again (two at a time) while a run streams large outputs
    into its journal: the run still ends 0 with its output exact (results used to cut
    what looked like a torn record: the live run's write in progress)."""
    count, piece, pieces = 24, 250_000, 8
    stream = f"for i in {' '.join(['x'] * pieces)}; do head -c {piece} /dev/zero | tr '\\0' {{c}}"
    lines = [
        stream.format(c="abcdefghijklmnopqrstuvwxyz"[n % 26]) + "; sleep 0.05; done; echo"
        for n in range(1, count + 1)
    ]
    tasks = write_tasks(tmp_path / "tasks.txt", lines)
    hosts = write_file(tmp_path / "hosts.toml", LOCAL_BLOCK)
    out = tmp_path / "out.txt"
    head = Head(run_args(tasks, hosts, out), tmp_path, "live")

    def look() -> int:
        """One `sshfan results`: check what it shows; 1 if it saw the journal."""
        seen = run_sshfan(["results", str(out), "--format", "jsonl"], timeout=NO_HANG)
        if seen.returncode == 2:  # the journal is not there yet
            assert b"no journal" in seen.stderr, seen.stderr
            return 0
        check_exit(seen, 0)
        for line in seen.stdout.splitlines():
            record = json.loads(line)
            assert len(record["stdout"]) == piece * pieces + 1
        return 1

    try:
        looks = 0
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            while head.proc.poll() is None:
                looks += sum(pool.map(lambda _n: look(), range(2)))
        result = head.wait()
    finally:
        head.stop()
    check_exit(result, 0)
    assert looks >= 4
    assert out.read_bytes() == big_expected([piece * pieces] * count)


def test_results_never_writes_to_a_journal(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """A journal whose last record is still being written (as a live run's is, at the
    moment `results` looks): results shows the whole records and changes nothing."""
    tasks = write_tasks(tmp_path / "tasks.txt", ["echo one", "echo two; exit 3"])
    hosts = write_file(tmp_path / "hosts.toml", LOCAL_BLOCK)
    out = tmp_path / "out.txt"
    journal = Path(f"{out}.journal")
    check_exit(run_sshfan(run_args(tasks, hosts, out), timeout=NO_HANG), 1)
    with open(journal, "ab") as handle:  # the first half of a record on its way
        handle.write(sshfan.encode_frame(sshfan.KIND_OUTPUT, b"\0" * 9 + b"x" * 100)[:60])
    before = snapshot(journal)
    os.chmod(journal, 0o444)  # (root writes anyway: the bytes are what is checked)
    try:
        for args in ([], ["--failed"], ["--format", "jsonl"]):
            seen = run_sshfan(["results", str(out), *args], timeout=NO_HANG)
            check_exit(seen, 1)
            assert b"echo two" in seen.stdout
    finally:
        os.chmod(journal, 0o644)
    assert snapshot(journal) == before


def test_results_failed_reads_only_the_tail_of_a_large_output(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """`results --failed` for a task with 64 MB of output shows its last stderr lines
    without reading the output into memory."""
    lines = [
        "echo fine",
        "head -c 64000000 /dev/zero; head -c 300000 /dev/zero | tr '\\0' e >&2; "
        "printf 'first\\nsecond\\nthe last words\\n' >&2; exit 4",
    ]
    tasks = write_tasks(tmp_path / "tasks.txt", lines)
    hosts = write_file(tmp_path / "hosts.toml", LOCAL_BLOCK)
    journal = tmp_path / "run.journal"
    args = ["--journal", str(journal)]
    check_exit(run_sshfan(run_args(tasks, hosts, Path("/dev/null"), *args), timeout=NO_HANG), 1)
    # Measured in a child of a fresh Python: the test process's own children do not count.
    probe = (
        "import resource, subprocess, sys;"
        "r = subprocess.run(sys.argv[1:], capture_output=True);"
        "sys.stdout.write(repr((r.returncode, r.stdout.decode(), "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)))"
    )
    argv = [sys.executable, "-c", probe]
    argv += sshfan_argv("results", "unused", "--journal", str(journal), "--failed")
    code, shown, max_rss_kib = eval(
        subprocess.check_output(argv, env=sshfan_env(), timeout=NO_HANG)
    )
    assert code == 1
    assert "the last words" in shown and "second" in shown
    assert "fine" not in shown
    assert max_rss_kib < 60 * 1024, f"results used {max_rss_kib} KiB"


# ---------------------------------------------------------------------------
# 3: an output or journal that is the tasks file
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["output", "journal", "output-is-journal", "default-output", "hard-link", "joblog"],
)
def test_a_run_never_writes_over_its_own_files(
    case: str, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """An output, journal or joblog that is the tasks file (by name, by another
    spelling, by a hard link), or an output that is the journal: exit 2, one line,
    nothing written."""
    name = "jobs.out" if case == "default-output" else "tasks.txt"
    tasks = write_tasks(tmp_path / name, [f"echo {n}" for n in range(1, 301)])
    hosts = write_file(tmp_path / "hosts.toml", LOCAL_BLOCK)
    other = tmp_path / "other.txt"
    args = {
        "output": ["-o", f"{tmp_path}/./{name}"],
        "journal": ["-o", str(other), "--journal", name],
        "output-is-journal": ["-o", str(other), "--journal", str(other)],
        "default-output": [],
        "hard-link": ["-o", str(other)],
        "joblog": ["-o", str(other), "--joblog", str(tasks)],
    }[case]
    if case == "hard-link":
        os.link(tasks, tmp_path / "same.journal")
        args += ["--journal", str(tmp_path / "same.journal")]
    before = sorted(os.listdir(tmp_path))
    tasks_before = snapshot(tasks)
    result = run_sshfan(["run", name, "--hosts", str(hosts), "--no-progress", *args])
    one_line(result, 2, "would be the")
    assert snapshot(tasks) == tasks_before
    assert sorted(os.listdir(tmp_path)) == before


def test_a_tasks_file_that_shrinks_under_the_reader_is_not_a_finished_run(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """The first task empties the tasks file while the head has read only the start of
    it: the run must not end 0 as if the file were done (it used to: "301 of 3000")."""
    count = 6000
    tasks = tmp_path / "tasks.txt"
    lines = [f": > {tasks}; echo 1"] + [f"echo {n}" for n in range(2, count + 1)]
    write_tasks(tasks, lines)
    # One slot: nothing more is read from the file until the first task's result is in.
    hosts = write_file(tmp_path / "hosts.toml", LOCAL_BLOCK.replace("slots = 2", "slots = 1"))
    out = tmp_path / "out.txt"
    result = run_sshfan(run_args(tasks, hosts, out), timeout=NO_HANG)
    check_exit(result, 3)
    assert b"changed while it was being read" in result.stderr
    assert b"Traceback" not in result.stderr


# ---------------------------------------------------------------------------
# 5: one run per output at a time
# ---------------------------------------------------------------------------


def test_a_second_run_on_the_same_output_or_journal_is_refused(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """While a run holds its output and journal, another run on either gets exit 2
    naming it (pid, host, start) and changes nothing; `results` still reads; the
    first run ends 0 with its output exact."""
    flag = tmp_path / "go"
    count = 8
    lines = [f"while [ ! -e {flag} ]; do sleep 0.02; done; echo {n}" for n in range(1, count + 1)]
    tasks = write_tasks(tmp_path / "tasks.txt", lines)
    hosts = write_file(tmp_path / "hosts.toml", LOCAL_BLOCK)
    out = tmp_path / "out.txt"
    journal = Path(f"{out}.journal")
    first = Head(run_args(tasks, hosts, out), tmp_path, "first")
    try:
        wait_for("the first run's lock", lambda: Path(f"{journal}.lock").exists())
        wait_for("the first run's lock", lambda: Path(f"{journal}.lock").stat().st_size > 0)
        other_tasks = write_tasks(tmp_path / "other.txt", ["echo other"])
        seconds = [
            run_args(tasks, hosts, out),
            run_args(tasks, hosts, out, "--resume"),
            run_args(other_tasks, hosts, out, "--journal", str(tmp_path / "own.journal")),
            run_args(other_tasks, hosts, tmp_path / "own.txt", "--journal", str(journal)),
        ]
        for args in seconds:
            shot = snapshot(out, journal, Path(f"{journal}.new"))
            refused = run_sshfan(args, timeout=NO_HANG)
            line = one_line(refused, 2, "in use by another run", f"pid {first.proc.pid} on ")
            assert "started 20" in line, line
            assert snapshot(out, journal, Path(f"{journal}.new")) == shot
        assert not (tmp_path / "own.txt").exists()
        assert not (tmp_path / "own.journal").exists()
        looked = run_sshfan(["results", str(out)], timeout=NO_HANG)
        check_exit(looked, 0)
        flag.touch()
        result = first.wait()
    finally:
        first.stop()
    check_exit(result, 0)
    assert out.read_bytes() == "".join(f"{n}\n" for n in range(1, count + 1)).encode()
    assert not Path(f"{journal}.lock").exists()
    again = run_sshfan(run_args(tasks, hosts, out, "--resume"), timeout=NO_HANG)
    check_exit(again, 0)


def held_run(tmp_path: Path, count: int = 6) -> tuple[Head, Path, Path, Path]:
    """A run on the local host whose first task is done (its output there) and whose
    others wait for a flag file: (the head, its output, the flag, the tasks file)."""
    flag = tmp_path / "go"
    lines = ["echo 1"] + [
        f"while [ ! -e {flag} ]; do sleep 0.02; done; echo {n}" for n in range(2, count + 1)
    ]
    tasks = write_tasks(tmp_path / "tasks.txt", lines)
    hosts = write_file(tmp_path / "hosts.toml", LOCAL_BLOCK)
    out = tmp_path / "out.txt"
    head = Head(run_args(tasks, hosts, out), tmp_path, "first")
    wait_for("the first task's output", lambda: out.exists() and out.read_bytes() == b"1\n")
    return head, out, flag, tasks


def numbered(count: int) -> bytes:
    """The output of held_run's tasks: 1 to COUNT, a line each."""
    return "".join(f"{n}\n" for n in range(1, count + 1)).encode()


def test_a_second_run_through_a_link_to_the_output_is_refused(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """Another run whose output is a symbolic or hard link to a running run's output (so
    other lock file names) is refused, exit 2, the output untouched; the first ends 0
    with its output exact (both used to end 0, one's output over the other's)."""
    count = 6
    first, out, flag, _ = held_run(tmp_path, count)
    try:
        soft, hard = tmp_path / "soft.txt", tmp_path / "hard.txt"
        soft.symlink_to(out.name)
        os.link(out, hard)
        other = write_tasks(tmp_path / "other.txt", ["echo other"] * 3)
        hosts = tmp_path / "hosts.toml"
        for link in (soft, hard):
            shot = snapshot(out)
            refused = run_sshfan(run_args(other, hosts, link), timeout=NO_HANG)
            one_line(refused, 2, "in use by another run")
            assert snapshot(out) == shot
        flag.touch()
        result = first.wait()
    finally:
        first.stop()
    check_exit(result, 0)
    assert out.read_bytes() == numbered(count)


@pytest.mark.parametrize("change", ["removed", "replaced"])
def test_an_output_removed_or_replaced_mid_run_is_not_a_finished_run(
    change: str, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """The output file removed, or another file moved to its name, while the run writes
    it: the run ends 3 saying so (it used to end 0 with no output, or another's), and a
    --resume then writes the output whole."""
    count = 6
    first, out, flag, tasks = held_run(tmp_path, count)
    try:
        if change == "removed":
            out.unlink()
        else:
            write_file(tmp_path / "stranger.txt", "not the output\n").replace(out)
        flag.touch()
        result = first.wait()
    finally:
        first.stop()
    check_exit(result, 3)
    assert b"removed or replaced while the run wrote it" in result.stderr
    assert b"Traceback" not in result.stderr
    hosts = tmp_path / "hosts.toml"
    again = run_sshfan(run_args(tasks, hosts, out, "--resume"), timeout=NO_HANG)
    check_exit(again, 0)
    assert out.read_bytes() == numbered(count)


@pytest.mark.parametrize("source", ["hosts file", "sshloginfile"])
def test_the_output_is_never_the_file_the_hosts_come_from(
    source: str, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """`-o` naming the hosts file or the --slf file the run reads (and watches): exit 2,
    one line, the file as it was (it used to be written over, then read back as hosts)."""
    tasks = write_tasks(tmp_path / "tasks.txt", ["echo 1", "echo 2"])
    if source == "hosts file":
        hosts = write_file(tmp_path / "hosts.toml", LOCAL_BLOCK)
        args = ["--hosts", str(hosts)]
    else:
        hosts = write_file(tmp_path / "slf.txt", ":\n")
        args = ["--slf", str(hosts)]
    before = snapshot(hosts)
    result = run_sshfan(["run", str(tasks), *args, "-o", str(hosts), "--no-progress"])
    one_line(result, 2, "would be the", source)
    assert snapshot(hosts) == before


# ---------------------------------------------------------------------------
# 8: a run that ends before any task ran changes nothing
# ---------------------------------------------------------------------------


def test_a_rerun_that_cannot_start_leaves_output_and_journal_as_they_were(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """Every host unreachable (a closed port): exit 3, and the earlier run's output and
    journal are the same files with the same bytes, fresh run or --resume."""
    sizes = [10, 2_000_000, 20]
    tasks = write_tasks(tmp_path / "tasks.txt", [big_task(n, s) for n, s in enumerate(sizes, 1)])
    hosts = write_file(tmp_path / "hosts.toml", LOCAL_BLOCK)
    out = tmp_path / "out.txt"
    journal = Path(f"{out}.journal")
    check_exit(run_sshfan(run_args(tasks, hosts, out), timeout=NO_HANG), 0)
    before = snapshot(out, journal)
    dead = write_file(
        tmp_path / "dead.toml", host_block(sshd, "gone", port=closed_port(), connect_timeout=5)
    )
    listing = sorted(os.listdir(tmp_path))
    for extra in ([], ["-f", "jsonl"], ["--resume"]):
        result = run_sshfan(run_args(tasks, dead, out, *extra), timeout=NO_HANG)
        check_exit(result, 0 if extra == ["--resume"] else 3)  # (resumed: nothing to run)
        assert snapshot(out, journal) == before, extra
        assert sorted(os.listdir(tmp_path)) == listing  # no lock or new journal left
    resumed = run_sshfan(run_args(tasks, hosts, out, "--resume"), timeout=NO_HANG)
    check_exit(resumed, 0)
    assert out.read_bytes() == big_expected(sizes)


# ---------------------------------------------------------------------------
# options that shape the output, and tasks from stdin
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "option"),
    [
        (["-c", "echo {}"], "--command"),
        (["--tag"], "--tag"),
        (["-f", "jsonl"], "--format"),
        (["--pipe", "-c", "cat"], "--command"),
    ],
)
def test_resume_with_other_output_shaping_options_is_refused(
    extra: list[str], option: str, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """--resume with an option that changes what tasks run or how results read: exit 2
    naming the option; the journal and output are left alone."""
    tasks = write_tasks(tmp_path / "tasks.txt", ["echo a", "echo b"])
    hosts = write_file(tmp_path / "hosts.toml", LOCAL_BLOCK)
    out = tmp_path / "out.txt"
    journal = Path(f"{out}.journal")
    check_exit(run_sshfan(run_args(tasks, hosts, out), timeout=NO_HANG), 0)
    before = snapshot(out, journal)
    refused = run_sshfan(run_args(tasks, hosts, out, "--resume", *extra), timeout=NO_HANG)
    one_line(refused, 2, option, str(journal))
    assert snapshot(out, journal) == before
    check_exit(run_sshfan(run_args(tasks, hosts, out, "--resume"), timeout=NO_HANG), 0)


def test_tasks_from_stdin_leave_no_copy_behind_and_resume(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """The copy of stdin lives beside the journal under a name of its own: one a killed
    run left is replaced and removed by the next run; --resume from stdin works."""
    lines = "".join(f"echo {n}\n" for n in range(1, 6)).encode()
    hosts = write_file(tmp_path / "hosts.toml", LOCAL_BLOCK)
    dead = write_file(
        tmp_path / "dead.toml", host_block(sshd, "gone", port=closed_port(), connect_timeout=5)
    )
    out = tmp_path / "out.txt"
    leftover = Path(f"{out}.journal.stdin")
    leftover.write_bytes(b"left by a run killed with SIGKILL\n")
    args = ["run", "-", "-o", str(out), "--no-progress"]
    failed = run_sshfan([*args, "--hosts", str(dead)], input=lines, timeout=NO_HANG)
    check_exit(failed, 3)
    assert not leftover.exists()
    resumed = run_sshfan([*args, "--hosts", str(hosts), "--resume"], input=lines)
    check_exit(resumed, 0)
    assert out.read_bytes() == b"1\n2\n3\n4\n5\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out.txt")) == [
        "out.txt",
        "out.txt.journal",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sshfan-stdin")]


# ---------------------------------------------------------------------------
# kill and resume, again and again
# ---------------------------------------------------------------------------

TORTURE_SIZES = [3, 40, 5_000, 200_000, 1_200_000, 3_500_000]


def started(mark: Path) -> int:
    """How many task starts the tasks have noted so far."""
    try:
        return mark.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def check_torture_output(out: Path, fmt: str, sizes: list[int], lines: list[str]) -> None:
    """Assert OUT holds every task's output exactly, in order (jsonl: the fields that do
    not vary from run to run)."""
    if fmt == "text":
        assert out.read_bytes() == big_expected(sizes)
        return
    records = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert [r["seq"] for r in records] == list(range(1, len(sizes) + 1))
    for record, size, line in zip(records, sizes, lines, strict=True):
        letter = "abcdefghijklmnopqrstuvwxyz"[record["seq"] % 26]
        assert record["stdout"] == letter * size + "\n"
        assert record["stderr"] == f"err{record['seq']}\n"
        assert record["task"] == line and record["exit_code"] == 0


@pytest.mark.parametrize(("fmt", "kills_wanted"), [("text", 10), ("jsonl", 4)])
def test_kill_and_resume_torture_ends_byte_exact(
    fmt: str,
    kills_wanted: int,
    sshd: SshServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGKILLs of the head at random moments of a run over two SSH hosts (outputs of a
    few bytes to a few MiB), each followed by --resume: the last --resume ends 0 with the
    output exact. (A run that ends before all its kills starts over, fresh, as a new
    round.) SSHFAN_TORTURE_SEED=N replays a seed (it is printed)."""
    seed = int(os.environ.get("SSHFAN_TORTURE_SEED") or time.time_ns() % 1_000_000)
    print(f"torture seed {seed} ({fmt})")
    rng = random.Random(seed)
    count = 32
    mark = tmp_path / "started.log"
    sizes = [rng.choice(TORTURE_SIZES) for _ in range(count)]
    lines = [
        f"echo {n} >> {mark}; sleep {rng.uniform(0.3, 0.8):.2f}; {big_task(n, size)}; "
        f"echo err{n} >&2"
        for n, size in enumerate(sizes, 1)
    ]
    tasks = write_tasks(tmp_path / "tasks.txt", lines)
    blocks = host_block(sshd, "one", slots=2) + host_block(sshd, "two", slots=2)
    hosts = write_file(tmp_path / "hosts.toml", blocks)
    out = tmp_path / f"out.{fmt}"
    kills = cycles = rounds = 0
    resume = False
    while True:
        extra = ["-f", fmt] + (["--resume"] if resume else [])
        head = Head(run_args(tasks, hosts, out, *extra), tmp_path, f"cycle{cycles}")
        cycles += 1
        try:
            if kills < kills_wanted:
                if rng.random() < 0.2:  # early: connecting, or before any result
                    delay = rng.uniform(0.0, 0.6)
                else:  # once a task of this run has started, at any moment after
                    starts = started(mark)
                    wait_for(
                        "a task start",
                        lambda h=head, n=starts: started(mark) > n or h.proc.poll() is not None,
                    )
                    delay = rng.uniform(0.0, 0.7)
                try:
                    head.proc.wait(delay)
                except subprocess.TimeoutExpired:
                    head.proc.kill()  # the head only, as a crash would
                    head.proc.wait()
                    kills += 1
                    resume = True
                    continue
            result = head.wait()
        finally:
            head.stop()
        check_exit(result, 0)
        check_torture_output(out, fmt, sizes, lines)
        rounds += 1
        if kills >= kills_wanted:
            break
        resume = False  # finished before its kills: a new round, from the start
    runs = [int(n) for n in mark.read_text().split()]
    assert set(runs) == set(range(1, count + 1))
    with capsys.disabled():
        print(
            f"\ntorture ({fmt}, seed {seed}): {kills} kills in {cycles} runs ({rounds} "
            f"round(s) of {count} tasks), {len(runs)} task starts ({len(runs) - rounds * count} "
            f"rerun), {sum(sizes)} output bytes a round"
        )


# ---------------------------------------------------------------------------
# Large stdout goes to disk once: straight into the output, the journal pointing to it
# ---------------------------------------------------------------------------

ONE_SLOT = '[[hosts]]\nname = "here"\nlocal = true\nslots = 1\n'  # tasks one at a time, in order


def counted(name: str, line: str) -> str:
    """LINE, first appending a line to the file NAME (how many times the task ran)."""
    return f"echo x >> {name}; {line}"


def runs_of(path: Path) -> int:
    """How many times a counted task ran."""
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_large_stdout_goes_into_the_output_once(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """Tasks next in order stream their stdout straight into the output: the journal holds
    only where it is (and the tails), and `sshfan results` reads it back from there."""
    sizes = [3_000_000, 5, 2_000_000]
    tasks = write_tasks(tmp_path / "tasks.txt", [big_task(n, s) for n, s in enumerate(sizes, 1)])
    hosts = write_file(tmp_path / "hosts.toml", ONE_SLOT)
    out = tmp_path / "out.txt"
    joblog = tmp_path / "joblog"
    ran = run_sshfan(run_args(tasks, hosts, out, "--joblog", str(joblog)), timeout=NO_HANG)
    check_exit(ran, 0)
    assert out.read_bytes() == big_expected(sizes)
    journal = Path(f"{out}.journal")
    assert journal.stat().st_size < MIB  # (it held every byte again: 5 MB)
    received = [int(row.split("\t")[5]) for row in joblog.read_text().splitlines()[1:]]
    assert sorted(received) == sorted(size + 1 for size in sizes)  # the joblog's Receive
    assert "in_output" in journal_done(journal)[1]
    shown = run_sshfan(["results", str(out), "--format", "jsonl"], timeout=NO_HANG)
    check_exit(shown, 0)
    lengths = [len(json.loads(line)["stdout"]) for line in shown.stdout.splitlines()]
    assert lengths == [size + 1 for size in sizes]


def test_kill_during_large_stdout_then_resume(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """The head killed while a task streams into the output: --resume keeps the finished
    task's bytes where they are (it does not run again), runs the cut one again over its
    partial output, and ends 0 with the output exact."""
    second = (
        "if [ -e again ]; then head -c 3000000 /dev/zero | tr '\\0' c; echo; "
        "else touch again; head -c 2000000 /dev/zero | tr '\\0' c; sleep 60; fi"
    )
    lines = [counted("ran1", big_task(1, 3_000_000)), counted("ran2", second), big_task(3, 7)]
    tasks = write_tasks(tmp_path / "tasks.txt", lines)
    hosts = write_file(tmp_path / "hosts.toml", ONE_SLOT)
    out = tmp_path / "out.txt"
    head = Head(run_args(tasks, hosts, out), tmp_path, "first")
    try:
        # Task 2's first pieces are in the output (past task 1's 3,000,001 bytes).
        wait_for("task 2's output", lambda: out.exists() and out.stat().st_size > 4_000_000)
    finally:
        head.stop()  # SIGKILL to its group: the stub and the task with it
    assert "in_output" in journal_done(Path(f"{out}.journal"))[1]
    resumed = run_sshfan(run_args(tasks, hosts, out, "--resume"), timeout=NO_HANG)
    check_exit(resumed, 0)
    assert out.read_bytes() == big_expected([3_000_000, 3_000_000, 7])
    assert (runs_of(tmp_path / "ran1"), runs_of(tmp_path / "ran2")) == (1, 2)


def test_resume_runs_again_a_task_whose_bytes_left_the_output(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """An output cut short after the run: --resume runs again the task whose stdout is no
    longer all there (and only it), and the output is exact again."""
    sizes = [2_000_000, 2_000_000]
    lines = [counted(f"ran{n}", big_task(n, s)) for n, s in enumerate(sizes, 1)]
    tasks = write_tasks(tmp_path / "tasks.txt", lines)
    hosts = write_file(tmp_path / "hosts.toml", ONE_SLOT)
    out = tmp_path / "out.txt"
    check_exit(run_sshfan(run_args(tasks, hosts, out), timeout=NO_HANG), 0)
    os.truncate(out, 3_000_000)  # task 2's bytes, from 2,000,001 on, are cut
    check_exit(run_sshfan(run_args(tasks, hosts, out, "--resume"), timeout=NO_HANG), 0)
    assert out.read_bytes() == big_expected(sizes)
    assert (runs_of(tmp_path / "ran1"), runs_of(tmp_path / "ran2")) == (1, 2)


def test_resume_failed_moves_the_later_tasks_output(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """--resume-failed runs a failed task again and its output grows: the large stdout of
    the task after it, which was in the output, is copied first, and comes out exact."""
    first = (
        "if [ -e again ]; then head -c 700000 /dev/zero | tr '\\0' b; echo; "
        "else touch again; echo short; exit 1; fi"
    )
    lines = [first, counted("ran2", big_task(2, 2_000_000))]
    tasks = write_tasks(tmp_path / "tasks.txt", lines)
    hosts = write_file(tmp_path / "hosts.toml", ONE_SLOT)
    out = tmp_path / "out.txt"
    check_exit(run_sshfan(run_args(tasks, hosts, out), timeout=NO_HANG), 1)
    assert "in_output" in journal_done(Path(f"{out}.journal"))[2]
    again = run_sshfan(run_args(tasks, hosts, out, "--resume-failed"), timeout=NO_HANG)
    check_exit(again, 0)
    assert out.read_bytes() == big_expected([700_000, 2_000_000])
    assert runs_of(tmp_path / "ran2") == 1


def test_a_retried_task_leaves_only_its_last_try_in_the_output(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A try that streamed stdout into the output and failed: the try that succeeds
    replaces it, whether its own output is large or a line."""
    retried = (
        "if [ -e again{n} ]; then {then}; "
        "else touch again{n}; head -c 1500000 /dev/zero | tr '\\0' x; exit 1; fi"
    )
    lines = [
        retried.format(n=1, then="echo ok"),
        retried.format(n=2, then="head -c 1000000 /dev/zero | tr '\\0' b; echo"),
    ]
    tasks = write_tasks(tmp_path / "tasks.txt", lines)
    hosts = write_file(tmp_path / "hosts.toml", ONE_SLOT)
    out = tmp_path / "out.txt"
    ran = run_sshfan(run_args(tasks, hosts, out, "--retries", "2"), timeout=NO_HANG)
    check_exit(ran, 0)
    assert out.read_bytes() == b"ok\n" + b"b" * 1_000_000 + b"\n"


@pytest.mark.parametrize("command", ["run", "all"])
def test_output_to_dev_null_keeps_its_journal_out_of_dev(
    command: str, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """-o /dev/null (or another stream that is not a file) is written in place, as stdout
    is, and the journal goes where stdout's would: not /dev/null.journal (as root, a file
    in /dev; as anyone else, a refusal for /dev not being writable)."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo a\necho b\n")
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(LOCAL_BLOCK)
    before = os.path.lexists("/dev/null.journal")
    if command == "run":
        result = run_sshfan(["run", str(tasks), "-o", "/dev/null"], timeout=NO_HANG)
        journal = tmp_path / "tasks.sshfan-journal"
        assert journal.is_file() and set(journal_done(journal)) == {1, 2}
    else:
        result = run_sshfan(["all", "-H", str(hosts), "-o", "/dev/null", "echo a"])
        assert not list(tmp_path.glob("*journal*"))  # a scratch journal, as for stdout
    check_exit(result, 0)
    assert b"/dev/null.journal" not in result.stderr
    assert os.path.lexists("/dev/null.journal") == before
    assert Path("/dev/null").is_char_device()


def test_output_to_dev_stdout_leading_to_a_file_keeps_its_journal_out_of_dev(
    tmp_path: Path,
) -> None:
    """`-o /dev/stdout` with stdout a file: the output is written there, and the journal
    goes where it goes for `-o -` (it used to be /dev/stdout.journal, beside /dev/stdout)."""
    tasks = write_tasks(tmp_path / "jobs.txt", ["echo 1", "echo 2"])
    hosts = write_file(tmp_path / "hosts.toml", LOCAL_BLOCK)
    target = tmp_path / "target.txt"
    argv = sshfan_argv("run", str(tasks), "--hosts", str(hosts), "-o", "/dev/stdout")
    with open(target, "wb") as stdout:
        done = subprocess.run(
            [*argv, "--no-progress"],
            cwd=tmp_path,
            env=sshfan_env(),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=NO_HANG,
        )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert target.read_bytes() == b"1\n2\n"
    assert (tmp_path / "jobs.sshfan-journal").exists()
    assert not Path("/dev/stdout.journal").exists()
