"""HostProtocol, the head's side of one stub's protocol, fed frames by hand: no event
loop, no sockets. Every frame a worker could send unasked is a ProtocolError; what the
run does with the events (journal, results, requeue) is not the protocol's business, and
a bug there never passes for the host's fault."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

import sshfan
from sshfan import (
    FLAG_CANCELLED,
    FLAG_TIMED_OUT,
    FRAME_KINDS,
    HOST_GONE,
    HOST_MOVES,
    KIND_DROPPED,
    KIND_ERROR,
    KIND_HELLO,
    KIND_OUTPUT,
    KIND_PING,
    KIND_PONG,
    KIND_RESULT,
    OUTPUT_HEAD,
    PROTO_VERSION,
    HostError,
    HostProtocol,
    HostState,
    OutputPiece,
    Pong,
    ProtocolError,
    Task,
    TaskDone,
    TasksGivenBack,
    decode_tasks,
    encode_frame,
    encode_result,
)


def hello(**extra: Any) -> bytes:
    """A HELLO frame of this protocol version."""
    return encode_frame(KIND_HELLO, json.dumps({"proto": PROTO_VERSION, **extra}).encode())


def result(seq: int, status: int = 0, flags: int = 0, out: bytes = b"") -> bytes:
    """A RESULT frame for task SEQ."""
    return encode_frame(KIND_RESULT, encode_result(seq, status, flags, 0.5, out, b"", 1))


def output(seq: int, data: bytes, stream: int = 1) -> bytes:
    """An OUTPUT frame: a piece of task SEQ's STREAM."""
    return encode_frame(KIND_OUTPUT, OUTPUT_HEAD.pack(seq, stream) + data)


def ready(timed: bool = False) -> HostProtocol:
    """A protocol that has had its hello and holds tasks 1 and 2 (two slots)."""
    protocol = HostProtocol("w", 2, timed=timed)
    assert [type(e) for e in protocol.receive(hello(cpus=2))] == [sshfan.Hello]
    protocol.move(HostState.READY)
    for seq in (1, 2):
        protocol.in_flight[seq] = Task(seq, f"echo {seq}")
    protocol.window.in_flight = 2
    return protocol


def feed(protocol: HostProtocol, *frames: bytes) -> list[Any]:
    """All the events FRAMES give."""
    return list(protocol.receive(b"".join(frames)))


def test_hello_output_and_result_become_events() -> None:
    """A task's output and its result come out as events naming the held task."""
    protocol = ready()
    events = feed(protocol, output(1, b"one\n"), result(1, out=b"one\n"))
    piece, done = events
    assert isinstance(piece, OutputPiece) and piece.task.seq == 1 and piece.stream == 1
    assert b"".join(piece.parts)[OUTPUT_HEAD.size :] == b"one\n"
    assert isinstance(done, TaskDone) and not done.cancelled
    assert (done.result.seq, done.result.exit_code, done.result.host) == (1, 0, "w")
    assert list(protocol.in_flight) == [2] and protocol.window.in_flight == 1


def test_a_signal_status_and_a_timeout_are_reported() -> None:
    """Minus a signal number is that signal; the timed-out flag needs a run with --timeout."""
    protocol = ready(timed=True)
    (done,) = feed(protocol, result(2, status=-9, flags=FLAG_TIMED_OUT))
    assert (done.result.exit_code, done.result.signal, done.result.timed_out) == (137, 9, True)


