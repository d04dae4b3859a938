"""Pure units: framing, the shipped stub's source, scheduling decisions, journal and output."""

from __future__ import annotations

import array
import ast
import asyncio
import hashlib
import importlib.util
import io
import json
import marshal
import math
import os
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

import sshfan
from sshfan import (
    FRAME_MAX,
    KIND_OUTPUT,
    KIND_RESULT,
    KIND_TASKS,
    FrameDecoder,
    FrameError,
    HostWindow,
    Journal,
    MergedOutput,
    Scheduler,
    Task,
    TaskResult,
    encode_frame,
    encode_result,
    encode_tasks,
    lanes,
    local_host,
)

# -- framing -------------------------------------------------------------------


def _stream() -> tuple[bytes, list[tuple[int, bytes]]]:
    """A byte stream of assorted frames and the frames it holds."""
    frames = [
        (KIND_TASKS, encode_tasks([(1, b"echo 1"), (2, "echo é".encode()), (3, b"")])),
        (KIND_RESULT, encode_result(1, 0, 0, 0.25, b"out\n", b"")),
        (KIND_OUTPUT, b"\x00" * 9 + bytes(range(256)) * 40),
        (KIND_RESULT, b""),
        # Payloads collected piecewise: just at the size, larger, and back to back (each
        # just over the size: fed a byte at a time, more bytes only cost time).
        (KIND_OUTPUT, bytes(range(251)) * (sshfan.COLLECT_FROM // 251 + 1)),
        (KIND_OUTPUT, b"\x01" * 9 + bytes(range(7, 256)) * (sshfan.COLLECT_FROM // 249 + 2)),
        (
            KIND_TASKS,
            encode_tasks([(s, b"x" * 900) for s in range(1, sshfan.COLLECT_FROM // 900 + 3)]),
        ),
        (KIND_RESULT, encode_result(2, 1, 0, 0.5, b"", b"err\n")),
    ]
    return b"".join(encode_frame(k, p) for k, p in frames), frames


@pytest.mark.parametrize("piece", [1, 7, 4096, 32768, 100_003])
def test_decoder_reassembles_frames_split_anywhere(piece: int) -> None:
    """Frames fed in pieces of 1 byte to 100 kB come out whole and in order."""
    data, frames = _stream()
    decoder = FrameDecoder(skip_banner=False)
    got = []
    decoded = 0  # payload bytes out so far: never more than went in
    for start in range(0, len(data), piece):
        new = decoder.feed(data[start : start + piece])
        decoded += sum(len(payload) for _, payload in new)
        assert decoded + decoder.pending() <= start + piece
        got += new
    assert got == frames
    assert decoder.pending() == 0


@pytest.mark.parametrize("piece", [1, 4096, 32768])
def test_decoder_hands_large_frames_of_one_kind_out_as_their_pieces(piece: int) -> None:
    """With parts_of, a large frame of that kind comes out as pieces that join to its
    payload (the head writes them as they are); every other frame comes out whole."""
    data, frames = _stream()
    decoder = FrameDecoder(skip_banner=False, parts_of=KIND_OUTPUT)
    got, listed = [], 0
    for start in range(0, len(data), piece):
        for kind, payload in decoder.feed(data[start : start + piece]):
            if isinstance(payload, list):
                assert kind == KIND_OUTPUT and len(payload) > 1
                listed += 1
                payload = b"".join(payload)
            got.append((kind, payload))
    assert got == frames
    assert listed == 2  # the two output frames of COLLECT_FROM bytes or more


def test_decoder_skips_a_login_banner_before_the_first_frame() -> None:
    """Text printed by shell start-up files before the stub's first frame is skipped."""
    data, frames = _stream()
    banner = b"Welcome to build1!\nLast login: yesterday\n"
    stream = banner + data
    decoder = FrameDecoder()
    got = []
    for start in range(0, len(stream), 5):
        got += decoder.feed(stream[start : start + 5])
    assert got == frames
    assert decoder.banner == banner


def test_decoder_gives_up_on_endless_text_without_a_frame() -> None:
    """A stream that never holds a frame is an error, not an endless wait."""
    decoder = FrameDecoder()
    with pytest.raises(FrameError, match="no sshfan frame"):
        for _ in range(100):
            decoder.feed(b"x" * 4096)


def test_decoder_rejects_corrupt_frame_after_sync() -> None:
    """Bytes that are not a frame, once in sync, are a protocol error."""
    decoder = FrameDecoder()
    decoder.feed(encode_frame(KIND_RESULT, b"ok"))
    with pytest.raises(FrameError, match="bad magic"):
        decoder.feed(b"garbage!garbage!")


def test_decoder_rejects_oversized_frame_before_reading_it() -> None:
    """A header announcing more than the cap fails at once (no waiting for gigabytes)."""
    header = sshfan.FRAME_HEADER.pack(sshfan.FRAME_MAGIC, KIND_RESULT, FRAME_MAX + 1)
    with pytest.raises(FrameError, match="exceeds"):
        FrameDecoder().feed(header)
    with pytest.raises(FrameError, match="exceeds"):
        encode_frame(KIND_RESULT, b"\x00" * (FRAME_MAX + 1))


def test_result_and_tasks_round_trip() -> None:
    """Task batches and results decode to what was encoded, binary included."""
    tasks = [(7, b"printf '\\377'", b""), (2**40, "ünï".encode(), b"stdin\x00data")]
    assert sshfan.decode_tasks(encode_tasks(tasks)) == tasks
    assert sshfan.decode_tasks(encode_tasks([(1, b"true")])) == [(1, b"true", b"")]
    payload = encode_result(5, -9, sshfan.FLAG_TIMED_OUT, 1.5, b"\xff\xfe", b"err", slot=12)
    expected = (5, -9, sshfan.FLAG_TIMED_OUT, 1.5, b"\xff\xfe", b"err", 12)
    assert sshfan.decode_result(payload) == expected
    with pytest.raises(FrameError):
        sshfan.decode_result(payload + b"x")


# -- the shipped stub ----------------------------------------------------------


def test_stub_source_uses_only_stdlib_and_its_own_names() -> None:
    """The shipped source parses as Python 3.6 and names nothing outside stdlib and itself."""
    source = sshfan.stub_source()
    tree = ast.parse(source, feature_version=(3, 6))
    imported: set[str] = set()
    defined: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
            defined.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
            defined.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            defined.add(node.name)
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    builtins = set(dir(__builtins__ if isinstance(__builtins__, dict) else __builtins__))
    builtins |= set(__builtins__) if isinstance(__builtins__, dict) else set()
    unknown = used - defined - builtins - {"__name__"}
    assert not unknown, f"the stub uses names it does not ship: {sorted(unknown)}"


def test_stub_imports_only_its_listed_modules() -> None:
    """The stub imports what _SHIPPED_IMPORTS lists and nothing more (typing, for one, would
    cost every stub's start a few milliseconds for annotations alone)."""
    tree = ast.parse(sshfan.stub_source())
    nodes = list(ast.walk(tree))
    imported = {node.module for node in nodes if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in nodes if isinstance(node, ast.Import) for a in node.names}
    # subprocess only where os.posix_spawn cannot serve (start_process): Python < 3.8
    late = {
        a.name
        for f in tree.body
        if isinstance(f, ast.FunctionDef)
        for node in ast.walk(f)
        if isinstance(node, ast.Import)
        for a in node.names
    }
    assert late == {"subprocess"}
    imported -= late
    header = ast.parse(sshfan._SHIPPED_IMPORTS)
    listed = {
        a.name for node in ast.walk(header) if isinstance(node, ast.Import) for a in node.names
    }
    assert imported == listed
    assert not imported & {"json", "re", "enum", "subprocess", "contextlib", "typing"}


def test_shipped_region_is_one_marked_block_holding_the_stub() -> None:
    """The stub is the text between one BEGIN SHIPPED and one END SHIPPED line of sshfan.py,
    and everything the stub and the head share on the wire is defined inside it."""
    lines = Path(sshfan.__file__).read_text(encoding="utf-8").splitlines()
    begins = [n for n, line in enumerate(lines, 1) if line.startswith("# >>>>>>>> BEGIN SHIPPED")]
    ends = [n for n, line in enumerate(lines, 1) if line.startswith("# <<<<<<<< END SHIPPED")]
    assert len(begins) == 1 and len(ends) == 1 and begins[0] < ends[0]
    source = sshfan.stub_source()
    assert "\n".join(lines[begins[0] : ends[0] - 1]) in source
    for name in ("FrameDecoder", "encode_frame", "decode_result", "Stub", "stub_main"):
        first = [n for n, line in enumerate(lines, 1) if re.match(rf"(class|def) {name}\b", line)]
        assert len(first) == 1 and begins[0] < first[0] < ends[0], name
    tree = ast.parse(source)
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert {"FrameDecoder", "Stub", "stub_main", "start_warden"} <= defined


def test_stub_source_runs_without_the_head_module(tmp_path: Path) -> None:
    """The shipped source compiles and defines its entry point in a bare interpreter."""
    script = tmp_path / "stub.py"
    script.write_text(sshfan.stub_source().replace("if __name__ == '__main__':", "if False:"))
    check = f"import runpy; g = runpy.run_path({str(script)!r}); assert callable(g['stub_main'])"
    result = subprocess.run([sys.executable, "-I", "-S", "-c", check], capture_output=True)
    assert result.returncode == 0, result.stderr.decode()


def test_bootstrap_line_is_small_and_fixed() -> None:
    """The remote command is a short fixed program, the same for every stub."""
    code = sshfan.bootstrap_code()
    assert len(code) < 400 and code.endswith("exec(k or compile(s,'sshfan-stub','exec'))")
    compile(code, "bootstrap", "exec")


@pytest.mark.parametrize("worker", ["same", "other version", "no zlib"])
def test_stub_payload_runs_compiled_or_from_source(worker: str) -> None:
    """A Python with the head's bytecode magic runs the shipped compiled code; any other,
    or one without zlib, compiles the shipped source: either way the stub says hello. The
    half that must go unused is spoilt, so that the stub could not start from it."""
    payload = bytearray(sshfan.stub_payload())
    magic, n_source, n_code = sshfan.STUB_HEADER.unpack_from(payload)
    head = sshfan.STUB_HEADER.size
    assert magic == importlib.util.MAGIC_NUMBER
    assert len(payload) == head + n_source + n_code
    assert bytes(payload[head : head + n_source]) == sshfan.stub_source().encode()
    assert _loads(bytes(payload[head + n_source :])) is not None
    code = sshfan.bootstrap_code()
    if worker == "same":
        payload[head : head + n_source] = b"#" * n_source
    else:
        payload[-n_code:] = b"\0" * n_code
    if worker == "other version":
        payload[:4] = b"\0\0\0\0"
    elif worker == "no zlib":
        code = "import sys\nsys.modules['zlib'] = None\n" + code
    argv = [sys.executable, "-I", "-S", "-c", code]
    done = subprocess.run(argv, input=bytes(payload), capture_output=True, timeout=60)
    frames = sshfan.FrameDecoder().feed(done.stdout)
    assert frames and frames[0][0] == sshfan.KIND_HELLO, (done.stdout, done.stderr)


def _loads(code: bytes) -> object:
    """The code object in a compiled stub (zlib, then marshal)."""
    return marshal.loads(zlib.decompress(code))


def test_compiled_stub_is_cached_and_a_bad_cache_file_is_compiled_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head compiles the stub once and keeps it in its cache; a torn cache file is
    compiled again and replaced, and a cache that cannot be written is done without."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = sshfan.stub_source().encode()
    magic = importlib.util.MAGIC_NUMBER
    fresh = _loads(sshfan._compiled_stub(source, magic))
    assert fresh == compile(source, "sshfan-stub", "exec", dont_inherit=True)
    (cached,) = (tmp_path / "sshfan").iterdir()
    assert _loads(cached.read_bytes()[32:]) == fresh
    good = cached.read_bytes()
    for spoilt in (good[:100], good[:-1] + bytes([good[-1] ^ 1])):  # torn; one bit off
        cached.write_bytes(spoilt)
        assert _loads(sshfan._compiled_stub(source, magic)) == fresh
        assert cached.read_bytes() == good
    # Workers run it: a file others may write is not taken (here: planted code).
    planted = zlib.compress(marshal.dumps(compile("raise SystemExit(3)", "x", "exec")))
    cached.write_bytes(hashlib.sha256(planted).digest() + planted)
    cached.chmod(0o666)
    assert _loads(sshfan._compiled_stub(source, magic)) == fresh
    assert cached.read_bytes() == good and cached.stat().st_mode & 0o777 == 0o600
    assert _loads(sshfan._compiled_stub(source + b"\n", magic)) == fresh
    assert len(list((tmp_path / "sshfan").iterdir())) == 2  # keyed by the source
    (tmp_path / "blocked").write_text("a file where the cache directory would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "blocked"))
    assert _loads(sshfan._compiled_stub(source, magic)) == fresh


def test_no_home_means_no_cache_rather_than_a_directory_named_tilde(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without HOME and a passwd entry (expanduser leaves "~"), nothing is cached and
    no history kept, instead of writing under ./~; a relative XDG_CACHE_HOME is ignored."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    home = Path("~").expanduser()
    assert sshfan.cache_dir() == home / ".cache" / "sshfan"
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)
    assert sshfan.cache_dir() is None and sshfan.DurationHistory.default_path() is None
    source = sshfan.stub_source().encode()
    assert _loads(sshfan._compiled_stub(source, importlib.util.MAGIC_NUMBER)) is not None
    assert list(tmp_path.iterdir()) == []


# -- scheduling decisions ------------------------------------------------------


def _tasks(n: int) -> list[Task]:
    """N fresh tasks numbered from 1."""
    return [Task(seq, f"echo {seq}") for seq in range(1, n + 1)]


def test_scheduler_hands_out_in_order_and_requeued_first() -> None:
    """Fresh tasks go out in seq order; tasks from a lost host jump the queue."""
    scheduler = Scheduler(iter(_tasks(10)))
    first = scheduler.take("a", 3)
    assert [t.seq for t in first] == [1, 2, 3]
    assert [t.seq for t in scheduler.take("b", 2)] == [4, 5]
    scheduler.put_back(first)
    again = scheduler.take("b", 4)
    assert [t.seq for t in again] == [1, 2, 3, 6]
    assert all(t.attempts == 1 for t in again)  # a lost host's run is not a failed try


def test_scheduler_retry_avoids_the_failed_host_when_it_can() -> None:
    """A retried task goes to another live host, but not to nowhere."""
    scheduler = Scheduler(iter(_tasks(1)), retries=2)
    (task,) = scheduler.take("a", 1)
    assert scheduler.should_retry(task, "a")
    assert scheduler.take("a", 1, others_alive=True) == []
    assert [t.seq for t in scheduler.take("a", 1, others_alive=False)] == [1]
    assert task.attempts == 2
    assert scheduler.should_retry(task, "a")
    assert [t.attempts for t in scheduler.take("b", 1, others_alive=True)] == [3]
    assert not scheduler.should_retry(task, "b")  # 1 run + 2 retries used up
    assert not scheduler.has_work()


def test_a_local_host_spreads_its_slots_over_a_few_stubs() -> None:
    """Up to LOCAL_LANES stubs share a local host's slots; an SSH host keeps one stub."""
    assert [lane.slots for lane in lanes(local_host(1))] == [1]
    assert [lane.slots for lane in lanes(local_host(5))] == [2, 1, 1, 1]
    assert [lane.slots for lane in lanes(local_host(10))] == [3, 3, 2, 2]
    assert {lane.name for lane in lanes(local_host(10))} == {"local"}
    assert sum(lane.slots for lane in lanes(local_host())) == len(os.sched_getaffinity(0))
    remote = sshfan.HostSpec(name="far", slots=8)
    assert lanes(remote) == [remote]


def test_a_run_that_needs_parallels_start_order_gets_one_stub_per_host() -> None:
    """With --halt or {%} a local host's slots stay in one stub, which starts tasks in
    file order at the lowest free slot, as parallel does; other runs spread them."""
    assert [lane.slots for lane in lanes(local_host(10), in_order=True)] == [10]
    assert sshfan.numbers_slots(sshfan.RunOptions("t", [], "-", command="echo {#}:{%}"))
    assert sshfan.numbers_slots(sshfan.RunOptions("t", [], "-", tagstring="s{%}"))
    assert not sshfan.numbers_slots(sshfan.RunOptions("t", [], "-", command="echo {} % {#}"))
    assert not sshfan.numbers_slots(sshfan.RunOptions("t", [], "-", tagstring="{host}"))


def test_a_retry_under_halt_queues_nothing_behind_a_running_task() -> None:
    """--halt with --retries: a host holds no task beyond its slots, so a retry (first in
    the scheduler's queue) starts before the tasks after it, as in parallel."""
    assert sshfan.max_ahead(sshfan.RunOptions("t", [], "-", retries=1, halt_on_error=True)) == 0
    assert sshfan.max_ahead(sshfan.RunOptions("t", [], "-", retries=1)) > 0
    window = HostWindow(slots=2)
    window.max_ahead = 0
    assert window.want() == 2
    window.in_flight = 2
    assert window.want() == 0
    window.observe(0.001)
    window.in_flight = 1
    assert window.ahead() == 0 and window.want() == 1


def test_slots_relative_to_the_cpus_as_parallels_j() -> None:
    """-j +N, -N, N% as GNU parallel reads them (percentages rounded up), at least 1;
    anything else is refused, never read as another number."""
    assert sshfan._parse_jobs("4") == (4, None)
    assert sshfan._parse_jobs("+1") == (None, "+1")
    assert [sshfan.slots_for_cpus(rule, 8) for rule in ("+1", "-3", "50%", "10%", "-9")] == [
        9,
        5,
        4,
        1,
        1,
    ]
    assert sshfan.slots_for_cpus("150%", 2) == 3
    for bad in ("x", "+", "1.5", "%", "++1", ""):
        with pytest.raises(sshfan.UsageError):
            sshfan._parse_jobs(bad)
    with pytest.raises(sshfan.UsageError):
        sshfan.RunOptions("t", [], "-", cpu_slots="1")
    hosts = sshfan.run_hosts(
        [local_host(), sshfan.HostSpec(name="far")], sshfan.RunOptions("t", [], "-", cpu_slots="+1")
    )
    assert hosts[0].slots == len(os.sched_getaffinity(0)) + 1
    assert (hosts[1].slots, hosts[1].cpu_slots) == (None, "+1")  # from its stub's hello


def test_scheduler_reads_the_source_lazily() -> None:
    """Taking tasks pulls no more from the source than asked (bounded memory)."""
    pulled = []

    def source():
        """Record each task as it is drawn."""
        for task in _tasks(1000):
            pulled.append(task.seq)
            yield task

    scheduler = Scheduler(source())
    scheduler.take("a", 5)
    assert pulled == [1, 2, 3, 4, 5]


def test_window_covers_the_round_trip_for_tiny_tasks_and_stays_shallow_for_long() -> None:
    """Tiny tasks get a deep queue ahead of the slots; long tasks only one or so."""
    window = HostWindow(slots=2, rtt=0.050)
    assert window.want() == 4  # before any measurement: slots + slots
    for _ in range(20):
        window.observe(0.001)
    assert window.ahead() >= 2 * 0.050 / 0.001
    long = HostWindow(slots=2, rtt=0.001)
    for _ in range(20):
        long.observe(5.0)
    assert long.ahead() == 1
    long.in_flight = 3
    assert long.want() == 0


def test_a_new_host_queues_a_quarter_of_its_share_before_durations_are_known() -> None:
    """Many tasks: a deep first batch (capped); few long ones: no more than its slots."""
    assert sshfan.start_ahead(left=3000, slots=1, all_slots=2) == HostWindow.START_MAX
    assert sshfan.start_ahead(left=126, slots=2, all_slots=8) == 7
    assert sshfan.start_ahead(left=20, slots=1, all_slots=10) == 1
    assert sshfan.start_ahead(left=0, slots=4, all_slots=4) == 4
    window = HostWindow(slots=1)
    window.start_ahead = 10
    assert window.want() == 11
    window.observe(5.0)  # long tasks: the measured window takes over
    assert window.ahead() == 1


def test_queued_tasks_are_taken_back_only_when_their_wait_outlasts_a_round_trip() -> None:
    """Rebalancing costs a round trip: worth it for long tasks queued behind a running one,
    not for a few tiny ones (over a slow link that would hand them back and forth)."""

    async def decide(mean_task: float, queued: int, rtt: float, silent: float = 0.0) -> bool:
        """Whether a 1-slot host with QUEUED tasks beyond its slot would be asked for them,
        SILENT seconds after its last result."""
        session = sshfan.HostSession(sshfan.HostSpec(name="h1"), None)
        session.window.rtt = rtt
        session.window.observe(mean_task)
        for seq in range(1 + queued):
            session.in_flight[seq] = Task(seq, "true")
        return session.worth_dropping(session.progress_at + silent)

    assert asyncio.run(decide(mean_task=1.5, queued=1, rtt=0.001))
    assert not asyncio.run(decide(mean_task=0.001, queued=12, rtt=0.050))
    assert asyncio.run(decide(mean_task=0.001, queued=500, rtt=0.050))
    assert not asyncio.run(decide(mean_task=1.5, queued=0, rtt=0.001))
    # Short tasks so far, but no result for a second: a long one holds the queue.
    assert not asyncio.run(decide(mean_task=0.001, queued=3, rtt=0.001, silent=0.01))
    assert asyncio.run(decide(mean_task=0.001, queued=3, rtt=0.001, silent=1.0))


def test_hosts_start_a_few_at_a_time_per_server_and_others_do_not_wait() -> None:
    """At most CONNECT_PACE hosts of one SSH server start at once; another server's
    hosts start beside them; a place is freed when a start ends."""

    async def scenario() -> tuple[int, int, int]:
        """Start 12 entries for one server and 2 for another; count who got in."""
        pacing = sshfan.Pacing()
        release = asyncio.Event()
        inside: dict[str, int] = {"a": 0, "b": 0}

        async def start(spec: sshfan.HostSpec, server: str) -> None:
            """Hold a place until released."""
            async with pacing.start(spec):
                inside[server] += 1
                await release.wait()

        same = [sshfan.HostSpec(name=f"a{i}", address="10.0.0.1", port=22) for i in range(12)]
        other = [sshfan.HostSpec(name=f"b{i}", address="10.0.0.2") for i in range(2)]
        tasks = [asyncio.ensure_future(start(spec, "a")) for spec in same]
        tasks += [asyncio.ensure_future(start(spec, "b")) for spec in other]
        for _ in range(5):
            await asyncio.sleep(0)
        first = (inside["a"], inside["b"])
        release.set()
        await asyncio.gather(*tasks)
        return first[0], first[1], inside["a"]

    at_once, other_server, in_the_end = asyncio.run(scenario())
    assert at_once == sshfan.CONNECT_PACE
    assert other_server == 2
    assert in_the_end == 12


# -- journal and merged output -------------------------------------------------


def _result(seq: int, out: bytes, err: bytes = b"", code: int = 0) -> TaskResult:
    """A finished task for journal tests."""
    return TaskResult(seq, f"task {seq}", "h1", code, None, False, 0.1, 1, out, err)


def test_merged_output_is_in_seq_order_whatever_the_finish_order(tmp_path: Path) -> None:
    """Results arriving out of order are rendered in seq order, blanks skipped."""
    journal = Journal.create(tmp_path / "j", {"version": 1})
    out = io.BytesIO()
    merged = MergedOutput(out, "text", journal)
    order = [3, 1, 5, 4]
    merged.skip(2)
    for seq in order:
        offset = journal.add_result(_result(seq, f"{seq}\n".encode()))
        journal.flush()
        merged.put(seq, offset, _result(seq, f"{seq}\n".encode()))
        if seq == 3:
            assert out.getvalue() == b""  # 1 is not done yet
    assert out.getvalue() == b"1\n3\n4\n5\n"
    assert merged.waiting() == 0


def _big_result(journal: Journal, seq: int, fill: bytes, size: int, tail: bytes) -> TaskResult:
    """A finished task whose stdout went to the journal in output pieces, then TAIL."""
    pieces = []
    for start in range(0, size, sshfan.OUTPUT_PIECE):
        chunk = fill * min(sshfan.OUTPUT_PIECE, size - start)
        offset = journal.append(KIND_OUTPUT, sshfan.OUTPUT_HEAD.pack(seq, 1) + chunk)
        pieces.append((offset + sshfan.FRAME_HEADER.size + sshfan.OUTPUT_HEAD.size, 1, len(chunk)))
    result = _result(seq, tail)
    result.pieces = pieces
    return result


def test_large_outputs_are_copied_by_a_thread_and_stay_in_seq_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the copier, a large output is copied off the event loop's thread; what
    follows it in seq order waits behind it, and finish() leaves the file complete."""
    threads: dict[int, str] = {}
    render = sshfan.render_result

    def recording_render(out, fmt, result, journal, tag=False) -> None:
        """Note which thread rendered each seq."""
        threads[result.seq] = sshfan.threading.current_thread().name
        render(out, fmt, result, journal, tag)

    monkeypatch.setattr(sshfan, "render_result", recording_render)
    journal = Journal.create(tmp_path / "j", {"version": 1})
    results = {
        1: _result(1, b"one\n"),
        2: _big_result(journal, 2, b"b", 3 * 1024 * 1024, b"B-tail\n"),
        3: _result(3, b"three\n"),
        4: _big_result(journal, 4, b"d", sshfan.COPY_IN_THREAD, b""),
        5: _result(5, b"five\n"),
    }
    journal.flush()
    with open(tmp_path / "out", "wb") as out:
        merged = MergedOutput(out, "text", journal, copier=True)
        for seq in (3, 1, 5, 2, 4):
            offset = journal.add_result(results[seq])
            journal.flush()  # as the run does: records are written before they are rendered
            merged.put(seq, offset, results[seq])
        merged.finish()
    expected = b"one\n" + b"b" * 3 * 1024 * 1024 + b"B-tail\n" + b"three\n"
    expected += b"d" * sshfan.COPY_IN_THREAD + b"five\n"
    assert (tmp_path / "out").read_bytes() == expected
    assert threads[1] == sshfan.threading.current_thread().name
    assert threads[2].startswith("sshfan-output")
    journal.close()


def test_a_write_error_on_the_copier_thread_reaches_the_run(tmp_path: Path) -> None:
    """A copy that fails on the thread raises its OSError in the caller, not silently."""
    journal = Journal.create(tmp_path / "j", {"version": 1})
    big = _big_result(journal, 1, b"x", sshfan.COPY_IN_THREAD, b"")
    journal.flush()
    (tmp_path / "out").write_bytes(b"")
    with open(tmp_path / "out", "rb") as read_only:  # every write to it fails
        merged = MergedOutput(read_only, "text", journal, copier=True)
        offset = journal.add_result(big)
        journal.flush()
        with pytest.raises(OSError):
            merged.put(1, offset, big)
            merged.finish()
    journal.close()


def test_journal_reopen_finds_done_tasks_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    """A journal cut mid-record (the head killed) reopens with every whole record; the torn
    one is cut before the first new record, not before (a run may yet write nothing)."""
    path = tmp_path / "j"
    journal = Journal.create(path, {"version": 1, "tasks_sha256": "x"})
    offsets = [journal.add_result(_result(seq, b"x" * seq)) for seq in (2, 1, 4)]
    journal.close()
    whole = path.stat().st_size
    with open(path, "ab") as handle:
        handle.write(encode_frame(sshfan.KIND_DONE, b"\x00" * 50)[:30])
    torn = path.read_bytes()
    reopened, header, done = Journal.reopen(path)
    assert header["tasks_sha256"] == "x"
    assert [done[s] for s in (1, 2, 4)] == [offsets[1], offsets[0], offsets[2]]
    assert done[3] == -1
    assert reopened.load_result(offsets[2]).stdout == b"xxxx"
    assert path.read_bytes() == torn
    at = reopened.add_result(_result(3, b"yyy"))
    reopened.close()
    assert at == whole and path.stat().st_size > whole
    again, _header, done = Journal.open_read(path)
    assert again.load_result(done[3]).stdout == b"yyy"
    again.close()


def test_a_new_journal_replaces_the_old_one_only_at_its_first_record(tmp_path: Path) -> None:
    """Journal.create keeps an earlier journal (same inode, same bytes) until the new run
    records a result; a run that records nothing leaves it as it was."""
    path = tmp_path / "j"
    old = Journal.create(path, {"version": 1, "run": "old"})
    old.add_result(_result(1, b"old"))
    old.close()
    before, inode = path.read_bytes(), path.stat().st_ino
    idle = Journal.create(path, {"version": 1, "run": "idle"})
    idle.flush()
    idle.close()
    assert path.read_bytes() == before and path.stat().st_ino == inode
    assert not (tmp_path / "j.new").exists()
    new = Journal.create(path, {"version": 1, "run": "new"})
    assert path.read_bytes() == before
    new.add_result(_result(1, b"new"))
    new.flush()
    _journal, header, done = Journal.open_read(path)
    assert header["run"] == "new" and _journal.load_result(done[1]).stdout == b"new"
    _journal.close()
    new.close()


def test_a_new_journal_behind_a_symlink_replaces_the_target(tmp_path: Path) -> None:
    """A journal path that is a symlink stays one: the new journal goes to its target."""
    target = tmp_path / "elsewhere.journal"
    link = tmp_path / "j"
    link.symlink_to(target)
    journal = Journal.create(link, {"version": 1})
    journal.add_result(_result(1, b"one"))
    journal.close()
    assert link.is_symlink() and target.is_file()
    _journal, _header, done = Journal.open_read(link)
    assert _journal.load_result(done[1]).stdout == b"one"
    _journal.close()


def test_a_failed_journal_write_is_named_and_leaves_whole_records(tmp_path: Path) -> None:
    """A write that fails (here: the file size limit) is raised naming the journal, every
    later flush raises it too, and the file ends with a whole record (--resume can go on)."""
    path = tmp_path / "j"
    journal = Journal.create(path, {"version": 1})
    journal.add_result(_result(1, b"a" * 100))
    journal.flush()
    good = journal.size
    journal.add_result(_result(2, b"b" * 100))
    os.close(journal._fd)  # the next write meets EBADF, as a full disk meets ENOSPC
    journal._fd = os.open(path, os.O_RDONLY)
    with pytest.raises(OSError) as caught:
        journal.flush()
    assert caught.value.filename == str(path)
    journal.add_result(_result(3, b"c"))
    with pytest.raises(OSError):
        journal.flush()
    with pytest.raises(OSError):
        journal.close()
    assert path.stat().st_size == good
    _journal, _header, done = Journal.open_read(path)
    assert [seq for seq, at in enumerate(done) if at >= 0] == [1]
    _journal.close()


def test_jsonl_streams_large_and_binary_output_from_journal_pieces(tmp_path: Path) -> None:
    """Output that came in pieces renders as one JSON string, or base64 if not UTF-8."""
    journal = Journal.create(tmp_path / "j", {"version": 1})
    text = "é" * 300_001  # pieces will split the two-byte characters
    data = text.encode()
    pieces = []
    for start in range(0, len(data) - 10, 65_537):
        chunk = data[start : min(start + 65_537, len(data) - 10)]
        offset = journal.append(KIND_OUTPUT, sshfan.OUTPUT_HEAD.pack(1, 1) + chunk)
        pieces.append((offset + sshfan.FRAME_HEADER.size + sshfan.OUTPUT_HEAD.size, 1, len(chunk)))
    tail = data[len(data) - 10 :]
    binary = bytes(range(256)) * 3 + b"\xff"
    offset = journal.append(KIND_OUTPUT, sshfan.OUTPUT_HEAD.pack(1, 2) + binary)
    pieces.append((offset + 9 + 9, 2, len(binary)))
    journal.flush()
    result = _result(1, tail, b"\x00end")
    result.pieces = pieces
    out = io.BytesIO()
    sshfan.render_result(out, "jsonl", result, journal)
    record = json.loads(out.getvalue())
    assert record["stdout"] == text
    assert sshfan.base64.b64decode(record["stderr_b64"]) == binary + b"\x00end"
    text_out = io.BytesIO()
    sshfan.render_result(text_out, "text", result, journal)
    assert text_out.getvalue() == data


def test_read_tasks_numbers_lines_and_skips_blanks_and_done(tmp_path: Path) -> None:
    """seq is the line number; blank lines and journaled tasks are not handed out."""
    path = tmp_path / "tasks"
    path.write_bytes(b"echo a\n\n   \necho b\r\necho c\necho d")
    done = array.array("q", [-1] * 6)
    done[5] = 123
    journal = Journal.create(tmp_path / "j", {"version": 1})
    merged = MergedOutput(io.BytesIO(), "text", journal)
    tasks = list(sshfan.read_tasks(path, merged, done))
    assert [(t.seq, t.command) for t in tasks] == [(1, "echo a"), (4, "echo b"), (6, "echo d")]
    assert sshfan.scan_tasks(path)[0] == 4


def test_journal_flushes_more_records_than_writev_takes_at_once(tmp_path: Path) -> None:
    """A flush of thousands of queued records (past IOV_MAX buffers) writes them all."""
    journal = Journal.create(tmp_path / "j", {"version": 1})
    offsets = [journal.append(KIND_OUTPUT, bytes([n % 256]) * 10) for n in range(3000)]
    journal.flush()
    assert journal.read(offsets[2999] + sshfan.FRAME_HEADER.size, 10) == bytes([2999 % 256]) * 10
    journal.close()
    assert (tmp_path / "j").stat().st_size == journal.size


# -- packaging -----------------------------------------------------------------


def test_inline_script_metadata_matches_pyproject() -> None:
    """sshfan.py's PEP 723 block (for `pipx run`/`uv run`) declares pyproject's deps."""
    import re

    tomllib = sshfan._toml()
    source = Path(sshfan.__file__).read_text(encoding="utf-8")
    # The reference regex of PEP 723: a `# /// script` line, `#` lines, a `# ///` line.
    pattern = r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$"
    blocks = [m for m in re.finditer(pattern, source) if m.group("type") == "script"]
    assert len(blocks) == 1, "one `# /// script` block"
    assert source.startswith("# /// script\n"), "the block opens the file"
    content = "".join(
        line[2:] if line.startswith("# ") else line[1:]
        for line in blocks[0].group("content").splitlines(keepends=True)
    )
    script = tomllib.loads(content)
    project = tomllib.loads(
        (Path(sshfan.__file__).parent / "pyproject.toml").read_text(encoding="utf-8")
    )["project"]
    assert script["requires-python"] == project["requires-python"]
    assert script["dependencies"] == project["dependencies"]


def _readme_blocks(language: str) -> list[str]:
    """The README's fenced code blocks of LANGUAGE, in order."""
    readme = (Path(sshfan.__file__).parent / "README.md").read_text(encoding="utf-8")
    return re.findall(rf"(?ms)^```{language}\n(.*?)^```$", readme)


def test_readme_test_command_is_what_ci_runs() -> None:
    """The README's second command installs the test extra and runs pytest as .ci/run does."""
    readme_steps = _readme_blocks("sh")[1].strip().split(" && ")
    ci_lines = (Path(sshfan.__file__).parent / ".ci" / "run").read_text().splitlines()
    ci_steps = [line for line in ci_lines if line and not line.startswith(("#", " "))]
    assert "install -e '.[test]'" in readme_steps[1]
    assert any("install" in step and "-e '.[test]'" in step for step in ci_steps)
    # Same pytest arguments; only the interpreter (a venv's, CI's python3) differs.
    assert readme_steps[-1].split(" -m ", 1)[1] == ci_steps[-1].split(" -m ", 1)[1]
    assert ci_steps[-1].split(" -m ", 1)[1] == "pytest -q -n 2"


def test_readme_hosts_file_example_loads_as_it_says(tmp_path: Path) -> None:
    """The README's hosts file example is valid: build1, and web01..04 at .11 to .14."""
    path = tmp_path / "hosts.toml"
    path.write_text(_readme_blocks("toml")[0])
    hosts = sshfan.load_hosts(path)
    assert [h.name for h in hosts] == ["build1", "web01", "web02", "web03", "web04"]
    assert [h.address for h in hosts[1:]] == [f"10.0.1.{n}" for n in range(11, 15)]
    assert {h.user for h in hosts} == {"ci"}
    assert hosts[0].slots == 4 and hosts[1].slots is None  # "auto": the CPU count


# -- the Python API --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout": -1.0}, "--timeout: must be 0 or more seconds, not -1"),
        ({"timeout": float("nan")}, "--timeout: must be 0 or more seconds"),
        ({"slots": 0}, "--slots: must be at least 1, not 0"),
        ({"retries": -3}, "--retries: must be 0 or more, not -3"),
    ],
)
def test_python_api_refuses_what_the_cli_refuses(kwargs: dict, message: str) -> None:
    """run_tasks validates its options as the CLI does (RunOptions does it for both)."""
    with pytest.raises(sshfan.UsageError) as raised:
        list(sshfan.run_tasks(["echo x"], **kwargs))
    assert str(raised.value).startswith(message)


def test_python_api_slow_consumer_does_not_stop_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for one result in hand, a consumer that holds off still lets every task run;
    it then gets every result, and leaving early ends the run."""
    monkeypatch.setattr(sshfan, "_API_HANDOFF", 1)
    commands = [f"echo {n}; touch {tmp_path}/ran.{n}" for n in range(12)]
    results = sshfan.run_tasks(commands, slots=4)
    first = next(results)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ran.*"))) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(tmp_path.glob("ran.*"))) == 12  # every task ran while none was taken
    rest = list(results)
    assert sorted(r.seq for r in [first, *rest]) == list(range(1, 13))
    assert all(r.stdout == f"{r.seq - 1}\n".encode() for r in [first, *rest])
    early = sshfan.run_tasks(["echo a", "echo b", "echo c"], slots=1)
    assert next(early).ok
    early.close()  # returns: the run is stopped, not left waiting for room


def test_readme_documents_exactly_the_public_api() -> None:
    """Every name in sshfan.__all__ exists and the README's Python API section names it."""
    readme = (Path(sshfan.__file__).parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    for name in sshfan.__all__:
        assert hasattr(sshfan, name), name
        assert f"`{name}" in section, name


def test_a_halt_exits_0_only_when_every_task_ran_and_passed() -> None:
    """Exit 0 means complete: a halt on success that left tasks unrun is exit 1."""
    unrun = sshfan.RunSummary(total=3, ok=1, halted=True, halt="soon,success=1")
    assert unrun.exit_code == 1
    every = sshfan.RunSummary(total=3, ok=3, halted=True, halt="soon,success=3")
    assert every.exit_code == 0
    failed = sshfan.RunSummary(total=3, ok=2, failed=1, halted=True, halt="soon,done=3")
    assert failed.exit_code == 1


def test_module_contents_list_matches_the_numbered_banners() -> None:
    """The module docstring's contents list is the banners' numbers and titles, in order."""
    text = Path(sshfan.__file__).read_text(encoding="utf-8")
    banners = re.findall(r"(?m)^# =+\n# (\d+)\. (.*)\n# =+$", text)
    assert len(banners) == len(re.findall(r"(?m)^# =+\n# .*\n# =+$", text))  # all numbered
    listed = re.findall(r"(?m)^ +(\d+)\. (.*)$", sshfan.__doc__ or "")
    assert banners and listed == banners
    assert [int(n) for n, _ in banners] == list(range(1, len(banners) + 1))


def test_the_summary_counts_results_and_keeps_the_first_failures() -> None:
    """RunSummary.count: outcomes, per-host durations and failures; of the failures, the
    first FAILURES_SHOWN in seq order are kept, whatever order they came in."""
    summary = sshfan.RunSummary(total=10)

    def result(
        seq: int, host: str, exit_code: int = 0, timed_out: bool = False
    ) -> sshfan.TaskResult:
        """A TaskResult of SEQ on HOST."""
        return sshfan.TaskResult(seq, "x", host, exit_code, None, timed_out, 0.5, 1)

    for seq in (9, 8, 7, 6, 5, 4):
        summary.count(result(seq, "a", exit_code=1))
    summary.count(result(1, "b", timed_out=True))
    summary.count(result(2, "b"))
    assert (summary.ok, summary.failed, summary.timed_out, summary.journaled) == (1, 6, 1, 8)
    assert summary.failed_per_host == {"a": 6, "b": 1}
    assert (summary.per_host["a"].count, summary.per_host["b"].count) == (6, 2)
    assert sorted(r.seq for r in summary.failures) == [1, 4, 5, 6, 7][: sshfan.FAILURES_SHOWN]
    assert summary.exit_code == 3  # not complete yet
    summary.complete = True
    assert summary.exit_code == 1


def test_the_summary_records_hosts_lost_skipped_and_stubs_lost() -> None:
    """A lost host, a skipped one and a local host's lost stub each land where the report
    reads them, with the tasks they held; a host that lost tasks counts as served."""
    summary = sshfan.RunSummary()
    summary.host_lost("a", "connection: reset", 3)
    summary.host_skipped("b", "auth: denied")
    summary.stub_lost("local", "stub: gone", 2)
    summary.stub_lost("local", "stub: gone again", 1)
    assert summary.lost_hosts == {"a": "connection: reset"}
    assert summary.skipped_hosts == {"b": "auth: denied"}
    assert summary.lost_stubs == {"local": ["stub: gone", "stub: gone again"]}
    assert summary.lost_per_host == {"a": 3, "local": 3}
    assert summary.served("a") and summary.served("local") and not summary.served("b")


def test_a_refill_caps_each_host_at_its_slots_share_once_the_file_is_read() -> None:
    """fair_cap: no cap while the file is still read; then each host's slots' share of
    what is left, rounded up (a 1-slot host gets one of the last few, not none)."""
    assert sshfan.fair_cap(None, 4, 8) is None
    assert sshfan.fair_cap(10, 4, 8) == 5
    assert sshfan.fair_cap(3, 1, 8) == 1
    assert sshfan.fair_cap(0, 4, 8) == 0
    assert sshfan.fair_cap(5, 2, 0) == 10  # no ready host counted: no division by zero


def test_queued_tasks_are_taken_back_where_their_wait_outlasts_a_drop() -> None:
    """take_back asks back the queues whose predicted wait (or silence) exceeds what a DROP
    costs, and says when to look again at the others; an empty or just-emptied queue is
    left alone, and with no durations known it always pays."""
    queue = sshfan.HostQueue
    long_ones = queue(queued=2, slots=1, mean=1.5, waited=0.0, cost=0.1)
    tiny_ones = queue(queued=3, slots=1, mean=0.001, waited=0.02, cost=0.1)
    idle = queue(queued=-1, slots=1, mean=0.001, waited=9.0, cost=0.1)
    unknown = queue(queued=1, slots=2, mean=None, waited=0.0, cost=0.1)
    found_nothing = queue(queued=2, slots=1, mean=1.5, waited=5.0, cost=0.1, may_drop=False)
    asked, again = sshfan.take_back([long_ones, tiny_ones, idle, unknown, found_nothing])
    assert asked == [0, 3]
    assert again == pytest.approx(0.08)  # tiny_ones: once it has waited 0.1 s in all
    silent = queue(queued=3, slots=1, mean=0.001, waited=0.5, cost=0.1)  # a long one runs
    assert sshfan.take_back([silent]) == ([0], math.inf)
    assert sshfan.take_back([idle]) == ([], math.inf)
