"""Hosts on the command line: -S/--slf (GNU parallel's syntax), ranges, --only/--exclude.

Units check the parsers; the end-to-end tests run over the suite's sshd, several host
entries on the one server standing in for several machines, and compare with GNU
parallel where the two share an option.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sshd import HOST, SshServer
from support import (
    RunSshfan,
    defaults_file,
    needs_parallel,
    run_parallel,
    sshfan_argv,
    sshfan_env,
    wait_for,
)

import sshfan


def usage_error(call: Callable[[], object]) -> str:
    """Call CALL, which must raise UsageError; return its message."""
    with pytest.raises(sshfan.UsageError) as info:
        call()
    return str(info.value)


# ---------------------------------------------------------------------------
# ranges
# ---------------------------------------------------------------------------


def test_ranges_expand_as_clustershell_writes_them() -> None:
    """Padding is kept, lists and spans mix, several brackets multiply (left slowest)."""
    assert sshfan.expand_range("web[01-03]") == ["web01", "web02", "web03"]
    assert sshfan.expand_range("web[8-10]") == ["web8", "web9", "web10"]
    assert sshfan.expand_range("db[1,3,5-7]") == ["db1", "db3", "db5", "db6", "db7"]
    assert sshfan.expand_range("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    assert sshfan.expand_range("plain") == ["plain"]


@pytest.mark.parametrize(
    ("text", "spot"),
    [
        ("web[3-1]", "character 5: range 3-1 goes backwards"),
        ("web[1-3", "character 4: '[' without ']'"),
        ("web]", "character 4: ']' without '['"),
        ("web[]", "character 5: an empty item"),
        ("web[1,x]", "character 7: 'x' is not a number"),
    ],
)
def test_bad_ranges_name_the_spot(text: str, spot: str) -> None:
    """A bad range is refused with the character where it goes wrong."""
    with pytest.raises(ValueError, match=re.escape(spot)):
        sshfan.expand_range(text)


def test_hosts_file_ranges_in_name_and_address() -> None:
    """A name range makes one host per name; an address range pairs with it."""
    specs = sshfan.parse_hosts(
        '[[hosts]]\nname = "web[01-02]"\naddress = "10.0.0.[5-6]"\n'
        '[[hosts]]\nname = "db[1,3]"\naddress = "db.example"\n'
    )
    assert [(s.name, s.address) for s in specs] == [
        ("web01", "10.0.0.5"),
        ("web02", "10.0.0.6"),
        ("db1", "db.example"),
        ("db3", "db.example"),
    ]


def test_hosts_file_bad_ranges_are_usage_errors() -> None:
    """A bad range names the file line and key; a range that makes a name twice is a duplicate."""
    text = '[[hosts]]\nname = "a"\n\n[[hosts]]\nname = "web[2-1]"\n'
    assert "hosts.toml:4: key 'name': bad range in 'web[2-1]'" in usage_error(
        lambda: sshfan.parse_hosts(text, "hosts.toml")
    )
    text = '[[hosts]]\nname = "n[1-2]"\naddress = "10.0.0.[1-3]"\n'
    assert "'address' names 3 hosts but 'name' 2" in usage_error(lambda: sshfan.parse_hosts(text))
    text = '[[hosts]]\nname = "n2"\n[[hosts]]\nname = "n[1-3]"\n'
    assert "duplicate host name 'n2'" in usage_error(lambda: sshfan.parse_hosts(text))


# ---------------------------------------------------------------------------
# sshlogins
# ---------------------------------------------------------------------------


def test_sshlogins_as_gnu_parallel_writes_them() -> None:
    """N/, user@, :port, ':' and ranges; names are what the user wrote (minus N/)."""
    logins = sshfan.parse_sshlogins("2/root@web[1-2]:2222,:,db1\n4/:,[::1]:22", "-S")
    assert logins == [
        {"slots": 2, "user": "root", "port": 2222, "name": "root@web1:2222", "address": "web1"},
        {"slots": 2, "user": "root", "port": 2222, "name": "root@web2:2222", "address": "web2"},
        {"name": ":", "local": True},
        {"name": "db1", "address": "db1"},
        {"slots": 4, "name": ":", "local": True},
        {"port": 22, "name": "[::1]:22", "address": "::1"},
    ]


@pytest.mark.parametrize(
    ("login", "says"),
    [
        ("@grp/a", "host groups (@group/) are not supported"),
        ("u:secret@h", "passwords are not supported"),
        ("h:", "':' without a port"),
        ("h:http", "port must be 1-65535, not 'http'"),
        ("0/h", "slots must be at least 1"),
        ("myssh -p 2 h", "runs 'myssh'"),
        ("ssh -o Foo=1 h", "ssh option '-o' is not supported"),
        ("web[1-", "bad range in 'web[1-'"),
        ("-oProxyCommand=x", "host name '-oProxyCommand=x' is not valid"),
        ("h;id", "host name 'h;id' is not valid"),
        ("-x@h", "user name '-x' is not valid"),
        ("a`id`@h", "user name 'a`id`' is not valid"),
        ("[::1", "'[::1' is not an IPv6 address"),
        ("h:22:33", "'h:22:33' is not an IPv6 address"),
    ],
)
def test_sshlogins_refused_with_one_line(login: str, says: str) -> None:
    """What sshfan cannot honour is refused, naming the option and the login."""
    message = usage_error(lambda: sshfan.parse_sshlogins(login, "-S"))
    assert message.startswith("-S: ") and says in message, message


def test_names_refused_are_those_openssh_refuses() -> None:
    """A host or user name OpenSSH's ssh refuses on its command line, sshfan refuses too
    (exit 2 rather than connect to what ssh never would)."""
    for login, user, host in [("h;id", None, "h;id"), ("-x@h", "-x", "h")]:
        argv = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes"]
        argv += ["-l", user] if user else []
        done = subprocess.run([*argv, "--", host, "true"], capture_output=True, timeout=30)
        assert done.returncode == 255 and b"contains invalid characters" in done.stderr
        assert usage_error(lambda bad=login: sshfan.parse_sshlogins(bad, "-S")).startswith("-S: ")
    assert sshfan.parse_sshlogins("u@[fe80::1%lo]:22", "-S")[0]["address"] == "fe80::1%lo"


def test_sshloginfile_format(tmp_path: Path) -> None:
    """Comments and blank lines are skipped; `ssh -p -l` prefixes become port and user."""
    slf = tmp_path / "hosts.slf"
    slf.write_text("# my hosts\n\nweb[1-2]\n  8/bob@db1\n4/ssh -p 2222 -l ann srv\n16/:\n")
    assert sshfan.read_sshloginfile(str(slf)) == [
        {"name": "web1", "address": "web1"},
        {"name": "web2", "address": "web2"},
        {"slots": 8, "user": "bob", "name": "bob@db1", "address": "db1"},
        {
            "slots": 4,
            "port": 2222,
            "user": "ann",
            "name": "ssh -p 2222 -l ann srv",
            "address": "srv",
        },
        {"slots": 16, "name": ":", "local": True},
    ]
    slf.write_text("ok\n\n@group/bad\n")
    assert usage_error(lambda: sshfan.read_sshloginfile(str(slf))).startswith(f"{slf}:3: ")
    missing = tmp_path / "nope.slf"
    assert f"{missing}: sshloginfile not found" in usage_error(
        lambda: sshfan.read_sshloginfile(str(missing))
    )


@needs_parallel
def test_sshloginfile_shorthands_found_where_gnu_parallel_finds_them(
    run_sshfan: RunSshfan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--slf .. and --slf NAME (not here) are read from parallel's config dir:
    $PARALLEL_HOME, else $XDG_CONFIG_HOME/parallel, ..., else ~/.parallel."""
    for variable in ("PARALLEL_HOME", "XDG_CONFIG_HOME"):
        config = tmp_path / variable
        home = config / "parallel" if variable == "XDG_CONFIG_HOME" else config
        home.mkdir(parents=True)
        (home / "sshloginfile").write_text("# this machine\n:\n")
        (home / "mine").write_text(":\n")
        monkeypatch.setenv(variable, str(config))
        for name in ("..", "mine"):
            wanted = run_parallel(["--nonall", "--tag", "--slf", name, "echo hi"])
            assert wanted == b":\thi\n"
            result = run_sshfan(["run", "--nonall", "--tag", "--slf", name, "echo hi"])
            assert result.returncode == 0, result.stderr
            assert result.stdout == wanted
        monkeypatch.delenv(variable)


