"""sshfan's benchmark: each scenario side by side with what a user would use instead.

Run ``python tests/bench.py`` (about half an hour) or ``--quick`` (two to
three minutes), ``--json`` for machine-readable results on stdout (the table then goes to
stderr), ``--only NAME`` to pick scenarios. It starts its own OpenSSH server on
127.0.0.1 (tests/sshd.py) in a temporary directory and talks to nothing else.

Each round runs sshfan and then its comparison, alternating, so that noise on this
shared machine falls on both; the table shows medians. Every sshfan run's output is
checked (line counts, bytes, hosts), so a broken run is reported as an error rather
than as fast. A comparison tool that is missing shows as "not installed".
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pyproject's runtime dependency on 3.10
    import tomli as tomllib

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))

from delay_proxy import DelayProxy  # noqa: E402
from sshd import SshServer  # noqa: E402

RUN_TIMEOUT = 900.0  # seconds for any one command before it is killed
MIB = 1024 * 1024


class BenchError(Exception):
    """A run that failed or produced wrong output; its message goes in the table."""


# ---------------------------------------------------------------------------
# running commands
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Ran:
    """What one command run gave: wall and CPU seconds, exit code, stderr tail, peak RSS."""

    wall: float
    code: int
    stderr: str
    cpu: float = 0.0  # user + system of the command and the children it waited for
    peak_mib: float = 0.0
    busy: float = 0.0  # CPU seconds the whole machine used meanwhile (sshd, logins too)
    idle: float = 0.0  # CPU seconds the machine's CPUs sat idle meanwhile


def machine_cpu() -> tuple[float, float]:
    """Busy and idle CPU seconds so far, summed over the machine's CPUs (/proc/stat).

    Busy is user + nice + system + irq + softirq: time given to other guests (steal)
    is not this machine's work."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(x) for x in stat.readline().split()[1:8]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, idle, iowait, irq, softirq = ticks
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, (idle + iowait) / hz


def _vmhwm_kib(pid: int) -> int:
    """Return the process's peak resident set size (VmHWM) in KiB, or 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group a command runs in, and reap its leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        proc.wait()


def run(
    argv: list[str],
    *,
    stdin: Path | None = None,
    stdout: Path | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    measure_rss: bool = False,
    timeout: float = RUN_TIMEOUT,
) -> Ran:
    """Run argv in its own process group; time it from spawn to exit."""
    with contextlib.ExitStack() as stack:
        fin = stack.enter_context(open(stdin, "rb")) if stdin else subprocess.DEVNULL
        fout = stack.enter_context(open(stdout, "wb")) if stdout else subprocess.DEVNULL
        ferr = stack.enter_context(tempfile.TemporaryFile())
        busy0, idle0 = machine_cpu()
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdin=fin, stdout=fout, stderr=ferr, cwd=cwd, env=env, start_new_session=True
        )
        expired = threading.Event()

        def expire() -> None:
            """Kill the command's process group once its time is up."""
            expired.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, expire)
        timer.start()
        peak_kib = 0
        try:
            # wait4, not Popen.wait: it also gives the command's CPU time and peak RSS.
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG if measure_rss else 0)
                if pid:
                    break
                # VmHWM is the head's own peak (children excluded); polled because it
                # vanishes at exit. wait4's ru_maxrss then adds the last moments.
                peak_kib = max(peak_kib, _vmhwm_kib(proc.pid))
                time.sleep(0.01)
        except BaseException:
            # Ctrl-C reaches only our process group: take the command's down with us.
            _kill_group(proc)
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
        busy1, idle1 = machine_cpu()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if expired.is_set():
            raise BenchError(f"{Path(argv[0]).name} timed out after {timeout:.0f}s")
        if measure_rss:
            peak_kib = max(peak_kib, usage.ru_maxrss)
        ferr.seek(0)
        err = ferr.read().decode(errors="replace")
    cpu = usage.ru_utime + usage.ru_stime
    return Ran(
        wall,
        proc.returncode,
        err[-4000:].strip(),
        cpu,
        peak_kib / 1024,
        busy1 - busy0,
        idle1 - idle0,
    )


def checked(ran: Ran, what: str) -> Ran:
    """Raise BenchError unless the run exited 0."""
    if ran.code != 0:
        lines = [line.strip() for line in ran.stderr.splitlines() if line.strip()]
        # The cause (a host skipped or lost, a traceback's last line) comes before
        # the closing summary lines, so pick those out first.
        telling = [
            line
            for line in lines
            if any(word in line.lower() for word in ("skipped", "lost", "error", "refused"))
        ]
        shown = list(dict.fromkeys(telling[:3] + lines[-2:]))
        raise BenchError(f"{what} exited {ran.code}: " + " | ".join(shown))
    return ran


# ---------------------------------------------------------------------------
# tasks, hosts files, output checks
# ---------------------------------------------------------------------------


def echo_tasks(n: int) -> str:
    """Return a tasks file text of n tiny tasks `echo 1` .. `echo n`."""
    return "".join(f"echo {i}\n" for i in range(1, n + 1))


def echo_output(n: int) -> bytes:
    """Return sshfan's expected text output for echo_tasks(n), in seq order."""
    return "".join(f"{i}\n" for i in range(1, n + 1)).encode()


def check_text(path: Path, expected: bytes, what: str) -> None:
    """Raise BenchError unless the file holds exactly the expected bytes."""
    got = path.read_bytes() if path.exists() else b""
    if got != expected:
        raise BenchError(
            f"{what}: wrong output ({len(got.splitlines())} lines, "
            f"{len(expected.splitlines())} expected)"
        )


def check_unordered(path: Path, expected: bytes, what: str) -> None:
    """Raise BenchError unless the file holds the expected lines in any order."""
    got = sorted(path.read_bytes().splitlines())
    if got != sorted(expected.splitlines()):
        raise BenchError(f"{what}: wrong output ({len(got)} lines)")


