"""Same command, same bytes: sshfan side by side with the real GNU parallel.

These tests run GNU parallel itself (Debian's 20221122 in CI, which installs it) and
compare its answers with sshfan's: replacement strings and their quoting, --colsep,
blank and non-UTF-8 lines, --tag/--tagstring, --dry-run, --pipe's {#}, and the joblog.
Where parallel is missing they skip, except under SSHFAN_REQUIRE_PARALLEL=1 (CI), where
they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sshd import SshServer
from support import needs_parallel, run_parallel, sshfan_env

import sshfan

pytestmark = needs_parallel

# Arguments that trip quoting and path handling: quotes, blanks, $, backslashes, globs,
# ~, a leading dash, the characters parallel quotes and shlex does not, empty ones,
# non-ASCII (valid and not valid UTF-8), and the path shapes {.} {/} {//} {/.} differ on.
TRICKY = [
    "plain",
    "a b",
    "it's",
    "'",
    "''",
    "a'",
    "'a",
    '"q"',
    "$HOME",
    "a\\b",
    "*",
    "~",
    "-x",
    "@",
    "%",
    "=",
    ":",
    ",",
    "a,b",
    "x=1",
    "user@host:path",
    "100%",
    "é",
    "naïve file.txt",
    "caf\udce9.txt",  # the Latin-1 byte 0xE9: not UTF-8
    "tab\there",
    "!",
    "#",
    "{}",
    "a+b",
    "",
    "  ",
    ".hidden",
    "dir/.hidden",
    ".",
    "..",
    "dir/",
    "a/b/",
    "//x",
    "a.b/c",
    "a.tar.gz",
    "/",
    "/a",
    "a.",
    "a..b",
    "a//b",
    "dir//",
    "x/.",
    "x/..",
    ".a.b",
    "dir/.a.b",
    "a b/c.d e",
]

TEMPLATES = [
    "echo {} X {.} X {/} X {//} X {/.}",
    "echo {1} X {1.} X {1/} X {1//} X {1/.} X {-1} X {2} X {0}",
    "echo {#} {%} x{}y '{}' \"{}\" {unknown} { }",
    "echo {0#} {0%} {1#} {-1 %}",  # positional {#} {%}: {0..} is the seq/slot, others nothing
    "echo",  # no replacement string: the argument is appended
    "{}",  # the first word holds one: nothing is quoted
    "{.} {}",
    "x{} {}",
    "V={} {}",  # a variable definition is not the command: quoted
]


def _lines_file(tmp_path: Path, lines: list[str], name: str = "args.txt") -> Path:
    """Write LINES (their bytes as they stand for, see sshfan.as_bytes) one a line."""
    path = tmp_path / name
    path.write_bytes(b"".join(sshfan.as_bytes(line) + b"\n" for line in lines))
    return path


@pytest.mark.e2e
@pytest.mark.parametrize("template", TEMPLATES)
def test_replacement_strings_and_quoting_match_parallel(tmp_path: Path, template: str) -> None:
    """Each template filled with each tricky line gives parallel's --dry-run bytes."""
    args = _lines_file(tmp_path, TRICKY)
    expected = run_parallel(["--dry-run", "-k", "-j1", template, "::::", str(args)])
    filled = sshfan.Template(template)
    got = b"".join(
        sshfan.as_bytes(filled.render(line, seq, slot="1")) + b"\n"
        for seq, line in enumerate(TRICKY, 1)
    )
    assert got.split(b"\n") == expected.split(b"\n")


@pytest.mark.e2e
@pytest.mark.parametrize("colsep", [",", ",+", r"\s*;\s*", "\t"])
def test_colsep_columns_match_parallel(tmp_path: Path, colsep: str) -> None:
    """--colsep cuts, trims and fills {n} (missing columns empty) as parallel does."""
    lines = [" a, b c.d/e.f ,x ", "a", "", " ", "a,,b", "x;y ; z", "p\tq\t", ",lead", "é,caf\udce9"]
    args = _lines_file(tmp_path, lines)
    template = "echo {} X {1} X {2} X {3} X {-1} X {2.} X {1/} X {1//} X {1/.} X {-4}"
    expected = run_parallel(["--dry-run", "-k", "--colsep", colsep, template, "::::", str(args)])
    filled = sshfan.Template(template, colsep)
    got = b"".join(
        sshfan.as_bytes(filled.render(line, n, "1")) + b"\n" for n, line in enumerate(lines, 1)
    )
    assert got == expected


