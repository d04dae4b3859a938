"""One command, or every task, on every host: `sshfan all`, `run --onall`, `run --nonall`.

Several entries on the suite's one sshd stand in for several machines; `:` is this
machine (its tasks run in the current directory, a remote host's in the home
directory, which gives two different outputs for --gather to tell apart). Where
GNU parallel has the same option, its bytes are the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from sshd import HOST, SshServer
from support import (
    RunSshfan,
    capturing_python,
    closed_port,
    defaults_file,
    early_seqs,
    needs_parallel,
    run_parallel,
    sshfan_argv,
    sshfan_env,
)

import sshfan


def logins(sshd: SshServer) -> tuple[str, str]:
    """Two spellings of the test server, two hosts to sshfan (and to GNU parallel)."""
    return f"{HOST}:{sshd.port}", f"{sshd.user}@{HOST}:{sshd.port}"


def parallel_ssh(sshd: SshServer) -> str:
    """The ssh command GNU parallel should use to reach the test server."""
    return " ".join(sshd.ssh_argv()[:-1])


def test_fold_names_as_clustershell() -> None:
    """Numbered names fold into ranges; others stay as they are."""
    assert sshfan.fold_names(["web01", "web02", "web04", "db1", ":"]) == "web[01-02,04],db1,:"
    assert sshfan.fold_names(["n9", "n10", "n11"]) == "n[9-11]"


def test_all_prints_each_host_in_order(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """`host: line` lines in host order, stderr the same way, nothing else on success."""
    one, two = logins(sshd)
    hosts = defaults_file(sshd, tmp_path)
    command = ["echo one; printf 'two'; echo oops >&2"]
    result = run_sshfan(["all", "-H", str(hosts), "-S", f"{two},:,{one}", *command])
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == "".join(
        f"{name}: one\n{name}: two\n" for name in (two, ":", one)
    )
    assert sorted(result.stderr.decode().splitlines()) == sorted(
        f"{name}: oops" for name in (two, ":", one)
    )


def test_all_gather_and_jsonl(sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """--gather prints identical outputs once under the hosts' names; jsonl a record each."""
    one, two = logins(sshd)
    here = f'\n[[hosts]]\nname = "here"\nlocal = true\nworkdir = "{tmp_path}"\n'
    hosts = defaults_file(sshd, tmp_path, here)
    base = ["all", "-H", str(hosts), "-S", f"{one},{two}"]
    result = run_sshfan([*base, "-b", "pwd"])
    assert result.returncode == 0, result.stderr.decode()
    rule = "-" * 15
    home = os.path.expanduser("~")
    assert result.stdout.decode() == (
        f"{rule}\nhere (1)\n{rule}\n{tmp_path}\n{rule}\n{one},{two} (2)\n{rule}\n{home}\n"
    )
    result = run_sshfan([*base, "-f", "jsonl", "echo hi; exit 4"])
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["host"], r["seq"], r["stdout"], r["exit_code"]) for r in records] == [
        (name, 1, "hi\n", 4) for name in ("here", one, two)
    ]
    assert f"sshfan: failed on 3 of 3 hosts: here (exit 4), {one} (exit 4), {two} (exit 4)" in (
        result.stderr.decode()
    )


