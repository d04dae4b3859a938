"""Files to and from workers (--transferfile, --return, --cleanup, --trc, --basefile) and
--results DIR, end to end over the test sshd, and compared with GNU parallel.

The worker is the loopback sshd, so its files and the head's share one file system: the
hosts get a `workdir` of their own (tmp/worker) and the head runs in tmp/head, so that a
file on the worker is never the head's file by accident.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sshd import SshServer
from support import (
    NO_HANG,
    PARALLEL_REQUIRED,
    RunSshfan,
    needs_parallel,
    run_parallel,
    sshfan_argv,
    sshfan_env,
)

from sshfan import fill_file_template, results_dirname, transfer_paths

# Names a shell and a transfer must both get right: spaces, both quotes, a subdirectory.
ODD_NAMES = ["in/x y.txt", 'in/it\'s "q".txt', "plain.txt"]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ROOT by relative path, with its bytes (directories implied)."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def setup_dirs(tmp_path: Path, sshd: SshServer, hosts: int = 2) -> tuple[Path, Path, Path]:
    """The head's dir, the worker's dir, and a hosts file whose hosts work in the latter."""
    head, worker = tmp_path / "head", tmp_path / "worker"
    head.mkdir()
    worker.mkdir()
    names = [f"w{n}" for n in range(1, hosts + 1)]
    hosts_path = tmp_path / "hosts.toml"
    hosts_path.write_text(sshd.hosts_toml(names, slots=2, workdir=str(worker)))
    return head, worker, hosts_path


def records(path: Path) -> dict[int, dict]:
    """The jsonl output's records by seq."""
    return {r["seq"]: r for r in map(json.loads, path.read_text().splitlines())}


# ---------------------------------------------------------------------------
# pure parts
# ---------------------------------------------------------------------------


def test_transfer_paths_follow_rsync_relative_marker() -> None:
    """The man page's table for --transferfile (work dir /home/user): /./ cuts the path."""
    assert transfer_paths("/tmp/foo/bar") == ("/tmp/foo/bar", "/tmp/foo/bar")
    assert transfer_paths("tmp/foo/bar") == ("tmp/foo/bar", "tmp/foo/bar")
    assert transfer_paths("/tmp/./foo/bar") == ("/tmp/foo/bar", "foo/bar")
    assert transfer_paths("tmp/./foo/bar") == ("tmp/foo/bar", "foo/bar")
    # --trc out/./{}.out on in/file: in/file.out there, out/in/file.out here
    assert transfer_paths("out/./in/file.out") == ("out/in/file.out", "in/file.out")
    # Two markers (`--trc out/./{}.out` on `in/./file`): sent as rsync -R cuts, at the
    # first; returned as parallel's sshreturn cuts, at the last.
    assert transfer_paths("out/./in/./f.out") == ("out/in/f.out", "in/f.out")
    assert transfer_paths("out/./in/./f.out", returned=True) == ("out/in/f.out", "f.out")


def test_file_templates_are_filled_unquoted() -> None:
    """File names take --command's placeholder values, without shell quoting."""
    line = "dir/it's a.b.txt"
    assert fill_file_template("{}", line, 7) == line
    assert fill_file_template("{.}.out", line, 7) == "dir/it's a.b.out"
    assert fill_file_template("{/}", line, 7) == "it's a.b.txt"
    assert fill_file_template("{//}/{#}.log", line, 7) == "dir/7.log"
    assert fill_file_template("fixed name", line, 7) == "fixed name"


def test_results_dirname_quotes_as_parallel() -> None:
    """args_as_dirname: \\ tab NUL / become \\\\ \\t \\0 \\_; a long name is cut."""
    assert results_dirname(["a/b\\c\td"], 255) == b"1/a\\_b\\\\c\\td"
    assert results_dirname(["x" * 300], 255) == b"1/" + b"x" * 255
    assert results_dirname(["x" * 300, "", "y"], 255) == b"1/" + b"x" * 255 + b"/2//3/y"


