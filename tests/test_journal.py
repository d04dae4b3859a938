"""The journal and the merged output under adversity: exit 0 means every result is in
the output, exact (README "When things fail").

Resume of a finished run with large outputs, `sshfan results` beside a live run, an
output or journal that is the tasks file, two runs on one output, a rerun that cannot
start, a full disk, options that change what the output looks like, and a seeded
kill-and-resume torture run over two SSH hosts.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from test_faults import (
    LOCAL_BLOCK,
    NO_HANG,
    check_exit,
    err_lines,
    journal_done,
    run_args,
    write_file,
)

RunSshfan = Callable[..., "subprocess.CompletedProcess[bytes]"]

REPO_ROOT = Path(__file__).resolve().parent.parent
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
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)

    def limit() -> None:
        """In the child: cap the size of files it writes."""
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return subprocess.run(
        [sys.executable, "-m", "sshfan", *args],
        cwd=cwd,
        env=env,
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
    """-o /dev/full: exit 3 with one line naming it (not exit 0); the journal then
    renders the whole output on --resume."""
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
    resumed = run_sshfan(run_args(tasks, hosts, out, "--resume", *args), timeout=NO_HANG)
    check_exit(resumed, 0)
    assert out.read_bytes() == big_expected(sizes)
