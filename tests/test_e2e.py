"""End-to-end: sshfan's merged output must equal running each task with /bin/sh here.

Every expected value is computed by running the same line through `/bin/sh -c LINE`
locally (stdin from /dev/null, cwd = the user's home), never written by hand.
The SSH hosts are all the one loopback server from the `sshd` fixture, listed
under several names to stand in for several machines, with host key checking on.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pwd
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sshd import SshServer
from support import (
    REPO_ROOT,
    RunSshfan,
    check_exit,
    closed_port,
    sshfan_argv,
    until_hosts_ran,
    write_hosts_file,
)

HOME = pwd.getpwuid(os.getuid()).pw_dir

# One task per entry; "" and whitespace-only entries are blank lines (no record,
# but they keep the line numbering). Tasks must give the same output on any host.
TASK_LINES: list[str] = [
    "echo hello",
    "",
    """printf '%s\\n' "it's" 'say "hi"' 'back\\slash' 'semi;colon' 'a|b&c'""",
    """x='a  b'; echo "$x" $x '$x' "\\$x" $((6*7)) ${#x} "$(echo sub)" `echo tick`""",
    "echo 'héllo wörld ✓ 日本語 🙂'",
    "   ",
    "printf '\\000\\001\\377\\376binary\\200'",
    "printf 'no trailing newline'",
    "printf 'utf-8 encoded surrogate: \\355\\240\\200\\n'",
    "printf 'cr\\r\\ntab\\tesc\\033[0m nul\\000 end\\n'",
    "yes abc | head -c 3000000",
    "seq 1 300000",
    'cat; echo "cat exit=$?"',
    "wc -c",
    'read line; echo "read=$? line=[$line]"',
    "test -t 0 || echo 'stdin is not a terminal'",
    "exec >&-; echo x >&2",
    "echo out; exit 3",
    "false",
    "exit 255",
    "kill -TERM $$",
    "echo partial; kill -KILL $$",
    "echo only-stderr >&2",
    "printf 'bad utf-8 on stderr: \\377\\n' >&2; echo fine",
    "yes err | head -c 200000 >&2; echo after-stderr",
    "",
    "echo last line without newline at end of file",
]


@dataclasses.dataclass(frozen=True)
class Expected:
    """What one task gives when run locally: the reference sshfan must match."""

    seq: int
    task: str
    stdout: bytes
    stderr: bytes
    exit_code: int
    signal: int | None


def tasks_text(lines: list[str]) -> str:
    """Join task lines into a tasks file's text (no newline after the last line)."""
    return "\n".join(lines)


def run_locally(lines: list[str]) -> list[Expected]:
    """Run every non-blank line with /bin/sh -c, as the contract says a host does."""
    env = dict(os.environ, HOME=HOME)
    expected = []
    for seq, line in enumerate(lines, 1):
        if not line.strip():
            continue
        done = subprocess.run(
            ["/bin/sh", "-c", line],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd=HOME,
            env=env,
            check=False,
        )
        code = done.returncode
        sig = -code if code < 0 else None
        expected.append(
            Expected(seq, line, done.stdout, done.stderr, 128 + sig if sig else code, sig)
        )
    return expected


@pytest.fixture(scope="module")
def expected() -> list[Expected]:
    """Return the local reference results for TASK_LINES."""
    return run_locally(TASK_LINES)


def assert_same_bytes(actual: bytes, wanted: bytes, what: str) -> None:
    """Assert two byte strings are equal, reporting where they first differ (not a huge diff)."""
    if actual == wanted:
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(actual, wanted, strict=False)) if a != b),
        min(len(actual), len(wanted)),
    )
    pytest.fail(
        f"{what}: {len(actual)} bytes, expected {len(wanted)}; first difference at byte {at}: "
        f"got {actual[max(0, at - 40) : at + 40]!r}, expected {wanted[max(0, at - 40) : at + 40]!r}"
    )


