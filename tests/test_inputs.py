"""Bad input exits 2 with one line naming the file and the line or key; odd but valid input runs.

Most cases need no SSH: a hosts file is rejected before any host is contacted, and
where a run is needed it uses the default local host (this machine, no SSH).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support import (
    NO_HANG,
    RunSshfan,
    needs_parallel,
    run_parallel,
    sshfan_argv,
    sshfan_env,
    write_hosts_file,
)

import sshfan

AS_ROOT = os.geteuid() == 0
ROOT_REASON = "running as root: file permissions do not stop root from reading"


def stderr_lines(result: subprocess.CompletedProcess[bytes]) -> list[str]:
    """Return the non-empty lines sshfan wrote on stderr."""
    return [line for line in result.stderr.decode(errors="replace").splitlines() if line.strip()]


def assert_usage_error(result: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    """Assert exit 2 with exactly one stderr line, no traceback, containing every needle."""
    text = result.stderr.decode(errors="replace")
    assert result.returncode == 2, f"exit {result.returncode}, expected 2; stderr:\n{text}"
    assert "Traceback" not in text, text
    lines = stderr_lines(result)
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{text}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def names_line(message: str, path: Path, line: int) -> bool:
    """Tell whether an error message points at LINE of PATH (as path:N or "line N")."""
    return f"{path}:{line}:" in message or f"line {line}" in message


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """Return a path that a task creates if it ever runs (it must not, on bad input)."""
    return tmp_path / "task-ran"


@pytest.fixture
def tasks(tmp_path: Path, marker: Path) -> Path:
    """Write a tasks file whose only task leaves the marker behind."""
    path = tmp_path / "tasks.txt"
    path.write_text(f"touch {marker}\n")
    return path


def run_with_hosts(
    run_sshfan: RunSshfan, tasks: Path, hosts: Path | str, tmp_path: Path
) -> subprocess.CompletedProcess[bytes]:
    """Run sshfan on TASKS with the given hosts file, output into tmp_path."""
    out = tmp_path / "out.txt"
    return run_sshfan(
        ["run", str(tasks), "--hosts", str(hosts), "-o", str(out), "--no-progress"], timeout=60
    )


LOCAL = '[[hosts]]\nname = "here"\nlocal = true\n'

# (id, hosts file text, 1-based line the error must name, the key or name it must mention)
BAD_HOSTS: list[tuple[str, str, int, str]] = [
    ("not-toml", '[[hosts]]\nname = "a"\nslots = = 2\n', 3, ""),
    ("not-toml-bare-words", '[[hosts]]\nname = "a"\n\nthis is not toml\n', 4, ""),
    ("unknown-key", '[[hosts]]\nname = "a"\nlocal = true\ncolour = "blue"\n', 4, "colour"),
    (
        "unknown-key-in-defaults",
        '[defaults]\nslots = 1\nflavour = 3\n\n[[hosts]]\nname = "a"\nlocal = true\n',
        3,
        "flavour",
    ),
    ("slots-word", '[[hosts]]\nname = "a"\nlocal = true\nslots = "many"\n', 4, "slots"),
    ("slots-zero", '[[hosts]]\nname = "a"\nlocal = true\nslots = 0\n', 4, "slots"),
    ("slots-negative", '[[hosts]]\nname = "a"\nlocal = true\nslots = -1\n', 4, "slots"),
    ("slots-float", '[[hosts]]\nname = "a"\nlocal = true\nslots = 2.5\n', 4, "slots"),
    ("slots-bool", '[[hosts]]\nname = "a"\nlocal = true\nslots = true\n', 4, "slots"),
    (
        "slots-huge",
        '[[hosts]]\nname = "a"\nlocal = true\nslots = 9223372036854775807\n',
        4,
        "slots",
    ),
    ("port-string", '[[hosts]]\nname = "a"\nport = "22"\n', 3, "port"),
    ("port-range", '[[hosts]]\nname = "a"\n\n[[hosts]]\nname = "b"\nport = 70000\n', 6, "port"),
    ("local-string", '[[hosts]]\nname = "a"\nlocal = "yes"\n', 3, "local"),
    ("keepalive-zero", '[[hosts]]\nname = "a"\nkeepalive = 0\n', 3, "keepalive"),
    ("env-not-strings", '[[hosts]]\nname = "a"\nenv = { A = 1 }\n', 3, "env"),
    ("env-name-with-equals", '[[hosts]]\nname = "a"\nenv = { "A=B" = "1" }\n', 3, "A=B"),
    ("env-name-empty", '[[hosts]]\nname = "a"\nenv = { "" = "1" }\n', 3, "env"),
    ("env-value-nul", '[[hosts]]\nname = "a"\nenv = { A = "x\\u0000y" }\n', 3, "env"),
    ("keepalive-nan", '[[hosts]]\nname = "a"\nkeepalive = nan\n', 3, "keepalive"),
    ("connect-timeout-inf", '[[hosts]]\nname = "a"\nconnect_timeout = inf\n', 3, "connect_timeout"),
    ("name-tab", '[[hosts]]\nlocal = true\nname = "a\\tb"\n', 3, "name"),
    ("name-escape", '[[hosts]]\nlocal = true\nname = "a\\u001b[2J"\n', 3, "name"),
    ("identity-empty-list", '[[hosts]]\nname = "a"\nidentity = []\n', 3, "identity"),
    (
        "duplicate-name",
        '[[hosts]]\nname = "twin"\nlocal = true\n\n[[hosts]]\nname = "twin"\nlocal = true\n',
        5,
        "twin",
    ),
    ("name-in-defaults", '[defaults]\nname = "x"\n\n[[hosts]]\nname = "a"\n', 2, "name"),
    # What OpenSSH's ssh refuses as a host or user is refused here, not tried.
    ("address-option", '[[hosts]]\nname = "a"\naddress = "-oProxyCommand=x"\n', 3, "address"),
    ("address-space", '[[hosts]]\nname = "a"\naddress = "b c"\n', 3, "address"),
    ("name-space-no-address", '[[hosts]]\nport = 22\nname = "a b"\n', 3, "name"),
    ("name-metachar-no-address", '[[hosts]]\nname = "a;id"\n', 2, "name"),
    ("user-option", '[defaults]\nuser = "-x"\n\n[[hosts]]\nname = "a"\n', 2, "user"),
    ("user-metachar", '[[hosts]]\nname = "a"\nuser = "a`id`"\n', 3, "user"),
    # A local host has no SSH: its own table giving it SSH settings is a mistake.
    ("identity-empty", '[[hosts]]\nname = "a"\nidentity = ""\n', 3, "identity"),
    ("identity-list-empty", '[[hosts]]\nname = "a"\nidentity = ["k", ""]\n', 3, "identity"),
    ("known-hosts-empty", '[defaults]\nknown_hosts = ""\n[[hosts]]\nname = "a"\n', 2, "known"),
    ("local-identity", '[[hosts]]\nname = "a"\nlocal = true\nidentity = "k"\n', 4, "identity"),
    ("local-port", '[defaults]\nlocal = true\n[[hosts]]\nname = "a"\nport = 2\n', 5, "port"),
]


# Through the command line too: a TOML error, one in [defaults], one in a later table,
# and one across tables (test_parse_hosts_errors checks every case in-process).
CLI_BAD_HOSTS = (
    "not-toml",
    "unknown-key-in-defaults",
    "port-range",
    "duplicate-name",
    "slots-huge",
)


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [case[1:] for case in BAD_HOSTS if case[0] in CLI_BAD_HOSTS],
    ids=[case[0] for case in BAD_HOSTS if case[0] in CLI_BAD_HOSTS],
)
def test_bad_hosts_file_cli(
    text: str,
    line: int,
    key: str,
    run_sshfan: RunSshfan,
    tasks: Path,
    marker: Path,
    tmp_path: Path,
) -> None:
    """A bad hosts file exits 2 with one line naming file, line and key; nothing runs."""
    hosts = write_hosts_file(tmp_path, text)
    message = assert_usage_error(run_with_hosts(run_sshfan, tasks, hosts, tmp_path), str(hosts))
    assert names_line(message, hosts, line), f"line {line} not named in {message!r}"
    if key:
        assert key in message
    assert not marker.exists()


@pytest.mark.parametrize("text", ["# only a comment\n"], ids=["comment"])
def test_no_hosts_cli(
    text: str, run_sshfan: RunSshfan, tasks: Path, marker: Path, tmp_path: Path
) -> None:
    """A hosts file without any [[hosts]] table exits 2 with one line saying so."""
    hosts = write_hosts_file(tmp_path, text)
    message = assert_usage_error(run_with_hosts(run_sshfan, tasks, hosts, tmp_path), str(hosts))
    assert "host" in message.lower()
    assert not marker.exists()


def test_host_without_name_cli(
    run_sshfan: RunSshfan, tasks: Path, marker: Path, tmp_path: Path
) -> None:
    """A [[hosts]] table without a name is refused, naming the table's line and 'name'."""
    hosts = write_hosts_file(tmp_path, LOCAL + "\n[[hosts]]\nslots = 2\n")
    message = assert_usage_error(run_with_hosts(run_sshfan, tasks, hosts, tmp_path), str(hosts))
    assert names_line(message, hosts, 5)
    assert "name" in message
    assert not marker.exists()