def test_unreachable_host_fails_the_run_and_resume_completes_it(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """An unreachable host is exit 1, listed; the hosts after it still print; --resume runs
    the command there only, once it is back, and the output is then whole and in order."""
    down = f'\n[[hosts]]\nname = "first"\naddress = "{HOST}"\nport = {closed_port()}\n'
    up = f'\n[[hosts]]\nname = "first"\naddress = "{HOST}"\n'
    hosts = defaults_file(sshd, tmp_path, down)
    out = tmp_path / "out.txt"
    args = ["all", "-H", str(hosts), "-S", ":", "-o", str(out), "date +%s%N"]
    result = run_sshfan(args)
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert "sshfan: could not run on 1 of 2 hosts: first (1 task(s) not run: connect:" in stderr
    assert "--resume runs their tasks on them" in stderr
    first_run = out.read_text()
    assert first_run.startswith(":: ") and first_run.count("\n") == 1
    hosts.write_text(sshd.hosts_toml([]) + up)
    result = run_sshfan([*args[:-1], "--resume", args[-1]])
    assert result.returncode == 0, result.stderr.decode()
    lines = out.read_text().splitlines(keepends=True)
    assert [line.split(": ")[0] for line in lines] == ["first", ":"]
    assert lines[1] == first_run  # this machine did not run it again
    everything_down = defaults_file(sshd, tmp_path, down)
    result = run_sshfan(["all", "-H", str(everything_down), "true"])
    assert result.returncode == 3


def test_all_sends_the_command_before_the_hello_and_a_host_failing_then_runs_none(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """`sshfan all` sends each host its one task right behind the stub, before the hello (a
    host under --onall has one slot); a host whose stub then fails runs nothing, is listed
    with its task not run (exit 1), and --resume runs it there only, once it is fixed."""
    capture = tmp_path / "sent-to-broken"
    python = capturing_python(tmp_path / "failing-python", capture, "fail")
    broken = f'\n[[hosts]]\nname = "broken"\naddress = "{HOST}"\npython = "{python}"\n'
    fixed = f'\n[[hosts]]\nname = "broken"\naddress = "{HOST}"\n'
    hosts = defaults_file(sshd, tmp_path, broken)
    one, _two = logins(sshd)
    out = tmp_path / "out.txt"
    args = ["all", "-H", str(hosts), "-S", one, "-o", str(out), "echo $SSHFAN_HOST"]
    result = run_sshfan(args)
    assert result.returncode == 1, result.stderr.decode()
    assert early_seqs(capture) == [1], "the command did not go before the hello"
    stderr = result.stderr.decode()
    assert "sshfan: could not run on 1 of 2 hosts: broken (1 task(s) not run: bootstrap:" in (
        stderr
    )
    assert out.read_text() == f"{one}: {one}\n"
    hosts.write_text(sshd.hosts_toml([]) + fixed)
    result = run_sshfan([*args[:-1], "--resume", args[-1]])
    assert result.returncode == 0, result.stderr.decode()
    assert out.read_text() == f"broken: broken\n{one}: {one}\n"


def test_all_usage_errors(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """No hosts, --resume without a journal to keep: one line, exit 2."""
    result = run_sshfan(["all", "uname"])
    assert result.returncode == 2
    wanted = "sshfan: error: all: give the hosts: --hosts FILE, -S or --slf\n"
    assert result.stderr.decode() == wanted
    result = run_sshfan(["all", "-S", ":", "--resume", "uname"])
    assert result.returncode == 2
    assert "--resume needs the earlier run's journal" in result.stderr.decode()
    out = tmp_path / "out.txt"
    assert run_sshfan(["all", "-S", ":", "-o", str(out), "echo hi"]).returncode == 0
    result = run_sshfan(["all", "-S", ":", "-o", str(out), "--resume", "echo other"])
    assert result.returncode == 2
    assert "journal was written for another command" in result.stderr.decode()
    assert out.read_text() == ":: hi\n"  # the refused resume left it as it was


@needs_parallel
def test_onall_and_nonall_match_gnu_parallel(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """run --onall TASKS and run --nonall COMMAND give parallel -k's bytes (hosts in the
    order parallel sorts them), and an --onall run resumes host by host."""
    one, two = logins(sshd)
    hosts = defaults_file(sshd, tmp_path)
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo a\n\nprintf 'b\\nb2\\n'\nprintf nonl\n")
    parallel = ["-k", "--ssh", parallel_ssh(sshd), "-S", f"{one},{two}"]
    wanted = run_parallel([*parallel, "--onall", "::::", str(tasks)])
    out = tmp_path / "out.txt"
    result = run_sshfan(
        ["run", str(tasks), "--onall", "-H", str(hosts), "-S", f"{one},{two}", "-o", str(out)]
    )
    assert result.returncode == 0, result.stderr.decode()
    assert out.read_bytes() == wanted
    journal = out.with_name("out.txt.journal")
    listed = subprocess.run(
        sshfan_argv("results", str(out), "-f", "jsonl"),
        capture_output=True,
        env=sshfan_env(),
        check=False,
    )
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["host"], r["seq"]) for r in records] == [
        (host, seq) for host in (one, two) for seq in (1, 3, 4)
    ]
    assert b"6 shown; 6 of 6 tasks recorded" in listed.stderr  # (each task once per host)
    assert journal.exists()
    command = "echo x; uname -s"
    wanted = run_parallel([*parallel, "--nonall", command])
    result = run_sshfan(["run", "--nonall", "-H", str(hosts), "-S", f"{one},{two}", command])
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == wanted


@needs_parallel
def test_onall_with_a_template_matches_gnu_parallel(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """--onall -c TEMPLATE fills each line into the template on every host, --tag and
    the joblog's rows as parallel's (the rows' times aside)."""
    one, two = logins(sshd)
    hosts = defaults_file(sshd, tmp_path)
    args = tmp_path / "args.txt"
    args.write_text("x\ny z\n\nit's\n")
    parallel = ["-k", "--ssh", parallel_ssh(sshd), "-S", f"{one},{two}", "--onall", "--tag"]
    wanted_log = tmp_path / "parallel.log"
    wanted = run_parallel([*parallel, "--joblog", str(wanted_log), "echo {#}", "::::", str(args)])
    log = tmp_path / "sshfan.log"
    result = run_sshfan(
        ["run", str(args), "-c", "echo {#}", "--onall", "--tag", "-H", str(hosts)]
        + ["-S", f"{one},{two}", "--joblog", str(log), "-o", "-"]
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == wanted

    def rows(path: Path) -> list[list[str]]:
        """The joblog's rows without Starttime and JobRuntime, in host then seq order."""
        lines = [line.split("\t") for line in path.read_text().splitlines()]
        return sorted([*row[:2], *row[4:]] for row in lines[1:])

    assert rows(log) == rows(wanted_log)


@needs_parallel
def test_onall_tag_names_this_machine_as_gnu_parallel(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """--nonall/--onall --tag on this machine (no hosts given, or -S :) tags its lines ':',
    as parallel and the joblog do, not with sshfan's name for it."""
    wanted = run_parallel(["--nonall", "--tag", "echo hi"])
    assert wanted == b":\thi\n"
    for hosts in ([], ["-S", ":"]):
        result = run_sshfan(["run", "--nonall", "--tag", *hosts, "echo hi"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout == wanted
    args = tmp_path / "args"
    args.write_text("a\nb\n")
    wanted = run_parallel(["-k", "--onall", "--tag", "echo", "::::", str(args)])
    result = run_sshfan(["run", str(args), "-c", "echo", "--onall", "--tag", "-o", "-"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == wanted


def test_onall_scheduler_keeps_each_task_on_its_host() -> None:
    """Each host draws its own pass over the tasks; what a lost host held goes back to it
    alone, and once it is gone the run stops waiting on it without calling itself whole."""
    sources = {name: iter([sshfan.Task(1, "a"), sshfan.Task(3, "b")]) for name in ("one", "two")}
    scheduler = sshfan.OnAllScheduler(sources, lines=3)
    assert scheduler.order_key("one", 3) == 3 and scheduler.order_key("two", 1) == 4
    taken = scheduler.take("one", 5)
    assert [(t.seq, t.pinned) for t in taken] == [(1, "one"), (3, "one")]
    assert scheduler.take("one", 5) == [] and scheduler.has_work()  # "two" has not started
    scheduler.put_back(taken[1:])
    assert [t.seq for t in scheduler.take("one", 5)] == [3]  # back to "one", not to "two"
    assert [t.seq for t in scheduler.take("two", 1)] == [1]
    scheduler.host_gone("two")
    assert not scheduler.has_work() and not scheduler.exhausted()


def test_onall_scheduler_gives_a_host_that_joins_every_task() -> None:
    """A host that joins mid-run gets a pass of its own over every task, its block after
    the others'; a host that left (gone) and comes back goes on with its own pass."""

    def new_pass(place: int) -> tuple[object, int]:
        """Two tasks for the host at PLACE."""
        return iter([sshfan.Task(1, f"a{place}"), sshfan.Task(2, f"b{place}")]), 2

    sources = {"one": iter([sshfan.Task(1, "a0"), sshfan.Task(2, "b0")])}
    scheduler = sshfan.OnAllScheduler(sources, lines=2, new_pass=new_pass)  # type: ignore[arg-type]
    assert [t.command for t in scheduler.take("one", 1)] == ["a0"]
    scheduler.host_gone("one")
    assert scheduler.join("two") == 2 and scheduler.hosts() == ["one", "two"]
    assert scheduler.order_key("two", 1) == 3
    assert [(t.command, t.pinned) for t in scheduler.take("two", 5)] == [
        ("a1", "two"),
        ("b1", "two"),
    ]
    assert not scheduler.has_work() and not scheduler.exhausted()  # "one" left b0 unrun
    assert scheduler.join("one") == 0 and scheduler.has_work()  # back: no new pass
    assert [t.command for t in scheduler.take("one", 5)] == ["b0"]
    assert scheduler.exhausted()