def output_field(record: dict[str, object], name: str) -> bytes:
    """Return a record's stdout or stderr bytes, checking the text-or-base64 rule."""
    text, b64 = record.get(name), record.get(name + "_b64")
    if b64 is not None:
        assert text is None, f"seq {record['seq']}: both {name} and {name}_b64 are set"
        assert isinstance(b64, str)
        raw = base64.b64decode(b64, validate=True)
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")  # base64 is only for output that is not UTF-8
        return raw
    assert isinstance(text, str), f"seq {record['seq']}: no {name} or {name}_b64: {record}"
    return text.encode("utf-8")


def check_jsonl(output: bytes, wanted: list[Expected], hosts: set[str]) -> list[dict]:
    """Assert a jsonl output holds exactly the expected records, in seq order."""
    assert output.endswith(b"\n"), "jsonl output must end with a newline"
    records = [json.loads(line) for line in output.decode("utf-8").splitlines()]
    assert [r["seq"] for r in records] == [w.seq for w in wanted]
    for record, want in zip(records, wanted, strict=True):
        where = f"seq {want.seq} ({want.task!r})"
        assert record["task"] == want.task, where
        assert record["host"] in hosts, where
        assert record["exit_code"] == want.exit_code, (where, record.get("stderr"))
        assert record.get("signal") == want.signal, where
        assert_same_bytes(output_field(record, "stdout"), want.stdout, f"{where} stdout")
        assert_same_bytes(output_field(record, "stderr"), want.stderr, f"{where} stderr")
        duration = record["duration_s"]
        assert isinstance(duration, (int, float)), where
        assert duration >= 0, where
        assert record["attempts"] == 1, where
    return records


def jsonl_run_args(tasks: Path, hosts: Path, out: Path) -> list[str]:
    """`sshfan run` arguments for TASKS on HOSTS into OUT as jsonl, without a progress bar."""
    return [
        "run",
        str(tasks),
        "--hosts",
        str(hosts),
        "-o",
        str(out),
        "--format",
        "jsonl",
        "--no-progress",
    ]


LOCAL_HOST = '\n[[hosts]]\nname = "here"\nlocal = true\nslots = 2\n'


def setup_hosts(setup: str, sshd: SshServer, tmp_path: Path) -> tuple[list[str], set[str]]:
    """Return the --hosts arguments and host names for a named host setup."""
    if setup == "ssh":
        path = write_hosts_file(tmp_path, sshd.hosts_toml(["h1", "h2"], slots=2))
        return ["--hosts", str(path)], {"h1", "h2"}
    if setup == "ssh+local":
        path = write_hosts_file(tmp_path, sshd.hosts_toml(["h1"], slots=2) + LOCAL_HOST)
        return ["--hosts", str(path)], {"h1", "here"}
    assert setup == "default-local"
    return [], {"local"}


# ---------------------------------------------------------------------------
# byte-exact results
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("setup", ["ssh", "ssh+local", "default-local"])
def test_text_output_is_local_stdout_in_order(
    setup: str,
    sshd: SshServer,
    run_sshfan: RunSshfan,
    tmp_path: Path,
    expected: list[Expected],
) -> None:
    """--format text: the output file is every task's stdout, concatenated in seq order."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(tasks_text(TASK_LINES))
    host_args, _names = setup_hosts(setup, sshd, tmp_path)
    out = tmp_path / "result.txt"
    args = ["run", str(tasks), *host_args, "-o", str(out), "--format", "text", "--no-progress"]
    result = run_sshfan(args)
    check_exit(result, 1)  # some tasks fail on purpose
    assert_same_bytes(out.read_bytes(), b"".join(e.stdout for e in expected), "text output")


@pytest.mark.parametrize("setup", ["ssh", "ssh+local", "default-local"])
def test_jsonl_records_match_local_runs(
    setup: str,
    sshd: SshServer,
    run_sshfan: RunSshfan,
    tmp_path: Path,
    expected: list[Expected],
) -> None:
    """--format jsonl: one record per non-blank line, in seq order, fields as run locally."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(tasks_text(TASK_LINES))
    host_args, names = setup_hosts(setup, sshd, tmp_path)
    out = tmp_path / "result.jsonl"
    args = ["run", str(tasks), *host_args, "-o", str(out), "--format", "jsonl", "--no-progress"]
    result = run_sshfan(args)
    check_exit(result, 1)
    check_jsonl(out.read_bytes(), expected, names)