def test_shell_quote_is_parallels_not_shlex() -> None:
    """A few quotings spelled out: what parallel's shell_quote gives, byte for byte."""
    quote = sshfan.shell_quote
    assert quote("a,b") == "'a,b'"  # shlex leaves it bare
    assert quote("x=1") == "'x=1'"
    assert quote("'") == '"\'"'
    assert quote("a'") == "'a'\"'\""
    assert quote("") == "''"
    assert quote("a+b/c.d_e-f") == "a+b/c.d_e-f"


def test_run_end_to_end_matches_parallel(tmp_path: Path, run_sshfan) -> None:
    """The same template over the same file: sshfan's output file is parallel -k's stdout,
    blank and non-UTF-8 lines included (a blank line is an empty argument with -c)."""
    lines = [line for line in TRICKY if "\t" not in line] + ["", "last one"]
    args = _lines_file(tmp_path, lines, "names.txt")
    template = "printf '%s|' {#} {} {.} {/} {//} {/.} {1} {2}; echo"
    expected = run_parallel(["-k", "-j2", template, "::::", str(args)])
    out = tmp_path / "out.txt"
    result = run_sshfan(["run", str(args), "-c", template, "-o", str(out), "-j", "2"])
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == expected
    assert f"{len(lines)} of {len(lines)} tasks done".encode() in result.stderr


