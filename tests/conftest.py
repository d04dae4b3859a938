"""Shared pytest fixtures: throwaway SSH servers and a runner for the sshfan CLI."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import py_compile
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from sshd import SshServer  # noqa: E402 - importable only after the sys.path insert
from support import RunSshfan, sshfan_argv, sshfan_env  # noqa: E402 - as sshd

# Tests that start a server or the sshfan CLI are the end-to-end layer: marked "e2e",
# so that `pytest -m "not e2e"` runs the fast, in-process layer alone. (A hung test is
# failed by pytest-timeout's `timeout` in pyproject.toml.)
E2E_FIXTURES = frozenset({"sshd", "sshd_factory", "run_sshfan", "spawn"})


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile sshfan.py once, as `pip install` does, for the sshfan runs to come.

    Where PYTHONDONTWRITEBYTECODE is set, every `python -m sshfan` of the suite (hundreds)
    would compile the whole module again before doing anything; an installed sshfan has
    its bytecode. Python still reads a .pyc it does not write (the ignored __pycache__/),
    and ignores it once sshfan.py changes."""
    source = TESTS_DIR.parent / "sshfan.py"
    with contextlib.suppress(OSError):  # a read-only checkout: each run compiles, as before
        py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses a server or the CLI fixture as e2e."""
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _own_cache_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Give each test its own cache directory: durations learnt by one test's run (which
    order a later run's tasks) must not reach another test, nor the user's own cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """Return one SSH server shared by the whole session (do not kill or freeze it)."""
    server = SshServer(tmp_path_factory.mktemp("sshd")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sshd_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., SshServer]]:
    """Return a maker of fresh started servers, for tests that kill or freeze them."""
    servers: list[SshServer] = []

    def make(kind: str = "auto") -> SshServer:
        """Start a new server of the given kind and remember it for teardown."""
        server = SshServer(tmp_path_factory.mktemp("sshd"), kind)
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def run_sshfan(tmp_path: Path) -> RunSshfan:
    """Return a runner of `python -m sshfan ARGS` capturing stdout and stderr as bytes."""

    def run(
        args: list[str],
        input: bytes | None = None,  # named as in subprocess.run
        timeout: float = 120,
        cwd: Path | str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run sshfan with args; env holds extra variables on top of os.environ."""
        argv = sshfan_argv(*args)
        # Own session, so a timeout can kill sshfan and its ssh/local helpers together.
        proc = subprocess.Popen(
            argv,
            cwd=cwd if cwd is not None else tmp_path,
            env=sshfan_env(env),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(
                f"sshfan {args} timed out after {timeout}s; stderr:\n"
                f"{stderr.decode(errors='replace')[-4000:]}"
            )
        return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)

    return run