def test_the_answers_the_head_asked_for() -> None:
    """A PONG for a ping sent, a DROPPED answering a DROP, a cancelled task's late RESULT."""
    protocol = ready()
    payload, frame = protocol.ping()
    assert frame == encode_frame(KIND_PING, payload)
    (pong,) = feed(protocol, encode_frame(KIND_PONG, payload))
    assert isinstance(pong, Pong) and pong.payload == payload and protocol.rtt == pong.rtt
    protocol.drops_asked = 1
    protocol.dropping = True
    (back,) = feed(protocol, encode_frame(KIND_DROPPED, b"[2]"))
    assert isinstance(back, TasksGivenBack) and [t.seq for t in back.tasks] == [2]
    assert not protocol.dropping and list(protocol.in_flight) == [1]
    protocol.in_flight.pop(1)
    protocol.cancelled.add(1)  # --speculate's CANCEL: its RESULT and output are ignored
    assert feed(protocol, output(1, b"late"), result(1, flags=FLAG_CANCELLED)) == []
    assert not protocol.cancelled


def test_cancelled_tasks_are_expected_from_a_closing_or_killing_host() -> None:
    """RESULT flagged CANCELLED is asked for once stdin is closed, or after a DROP kill."""
    closing = ready()
    closing.move(HostState.CLOSING)
    (done,) = feed(closing, result(1, flags=FLAG_CANCELLED))
    assert done.cancelled
    killing = ready()
    killing.killing = True
    (done,) = feed(killing, result(2, flags=FLAG_CANCELLED))
    assert done.cancelled


VIOLATIONS = {
    "unasked RESULT": ([result(9)], "result for task 9 it was not given"),
    "second RESULT": ([result(1), result(1)], "(or a second one)"),
    "unasked OUTPUT": ([output(9, b"x")], "output for task 9 it was not given"),
    "OUTPUT on stream 3": ([output(1, b"x", stream=3)], "on stream 3"),
    "second HELLO": ([hello()], "a second hello"),
    "unasked PONG": ([encode_frame(KIND_PONG, b"77")], "a pong for no ping"),
    "unasked DROPPED": ([encode_frame(KIND_DROPPED, b"[2]")], "DROPPED without a DROP"),
    "unknown kind": ([encode_frame(99, b"")], "an unexpected frame of kind 99"),
    "PING from the stub": ([encode_frame(KIND_PING, b"1")], "an unexpected PING (kind 5)"),
    "cancelled, not cancelled": (
        [result(1, flags=FLAG_CANCELLED)],
        "task 1 reported cancelled, but the run did not cancel it",
    ),
    "timed out, no --timeout": ([result(1, flags=FLAG_TIMED_OUT)], "but it has no --timeout"),
    "unknown flags": ([result(1, flags=8)], "unknown flags 0x8"),
    "NaN duration": (
        [encode_frame(KIND_RESULT, encode_result(1, 0, 0, float("nan"), b"", b"", 1))],
        "lasting nan s",
    ),
    "negative duration": (
        [encode_frame(KIND_RESULT, encode_result(1, 0, 0, -1.0, b"", b"", 1))],
        "lasting -1.0 s",
    ),
    "truncated RESULT": ([encode_frame(KIND_RESULT, b"\x00\x01")], "a bad RESULT (kind 8)"),
    "truncated OUTPUT": ([encode_frame(KIND_OUTPUT, b"\x01")], "a bad OUTPUT (kind 7)"),
    "DROPPED of lists": ([encode_frame(KIND_DROPPED, b"[[1]]")], "a bad DROPPED (kind 11)"),
    "not a frame": ([b"this is not a frame at all\n"], "bytes that are not a frame"),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_each_frame_not_asked_for_is_a_protocol_error(name: str) -> None:
    """Each unasked frame raises ProtocolError naming it, stage "protocol"."""
    frames, words = VIOLATIONS[name]
    protocol = ready()
    if name == "DROPPED of lists":
        protocol.drops_asked = 1
    with pytest.raises(ProtocolError) as caught:
        feed(protocol, *frames)
    assert caught.value.stage == "protocol" and words in caught.value.reason, caught.value


@pytest.mark.parametrize(
    ("payload", "asked", "words"),
    [(b"[7]", 1, "task 7 it does not hold"), (b"[2, 2]", 1, "bad list"), (b"{}", 1, "bad list")],
)
def test_a_dropped_naming_tasks_not_held_is_a_protocol_error(
    payload: bytes, asked: int, words: str
) -> None:
    """DROPPED must name tasks the host holds, each once, as a list."""
    protocol = ready()
    protocol.drops_asked = asked
    with pytest.raises(ProtocolError, match=words):
        feed(protocol, encode_frame(KIND_DROPPED, payload))


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (result(3), "result for task 3 it was not sent"),
        (output(3, b"made up\n"), "output for task 3 it was not sent"),
        (encode_frame(KIND_DROPPED, b"[3]"), "DROPPED task 3 it was not sent"),
    ],
    ids=["RESULT", "OUTPUT", "DROPPED"],
)
def test_a_task_held_while_its_files_go_is_not_the_stubs_yet(frame: bytes, words: str) -> None:
    """A task held while its --transferfile files go (hold, staging) is not on the worker
    until its TASKS frame goes (staged): a RESULT, OUTPUT or DROPPED for it before then
    is a protocol error, not a result for a task that never ran. Once sent, it is the
    stub's as any other."""
    protocol = ready()
    protocol.drops_asked = 1
    task = Task(3, "echo 3")
    protocol.hold([task], staging=True)
    with pytest.raises(ProtocolError, match=words):
        feed(protocol, frame)
    protocol = ready()
    protocol.hold([task], staging=True)
    protocol.staged(task)
    (done,) = feed(protocol, result(3))
    assert isinstance(done, TaskDone) and done.task is task
    protocol = ready()
    protocol.hold([task], staging=True)
    assert protocol.let_go(3) is task and not protocol.staging