def test_command_line_hosts_take_the_files_defaults(tmp_path: Path) -> None:
    """-S and --slf hosts follow the file's, with its [defaults]; a repeat is one host."""
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[defaults]\nuser = "ci"\nport = 2200\nslots = 3\n[[hosts]]\nname = "a"\n')
    slf = tmp_path / "more.slf"
    slf.write_text("c\n")
    specs = sshfan.load_host_sources(
        sshfan.HostSources(str(hosts), ["b,2/bob@c2:22", "4/b"], [str(slf)])
    )
    assert [(s.name, s.user, s.port, s.slots) for s in specs] == [
        ("a", "ci", 2200, 3),
        ("b", "ci", 2200, 4),  # given twice: one host, the later N/ wins (as parallel)
        ("bob@c2:22", "bob", 22, 2),
        ("c", "ci", 2200, 3),
    ]
    only_defaults = tmp_path / "defaults.toml"
    only_defaults.write_text('[defaults]\nuser = "ci"\n')
    specs = sshfan.load_host_sources(sshfan.HostSources(str(only_defaults), [":"]))
    assert [(s.name, s.local) for s in specs] == [(":", True)]
    assert "host 'a' is both in" in usage_error(
        lambda: sshfan.load_host_sources(sshfan.HostSources(str(hosts), ["a"]))
    )


