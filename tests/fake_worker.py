"""A fake sshfan worker stub that speaks the framing but misbehaves in one chosen way.

Used as a local host's `python` (through a wrapper that names the misbehaviour):
`fake_worker.py MODE READY -S -c BOOTSTRAP`. It reads the stub the head sends (its
lengths are in the header in front of it), says hello, creates the file READY once it has
its CONFIG (tests hold their tasks until then, so that this host gets some), runs tasks
one at a time with /bin/sh, and sends what MODE says once, on the first task (or right
after the CONFIG).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sshfan  # noqa: E402 - importable only after the sys.path insert
from sshfan import (  # noqa: E402
    FLAG_CANCELLED,
    FLAG_TIMED_OUT,
    KIND_CONFIG,
    KIND_DROP,
    KIND_DROPPED,
    KIND_ERROR,
    KIND_HELLO,
    KIND_OUTPUT,
    KIND_PING,
    KIND_PONG,
    KIND_RESULT,
    KIND_TASKS,
    OUTPUT_HEAD,
    FrameDecoder,
    decode_tasks,
    encode_frame,
    encode_result,
)

# What each mode sends right after the CONFIG (no task needed).
AT_CONFIG = {
    "hello-twice": lambda: encode_frame(KIND_HELLO, hello()),
    "pong-unasked": lambda: encode_frame(KIND_PONG, b"12345"),
    "dropped-unasked": lambda: encode_frame(KIND_DROPPED, b"[]"),
    "unknown-kind": lambda: encode_frame(99, b""),
    "ping-from-stub": lambda: encode_frame(KIND_PING, b"1"),
    "error": lambda: encode_frame(KIND_ERROR, b"boom \x1b[31mred\x1b[0m"),
}


def hello() -> bytes:
    """The HELLO payload a real stub sends."""
    info = {"proto": sshfan.PROTO_VERSION, "python": "3", "cpus": 1, "hostname": "fake"}
    return json.dumps({**info, "pid": os.getpid()}).encode()


def run(command: bytes) -> tuple[int, bytes, bytes, float]:
    """Run one task as the real stub would; return status, stdout, stderr, duration."""
    started = time.monotonic()
    proc = subprocess.run([b"/bin/sh", b"-c", command], capture_output=True, check=False)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started


def misbehave(mode: str, seq: int, command: bytes) -> bytes:
    """The frames MODE sends for the first task (instead of, or with, its result)."""
    status, out, err, took = run(command)
    result = encode_frame(KIND_RESULT, encode_result(seq, status, 0, took, out, err))
    if mode == "cancelled":
        return encode_frame(KIND_RESULT, encode_result(seq, 0, FLAG_CANCELLED, took, out, err))
    if mode == "timed-out":
        return encode_frame(KIND_RESULT, encode_result(seq, -9, FLAG_TIMED_OUT, took, b"", b""))
    if mode == "unknown-flags":
        return encode_frame(KIND_RESULT, encode_result(seq, status, 64, took, out, err))
    if mode == "duplicate":
        return result + result
    if mode == "result-unknown-seq":
        return encode_frame(KIND_RESULT, encode_result(seq + 10**6, 0, 0, took, b"", b""))
    if mode == "output-unknown-seq":
        return encode_frame(KIND_OUTPUT, OUTPUT_HEAD.pack(seq + 10**6, 1) + b"x") + result
    if mode == "output-bad-stream":
        return encode_frame(KIND_OUTPUT, OUTPUT_HEAD.pack(seq, 3) + b"x") + result
    if mode == "stall-mid-frame":
        os.write(1, result[: len(result) // 2])
        time.sleep(3600)
    raise SystemExit(f"fake_worker: unknown mode {mode}")


def read_exactly(size: int) -> bytes | None:
    """SIZE bytes of stdin (None: it ended first)."""
    data = b""
    while len(data) < size:
        more = os.read(0, size - len(data))
        if not more:
            return None
        data += more
    return data


def main() -> None:
    """Read the source, say hello, then serve frames until EOF, misbehaving once."""
    mode, ready = sys.argv[1], sys.argv[2]
    header = read_exactly(sshfan.STUB_HEADER.size)
    if header is None:
        return
    _, n_source, n_code = sshfan.STUB_HEADER.unpack(header)
    if read_exactly(n_source + n_code) is None:
        return
    os.write(1, encode_frame(KIND_HELLO, hello()))
    decoder = FrameDecoder(skip_banner=False)
    done = False
    while True:
        data = os.read(0, 1 << 16)
        if not data:
            return
        for kind, payload in decoder.feed(data):
            if kind == KIND_CONFIG:
                Path(ready).touch()
                if mode in AT_CONFIG:
                    os.write(1, AT_CONFIG[mode]())
            elif kind == KIND_PING:
                os.write(1, encode_frame(KIND_PONG, payload))
            elif kind == KIND_DROP:
                os.write(1, encode_frame(KIND_DROPPED, b"[]"))
            elif kind == KIND_TASKS:
                for seq, command, _data in decode_tasks(payload):
                    if not done and mode not in AT_CONFIG:
                        done = True
                        os.write(1, misbehave(mode, seq, command))
                        continue
                    status, out, err, took = run(command)
                    os.write(
                        1, encode_frame(KIND_RESULT, encode_result(seq, status, 0, took, out, err))
                    )


if __name__ == "__main__":
    main()
