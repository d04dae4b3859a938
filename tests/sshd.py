"""A throwaway SSH server on loopback for sshfan's tests and benchmark.

Two kinds, same API:

* ``openssh``: the system's ``sshd`` (``/usr/sbin/sshd``) run in the foreground with
  a config, host key, authorized keys and pid file that all live in a scratch
  directory; nothing under ``/etc`` is read or touched.
* ``asyncssh``: a separate Python process (this file, ``python sshd.py serve ...``)
  running an asyncssh server that executes each command as ``/bin/sh -c COMMAND``
  with its stdin, stdout and stderr piped byte-exactly over the channel. It stands
  in where ``sshd`` is not installed.

Both run as their own process tree, so a test can kill it (a host dying) or freeze
it with SIGSTOP (a host hanging with its TCP connections still open).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import getpass
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
SSHD_PATH = "/usr/sbin/sshd"
START_TIMEOUT = 15.0  # seconds for the server to accept and greet a connection
STOP_TIMEOUT = 5.0  # seconds for SIGTERM to work before SIGKILL
SIGNAL_TIMEOUT = 5.0  # seconds for SIGSTOP/SIGKILL to take effect (they are asynchronous)
PORT_ATTEMPTS = 5  # fresh ports to try when another process grabs ours first

_LIVE_SERVERS: set[SshServer] = set()  # started and not yet stopped, for atexit


# ---------------------------------------------------------------------------
# process tree
# ---------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str]]:
    """Map every live pid to its (ppid, state letter), read from /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited while we looked
        # The command name (field 2) may contain spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def process_tree(root: int) -> list[int]:
    """Return root and all its living descendants (zombies left out), parents first."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _state) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree: list[int] = []
    todo = [root] if root in table else []
    while todo:
        pid = todo.pop(0)
        if table[pid][1] != "Z":
            tree.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return tree


def _signal_all(pids: list[int], sig: int) -> None:
    """Send sig to each pid, ignoring those that have already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _state(pid: int) -> str:
    """Return a process's state letter (R, S, T, Z, ...), or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _alive(pid: int) -> bool:
    """Tell whether pid still names a process that is not a zombie."""
    return _state(pid) not in ("", "Z", "X")


def _start_time(pid: int) -> int | None:
    """Return when a process started (clock ticks since boot), to tell a reused pid apart."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _wait_states(pids: list[int], done: Callable[[str], bool]) -> None:
    """Wait (bounded) until every pid's state satisfies done: signals act asynchronously."""
    deadline = time.monotonic() + SIGNAL_TIMEOUT
    while time.monotonic() < deadline:
        if all(done(_state(pid)) for pid in pids):
            return
        time.sleep(0.005)


def _stop_tree(root: int) -> list[int]:
    """SIGSTOP root's tree until no new descendant appears; return the stopped pids."""
    stopped: list[int] = []
    # A process may fork between our listing and our signal; stopping again until
    # the listing is stable catches such late children.
    for _ in range(50):
        fresh = [pid for pid in process_tree(root) if pid not in stopped]
        if not fresh:
            break
        _signal_all(fresh, signal.SIGSTOP)
        stopped.extend(fresh)
        _wait_states(fresh, lambda state: state in ("T", "t", "Z", "X", ""))
    return stopped


# ---------------------------------------------------------------------------
# keys and files
# ---------------------------------------------------------------------------


def _generate_key(path: Path) -> None:
    """Write an ed25519 key pair without passphrase to path and path.pub."""
    for stale in (path, path.with_name(path.name + ".pub")):
        stale.unlink(missing_ok=True)
    keygen = shutil.which("ssh-keygen")
    if keygen:
        subprocess.run(
            [keygen, "-t", "ed25519", "-N", "", "-q", "-C", path.name, "-f", str(path)],
            check=True,
            stdin=subprocess.DEVNULL,
        )
        return
    import asyncssh

    key = asyncssh.generate_private_key("ssh-ed25519", comment=path.name)
    key.write_private_key(str(path))
    key.write_public_key(str(path) + ".pub")
    path.chmod(0o600)