def test_only_and_exclude_pick_by_glob_and_range() -> None:
    """Patterns are globs whose brackets are ranges; comma-separated or repeated."""
    names = ["web01", "web02", "web03", "db1", "db2"]
    specs = [sshfan.HostSpec(name) for name in names]

    def picked(only: list[str], exclude: list[str]) -> list[str]:
        """Names left by these patterns."""
        sources = sshfan.HostSources(only=only, exclude=exclude)
        sources.split_patterns()
        return [s.name for s in sshfan.pick_hosts(specs, sources.only, sources.exclude)]

    assert picked(["web*"], []) == ["web01", "web02", "web03"]
    assert picked(["web[01,03],db2"], []) == ["web01", "web03", "db2"]
    assert picked(["web*", "db1"], ["web02"]) == ["web01", "web03", "db1"]
    assert picked([], ["db?"]) == ["web01", "web02", "web03"]
    assert "no host left" in usage_error(lambda: picked(["mail*"], []))
    assert "--only 'web[2-1]': bad range" in usage_error(lambda: picked(["web[2-1]"], []))


# ---------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------


def tasks_file(tmp_path: Path, count: int) -> Path:
    """COUNT tasks that each print their number."""
    path = tmp_path / "tasks.txt"
    path.write_text("".join(f"echo task {n}\n" for n in range(1, count + 1)))
    return path


def jsonl_hosts(path: Path) -> list[str]:
    """The host of each record of a jsonl output, in order."""
    return [json.loads(line)["host"] for line in path.read_text().splitlines()]


def test_run_with_sshlogins_and_file_defaults(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """-S hosts with the file's defaults run the tasks; names are as written."""
    defaults = defaults_file(sshd, tmp_path)
    tasks = tasks_file(tmp_path, 12)
    out = tmp_path / "out.jsonl"
    logins = f"{HOST}:{sshd.port},{sshd.user}@{HOST}:{sshd.port}"
    args = ["run", str(tasks), "-H", str(defaults), "-S", logins, "-S", ":", "-o", str(out)]
    result = run_sshfan([*args, "--format", "jsonl", "--no-progress"])
    assert result.returncode == 0, result.stderr.decode()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["stdout"] for r in records] == [f"task {n}\n" for n in range(1, 13)]
    names = {f"{HOST}:{sshd.port}", f"{sshd.user}@{HOST}:{sshd.port}", ":"}
    assert {r["host"] for r in records} <= names
    summary = result.stderr.decode()
    assert all(name in summary for name in names), summary


def test_run_with_sshloginfile_and_ssh_config(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A range in an sshloginfile names hosts that ~/.ssh/config sends to the server."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        f"Host web*\n  HostName {HOST}\n  Port {sshd.port}\n  User {sshd.user}\n"
        f"  IdentityFile {sshd.client_key}\n  UserKnownHostsFile {sshd.known_hosts}\n"
    )
    slf = tmp_path / "hosts.slf"
    slf.write_text("# two machines\n2/web[01-02]\n")
    tasks = tasks_file(tmp_path, 8)
    out = tmp_path / "out.jsonl"
    args = ["run", str(tasks), "--slf", str(slf), "-o", str(out), "-f", "jsonl", "--no-progress"]
    result = run_sshfan(args, env={"HOME": str(home)})
    assert result.returncode == 0, result.stderr.decode()
    assert set(jsonl_hosts(out)) <= {"web01", "web02"}
    assert "web01" in result.stderr.decode() and "web02" in result.stderr.decode()
    check = run_sshfan(["check", "--slf", str(slf), "--exclude", "web02"], env={"HOME": str(home)})
    assert check.returncode == 0, check.stderr.decode()
    rows = [row.split()[0] for row in check.stdout.decode().splitlines()[1:]]
    assert rows == ["web01"]


