"""Running like GNU parallel: --pipe chunks, --block sizes, --halt, where and how tasks run."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from sshd import SshServer

import sshfan

PARALLEL = shutil.which("parallel")
needs_parallel = pytest.mark.skipif(PARALLEL is None, reason="GNU parallel is not installed")


def _parallel(args: list[str], cwd: Path, data: bytes | None = None) -> bytes:
    """Run GNU parallel (no citation notice) with ARGS in CWD; return its stdout."""
    assert PARALLEL is not None
    result = subprocess.run(
        [PARALLEL, "--will-cite", *args],
        input=data,
        capture_output=True,
        cwd=cwd,
        check=False,
        timeout=120,
    )
    return result.stdout


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


@needs_parallel
@pytest.mark.parametrize(("name", "block"), FITTING)
def test_pipe_chunks_end_where_gnu_parallels_do(tmp_path: Path, name: str, block: str) -> None:
    """Where every line fits in the block, the chunks are GNU parallel's, byte for byte."""
    data = TRICKY_DATA[name]
    path = tmp_path / "data"
    path.write_bytes(data)
    theirs = _parallel(["--pipe", "--block", block, "-k", "cat; echo ==="], tmp_path, data)
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
    theirs = _parallel(["--pipe", "--block", "1k", "-k", "wc -c"], tmp_path, data.read_bytes())
    assert ours.stdout.split() == theirs.split()
    for bad in ("inf", "0", "-1", "2G", "lots"):
        refused = run_sshfan(["run", str(data), "--pipe", "--block", bad, "-c", "cat"])
        assert refused.returncode == 2, (bad, refused.stderr)
        assert refused.stderr.count(b"\n") == 1 and b"--block" in refused.stderr, refused.stderr


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