# ---------------------------------------------------------------------------
# --results, compared with GNU parallel
# ---------------------------------------------------------------------------

RESULT_LINES = [
    "echo hi",
    "sh -c 'echo err >&2; exit 3'",
    'echo "a/b c"',
    "printf 'back\\\\slash'",
    "echo 'tab\there'",
    "printf 'no newline'",
]


@needs_parallel
def test_results_tree_matches_parallel(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """The same tasks give parallel's --results tree, plus sshfan's exitval files; a
    --resume rebuilds it from the journal, earlier runs' tasks too."""
    tasks = tmp_path / "tasks"
    tasks.write_text("".join(line + "\n" for line in RESULT_LINES))
    run_parallel(
        ["--results", str(tmp_path / "P")], cwd=tmp_path, input=tasks.read_bytes(), status=None
    )
    result = run_sshfan(["run", str(tasks), "--results", "S", "-o", "out", "--no-progress"])
    assert result.returncode == 1, result.stderr
    wanted = tree(tmp_path / "P")
    assert wanted  # parallel wrote something to compare with
    got = tree(tmp_path / "S")
    exitvals = {path: got.pop(path) for path in list(got) if path.endswith("/exitval")}
    assert got == wanted
    assert exitvals["1/echo hi/exitval"] == b"0"
    assert exitvals["1/sh -c 'echo err >&2; exit 3'/exitval"] == b"3"
    assert len(exitvals) == len(RESULT_LINES)

    shutil.rmtree(tmp_path / "S")
    again = run_sshfan(["run", str(tasks), "--results", "S", "-o", "out", "--resume"])
    assert again.returncode == 1, again.stderr
    assert tree(tmp_path / "S") == {**wanted, **exitvals}


@needs_parallel
def test_results_tree_with_command_names_dirs_by_line(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """With --command, the directory is the line (parallel's argument), not the command."""
    lines = tmp_path / "lines"
    lines.write_text("one\ntwo/three\n")
    run_parallel(["--results", str(tmp_path / "P"), "echo", "::::", str(lines)])
    result = run_sshfan(["run", str(lines), "-c", "echo {}", "--results", "S", "-o", "out"])
    assert result.returncode == 0, result.stderr
    got = {k: v for k, v in tree(tmp_path / "S").items() if not k.endswith("/exitval")}
    assert got == tree(tmp_path / "P")


@needs_parallel
def test_results_tree_with_colsep_has_a_level_per_column(
    run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """Under --colsep, parallel's tree is DIR/1/COL1/2/COL2/...: the columns as cut, blanks
    kept, as many as each line has."""
    lines = tmp_path / "lines"
    lines.write_text(" a , b \nc\n,x\n\nd,e,f/g\na,b,\n\t x\t;y\n")
    template = "echo {1}-{2}"
    for colsep in (",", r"\s*[,;]\s*"):
        parallel_dir, sshfan_dir = tmp_path / f"P{colsep}", tmp_path / f"S{colsep}"
        run_parallel(
            ["--results", str(parallel_dir), "--colsep", colsep, template, "::::", str(lines)]
        )
        result = run_sshfan(
            ["run", str(lines), "-c", template, "--colsep", colsep]
            + ["--results", str(sshfan_dir), "-o", str(sshfan_dir) + ".out"]
        )
        assert result.returncode == 0, result.stderr
        got = {k: v for k, v in tree(sshfan_dir).items() if not k.endswith("/exitval")}
        wanted = tree(parallel_dir)
        assert "1/d/2/e/3/f\\_g/stdout" in wanted
        assert got == wanted


def test_results_with_onall_is_refused(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """--onall/--nonall run a line once per host: one directory cannot hold them all, so
    --results is refused (exit 2, one line) rather than keep one host's."""
    (tmp_path / "args").write_text("a\n")
    for args in (["args", "-c", "echo", "--onall"], ["--nonall", "echo hi"]):
        result = run_sshfan(["run", *args, "-S", ":", "--results", "R", "-o", "out"])
        assert result.returncode == 2, result.stderr
        assert result.stderr.count(b"\n") == 1 and b"--results" in result.stderr
        assert not (tmp_path / "R").exists()


def test_results_with_pipe_is_refused(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """--pipe chunks have no names to make directories of: exit 2, one line."""
    (tmp_path / "data").write_text("a\n")
    result = run_sshfan(["run", "data", "--pipe", "-c", "cat", "--results", "R"])
    assert result.returncode == 2
    assert b"--results" in result.stderr and b"Traceback" not in result.stderr


# ---------------------------------------------------------------------------
# transfers over SSH
# ---------------------------------------------------------------------------


def test_transfer_and_return_odd_names(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """--trc: each file goes there, its .out comes back, nothing is left on the worker."""
    head, worker, hosts = setup_dirs(tmp_path, sshd)
    (head / "in").mkdir()
    for name in ODD_NAMES:
        (head / name).write_bytes(f"data of {name}\n".encode() * 1000)
    (head / "tasks").write_text("".join(name + "\n" for name in ODD_NAMES))
    result = run_sshfan(
        [
            "run",
            "tasks",
            "-H",
            str(hosts),
            "-c",
            f"test $(pwd) = {worker} && tr a-z A-Z < {{}} > {{}}.out",
            "--trc",
            "{}.out",
            "-o",
            "out",
            "--format",
            "jsonl",
        ],
        cwd=head,
    )
    assert result.returncode == 0, result.stderr
    for name in ODD_NAMES:
        assert (head / f"{name}.out").read_bytes() == f"DATA OF {name.upper()}\n".encode() * 1000
    assert tree(worker) == {}  # the files, the .out files, and in/ are all gone
    assert not list(head.rglob("*.part"))
    assert {r["host"] for r in records(head / "out").values()} <= {"w1", "w2"}


@needs_parallel
@pytest.mark.skipif(
    shutil.which("rsync") is None and not PARALLEL_REQUIRED,
    reason="GNU parallel moves files with rsync, which is not installed",
)
def test_transfer_and_return_with_markers_as_gnu_parallel(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """--tf/--return with `/./` in the line and in the return template, and --wd: the same
    files here and on the worker as parallel leaves, and the same output."""
    command = 'f=$(echo {} | sed \'s|.*/[.]/||\'); tr a-z A-Z < "$f" > "$f.up"; cat "$f.up"'
    options = ["--tf", "{}", "--return", "out/./{}.up", "--return", "{}.up"]

    def side(name: str) -> tuple[Path, Path]:
        """A head dir with two input files listed with a marker, and a worker dir."""
        head, worker = tmp_path / name / "head", tmp_path / name / "worker"
        (head / "in" / "sub").mkdir(parents=True)
        worker.mkdir()
        # (No blanks: parallel 20221122 cannot --return a name with one over rsync.)
        for each in ("a.txt", "sub/b.txt"):
            (head / "in" / each).write_text(f"data {each}\n")
        (head / "files").write_text("in/./a.txt\nin/./sub/b.txt\n")
        return head, worker

    head, worker = side("parallel")
    wanted = run_parallel(
        ["-k", "--ssh", " ".join(sshd.ssh_argv()[:-1]), "-S", f"{sshd.host}:{sshd.port}"]
        + ["--wd", str(worker), *options, command, "::::", "files"],
        cwd=head,
    )
    wanted_trees = tree(head), tree(worker)
    head, worker = side("sshfan")
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(sshd.hosts_toml([]))
    result = run_sshfan(
        ["run", "files", "-H", str(hosts), "-S", f"{sshd.host}:{sshd.port}", "--wd", str(worker)]
        + [*options, "-c", command, "-o", "-"],
        cwd=head,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == wanted == b"DATA A.TXT\nDATA SUB/B.TXT\n"
    here = {k: v for k, v in tree(head).items() if not k.startswith("files.sshfan-journal")}
    assert (here, tree(worker)) == wanted_trees
    assert "out/in/sub/b.txt.up" in wanted_trees[0]


def test_sparse_files_travel_whole(sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """A file that ends in a hole (sparse) is sent and returned with all its bytes, not cut
    where its data ends."""
    head, worker, hosts = setup_dirs(tmp_path, sshd, hosts=1)
    with open(head / "holey", "wb") as holey:
        holey.write(b"x" * 100_000)
        holey.truncate(1_000_000)  # the rest is a hole: zeros that take no disk
    (head / "tasks").write_text("holey\n")
    args = ["run", "tasks", "-H", str(hosts), "-c", "wc -c < {}; cp --sparse=always {} {}.back"]
    result = run_sshfan([*args, "--tf", "{}", "--return", "{}.back", "-o", "out"], cwd=head)
    assert result.returncode == 0, result.stderr
    assert (head / "out").read_text().strip() == "1000000"
    assert (head / "holey.back").read_bytes() == (head / "holey").read_bytes()


def test_missing_return_and_transfer_fail_the_task(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A --return file the task did not make, or a --transferfile file that is not there,
    fails that task (exit 1) with a message naming the file; the others succeed."""
    head, worker, hosts = setup_dirs(tmp_path, sshd)
    (head / "a.txt").write_text("a\n")
    (head / "b.txt").write_text("b\n")
    (head / "tasks").write_text("a.txt\nb.txt\nnot here.txt\n")
    result = run_sshfan(
        [
            "run",
            "tasks",
            "-H",
            str(hosts),
            "-c",
            "case {} in a.txt) cp {} {.}.out;; esac; echo ran {}",
            "--transfer",
            "--return",
            "{.}.out",
            "-o",
            "out",
            "--format",
            "jsonl",
        ],
        cwd=head,
    )
    assert result.returncode == 1, result.stderr
    got = records(head / "out")
    assert got[1]["exit_code"] == 0 and (head / "a.out").read_text() == "a\n"
    assert got[2]["exit_code"] == 1 and got[2]["stdout"] == "ran b.txt\n"
    assert "--return 'b.out'" in got[2]["stderr"] and "not created" in got[2]["stderr"]
    assert not (head / "b.out").exists()
    assert got[3]["exit_code"] == 1 and got[3]["stdout"] == ""  # it never ran
    assert "--transferfile 'not here.txt'" in got[3]["stderr"]
    assert not list(head.rglob("*.part")) and not list(worker.rglob("*.part"))


def test_return_or_transfer_of_a_file_that_is_not_regular_fails_the_task(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """A --return file that is a FIFO, or a link to a device that never ends (/dev/zero),
    and a --transferfile file that is a FIFO, fail their task (exit 1) naming what the
    file is: not a fetch or an upload that waits for a writer, or reads, for good."""
    head, worker, hosts = setup_dirs(tmp_path, sshd, hosts=1)
    os.mkfifo(head / "pipe.in")
    (head / "plain.in").write_text("plain\n")
    (head / "tasks").write_text("fifo\nzero\nplain\n")
    make = (
        "case {} in fifo) mkfifo {}.out;; zero) ln -s /dev/zero {}.out;; *) echo ok > {}.out;; esac"
    )
    result = run_sshfan(
        ["run", "tasks", "-H", str(hosts), "-c", make, "--return", "{}.out"]
        + ["--format", "jsonl", "-o", "out"],
        cwd=head,
        timeout=NO_HANG,
    )
    assert result.returncode == 1, result.stderr
    got = records(head / "out")
    assert "fifo.out: not a regular file (a FIFO)" in got[1]["stderr"], got[1]
    assert "zero.out: not a regular file (a character device)" in got[2]["stderr"], got[2]
    assert got[3]["exit_code"] == 0 and (head / "plain.out").read_text() == "ok\n"
    assert not (head / "fifo.out").exists() and not (head / "zero.out").exists()
    (head / "tasks").write_text("pipe.in\nplain.in\n")
    result = run_sshfan(
        ["run", "tasks", "-H", str(hosts), "-c", "cat {}", "--transfer"]
        + ["--format", "jsonl", "-o", "out2"],
        cwd=head,
        timeout=NO_HANG,
    )
    assert result.returncode == 1, result.stderr
    got = records(head / "out2")
    assert "pipe.in: not a regular file (a FIFO)" in got[1]["stderr"], got[1]
    assert got[2] == {**got[2], "exit_code": 0, "stdout": "plain\n"}


def test_basefile_with_cleanup_leaves_nothing(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """--basefile reaches every host before its first task (executable as sent), and with
    --cleanup neither it nor the transferred files stay on the worker."""
    head, worker, hosts = setup_dirs(tmp_path, sshd)
    (head / "lib").mkdir()
    script = head / "lib" / "tool.sh"
    script.write_text('#!/bin/sh\necho tool on "$1"\n')
    script.chmod(0o755)
    for n in range(6):
        (head / f"f{n}").write_text(str(n))
    (tmp_path / "elsewhere").write_text("0")
    (head / "f0").unlink()
    (head / "f0").symlink_to(tmp_path / "elsewhere")  # sent as the file it points to
    (head / "tasks").write_text("".join(f"f{n}\n" for n in range(6)))
    result = run_sshfan(
        [
            "run",
            "tasks",
            "-H",
            str(hosts),
            "-c",
            "test ! -L {} && ./lib/tool.sh $(cat {})",
            "--bf",
            "lib/tool.sh",
            "--tf",
            "{}",
            "--cleanup",
            "-o",
            "out",
        ],
        cwd=head,
    )
    assert result.returncode == 0, result.stderr
    assert (head / "out").read_text() == "".join(f"tool on {n}\n" for n in range(6))
    assert tree(worker) == {} and list(worker.iterdir()) == []
    assert script.read_text().startswith("#!/bin/sh")  # the head's own copy is untouched


def test_basefile_to_hosts_sharing_a_directory(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """Hosts entries on one machine with one workdir each send the same --basefile there
    at once: each upload goes under a name of its own, so none truncates, renames away or
    removes another's; no host is lost and every task reads the whole file."""
    head, worker, hosts = setup_dirs(tmp_path, sshd, hosts=4)
    data = bytes(range(256)) * 4096 * 32  # 32 MiB: the uploads overlap
    (head / "big").write_bytes(data)
    (head / "tasks").write_text("".join(f"cksum < big # {n}\n" for n in range(8)))
    result = run_sshfan(["run", "tasks", "-H", str(hosts), "--bf", "big", "-o", "out"], cwd=head)
    assert result.returncode == 0, result.stderr
    assert b"lost host" not in result.stderr, result.stderr.decode(errors="replace")
    expected = subprocess.run(["cksum"], input=data, capture_output=True, check=True).stdout
    assert (head / "out").read_bytes() == expected * 8
    assert (worker / "big").read_bytes() == data
    assert not list(worker.glob(".*.part"))


def test_missing_basefile_is_usage_error(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """A --basefile that is not there: exit 2 naming it, before anything runs."""
    (tmp_path / "tasks").write_text("echo x\n")
    result = run_sshfan(["run", "tasks", "--bf", "nope.sh", "-o", "out"])
    assert result.returncode == 2
    assert b"nope.sh" in result.stderr and b"Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_local_host_transfers_nothing(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """On a local host the files are already where the task runs: nothing moves."""
    (tmp_path / "a.txt").write_text("a\n")
    (tmp_path / "tasks").write_text("a.txt\n")
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(f'[[hosts]]\nname = "here"\nlocal = true\nworkdir = "{tmp_path}"\n')
    args = ["run", "tasks", "-H", str(hosts), "-c", "cat {} > {.}.out", "--trc", "{.}.out"]
    result = run_sshfan([*args, "-o", "out"])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a.out").read_text() == "a\n"
    assert (tmp_path / "a.txt").exists()  # --cleanup removes files on workers only


def kill_once_growing(proc: subprocess.Popen[bytes], find: Callable[[], Path], what: str) -> Path:
    """SIGKILL the head PROC as soon as the part file FIND names has bytes in it; return
    that file. Fails if the transfer (WHAT) ended before it could be killed."""
    part = find()
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            part = find()
            if part.exists() and part.stat().st_size > 0:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the {what} finished before the kill"
    return part


def test_head_killed_during_return_then_resume(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """SIGKILL of the head while a --return file streams in: no half file under its name;
    --resume runs the task again and the file ends complete (equal to the worker's)."""
    head, worker, hosts = setup_dirs(tmp_path, sshd, hosts=1)
    (head / "tasks").write_text("big\n")
    args = [
        *sshfan_argv(),
        "run",
        "tasks",
        "-H",
        str(hosts),
        "-c",
        "head -c 100000000 /dev/urandom > {}.bin",
        "--return",
        "{}.bin",
        "-o",
        "out",
        "--no-progress",
    ]
    env = sshfan_env()
    proc = subprocess.Popen(
        args, cwd=head, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    part = kill_once_growing(proc, lambda: head / ".big.bin.sshfan-1.part", "return")
    assert not (head / "big.bin").exists()  # the partial file never has the final name

    result = run_sshfan([*args[3:], "--resume"], cwd=head)
    assert result.returncode == 0, result.stderr
    assert (head / "big.bin").read_bytes() == (worker / "big.bin").read_bytes()
    assert (head / "big.bin").stat().st_size == 100_000_000
    assert not part.exists()


def test_head_killed_during_upload_leaves_no_part_then_resume(
    sshd: SshServer, run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """SIGKILL of the head while a --transferfile file is being sent: the stub, seeing the
    head go, removes the half-sent file on the worker; --resume sends it whole, runs the
    task, and with --cleanup leaves nothing on the worker."""
    head, worker, hosts = setup_dirs(tmp_path, sshd, hosts=1)
    (head / "tasks").write_text("big.bin\n")
    with open(head / "big.bin", "wb") as big:
        big.truncate(2_000_000_000)  # sparse: cheap here, far too long to send before the kill
    args = ["run", "tasks", "-H", str(hosts), "-c", "wc -c < {}", "--tf", "{}", "--cleanup"]
    args += ["-o", "out", "--no-progress"]
    proc = subprocess.Popen(
        sshfan_argv(*args),
        cwd=head,
        env=sshfan_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    part = kill_once_growing(
        proc, lambda: next(worker.glob(".big.bin.sshfan-1-*.part"), worker / "none yet"), "upload"
    )
    deadline = time.monotonic() + 60
    while part.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(worker.iterdir()) == [], "the half-sent file stayed on the worker"

    (head / "big.bin").write_bytes(b"x" * 1000)
    result = run_sshfan([*args, "--resume"], cwd=head)
    assert result.returncode == 0, result.stderr
    assert (head / "out").read_text().strip() == "1000"
    assert tree(worker) == {} and list(worker.iterdir()) == []


def test_host_lost_during_return_runs_the_task_elsewhere(
    sshd_factory: Callable[..., SshServer], run_sshfan: RunSshfan, tmp_path: Path
) -> None:
    """The worker dies while a --return file streams in: the task runs again on the other
    host, and the file that ends here is that run's, whole (no mix, no part file left)."""
    servers = {"alpha": sshd_factory(), "bravo": sshd_factory()}
    head = tmp_path / "head"
    head.mkdir()
    blocks = []
    for name, server in servers.items():
        (tmp_path / name).mkdir()
        blocks.append(
            "\n".join(
                [
                    "[[hosts]]",
                    f'name = "{name}"',
                    f'address = "{server.host}"',
                    f"port = {server.port}",
                    f'user = "{server.user}"',
                    f'identity = "{server.client_key}"',
                    f'known_hosts = "{server.known_hosts}"',
                    f'workdir = "{tmp_path / name}"',
                    "slots = 1",
                    "keepalive = 2",
                ]
            )
        )
    (tmp_path / "hosts.toml").write_text("\n\n".join(blocks) + "\n")
    (head / "tasks").write_text("a\nb\n")
    args = [*sshfan_argv(), "run", "tasks", "-H", str(tmp_path / "hosts.toml")]
    args += ["-c", "head -c 64000000 /dev/urandom > {}.bin", "--return", "{}.bin", "-o", "out"]
    env = sshfan_env()
    proc = subprocess.Popen(
        args, cwd=head, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    killed = cut = ""
    deadline = time.monotonic() + 120
    try:
        while not killed and proc.poll() is None and time.monotonic() < deadline:
            for part in head.glob(".*.part"):
                stem = part.name.split(".")[1]  # .a.bin.sshfan-1.part -> a
                owners = [n for n in servers if (tmp_path / n / f"{stem}.bin").exists()]
                if len(owners) == 1 and part.stat().st_size > 0:
                    killed, cut = owners[0], stem
                    servers[killed].kill()
                    break
            time.sleep(0.002)
        _, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed, "no return was seen streaming in"
    assert proc.returncode == 0, stderr.decode(errors="replace")
    assert f"lost host {killed}".encode() in stderr
    survivor = next(n for n in servers if n != killed)
    assert (tmp_path / survivor / f"{cut}.bin").exists()  # the cut task ran again there
    for stem in ("a", "b"):
        here = (head / f"{stem}.bin").read_bytes()
        assert len(here) == 64_000_000
        if (tmp_path / survivor / f"{stem}.bin").exists():
            assert here == (tmp_path / survivor / f"{stem}.bin").read_bytes()
    assert not list(head.glob(".*.part"))


def test_resume_with_other_file_options_is_refused(run_sshfan: RunSshfan, tmp_path: Path) -> None:
    """--resume with another --return (or none): exit 2 naming it; the same one resumes."""
    (tmp_path / "tasks").write_text("echo a\n")
    args = ["run", "tasks", "-o", "out", "--return", "{}.out"]
    assert run_sshfan(args).returncode == 0
    for changed in (["--return", "other"], []):
        refused = run_sshfan([*args[:4], *changed, "--resume"])
        assert refused.returncode == 2, refused.stderr
        assert b"--return" in refused.stderr and b"Traceback" not in refused.stderr
    assert run_sshfan([*args, "--resume"]).returncode == 0


def test_host_leaving_the_hosts_file_still_returns_its_files(
    sshd: SshServer, tmp_path: Path
) -> None:
    """A host removed mid-run drains: the task it runs ends there and its --return file
    still comes back (the result counts); the tasks it had not started go elsewhere."""
    head, worker, _ = setup_dirs(tmp_path, sshd)
    started, flag = tmp_path / "started", tmp_path / "flag"
    hold = f"if [ {{}} = 1 ]; then touch {started}; while [ ! -e {flag} ]; do sleep 0.05; done; fi"
    (head / "tasks").write_text("1\n2\n3\n")
    hosts = tmp_path / "live.toml"

    def write_hosts(names: list[str]) -> None:
        """Replace the hosts file at once, as an editor does."""
        new = tmp_path / "hosts.new"
        new.write_text(sshd.hosts_toml(names, slots=1, workdir=str(worker)))
        os.replace(new, hosts)

    write_hosts(["h1"])
    args = [*sshfan_argv(), "run", "tasks", "-H", str(hosts), "-f", "jsonl"]
    args += ["-c", f"{hold}; echo {{}} > {{}}.out", "--return", "{}.out", "-o", "out"]
    env = sshfan_env()
    proc = subprocess.Popen(args, cwd=head, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "task 1 never started"
        write_hosts(["h2"])
        while not (head / "3.out").exists() and time.monotonic() < deadline + 60:
            time.sleep(0.05)
        flag.touch()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr.decode(errors="replace")
    assert [(head / f"{n}.out").read_text() for n in (1, 2, 3)] == ["1\n", "2\n", "3\n"]
    got = records(head / "out")
    assert [got[n]["host"] for n in (1, 2, 3)] == ["h1", "h2", "h2"]