def test_only_and_exclude_on_a_ranged_hosts_file(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """--only/--exclude narrow a hosts file whose names are a range; nothing left is exit 2."""
    hosts = defaults_file(sshd, tmp_path, f'\n[[hosts]]\nname = "n[1-4]"\naddress = "{HOST}"\n')
    tasks = tasks_file(tmp_path, 6)
    out = tmp_path / "out.jsonl"
    base = ["run", str(tasks), "-H", str(hosts), "-o", str(out), "-f", "jsonl", "--no-progress"]
    result = run_sshfan([*base, "--only", "n[1-3]", "--exclude", "n2,n3"])
    assert result.returncode == 0, result.stderr.decode()
    assert set(jsonl_hosts(out)) == {"n1"}
    assert "n4" not in result.stderr.decode()
    out.unlink()
    result = run_sshfan([*base, "--only", "x*"])
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        "sshfan: error: --only 'x*': no host left (hosts: n1, n2, n3, n4)"
    ]
    assert not out.exists()
    result = run_sshfan([*base, "-S", "h[1-x]"])
    assert result.returncode == 2
    assert "-S: 'h[1-x]': bad range in 'h[1-x]': at character 3" in result.stderr.decode()
    result = run_sshfan(["run", "-", "--slf", "-", "-o", str(out)], input=b"h1\n")
    assert result.returncode == 2
    assert "stdin holds the tasks" in result.stderr.decode()