def test_missing_hosts_file(
    run_sshfan: RunSshfan, tasks: Path, marker: Path, tmp_path: Path
) -> None:
    """A hosts file that does not exist exits 2 with one line naming it."""
    hosts = tmp_path / "no-such-hosts.toml"
    message = assert_usage_error(run_with_hosts(run_sshfan, tasks, hosts, tmp_path), str(hosts))
    assert "not found" in message or "no such" in message.lower()
    assert not marker.exists()


def test_hosts_file_is_directory(
    run_sshfan: RunSshfan, tasks: Path, marker: Path, tmp_path: Path
) -> None:
    """A directory given as the hosts file exits 2 with one line naming it."""
    hosts = tmp_path / "hosts.d"
    hosts.mkdir()
    message = assert_usage_error(run_with_hosts(run_sshfan, tasks, hosts, tmp_path), str(hosts))
    assert "directory" in message
    assert not marker.exists()


def test_hosts_file_not_utf8(
    run_sshfan: RunSshfan, tasks: Path, marker: Path, tmp_path: Path
) -> None:
    """A hosts file that is not UTF-8 exits 2 with one line naming it."""
    hosts = tmp_path / "hosts.toml"
    hosts.write_bytes(b'[[hosts]]\nname = "caf\xe9"\nlocal = true\n')
    assert_usage_error(run_with_hosts(run_sshfan, tasks, hosts, tmp_path), str(hosts))
    assert not marker.exists()