def test_frames_before_the_hello_and_bad_hellos() -> None:
    """Only HELLO (or ERROR) may come first; a hello is a JSON object of our version."""
    with pytest.raises(ProtocolError, match=r"RESULT \(kind 8\) before the hello"):
        feed(HostProtocol("w", 1), result(1))
    with pytest.raises(ProtocolError, match="not a JSON object"):
        feed(HostProtocol("w", 1), encode_frame(KIND_HELLO, b"[1]"))
    with pytest.raises(HostError) as caught:
        feed(HostProtocol("w", 1), encode_frame(KIND_HELLO, b'{"proto": 999}'))
    assert caught.value.stage == "bootstrap" and not isinstance(caught.value, ProtocolError)
    for cpus in (0, -3, "8", 2.5, True):  # slots = "auto" would be this many
        with pytest.raises(ProtocolError, match="cpus is not a count"):
            feed(HostProtocol("w", 1), hello(cpus=cpus))
    none = feed(HostProtocol("w", 1), hello(cpus=None))  # os.cpu_count() may not know
    assert [type(event) for event in none] == [sshfan.Hello]


def test_the_stubs_error_names_its_stage_not_a_protocol_error() -> None:
    """ERROR is the stub stopping: a setup stage it names, or "stub"; never "protocol"."""
    with pytest.raises(HostError) as caught:
        feed(HostProtocol("w", 1), encode_frame(KIND_ERROR, b"workdir: cannot create /x"))
    assert (caught.value.stage, caught.value.reason) == ("workdir", "cannot create /x")
    with pytest.raises(HostError) as caught:
        feed(ready(), encode_frame(KIND_ERROR, b"boom"))
    assert caught.value.stage == "stub" and not isinstance(caught.value, ProtocolError)


def test_events_come_one_frame_at_a_time() -> None:
    """The frames before a bad one give their events first (a result is not lost to the
    duplicate behind it): the caller acts on each before the next is checked."""
    protocol = ready()
    events = protocol.receive(result(1) + result(1))
    assert isinstance(next(events), TaskDone)
    with pytest.raises(ProtocolError, match="second one"):
        next(events)