@needs_parallel
@pytest.mark.parametrize("command", ["run", "all", "check"])
@pytest.mark.parametrize("value", ["", " , "])
def test_empty_sshlogin_is_refused_as_gnu_parallel_does(
    command: str, value: str, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """-S with no host in it (an empty "$HOSTS") is exit 2, where parallel cannot run any
    job either; it does not run the tasks on this machine instead. ':' still means here."""
    marker = tmp_path / "ran"
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(f"touch {marker}\n")
    run_parallel(["-S", value, "touch", str(marker), ":::", "x"], status=255)
    assert not marker.exists()
    args = {"run": ["run", str(tasks), "-o", "-"], "all": ["all"], "check": ["check"]}[command]
    tail = ["touch", str(marker)] if command == "all" else []
    result = run_sshfan([*args, "-S", value, *tail])
    assert result.returncode == 2, result.stderr.decode()
    assert result.stderr.decode().splitlines() == [
        f"sshfan: error: -S {value!r}: no hosts given (':' is this machine)"
    ]
    assert not marker.exists()
    result = run_sshfan(["run", str(tasks), "-o", "-", "-S", value, "-S", ":"])
    assert result.returncode == 0, result.stderr.decode()
    assert marker.exists()


@needs_parallel
def test_sshlogin_output_matches_gnu_parallel(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """The same -S and tasks give parallel -k's bytes."""
    lines = ["echo one", "printf 'two\\n2\\n'", "echo $((3*3))"]
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("\n".join(lines) + "\n")
    login = f"{sshd.user}@{HOST}:{sshd.port}"
    ssh = " ".join(sshd.ssh_argv()[:-1])  # the server's options, without the destination
    wanted = run_parallel(["-k", "--ssh", ssh, "-S", login], input=tasks.read_bytes())
    defaults = defaults_file(sshd, tmp_path)
    result = run_sshfan(["run", str(tasks), "-H", str(defaults), "-S", login, "-o", "-"])
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == wanted


def test_hosts_join_and_drain_mid_run(sshd: SshServer, tmp_path: Path) -> None:
    """Mid-run, a host removed from the hosts file finishes its running task and takes no
    other; a host added takes the rest; a broken file in between is only a warning."""
    started, flag, marks = tmp_path / "started", tmp_path / "flag", tmp_path / "marks"
    marks.mkdir()
    count = 8
    # Task 1 holds h1's only slot until the test lets it go, after all the others ran.
    lines = [f"touch {started}; while [ ! -e {flag} ]; do sleep 0.05; done; echo 1"]
    lines += [f"echo {n}; touch {marks}/{n}" for n in range(2, count + 1)]
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("\n".join(lines) + "\n")
    hosts = tmp_path / "hosts.toml"

    replace_file(hosts, sshd.hosts_toml(["h1"], slots=1))
    out, err = tmp_path / "out.jsonl", tmp_path / "stderr.txt"
    argv = ["run", str(tasks), "-H", str(hosts), "-o", str(out), "-f", "jsonl", "--no-progress"]
    with running_sshfan(argv, tmp_path, err) as proc:
        wait_for("task 1 started on h1", started.exists, proc)
        replace_file(hosts, '[[hosts]]\nname = "h9"\nslots = "many"\n')
        wait_for(
            "a warning for the broken file",
            lambda: b"keeps its hosts" in err.read_bytes(),
            proc,
        )
        replace_file(hosts, sshd.hosts_toml(["h2"], slots=2))
        wait_for("h2 ran tasks 2-8", lambda: len(list(marks.iterdir())) == count - 1, proc)
        flag.touch()
        assert proc.wait(120) == 0, err.read_text()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["stdout"] for r in records] == [f"{n}\n" for n in range(1, count + 1)]
    assert [r["host"] for r in records] == ["h1"] + ["h2"] * (count - 1)
    stderr_text = err.read_text()
    assert "key 'slots' must be a positive integer" in stderr_text
    assert "sshfan: host h1 left the hosts file: it takes no new tasks" in stderr_text
    assert "sshfan: host h2 joined" in stderr_text
    assert "drained: left the hosts file" in stderr_text


def replace_file(path: Path, text: str) -> None:
    """Replace PATH's contents at once, as an editor or a config tool does."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    os.replace(new, path)


@contextlib.contextmanager
def running_sshfan(args: list[str], cwd: Path, stderr: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m sshfan ARGS` running in its own session, its stderr into the file STDERR;
    killed with its whole group if the block leaves before it has ended."""
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            sshfan_argv(*args),
            cwd=cwd,
            env=sshfan_env(),
            stderr=err,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_host_whose_settings_change_mid_run_goes_on_with_them(
    sshd: SshServer, tmp_path: Path
) -> None:
    """A host that keeps its name but changes its settings (env, slots) in the hosts file:
    its old stub finishes the task it runs; the rest run under the new settings, with the
    run's own options (--workdir) as before."""
    started, flag, marks = tmp_path / "started", tmp_path / "flag", tmp_path / "marks"
    marks.mkdir()
    count = 6
    # Task 1 holds h1's only slot until the test lets it go, after all the others ran.
    lines = [f"touch {started}; while [ ! -e {flag} ]; do sleep 0.05; done; echo 1 $MARK"]
    lines += [f"echo {n} $MARK; pwd; touch {marks}/{n}" for n in range(2, count + 1)]
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("\n".join(lines) + "\n")
    hosts, out, err = tmp_path / "hosts.toml", tmp_path / "out.jsonl", tmp_path / "stderr.txt"
    replace_file(hosts, sshd.hosts_toml(["h1"], slots=1) + 'env = { MARK = "old" }\n')
    workdir = tmp_path / "wd"
    argv = ["run", str(tasks), "-H", str(hosts), "-o", str(out), "-f", "jsonl"]
    with running_sshfan([*argv, "--workdir", str(workdir), "--no-progress"], tmp_path, err) as proc:
        wait_for("task 1 started on h1", started.exists, proc)
        replace_file(hosts, sshd.hosts_toml(["h1"], slots=2) + 'env = { MARK = "new" }\n')
        wait_for("tasks 2-6 ran", lambda: len(list(marks.iterdir())) == count - 1, proc)
        flag.touch()
        assert proc.wait(120) == 0, err.read_text()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["stdout"] for r in records] == ["1 old\n"] + [
        f"{n} new\n{workdir}\n" for n in range(2, count + 1)
    ]
    assert {r["host"] for r in records} == {"h1"}
    stderr_text = err.read_text()
    assert "sshfan: host h1 changed in the hosts file" in stderr_text
    assert "drained" not in stderr_text  # it never left the hosts file