def read_jsonl(path: Path, count: int, what: str) -> list[dict[str, object]]:
    """Read sshfan's jsonl output; raise BenchError unless count records all exited 0."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(records) != count:
        raise BenchError(f"{what}: {len(records)} jsonl records, {count} expected")
    failed = [r for r in records if r.get("exit_code") != 0]
    if failed:
        raise BenchError(f"{what}: {len(failed)} tasks failed, e.g. {failed[0]}")
    return records


def _toml_value(value: object) -> str:
    """Encode a str, int, float, bool, list or table of them as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_hosts(doc: dict[str, object]) -> str:
    """Write a parsed hosts file (a [defaults] table and [[hosts]]) back to TOML."""
    lines: list[str] = []
    defaults = doc.get("defaults")
    if isinstance(defaults, dict):
        lines.append("[defaults]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in defaults.items()]
    hosts = doc.get("hosts")
    for host in hosts if isinstance(hosts, list) else []:
        lines += ["", "[[hosts]]"] + [f"{k} = {_toml_value(v)}" for k, v in host.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One scenario's line in the table, with every sample behind its medians."""

    name: str
    unit: str
    comparison_label: str
    target: str
    sshfan: list[float] = dataclasses.field(default_factory=list)
    comparison: list[float] = dataclasses.field(default_factory=list)
    ratio: float | None = None
    met: bool | None = None
    error: str = ""
    comparison_error: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    elapsed_s: float = 0.0
    load: str = ""
    detail: str = ""  # shown after the sshfan median

    def median(self, side: str) -> float | None:
        """Median of the sshfan or comparison samples, None when there are none."""
        samples = self.sshfan if side == "sshfan" else self.comparison
        return statistics.median(samples) if samples else None

    def attempt(self, side: str, measure: Callable[[], float]) -> None:
        """Take one sample for a side; on failure keep the first error and skip the side."""
        if self.error if side == "sshfan" else self.comparison_error:
            return
        try:
            value = measure()
        except (BenchError, OSError, LookupError, TypeError, ValueError) as exc:
            message = str(exc) or type(exc).__name__
            if side == "sshfan":
                self.error = message
            else:
                self.comparison_error = message
            return
        (self.sshfan if side == "sshfan" else self.comparison).append(value)
        log(f"  {self.name}: {side} {fmt(value, self.unit)}")

    def to_json(self) -> dict[str, object]:
        """Machine-readable form of the row."""
        out = dataclasses.asdict(self)
        out["sshfan_median"] = self.median("sshfan")
        out["comparison_median"] = self.median("comparison")
        return out


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, to tell a quiet machine from a busy one."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_note(name: str, runs: list[Ran]) -> str:
    """Summarise how busy the sshfan head was over a scenario's runs."""
    if not runs:
        return "no sshfan run"
    wall = sum(r.wall for r in runs)
    cpu = sum(r.cpu for r in runs)
    who = "head + local stub + tasks" if name == "local" else "head"
    return f"sshfan {who} CPU {cpu:.1f} s over {wall:.1f} s wall ({100 * cpu / wall:.0f}%)"


def machine_note(sshfan_runs: list[Ran], other_runs: list[Ran], other: str) -> str:
    """Compare the CPU the whole machine used, and left idle, during each side's runs."""
    if not sshfan_runs or not other_runs:
        return f"no machine CPU figures ({len(sshfan_runs)} sshfan, {len(other_runs)} {other} runs)"

    def per_run(runs: list[Ran]) -> str:
        """Median busy and idle CPU seconds over RUNS."""
        busy = statistics.median(r.busy for r in runs)
        idle = statistics.median(r.idle for r in runs)
        return f"{busy:.2f} s busy, {idle:.2f} s idle"

    return (
        f"machine CPU per run (medians, every process): sshfan {per_run(sshfan_runs)}; "
        f"{other} {per_run(other_runs)}"
    )


def log(message: str) -> None:
    """Progress on stderr."""
    print(message, file=sys.stderr, flush=True)


def fmt(value: float | None, unit: str) -> str:
    """Format a measurement with its unit for the table."""
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    if unit == "ms/task":
        return f"{value:.2f} ms/task"
    if unit in ("MB/s", "tasks/s"):
        return f"{value:.0f} {unit}"
    return f"{value:.1f} {unit}"


# ---------------------------------------------------------------------------
# the bench
# ---------------------------------------------------------------------------


class Bench:
    """Shared state: the sshd, a scratch directory, sizes and round counts."""

    def __init__(
        self, workdir: Path, server: SshServer, quick: bool, rounds: int, python: str
    ) -> None:
        """Keep the scratch dir and server; pick sizes for quick or full runs; run sshfan
        with the interpreter PYTHON (see clean_python)."""
        self.dir = workdir
        self.python = python
        self.server = server
        self.quick = quick
        self.rounds = rounds
        self.cpus = os.cpu_count() or 1
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        )
        # The bench's own duration history (see fresh_history): runs order tasks by it.
        self.env["XDG_CACHE_HOME"] = str(workdir / "cache")
        self._runs = 0
        self.sshfan_runs: list[Ran] = []  # every sshfan run, for CPU notes
        self.xargs_runs: list[Ran] = []  # every xargs run, for machine CPU notes

    def settle(self, limit: float = 15.0) -> None:
        """Wait until the sshd has no sessions left from an earlier scenario."""
        deadline = time.monotonic() + limit
        while len(self.server.pids()) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)

    # -- files --------------------------------------------------------------

    def write(self, name: str, text: str) -> Path:
        """Write a file in the scratch directory and return its path."""
        path = self.dir / name
        path.write_text(text)
        return path

    def hosts(self, name: str, names: list[str], slots: int = 1, **override: object) -> Path:
        """Write a hosts file for names on our sshd; override replaces [defaults] keys."""
        doc = tomllib.loads(self.server.hosts_toml(names, slots))
        defaults = doc.setdefault("defaults", {})
        defaults.update(override)
        return self.write(name, dump_hosts(doc))

    def fresh_history(self) -> None:
        """Forget the durations earlier runs learnt: the next run hands tasks out in file order."""
        shutil.rmtree(self.dir / "cache", ignore_errors=True)

    @contextlib.contextmanager
    def rundir(self) -> Iterator[Path]:
        """A fresh directory for one run's output and journal, removed afterwards."""
        self._runs += 1
        path = self.dir / f"run{self._runs}"
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    # -- sshfan -------------------------------------------------------------

    def sshfan(
        self,
        tasks: Path,
        out: Path,
        hosts: Path | None,
        fmt: str = "text",
        measure_rss: bool = False,
        extra: tuple[str, ...] = (),
    ) -> Ran:
        """Run `python -m sshfan run` to completion; raise BenchError unless it exits 0."""
        argv = [self.python, "-m", "sshfan", "run", str(tasks), "-o", str(out)]
        argv += ["--no-progress", "--format", fmt, *extra]
        if hosts is not None:
            argv += ["--hosts", str(hosts)]
        ran = run(argv, cwd=out.parent, env=self.env, measure_rss=measure_rss)
        self.sshfan_runs.append(ran)
        return checked(ran, "sshfan")

    def sshfan_echo(self, n: int, hosts: Path | None) -> float:
        """Run n echo tasks through sshfan, check the output, return the wall time."""
        tasks = self.write(f"echo{n}.txt", echo_tasks(n))
        with self.rundir() as d:
            out = d / "out.txt"
            ran = self.sshfan(tasks, out, hosts)
            check_text(out, echo_output(n), "sshfan")
        return ran.wall

    def xargs_echo(self, n: int, procs: int) -> float:
        """Run n echo tasks with local `xargs -P procs`, check the output, return wall."""
        tasks = self.write(f"echo{n}.txt", echo_tasks(n))
        with self.rundir() as d:
            out = d / "out.txt"
            argv = ["xargs", "-P", str(procs), "-I{}", "sh", "-c", "{}"]
            ran = checked(run(argv, stdin=tasks, stdout=out), "xargs")
            self.xargs_runs.append(ran)
            check_unordered(out, echo_output(n), "xargs")
        return ran.wall

    # -- scenarios ------------------------------------------------------------

    def tiny_vs_xargs(self) -> Row:
        """3,000 echo tasks on 2 loopback hosts x 1 slot against local xargs -P 2."""
        n = 3000
        row = Row(f"{n:,} tiny, 2 hosts x1", "s", "xargs -P 2 (local)", "<= 1.3x")
        hosts = self.hosts("hosts2.toml", ["h1", "h2"])
        if shutil.which("xargs") is None:
            row.comparison_error = "not installed"
        self.xargs_runs = []
        for i in range(self.rounds):
            log(f"[{row.name}] round {i + 1}/{self.rounds}")
            row.attempt("sshfan", lambda: self.sshfan_echo(n, hosts))
            row.attempt("comparison", lambda: self.xargs_echo(n, 2))
        row.notes.append(machine_note(self.sshfan_runs, self.xargs_runs, "xargs"))
        return judge(row, lambda s, c: s / c, lambda r: r <= 1.3)

    def scaling(self) -> Row:
        """Tasks/s and head CPU per task as host entries grow (1, 2, 4, 8; 1 slot each):
        where the head itself becomes the limit."""
        n = 1000 if self.quick else 3000
        row = Row(f"scaling, {n:,} tiny, 8 vs 1 host", "tasks/s", "1 host entry", "-")
        tasks = self.write(f"echo{n}.txt", echo_tasks(n))
        curve: dict[int, list[tuple[float, float]]] = {1: [], 2: [], 4: [], 8: []}
        for i in range(self.rounds):
            log(f"[{row.name}] round {i + 1}/{self.rounds}")
            for count in curve:
                hosts = self.hosts(f"hosts{count}x1.toml", [f"h{k}" for k in range(1, count + 1)])
                with self.rundir() as d:
                    out = d / "out.txt"
                    ran = self.sshfan(tasks, out, hosts)
                    check_text(out, echo_output(n), "sshfan")
                curve[count].append((n / ran.wall, ran.cpu / n))
        for count, samples in curve.items():
            if not samples:
                continue
            rate = statistics.median(s[0] for s in samples)
            cpu_ms = 1000 * statistics.median(s[1] for s in samples)
            row.notes.append(
                f"{count} host entries: {rate:,.0f} tasks/s (wall, start-up included), "
                f"head CPU {cpu_ms:.2f} ms a task"
            )
            if count == 8:
                row.sshfan.append(rate)
            if count == 1:
                row.comparison.append(rate)
        s8, s1 = row.median("sshfan"), row.median("comparison")
        if s8 is not None and s1 and not row.error:
            row.ratio = s8 / s1
        return row

    def tiny_vs_parallel(self) -> Row:
        """200 echo tasks on 2 hosts against GNU parallel -S 2/host over ControlMaster."""
        n = 200
        n_par = 20 if self.quick else n
        row = Row(
            f"{n} tiny, 2 hosts, per task",
            "ms/task",
            "parallel -S 2/host, ControlMaster",
            ">= 50x faster",
        )
        if n_par != n:
            row.comparison_label += f" ({n_par} tasks)"
        hosts = self.hosts("hosts2.toml", ["h1", "h2"])
        parallel = shutil.which("parallel")
        with contextlib.ExitStack() as stack:
            wrapper = None
            if parallel is None:
                row.comparison_error = "not installed"
            else:
                wrapper = self._parallel_wrapper()
                stack.callback(self._control_master_exit, wrapper)
                try:
                    self._parallel_setup(parallel, wrapper, row)
                except BenchError as exc:
                    row.comparison_error = str(exc)
            for i in range(self.rounds):
                log(f"[{row.name}] round {i + 1}/{self.rounds}")
                row.attempt("sshfan", lambda: 1000 * self.sshfan_echo(n, hosts) / n)
                if wrapper is not None and parallel is not None and not row.comparison_error:
                    row.attempt(
                        "comparison", lambda: 1000 * self._parallel_echo(parallel, wrapper, n_par)
                    )
        return judge(row, lambda s, c: c / s, lambda r: r >= 50)

    def _parallel_wrapper(self) -> Path:
        """Write an ssh wrapper for GNU parallel: our server's options plus ControlMaster."""
        options = self.server.ssh_argv()[1:-1]
        options += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.dir}/cm-%C"]
        options += ["-o", "ControlPersist=300"]
        wrapper = self.dir / "ssh-cm"
        wrapper.write_text("#!/bin/sh\nexec ssh " + " ".join(options) + ' "$@"\n')
        wrapper.chmod(0o755)
        return wrapper

    def _parallel_setup(self, parallel: str, wrapper: Path, row: Row) -> None:
        """Open the ControlMaster and prove GNU parallel runs tasks through it remotely."""
        dest = self.server.ssh_argv()[-1]
        # Open the master alone first: two jobs racing to create it would both
        # fall back to plain connections ("disabling multiplexing").
        checked(run([str(wrapper), dest, "true"]), "ssh ControlMaster")
        if run([str(wrapper), "-O", "check", dest]).code != 0:
            raise BenchError("ControlMaster did not stay up")
        probe = self.write("probe.txt", "echo $SSH_CONNECTION\n")
        with self.rundir() as d:
            out = d / "probe.out"
            argv = [parallel, "--will-cite", "--ssh", str(wrapper), "-S", f"2/{dest}"]
            checked(run(argv, stdin=probe, stdout=out), "parallel")
            seen = out.read_text().strip()
        if not seen.startswith(f"{self.server.host} "):
            raise BenchError(f"parallel did not run over ssh (SSH_CONNECTION={seen!r})")
        row.notes.append(f"parallel ran remotely (SSH_CONNECTION={seen}) via ControlMaster")

    def _parallel_echo(self, parallel: str, wrapper: Path, n: int) -> float:
        """Run n echo tasks with GNU parallel over ssh; return seconds per task."""
        tasks = self.write(f"echo{n}.txt", echo_tasks(n))
        dest = self.server.ssh_argv()[-1]
        with self.rundir() as d:
            out = d / "out.txt"
            argv = [parallel, "--will-cite", "--ssh", str(wrapper), "-S", f"2/{dest}"]
            ran = checked(run(argv, stdin=tasks, stdout=out), "parallel")
            check_unordered(out, echo_output(n), "parallel")
        return ran.wall / n

    def _control_master_exit(self, wrapper: Path) -> None:
        """Stop the ControlMaster process the wrapper started."""
        run([str(wrapper), "-O", "exit", self.server.ssh_argv()[-1]], timeout=30)

    def local_vs_xargs(self) -> Row:
        """3,000 echo tasks on the local host (no --hosts) against xargs -P nproc."""
        n = 3000
        row = Row(f"{n:,} tiny, local", "s", f"xargs -P {self.cpus} (local)", "<= 1.15x")
        if shutil.which("xargs") is None:
            row.comparison_error = "not installed"
        self.xargs_runs = []
        for i in range(self.rounds):
            log(f"[{row.name}] round {i + 1}/{self.rounds}")
            row.attempt("sshfan", lambda: self.sshfan_echo(n, None))
            row.attempt("comparison", lambda: self.xargs_echo(n, self.cpus))
        row.notes.append(machine_note(self.sshfan_runs, self.xargs_runs, "xargs"))
        return judge(row, lambda s, c: s / c, lambda r: r <= 1.15)

    def makespan(self) -> Row:
        """120 short then 6 long sleeps on 4 hosts x 2 slots against the ideal bound (a first
        run: no duration history, so tasks go out in file order)."""
        return self._makespan(learnt=False)

    def makespan_learnt(self) -> Row:
        """The makespan scenario run a second time: the long tasks are known and go first."""
        return self._makespan(learnt=True)

    def _makespan(self, learnt: bool) -> Row:
        """The makespan scenario, on a first run or (LEARNT) a second run of the same list."""
        short, long_ = [0.05] * 120, [1.5] * 6
        slots = 4 * 2
        bound = max(sum(short + long_) / slots, max(long_))
        name = "makespan, second run (LPT)" if learnt else "makespan 126 sleeps, 4 hosts x2"
        row = Row(name, "s", "bound max(sum/slots, longest)", "")
        row.target = "<= 1.15x"
        # Each task prints its start time, so the span from the first start to the
        # last end (start + duration_s) shows the schedule without the connect time.
        lines = "".join(f"date +%s.%N; sleep {s}\n" for s in short + long_)
        tasks = self.write("makespan.txt", lines)
        hosts = self.hosts("hosts4x2.toml", ["h1", "h2", "h3", "h4"], slots=2)
        spans: list[float] = []
        firsts: list[float] = []  # the learning runs' walls, side by side with the second runs
        heads: list[float] = []  # launch to the first task's start
        tails: list[float] = []  # the last task's end to the exit

        def once() -> float:
            """One jsonl run; the wall time of the whole command is the makespan."""
            self.fresh_history()
            if learnt:  # a first run, to learn the durations from (in file order)
                with self.rundir() as d:
                    firsts.append(self.sshfan(tasks, d / "out.jsonl", hosts, fmt="jsonl").wall)
            with self.rundir() as d:
                out = d / "out.jsonl"
                launched = time.time()  # (the tasks print the same clock's time)
                ran = self.sshfan(tasks, out, hosts, fmt="jsonl")
                records = read_jsonl(out, len(short) + len(long_), "sshfan")
            used = {str(r.get("host")) for r in records}
            if len(used) != 4:
                row.notes.append(f"only {len(used)} of 4 hosts used: {sorted(used)}")
            starts = [float(str(r["stdout"]).split()[0]) for r in records]
            ends = [t + float(str(r["duration_s"])) for t, r in zip(starts, records, strict=True)]
            spans.append(max(ends) - min(starts))
            heads.append(min(starts) - launched)
            tails.append(launched + ran.wall - max(ends))
            return ran.wall

        for i in range(self.rounds):
            log(f"[{row.name}] round {i + 1}/{self.rounds}")
            row.attempt("sshfan", once)
            row.comparison.append(bound)
        if not learnt:
            row.notes.append(
                f"in-order dispatch cannot beat {sum(short) / slots + max(long_):.3f} s "
                f"(shorts spread over {slots} slots, then a long one); bound {bound:.3f} s"
            )
        if firsts:
            first = statistics.median(firsts)
            row.notes.append(f"the first runs (file order), alternating: median {first:.3f} s")
        if spans:
            span = statistics.median(spans)
            row.notes.append(
                f"first task start to last task end: median {span:.3f} s "
                f"({span / bound:.2f}x bound); the rest of the wall is start-up and exit"
            )
            row.notes.append(
                f"launch to the first task's start: median {statistics.median(heads):.3f} s; "
                f"the last task's end to the exit: median {statistics.median(tails):.3f} s "
                f"(the target leaves {0.15 * bound:.3f} s for both and the schedule's own loss)"
            )
        return judge(row, lambda s, c: s / c, lambda r: r <= 1.15)

    def speculate(self) -> Row:
        """80 equal sleeps on 4 hosts x 2 slots, one host 4x slower: with --speculate, side
        by side with the same run without it, against the bound for those speeds."""
        count, seconds, slow = (40, 0.3, 4) if self.quick else (80, 0.3, 4)
        row = Row("one host 4x slower, --speculate", "s", "bound n/capacity", "<= 1.3x")
        # The task is the same text everywhere; the slow host's env stretches its sleep.
        # Each prints its start time, so the span from the first start to the last end
        # shows the schedule apart from the start-up (as in the makespan rows).
        line = f'date +%s.%N; sleep $(awk "BEGIN {{ print {seconds} * ${{FACTOR:-1}} }}")\n'
        tasks = self.write("speculate.txt", line * count)
        doc = tomllib.loads(self.server.hosts_toml(["h1", "h2", "h3", "h4"], 2))
        doc["hosts"][3]["env"] = {"FACTOR": str(slow)}
        hosts = self.write("hosts-slow.toml", dump_hosts(doc))
        per_second = 6 / seconds + 2 / (seconds * slow)  # tasks a second, all 8 slots busy
        bound = max(count / per_second, seconds)
        plain: list[float] = []
        spans: dict[bool, list[float]] = {True: [], False: []}
        copies: list[str] = []

        def once(extra: tuple[str, ...]) -> float:
            """One run (with EXTRA options); check its output; return the wall time."""
            self.fresh_history()  # no run may learn an order from the one before
            with self.rundir() as d:
                out = d / "out.jsonl"
                ran = self.sshfan(tasks, out, hosts, fmt="jsonl", extra=extra)
                records = read_jsonl(out, count, "sshfan")
            if [r["seq"] for r in records] != list(range(1, count + 1)):
                raise BenchError("sshfan: the jsonl records are not one a task in seq order")
            starts = [float(str(r["stdout"]).split()[0]) for r in records]
            ends = [t + float(str(r["duration_s"])) for t, r in zip(starts, records, strict=True)]
            spans[bool(extra)].append(max(ends) - min(starts))
            said = re.search(r"(\d+) backup copies started, (\d+) finished first", ran.stderr)
            if extra:
                copies.append(f"{said.group(1)}/{said.group(2)}" if said else "0/0")
            return ran.wall

        for i in range(self.rounds):
            log(f"[{row.name}] round {i + 1}/{self.rounds}")
            row.attempt("sshfan", lambda: once(("--speculate",)))
            plain.append(once(()))
            row.comparison.append(bound)
        if plain:
            without = statistics.median(plain)
            row.notes.append(
                f"without --speculate, alternating: median {without:.3f} s "
                f"({without / bound:.2f}x the bound {bound:.3f} s)"
            )
        for speculating, runs in spans.items():
            if runs:
                span = statistics.median(runs)
                row.notes.append(
                    f"{'with' if speculating else 'without'} --speculate, first task start to "
                    f"last task end: median {span:.3f} s ({span / bound:.2f}x bound)"
                )
        if copies:
            row.notes.append(f"backup copies started/won, each round: {', '.join(copies)}")
        return judge(row, lambda s, c: s / c, lambda r: r <= 1.3)

    def throughput(self) -> Row:
        """10 tasks of 100 MB output each against one raw ssh stream of 1 GiB (quick: 3)."""
        per_task, count = 100_000_000, 3 if self.quick else 10
        raw_mib = 300 if self.quick else 1024
        row = Row(
            f"{count} x 100 MB output, 1 host",
            "MB/s",
            f"ssh 'head -c {raw_mib}M /dev/zero' > file",
            ">= 0.9x",
        )
        tasks = self.write("big.txt", f"head -c {per_task} /dev/zero\n" * count)
        hosts = self.hosts("hosts1.toml", ["h1"])

        def sshfan_once() -> float:
            """Stream the tasks' output through sshfan to its output file; return MB/s."""
            with self.rundir() as d:
                out = d / "out.bin"
                ran = self.sshfan(tasks, out, hosts)
                size = out.stat().st_size
                if size != per_task * count:
                    raise BenchError(f"sshfan wrote {size} bytes, {per_task * count} expected")
            return per_task * count / ran.wall / 1e6

        def ssh_once() -> float:
            """Stream as much through plain ssh into a file, as a user would; return MB/s."""
            argv = [*self.server.ssh_argv(), f"head -c {raw_mib}M /dev/zero"]
            with self.rundir() as d:
                ran = checked(run(argv, stdout=d / "out.bin"), "ssh")
            return raw_mib * MIB / ran.wall / 1e6

        for i in range(self.rounds):
            log(f"[{row.name}] round {i + 1}/{self.rounds}")
            row.attempt("sshfan", sshfan_once)
            row.attempt("comparison", ssh_once)
        row.notes.append("sshfan MB/s counts the whole run: connect, journal and merged output")
        return judge(row, lambda s, c: s / c, lambda r: r >= 0.9)

    def files(self) -> Row:
        """A 100 MB file sent to a host and back (--tf, --return) against scp there and back."""
        size = 100_000_000
        row = Row("100 MB file there and back", "MB/s", "scp up, then scp down", ">= 0.7x")
        worker = self.dir / "worker"
        worker.mkdir(exist_ok=True)
        hosts = self.hosts("hosts-files.toml", ["h1"], workdir=str(worker))
        data = self.dir / "payload.bin"
        if not data.exists():
            with open(data, "wb") as out:  # random: neither side may gain by compression
                for _ in range(size // MIB + 1):
                    out.write(os.urandom(MIB))
                out.truncate(size)
        tasks = self.write("files.txt", "payload.bin\n")
        scp = shutil.which("scp")
        if scp is None:
            row.comparison_error = "not installed"
        login = self.server.ssh_argv()
        options = [scp or "scp", "-q", "-P", login[2], *login[3:-1]]

        def sshfan_once() -> float:
            """One task that renames the file it was sent; its result comes back; MB/s."""
            with self.rundir() as d:
                (d / "payload.bin").symlink_to(data)
                argv = [self.python, "-m", "sshfan", "run", str(tasks), "-o", "out"]
                argv += ["--no-progress", "--hosts", str(hosts), "-c", "mv {} {}.back"]
                argv += ["--tf", "{}", "--return", "{}.back"]
                ran = checked(run(argv, cwd=d, env=self.env), "sshfan")
                self.sshfan_runs.append(ran)
                if (d / "payload.bin.back").stat().st_size != size:
                    raise BenchError("the returned file has the wrong size")
                for left in worker.iterdir():
                    left.unlink()
            return 2 * size / ran.wall / 1e6

        def scp_once() -> float:
            """scp the file to the host and back (two logins, as two commands would be)."""
            with self.rundir() as d:
                remote = f"{login[-1]}:{worker}/payload.bin"
                up = checked(run([*options, str(data), remote]), "scp up")
                down = checked(run([*options, remote, str(d / "back.bin")]), "scp down")
                if (d / "back.bin").stat().st_size != size:
                    raise BenchError("scp brought back the wrong size")
                for left in worker.iterdir():
                    left.unlink()
            return 2 * size / (up.wall + down.wall) / 1e6

        for i in range(self.rounds):
            log(f"[{row.name}] round {i + 1}/{self.rounds}")
            row.attempt("sshfan", sshfan_once)
            if scp is not None:
                row.attempt("comparison", scp_once)
        row.notes.append(
            "sshfan MB/s counts the whole run (connect, stub, both transfers, journal); "
            "the source is symlinked in, the returned file fsynced before its rename"
        )
        return judge(row, lambda s, c: s / c, lambda r: r >= 0.7)

    def head_rss(self) -> Row:
        """The head's peak RSS for 5,000 tasks against 500,000 (50,000 in --quick)."""
        small, big = 5_000, 50_000 if self.quick else 500_000
        row = Row(
            f"head peak RSS, {big:,} tasks", "MiB", f"same, {small:,} tasks", "<=100 MiB, +<20"
        )
        hosts = self.hosts("hosts2x2.toml", ["h1", "h2"], slots=2)
        small_tasks = self.write("rss_small.txt", "true\n" * small)
        big_tasks = self.write("rss_big.txt", "true\n" * big)
        walls: dict[int, list[float]] = {small: [], big: []}

        def once(tasks: Path, n: int) -> float:
            """Run n `true` tasks, check n jsonl records, return the head's peak MiB."""
            with self.rundir() as d:
                out = d / "out.jsonl"
                ran = self.sshfan(tasks, out, hosts, fmt="jsonl", measure_rss=True)
                with open(out, "rb") as f:
                    lines = sum(1 for _ in f)
                if lines != n:
                    raise BenchError(f"sshfan: {lines} jsonl records, {n} expected")
            walls[n].append(ran.wall)
            return ran.peak_mib

        # Memory does not wobble like time does: one round each in --quick, at most
        # three otherwise (500,000 tasks take minutes).
        rounds = 1 if self.quick else min(self.rounds, 3)
        for i in range(rounds):
            log(f"[{row.name}] round {i + 1}/{rounds}")
            row.attempt("sshfan", lambda: once(big_tasks, big))
            row.attempt("comparison", lambda: once(small_tasks, small))
        for n, w in walls.items():
            if w:
                row.notes.append(
                    f"{n:,} tasks: median wall {statistics.median(w):.1f} s "
                    f"= {n / statistics.median(w):.0f} tasks/s (2 hosts x 2 slots)"
                )
        row.error = row.error or row.comparison_error
        big_mib, small_mib = row.median("sshfan"), row.median("comparison")
        if big_mib is not None and small_mib is not None:
            row.ratio = big_mib / small_mib
            row.met = big_mib <= 100 and big_mib - small_mib < 20
            row.notes.append(f"growth {big_mib - small_mib:+.1f} MiB from {small:,} to {big:,}")
        return row

    def many_hosts(self) -> Row:
        """100 host entries on one sshd: all connected and running within 5 s."""
        n_hosts, n_tasks, sleep_s, limit = 100, 1000, 0.5, 5.0
        row = Row(
            f"{n_hosts} hosts on 1 sshd",
            "s",
            f"{n_hosts} plain ssh+python3 logins, 10 at once",
            f"all {n_hosts} running <= {limit:.0f} s",
        )
        names = [f"h{i:03d}" for i in range(1, n_hosts + 1)]
        hosts = self.hosts("hosts100.toml", names)
        counts: list[int] = []

        def once() -> float:
            """Run once; return the latest first-task start over the hosts (s from launch)."""
            launched = time.time()
            # Each task prints when it started and sleeps until a deadline past the
            # limit: enough work for every slot so that a late host still finds some,
            # yet a run with few hosts up does not crawl through it all.
            deadline = int(launched + limit + 3)
            line = f"t=$(date +%s.%N); echo $t; [ ${{t%.*}} -ge {deadline} ] || sleep {sleep_s}\n"
            tasks = self.write("hosts100.txt", line * n_tasks)
            with self.rundir() as d:
                out = d / "out.jsonl"
                ran = self.sshfan(tasks, out, hosts, fmt="jsonl")
                records = read_jsonl(out, n_tasks, "sshfan")
            first: dict[str, float] = {}
            for r in records:
                started = float(str(r["stdout"]).split()[0]) - launched
                host = str(r["host"])
                first[host] = min(first.get(host, started), started)
            counts.append(len(first))
            in_time = sum(1 for t in first.values() if t <= limit)
            row.notes.append(
                f"round {len(counts)}: {len(first)} hosts ran tasks, {in_time} of them "
                f"within {limit:.0f} s; first start on each host from "
                f"{min(first.values()):.2f} to {max(first.values()):.2f} s; wall {ran.wall:.2f} s"
            )
            return max(first.values())

        def logins() -> float:
            """How long this machine takes for n_hosts plain logins that start python3."""
            argv = [*self.server.ssh_argv(), "python3 -S -c pass"]
            start = time.perf_counter()
            # 10 at once: OpenSSH's MaxStartups begins dropping beyond 10 pending.
            with concurrent.futures.ThreadPoolExecutor(10) as pool:
                for ran in pool.map(lambda _: run(argv), range(n_hosts)):
                    checked(ran, "ssh")
            return time.perf_counter() - start

        # 100 logins are slow on a small machine: in --quick one round and no floor.
        rounds = 1 if self.quick else self.rounds
        if self.quick:
            row.comparison_error = "skipped in --quick"
        for i in range(rounds):
            log(f"[{row.name}] round {i + 1}/{rounds}")
            row.attempt("sshfan", once)
            row.attempt("comparison", logins)
        if not self.quick:
            row.notes.append(
                "the comparison is the floor this machine sets: every login runs the user's "
                "shell start-up and python3 on the same 2 CPUs as sshd and the head"
            )
        value = row.median("sshfan")
        if value is not None and not row.error:
            c = row.median("comparison")
            row.ratio = value / c if c else None
            row.met = value <= limit and min(counts) == n_hosts
            row.detail = f"({min(counts)}/{n_hosts} hosts)"
        return row

    def hosts_to_running(self) -> Row:
        """N host entries on one sshd (N = 10, 50, 100): the time until every one of them
        runs a task, as a ratio to N plain logins starting python3 at the same concurrency
        (sshfan starts CONNECT_PACE at once per server): the machine's floor."""
        sizes = (10,) if self.quick else (10, 50, 100)
        pace = 8  # sshfan.CONNECT_PACE
        row = Row(
            f"{sizes[-1]} hosts to running, 1 sshd",
            "s",
            f"{sizes[-1]} plain ssh+python3 logins, {pace} at once",
            "<= 1.2x",
        )
        arrivals = Path(tempfile.mkdtemp(prefix="sshfan-bench-arrivals-"))
        arrivals.chmod(0o1777)  # the tasks may run as the throwaway user
        ratios: dict[int, list[float]] = {n: [] for n in sizes}

        def once(n: int) -> float:
            """Run until all N hosts ran a task; return when the last one started one."""
            for old in arrivals.iterdir():
                old.unlink()
            # Each task notes its host's arrival, then waits (at most 5 minutes) until all
            # N have come: the early hosts hold their tasks, so every late host still
            # finds work, and once all are up every task ends at once. The count is a
            # shell glob, not a process, so that waiting costs the logins little CPU.
            line = (
                f'date +%s.%N; touch {arrivals}/"$SSHFAN_HOST"; i=0; '
                f"while set -- {arrivals}/*; [ $# -lt {n} ] && [ $i -lt 600 ]; "
                "do sleep 0.5; i=$((i+1)); done\n"
            )
            count = n * 3
            tasks = self.write(f"hosts{n}.txt", line * count)
            hosts = self.hosts(f"hosts{n}.toml", [f"h{i:03d}" for i in range(1, n + 1)])
            launched = time.time()
            with self.rundir() as d:
                out = d / "out.jsonl"
                self.sshfan(tasks, out, hosts, fmt="jsonl")
                records = read_jsonl(out, count, "sshfan")
            first: dict[str, float] = {}
            for r in records:
                started = float(str(r["stdout"]).split()[0]) - launched
                first[str(r["host"])] = min(first.get(str(r["host"]), started), started)
            if len(first) < n:
                raise BenchError(f"only {len(first)} of {n} hosts ran a task")
            return max(first.values())

        def logins(n: int) -> float:
            """N plain logins starting python3, PACE at once; return the wall time."""
            argv = [*self.server.ssh_argv(), "python3 -S -c pass"]
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(pace) as pool:
                for ran in pool.map(lambda _: run(argv), range(n)):
                    checked(ran, "ssh")
            return time.perf_counter() - start

        try:
            for i in range(self.rounds):
                log(f"[{row.name}] round {i + 1}/{self.rounds}")
                for n in sizes:
                    self.settle()
                    mine = once(n)
                    self.settle()
                    floor = logins(n)
                    ratios[n].append(mine / floor)
                    if n == sizes[-1]:
                        row.sshfan.append(mine)
                        row.comparison.append(floor)
        finally:
            shutil.rmtree(arrivals, ignore_errors=True)
        for n, values in ratios.items():
            if values:
                row.notes.append(
                    f"N = {n}: all running at {statistics.median(values):.2f}x the time of "
                    f"{n} plain logins (per round: {', '.join(f'{v:.2f}' for v in values)})"
                )
        return judge(row, lambda s, c: s / c, lambda r: r <= 1.2)

    def delayed(self) -> Row:
        """3,000 echo tasks through a +25 ms/way proxy against the same direct."""
        n, delay = 3000, 0.025
        row = Row(f"{n:,} tiny, +25 ms each way", "tasks/s", "same, no delay", ">= 0.85x")
        direct = self.hosts("hosts2.toml", ["h1", "h2"])
        with DelayProxy(self.server.port, delay) as proxy:
            # The host key is known under "[127.0.0.1]:PORT": list it for the proxy's port.
            known = self.server.known_hosts.read_text().replace(
                f"]:{self.server.port} ", f"]:{proxy.port} "
            )
            known_path = self.write("known_hosts_proxy", known)
            slow = self.hosts(
                "hosts2_delay.toml", ["h1", "h2"], port=proxy.port, known_hosts=str(known_path)
            )
            for i in range(self.rounds):
                log(f"[{row.name}] round {i + 1}/{self.rounds}")
                row.attempt("sshfan", lambda: n / self.sshfan_echo(n, slow))
                row.attempt("comparison", lambda: n / self.sshfan_echo(n, direct))
            ssh = self.server.ssh_argv()
            ssh = [a.replace(str(self.server.known_hosts), str(known_path)) for a in ssh]
            ssh[ssh.index("-p") + 1] = str(proxy.port)
            with contextlib.suppress(BenchError):
                rtt = checked(run([*ssh, "true"]), "ssh").wall
                plain = checked(run([*self.server.ssh_argv(), "true"]), "ssh").wall
                row.notes.append(f"`ssh true`: {plain:.3f} s direct, {rtt:.3f} s through the proxy")
            if not proxy.connections:
                row.error = row.error or "nothing connected through the delay proxy"
        return judge(row, lambda s, c: s / c, lambda r: r >= 0.85)

    def one_command(self) -> Row:
        """`uname -r` on 5 host entries of the one sshd: `sshfan all` against pdsh, with GNU
        parallel --nonall, pssh and clush timed in the same rounds (medians in the notes)."""
        row = Row("uname -r on 5 host entries", "s", "pdsh -R ssh -w h1,...,h5", "<= 1x")
        server = self.server
        hosts = self.write(
            "hosts-all.toml",
            server.hosts_toml([]) + f'\n[[hosts]]\nname = "h[1-5]"\naddress = "{server.host}"\n',
        )
        config = self.write(
            "ssh-config-all",
            f"Host {' '.join(ONE_COMMAND_HOSTS)}\n  HostName {server.host}\n  Port {server.port}\n"
            f"  User {server.user}\n  IdentityFile {server.client_key}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {server.known_hosts}\n  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n",
        )
        kernel = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
        env = {**self.env, "PDSH_SSH_ARGS": f"-F {config} %h"}

        def check(out: Path, what: str) -> None:
            """Every host answered with this machine's kernel release, named."""
            text = out.read_text()
            if text.count(kernel) != len(ONE_COMMAND_HOSTS) or not all(
                name in text for name in ONE_COMMAND_HOSTS
            ):
                raise BenchError(f"{what} printed {text[:200]!r}")

        def sshfan_once() -> float:
            """`sshfan all -H hosts uname -r`: host: line lines, checked exactly."""
            with self.rundir() as d:
                out = d / "out.txt"
                argv = [self.python, "-m", "sshfan", "all", "-H", str(hosts), "uname", "-r"]
                ran = checked(run(argv, stdout=out, cwd=d, env=self.env), "sshfan")
                self.sshfan_runs.append(ran)
                wanted = "".join(f"{name}: {kernel}\n" for name in ONE_COMMAND_HOSTS)
                if out.read_text() != wanted:
                    raise BenchError(f"sshfan printed {out.read_text()[:200]!r}")
            return ran.wall

        def tool_once(name: str, argv: list[str]) -> float:
            """One run of a broadcast tool, its output checked."""
            with self.rundir() as d:
                out = d / "out.txt"
                ran = checked(run([*argv, "uname", "-r"], stdout=out, cwd=d, env=env), name)
                check(out, name)
            return ran.wall

        tools = _one_command_tools(config)
        others: dict[str, list[float]] = {name: [] for name in tools if name != "pdsh"}
        failed: dict[str, str] = {}
        if tools["pdsh"] is None:
            row.comparison_error = "not installed"
        for i in range(max(self.rounds, 5)):  # short runs: more of them for a steady median
            log(f"[{row.name}] round {i + 1}")
            row.attempt("sshfan", sshfan_once)
            for name, argv in tools.items():
                if argv is None or name in failed:
                    continue
                if name == "pdsh":
                    row.attempt("comparison", lambda argv=argv: tool_once("pdsh", argv))
                    continue
                try:
                    others[name].append(tool_once(name, argv))
                except (BenchError, OSError) as exc:
                    failed[name] = str(exc)
        for name, argv in tools.items():
            if name == "pdsh":
                continue
            if argv is None:
                row.notes.append(f"{name}: not installed (skipped)")
            elif name in failed:
                row.notes.append(f"{name}: failed: {failed[name][:200]}")
            else:
                median = statistics.median(others[name])
                sshfan = row.median("sshfan")
                ratio = f", sshfan {sshfan / median:.2f}x of it" if sshfan else ""
                row.notes.append(
                    f"{name}: median {median:.3f} s over {len(others[name])} runs{ratio}"
                )
        row.notes.append(
            "all five host entries are one sshd on loopback; each tool logs into all at once"
        )
        return judge(row, lambda s, c: s / c, lambda r: r <= 1.0)

    def first_result(self) -> Row:
        """One host, one `echo hi`: the whole run from start, against a plain ssh."""
        row = Row("first result, 1 host", "s", "ssh host 'python3 -S -c pass'", "<= 1.15x")
        hosts = self.hosts("hosts1.toml", ["h1"])
        tasks = self.write("hi.txt", "echo hi\n")

        def once() -> float:
            """Run the single task; check its output; return the wall time."""
            with self.rundir() as d:
                out = d / "out.txt"
                ran = self.sshfan(tasks, out, hosts)
                check_text(out, b"hi\n", "sshfan")
            return ran.wall

        def ssh_once() -> float:
            """A fresh plain ssh login that starts the remote python3, as a bootstrap must."""
            return checked(run([*self.server.ssh_argv(), "python3 -S -c pass"]), "ssh").wall

        # What the head must import before it can send a login its first byte (Python,
        # asyncio, typer, sshfan, asyncssh as a run imports it), timed in the same rounds.
        imports = [self.python, "-c", "import typer, sshfan; sshfan._import_asyncssh()"]
        floor: list[float] = []
        for i in range(self.rounds):
            log(f"[{row.name}] round {i + 1}/{self.rounds}")
            row.attempt("sshfan", once)
            row.attempt("comparison", ssh_once)
            floor.append(checked(run(imports, env=self.env), "imports").wall)
        row.notes.append(
            "the comparison is a plain login starting python3 (the floor for a bootstrap)"
        )
        ssh = row.median("comparison")
        if ssh:
            head = statistics.median(floor)
            row.notes.append(
                f"the head's imports before its first byte (`{' '.join(imports[1:])}`): "
                f"median {head:.3f} s, {head / ssh:.2f}x the comparison (the target leaves "
                "0.15x for all the head adds to a login)"
            )
        return judge(row, lambda s, c: s / c, lambda r: r <= 1.15)

    def one_local_task(self) -> Row:
        """One `echo hi` on the local host: sshfan's whole start-up, against GNU parallel's."""
        limit = 0.15
        row = Row("one local task", "s", "parallel echo ::: 1", f"<= 1x and <= {limit} s")
        tasks = self.write("hi.txt", "echo hi\n")
        parallel = shutil.which("parallel")
        if parallel is None:
            row.error = "GNU parallel is not installed"
            return row

        def once() -> float:
            """Run the single task locally; check its output; return the wall time."""
            with self.rundir() as d:
                out = d / "out.txt"
                ran = self.sshfan(tasks, out, None)
                check_text(out, b"hi\n", "sshfan")
            return ran.wall

        def parallel_once() -> float:
            """GNU parallel running one local echo: its own start-up."""
            return checked(run([parallel, "echo", ":::", "1"]), "parallel").wall

        # The head's fixed parts (its event loop and its command line, as the design has
        # them), imported and nothing run, timed in the same rounds: the floor of any run.
        fixed = [self.python, "-c", "import asyncio, typer"]
        floor: list[float] = []
        for i in range(max(self.rounds, 7)):  # short runs: more of them for a steady median
            log(f"[{row.name}] round {i + 1}")
            row.attempt("sshfan", once)
            row.attempt("comparison", parallel_once)
            floor.append(checked(run(fixed, env=self.env), "imports").wall)
        base = row.median("comparison")
        if base:
            row.notes.append(
                f"sshfan's python3 importing asyncio and typer alone (`-c 'import asyncio, "
                f"typer'`): median {statistics.median(floor):.3f} s, "
                f"{statistics.median(floor) / base:.2f}x GNU parallel's run"
            )
        # What the interpreter alone costs here, with and without this machine's site-packages
        # .pth files (which GNU parallel, a Perl script, does not pay).
        floors = []
        for label, python, flags in (
            ("python3", sys.executable, []),
            ("python3", sys.executable, ["-S"]),
            ("sshfan's python3", self.python, []),
        ):
            walls = sorted(
                checked(run([python, *flags, "-c", "pass"], env=self.env), "python").wall
                for _ in range(5)
            )
            floors.append(f"`{label} {' '.join([*flags, '-c', 'pass'])}` {walls[2]:.3f} s")
        row.notes.append("the interpreter alone (median of 5): " + ", ".join(floors))
        judge(row, lambda s, c: s / c, lambda r: r <= 1.0)
        value = row.median("sshfan")
        if row.met is not None and value is not None:
            row.met = row.met and value <= limit
        return row


ONE_COMMAND_HOSTS = ["h1", "h2", "h3", "h4", "h5"]


def _one_command_tools(config: Path) -> dict[str, list[str] | None]:
    """The broadcast tools to time against `sshfan all`, each reaching the host entries
    through CONFIG (None: not installed). GNU parallel logs into all hosts at once (-j0)."""
    hosts = ONE_COMMAND_HOSTS
    pssh = shutil.which("parallel-ssh") or shutil.which("pssh")
    parallel = shutil.which("parallel")
    clush = shutil.which("clush")
    return {
        "pdsh": ["pdsh", "-R", "ssh", "-w", ",".join(hosts)] if shutil.which("pdsh") else None,
        "parallel --nonall": [parallel, "--will-cite", "--nonall", "-j0", "--tag"]
        + ["--ssh", f"ssh -F {config}", "-S", ",".join(hosts)]
        if parallel
        else None,
        "pssh": [pssh, "-i", "-x", f"-F {config}", "-H", " ".join(hosts)] if pssh else None,
        "clush": [clush, "-w", ",".join(hosts), "-o", f"-F {config}"] if clush else None,
    }


def judge(row: Row, ratio: Callable[[float, float], float], ok: Callable[[float], bool]) -> Row:
    """Fill the row's ratio and verdict from its medians."""
    s, c = row.median("sshfan"), row.median("comparison")
    if s is not None and c is not None and not row.error:
        row.ratio = ratio(s, c)
        row.met = ok(row.ratio)
    return row


SCENARIOS: dict[str, Callable[[Bench], Row]] = {
    "xargs": Bench.tiny_vs_xargs,
    "parallel": Bench.tiny_vs_parallel,
    "local": Bench.local_vs_xargs,
    "makespan": Bench.makespan,
    "lpt": Bench.makespan_learnt,
    "speculate": Bench.speculate,
    "throughput": Bench.throughput,
    "files": Bench.files,
    "rss": Bench.head_rss,
    "delay": Bench.delayed,
    "first": Bench.first_result,
    "scaling": Bench.scaling,
    "start": Bench.one_local_task,
    "all": Bench.one_command,
    # Last: 100 logins leave the machine busy for a while after they end.
    "hostsN": Bench.hosts_to_running,
    "hosts100": Bench.many_hosts,
}


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    """Render the rows as a fixed-width table with notes below."""
    head = ("scenario", "sshfan", "comparison", "median", "ratio", "target", "met")
    cells: list[tuple[str, ...]] = []
    for r in rows:
        comparison = (
            r.comparison_error if r.comparison_error else fmt(r.median("comparison"), r.unit)
        )
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        sshfan = f"ERROR: {r.error}" if r.error else fmt(r.median("sshfan"), r.unit)
        sshfan += f" {r.detail}" if r.detail and not r.error else ""
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        cells.append(
            (r.name, sshfan[:60], r.comparison_label, comparison[:60], ratio, r.target, met)
        )
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    notes = [f"- {r.name}: {n}" for r in rows for n in r.notes]
    notes += [f"- {r.name}: took {r.elapsed_s:.0f} s, load average then {r.load}" for r in rows]
    notes += [f"- {r.name}: sshfan error: {r.error}" for r in rows if r.error and len(r.error) > 60]
    return "\n".join(lines + ([""] + notes if notes else []))


def precompile() -> None:
    """Byte-compile sshfan.py once, as `pip install` does, so that no run compiles it.

    With PYTHONDONTWRITEBYTECODE set (as on the machine this was written on) every
    import of a source checkout compiles its 3,000 lines: about 27 ms of each run that
    an installed sshfan never pays. The .pyc goes to the ignored __pycache__/."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    argv = [sys.executable, "-m", "compileall", "-q", str(REPO / "sshfan.py")]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        log(f"could not byte-compile sshfan.py: {done.stderr.strip()}")
    elif os.environ.get("PYTHONDONTWRITEBYTECODE"):
        log("PYTHONDONTWRITEBYTECODE is set: sshfan.py byte-compiled once, as pip would")


def clean_python(workdir: Path, machine: bool) -> str:
    """The interpreter sshfan runs with in the bench: this one (with MACHINE), else a
    fresh venv of it that sees the same installed packages but not their .pth files.

    This interpreter's site-packages may run start-up hooks that a user's own install
    of sshfan would not have: the machine's (a sandbox's CA bundle hook here), and an
    editable install's import finder. Python runs them at every start (46 ms of the 57
    of `python3 -c pass` here, against GNU parallel's Perl, which pays none). A venv
    whose only .pth names those directories as plain paths imports the same modules,
    as a `pip install sshfan` into a venv would, without running the hooks."""
    if machine:
        return sys.executable
    import site
    import sysconfig

    venv = workdir / "python"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True
    )
    probe = [
        str(venv / "bin" / "python"),
        "-c",
        "import sysconfig; print(sysconfig.get_path('purelib'))",
    ]
    purelib = Path(subprocess.run(probe, check=True, capture_output=True, text=True).stdout.strip())
    dirs = [*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    seen = list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))
    (purelib / "sshfan-bench-deps.pth").write_text("".join(f"{d}\n" for d in seen))
    return str(venv / "bin" / "python")


@contextlib.contextmanager
def plain_login(wanted: bool) -> Iterator[tuple[Path, str] | None]:
    """With WANTED, as root: a throwaway user whose login shell is a plain /bin/sh (no
    .bashrc, no pyenv shims), for the whole bench; yields a directory for the SSH server
    that the user can read (sshd reads authorized_keys as the user) and its name, or None."""
    if not wanted:
        yield None
        return
    if os.geteuid() != 0 or not shutil.which("useradd"):
        log("--plain-login needs root and useradd: logging in as the current user")
        yield None
        return
    name = f"sshfanb{os.getpid()}"
    shared = Path(tempfile.mkdtemp(prefix="sshfan-bench-plain-"))
    shared.chmod(0o755)
    home = shared / "home"
    made = subprocess.run(
        # -p '*': no password, but not locked ('!'), which sshd refuses even for keys
        ["useradd", "-m", "-d", str(home), "-s", "/bin/sh", "-p", "*", name],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        shutil.rmtree(shared, ignore_errors=True)
        raise BenchError(f"useradd {name}: {made.stderr.strip()}")
    server_dir = shared / "sshd"
    server_dir.mkdir(mode=0o755)
    keys = server_dir / "authorized_keys"
    keys.touch()
    shutil.chown(keys, name)  # SshServer keeps the owner; sshd opens it as the user
    log(f"plain login: throwaway user {name} (/bin/sh), home {home}")
    try:
        yield server_dir, name
    finally:
        for _ in range(50):  # its last sessions may still be ending
            gone = subprocess.run(["userdel", "-r", name], capture_output=True, text=True)
            if gone.returncode == 0 or "does not exist" in gone.stderr:
                break
            time.sleep(0.2)
        else:
            log(f"could not remove the throwaway user {name}: {gone.stderr.strip()}")
        shutil.rmtree(shared, ignore_errors=True)


@contextlib.contextmanager
def bench_server(workdir: Path, plain: tuple[Path, str] | None) -> Iterator[SshServer]:
    """The bench's SSH server: in WORKDIR, or for plain_login's user in its directory."""
    server = SshServer(plain[0] if plain else workdir / "sshd")
    if plain:
        server.user = plain[1]
    with server:
        yield server


def main(argv: list[str] | None = None) -> int:
    """Command line: run the scenarios and print the table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, smaller sizes")
    parser.add_argument("--json", action="store_true", help="JSON results on stdout")
    parser.add_argument("--rounds", type=int, help="rounds per scenario (default 5, quick 3)")
    parser.add_argument(
        "--plain-login",
        action="store_true",
        help="as root: log in as a throwaway user with a plain /bin/sh login (created and "
        "removed by the bench), to measure sshfan rather than root's shell start-up",
    )
    parser.add_argument(
        "--machine-python",
        action="store_true",
        help="run sshfan with this interpreter as it is, its site-packages' .pth start-up "
        "hooks included, instead of a clean venv of it (see clean_python)",
    )
    parser.add_argument(
        "--only", action="append", choices=sorted(SCENARIOS), help="run only these (repeatable)"
    )
    args = parser.parse_args(argv)
    rounds = max(1, args.rounds or (3 if args.quick else 5))
    precompile()
    names = [name for name in SCENARIOS if not args.only or name in args.only]
    rows: list[Row] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sshfan-bench-") as tmp:
        workdir = Path(tmp)
        with (
            plain_login(args.plain_login) as plain,
            bench_server(workdir, plain) as server,
        ):
            log(f"sshd ({server.kind}) on {server.host}:{server.port}, user {server.user}")
            python = clean_python(workdir, args.machine_python)
            log(f"sshfan runs with {python}")
            bench = Bench(workdir, server, args.quick, rounds, python)
            for name in names:
                bench.settle()
                begun = time.perf_counter()
                bench.sshfan_runs.clear()
                try:
                    row = SCENARIOS[name](bench)
                except Exception as exc:  # one scenario's crash must not end the bench
                    row = Row(name, "", "", "", error=f"{type(exc).__name__}: {exc}")
                row.elapsed_s = time.perf_counter() - begun
                row.notes.append(cpu_note(name, bench.sshfan_runs))
                row.load = load_average()
                rows.append(row)
    elapsed = time.perf_counter() - started
    report = table(rows) + f"\n\n{len(rows)} scenarios, {rounds} rounds, {elapsed:.0f} s total"
    if args.json:
        print(report, file=sys.stderr)
        result = {
            "quick": args.quick,
            "rounds": rounds,
            "cpus": os.cpu_count(),
            "elapsed_s": elapsed,
            "results": [r.to_json() for r in rows],
        }
        print(json.dumps(result, indent=2))
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