@pytest.mark.skipif(AS_ROOT, reason=ROOT_REASON)
def test_hosts_file_unreadable(
    run_sshfan: RunSshfan, tasks: Path, marker: Path, tmp_path: Path
) -> None:
    """A hosts file without read permission exits 2 with one line naming it."""
    hosts = write_hosts_file(tmp_path, LOCAL)
    hosts.chmod(0)
    try:
        message = assert_usage_error(run_with_hosts(run_sshfan, tasks, hosts, tmp_path), str(hosts))
    finally:
        hosts.chmod(0o644)
    assert "permission" in message.lower() or "readable" in message
    assert not marker.exists()


def test_check_rejects_bad_hosts_file(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """`sshfan check` applies the same hosts-file checks: exit 2, one line with line and key."""
    hosts = write_hosts_file(tmp_path, '[[hosts]]\nname = "a"\nlocal = true\nslots = "many"\n')
    result = run_sshfan(["check", "--hosts", str(hosts)], timeout=60)
    message = assert_usage_error(result, str(hosts), "slots")
    assert names_line(message, hosts, 4)


# ---------------------------------------------------------------------------
# tasks file
# ---------------------------------------------------------------------------


def run_tasks(
    run_sshfan: RunSshfan, tasks: Path | str, tmp_path: Path, *extra: str
) -> subprocess.CompletedProcess[bytes]:
    """Run sshfan on the default local host with output into tmp_path."""
    out = tmp_path / "out.txt"
    return run_sshfan(["run", str(tasks), "-o", str(out), "--no-progress", *extra], timeout=60)


def test_missing_tasks_file(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """A tasks file that does not exist exits 2 with one line naming it."""
    tasks = tmp_path / "no-such-tasks.txt"
    message = assert_usage_error(run_tasks(run_sshfan, tasks, tmp_path), str(tasks))
    assert "not found" in message or "no such" in message.lower()


def test_tasks_file_is_directory(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """A directory given as the tasks file exits 2 with one line naming it."""
    tasks = tmp_path / "tasks.d"
    tasks.mkdir()
    message = assert_usage_error(run_tasks(run_sshfan, tasks, tmp_path), str(tasks))
    assert "directory" in message


def test_tasks_file_not_utf8(run_sshfan: RunSshfan, marker: Path, tmp_path: Path) -> None:
    """A line that is not UTF-8 (a Latin-1 file name) runs as the bytes it is, as with
    GNU parallel: it stops nothing."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_bytes(
        f"touch {marker}\necho fine\necho caf\xe9\xff\necho after\n".encode("latin-1")
    )
    result = run_tasks(run_sshfan, tasks, tmp_path)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert (tmp_path / "out.txt").read_bytes() == b"fine\ncaf\xe9\xff\nafter\n"
    assert marker.exists()


def test_tasks_file_with_nul(run_sshfan: RunSshfan, marker: Path, tmp_path: Path) -> None:
    """A NUL byte on line 3 (no command can hold one) exits 2 naming the file and line 3;
    no task runs at all."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_bytes(f"touch {marker}\necho fine\necho a\0b\necho after\n".encode())
    message = assert_usage_error(run_tasks(run_sshfan, tasks, tmp_path), str(tasks))
    assert names_line(message, tasks, 3), message
    assert "NUL" in message
    assert not marker.exists()


@pytest.mark.skipif(AS_ROOT, reason=ROOT_REASON)
def test_tasks_file_unreadable(run_sshfan: RunSshfan, tasks: Path, tmp_path: Path) -> None:
    """A tasks file without read permission exits 2 with one line naming it."""
    tasks.chmod(0)
    try:
        message = assert_usage_error(run_tasks(run_sshfan, tasks, tmp_path), str(tasks))
    finally:
        tasks.chmod(0o644)
    assert "permission" in message.lower() or "readable" in message


def test_empty_tasks_file(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """An empty tasks file is a complete run of nothing: exit 0 and an empty output file."""
    tasks = tmp_path / "empty.txt"
    tasks.write_bytes(b"")
    out = tmp_path / "out.txt"
    out.write_bytes(b"stale output from an earlier run\n")
    result = run_tasks(run_sshfan, tasks, tmp_path)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert "Traceback" not in result.stderr.decode(errors="replace")
    assert out.read_bytes() == b""


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_blank_lines_only(fmt: str, run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """A tasks file of blank and whitespace-only lines runs nothing: exit 0, empty output."""
    tasks = tmp_path / "blank.txt"
    tasks.write_bytes(b"\n\n   \n\t\n\r\n\n")
    out = tmp_path / "out.txt"
    result = run_tasks(run_sshfan, tasks, tmp_path, "--format", fmt)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert out.read_bytes() == b""


def test_stdin_tasks(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """TASKS `-` reads the tasks from stdin; blank lines keep the seq numbering."""
    out = tmp_path / "out.jsonl"
    result = run_sshfan(
        ["run", "-", "-o", str(out), "--format", "jsonl", "--no-progress"],
        input=b"echo one\n\necho two\nprintf three\n",
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    lines = out.read_bytes().decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["seq"], r["stdout"]) for r in records] == [(1, "one\n"), (3, "two\n"), (4, "three")]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".sshfan-stdin")]
    assert leftovers == [], "the spooled copy of stdin must be removed after the run"


def test_tasks_from_a_fifo(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """A tasks file that is a FIFO (as `<(...)` gives a pipe) is read once, as stdin is:
    the run neither waits for a second writer for good nor finds it empty the second
    time; --resume reads it again, and no copy is left behind."""
    fifo = tmp_path / "tasks.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    for extra in ([], ["--resume"]):

        def feed() -> None:
            """Write the tasks once, as a shell's process substitution does."""
            with open(fifo, "wb") as writer:
                writer.write(b"echo one\n\necho two\n")

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        result = run_sshfan(
            ["run", str(fifo), "-o", str(out), "--no-progress", *extra], timeout=NO_HANG
        )
        writer.join(NO_HANG)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert out.read_bytes() == b"one\ntwo\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.journal", "tasks.fifo"]


@needs_parallel
def test_dry_run_of_stdin_and_of_a_fifo_matches_parallel(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """--dry-run reads tasks from stdin (`-`) or a FIFO once, as a run does, and prints
    parallel's commands for them (it took a directory for the copy of stdin: a traceback)."""
    lines = b"a b\n\nc'd\n"
    expected = run_parallel(["--dry-run", "-k", "-j1", "echo {}"], input=lines)
    result = run_sshfan(["run", "-", "-c", "echo {}", "--dry-run"], input=lines)
    assert (result.returncode, result.stdout) == (0, expected), result.stderr
    fifo = tmp_path / "tasks.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        """Write the tasks once, as a shell's process substitution does."""
        with open(fifo, "wb") as writer:
            writer.write(lines)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    result = run_sshfan(["run", str(fifo), "-c", "echo {}", "--dry-run"], timeout=NO_HANG)
    writer.join(NO_HANG)
    assert (result.returncode, result.stdout) == (0, expected), result.stderr


def test_stdin_tasks_not_utf8(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """Tasks read from stdin that are not UTF-8 run as their bytes; no spooled copy is left;
    a NUL byte exits 2 naming the line, leaving no spooled copy either."""
    result = run_sshfan(
        ["run", "-", "-o", str(tmp_path / "out.txt"), "--no-progress"],
        input=b"echo ok\nprintf '\xff\xfe'\n",
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert (tmp_path / "out.txt").read_bytes() == b"ok\n\xff\xfe"
    refused = run_sshfan(
        ["run", "-", "-o", str(tmp_path / "out.txt"), "--no-progress"],
        input=b"echo ok\n\xff\0\n",
        timeout=60,
    )
    # Named as the user gave it, not as the spooled copy sshfan reads it from.
    assert assert_usage_error(refused).startswith("sshfan: error: stdin:2: ")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sshfan-stdin")]
    dry = run_sshfan(["run", "-", "--dry-run"], input=b"echo ok\n\xff\0\n", timeout=60)
    assert assert_usage_error(dry).startswith("sshfan: error: stdin:2: ")


# ---------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--format", "xml"], "--format"),
        (["--timeout", "-1"], "--timeout"),
        (["--retries", "-1"], "--retries"),
        (["--timeout", "soon"], "--timeout"),
        (["-j", "99999999999999999999"], "--slots"),
        (["-S", "99999999999999999999/:"], "-S"),
    ],
    ids=[
        "format-xml",
        "timeout-negative",
        "retries-negative",
        "timeout-word",
        "slots-huge",
        "sshlogin-slots-huge",
    ],
)
def test_bad_option(
    args: list[str], needle: str, run_sshfan: RunSshfan, tasks: Path, marker: Path, tmp_path: Path
) -> None:
    """A bad option value exits 2 with one line naming the option; nothing runs."""
    assert_usage_error(run_tasks(run_sshfan, tasks, tmp_path, *args), needle)
    assert not marker.exists()


@pytest.mark.parametrize("timeout", ["30d", "1e9", "99999999999999999", "inf"])
def test_long_timeout_runs(
    timeout: str, run_sshfan: RunSshfan, tasks: Path, marker: Path, tmp_path: Path
) -> None:
    """A --timeout longer than one wait of the stub's loop (epoll's 24.8 days) runs the tasks."""
    result = run_tasks(run_sshfan, tasks, tmp_path, "--timeout", timeout)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert marker.exists()


def test_output_in_missing_directory(
    run_sshfan: RunSshfan, tasks: Path, marker: Path, tmp_path: Path
) -> None:
    """-o into a directory that does not exist exits 2 with one line naming the path."""
    out = tmp_path / "no" / "such" / "dir" / "out.txt"
    result = run_sshfan(["run", str(tasks), "-o", str(out), "--no-progress"], timeout=60)
    assert_usage_error(result, str(out.parent))
    assert not marker.exists()
    assert not (tmp_path / "no").exists()


def run_stdout_closed(
    tmp_path: Path, *args: str, close: str = ">&-"
) -> subprocess.CompletedProcess[bytes]:
    """Run sshfan ARGS in TMP_PATH with its stdout (or as CLOSE says) closed, as a shell's
    `>&-` leaves it."""
    argv = ["sh", "-c", f'exec "$@" {close}', "sh", *sshfan_argv(*args)]
    return subprocess.run(
        argv, cwd=tmp_path, env=sshfan_env(), stdin=subprocess.DEVNULL, capture_output=True
    )


def test_stderr_closed(tmp_path: Path) -> None:
    """With stderr closed (2>&-) the summary goes nowhere, not into the output on stdout:
    `-o -` gives the tasks' bytes alone, as parallel does, and the complete run ends 0."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo one\necho two >&2\necho three\n")
    result = run_stdout_closed(
        tmp_path, "run", str(tasks), "-o", "-", "--no-progress", close="2>&-"
    )
    assert (result.returncode, result.stdout) == (0, b"one\nthree\n")


def test_stdin_closed_for_tasks(marker: Path, tmp_path: Path) -> None:
    """TASKS '-' with stdin closed (<&-) is refused with one line (exit 2), no traceback."""
    result = run_stdout_closed(tmp_path, "run", "-", "-o", "out", "--no-progress", close="<&-")
    assert_usage_error(result, "stdin is closed")


@pytest.mark.parametrize("args", [["run", "-o", "-"], ["run", "--dry-run"]])
def test_stdout_closed_for_output(
    args: list[str], tasks: Path, marker: Path, tmp_path: Path
) -> None:
    """Output on a closed stdout is refused (exit 2, one line), not a traceback; nothing runs."""
    result = run_stdout_closed(tmp_path, *args[:1], str(tasks), *args[1:], "--no-progress")
    assert_usage_error(result, "stdout is closed")
    assert not marker.exists()


def test_stdout_closed_output_to_file(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """A closed stdout does not matter to a run whose output is a file: it ends 0 and
    complete; `sshfan results`, which prints on stdout, is refused with one line."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo one\necho two\n")
    out = tmp_path / "out.txt"
    result = run_stdout_closed(tmp_path, "run", str(tasks), "-o", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"Traceback" not in result.stderr
    assert out.read_bytes() == b"one\ntwo\n"
    assert_usage_error(run_stdout_closed(tmp_path, "results", str(out)), "stdout is closed")


def test_bad_tasks_file_keeps_previous_output(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """Refusing a tasks file (exit 2, nothing ran) leaves an earlier output file untouched."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_bytes(b"echo ok\necho \0\n")
    out = tmp_path / "out.txt"
    out.write_bytes(b"results of an earlier run\n")
    assert_usage_error(run_tasks(run_sshfan, tasks, tmp_path), str(tasks))
    assert out.read_bytes() == b"results of an earlier run\n"


def finished_run(run_sshfan: RunSshfan, tmp_path: Path) -> tuple[Path, Path, Path]:
    """Run two tasks to completion on the local host; return tasks, output and journal paths."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo a\necho b\n")
    result = run_tasks(run_sshfan, tasks, tmp_path)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    out = tmp_path / "out.txt"
    assert out.read_bytes() == b"a\nb\n"
    return tasks, out, Path(str(out) + ".journal")


def test_resume_with_changed_tasks_file(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """--resume after the tasks file changed: exit 2 naming the journal; output and journal kept."""
    tasks, out, journal = finished_run(run_sshfan, tmp_path)
    before = journal.read_bytes()
    tasks.write_text("echo a\necho b\necho c\n")
    assert_usage_error(run_tasks(run_sshfan, tasks, tmp_path, "--resume"), "journal")
    assert journal.read_bytes() == before
    assert out.read_bytes() == b"a\nb\n"


@pytest.mark.parametrize(
    "damage",
    [b"", b"this is not a journal at all\n" * 10],
    ids=["empty", "garbage"],
)
def test_resume_with_damaged_journal(damage: bytes, run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """--resume from a journal that is empty or not a journal: exit 2, one line naming it."""
    tasks, _out, journal = finished_run(run_sshfan, tmp_path)
    journal.write_bytes(damage)
    assert_usage_error(run_tasks(run_sshfan, tasks, tmp_path, "--resume"), str(journal))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'{"seq": 1,', b'{"seq":-1,'),
        (b'{"seq": 1,', b'{"seq": 1;'),
        (b'"exit_code"', b'"exit_codE"'),
    ],
    ids=["negative-seq", "not-json", "no-exit-code"],
)
def test_journal_with_a_damaged_record(
    old: bytes, new: bytes, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A whole record that does not read as one (framing intact): --resume and `sshfan
    results` exit 2 with one line naming the journal, never a traceback."""
    tasks, out, journal = finished_run(run_sshfan, tmp_path)
    data = journal.read_bytes()
    assert data.count(old) >= 1
    journal.write_bytes(data.replace(old, new, 1))
    assert_usage_error(run_tasks(run_sshfan, tasks, tmp_path, "--resume"), str(journal), "corrupt")
    assert_usage_error(run_sshfan(["results", str(out)]), str(journal), "corrupt")


@pytest.mark.parametrize(
    "hosts", [b"not json", b'{"onall": ["b", "a", "c"]}'], ids=["torn", "reordered"]
)
def test_onall_journal_with_a_damaged_host_list(
    hosts: bytes, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """An --onall journal's host list record (hosts that joined) that does not read, or
    does not extend the hosts before it: exit 2, one line naming the journal."""
    hosts_file = write_hosts_file(
        tmp_path, "".join(f'[[hosts]]\nname = "{n}"\nlocal = true\nslots = 1\n' for n in "ab")
    )
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo x\n")
    args = ["run", str(tasks), "--onall", "-H", str(hosts_file), "-o", "out.txt", "--no-progress"]
    result = run_sshfan(args)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    journal = tmp_path / "out.txt.journal"
    with journal.open("ab") as handle:
        handle.write(sshfan.encode_frame(sshfan.KIND_HOSTS, hosts))
    assert_usage_error(run_sshfan([*args, "--resume"]), journal.name, "corrupt")
    assert_usage_error(run_sshfan(["results", "out.txt"]), journal.name, "corrupt")


def test_resume_without_journal_runs_everything(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """--resume with no journal yet is an ordinary full run."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo a\necho b\n")
    result = run_tasks(run_sshfan, tasks, tmp_path, "--resume")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert (tmp_path / "out.txt").read_bytes() == b"a\nb\n"


# ---------------------------------------------------------------------------
# parse_hosts and load_hosts, called directly
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "key"), [case[1:] for case in BAD_HOSTS], ids=[case[0] for case in BAD_HOSTS]
)
def test_parse_hosts_errors(text: str, line: int, key: str) -> None:
    """parse_hosts raises UsageError (exit code 2) naming the source, line and key."""
    with pytest.raises(sshfan.UsageError) as caught:
        sshfan.parse_hosts(text, "cluster.toml")
    message = str(caught.value)
    assert caught.value.exit_code == 2
    assert "\n" not in message
    assert message.startswith("cluster.toml")
    assert f"cluster.toml:{line}:" in message or f"line {line}" in message, message
    if key:
        assert key in message


@pytest.mark.parametrize(
    "text",
    ["", "# only a comment\n", "[defaults]\nslots = 2\n", "hosts = []\n"],
    ids=["empty", "comment", "defaults-only", "empty-array"],
)
def test_parse_hosts_no_hosts(text: str) -> None:
    """parse_hosts refuses a file with no hosts, in one line naming it (exit code 2)."""
    with pytest.raises(sshfan.UsageError, match="cluster.toml") as caught:
        sshfan.parse_hosts(text, "cluster.toml")
    assert caught.value.exit_code == 2
    assert "\n" not in str(caught.value) and "host" in str(caught.value).lower()


def test_parse_hosts_names_that_are_labels() -> None:
    """A name ssh would refuse is fine as a label: with an address, or on a local host."""
    specs = sshfan.parse_hosts(
        '[[hosts]]\nname = "rack 1"\naddress = "10.0.0.1"\n'
        '[[hosts]]\nname = "here & now"\nlocal = true\n',
        "h.toml",
    )
    assert [spec.name for spec in specs] == ["rack 1", "here & now"]


def test_parse_hosts_ssh_defaults_beside_a_local_host() -> None:
    """[defaults]' SSH settings are for the SSH hosts; a local host beside them is fine."""
    specs = sshfan.parse_hosts(
        '[defaults]\nuser = "ci"\nport = 2222\n[[hosts]]\nname = "a"\n'
        '[[hosts]]\nname = "here"\nlocal = true\n',
        "h.toml",
    )
    assert [(spec.name, spec.local) for spec in specs] == [("a", False), ("here", True)]


def test_parse_hosts_local_with_address() -> None:
    """A local host cannot also have an address."""
    with pytest.raises(sshfan.UsageError, match="address"):
        sshfan.parse_hosts('[[hosts]]\nname = "a"\nlocal = true\naddress = "x"\n', "h.toml")


def test_load_hosts_missing_file(tmp_path: Path) -> None:
    """load_hosts turns a missing file into a UsageError naming it."""
    path = tmp_path / "absent.toml"
    with pytest.raises(sshfan.UsageError, match="absent.toml"):
        sshfan.load_hosts(path)


def test_load_hosts_directory(tmp_path: Path) -> None:
    """load_hosts turns a directory into a UsageError naming it."""
    with pytest.raises(sshfan.UsageError, match="directory"):
        sshfan.load_hosts(tmp_path)


def test_load_hosts_defaults(tmp_path: Path) -> None:
    """load_hosts fills in defaults, applies [defaults], and normalises values."""
    path = write_hosts_file(
        tmp_path,
        "\n".join(
            [
                "[defaults]",
                'user = "ci"',
                "port = 2222",
                "slots = 3",
                "",
                "[[hosts]]",
                'name = "plain"',
                "",
                "[[hosts]]",
                'name = "here"',
                "local = true",
                "",
                "[[hosts]]",
                'name = "tuned"',
                'address = "10.0.0.5"',
                'identity = "~/.ssh/id_one"',
                "known_hosts = false",
                'slots = "auto"',
                "connect_timeout = 3",
                "keepalive = 1",
                'env = { ZED = "z", ALPHA = "a" }',
                'workdir = "/tmp"',
                "",
                "[[hosts]]",
                'name = "keys"',
                'identity = ["~/a", "/b"]',
                'python = "/opt/py/bin/python3"',
                "",
            ]
        ),
    )
    plain, here, tuned, keys = sshfan.load_hosts(path)
    assert plain == sshfan.HostSpec(name="plain", user="ci", port=2222, slots=3)
    assert plain.address is None and plain.identity is None and plain.known_hosts is None
    assert plain.python == "python3"
    assert plain.connect_timeout == 10.0 and plain.keepalive == 15.0
    assert plain.local is False and plain.env == () and plain.workdir is None

    assert here.local is True
    assert here.python == sys.executable  # a local host runs the head's own Python
    assert here.slots == 3

    assert tuned.address == "10.0.0.5"
    assert tuned.identity == ("~/.ssh/id_one",)
    assert tuned.known_hosts is False
    assert tuned.slots is None  # "auto": the CPU count the stub reports
    assert isinstance(tuned.connect_timeout, float) and tuned.connect_timeout == 3.0
    assert isinstance(tuned.keepalive, float) and tuned.keepalive == 1.0
    assert tuned.env == (("ALPHA", "a"), ("ZED", "z"))
    assert tuned.workdir == "/tmp"
    assert tuned.user == "ci" and tuned.port == 2222

    assert keys.identity == ("~/a", "/b")
    assert keys.python == "/opt/py/bin/python3"
    assert keys.slots == 3


def test_local_host_default() -> None:
    """Without --hosts the run uses one local host whose slots come from the CPU count."""
    spec = sshfan.local_host()
    assert spec.local is True
    assert spec.slots is None
    assert spec.name == "local"
    assert spec.python == sys.executable