def test_host_states_move_only_as_the_table_says() -> None:
    """The moves a host makes, and no others; lost, failed, done, abandoned are final."""
    assert {HostState.LOST, HostState.FAILED, HostState.DONE, HostState.ABANDONED} == HOST_GONE
    path = [HostState.READY, HostState.DRAINING, HostState.READY, HostState.CLOSING]
    protocol = HostProtocol("w", 1)
    for state in [*path, HostState.DONE]:
        protocol.move(state)
    assert protocol.state == HostState.DONE
    with pytest.raises(RuntimeError, match="no move from DONE to LOST"):
        protocol.move(HostState.LOST)
    for start, moves in HOST_MOVES.items():
        for state in set(HostState) - moves:
            probe = HostProtocol("w", 1)
            probe.state = start
            with pytest.raises(RuntimeError):
                probe.move(state)


def test_every_frame_kind_has_a_name_and_only_the_stubs_have_handlers() -> None:
    """One table names every wire kind; a handler exactly for what a stub may send."""
    wire = {v for k, v in vars(sshfan).items() if k.startswith("KIND_") and v < 20}
    assert set(FRAME_KINDS) == wire
    handled = {kind for kind, (_name, handler) in FRAME_KINDS.items() if handler is not None}
    assert handled == {KIND_HELLO, KIND_PONG, KIND_OUTPUT, KIND_RESULT, KIND_ERROR, KIND_DROPPED}
    assert sshfan.frame_name(KIND_RESULT) == "RESULT (kind 8)"


class _Run:
    """Just enough of a run for a session to deliver events to: its handling of them
    fails as a bug in the run's own code would."""

    max_ahead = None
    timeout = None

    def __init__(self) -> None:
        """Nothing delivered yet, no bug seen."""
        self.delivered: list[Any] = []
        self.bugs: list[BaseException] = []

    def bug(self, exc: BaseException) -> None:
        """Record a bug the session hands to the run (the real run ends on it)."""
        self.bugs.append(exc)

    def deliver(self, session: Any, event: Any) -> None:
        """Record EVENT, then raise the KeyError the old data handler took for a bad frame."""
        self.delivered.append(event)
        raise KeyError("a bug in the run")


def test_a_bug_in_the_runs_handling_is_not_the_hosts_protocol_error() -> None:
    """An exception from the run's handling of an event (here a KeyError) is not the host's
    fault: the session does not fail the host or give its task back (the real run's deliver
    ends the run on it, as the tests below show)."""

    async def scenario() -> tuple[HostState, HostError | None, list[int], _Run]:
        """Feed one output frame to a ready session of the fake run."""
        run = _Run()
        session = sshfan.HostSession(sshfan.HostSpec(name="w", local=True), run)  # type: ignore[arg-type]
        session.hello = {"proto": PROTO_VERSION}
        session.protocol.move(HostState.READY)
        session.in_flight[1] = Task(1, "echo 1")
        session.on_data(output(1, b"x"))
        return session.state, session.error, list(session.in_flight), run

    state, error, held, run = asyncio.run(scenario())
    assert (state, error, held) == (HostState.READY, None, [1])
    assert [type(e) for e in run.delivered] == [OutputPiece]
    assert [repr(e) for e in run.bugs] == [repr(KeyError("a bug in the run"))]


def test_a_bug_in_the_runs_handling_ends_the_run_raising_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """End to end with a real local stub: a bug journaling a result surfaces as that bug,
    not as the only host lost for "bad frame" and a run that ends "no host left"."""

    def broken(self: sshfan.Journal, result: sshfan.TaskResult) -> int:
        """Fail as a bug in the run's own code would."""
        raise KeyError("a bug in the run")

    monkeypatch.setattr(sshfan.Journal, "add_result", broken)
    host = sshfan.HostSpec(name="local", local=True, python=sys.executable, slots=1)
    with pytest.raises(KeyError, match="a bug in the run"):
        list(sshfan.run_tasks(["echo hello"], hosts=[host]))