def test_onall_hosts_join_and_drain_mid_run(sshd: SshServer, tmp_path: Path) -> None:
    """--onall with a watched hosts file: a host that joins runs every task, its block after
    the others'; a host removed finishes its running task and runs no other (the run ends
    1, the summary says why); with it back, --resume runs the rest and the journal knows
    the host that joined."""
    flag, marks = tmp_path / "flag", tmp_path / "marks"
    marks.mkdir()
    count = 4
    # Task 1 holds each host's only slot until the test lets it go.
    lines = [
        f"touch {marks}/$SSHFAN_HOST; while [ ! -e {flag} ]; do sleep 0.05; done; echo 1",
        *[f"echo {n} $SSHFAN_HOST" for n in range(2, count + 1)],
    ]
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("\n".join(lines) + "\n")
    hosts, out, err = tmp_path / "hosts.toml", tmp_path / "out.jsonl", tmp_path / "stderr.txt"
    replace_file(hosts, sshd.hosts_toml(["h1", "h2"]))
    argv = ["run", "--onall", str(tasks), "-H", str(hosts), "-o", str(out), "-f", "jsonl"]
    with running_sshfan([*argv, "--no-progress"], tmp_path, err) as proc:
        wait_for("task 1 started on h1 and h2", lambda: len(list(marks.iterdir())) == 2, proc)
        replace_file(hosts, sshd.hosts_toml(["h1", "h3"]))
        wait_for("task 1 started on h3", (marks / "h3").exists, proc)
        flag.touch()
        assert proc.wait(120) == 1, err.read_text()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ran = [(r["host"], r["seq"]) for r in records]
    every = [(host, n) for host in ("h1", "h2", "h3") for n in range(1, count + 1)]
    # h2 ran task 1, and task 2 only if its stub started it before the head took it back.
    on_h2 = [seq for host, seq in ran if host == "h2"]
    assert on_h2 in ([1], [1, 2])
    assert ran == [entry for entry in every if entry[0] != "h2" or entry[1] in on_h2]
    assert [r["stdout"] for r in records if r["host"] == "h3"] == ["1\n"] + [
        f"{n} h3\n" for n in range(2, count + 1)
    ]
    stderr_text = err.read_text()
    assert "sshfan: host h2 left the hosts file: it takes no new tasks" in stderr_text
    assert "sshfan: host h3 joined" in stderr_text
    unrun = count - len(on_h2)
    assert f"h2 ({unrun} task(s) not run: it left the hosts file)" in stderr_text
    # Back in the file, h2 runs the rest on --resume; h3's results stay where they were.
    replace_file(hosts, sshd.hosts_toml(["h1", "h2", "h3"]))
    with running_sshfan([*argv, "--no-progress", "--resume"], tmp_path, err) as proc:
        assert proc.wait(120) == 0, err.read_text()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["host"], r["seq"]) for r in records] == every


def test_all_runs_the_command_on_a_host_that_joins(sshd: SshServer, tmp_path: Path) -> None:
    """`sshfan all` watches its hosts file as run --onall does: a host added while the
    command runs runs it too, and its lines come after the others'."""
    flag, marks = tmp_path / "flag", tmp_path / "marks"
    marks.mkdir()
    command = f"touch {marks}/$SSHFAN_HOST; while [ ! -e {flag} ]; do sleep 0.05; done; hostname"
    hosts, out, err = tmp_path / "hosts.toml", tmp_path / "out.txt", tmp_path / "stderr.txt"
    replace_file(hosts, sshd.hosts_toml(["h1", "h2"]))
    with running_sshfan(["all", "-H", str(hosts), "-o", str(out), command], tmp_path, err) as proc:
        wait_for("the command started on h1 and h2", lambda: len(list(marks.iterdir())) == 2, proc)
        replace_file(hosts, sshd.hosts_toml(["h1", "h2", "h3"]))
        wait_for("the command started on h3", (marks / "h3").exists, proc)
        flag.touch()
        assert proc.wait(120) == 0, err.read_text()
    name = socket.gethostname()
    assert out.read_text() == "".join(f"{host}: {name}\n" for host in ("h1", "h2", "h3"))
    assert "sshfan: host h3 joined" in err.read_text()


def test_example_hosts_file_parses_with_its_range() -> None:
    """hosts.example.toml is valid, and its range entry is four hosts paired with addresses."""
    example = Path(sshfan.__file__).with_name("hosts.example.toml")
    specs = {spec.name: spec.address for spec in sshfan.load_hosts(example)}
    assert [specs[f"web0{n}"] for n in range(1, 5)] == [f"10.0.1.{10 + n}" for n in range(1, 5)]