def _free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _read_banner(port: int, timeout: float) -> bytes:
    """Connect to the port and return the SSH identification line the server sends."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        data = b""
        while b"\n" not in data and len(data) < 512:
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
        return data.split(b"\n", 1)[0].strip()


def _toml_value(value: object) -> str:
    """Encode a str, int, float, bool or list of them as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        # A JSON string without \u escapes of astral characters is a valid TOML string.
        return json.dumps(os.fspath(value), ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def _find_sshd() -> str | None:
    """Return the path of the OpenSSH server binary, or None when it is not installed."""
    if os.access(SSHD_PATH, os.X_OK):
        return SSHD_PATH
    found = shutil.which("sshd")
    return os.path.abspath(found) if found else None


def resolve_kind(kind: str) -> str:
    """Turn "auto" into "openssh" or "asyncssh" (env SSHFAN_TEST_SERVER overrides auto)."""
    if kind == "auto":
        kind = os.environ.get("SSHFAN_TEST_SERVER", "") or "auto"
    if kind == "auto":
        kind = "openssh" if _find_sshd() else "asyncssh"
    if kind not in ("openssh", "asyncssh"):
        raise ValueError(f"unknown SSH server kind {kind!r} (want openssh, asyncssh or auto)")
    return kind


# ---------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------


class SshServer:
    """A throwaway SSH server on 127.0.0.1:<free port> with generated keys.

    No root is needed and no system configuration is touched (as root, OpenSSH
    needs its privilege separation directory /run/sshd, which is created if missing).
    """

    def __init__(self, workdir: Path, kind: str = "auto") -> None:
        """Prepare a server whose keys, config and logs live under workdir."""
        self.workdir = Path(workdir).resolve()
        self.kind = resolve_kind(kind)
        self.host = HOST
        self.port = 0
        self.user = getpass.getuser()
        self.client_key = self.workdir / "client_key"
        self.host_key = self.workdir / "host_key"
        self.known_hosts = self.workdir / "known_hosts"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.config = self.workdir / "sshd_config"
        self.log = self.workdir / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._frozen: list[int] = []
        self.extra_config: list[str] = []  # more sshd_config lines (OpenSSH only)

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> SshServer:
        """Start the server and wait until it greets connections on its port."""
        if self._proc is not None:
            raise RuntimeError("SshServer already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        _generate_key(self.host_key)
        _generate_key(self.client_key)
        # Appended: a test may point authorized_keys at a file that already trusts keys.
        existing = self.authorized_keys.read_bytes() if self.authorized_keys.exists() else b""
        public = self.client_key.with_name("client_key.pub").read_bytes()
        self.authorized_keys.write_bytes(existing + public)
        self.authorized_keys.chmod(0o600)
        if self.kind == "openssh" and os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        last_error = ""
        for _ in range(PORT_ATTEMPTS):
            self.port = _free_port()
            self._write_known_hosts()
            argv = self._openssh_argv() if self.kind == "openssh" else self._asyncssh_argv()
            with open(self.log, "wb") as log:
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            _LIVE_SERVERS.add(self)
            last_error = self._wait_ready()
            if not last_error:
                return self
            self._reap()
            if "in use" not in last_error:
                break
        raise RuntimeError(
            f"{self.kind} SSH server on {HOST}:{self.port} did not start: {last_error}"
        )

    def stop(self) -> None:
        """Shut the server and everything under it down; safe to call twice."""
        proc = self._proc
        if proc is None:
            return
        if self._frozen:
            self.thaw()
        tree = {pid: _start_time(pid) for pid in process_tree(proc.pid)}
        _signal_all(list(tree), signal.SIGTERM)

        def survivors() -> list[int]:
            """Return the tree's processes still alive (not a later process with a reused pid)."""
            return [pid for pid, t in tree.items() if _alive(pid) and _start_time(pid) == t]

        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None and not survivors():
                break
            time.sleep(0.02)
        _signal_all(survivors(), signal.SIGKILL)
        self._reap()

    def kill(self) -> None:
        """SIGKILL the listener and all its descendants, like a host losing power."""
        if self._proc is None:
            return
        # Freeze first so nothing forks or gets reparented while we kill it.
        tree = _stop_tree(self._proc.pid)
        _signal_all(tree, signal.SIGKILL)
        _wait_states(tree, lambda state: state in ("Z", "X", ""))
        self._frozen = []
        self._reap()

    def freeze(self) -> None:
        """SIGSTOP the listener and all its descendants; their TCP connections stay open."""
        if self._proc is None:
            raise RuntimeError("SshServer not started")
        self._frozen.extend(pid for pid in _stop_tree(self._proc.pid) if pid not in self._frozen)

    def thaw(self) -> None:
        """SIGCONT everything freeze() stopped (and anything now in the tree)."""
        pids = list(self._frozen)
        if self._proc is not None:
            pids += [pid for pid in process_tree(self._proc.pid) if pid not in pids]
        _signal_all(pids, signal.SIGCONT)
        _wait_states(pids, lambda state: state not in ("T", "t"))
        self._frozen = []

    def pids(self) -> list[int]:
        """Return the listener and all its descendants (found through /proc ppid links)."""
        if self._proc is None or self._proc.poll() is not None:
            return []
        return process_tree(self._proc.pid)

    def __enter__(self) -> SshServer:
        """Start the server for a with block (unless it is running already)."""
        return self if self._proc is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server at the end of a with block."""
        self.stop()

    # -- what clients need --------------------------------------------------

    def hosts_toml(self, names: list[str], slots: int = 1, **extra: object) -> str:
        """Return the text of an sshfan hosts file with one entry per name, all on this server."""
        defaults: dict[str, object] = {
            "user": self.user,
            "port": self.port,
            "identity": str(self.client_key),
            "known_hosts": str(self.known_hosts),
        }
        defaults.update(extra)
        lines = ["[defaults]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in defaults.items()]
        for name in names:
            lines += [
                "",
                "[[hosts]]",
                f"name = {_toml_value(name)}",
                f"address = {_toml_value(HOST)}",
                f"slots = {_toml_value(slots)}",
            ]
        return "\n".join(lines) + "\n"

    def ssh_argv(self) -> list[str]:
        """Return argv for the OpenSSH client to reach this server non-interactively."""
        return [
            "ssh",
            "-p",
            str(self.port),
            "-i",
            str(self.client_key),
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-F",
            "/dev/null",
            f"{self.user}@{HOST}",
        ]

    # -- internals ----------------------------------------------------------

    def _write_known_hosts(self) -> None:
        """Write known_hosts with the host key under "[127.0.0.1]:PORT"."""
        key_type, key_b64 = self.host_key.with_name("host_key.pub").read_text().split()[:2]
        self.known_hosts.write_text(f"[{HOST}]:{self.port} {key_type} {key_b64}\n")

    def _openssh_argv(self) -> list[str]:
        """Write sshd_config for the current port and return the sshd command line."""
        sshd = _find_sshd()
        if sshd is None:
            raise RuntimeError("OpenSSH server (sshd) is not installed")
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {HOST}",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.workdir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    "UsePAM no",
                    "StrictModes no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    # CI runs the tests as root; key logins must work for it.
                    "PermitRootLogin prohibit-password",
                    "LogLevel ERROR",
                    # As a stock sshd has it: sshfan moves --transferfile/--return files by SFTP.
                    "Subsystem sftp internal-sftp",
                    *self.extra_config,
                    "",
                ]
            )
        )
        return [sshd, "-D", "-e", "-f", str(self.config)]

    def _asyncssh_argv(self) -> list[str]:
        """Return the command line running this file's asyncssh server."""
        return [
            sys.executable,
            str(Path(__file__).resolve()),
            "serve",
            "--port",
            str(self.port),
            "--host-key",
            str(self.host_key),
            "--authorized-keys",
            str(self.authorized_keys),
            "--user",
            self.user,
        ]

    def _wait_ready(self) -> str:
        """Wait until the server greets a connection; return "" or what went wrong."""
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return f"exited with {self._proc.returncode}; log:\n{self._log_text()}"
            try:
                banner = _read_banner(self.port, timeout=2.0)
            except OSError:
                time.sleep(0.05)
                continue
            if banner.startswith(b"SSH-"):
                return self._check_login()
            time.sleep(0.05)
        return f"no SSH greeting within {START_TIMEOUT:.0f}s; log:\n{self._log_text()}"

    def _check_login(self) -> str:
        """Log in with the OpenSSH client (when installed); return "" or the failure."""
        if shutil.which("ssh") is None:
            return ""
        try:
            result = subprocess.run(
                [*self.ssh_argv(), "true"],
                check=False,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=START_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            return f"test login timed out; log:\n{self._log_text()}"
        if result.returncode != 0:
            return (
                f"test login failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}; log:\n{self._log_text()}"
            )
        return ""

    def _log_text(self) -> str:
        """Return the tail of the server's log for error messages."""
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def _reap(self) -> None:
        """Kill whatever is left of the listener and collect its exit status."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal_all(_stop_tree(proc.pid), signal.SIGKILL)
        proc.wait()
        self._proc = None
        self._frozen = []
        _LIVE_SERVERS.discard(self)


@atexit.register
def _stop_leftovers() -> None:
    """Stop servers a crashed test or benchmark forgot, so no sshd outlives Python."""
    for server in list(_LIVE_SERVERS):
        server.stop()


# ---------------------------------------------------------------------------
# the asyncssh server process (python sshd.py serve ...)
# ---------------------------------------------------------------------------


async def _serve(port: int, host_key: str, authorized_keys: str, user: str) -> None:
    """Run an asyncssh server executing each session's command with /bin/sh until killed."""
    import asyncio

    import asyncssh

    allowed = asyncssh.read_authorized_keys(authorized_keys)
    home = pwd.getpwnam(user).pw_dir

    class _Server(asyncssh.SSHServer):
        """Accept the one user with the one authorised key, nothing else."""

        def begin_auth(self, username: str) -> bool:
            """Require authentication for everyone."""
            return True

        def password_auth_supported(self) -> bool:
            """Offer no password logins."""
            return False

        def public_key_auth_supported(self) -> bool:
            """Offer public key logins."""
            return True

        def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
            """Accept the authorised key for the expected user only."""
            return username == user and allowed.validate(key, "", "") is not None

        def connection_requested(
            self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
        ) -> bool:
            """Allow TCP forwarding to loopback only (ProxyJump through this server)."""
            return dest_host in ("127.0.0.1", "localhost", "::1")

    class _Sftp(asyncssh.SFTPServer):
        """SFTP as OpenSSH's sftp-server serves it: relative paths start in the login dir."""

        def map_path(self, path: bytes) -> bytes:
            """Resolve a relative path from the user's home directory."""
            return path if path.startswith(b"/") else os.path.join(os.fsencode(home), path)

    async def pump_out(reader: asyncio.StreamReader, writer: asyncssh.SSHWriter) -> None:
        """Copy a child's output to the channel until the child closes it."""
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()

    async def pump_in(reader: asyncssh.SSHReader, writer: asyncio.StreamWriter) -> None:
        """Copy channel input to the child's stdin; close it on EOF."""
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except (OSError, asyncssh.Error):
            pass  # the child closed its stdin or the channel broke: stop feeding
        finally:
            writer.close()

    async def handle(process: asyncssh.SSHServerProcess) -> None:
        """Run one session's command as a child of ours, wired to the channel."""
        command = process.command
        argv = ["/bin/sh", "-c", command] if command is not None else ["/bin/sh"]
        env = {
            "HOME": home,
            "USER": user,
            "LOGNAME": user,
            "SHELL": "/bin/sh",
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        }
        try:
            child = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=home,
                env=env,
            )
        except OSError as exc:
            process.stderr.write(f"cannot run {argv}: {exc}\n".encode())
            process.exit(127)
            return
        assert child.stdin and child.stdout and child.stderr
        feeder = asyncio.ensure_future(pump_in(process.stdin, child.stdin))
        try:
            await asyncio.gather(
                pump_out(child.stdout, process.stdout), pump_out(child.stderr, process.stderr)
            )
        except (OSError, asyncssh.Error):
            # Channel gone: like sshd, close the child's pipes and let it notice
            # (EOF on stdin, EPIPE on output) rather than killing it ourselves.
            transport = child._transport  # asyncio exposes the pipes only here
            for fd in (0, 1, 2):
                pipe = transport.get_pipe_transport(fd)
                if pipe is not None:
                    pipe.close()
        status = await child.wait()
        feeder.cancel()
        if status < 0:
            name = signal.Signals(-status).name.removeprefix("SIG")
            process.exit_with_signal(name)
        else:
            process.exit(status)

    await asyncssh.create_server(
        _Server,
        HOST,
        port,
        server_host_keys=[host_key],
        process_factory=handle,
        encoding=None,
        allow_scp=False,
        sftp_factory=_Sftp,
    )
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    """Command line: `python sshd.py serve ...` runs the asyncssh server in the foreground."""
    import asyncio

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the asyncssh test server")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--host-key", required=True)
    serve.add_argument("--authorized-keys", required=True)
    serve.add_argument("--user", default=getpass.getuser())
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args.port, args.host_key, args.authorized_keys, args.user))
    except OSError as exc:
        # "Address already in use" must reach start(), which then tries another port.
        sys.exit(f"sshd.py: cannot serve on {HOST}:{args.port}: {exc}")


if __name__ == "__main__":
    main()
