"""What the performance work promises beyond speed: lazy imports, longest-first ordering
that keeps the output in seq order, and speculative copies that leave one result.

No timing is asserted here: the figures live in docs/performance.md, from tests/bench.py."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

RunSshfan = Callable[..., "subprocess.CompletedProcess[bytes]"]


def imported_modules(stderr: bytes) -> set[str]:
    """The module names a run listed with PYTHONPROFILEIMPORTTIME (python -X importtime)."""
    names = set()
    for line in stderr.decode(errors="replace").splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_local_run_imports_no_asyncssh_tqdm(tmp_path: Path, run_sshfan: RunSshfan) -> None:
    """A run on the local host never imports asyncssh (SSH only) nor tqdm (no terminal)."""
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("echo one\necho two\n")
    done = run_sshfan(
        ["run", str(tasks), "-o", str(tmp_path / "out.txt")],
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert (tmp_path / "out.txt").read_bytes() == b"one\ntwo\n"
    modules = imported_modules(done.stderr)
    assert "asyncio" in modules  # the import listing was captured
    assert not {m for m in modules if m.split(".")[0] in ("asyncssh", "tqdm")}