@pytest.mark.parametrize("setup", ["ssh", "ssh+local", "default-local"])
def test_tasks_run_in_home_dir(
    setup: str, sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """Remote hosts run tasks in the login (home) directory, local ones in the current
    directory (here the home directory too, so every host's answers match)."""
    lines = ["pwd", "ls -a | head -c 10000 | md5sum"] * 4
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("\n".join(lines) + "\n")
    host_args, names = setup_hosts(setup, sshd, tmp_path)
    out = tmp_path / "result.jsonl"
    args = ["run", str(tasks), *host_args, "-o", str(out), "--format", "jsonl", "--no-progress"]
    result = run_sshfan(args, cwd=HOME)
    check_exit(result, 0)
    check_jsonl(out.read_bytes(), run_locally(lines), names)


# Set by the shells on the way (login shell, the task's /bin/sh) or naming the connection.
SHELL_VARS = {"_", "SHLVL", "PWD", "OLDPWD", "SSH_CLIENT", "SSH_CONNECTION"}


def env_of(text: str) -> dict[str, str]:
    """Parse `env` output (one NAME=value a line) into a dict, shell and connection
    variables left out."""
    pairs = (line.partition("=") for line in text.splitlines() if "=" in line)
    return {name: value for name, _, value in pairs if name not in SHELL_VARS}


def test_tasks_see_the_environment_plain_ssh_gives(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A task's environment is what `ssh host cmd` gives, plus the hosts file's env: not
    the LC_CTYPE=C.UTF-8 that the stub's Python sets itself under a C locale (PEP 538)."""
    plain = subprocess.run(
        [*sshd.ssh_argv(), "env"], capture_output=True, check=True, timeout=60
    ).stdout.decode()
    # The interpreter itself, not a version manager's shim (pyenv's adds PYENV_* and PATH).
    toml = sshd.hosts_toml(["h1"], python=sys.executable)
    hosts = write_hosts_file(tmp_path, toml + 'env = { EXTRA = "x y" }\n')
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("env\n")
    out = tmp_path / "env.txt"
    result = run_sshfan(["run", str(tasks), "--hosts", str(hosts), "-o", str(out), "--no-progress"])
    check_exit(result, 0)
    own = {"SSHFAN_SEQ": "1", "SSHFAN_SLOT": "1", "SSHFAN_HOST": "h1"}
    assert env_of(out.read_text()) == {**env_of(plain), "EXTRA": "x y", **own}


@pytest.mark.e2e
def test_local_tasks_see_the_environment_sshfan_was_given(tmp_path: Path) -> None:
    """Local tasks get sshfan's own environment, not what its Python added (PEP 538)."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("env\n")
    out = tmp_path / "env.txt"
    args = ["run", str(tasks), "-o", str(out), "--no-progress"]
    result = subprocess.run(sshfan_argv(*args), env=env, cwd=tmp_path, capture_output=True)
    check_exit(result, 0)
    own = {"SSHFAN_SEQ": "1", "SSHFAN_SLOT": "1", "SSHFAN_HOST": "local"}
    assert env_of(out.read_text()) == {**env, **own}


def test_all_succeeding_exits_zero(sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """Exit 0 when every task exits 0, with the output still matching the local run."""
    lines = [line for line in TASK_LINES if line.strip()]
    wanted = run_locally(lines)
    good = [w.task for w in wanted if w.exit_code == 0]
    assert len(good) > len(lines) // 2  # the reference itself is sane
    tasks = tmp_path / "good.txt"
    tasks.write_text("\n".join(good) + "\n")
    hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1", "h2"], slots=3))
    out = tmp_path / "good.jsonl"
    result = run_sshfan(jsonl_run_args(tasks, hosts, out))
    check_exit(result, 0)
    check_jsonl(out.read_bytes(), run_locally(good), {"h1", "h2"})


def test_one_failure_exits_one(sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """Exit 1 when everything ran but a single task exited non-zero."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("true\necho ok\nexit 7\necho ok2\n")
    hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1", "h2"]))
    out = tmp_path / "out.txt"
    result = run_sshfan(["run", str(tasks), "--hosts", str(hosts), "-o", str(out), "--no-progress"])
    check_exit(result, 1)
    assert out.read_bytes() == b"ok\nok2\n"


def test_work_spreads_over_hosts(sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """With one slot per host, both host entries get work (each task waits until both have
    started one, so a host that connects late still gets its share)."""
    gate = until_hosts_ran(tmp_path / "seen", 2)
    lines = [f"{gate}; echo task{i}" for i in range(8)]
    tasks = tmp_path / "slow.txt"
    tasks.write_text("\n".join(lines) + "\n")
    hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1", "h2"], slots=1))
    out = tmp_path / "slow.jsonl"
    result = run_sshfan(jsonl_run_args(tasks, hosts, out))
    check_exit(result, 0)
    # The reference runs the lines without their wait: the same output in no time.
    quick = run_locally([line.removeprefix(f"{gate}; ") for line in lines])
    wanted = [dataclasses.replace(want, task=lines[want.seq - 1]) for want in quick]
    records = check_jsonl(out.read_bytes(), wanted, {"h1", "h2"})
    assert {r["host"] for r in records} == {"h1", "h2"}


def test_tasks_from_stdin_to_stdout(sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """TASKS `-` reads stdin and `-o -` writes the merged output alone to stdout."""
    lines = ["echo one", "", "printf 'two\\377'", "echo three >&2; echo four"]
    hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1", "h2"]))
    result = run_sshfan(
        ["run", "-", "--hosts", str(hosts), "-o", "-", "--no-progress"],
        input=("\n".join(lines) + "\n").encode(),
    )
    check_exit(result, 0)
    assert_same_bytes(result.stdout, b"".join(e.stdout for e in run_locally(lines)), "stdout")


def test_default_output_path(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """Without -o the output is <tasks stem>.out in the current directory."""
    tasks = tmp_path / "jobs.list.txt"
    tasks.write_text("echo a\necho b\n")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    result = run_sshfan(["run", str(tasks), "--no-progress"], cwd=workdir)
    check_exit(result, 0)
    assert (workdir / "jobs.list.out").read_bytes() == b"a\nb\n"


# ---------------------------------------------------------------------------
# host keys and `sshfan check`
# ---------------------------------------------------------------------------


def test_check_lists_every_host(sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """`sshfan check` exits 0 and prints a row for every reachable host."""
    hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1", "h2"]) + LOCAL_HOST)
    result = run_sshfan(["check", "--hosts", str(hosts)])
    check_exit(result, 0)
    rows = result.stdout.decode().splitlines()
    for name in ("h1", "h2", "here"):
        assert any(name in row.split() for row in rows), (name, rows)


def test_check_fails_on_closed_port(sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """`sshfan check` exits non-zero and names the host whose port is closed."""
    text = sshd.hosts_toml(["h1"], connect_timeout=5)
    text += f'\n[[hosts]]\nname = "deadhost"\naddress = "127.0.0.1"\nport = {closed_port()}\n'
    hosts = write_hosts_file(tmp_path, text)
    result = run_sshfan(["check", "--hosts", str(hosts)])
    assert result.returncode != 0, result.stdout.decode()
    assert b"deadhost" in result.stdout + result.stderr
    assert b"Traceback" not in result.stderr


def wrong_known_hosts(sshd: SshServer, tmp_path: Path) -> Path:
    """Write a known_hosts that lists some other ed25519 key for the server."""
    key = tmp_path / "other_key"
    subprocess.run(
        ["ssh-keygen", "-t", "ed25519", "-N", "", "-q", "-f", str(key)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    key_type, key_b64 = key.with_name("other_key.pub").read_text().split()[:2]
    path = tmp_path / "wrong_known_hosts"
    path.write_text(f"[127.0.0.1]:{sshd.port} {key_type} {key_b64}\n")
    return path


def test_host_key_mismatch_runs_nothing(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A host whose key does not match known_hosts runs nothing; alone, the run exits 3."""
    marker = tmp_path / "ran"
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(f"touch {marker}\n")
    text = sshd.hosts_toml(["h1"], known_hosts=str(wrong_known_hosts(sshd, tmp_path)))
    hosts = write_hosts_file(tmp_path, text)
    result = run_sshfan(
        ["run", str(tasks), "--hosts", str(hosts), "-o", str(tmp_path / "o"), "--no-progress"]
    )
    check_exit(result, 3)
    assert not marker.exists()
    assert b"Traceback" not in result.stderr
    check = run_sshfan(["check", "--hosts", str(hosts)])
    assert check.returncode != 0
    assert not marker.exists()


def test_unknown_hosts_key_is_usage_error(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """An unknown key in the hosts file exits 2 with one line naming it, and runs nothing."""
    marker = tmp_path / "ran"
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(f"touch {marker}\n")
    hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1"], colour="blue"))
    result = run_sshfan(["run", str(tasks), "--hosts", str(hosts), "--no-progress"])
    check_exit(result, 2)
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "colour" in lines[0]
    assert "hosts.toml" in lines[0]
    assert b"Traceback" not in result.stderr
    assert not marker.exists()


# ---------------------------------------------------------------------------
# the test server itself (so a broken fixture is not mistaken for an sshfan bug)
# ---------------------------------------------------------------------------

SERVER_KINDS = [
    pytest.param(
        "openssh",
        marks=pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd"), reason="no sshd"),
    ),
    "asyncssh",
]


def ssh(server: SshServer, command: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run a command on the test server with the OpenSSH client."""
    return subprocess.run(
        [*server.ssh_argv(), command], input=stdin, capture_output=True, timeout=60, check=False
    )


def command(pid: int) -> str:
    """Return a process's command name, or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def process_state(pid: int) -> str:
    """Return the one-letter state of a process from /proc (R, S, T, Z, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_server_runs_commands_byte_exactly(
    kind: str, sshd_factory: Callable[..., SshServer]
) -> None:
    """The server runs a command in the home dir, passing bytes, stdin EOF and the exit code."""
    server = sshd_factory(kind)
    assert server.kind == kind
    done = ssh(server, "pwd; printf 'a\\000\\377'; wc -c; echo err >&2; exit 3", b"x" * 100000)
    assert (done.returncode, done.stderr) == (3, b"err\n")
    assert done.stdout == HOME.encode() + b"\na\x00\xff100000\n"


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_server_freeze_thaw_kill(kind: str, sshd_factory: Callable[..., SshServer]) -> None:
    """freeze() stops the whole tree (session and user processes), thaw() resumes, kill() ends."""
    server = sshd_factory(kind)
    session = subprocess.Popen(
        [*server.ssh_argv(), "echo started; exec sleep 300"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert session.stdout is not None
        assert session.stdout.readline() == b"started\n"
        deadline = time.monotonic() + 10
        while not any(command(pid) == "sleep" for pid in server.pids()):
            assert time.monotonic() < deadline, "the user's sleep never showed up in pids()"
            time.sleep(0.01)
        pids = server.pids()
        assert len(pids) >= 2  # the listener and at least the user's sleep
        server.freeze()
        assert {process_state(pid) for pid in pids} == {"T"}
        server.thaw()
        assert "T" not in {process_state(pid) for pid in pids}
        server.kill()
        assert session.wait(timeout=30) == 255  # the client sees the connection die
        assert server.pids() == []
        assert not [
            pid for pid in pids if os.path.exists(f"/proc/{pid}") and process_state(pid) != "Z"
        ]
    finally:
        session.kill()
        session.wait()
    server.stop()  # idempotent after kill