def test_a_bug_in_the_run_ends_the_command_3_with_one_line_and_the_journal_kept(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """From the command line, a bug in the run is exit 3 (the run could not finish: its
    journal is kept) with one line saying it is a bug, not exit 1 (tasks failed)."""

    def broken(self: sshfan.Journal, result: sshfan.TaskResult) -> int:
        """Fail as a bug in the run's own code would."""
        raise KeyError("a bug in the run")

    monkeypatch.setattr(sshfan.Journal, "add_result", broken)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tasks.txt").write_text("echo hello\n")
    monkeypatch.setattr(sys, "argv", ["sshfan", "run", "tasks.txt", "-j", "1", "--no-progress"])
    with pytest.raises(SystemExit) as ended:
        sshfan.main()
    assert ended.value.code == 3
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("sshfan: internal error: KeyError: 'a bug in the run'")
    assert (tmp_path / "tasks.out.journal").exists() or (
        tmp_path / "tasks.out.journal.new"
    ).exists()


def test_tasks_sent_are_held_and_their_frames_decode_back() -> None:
    """send_tasks counts the tasks held and returns frames the stub decodes to them; a
    --pipe chunk larger than an INPUT piece goes partly in INPUT frames, in order."""
    protocol = ready()
    big = bytes(range(256)) * (sshfan.INPUT_PIECE // 128) + b"the tail"
    tasks = [Task(3, "cat", data=big), Task(4, "echo 4")]
    frames = protocol.send_tasks(tasks)
    assert list(protocol.in_flight) == [1, 2, 3, 4] and protocol.window.in_flight == 4
    decoded = sshfan.FrameDecoder(skip_banner=False).feed(b"".join(frames))
    inputs = [p for kind, p in decoded if kind == sshfan.KIND_INPUT]
    entries = [e for kind, p in decoded if kind == sshfan.KIND_TASKS for e in decode_tasks(p)]
    assert [seq for seq, _command, _data in entries] == [3, 4]
    stdin = b"".join(bytes(p[sshfan.INPUT_HEAD.size :]) for p in inputs) + entries[0][2]
    assert stdin == big and len(inputs) == 2 and entries[0][2] == b"the tail"


def test_drop_and_cancel_frames_and_their_bookkeeping() -> None:
    """One DROP at a time unless a halt; CANCEL lets go of the task at once."""
    protocol = ready()
    assert protocol.drop() == encode_frame(sshfan.KIND_DROP, b"")
    assert protocol.drop() is None  # the first is on its way
    assert protocol.drop("kill") == encode_frame(sshfan.KIND_DROP, b"kill")
    assert (protocol.drops_asked, protocol.killing) == (2, True)
    assert protocol.cancel(1) == encode_frame(sshfan.KIND_CANCEL, sshfan.INPUT_HEAD.pack(1))
    assert protocol.cancel(1) is None  # not held any more
    assert list(protocol.in_flight) == [2] and protocol.cancelled == {1}
    idle = HostProtocol("w", 1)
    assert idle.drop() is None  # not up yet


def test_silence_asks_for_a_ping_then_gives_the_host_up() -> None:
    """Silent for an interval: one PING; unanswered for two intervals (PROBE_WAIT at
    least): Silent, with how long nothing came; anything heard starts it over."""
    protocol = ready()
    protocol.heard(100.0)
    assert protocol.check_silence(100.5, 1.0) is None
    ping = protocol.check_silence(101.0, 1.0)
    assert ping == encode_frame(KIND_PING, b"1")
    assert protocol.check_silence(102.0, 1.0) is None  # the ping is out: no second one
    assert protocol.check_silence(102.9, 1.0) is None  # two intervals not out yet
    silent = protocol.check_silence(103.0, 1.0)
    assert isinstance(silent, sshfan.Silent) and silent.seconds == 3.0
    protocol.heard(103.5)
    assert protocol.check_silence(104.0, 1.0) is None


def test_config_staged_task_and_release_frames() -> None:
    """CONFIG sets the window's slots; a staged task and a RELEASE decode as the stub reads
    them."""
    protocol = HostProtocol("w", 1)
    frame = protocol.configure({"slots": 4, "host": "w"})
    ((kind, payload),) = sshfan.FrameDecoder(skip_banner=False).feed(frame)
    assert (kind, sshfan.decode_config(payload), protocol.window.slots) == (
        sshfan.KIND_CONFIG,
        {"slots": 4, "host": "w"},
        4,
    )
    ((kind, payload),) = sshfan.FrameDecoder(skip_banner=False).feed(
        protocol.staged(Task(7, "echo é"))
    )
    assert (kind, decode_tasks(payload)) == (sshfan.KIND_TASKS, [(7, "echo é".encode(), b"")])
    assert protocol.release(7) == encode_frame(sshfan.KIND_RELEASE, sshfan.INPUT_HEAD.pack(7))


def test_finish_closes_stdin_of_a_host_that_is_up_and_drops_one_that_is_not() -> None:
    """finish: READY or DRAINING -> CLOSING, close its stdin; CONNECTING -> ABANDONED, drop
    the connection; a host already closing or gone: nothing to do."""
    up = ready()
    assert up.finish() == [sshfan.Close.STDIN] and up.state == HostState.CLOSING
    assert up.finish() == [] and up.state == HostState.CLOSING
    starting = HostProtocol("w", 1)
    assert starting.finish() == [sshfan.Close.CONNECTION]
    assert starting.state == HostState.ABANDONED
    assert starting.finish() == [] and starting.fail(HostError("w", "x", "y")) is None


def test_a_draining_host_asks_back_its_queue_and_retires_once_nothing_is_held() -> None:
    """drain: a DROP, then DRAINING while it holds tasks or a DROP is out; the last result
    retires it (CLOSING, stdin closed); back in the hosts file before that: READY again."""
    protocol = ready()
    assert protocol.drain() == [encode_frame(sshfan.KIND_DROP, b"")]
    assert protocol.state == HostState.DRAINING and protocol.retire() == []
    (back,) = feed(protocol, encode_frame(KIND_DROPPED, b"[2]"))
    assert [t.seq for t in back.tasks] == [2] and protocol.retire() == []  # task 1 runs
    protocol.fetching[1] = protocol.in_flight[1]  # its --return files are coming back
    feed(protocol, result(1))
    assert protocol.retire() == []
    del protocol.fetching[1]
    assert protocol.retire() == [sshfan.Close.STDIN] and protocol.state == HostState.CLOSING
    back_again = ready()
    back_again.drain()
    back_again.undrain()
    assert back_again.state == HostState.READY and back_again.retire() == []
    assert HostProtocol("w", 1).drain() == [sshfan.Close.CONNECTION]


def test_a_failed_host_gives_back_all_it_held_once() -> None:
    """fail: LOST (FAILED if never up), the error kept; every task held, fetched ones too,
    goes back once; a second failure (or a late close) changes nothing."""
    protocol = ready()
    protocol.fetching[5] = Task(5, "echo 5")
    error = HostError("w", "connection", "reset")
    tasks = protocol.fail(error)
    assert tasks is not None and sorted(t.seq for t in tasks) == [1, 2, 5]
    assert protocol.state == HostState.LOST and protocol.error is error
    assert not protocol.in_flight and not protocol.fetching and protocol.window.in_flight == 0
    assert protocol.fail(HostError("w", "stub", "again")) is None and protocol.error is error
    assert protocol.closed() is None
    never = HostProtocol("w", 1)
    assert never.fail(error) == [] and never.state == HostState.FAILED


def test_a_stub_that_ends_right_behind_its_hello_is_lost_not_failed_to_start() -> None:
    """A hello and the channel's end taken in one read, before the session saw the host up
    (a task sent behind the source killed the stub): the host was up, so it is lost, with
    the tasks it held, and not reported as a stub that never said hello."""
    protocol = HostProtocol("w", 1)
    protocol.send_tasks([Task(1, "kill -9 $PPID")])
    assert [type(e).__name__ for e in protocol.receive(hello(cpus=1))] == ["Hello"]
    assert protocol.state == HostState.CONNECTING
    protocol.exit_status = None
    error = protocol.closed()
    assert error is not None and error.stage == "connection", error
    assert [t.seq for t in protocol.fail(error) or []] == [1]
    assert protocol.state == HostState.LOST


def test_a_closed_channel_is_done_when_closing_and_a_named_loss_otherwise() -> None:
    """closed: CLOSING -> DONE; up -> the error to fail with (the stub's exit status and
    stderr if it exited, else the transport's reason); never up -> why it did not start."""
    closing = ready()
    closing.finish()
    assert closing.closed() is None and closing.state == HostState.DONE
    lost = ready()
    error = lost.closed()
    assert error is not None and (error.stage, error.reason) == (
        "connection",
        "closed by the remote end",
    )
    assert lost.state == HostState.READY  # the session fails it with that error
    reset = ready().closed("Connection reset")
    assert reset is not None and reset.reason == "Connection reset"
    crashed = ready()
    crashed.stderr(b"Traceback...\nMemoryError\n")
    crashed.exit_status = 1
    error = crashed.closed("ignored")
    assert error is not None and error.reason == "stub exited 1: MemoryError"
    missing = HostProtocol("w", 1, python="/opt/py3")
    missing.stderr(b"sh: 1: /opt/py3: not found\n")
    missing.exit_status = 127
    error = missing.closed()
    assert error is not None and error.stage == "bootstrap"
    assert error.reason.startswith("/opt/py3 not found on the worker")
    old = HostProtocol("w", 1)
    old.stderr(b"SyntaxError: invalid syntax\n")
    error = old.closed()
    assert error is not None and "too old" in error.reason


def test_a_session_tells_its_run_only_through_deliver() -> None:
    """The run hears of a host only as events: the protocol's (an output piece, a result)
    and the session's (Settled after each batch; HostLost with the tasks it held when a
    frame breaks the protocol), all through run.deliver."""

    class Run:
        """Records what is delivered."""

        max_ahead = None
        timeout = None

        def __init__(self) -> None:
            """Nothing yet."""
            self.events: list[Any] = []

        def deliver(self, session: Any, event: Any) -> None:
            """Record EVENT."""
            self.events.append(event)

    async def scenario() -> tuple[list[Any], HostState]:
        """A batch of output and a result, then a result for a task never given."""
        run = Run()
        session = sshfan.HostSession(sshfan.HostSpec(name="w", local=True), run)  # type: ignore[arg-type]
        session.hello = {"proto": PROTO_VERSION}
        session.protocol.move(HostState.READY)
        for seq in (1, 2):
            session.in_flight[seq] = Task(seq, f"echo {seq}")
        session.on_data(output(1, b"one\n") + result(1))
        session.on_data(result(9))
        return run.events, session.state

    events, state = asyncio.run(scenario())
    assert [type(e) for e in events] == [OutputPiece, TaskDone, sshfan.Settled, sshfan.HostLost]
    lost = events[-1]
    assert lost.error.stage == "protocol" and [t.seq for t in lost.tasks] == [2]
    assert state == HostState.LOST


def test_a_bug_in_the_host_protocol_ends_the_run_raising_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in sshfan's own handling of a host's bytes (here in HostProtocol) surfaces as
    that bug, not as the host's channel closed under it and a run that ends "no host left"."""

    def broken(self: sshfan.HostProtocol, now: float) -> None:
        """Fail as a bug in the protocol's own code would."""
        raise AttributeError("a bug in the protocol")

    monkeypatch.setattr(sshfan.HostProtocol, "heard", broken)
    host = sshfan.HostSpec(name="local", local=True, python=sys.executable, slots=1)
    with pytest.raises(AttributeError, match="a bug in the protocol"):
        list(sshfan.run_tasks(["echo hello"], hosts=[host]))
