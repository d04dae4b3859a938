"""GNU parallel's habits, per-host env/workdir, `sshfan results`, and the Python API, end to end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sshd import SshServer
from support import (
    own_number,
    procs_with,
    sshfan_argv,
    sshfan_command,
    sshfan_env,
    until_hosts_ran,
    write_hosts_file,
)

import sshfan


def test_tag_joblog_and_slots_over_ssh(sshd: SshServer, tmp_path: Path, run_sshfan) -> None:
    """--tagstring '{host}\\t{#}' prefixes lines with host and seq (--tag with the line, as
    GNU parallel's); --joblog is GNU parallel's; -j sets slots."""
    hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1", "h2"], slots=1))
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("printf 'a\\nb\\n'\n\necho one\nexit 4\nkill -KILL $$\n")
    out = tmp_path / "out.txt"
    joblog = tmp_path / "joblog.tsv"
    args = ["run", str(tasks), "--hosts", str(hosts), "-o", str(out), "--no-progress"]
    result = run_sshfan([*args, "--tagstring", "{host}\\t{#}", "--joblog", str(joblog), "-j", "3"])
    assert result.returncode == 1, result.stderr
    lines = out.read_text().splitlines()
    assert [line.split("\t", 2)[1:] for line in lines] == [["1", "a"], ["1", "b"], ["3", "one"]]
    assert all(line.split("\t")[0] in ("h1", "h2") for line in lines)
    tagged = run_sshfan([*args, "--tag", "-j", "3"])
    assert tagged.returncode == 1, tagged.stderr
    assert out.read_text() == "printf 'a\\nb\\n'\ta\nprintf 'a\\nb\\n'\tb\necho one\tone\n"
    rows = [row.split("\t") for row in joblog.read_text().splitlines()]
    assert rows[0] == [
        "Seq",
        "Host",
        "Starttime",
        "JobRuntime",
        "Send",
        "Receive",
        "Exitval",
        "Signal",
        "Command",
    ]
    by_seq = {int(row[0]): row for row in rows[1:]}
    assert sorted(by_seq) == [1, 3, 4, 5]
    assert by_seq[4][6] == "4" and by_seq[5][7] == "9"
    assert by_seq[1][5] == "4"  # bytes received: "a\nb\n"
    assert by_seq[3][8] == "echo one"


def test_halt_on_error_stops_new_tasks_and_resume_runs_the_rest(
    sshd: SshServer, tmp_path: Path, run_sshfan
) -> None:
    """After the first failure no new task starts; exit 1; --resume runs what was left."""
    hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1"], slots=1))
    tasks = tmp_path / "tasks.txt"
    # One slot: tasks 2-11 wait queued behind the failing task 1 (no sleep of theirs is
    # needed for that: the stub holds its queue after a failure until the head says).
    tasks.write_text("sleep 0.3; exit 1\n" + "".join(f"echo {n}\n" for n in range(2, 12)))
    out = tmp_path / "out.jsonl"
    args = ["run", str(tasks), "--hosts", str(hosts), "-o", str(out), "--format", "jsonl"]
    first = run_sshfan([*args, "--no-progress", "--halt-on-error"])
    assert first.returncode == 1, first.stderr
    assert b"halt" in first.stderr
    done = [json.loads(line)["seq"] for line in out.read_text().splitlines()]
    assert done == [1]  # the stub holds its queue after a failure until the head says
    second = run_sshfan([*args, "--no-progress", "--resume"])
    assert second.returncode == 1  # task 1 still failed
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seq"] for r in records] == list(range(1, 12))
    assert [r["stdout"] for r in records[1:]] == [f"{n}\n" for n in range(2, 12)]


def test_env_and_workdir_per_host(sshd: SshServer, tmp_path: Path, run_sshfan) -> None:
    """env and workdir from the hosts file reach the tasks, per host."""
    workdir = tmp_path / "wd"
    workdir.mkdir()
    text = sshd.hosts_toml(["h1"], slots=1).replace(
        'name = "h1"', f'name = "h1"\nenv = {{ WHO = "first" }}\nworkdir = "{workdir}"'
    )
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(text)
    tasks = tmp_path / "tasks.txt"
    tasks.write_text('echo "$WHO $(pwd)"\n')
    out = tmp_path / "out.txt"
    result = run_sshfan(["run", str(tasks), "--hosts", str(hosts), "-o", str(out)])
    assert result.returncode == 0, result.stderr
    assert out.read_text() == f"first {workdir}\n"


def test_results_lists_failures_from_the_journal(
    sshd: SshServer, tmp_path: Path, run_sshfan
) -> None:
    """`sshfan results OUT --failed` shows the failed tasks and their stderr, runs nothing."""
    hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1"], slots=2))
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo fine\necho broken >&2; exit 3\necho also fine\n")
    out = tmp_path / "out.txt"
    assert run_sshfan(["run", str(tasks), "--hosts", str(hosts), "-o", str(out)]).returncode == 1
    listed = run_sshfan(["results", str(out), "--failed"])
    assert listed.returncode == 1
    text = listed.stdout.decode()
    assert "broken" in text and "exit 3" in text
    assert "fine" not in text
    everything = run_sshfan(["results", str(out), "--format", "jsonl"])
    assert [json.loads(line)["seq"] for line in everything.stdout.splitlines()] == [1, 2, 3]
    missing = run_sshfan(["results", str(tmp_path / "nope.txt")])
    assert missing.returncode == 2 and b"no journal" in missing.stderr


def test_check_reports_auto_slots_as_the_cpu_count(
    sshd: SshServer, tmp_path: Path, run_sshfan
) -> None:
    """slots = "auto" becomes the CPU count the stub reports."""
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(sshd.hosts_toml(["h1"]).replace("slots = 1", 'slots = "auto"'))
    result = run_sshfan(["check", "--hosts", str(hosts)])
    assert result.returncode == 0, result.stderr
    row = result.stdout.decode().splitlines()[1].split()
    assert row[0] == "h1" and row[1] == "ok"
    assert int(row[4]) == len(os.sched_getaffinity(0))


def test_python_api_yields_whole_results(sshd: SshServer, tmp_path: Path) -> None:
    """run_tasks yields every result with whole output, large and binary included."""
    hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1", "h2"], slots=2))
    commands = ["echo one", "head -c 600000 /dev/zero", "printf '\\377'; exit 5"]
    results = {r.seq: r for r in sshfan.run_tasks(commands, hosts=str(hosts))}
    assert sorted(results) == [1, 2, 3]
    assert results[1].stdout == b"one\n" and results[1].ok
    assert results[2].stdout == b"\0" * 600_000
    assert results[3].exit_code == 5 and results[3].stdout == b"\xff"
    assert {r.host for r in results.values()} <= {"h1", "h2"}


def test_python_api_async_twin_and_early_stop_kills_tasks(sshd: SshServer, tmp_path: Path) -> None:
    """The async iterator yields as tasks finish; leaving early kills what still runs."""
    hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1"], slots=2))
    marker = own_number("43.217")

    async def first_only() -> bytes:
        """Take the first result and leave."""
        async for result in sshfan.run_tasks_async(["echo quick", f"sleep {marker}"], hosts):
            return result.stdout
        return b""

    assert asyncio.run(first_only()) == b"quick\n"
    deadline = time.monotonic() + 10
    while procs_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not procs_with(marker)


def test_python_api_raises_when_no_host_is_left(tmp_path: Path) -> None:
    """A run whose every host fails raises RunError instead of returning partial results."""
    hosts = [sshfan.HostSpec(name="nowhere", address="127.0.0.1", port=1, connect_timeout=3)]
    with pytest.raises(sshfan.RunError, match="could not finish"):
        list(sshfan.run_tasks(["echo x"], hosts=hosts))


def test_command_template_quotes_lines_like_gnu_parallel(tmp_path: Path, run_sshfan) -> None:
    """--command fills {} {#} {.} {/} {//} {/.} with the quoted line; no {} appends it; a
    blank line is an empty argument, as in GNU parallel."""
    tasks = tmp_path / "names.txt"
    tasks.write_text("dir/a b.tar.gz\n\nit's $HOME\n")
    out = tmp_path / "out.txt"
    template = "printf '%s|' {#} {} {.} {/} {//} {/.}"
    result = run_sshfan(["run", str(tasks), "-c", template, "-o", str(out)])
    assert result.returncode == 0, result.stderr
    assert out.read_text() == (
        "1|dir/a b.tar.gz|dir/a b.tar|a b.tar.gz|dir|a b.tar|"
        "2||||.||"
        "3|it's $HOME|it's $HOME|it's $HOME|.|it's $HOME|"
    )
    appended = run_sshfan(["run", str(tasks), "-c", "printf '<%s>'", "-o", "-"])
    assert appended.stdout == b"<dir/a b.tar.gz><><it's $HOME>"


def test_known_hosts_accept_new_records_then_enforces(
    sshd: SshServer, tmp_path: Path, run_sshfan
) -> None:
    """accept-new trusts a first-seen key and records it; a changed key is refused after."""
    home = tmp_path / "home"
    home.mkdir()
    hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1"], known_hosts="accept-new"))
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo hi\n")
    args = ["run", str(tasks), "--hosts", str(hosts), "-o", str(tmp_path / "out.txt")]
    first = run_sshfan(args, env={"HOME": str(home)})
    assert first.returncode == 0, first.stderr
    recorded = (home / ".ssh" / "known_hosts").read_text()
    assert (home / ".ssh").stat().st_mode & 0o777 == 0o700  # created private, as by OpenSSH
    assert recorded.split()[0] == f"[127.0.0.1]:{sshd.port}"
    assert recorded.split()[1:3] == sshd.known_hosts.read_text().split()[1:3]
    again = run_sshfan(args, env={"HOME": str(home)})
    assert again.returncode == 0
    assert (home / ".ssh" / "known_hosts").read_text() == recorded  # not recorded twice
    other = "AAAAC3NzaC1lZDI1NTE5AAAAIBAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    fields = recorded.split()
    (home / ".ssh" / "known_hosts").write_text(f"{fields[0]} ssh-ed25519 {other}\n")
    changed = run_sshfan(args, env={"HOME": str(home)})
    assert changed.returncode == 3
    assert b"does not match" in changed.stderr and b"known_hosts:1" in changed.stderr


@pytest.mark.e2e
def test_readme_api_example_runs(tmp_path: Path) -> None:
    """The README's first Python API example runs as written and prints a line per task."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "example.py"
    script.write_text(example)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=sshfan_env(), timeout=60
    )
    assert result.returncode == 0, result.stderr
    rows = sorted(line.split() for line in result.stdout.splitlines())
    assert rows == sorted([str(n + 1), "local", "0", str(n)] for n in range(8))


@pytest.mark.e2e
def test_readme_first_command_runs_a_job(tmp_path: Path) -> None:
    """The README's first command, past its venv install, writes the job's tasks.out."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    command = readme.split("```sh\n", 1)[1].split("```", 1)[0].strip()
    steps = command.split(" && ")
    assert steps[:2] == ["python3 -m venv .venv", ".venv/bin/pip install ."]
    sshfan_command(tmp_path / ".venv" / "bin")  # the entry point the install would make
    result = subprocess.run(
        ["sh", "-c", " && ".join(steps[2:])],
        cwd=tmp_path, capture_output=True, text=True, env=sshfan_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    hostname = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    uname = subprocess.run(["uname", "-sr"], capture_output=True, text=True).stdout
    assert result.stdout == f"hello from {hostname}\n{uname}42\n"


def _run_in_terminal(args: list[str], cwd: Path) -> bytes:
    """Run sshfan on a pseudo-terminal of 120x40 and return all it printed there."""
    import fcntl
    import pty
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: become the terminal's program
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.chdir(cwd)
        os.execve(sys.executable, sshfan_argv(*args), sshfan_env())
    printed = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        printed += data
    os.waitpid(pid, 0)
    os.close(fd)
    return printed


@pytest.mark.e2e
def test_progress_bar_on_a_terminal_and_not_with_no_progress(tmp_path: Path) -> None:
    """On a terminal the bar shows done/total, rate and counts; --no-progress hides it."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(f"sleep 0.05; echo {n}\n" for n in range(40)))
    shown = _run_in_terminal(["run", str(tasks), "-o", str(tmp_path / "o")], tmp_path).decode()
    assert "/40 [" in shown and "task/s" in shown and "failed=" in shown
    hidden = _run_in_terminal(
        ["run", str(tasks), "-o", str(tmp_path / "o"), "--no-progress"], tmp_path
    ).decode()
    assert "task/s" not in hidden and "40 of 40 tasks done" in hidden


def test_a_run_on_a_terminal_forks_its_local_stub(tmp_path: Path) -> None:
    """With the progress bar (a terminal), the head runs no thread of its own when local
    stubs start, so they are forks of the head, as without a terminal (tests/test_perf.py)."""
    tasks = tmp_path / "tasks.txt"
    stub = tmp_path / "stub.txt"
    tasks.write_text(f"tr '\\0' ' ' < /proc/$PPID/cmdline > {stub}\n")  # the stub's argv
    shown = _run_in_terminal(["run", str(tasks), "-o", str(tmp_path / "o")], tmp_path).decode()
    assert "1 of 1 tasks done" in shown, shown
    assert f"-m sshfan run {tasks} -o " in stub.read_text(), stub.read_text()


def test_pipe_feeds_chunks_on_stdin_and_merges_in_order(
    sshd: SshServer, tmp_path: Path, run_sshfan
) -> None:
    """--pipe cuts the data at line ends, feeds each chunk to one run, merges in chunk order."""
    hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1", "h2"], slots=2))
    data = tmp_path / "data.txt"
    data.write_bytes(b"".join(b"line %d \xc3\xa9\n" % n for n in range(300_000)))
    out = tmp_path / "out.txt"
    base = ["run", str(data), "--hosts", str(hosts), "--pipe", "--no-progress"]
    result = run_sshfan([*base, "-c", "tr a-z A-Z", "--block", "512k", "-o", str(out)])
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == data.read_bytes().upper().replace(b"\xc3\xa9", b"\xc3\xa9")
    counts = run_sshfan([*base, "-c", "wc -l", "--lines", "70000", "-o", "-"])
    assert [int(n) for n in counts.stdout.split()] == [70_000] * 4 + [20_000]


def test_pipe_task_that_ignores_stdin_does_not_hang(tmp_path: Path, run_sshfan) -> None:
    """A command that never reads its chunk still ends; the data is simply not consumed."""
    data = tmp_path / "data.txt"
    data.write_bytes(b"x" * 300_000 + b"\n")
    result = run_sshfan(
        ["run", str(data), "--pipe", "-c", "echo done", "-o", "-", "--no-progress"], timeout=60
    )
    assert result.returncode == 0 and result.stdout == b"done\n"
    refused = run_sshfan(["run", str(data), "--pipe"])
    assert refused.returncode == 2 and b"--pipe needs --command" in refused.stderr


def _ci_recipe_script(port: int) -> str:
    """The CI recipe (docs/ci.md) as one shell script, pointed at the test sshd's PORT."""
    readme = (Path(__file__).resolve().parent.parent / "docs" / "ci.md").read_text()
    section = readme.split("# CI over localhost SSH", 1)[1]
    yaml = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    steps: list[str] = []
    for line in yaml.splitlines():
        if line.startswith("    ") and not line.strip().startswith(("sudo ", "pipx install")):
            steps.append(line[4:])
    script = "set -eu\n" + "\n".join(steps) + "\n"
    assert "ssh-keyscan -H 127.0.0.1" in script and "[defaults]" in script, script
    script = script.replace("ssh-keyscan -H 127.0.0.1", f"ssh-keyscan -H -p {port} 127.0.0.1")
    return script.replace("[defaults]\n", f"[defaults]\nport = {port}\n")


@pytest.mark.e2e
def test_readme_ci_recipe_runs_as_written(tmp_path: Path) -> None:
    """The localhost-SSH CI recipe (docs/ci.md) works step by step in a fresh HOME."""
    import shutil

    if not (shutil.which("ssh-keygen") and shutil.which("ssh-keyscan")):
        pytest.skip("the recipe uses OpenSSH's ssh-keygen and ssh-keyscan, not installed here")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".ssh").mkdir(mode=0o700)
    authorized = home / ".ssh" / "authorized_keys"
    authorized.touch(mode=0o600)
    server = SshServer(tmp_path / "server")
    server.authorized_keys = authorized  # the server trusts what the recipe adds
    bin_dir = sshfan_command(tmp_path / "bin").parent
    work = tmp_path / "job"
    work.mkdir()
    (work / "smoke-tasks.txt").write_text("echo one\necho two\n")
    env = sshfan_env({"HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    # Key generation and authorisation first: the fallback server reads keys at start.
    script = _ci_recipe_script(0)
    keygen, rest = script.split("ssh-keyscan", 1)
    subprocess.run(["sh", "-c", keygen], cwd=work, env=env, check=True, timeout=60)
    server.start()
    try:
        result = subprocess.run(
            ["sh", "-c", "set -eu\nssh-keyscan" + rest.replace("-p 0 ", f"-p {server.port} ")
             .replace("port = 0", f"port = {server.port}")],
            cwd=work, env=env, capture_output=True, timeout=120,
        )  # fmt: skip
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    records = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    assert [r["stdout"] for r in records] == ["one\n", "two\n"]
    assert {r["host"] for r in records} <= {"a", "b"}


def test_ssh_config_alias_and_proxyjump(sshd: SshServer, tmp_path: Path, run_sshfan) -> None:
    """A host named only by a ~/.ssh/config alias connects as `ssh alias` would, ProxyJump too."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    entry = (
        f"  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
        f"  IdentityFile {sshd.client_key}\n  UserKnownHostsFile {sshd.known_hosts}\n"
    )
    (home / ".ssh" / "config").write_text(
        f"Host buildbox\n{entry}\nHost behindjump\n{entry}  ProxyJump buildbox\n"
    )
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(
        f'[defaults]\nknown_hosts = "{sshd.known_hosts}"\nslots = 1\n'
        '[[hosts]]\nname = "buildbox"\n[[hosts]]\nname = "behindjump"\n'
    )
    tasks = tmp_path / "tasks.txt"
    gate = until_hosts_ran(tmp_path / "seen", 2)  # both hosts take tasks, however slow to join
    tasks.write_text("".join(f"{gate}; echo {n}\n" for n in range(6)))
    out = tmp_path / "out.jsonl"
    result = run_sshfan(
        ["run", str(tasks), "--hosts", str(hosts), "-o", str(out), "--format", "jsonl"],
        env={"HOME": str(home)},
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["stdout"] for r in records] == [f"{n}\n" for n in range(6)]
    assert {r["host"] for r in records} == {"buildbox", "behindjump"}


def test_shell_completion_script_is_offered(run_sshfan) -> None:
    """typer's completion is wired in: --show-completion prints a bash completion function."""
    # The shell is named, not detected from the parent processes: under a runner whose
    # parent is not a shell (a detached job, some CI agents) detection finds none.
    no_detection = {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    shown = run_sshfan(["--show-completion", "bash"], env=no_detection)
    assert shown.returncode == 0
    assert b"_sshfan_completion" in shown.stdout and b"complete " in shown.stdout


def test_idle_host_takes_back_a_task_queued_behind_a_long_one(
    sshd: SshServer, tmp_path: Path, run_sshfan
) -> None:
    """At the end of the file, a task queued behind a long one moves to a host that idles."""
    hosts = write_hosts_file(tmp_path, sshd.hosts_toml(["h1", "h2"], slots=1))
    tasks = tmp_path / "tasks.txt"
    # One slot per host and one task queued ahead: the first host gets tasks 1 and 2.
    # Task 1 runs until task 2 has run (a minute at most): queued behind it, task 2 runs
    # only if another host takes it back, however slow this machine is.
    ran = tmp_path / "queued.ran"
    wait = f"i=0; while [ ! -e {ran} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"
    tasks.write_text(f"{wait}; echo long\ntouch {ran}; echo queued\necho a\necho b\n")
    out = tmp_path / "out.jsonl"
    args = ["run", str(tasks), "--hosts", str(hosts), "-o", str(out), "--format", "jsonl"]
    result = run_sshfan(args)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["stdout"] for r in records] == ["long\n", "queued\n", "a\n", "b\n"]
    assert records[0]["host"] != records[1]["host"]