def test_blank_lines_are_skipped_as_commands(tmp_path: Path, run_sshfan) -> None:
    """Without -c a blank line is no task (parallel would run an empty command)."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_bytes(b"echo a\n\n   \necho caf\xe9\n")
    result = run_sshfan(["run", str(tasks), "-o", "-", "-f", "jsonl"])
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["seq"] for r in records] == [1, 4]
    assert records[1]["task"] == "echo caf\ufffd"
    assert records[1]["task_b64"] == "ZWNobyBjYWbp"
    assert records[1]["stdout_b64"] == "Y2Fm6Qo="
    assert "task_b64" not in records[0]


def test_dry_run_prints_what_parallel_prints(tmp_path: Path, run_sshfan) -> None:
    """--dry-run prints the commands as parallel --dry-run -k does, runs nothing and writes
    no output or journal. (parallel numbers {%} in a dry run by timing, differently from
    run to run: sshfan gives task N the slot (N-1) mod SLOTS + 1.)"""
    args = _lines_file(tmp_path, ["a b", "", "caf\udce9", "x"])
    template = "echo {} {#} {%} > /dev/null; touch ran"
    expected = run_parallel(["--dry-run", "-k", "-j1", template, "::::", str(args)])
    out = tmp_path / "out.txt"
    result = run_sshfan(
        ["run", str(args), "-c", template, "-j", "1", "--dry-run", "-o", str(out)], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    assert not out.exists() and not Path(str(out) + ".journal").exists()
    assert not (tmp_path / "ran").exists()
    slots = run_sshfan(["run", str(args), "-c", "echo {%}", "-j", "3", "--dry-run"])
    assert slots.stdout == b"echo 1\necho 2\necho 3\necho 1\n"
    commands = tmp_path / "commands.txt"
    commands.write_text("echo one\n\necho two\n")
    plain = run_sshfan(["run", str(commands), "--dry-run"], cwd=tmp_path)
    assert plain.returncode == 0 and plain.stdout == b"echo one\necho two\n"
    assert not (tmp_path / "commands.out").exists()


def test_pipe_fills_seq_and_slot_like_parallel(tmp_path: Path, run_sshfan) -> None:
    """--pipe: {#} is the chunk's number and {%} its slot in the command; the other
    replacement strings stand for an empty argument, as parallel has them."""
    data = tmp_path / "data.txt"
    data.write_text("".join(f"{n}\n" for n in range(1, 8)))
    work = tmp_path / "work"
    work.mkdir()
    template = f"cat > {work}/part{{#}}; echo {{#}} {{}} {{//}}"
    expected = run_parallel(["--pipe", "-N3", "-k", "-j1", template], input=data.read_bytes())
    result = run_sshfan(
        ["run", str(data), "--pipe", "--lines", "3", "-c", template, "-o", "-", "-j", "1"],
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected == b"1  .\n2  .\n3  .\n"  # echo '' .
    assert (work / "part2").read_text() == "4\n5\n6\n"
    dry = run_sshfan(
        ["run", str(data), "--pipe", "--lines", "3", "-c", "cat > p{#}.{%}", "--dry-run", "-j", "2"]
    )
    assert dry.stdout == b"cat > p1.1\ncat > p2.2\ncat > p3.1\n"


# Durations that make each task's slot certain (parallel's lowest free one): with two
# slots the long second task keeps slot 2 while the others follow one another in slot 1.
STAGGERED = ["0.1", "0.8", "0.1", "0.1"]


def test_slot_numbers_are_parallels(tmp_path: Path, run_sshfan) -> None:
    """{%} is the lowest free slot at the task's start, tasks starting in file order, in
    the command, under --pipe and in --tagstring, as parallel -k -j2 has it."""
    args = _lines_file(tmp_path, STAGGERED)
    template = "sleep {}; echo {#}:{%}"
    expected = run_parallel(["-k", "-j2", template, "::::", str(args)])
    assert expected == b"1:1\n2:2\n3:1\n4:1\n"
    result = run_sshfan(["run", str(args), "-c", template, "-j", "2", "-o", "-"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    pipe = "sleep $(cat); echo {#}:{%}"
    expected = run_parallel(["-k", "-j2", "--pipe", "-N1", pipe], input=args.read_bytes())
    result = run_sshfan(["run", str(args), "--pipe", "-N", "1", "-c", pipe, "-j", "2", "-o", "-"])
    assert result.stdout == expected
    tagged = ["-k", "-j2", "--tagstring", "{%}", "sleep {}; echo {#}"]
    expected = run_parallel([*tagged, "::::", str(args)])
    result = run_sshfan(["run", str(args), *tagged[2:4], "-c", tagged[4], "-j", "2", "-o", "-"])
    assert result.stdout == expected == b"1\t1\n2\t2\n1\t3\n1\t4\n"
    positional = "sleep {}; echo {#}:{0%}"  # {0%} is {%} too
    expected = run_parallel(["-k", "-j2", positional, "::::", str(args)])
    for _ in range(2):  # again, with the durations known: still in file order, not longest first
        result = run_sshfan(["run", str(args), "-c", positional, "-j", "2", "-o", "-"])
        assert result.stdout == expected == b"1:1\n2:2\n3:1\n4:1\n"


def test_slots_relative_to_the_cpus_and_keep_order(tmp_path: Path, run_sshfan) -> None:
    """-j +1 is the CPUs and one more, as in parallel (each of the first CPUS+1 tasks gets
    a slot of its own, the next the first one freed); -k and --keep-order are accepted
    and change nothing; a -j sshfan cannot read is one line and exit 2."""
    cpus = len(os.sched_getaffinity(0))
    args = _lines_file(tmp_path, ["0.3"] + ["1.5"] * cpus + ["0"])
    template = "sleep {}; echo {%}"
    expected = run_parallel(["-k", "-j", str(cpus + 1), template, "::::", str(args)])
    assert expected.split() == [str(n).encode() for n in [*range(1, cpus + 2), 1]]
    for keep in ([], ["-k"], ["--keep-order"]):
        result = run_sshfan(["run", str(args), "-c", template, "-j", "+1", *keep, "-o", "-"])
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected, keep
    for bad in ("x", "1.5", "0"):
        refused = run_sshfan(["run", str(args), "-c", template, "-j", bad, "-o", "-"])
        assert refused.returncode == 2 and refused.stderr.count(b"\n") == 1, refused.stderr


def test_tag_and_tagstring_match_parallel(tmp_path: Path, run_sshfan) -> None:
    """--tag prefixes the argument (or the command line) and a TAB, a last line without a
    newline included; --tagstring fills replacement strings unquoted, and {host}."""
    args = _lines_file(tmp_path, ["a b", "", "c'd", "x,y z"])
    template = "printf 'one\\ntwo'"
    for extra in (["--tag"], ["--tagstring", "<{}|{#}|{.}|{1}>\\t"], ["--tag", "-C", ","]):
        expected = run_parallel(["-k", *extra, template + " {}", "::::", str(args)])
        result = run_sshfan(["run", str(args), "-c", template + " {}", *extra, "-o", "-"])
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected, extra
    commands = tmp_path / "commands.txt"
    commands.write_text("echo p\nprintf 'q\\nr'\n")
    expected = run_parallel(["-k", "--tag", "::::", str(commands)])
    tagged = run_sshfan(["run", str(commands), "--tag", "-o", "-"])
    assert tagged.stdout == expected == b"echo p\tp\nprintf 'q\\nr'\tq\nprintf 'q\\nr'\tr"
    hosts = run_sshfan(["run", str(commands), "--tagstring", "{host}:{#}", "-o", "-"])
    assert hosts.stdout == b"local:1\tp\nlocal:2\tq\nlocal:2\tr"


JOBLOG_HEADER = b"Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand\n"


def _joblog_rows(path: Path) -> dict[int, list[bytes]]:
    """A joblog's rows by seq, checking the header and each row's shape."""
    data = path.read_bytes()
    assert data.startswith(JOBLOG_HEADER)
    rows = {}
    for line in data[len(JOBLOG_HEADER) :].splitlines():
        row = line.split(b"\t", 8)
        assert re.fullmatch(rb"\d+\.\d{3}", row[2]), row
        assert re.fullmatch(rb" *\d+\.\d{3}", row[3]) and len(row[3]) == 10, row
        rows[int(row[0])] = row
    return rows


def test_tag_marks_lines_ended_by_cr_as_parallel(tmp_path: Path, run_sshfan) -> None:
    """--tag and --tagstring tag after each CR as after each LF, and nothing after the
    last line end or on empty output, as parallel does (a progress bar's lines)."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(
        "printf 'x\\r\\ny'\nprintf ''\nprintf '1%%\\r50%%\\r100%%\\n'\n"
        "printf '\\n\\n'\nprintf 'a\\nb'\nprintf '\\r'\n"
    )
    for option in (["--tag"], ["--tagstring", "<{#}>"]):
        wanted = run_parallel(["-k", *option, "::::", str(tasks)])
        result = run_sshfan(["run", str(tasks), *option, "-o", "-"])
        assert result.returncode == 0, result.stderr
        assert result.stdout == wanted


def test_joblog_matches_parallels(tmp_path: Path, run_sshfan) -> None:
    """Every column but the times is parallel's, byte for byte: Host ':', Send and
    Receive (stdout only), Exitval and Signal, the quoted command with its TAB."""
    args = _lines_file(tmp_path, ["a b", "exit 3", "it's", "kill"])
    template = "printf '%s\tx' {}; echo err >&2; case {} in exit*) exit 3;; kill) kill $$;; esac"
    theirs, ours = tmp_path / "parallel.log", tmp_path / "sshfan.log"
    run_parallel(["--joblog", str(theirs), "-k", template, "::::", str(args)], status=2)
    result = run_sshfan(
        ["run", str(args), "-c", template, "--joblog", str(ours), "-o", str(tmp_path / "o")]
    )
    assert result.returncode == 1, result.stderr
    want, got = _joblog_rows(theirs), _joblog_rows(ours)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for seq in want:
        assert [got[seq][i] for i in (0, 1, 4, 5, 6, 7, 8)] == [
            want[seq][i] for i in (0, 1, 4, 5, 6, 7, 8)
        ]
    assert got[4][7] == b"15" and b"\t" in got[1][8]
    again = run_sshfan(
        ["run", str(args), "-c", template, "--joblog", f"+{ours}", "-o", str(tmp_path / "o")]
    )
    assert again.returncode == 1, again.stderr
    assert ours.read_bytes().count(b"Seq\tHost") == 1 and len(ours.read_bytes().splitlines()) == 9
    data = tmp_path / "data.txt"
    data.write_text("abc\ndef\nghi\n")
    run_parallel(["--joblog", str(theirs), "--pipe", "-N2", "-k", "wc -c"], input=data.read_bytes())
    run_sshfan(
        [
            "run",
            str(data),
            "--pipe",
            "--lines",
            "2",
            "-c",
            "wc -c",
            "--joblog",
            str(ours),
            "-o",
            "-",
        ]
    )
    want, got = _joblog_rows(theirs), _joblog_rows(ours)
    assert (
        [got[s][4:6] for s in (1, 2)]
        == [want[s][4:6] for s in (1, 2)]
        == [
            [b"8", b"2"],
            [b"4", b"2"],
        ]
    )


def test_joblog_of_a_timed_out_task_says_killed_as_parallels(tmp_path: Path, run_sshfan) -> None:
    """A task killed for its --timeout is Exitval -1, as in parallel's joblog (its Signal
    is 9: sshfan kills the group at once, where parallel sends TERM first, 15)."""
    tasks = tmp_path / "tasks"
    tasks.write_text("sleep 60\necho ok\n")
    theirs, ours = tmp_path / "parallel.log", tmp_path / "sshfan.log"
    run_parallel(["--joblog", str(theirs), "--timeout", "3", "::::", str(tasks)], status=1)
    result = run_sshfan(
        ["run", str(tasks), "--timeout", "3", "--joblog", str(ours), "-o", str(tmp_path / "o")]
    )
    assert result.returncode == 1, result.stderr
    want, got = _joblog_rows(theirs), _joblog_rows(ours)
    assert [got[seq][6] for seq in (1, 2)] == [want[seq][6] for seq in (1, 2)] == [b"-1", b"0"]
    assert (want[1][7], got[1][7]) == (b"15", b"9")


def test_task_longer_than_exec_allows_is_refused_before_anything_runs(
    tmp_path: Path, run_sshfan
) -> None:
    """A command longer than Linux lets one argument be (/bin/sh -c LINE) exits 2 naming
    its line, before any task runs; with -c the filled command is what counts."""
    tasks = tmp_path / "tasks.txt"
    long_line = "echo " + "x" * 200 * 1024
    tasks.write_text(f"touch {tmp_path}/ran\n{long_line}\n")
    out = tmp_path / "out.txt"
    result = run_sshfan(["run", str(tasks), "-o", str(out)])
    assert result.returncode == 2
    assert f"{tasks}:2: the command is {len(long_line)} bytes".encode() in result.stderr
    assert b"131071" in result.stderr and b"Traceback" not in result.stderr
    assert not (tmp_path / "ran").exists() and not out.exists()
    fits = tmp_path / "fits.txt"
    size = 131071 - len("printf %s  | wc -c")  # the filled command is exactly the limit
    fits.write_text("x" * size + "\n")
    ok = run_sshfan(["run", str(fits), "-c", "printf %s {} | wc -c", "-o", "-"])
    assert ok.returncode == 0 and ok.stdout.strip() == str(size).encode(), ok.stderr
    fits.write_text("x" * (size + 1) + "\n")
    over = run_sshfan(["run", str(fits), "-c", "printf %s {} | wc -c", "-o", "-"])
    assert over.returncode == 2 and b"is 131072 bytes" in over.stderr
    quotes = tmp_path / "quotes.txt"
    quotes.write_text("'" * 40000 + "\n")  # 40,000 bytes, 5 times that once quoted
    refused = run_sshfan(["run", str(quotes), "-c", "echo {}", "-o", "-"])
    assert refused.returncode == 2 and f"{quotes}:1:".encode() in refused.stderr
    none_used = run_sshfan(["run", str(quotes), "-c", "echo {#}", "-o", "-"])
    assert none_used.returncode == 0 and none_used.stdout == b"1\n"


def test_perl_expressions_are_refused_not_left_as_text(tmp_path: Path, run_sshfan) -> None:
    """{= perl =} is parallel's, not sshfan's: exit 2 rather than run it as text."""
    args = _lines_file(tmp_path, ["a"])
    result = run_sshfan(["run", str(args), "-c", "echo {= s/a/b/ =}", "-o", "-"])
    assert result.returncode == 2 and b"perl expression" in result.stderr


def test_slots_and_environment_over_ssh(sshd: SshServer, tmp_path: Path, run_sshfan) -> None:
    """{%} and SSHFAN_SLOT number the job slots of all hosts 1..N, each host its own; tasks
    see SSHFAN_SEQ and SSHFAN_HOST too; the joblog and jsonl show the command as run."""
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(sshd.hosts_toml(["h1", "h2"], slots=2))
    args = _lines_file(tmp_path, [str(n) for n in range(1, 13)])
    template = 'echo {} {%} "$SSHFAN_SEQ" "$SSHFAN_SLOT" "$SSHFAN_HOST"'
    joblog = tmp_path / "joblog"
    out = tmp_path / "out.jsonl"
    result = run_sshfan(
        ["run", str(args), "-c", template, "--hosts", str(hosts), "-f", "jsonl", "-o", str(out)]
        + ["--joblog", str(joblog)]
    )
    assert result.returncode == 0, result.stderr
    slots_of: dict[str, set[str]] = {"h1": set(), "h2": set()}
    for record in map(json.loads, out.read_text().splitlines()):
        line, slot, seq, env_slot, host = record["stdout"].split()
        assert (line, seq, env_slot, host) == (str(record["seq"]),) * 2 + (slot, record["host"])
        assert record["task"] == f'echo {line} {slot} "$SSHFAN_SEQ" "$SSHFAN_SLOT" "$SSHFAN_HOST"'
        slots_of[host].add(slot)
    used = slots_of["h1"] | slots_of["h2"]
    assert used <= {"1", "2", "3", "4"} and not slots_of["h1"] & slots_of["h2"]
    for row in _joblog_rows(joblog).values():
        assert row[1] in (b"h1", b"h2") and b"{%}" not in row[8]


def test_slot_cannot_name_a_transferred_file(tmp_path: Path, run_sshfan) -> None:
    """{%} is known only when the task starts, after its files went: exit 2, not a file
    named with a NUL or a literal {%}."""
    args = _lines_file(tmp_path, ["a"])
    for option in ("--tf", "--return"):
        result = run_sshfan(["run", str(args), "-c", "cat {}", option, "x{%}", "-o", "-"])
        assert result.returncode == 2 and b"{%}" in result.stderr, result.stderr


# Separators Python's re.split and Perl's split cut differently: zero-width ones (no empty
# first column in Perl, nor an empty match right after a separator), POSIX classes (which
# Python reads as a `[` and a `:`), captures (columns too), and bytes (`.` is one byte).
PERL_COLSEPS = [
    r"\b",
    "^",
    "",
    "|",
    ",?",
    r"\s*",
    "(?=b)",
    "(,)|(;)",
    "[[:space:]]+",
    "[[:^alpha:]]",
    "[^[:alnum:]]",
    "[[:upper:][:punct:]]",
    "a..b",
    "[]a]",
]
PERL_COLSEP_LINES = ["ab", " a  b ", "a,b,,c,", ",a", "", "a\u00e9b", "x;y ; z", "AbC dE", "[x]"]


@pytest.mark.parametrize("colsep", PERL_COLSEPS)
def test_colsep_splits_as_perl_splits(tmp_path: Path, colsep: str) -> None:
    """--colsep cuts as parallel's `split /REGEX/, LINE, -1` on the line's bytes."""
    args = _lines_file(tmp_path, PERL_COLSEP_LINES)
    template = "printf '<%s>' {1} {2} {3} {4} {5} {6}; echo"
    expected = run_parallel(["--dry-run", "-k", "--colsep", colsep, template, "::::", str(args)])
    filled = sshfan.Template(template, colsep)
    got = b"".join(
        sshfan.as_bytes(filled.render(line, n, "1")) + b"\n"
        for n, line in enumerate(PERL_COLSEP_LINES, 1)
    )
    assert got == expected


def test_colsep_posix_class_runs_without_a_warning(tmp_path: Path) -> None:
    """A POSIX class runs as in parallel, even where warnings are errors; a class Perl does
    not know, or [= =], exits 2 with one line."""
    args = _lines_file(tmp_path, ["a b\tc"])
    expected = run_parallel(["--colsep", "[[:space:]]+", "echo {2}", "::::", str(args)])
    argv = [sys.executable, "-W", "error", "-m", "sshfan", "run", str(args), "-o", "-"]
    env = sshfan_env()
    done = subprocess.run(
        [*argv, "--colsep", "[[:space:]]+", "-c", "echo {2}"], capture_output=True, env=env
    )
    assert done.returncode == 0 and done.stdout == expected == b"b\n", done.stderr
    assert b"Warning" not in done.stderr
    for colsep, needle in (("[[:foo:]]", b"[:foo:]"), ("[[=a=]]", b"[= =]")):
        bad = subprocess.run(
            [*argv, "--colsep", colsep, "-c", "echo"], capture_output=True, env=env
        )
        assert bad.returncode == 2 and needle in bad.stderr, bad.stderr
        assert len(bad.stderr.splitlines()) == 1


def test_false_tagstring_and_dry_run_tags_match_parallel(tmp_path: Path, run_sshfan) -> None:
    """--tagstring '' or 0 is false in parallel's Perl: no tag (--tag then tags as
    alone); --dry-run tags each line of the commands it prints, as parallel's."""
    args = _lines_file(tmp_path, ["a", "b c"])
    for extra in (["--tagstring", "0"], ["--tagstring", ""], ["--tag", "--tagstring", "0"]):
        expected = run_parallel(["-k", *extra, "echo", "::::", str(args)])
        result = run_sshfan(["run", str(args), "-c", "echo", *extra, "-o", "-"])
        assert result.returncode == 0 and result.stdout == expected, extra
    template = "echo {}\necho 2"
    for extra in (["--tag"], ["--tagstring", "<{#}|{%}|{1}>"], ["--tagstring", "0"]):
        expected = run_parallel(["-k", "-j1", "--dry-run", *extra, template, "::::", str(args)])
        dry = run_sshfan(["run", str(args), "-j", "1", "--dry-run", *extra, "-c", template])
        assert dry.returncode == 0 and dry.stdout == expected, extra
    commands = tmp_path / "commands.txt"
    commands.write_text("echo x\n")
    expected = run_parallel(["-k", "--dry-run", "--tag", "::::", str(commands)])
    dry = run_sshfan(["run", str(commands), "--dry-run", "--tag"])
    assert dry.stdout == expected == b"echo x\techo x\n"


def _untimed(joblog: bytes) -> list[list[bytes]]:
    """A joblog's lines as fields, the times (Starttime, JobRuntime) left out."""
    rows = [line.split(b"\t") for line in joblog.splitlines()]
    return [row[:2] + row[4:] if len(row) == 9 else row for row in rows]


def test_joblog_rows_in_seq_order_appended_and_on_stdout_as_parallel(
    tmp_path: Path, run_sshfan
) -> None:
    """As parallel -k: rows in seq order, whatever order the tasks end in; `+FILE` on a new
    file writes no header; `-` is stdout, each row after its task's output; --nonall's
    Command ends in a space."""
    tasks = tmp_path / "ord.txt"
    tasks.write_text("sleep 0.5; echo a\necho b\n")
    theirs, ours = tmp_path / "theirs.log", tmp_path / "ours.log"
    run_parallel(["-k", "-j2", "--joblog", str(theirs), "::::", str(tasks)])
    result = run_sshfan(["run", str(tasks), "-j", "2", "--joblog", str(ours), "-o", "-"])
    assert result.returncode == 0, result.stderr
    assert [row[0] for row in _untimed(ours.read_bytes())] == [b"Seq", b"1", b"2"]
    assert _untimed(ours.read_bytes()) == _untimed(theirs.read_bytes())
    theirs, ours = tmp_path / "theirs+.log", tmp_path / "ours+.log"
    run_parallel(["-k", "--joblog", f"+{theirs}", "::::", str(tasks)])
    run_sshfan(["run", str(tasks), "--joblog", f"+{ours}", "-o", "-"])
    assert _untimed(ours.read_bytes()) == _untimed(theirs.read_bytes())
    assert not ours.read_bytes().startswith(b"Seq")
    expected = run_parallel(["-k", "-j2", "--joblog", "-", "::::", str(tasks)])
    both = run_sshfan(["run", str(tasks), "-j", "2", "--joblog", "-", "-o", "-"])
    assert _untimed(both.stdout) == _untimed(expected)
    assert [row[0] for row in _untimed(both.stdout)] == [b"Seq", b"a", b"1", b"b", b"2"]
    theirs, ours = tmp_path / "theirs-nonall.log", tmp_path / "ours-nonall.log"
    run_parallel(["--nonall", "-S", ":", "--joblog", str(theirs), "echo hi"])
    run_sshfan(["run", "echo hi", "--nonall", "-S", ":", "--joblog", str(ours)])
    assert _untimed(ours.read_bytes()) == _untimed(theirs.read_bytes())
    assert ours.read_bytes().endswith(b"\techo hi \n")


@pytest.mark.parametrize("lines", [0, 1, 2, 3])
def test_pipe_lines_cut_blank_lines_as_parallel(tmp_path: Path, lines: int) -> None:
    """--pipe -N: parallel looks for a chunk's first line end from its second byte, so an
    empty first line goes with the next one; -N 0 is --block's chunks."""
    for data in (b"a\n\n\nb\n", b"\n\n", b"a\nb\n\n\n\nc\nd\n", b"\n\n\na\n", b"a\n\n", b"a"):
        path = tmp_path / "data.txt"
        path.write_bytes(data)
        expected = run_parallel(["-k", "--pipe", f"-N{lines}", "cat; echo '|'"], input=data)
        got = b"".join(chunk + b"|\n" for chunk in sshfan._pipe_chunks(path, lines, 1 << 20))
        assert got == expected, data


def test_pipe_lines_zero_timeout_zero_and_results_as_parallel(tmp_path: Path, run_sshfan) -> None:
    """-N 0 runs as --block alone and --timeout 0 is no timeout, as in parallel (which
    sshfan refused); --results prints nothing, its --dry-run neither."""
    data = tmp_path / "data.txt"
    data.write_text("".join(f"{n}\n" for n in range(30000)))
    expected = run_parallel(
        ["-k", "--pipe", "-N0", "--block", "10k", "wc -l"], input=data.read_bytes()
    )
    result = run_sshfan(
        ["run", str(data), "--pipe", "-N", "0", "--block", "10k", "-c", "wc -l", "-o", "-"]
    )
    assert result.returncode == 0 and result.stdout == expected, result.stderr
    assert len(expected.splitlines()) > 10
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("sleep 0.2; echo late\n")
    expected = run_parallel(["--timeout", "0", "::::", str(tasks)])
    result = run_sshfan(["run", str(tasks), "--timeout", "0", "-o", "-"])
    assert result.returncode == 0 and result.stdout == expected == b"late\n", result.stderr
    args = _lines_file(tmp_path, ["a", "b c"])
    for extra in ([], ["--tag"], ["--dry-run"]):
        expected = run_parallel(
            ["-k", "--results", str(tmp_path / "theirs"), *extra, "echo", "::::", str(args)]
        )
        result = run_sshfan(
            ["run", str(args), "-c", "echo", "--results", str(tmp_path / "ours"), *extra, "-o", "-"]
        )
        assert result.returncode == 0 and result.stdout == expected == b"", extra
    assert (tmp_path / "ours/1/b c/stdout").read_bytes() == b"b c\n"
