# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "asyncssh>=2.14",
#     "typer>=0.28,<0.29",
#     "tqdm>=4.60",
#     "tomli>=1.1; python_version < '3.11'",
# ]
# ///
"""sshfan: run a file of tasks across ordinary SSH machines and merge their results.

The head (this module) opens one SSH connection per host, ships a small
standard-library worker stub over the channel's stdin, streams chunks of tasks to
it and collects each task's result into a durable journal, from which one merged
output file is rendered in task order.

Contents: numbered sections under banners, low level to high (a test keeps this list
and the banners the same). Sections 3 and 4 lie between the BEGIN SHIPPED and END
SHIPPED markers: that text is the worker stub, sent as it is (standard library only,
Python 3.6+). The public API is `__all__`; everything else is internal.

   1. Errors
   2. Hosts config
   3. Wire framing (shipped to the worker: standard library only, Python 3.6+)
   4. Worker stub (shipped: standard library only, Python 3.6+)
   5. Shipping the stub: its source and the bootstrap that starts it
   6. Scheduler (sans-IO)
   7. Host protocol (sans-IO): a stub's frames in, events out; host states
   8. SSH as OpenSSH does it: ssh config, host keys, identities; the receive path
   9. Transports (SSH, local, forked) and HostSession, which drives a host's protocol
  10. Files to and from workers (GNU parallel's --transferfile, --return, --basefile)
  11. Task input: the tasks file, GNU parallel's replacement strings, --pipe chunks
  12. Journal
  13. Merged output: text, jsonl, gathered hosts and --results, from the journal
  14. The run: hosts, scheduler, journal and output together
  15. Python API
  16. Checking hosts
  17. Command line
"""

from __future__ import annotations

import array
import asyncio
import base64
import codecs
import collections
import concurrent.futures
import contextlib
import dataclasses
import enum
import errno
import fcntl
import fnmatch
import functools
import gc
import hashlib
import heapq
import hmac
import io
import itertools
import json
import math
import mmap
import os
import posixpath
import queue
import random
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple, NoReturn

__version__ = "0.1.0"

# The Python API (the README's "Python API" documents exactly these); the rest is internal.
__all__ = [
    "HostSpec",
    "RunError",
    "SshfanError",
    "TaskResult",
    "UsageError",
    "load_hosts",
    "main",
    "run_tasks",
    "run_tasks_async",
]

# ============================================================================
# 1. Errors
# ============================================================================


class SshfanError(Exception):
    """Base of every error sshfan reports to a person (never shown as a traceback)."""

    exit_code = 3


class UsageError(SshfanError):
    """A user's input is wrong: bad option, hosts file or tasks file (exit 2)."""

    exit_code = 2


class TasksChangedError(SshfanError):
    """The tasks file changed while the run read it: the run cannot vouch for it (exit 3)."""


class HostError(SshfanError):
    """A host failed at a named stage: connect, auth, host key, bootstrap, protocol."""

    def __init__(self, host: str, stage: str, message: str) -> None:
        """Remember which host failed, at which stage, and why."""
        super().__init__(f"{host}: {stage}: {message}")
        self.host = host
        self.stage = stage
        self.reason = message


# ============================================================================
# 2. Hosts config
# ============================================================================

# The most slots a host may have: Linux's largest pid_max (PID_MAX_LIMIT, 2**22), as a
# host cannot run more tasks at once than it can have processes. Beyond it a slot count
# is a typo, and one past sys.maxsize cannot even index the head's tables.
SLOTS_MAX = 4 * 1024 * 1024

_HOST_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "address": (str,),
    "user": (str,),
    "port": (int,),
    "identity": (str, list),
    "known_hosts": (str, bool),
    "python": (str,),
    "slots": (int, str),
    "connect_timeout": (int, float),
    "keepalive": (int, float),
    "local": (bool,),
    "env": (dict,),
    "workdir": (str,),
    "shell": (str,),
}
_DEFAULT_ONLY_FORBIDDEN = {"name"}


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """One worker host as the hosts file describes it (immutable)."""

    name: str
    address: str | None = None
    user: str | None = None
    port: int | None = None
    identity: tuple[str, ...] | None = None
    known_hosts: str | bool | None = None  # None: OpenSSH's default files
    python: str = "python3"
    slots: int | None = None  # None: "auto", the CPU count the stub reports
    connect_timeout: float = 10.0
    keepalive: float = 15.0  # seconds a silent (frozen) host has before it counts as lost
    local: bool = False
    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None  # None: the login directory (remote), the current one (local)
    shell: str = "/bin/sh"  # what runs each task as SHELL -c TASK
    make_workdir: bool = False  # create the workdir if missing (--workdir, as parallel)
    # -j +N, -N or N% (GNU parallel's): slots from the CPUs the stub reports, as "auto"
    cpu_slots: str | None = None


LOCAL_LANES = 4  # stubs at most for one local host (see lanes)


def local_host(slots: int | None = None) -> HostSpec:
    """The default host: this machine, no SSH, one slot per CPU."""
    return HostSpec(name="local", local=True, python=sys.executable, slots=slots)


def local_cpus() -> int:
    """This machine's CPUs as a local host's "auto" slots count them (those we may run on)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def slots_for_cpus(rule: str, cpus: int) -> int:
    """The slots GNU parallel's -j RULE gives a host of CPUS: +N more, -N fewer or N% of
    them (rounded up, as parallel does), and at least one."""
    percent = rule.endswith("%")
    slots = math.ceil(cpus * float(rule[:-1]) / 100) if percent else cpus + int(rule)
    return max(1, min(SLOTS_MAX, slots))


def lanes(spec: HostSpec, tasks: int | None = None, in_order: bool = False) -> list[HostSpec]:
    """The stubs that serve one host: one for an SSH host, up to LOCAL_LANES for a local one
    (one with IN_ORDER: the run needs its tasks started in file order, over slots numbered
    as GNU parallel numbers them).

    A stub starts its tasks one at a time, and each start holds it until the child has
    exec'd (0.1-0.35 ms here), so one stub tops out near 2,000 tasks a second whatever
    the CPU count. Locally another stub costs only a Python start-up, so a local host's
    slots are spread over several (no more than the run's TASKS: a stub with nothing to
    do is a start-up paid for nothing); they share the host's name in every report.
    Each stub holds a run of consecutive tasks queued ahead, so over several stubs tasks
    start out of file order and a stub numbers only its own block of slots: a --halt
    would stop other tasks than parallel's, and {%} would differ from parallel's."""
    if not spec.local:
        return [spec]
    slots = spec.slots or local_cpus()
    count = max(1, min(LOCAL_LANES, slots, LOCAL_LANES if tasks is None else tasks))
    if in_order:
        count = 1
    return [
        dataclasses.replace(spec, slots=slots // count + (i < slots % count)) for i in range(count)
    ]


def _key_line(text: str, table: str, index: int, key: str | None) -> int | None:
    """Best-effort line number of KEY in the INDEX-th TABLE of a TOML text."""
    seen = -1
    inside = table == ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("["):
            header = line.split("#", 1)[0].strip()
            if header in (f"[[{table}]]", f"[{table}]"):
                seen += 1
                inside = seen == index
                if inside and key is None:
                    return number
            else:
                inside = False
            continue
        if inside and key and line.split("=", 1)[0].strip().strip("\"'") == key:
            return number
    return None


# What OpenSSH's ssh refuses as the host and user it is given (ssh.c, valid_hostname and
# valid_ruser): a name that would read as an option, whitespace, control characters, shell
# metacharacters. sshfan refuses them too, before anything runs, rather than try to connect.
_SSH_REFUSED = r"\x00-\x1f\x7f'`\";&<>|(){}"  # (the inside of a character class)
_SSH_BAD_HOST = re.compile(rf"^-|[\s$\\{_SSH_REFUSED}]")
_SSH_BAD_USER = re.compile(rf"^-|[{_SSH_REFUSED}]|\s-|\\$")
# The same for -S and --slf, where ',' parts sshlogins and '[...]' is a range.
_SSHLOGIN_BAD_HOST = re.compile(rf"^-|[$\\,\[\]{_SSH_REFUSED}]")
_SSHLOGIN_BAD_USER = re.compile(rf"^-|[{_SSH_REFUSED}]")


def _check_value(where: str, key: str, value: Any, text: str, table: str, index: int) -> Any:
    """Validate one hosts-file value's type and range; return it normalised."""

    def fail(problem: str) -> NoReturn:
        line = _key_line(text, table, index, key)
        at = f"{where}:{line}" if line else where
        raise UsageError(f"{at}: key '{key}' {problem}")

    if key not in _HOST_KEYS:
        fail("is not a known key (known: " + ", ".join(sorted(_HOST_KEYS)) + ")")
    types = _HOST_KEYS[key]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = " or ".join("table" if t is dict else t.__name__ for t in types)
        fail(f"must be {names}, not {type(value).__name__} {value!r}")
    if key == "port" and not 0 < value < 65536:
        fail(f"must be a TCP port (1-65535), not {value}")
    if key == "slots":
        if isinstance(value, str) and value != "auto":
            fail(f'must be a positive integer or "auto", not {value!r}')
        if isinstance(value, int) and value < 1:
            fail(f"must be at least 1, not {value}")
        if isinstance(value, int) and value > SLOTS_MAX:
            fail(f"must be at most {SLOTS_MAX} (Linux's largest pid_max), not {value}")
    if key in ("connect_timeout", "keepalive") and not (math.isfinite(value) and value > 0):
        fail(f"must be a positive, finite number of seconds, not {value}")
    if key == "known_hosts" and value is True:
        fail("must be a path or false (true is the default; leave it out)")
    if (
        key == "identity"
        and isinstance(value, list)
        and not all(isinstance(v, str) for v in value or [0])
    ):
        fail("must be a path or a non-empty list of paths")
    if key == "env" and not all(isinstance(v, str) for v in value.values()):
        fail("must be a table of string values")
    if key == "env":
        for name, setting in value.items():
            if not name or "=" in name or "\0" in name:
                fail(f"has variable {name!r}: a name must not be empty or contain '=' or NUL")
            if "\0" in setting:
                fail(f"has variable {name!r} whose value contains a NUL character")
    if key in ("name", "python", "shell") and not value.strip():
        fail("must not be empty")
    if key in ("identity", "known_hosts") and (
        value == "" or isinstance(value, list) and "" in value
    ):
        fail("must not be an empty path")
    if key == "name" and any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value):
        fail(f"must not contain control characters (tab, newline, escape): {value!r}")
    if key == "address" and _SSH_BAD_HOST.search(value):
        fail(f"{value!r} is not a host name ssh accepts (a leading '-', spaces, ';$`|&...')")
    if key == "user" and _SSH_BAD_USER.search(value):
        fail(f"{value!r} is not a user name ssh accepts (a leading '-', ';$`|&...')")
    return value


def _make_spec(values: dict[str, Any], own_python: bool) -> HostSpec:
    """Turn validated hosts-file values into a HostSpec."""
    fields: dict[str, Any] = dict(values)
    if "identity" in fields:
        ident = fields["identity"]
        fields["identity"] = (ident,) if isinstance(ident, str) else tuple(ident)
    if "slots" in fields and fields["slots"] == "auto":
        fields["slots"] = None
    if "env" in fields:
        fields["env"] = tuple(sorted(fields["env"].items()))
    if "connect_timeout" in fields:
        fields["connect_timeout"] = float(fields["connect_timeout"])
    if "keepalive" in fields:
        fields["keepalive"] = float(fields["keepalive"])
    if fields.get("local") and not own_python:  # a local host runs sshfan's own Python
        fields["python"] = sys.executable
    return HostSpec(**fields)


def _toml() -> Any:
    """The TOML parser, imported on first use: a run without a hosts file reads no TOML."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised only on Python 3.10
        import tomli as tomllib
    return tomllib


def parse_hosts(
    text: str, where: str = "hosts file", logins: list[dict[str, Any]] | None = None
) -> list[HostSpec]:
    """Parse a hosts file's TOML text into host specs, or raise UsageError naming the spot;
    LOGINS (hosts from the command line, as values) follow, with the file's [defaults]."""
    tomllib = _toml()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{where}: not valid TOML: {exc}") from None
    for top in doc:
        if top not in ("defaults", "hosts"):
            line = _key_line(text, "", 0, top) or _key_line(text, top, 0, None)
            at = f"{where}:{line}" if line else where
            raise UsageError(
                f"{at}: unknown top-level key '{top}' (expected [defaults], [[hosts]])"
            )
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UsageError(f"{where}: 'defaults' must be a table: [defaults]")
    hosts = doc.get("hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, dict) for h in hosts):
        raise UsageError(f"{where}: 'hosts' must be an array of tables: [[hosts]]")
    if not hosts and not logins:
        raise UsageError(f"{where}: no hosts: add at least one [[hosts]] table with a name")
    base: dict[str, Any] = {}
    for key, value in defaults.items():
        if key in _DEFAULT_ONLY_FORBIDDEN:
            line = _key_line(text, "defaults", 0, key)
            at = f"{where}:{line}" if line else where
            raise UsageError(f"{at}: key '{key}' belongs in a [[hosts]] table, not [defaults]")
        base[key] = _check_value(where, key, value, text, "defaults", 0)
    specs: list[HostSpec] = []
    names: set[str] = set()
    for index, host in enumerate(hosts):
        values = dict(base)
        for key, value in host.items():
            values[key] = _check_value(where, key, value, text, "hosts", index)
        line = _key_line(text, "hosts", index, None)
        at = f"{where}:{line}" if line else where
        if "name" not in values:
            raise UsageError(f"{at}: [[hosts]] number {index + 1} has no 'name'")
        if values["name"] in names:
            raise UsageError(f"{at}: duplicate host name '{values['name']}'")
        if host.get("local") and "address" in host:
            raise UsageError(f"{at}: host '{values['name']}' is local and cannot have 'address'")
        for key in ("user", "port", "identity", "known_hosts"):
            # Only SSH reads these: set on a local host's own table, they are a mistake
            # (in [defaults] they are for the SSH hosts beside it).
            if values.get("local") and key in host:
                key_line = _key_line(text, "hosts", index, key) or line
                raise UsageError(
                    f"{where}:{key_line}: key '{key}' is for SSH, and host "
                    f"'{values['name']}' is local (no SSH)"
                )
        bare = not values.get("local") and "address" not in values  # the name is the address
        if bare and _SSH_BAD_HOST.search(values["name"]):
            name_line = _key_line(text, "hosts", index, "name") or line
            raise UsageError(
                f"{where}:{name_line}: key 'name' {values['name']!r} is not a host name ssh "
                "accepts (a leading '-', spaces, ';$`|&...'): give the host an 'address'"
            )
        for each in _expand_host(values, at):
            if each["name"] in names:
                raise UsageError(f"{at}: duplicate host name '{each['name']}'")
            names.add(each["name"])
            specs.append(_make_spec(each, own_python="python" in host))
    for login in logins or []:
        if login["name"] in names:
            raise UsageError(f"host '{login['name']}' is both in {where} and on the command line")
        specs.append(_make_spec({**base, **login}, own_python="python" in login))
    return specs


def _expand_host(values: dict[str, Any], at: str) -> list[dict[str, Any]]:
    """One [[hosts]] table as the hosts its ranges name: `name = "web[01-12]"` is twelve
    hosts; an `address` range pairs with the name's, a plain address serves them all."""
    expanded: dict[str, list[str]] = {}
    for key in ("name", "address"):
        if key in values:
            try:
                expanded[key] = expand_range(values[key])
            except ValueError as exc:
                raise UsageError(
                    f"{at}: key '{key}': bad range in {values[key]!r}: {exc}"
                ) from None
    names = expanded["name"]
    addresses = expanded.get("address", [])
    if len(addresses) > 1 and len(addresses) != len(names):
        raise UsageError(
            f"{at}: key 'address' names {len(addresses)} hosts but 'name' {len(names)}; "
            "a range in 'address' needs one of the same size in 'name'"
        )
    hosts = []
    for index, name in enumerate(names):
        each = {**values, "name": name}
        if addresses:
            each["address"] = addresses[index if len(addresses) > 1 else 0]
        hosts.append(each)
    return hosts


def load_hosts(
    path: str | os.PathLike[str], logins: list[dict[str, Any]] | None = None
) -> list[HostSpec]:
    """Read and parse a hosts file (then LOGINS, see parse_hosts), turning every reading
    problem into a UsageError."""
    try:
        with _reading(path, "hosts file"):
            text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read hosts file: {exc.strerror}") from None
    return parse_hosts(text, str(path), logins)


# -- hosts on the command line: ranges, GNU parallel's sshlogins, picking a subset ------

RANGE_MAX = 100_000  # names one range may expand to: a typo like [1-1000000] is refused


def expand_range(text: str) -> list[str]:
    """Expand ClusterShell/pdsh ranges: `web[01-12]` (padding kept), `db[1,3,5-7]`, and
    several brackets (`r[1-2]n[1-3]`, left varies slowest); ValueError says where it is bad."""
    pieces: list[list[str]] = []
    literal = ""
    at = 0
    while at < len(text):
        char = text[at]
        if char == "]":
            raise ValueError(f"at character {at + 1}: ']' without '['")
        if char != "[":
            literal += char
            at += 1
            continue
        end = text.find("]", at)
        if end < 0:
            raise ValueError(f"at character {at + 1}: '[' without ']'")
        pieces.append([literal])
        literal = ""
        pieces.append(_range_values(text[at + 1 : end], at + 2))
        at = end + 1
    pieces.append([literal])
    total = math.prod(len(p) for p in pieces)
    if total > RANGE_MAX:
        raise ValueError(f"expands to {total} names, more than {RANGE_MAX}")
    return ["".join(parts) for parts in itertools.product(*pieces)]


def _range_values(inner: str, column: int) -> list[str]:
    """The values of one bracket's contents (`01-12`, `1,3,5-7`, `1-9/2`) at COLUMN."""
    values: list[str] = []
    for item in inner.split(","):
        where = f"at character {column}"
        column += len(item) + 1
        match = re.fullmatch(r"(\d+)(?:-(\d+)(?:/(\d+))?)?", item.strip())
        if not match:
            what = f"'{item}'" if item else "an empty item"
            raise ValueError(f"{where}: {what} is not a number or a range like 1-5 or 01-12")
        first, last, step = match.group(1), match.group(2), match.group(3)
        width = len(first) if first.startswith("0") else 1
        if last is None:
            values.append(first)
            continue
        if int(last) < int(first):
            raise ValueError(f"{where}: range {first}-{last} goes backwards")
        if step is not None and int(step) < 1:
            raise ValueError(f"{where}: step {step} must be at least 1")
        span = range(int(first), int(last) + 1, int(step or 1))
        if len(values) + len(span) > RANGE_MAX:
            raise ValueError(f"{where}: range {first}-{last} has more than {RANGE_MAX} values")
        values.extend(str(number).zfill(width) for number in span)
    return values


def split_outside_brackets(text: str) -> list[str]:
    """Split a list on commas and newlines, but not inside `[...]` (`web[1,3],db1`)."""
    parts = [""]
    depth = 0
    for char in text:
        depth += char == "["
        depth -= char == "]" and depth > 0
        if char in ",\n" and not depth:
            parts.append("")
        else:
            parts[-1] += char
    return [part.strip() for part in parts if part.strip()]


def _ssh_prefix(words: list[str], where: str) -> dict[str, Any]:
    """Host keys from an sshlogin's `ssh -p PORT -l USER -i KEY` prefix; refuse the rest."""
    if os.path.basename(words[0]) != "ssh":
        raise UsageError(
            f"{where}: runs '{words[0]}': sshfan speaks SSH itself and cannot use another "
            "program; put its settings in ~/.ssh/config or the hosts file"
        )
    values: dict[str, Any] = {}
    flags = {"-p": "port", "-l": "user", "-i": "identity"}
    rest = words[1:]
    while rest:
        flag = rest.pop(0)
        if flag not in flags or not rest:
            raise UsageError(
                f"{where}: ssh option '{flag}' is not supported here (only -p, -l and -i; "
                "put others in ~/.ssh/config)"
            )
        values[flags[flag]] = rest.pop(0)
    if "identity" in values:
        values["identity"] = (values["identity"],)
    return values


def parse_sshlogin(text: str, where: str) -> list[dict[str, Any]]:
    """One GNU parallel sshlogin, `[N/][user@]host[:port]` or `[N/]:` for this machine (with
    ranges), as hosts-file values named as written; UsageError (exit 2) names WHERE."""
    login = text.strip()
    values: dict[str, Any] = {}
    if login.startswith("@"):
        raise UsageError(
            f"{where}: '{login}': host groups (@group/) are not supported; "
            "pick hosts with --only/--exclude"
        )
    slots = re.match(r"(\d+)/", login)
    if slots:
        if int(slots.group(1)) < 1:
            raise UsageError(f"{where}: '{login}': slots must be at least 1, not 0")
        if int(slots.group(1)) > SLOTS_MAX:
            raise UsageError(
                f"{where}: '{login}': slots must be at most {SLOTS_MAX} (Linux's largest pid_max)"
            )
        values["slots"] = int(slots.group(1))
        login = login[slots.end() :]
    if login == ":":
        return [{**values, "name": ":", "local": True}]
    words = login.split()
    if len(words) > 1:
        values.update(_ssh_prefix(words[:-1], f"{where}: '{text.strip()}'"))
        login = words[-1]
    user, at, host = login.rpartition("@")
    if at:
        if ":" in user:
            raise UsageError(
                f"{where}: '{login}': passwords are not supported; use a key or ssh-agent"
            )
        values["user"] = user
    port = ""
    ipv6 = re.fullmatch(r"\[([0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%[\w.-]+)?)\](?::(\w+))?", host)
    if ipv6:
        hosts, port = [ipv6.group(1)], ipv6.group(2) or ""
    elif host.count(":") >= 2:  # a bare IPv6 address has no port
        hosts = [host]
    else:
        host, colon, port = host.partition(":")
        if colon and not port:
            raise UsageError(f"{where}: '{login}': ':' without a port")
        try:
            hosts = expand_range(host)
        except ValueError as exc:
            raise UsageError(f"{where}: '{login}': bad range in '{host}': {exc}") from None
    if not all(hosts) or any(re.search(r"[\s@/]", name) for name in hosts):
        raise UsageError(f"{where}: '{text.strip()}' is not [N/][user@]host[:port]")
    # As OpenSSH's ssh refuses them on its command line (valid_hostname, valid_ruser): a
    # name that would read as an option, or shell metacharacters; and an IPv6 address
    # that is not one (`[::1`, `h:22:33`), which parallel cannot parse either.
    for name in hosts:
        ipv6_like = ipv6 or name.count(":") >= 2
        if ipv6_like and not re.fullmatch(r"[0-9A-Fa-f:.]+(%[\w.-]+)?", name):
            raise UsageError(f"{where}: '{text.strip()}': '{name}' is not an IPv6 address")
        if _SSHLOGIN_BAD_HOST.search(name):
            raise UsageError(f"{where}: '{text.strip()}': host name '{name}' is not valid")
    if at and _SSHLOGIN_BAD_USER.search(user):
        raise UsageError(f"{where}: '{text.strip()}': user name '{user}' is not valid")
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"{where}: '{login}': port must be 1-65535, not '{port}'")
        values["port"] = int(port)
    elif "port" in values:
        if not str(values["port"]).isdigit() or not 0 < int(values["port"]) < 65536:
            raise UsageError(f"{where}: port must be 1-65535, not '{values['port']}'")
        values["port"] = int(values["port"])
    prefix = f"{user}@" if at else ""
    suffix = f":{port}" if port else ""
    if len(words) > 1:  # named as written, ssh command and all
        head = " ".join(words[:-1]) + " "
        prefix = head + prefix
    shown = "[{}]" if ipv6 else "{}"
    return [
        {**values, "name": prefix + shown.format(name) + suffix, "address": name} for name in hosts
    ]


def parse_sshlogins(text: str, where: str) -> list[dict[str, Any]]:
    """A -S value: sshlogins separated by commas or newlines (commas in ranges stay)."""
    logins: list[dict[str, Any]] = []
    for part in split_outside_brackets(text):
        if part in ("..", "-"):
            logins += read_sshloginfile(part)
        else:
            logins += parse_sshlogin(part, where)
    return logins


def sshloginfile_path(name: str) -> str:
    """Where GNU parallel finds an sshloginfile: `..` is the one in its config dir, `.` the
    system's, and a name not found here is looked for in its first config dir."""
    if name == ".":
        return "/etc/parallel/sshloginfile"
    if name == "..":
        return os.path.join(_parallel_config_dirs()[0], "sshloginfile")
    if name != "-" and not os.path.exists(name):
        fallback = os.path.join(_parallel_config_dirs()[0], name)
        if os.path.exists(fallback):
            return fallback
    return name


def _parallel_config_dirs() -> list[str]:
    """GNU parallel's config dirs, first first: those of $PARALLEL_HOME,
    $XDG_CONFIG_HOME/parallel, each $XDG_CONFIG_DIRS/parallel and ~/.parallel that exist
    (~/.parallel if none does)."""
    env = os.environ
    candidates = [env.get("PARALLEL_HOME", "")]
    # (An unset XDG_CONFIG_HOME is parallel's "/parallel", not ~/.config/parallel.)
    system = env.get("XDG_CONFIG_DIRS", "").rstrip(":")
    for base in [env.get("XDG_CONFIG_HOME", ""), *(system.split(":") if system else [])]:
        candidates.append(f"{base}/parallel")
    home = os.path.expanduser("~/.parallel")
    found = [path for path in [*candidates, home] if path and os.path.isdir(path)]
    return found or [home]


def read_sshloginfile(name: str) -> list[dict[str, Any]]:
    """Read GNU parallel's sshloginfile format: an sshlogin a line, `#` comments, blanks."""
    path = sshloginfile_path(name)
    try:
        if path == "-":
            _stdin()  # (closed: a usage error)
            text = sys.stdin.read()
        else:
            with _reading(path, "sshloginfile"):
                text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read sshloginfile: {exc.strerror}") from None
    logins: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            for part in split_outside_brackets(line):
                logins += parse_sshlogin(part, f"{path}:{number}")
    return logins


def _matches(name: str, patterns: list[str]) -> bool:
    """Whether NAME matches one of the glob PATTERNS (whose `[...]` are ranges, as in -S)."""
    for pattern in patterns:
        for each in expand_range(pattern):
            if fnmatch.fnmatchcase(name, each.replace("[", "[[]")):
                return True
    return False


def pick_hosts(specs: list[HostSpec], only: list[str], exclude: list[str]) -> list[HostSpec]:
    """Keep the hosts that --only names (all if none) and --exclude does not; exit 2 if none."""
    picked: list[HostSpec] = []
    for option, patterns in (("--only", only), ("--exclude", exclude)):
        for pattern in patterns:
            try:
                expand_range(pattern)
            except ValueError as exc:
                raise UsageError(f"{option} '{pattern}': bad range: {exc}") from None
    for spec in specs:
        if only and not _matches(spec.name, only):
            continue
        if exclude and _matches(spec.name, exclude):
            continue
        picked.append(spec)
    if not picked:
        chosen = " ".join(
            [*(f"--only '{p}'" for p in only), *(f"--exclude '{p}'" for p in exclude)]
        )
        names = ", ".join(spec.name for spec in specs[:10]) + (", ..." if len(specs) > 10 else "")
        raise UsageError(f"{chosen}: no host left (hosts: {names})")
    return picked


@dataclasses.dataclass
class HostSources:
    """Where a run's hosts come from: a hosts file, -S sshlogins, sshloginfiles, a subset."""

    hosts_file: str | None = None
    sshlogins: list[str] = dataclasses.field(default_factory=list)
    sshloginfiles: list[str] = dataclasses.field(default_factory=list)
    only: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)

    def split_patterns(self) -> None:
        """Let --only/--exclude be given comma-separated as well as repeated."""
        self.only = [p for value in self.only for p in split_outside_brackets(value)]
        self.exclude = [p for value in self.exclude for p in split_outside_brackets(value)]

    def files(self) -> list[str]:
        """The files the hosts are read from (stdin and parallel's shorthands resolved)."""
        names = [self.hosts_file] if self.hosts_file else []
        names += [sshloginfile_path(name) for name in self.sshloginfiles]
        return [name for name in names if name != "-"]

    def signature(self) -> tuple[tuple[str, int, int, int], ...]:
        """What tells that a hosts file changed: its inode, mtime and size (-1: missing)."""
        marks = []
        for name in self.files():
            try:
                info = os.stat(name)
                marks.append((name, info.st_ino, info.st_mtime_ns, info.st_size))
            except OSError:
                marks.append((name, -1, -1, -1))
        return tuple(marks)


def load_host_sources(sources: HostSources) -> list[HostSpec]:
    """The hosts a command runs on: the hosts file's, then -S's, then --slf's (the file's
    [defaults] apply to all), narrowed by --only/--exclude; this machine if none is given."""
    sources.split_patterns()
    logins: list[dict[str, Any]] = []
    for value in sources.sshlogins:
        logins += parse_sshlogins(value, "-S")
    for name in sources.sshloginfiles:
        logins += read_sshloginfile(name)
    # The same sshlogin twice is one host, as in GNU parallel (a later N/ wins).
    merged: dict[str, dict[str, Any]] = {}
    for login in logins:
        merged[login["name"]] = {**merged.get(login["name"], {}), **login}
    if sources.hosts_file:
        specs = load_hosts(sources.hosts_file, list(merged.values()))
    elif merged:
        specs = [_make_spec(values, own_python=False) for values in merged.values()]
    elif sources.sshlogins and not sources.sshloginfiles:
        # As GNU parallel ("Cannot run any jobs"): an empty -S "$HOSTS" is a mistake, and
        # running the tasks on this machine instead would be a surprise.
        given = " ".join(repr(value) for value in sources.sshlogins)
        raise UsageError(f"-S {given}: no hosts given (':' is this machine)")
    else:
        specs = [local_host()]
    return pick_hosts(specs, sources.only, sources.exclude)


# >>>>>>>> BEGIN SHIPPED: sent to workers as is (standard library only, Python 3.6+) >>>>>>>>

# ============================================================================
# 3. Wire framing (shipped to the worker: standard library only, Python 3.6+)
# ============================================================================
# A frame is MAGIC (4 bytes), KIND (1 byte), LENGTH (4 bytes, big-endian), then
# LENGTH bytes of payload. Payloads:
#
# | kind    | dir         | payload                                                |
# |---------|-------------|--------------------------------------------------------|
# | HELLO   | stub → head | JSON: proto, python, cpus, hostname, pid               |
# | CONFIG  | head → stub | a Python literal (encode_config): slots, timeout, env, |
# |         |             | workdir, make_workdir, shell, hold, slot_base, host    |
# | TASKS   | head → stub | repeated (seq u64, command length u32, stdin length    |
# |         |             | u32, command, stdin bytes: empty means /dev/null)      |
# | PING    | head → stub | opaque bytes, answered by PONG with the same bytes     |
# | OUTPUT  | stub → head | seq u64, stream u8 (1 stdout, 2 stderr), bytes         |
# | RESULT  | stub → head | seq u64, status i32, flags u8, slot u32, duration f64, |
# |         |             | stdout length u32, stderr length u32, stdout, stderr   |
# | ERROR   | stub → head | UTF-8 text: the stub cannot go on                      |
# | DROP    | head → stub | forget the tasks not started yet ("halt"; "kill" kills |
# |         |             | the running ones too), or start what free slots take,  |
# |         |             | then forget the rest (empty)                           |
# | DROPPED | stub → head | JSON list of the seqs it forgot                        |
# | RELEASE | head → stub | seq u64: the head has seen that task's result and does |
# |         |             | not halt; a stub holding for it (CONFIG's hold) goes on |
# | INPUT   | head → stub | seq u64, bytes: the first part of the stdin of a task  |
# |         |             | whose TASKS entry follows (a --pipe chunk too large    |
# |         |             | for one frame goes in several; the entry has the rest) |
# | CANCEL  | head → stub | seq u64: kill that task (a --speculate copy that lost);|
# |         |             | its RESULT comes flagged CANCELLED, at once if queued  |
# | PARTS   | head → stub | NUL-separated absolute paths: the temporary files the  |
# |         |             | head is writing over SFTP now (all of them, each time);|
# |         |             | the stub removes them if the head goes away first      |
#
# Bytes before the first frame (a login banner from the worker's shell start-up
# files) are skipped; after it, anything that is not a frame is a protocol error.

FRAME_MAGIC = b"\xa5SF1"
FRAME_HEADER = struct.Struct(">4sBI")
# Large enough for a batch of tasks or a 256 KiB output piece with room to spare,
# small enough that a corrupt length cannot make either end allocate gigabytes.
FRAME_MAX = 8 * 1024 * 1024
BANNER_MAX = 64 * 1024  # login-banner bytes skipped before a stub that never frames fails
OUTPUT_PIECE = 256 * 1024  # a task's output moves in pieces this size: memory stays flat
COLLECT_FROM = 64 * 1024  # payloads from this size are collected piecewise (FrameDecoder)
FLUSH_DELAY = 0.005  # seconds the stub may hold finished results to send them together
WARDEN_NAP = 0.05  # seconds the warden sleeps between reads: it only acts once at the end
KILL_GRACE = 2.0  # seconds a killed task's pipes may stay open before the stub closes them
# The longest one wait in the stub's loop: epoll takes milliseconds in a C int (24.8 days),
# and a --timeout may be longer; the loop wakes, finds nothing due, and waits again.
SELECT_WAIT_MAX = 3600.0
# Seconds the stub waits, when the head went away mid-upload, before it removes the
# upload's file once more: SFTP requests sent just before the head died may still
# reach the worker's SFTP server, and create the file again, after the stub's EOF.
PARTS_SETTLE = 1.0
PROTO_VERSION = 1  # sent in HELLO: the head refuses a stub of another version

KIND_HELLO = 1
KIND_CONFIG = 2
KIND_TASKS = 3
KIND_PING = 5
KIND_PONG = 6
KIND_OUTPUT = 7
KIND_RESULT = 8
KIND_ERROR = 9
KIND_DROP = 10
KIND_DROPPED = 11
KIND_INPUT = 12
KIND_RELEASE = 13
KIND_CANCEL = 14
KIND_PARTS = 15
KIND_DONE = 20  # journal only: a finished task's record
KIND_JOURNAL = 21  # journal only: the header record
KIND_HOSTS = 22  # journal only: --onall's host list, grown by hosts that joined mid-run

TASK_HEAD = struct.Struct(">QII")
INPUT_HEAD = struct.Struct(">Q")
INPUT_PIECE = 1024 * 1024  # stdin bytes per INPUT frame (well under FRAME_MAX)
OUTPUT_HEAD = struct.Struct(">QB")
RESULT_HEAD = struct.Struct(">QiBIdII")
STUB_STAGES = ("workdir", "shell")  # stages a stub's ERROR may name (StubStopError)
FLAG_TIMED_OUT = 1
FLAG_CANCELLED = 2


class FrameError(ValueError):
    """The byte stream is not valid sshfan framing (corrupt, oversized, or no stub)."""


def encode_frame(kind: int, payload: bytes) -> bytes:
    """Encode one frame: header then payload."""
    if len(payload) > FRAME_MAX:
        raise FrameError(f"frame of {len(payload)} bytes exceeds the {FRAME_MAX}-byte cap")
    return FRAME_HEADER.pack(FRAME_MAGIC, kind, len(payload)) + payload


class FrameDecoder:
    """Turn bytes arriving in pieces of any size into (kind, payload) frames."""

    def __init__(self, skip_banner: bool = True, parts_of: int = -1) -> None:
        """Start empty; with skip_banner, text before the first frame is tolerated.

        A large frame of kind PARTS_OF comes out as the list of pieces it arrived in,
        not joined: its reader can write them out with one writev and no copy."""
        self._buf = bytearray()
        self.parts_of = parts_of
        self._synced = not skip_banner
        self.banner = b""
        # A large payload is collected as the pieces it arrives in and joined once whole:
        # one copy of each byte, where growing the buffer and slicing it out cost two.
        self._parts = []
        self._need = 0  # bytes still missing from that payload
        self._have = 0  # bytes of it collected so far
        self._kind = 0

    def feed(self, data: bytes) -> list:
        """Add bytes; return the frames now complete, as (kind, payload) pairs."""
        frames = []
        if self._need:
            data = self._collect(bytes(data) if isinstance(data, bytearray) else data, frames)
            if not data:
                return frames
        buf = self._buf
        buf += data
        if not self._synced:
            at = buf.find(FRAME_MAGIC)
            if at < 0:
                keep = len(FRAME_MAGIC) - 1
                if len(buf) > keep:
                    self.banner = (self.banner + bytes(buf[: len(buf) - keep]))[-BANNER_MAX:]
                    del buf[: len(buf) - keep]
                if len(self.banner) >= BANNER_MAX:
                    raise FrameError(f"no sshfan frame in the first {BANNER_MAX} bytes")
                return frames
            self.banner = (self.banner + bytes(buf[:at]))[-BANNER_MAX:]
            del buf[:at]
            self._synced = True
        pos = 0
        size = len(buf)
        header = FRAME_HEADER.size
        with memoryview(buf) as view:  # one copy per payload (a bytearray slice is another)
            while size - pos >= header:
                magic, kind, length = FRAME_HEADER.unpack_from(buf, pos)
                if magic != FRAME_MAGIC:
                    raise FrameError(f"corrupt frame: bad magic {bytes(magic)!r}")
                if length > FRAME_MAX:
                    raise FrameError(f"frame of {length} bytes exceeds the {FRAME_MAX}-byte cap")
                start = pos + header
                if size - start < length:
                    if length >= COLLECT_FROM:
                        self._kind = kind
                        self._parts = [bytes(view[start:size])]
                        self._have = size - start
                        self._need = length - self._have
                        pos = size
                    break
                frames.append((kind, bytes(view[start : start + length])))
                pos = start + length
        if pos:
            del buf[:pos]
        return frames

    def _collect(self, data: Any, frames: list) -> Any:
        """Take what the large payload still needs from DATA (a view, not a copy);
        complete its frame if it can; return the rest of DATA."""
        view = memoryview(data)
        take = min(len(view), self._need)
        self._parts.append(view[:take])
        self._need -= take
        self._have += take
        if not self._need:
            parts = self._parts
            frames.append((self._kind, parts if self._kind == self.parts_of else b"".join(parts)))
            self._parts = []
            self._have = 0
        return view[take:]

    def pending(self) -> int:
        """How many bytes are buffered towards an incomplete frame."""
        return len(self._buf) + self._have


def encode_tasks(tasks: list) -> bytes:
    """Encode (seq, command bytes[, stdin bytes]) tuples as one TASKS payload."""
    parts = []
    for entry in tasks:
        seq, command = entry[0], entry[1]
        data = entry[2] if len(entry) > 2 else b""
        parts.append(TASK_HEAD.pack(seq, len(command), len(data)))
        parts.append(command)
        parts.append(data)
    return b"".join(parts)


def decode_tasks(payload: bytes) -> list:
    """Decode a TASKS payload into (seq, command bytes, stdin bytes) tuples."""
    tasks = []
    pos = 0
    while pos < len(payload):
        seq, length, data_length = TASK_HEAD.unpack_from(payload, pos)
        pos += TASK_HEAD.size
        end = pos + length + data_length
        if end > len(payload):
            raise FrameError(f"truncated task {seq} in TASKS frame")
        tasks.append((seq, payload[pos : pos + length], payload[pos + length : end]))
        pos = end
    return tasks


def encode_result(
    seq: int, status: int, flags: int, duration: float, out: bytes, err: bytes, slot: int = 0
) -> bytes:
    """Encode one RESULT payload (the tail of the task's output travels with it)."""
    head = RESULT_HEAD.pack(seq, status, flags, slot, duration, len(out), len(err))
    return head + out + err


def decode_result(payload: bytes) -> tuple:
    """Decode a RESULT payload into (seq, status, flags, duration, stdout, stderr, slot)."""
    seq, status, flags, slot, duration, n_out, n_err = RESULT_HEAD.unpack_from(payload, 0)
    start = RESULT_HEAD.size
    if start + n_out + n_err != len(payload):
        raise FrameError(f"RESULT frame for task {seq} has inconsistent lengths")
    out = payload[start : start + n_out]
    err = payload[start + n_out :]
    return seq, status, flags, duration, out, err, slot


# CONFIG's values: what a Python literal of these types says, any Python 3 reads back.
CONFIG_TYPES = (dict, list, str, int, float, bool, type(None))
# The names in a float's repr that are not literals (`--timeout inf`): what they mean.
CONFIG_NAMES = {"inf": float("inf"), "nan": float("nan")}


def encode_config(config: dict) -> bytes:
    """CONFIG's payload: CONFIG as a Python literal, so that the stub reads it without
    the json module (which, through re and enum, was a sixth of a stub's start).

    Only plain values, each checked: their repr is a literal (or CONFIG_NAMES) that
    evaluates back to an equal value in any Python 3."""
    stack = [config]
    while stack:
        value = stack.pop()
        if not isinstance(value, CONFIG_TYPES):
            raise ValueError(f"CONFIG cannot carry {value!r}")
        if isinstance(value, dict):
            if not all(isinstance(key, str) for key in value):
                raise ValueError(f"CONFIG keys must be strings: {value!r}")
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return repr(config).encode("utf-8")


def decode_config(payload: bytes) -> dict:
    """CONFIG from its payload (encode_config's literal), on the stub's side.

    eval with no builtins reads a literal of plain values, and nothing there can name a
    function to call. The stub trusts the head: it runs the code the head ships anyway."""
    config = eval(payload.decode("utf-8"), {"__builtins__": {}}, dict(CONFIG_NAMES))
    if not isinstance(config, dict):
        raise ValueError("CONFIG is not a mapping")
    return config


def json_text(value: Any) -> str:
    """VALUE (a str, an int or None; a dict or list of them) as JSON text, for the frames
    the stub sends: the json module's import would cost every stub's start."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, dict):
        return (
            "{" + ",".join(json_text(str(k)) + ":" + json_text(v) for k, v in value.items()) + "}"
        )
    if isinstance(value, list):
        return "[" + ",".join(json_text(item) for item in value) + "]"
    if not isinstance(value, str):
        raise TypeError(f"no JSON for {type(value).__name__}")
    out = ['"']
    for char in value:
        code = ord(char)
        if char in '\\"':
            out.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code < 0x10000:  # (a lone surrogate too: json.loads takes it back as it was)
            out.append(f"\\u{code:04x}")
        else:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
    out.append('"')
    return "".join(out)


# ============================================================================
# 4. Worker stub (shipped: standard library only, Python 3.6+)
# ============================================================================
# The stub is the text of this file between BEGIN SHIPPED and END SHIPPED (the wire
# framing above and this section), sent as it is (stub_source).
# It moves the protocol's fds aside first (as execnet does), so that a stray print
# in the stub or in Python's start-up cannot corrupt the frame stream.


class StubStopError(Exception):
    """The stub cannot serve this host, for a reason that is not a bug: "STAGE: reason"."""


class StubTask:
    """One running task on the worker: its process, pipes and collected output."""

    def __init__(self, seq: int, pid: int, deadline: "float | None") -> None:
        """Track a started process (its own process group) for the task numbered SEQ."""
        self.seq = seq
        self.pid = pid
        self.started = time.monotonic()
        self.deadline = deadline
        # Per stream (index 1: stdout, 2: stderr): a pooled piece buffer, and its fill.
        self.bufs = [None, None, None]
        self.fill = [0, 0, 0]
        self.open_fds = 2
        self.status = None
        self.flags = 0
        self.killed_at = None
        self.stdin_fd = None
        self.stdin_data = memoryview(b"")
        self.slot = 0  # its job slot on this stub (1..slots); the head's number adds slot_base
        self.pipes = set()  # its pipes as /proc shows them ("pipe:[inode]"), see kill_strays

    def kill(self, flag: int) -> None:
        """Kill the task's whole process group (SIGKILL) and remember why."""
        self.flags |= flag
        if self.killed_at is None:
            self.killed_at = time.monotonic()
        quietly(os.killpg, self.pid, signal.SIGKILL)


def login_environ() -> "dict | None":
    """The environment this process was started with, if Python changed it since (else None).

    Python 3.7+ sets LC_CTYPE=C.UTF-8 in its own environment when the locale is C or
    POSIX (PEP 538): tasks would see a variable a plain `ssh host cmd` does not give
    them. Linux keeps the environment as exec'd in /proc/self/environ."""
    try:
        with open("/proc/self/environ", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    env = {}
    for entry in data.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and name:
            env[os.fsdecode(name)] = os.fsdecode(value)
    return None if env == dict(os.environ) else env


def kill_strays(sessions: set, pipes: set) -> int:
    """SIGKILL every process in one of SESSIONS or holding one of PIPES; return how many.

    A task's process group is not all it may start: GNU timeout moves itself to a group
    of its own (still in the task's session, which start_new_session made), and setsid
    leaves the session too, yet both can hold the task's output pipes open forever.
    Linux's /proc shows both; elsewhere this finds nothing and the pipes are closed."""
    me = os.getpid()
    killed = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return killed
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open("/proc/" + entry + "/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            if fields[0] == b"Z":
                continue
            hit = int(fields[3]) in sessions
            if not hit and pipes:
                where = "/proc/" + entry + "/fd/"
                hit = any(os.readlink(where + fd) in pipes for fd in os.listdir(where))
            if hit:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or another user's
    return killed


# What a task gets back at the default, as Popen's restore_signals does, and SIGINT and
# SIGHUP: a signal ignored stays ignored across exec, and the stub ignores SIGPIPE
# itself, and SIGINT and SIGHUP when it was started with them ignored (a local stub).
RESET_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ", "SIGINT", "SIGHUP")
    if hasattr(signal, name)
)
# Whether start_process may use os.posix_spawn: Python 3.8+ (its setsid), and the stub's
# inherited descriptors marked close-on-exec (stub_main, through /proc); else subprocess.
SPAWN_DIRECT = [sys.version_info >= (3, 8)]


def start_process(path: bytes, argv: list, env: Any, stdio: tuple) -> int:
    """Start ARGV from PATH in a session of its own, with STDIO as its fds 0-2; its pid.

    As subprocess.Popen(start_new_session=True) would, without importing subprocess
    (with locale, re, enum and threading, a third of a stub's start): os.posix_spawn,
    which glibc does with vfork, as Popen does, and raises the exec's error here. No
    other descriptor goes to the task: Python makes its own close-on-exec, and the stub
    marked the ones it inherited so at its start (Popen's close_fds)."""
    if SPAWN_DIRECT[0]:
        try:
            return os.posix_spawn(
                path,
                argv,
                env,
                file_actions=[(os.POSIX_SPAWN_DUP2, fd, n) for n, fd in enumerate(stdio)],
                setsid=True,
                setsigdef=RESET_SIGNALS,
            )
        except NotImplementedError:  # no POSIX_SPAWN_SETSID in this C library
            SPAWN_DIRECT[0] = False
    import subprocess

    proc = subprocess.Popen(
        argv,
        executable=path,
        stdin=stdio[0],
        stdout=stdio[1],
        stderr=stdio[2],
        env=env,
        start_new_session=True,
    )
    proc.returncode = 0  # the stub reaps it; subprocess must never wait on it too
    return proc.pid


def close_on_exec() -> bool:
    """Mark every descriptor from 3 up close-on-exec (all this process has: /proc lists
    them); False where there is no list to go by."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return False
    for name in names:
        if int(name) > 2:
            quietly(os.set_inheritable, int(name), False)  # (the listing's own fd: closed)
    return True


class Poller:
    """The part of selectors.DefaultSelector the stub uses, without its import (a tenth of
    a stub's start): fds each watched for reading or for writing, with a label; epoll,
    else poll. A hang-up or an error on an fd counts as ready, as selectors counts it."""

    def __init__(self) -> None:
        """An empty poller."""
        self.epoll = hasattr(select, "epoll")
        self.poll = select.epoll() if self.epoll else select.poll()
        self.labels = {}

    def register(self, fd: int, writable: bool, label: str) -> None:
        """Watch FD for writing (WRITABLE) or reading; select() names it by LABEL."""
        if self.epoll:
            events = select.EPOLLOUT if writable else select.EPOLLIN
        else:
            events = select.POLLOUT if writable else select.POLLIN
        self.poll.register(fd, events)
        self.labels[fd] = label

    def unregister(self, fd: int) -> None:
        """Stop watching FD (one closed meanwhile is no longer watched anyway)."""
        del self.labels[fd]
        quietly(self.poll.unregister, fd)

    def select(self, timeout: "float | None") -> list:
        """(fd, label) of each watched fd that is ready, waiting at most TIMEOUT seconds
        (None: until one is)."""
        if self.epoll:
            ready = self.poll.poll(-1 if timeout is None else max(timeout, 0.0))
        else:  # poll's timeout is whole milliseconds: rounded up, not down to a busy loop
            ready = self.poll.poll(None if timeout is None else max(-(-timeout * 1000 // 1), 0))
        labels = self.labels
        return [(fd, labels[fd]) for fd, _ in ready if fd in labels]


def quietly(call: Any, *args: Any) -> None:
    """CALL(*ARGS), an OSError ignored: contextlib.suppress, without its import."""
    try:  # noqa: SIM105 (the stub does not import contextlib)
        call(*args)
    except OSError:
        pass


class Stub:
    """The worker side: runs up to `slots` tasks at once and streams results back."""

    def __init__(self, proto_in: int, proto_out: int) -> None:
        """Serve the protocol on the given file descriptors."""
        self.proto_in = proto_in
        self.proto_out = proto_out
        self.decoder = FrameDecoder(skip_banner=False)
        self.queue = collections.deque()
        self.input = {}  # seq: stdin parts (INPUT frames) waiting for the task's entry
        # With --halt the stub starts nothing after a task that counts towards the halt
        # (CONFIG's hold: "fail", "success" or "done") until the head has seen its result
        # and released it: a queued task cannot start before the head could say halt.
        self.hold = None
        self.held = set()
        self.running = {}
        self.by_fd = {}
        self.by_stdin = {}
        self.outbox = []
        self.outbox_bytes = 0
        self.outbox_since = 0.0
        self.pool = []  # free piece buffers (memoryviews of anonymous maps), reused
        self.slots = 1
        self.timeout = None
        self.env = None
        self.free_slots = [1]  # this stub's job slots not in use, lowest first
        self.slot_base = 0  # the head numbers all hosts' slots in one series: this stub's start
        self.host = ""  # the host's name, for SSHFAN_HOST
        self.workdir = None
        self.shell = b"/bin/sh"
        self.shell_path = b"/bin/sh"  # where self.shell was found (CONFIG)
        self.selector = Poller()
        self.devnull = os.open(os.devnull, os.O_RDONLY)
        self.eof = False
        self.warden = None  # the pipe to the warden (start_warden), if there is one
        self.warden_notes = []
        self.configured = False
        self.parts = []  # files the head is uploading now (PARTS): removed if it goes

    def send(self, kind: int, payload: bytes) -> None:
        """Queue a frame for the next flush."""
        if not self.outbox:
            self.outbox_since = time.monotonic()
        self.outbox.append(encode_frame(kind, payload))
        self.outbox_bytes += len(payload)

    def flush_due(self) -> "float | None":
        """Flush now if it is time; else return seconds until it will be (None: empty).

        Results of tiny tasks are held up to FLUSH_DELAY and sent together: fewer SSH
        packets for both ends to handle. Never while the queue is empty, nothing runs
        or the queue is held, when the head is waiting on these results to go on."""
        if not self.outbox:
            return None
        left = self.outbox_since + FLUSH_DELAY - time.monotonic()
        if (
            left <= 0
            or not self.queue
            or not self.running
            or self.held
            or self.outbox_bytes >= 65536
        ):
            self.flush()
            return None
        return left

    def flush(self) -> None:
        """Write every queued frame to the head in as few writes as possible."""
        if not self.outbox:
            return
        data = b"".join(self.outbox)
        self.outbox = []
        self.outbox_bytes = 0
        self.write_all([data])

    def write_all(self, parts: list) -> None:
        """Write PARTS (bytes-like) to the head in order, with as few writes as it takes."""
        while parts:
            written = os.writev(self.proto_out, parts)
            while parts and written >= len(parts[0]):
                written -= len(parts[0])
                parts.pop(0)
            if written:
                parts[0] = memoryview(parts[0])[written:]

    def send_piece(self, seq: int, stream: int, view: Any) -> None:
        """Ship a full piece of a task's output straight from its buffer, uncopied."""
        self.flush()  # frames queued before it go first
        size = OUTPUT_HEAD.size + len(view)
        header = FRAME_HEADER.pack(FRAME_MAGIC, KIND_OUTPUT, size)
        self.write_all([header + OUTPUT_HEAD.pack(seq, stream), view])

    def handle(self, kind: int, payload: bytes) -> None:
        """Act on one frame from the head."""
        if kind == KIND_TASKS:
            for seq, command, data in decode_tasks(payload):
                if seq in self.input:
                    data = b"".join(self.input.pop(seq) + [data])
                self.queue.append((seq, command, data))
        elif kind == KIND_INPUT:
            (seq,) = INPUT_HEAD.unpack_from(payload, 0)
            self.input.setdefault(seq, []).append(payload[INPUT_HEAD.size :])
        elif kind == KIND_CONFIG:
            config = decode_config(payload)
            self.slots = max(1, int(config.get("slots") or 1))
            self.free_slots = list(range(1, self.slots + 1))
            self.slot_base = int(config.get("slot_base") or 0)
            self.host = str(config.get("host") or "")
            self.timeout = config.get("timeout")
            original = login_environ()
            if original is not None:  # tasks inherit it as exec'd, not as Python changed it
                os.environ.clear()
                os.environ.update(original)
            if config.get("env"):
                self.env = dict(os.environ)
                self.env.update(config["env"])
            self.hold = config.get("hold")
            self.workdir = config.get("workdir")
            if self.workdir:
                self.workdir = os.path.expanduser(self.workdir)
                if config.get("make_workdir"):
                    try:
                        os.makedirs(self.workdir, exist_ok=True)
                    except OSError as exc:
                        raise StubStopError(
                            f"workdir: cannot create {self.workdir}: {exc.strerror}"
                        ) from None
                if not os.path.isdir(self.workdir):
                    why = "is not a directory" if os.path.exists(self.workdir) else "does not exist"
                    raise StubStopError(f"workdir: {self.workdir} {why}")
                try:  # tasks start here: they inherit it (os.posix_spawn has no cwd)
                    os.chdir(self.workdir)
                except OSError:
                    raise StubStopError(f"workdir: {self.workdir} cannot be entered") from None
            shell = config.get("shell") or "/bin/sh"
            # Looked up once, in the PATH the tasks get, as Popen looked it up for each.
            env = os.environ if self.env is None else self.env
            path = env.get("PATH", os.defpath).split(os.pathsep)
            found = [os.path.join(d, shell) for d in ([""] if "/" in shell else path)]
            found = [f for f in found if os.access(f, os.X_OK) and not os.path.isdir(f)]
            if not found:
                raise StubStopError(f"shell: {shell} not found or not executable")
            self.shell = os.fsencode(shell)
            self.shell_path = os.fsencode(found[0])
            self.configured = True
        elif kind == KIND_PING:
            self.send(KIND_PONG, payload)
            self.flush()
        elif kind == KIND_DROP:
            # When rebalancing, tasks that can start now do: a DROP read together with the
            # TASKS frame before it would otherwise hand everything back, again and again.
            if payload not in (b"halt", b"kill"):
                self.start_tasks()
            dropped = [entry[0] for entry in self.queue]
            self.queue.clear()
            if payload == b"kill":
                self.kill_all()
            self.send(KIND_DROPPED, json_text(dropped).encode("ascii"))
        elif kind == KIND_RELEASE:
            self.held.discard(INPUT_HEAD.unpack_from(payload, 0)[0])
        elif kind == KIND_CANCEL:
            (seq,) = INPUT_HEAD.unpack_from(payload, 0)
            self.cancel(seq)
        elif kind == KIND_PARTS:
            self.parts = [path for path in payload.split(b"\0") if path]
        else:
            raise FrameError(f"unexpected frame kind {kind} from the head")

    def cancel(self, seq: int) -> None:
        """Kill task SEQ with all it started (its RESULT follows, flagged CANCELLED), or
        answer at once if it has not started; a task already finished is left alone (its
        RESULT is on its way, and the head expects exactly one)."""
        for task in self.running.values():
            if task.seq == seq:
                self.kill_tasks([task], FLAG_CANCELLED)
                return
        for entry in self.queue:
            if entry[0] == seq:
                self.queue.remove(entry)
                self.input.pop(seq, None)
                self.send(KIND_RESULT, encode_result(seq, -9, FLAG_CANCELLED, 0.0, b"", b""))
                return

    def spawn(self, command: bytes, data: bytes = b"", seq: int = 0, slot: int = 0) -> tuple:
        """Start `SHELL -c COMMAND` in its own session; return pid, pipes, stdin pipe or None.

        Its stdin is /dev/null, or a pipe that the loop fills with DATA (--pipe). The task
        sees its seq, job slot and host in SSHFAN_SEQ, SSHFAN_SLOT and SSHFAN_HOST, and its
        slot number where the head put a NUL ({%}: the head cannot know it beforehand).

        It starts as start_process does: in the stub's directory (CONFIG's workdir), with
        no descriptor but 0-2 and SIGPIPE back to its default."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if data else (self.devnull, None)
        if b"\0" in command:
            command = command.replace(b"\0", str(slot).encode())
        # Into the stub's own environment when the task inherits it: a copy of it for
        # every task would cost more than starting the task does.
        env = os.environ if self.env is None else dict(self.env)
        env["SSHFAN_SEQ"] = str(seq)
        env["SSHFAN_SLOT"] = str(slot)
        env["SSHFAN_HOST"] = self.host
        try:
            pid = start_process(
                self.shell_path, [self.shell, b"-c", command], env, (in_r, out_w, err_w)
            )
        except BaseException:
            for fd in (out_r, err_r, in_w):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
            if in_w is not None:
                os.close(in_r)
        if in_w is not None:
            os.set_blocking(in_w, False)
        return pid, out_r, err_r, in_w

    def note(self, sign: bytes, pid: int) -> None:
        """Queue a note for the warden: task group PID started (+) or is handled (-)."""
        if self.warden is not None:
            self.warden_notes.append(sign + str(pid).encode() + b"\n")

    def tell_warden(self) -> None:
        """Send the warden its queued notes: one write a loop turn, not one a task."""
        if not self.warden_notes:
            return
        data = b"".join(self.warden_notes)
        self.warden_notes = []
        try:
            while data:
                data = data[os.write(self.warden, data) :]
        except OSError:  # the warden is gone: carry on without it
            self.warden = None

    def finished(self, seq: int, status: int, flags: int) -> None:
        """Note a task's end: with --halt, hold the queue if it counts towards the halt."""
        if self.hold is None or flags & FLAG_CANCELLED:
            return
        failed = status != 0 or flags & FLAG_TIMED_OUT
        if self.hold == "done" or (self.hold == "fail") == bool(failed):
            self.held.add(seq)

    def start_tasks(self) -> None:
        """Start queued tasks while slots are free; tell the warden of them at once."""
        while self.queue and len(self.running) < self.slots and self.configured and not self.held:
            seq, command, data = self.queue.popleft()
            deadline = time.monotonic() + self.timeout if self.timeout else None
            slot = self.free_slots.pop(0) if self.free_slots else len(self.running) + 1
            number = self.slot_base + slot
            try:
                pid, out_fd, err_fd, in_fd = self.spawn(command, data, seq, number)
            except (OSError, ValueError) as exc:  # ValueError: an env name Popen refuses
                self.release_slot(slot)
                message = f"sshfan: cannot start task: {exc}\n".encode()
                self.send(KIND_RESULT, encode_result(seq, 127, 0, 0.0, b"", message, number))
                self.finished(seq, 127, 0)
                continue
            task = StubTask(seq, pid, deadline)
            task.slot = slot
            self.running[pid] = task
            self.note(b"+", pid)
            for fd, stream in ((out_fd, 1), (err_fd, 2)):
                self.by_fd[fd] = (task, stream)
                task.pipes.add(f"pipe:[{os.fstat(fd).st_ino}]")
                self.selector.register(fd, False, "task")
            if in_fd is not None:
                task.stdin_fd = in_fd
                task.stdin_data = memoryview(data)
                self.by_stdin[in_fd] = task
                self.selector.register(in_fd, True, "stdin")
        self.tell_warden()

    def feed_task_input(self, fd: int) -> None:
        """Write the next part of a task's stdin data; close its stdin when all is written."""
        task = self.by_stdin[fd]
        try:
            written = os.write(fd, task.stdin_data[:65536])
        except BlockingIOError:
            return
        except OSError:  # the task closed its stdin or exited: it wants no more
            written = len(task.stdin_data)
        task.stdin_data = task.stdin_data[written:]
        if not task.stdin_data:
            self.close_stdin(task)

    def close_stdin(self, task: StubTask) -> None:
        """Stop feeding a task's stdin and close it (the task sees EOF)."""
        if task.stdin_fd is not None:
            self.selector.unregister(task.stdin_fd)
            del self.by_stdin[task.stdin_fd]
            os.close(task.stdin_fd)
            task.stdin_fd = None

    def read_task_output(self, fd: int) -> None:
        """Read what a task wrote into its piece buffer; ship full pieces; note EOF.

        The kernel copies the output into the buffer and from it into the head's pipe:
        no Python copies and no fresh allocations on the way. The buffers are anonymous
        maps, so a task that prints a line makes only one page of its buffer resident."""
        task, stream = self.by_fd[fd]
        buf = task.bufs[stream]
        if buf is None:
            buf = self.pool.pop() if self.pool else memoryview(mmap.mmap(-1, OUTPUT_PIECE))
            task.bufs[stream] = buf
        fill = task.fill[stream]
        try:
            count = os.readv(fd, [buf[fill:]])
        except OSError:
            count = 0
        if count:
            fill += count
            if fill == OUTPUT_PIECE:
                self.send_piece(task.seq, stream, buf)
                fill = 0
            task.fill[stream] = fill
            return
        self.close_fd(fd)
        self.maybe_finish(task)

    def take_output(self, task: StubTask, stream: int) -> bytes:
        """The output of STREAM not yet shipped; its buffer goes back to the pool."""
        buf = task.bufs[stream]
        if buf is None:
            return b""
        data = bytes(buf[: task.fill[stream]])
        task.bufs[stream] = None
        self.pool.append(buf)
        return data

    def close_fd(self, fd: int) -> None:
        """Stop watching one of a task's pipes."""
        task, _ = self.by_fd.pop(fd)
        self.selector.unregister(fd)
        os.close(fd)
        task.open_fds -= 1

    def reap(self) -> None:
        """Collect the exit status of tasks whose shell has exited."""
        for task in list(self.running.values()):
            if task.status is None:
                try:
                    pid, status = os.waitpid(task.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, status = task.pid, 255 << 8
                if pid:
                    if os.WIFSIGNALED(status):
                        task.status = -os.WTERMSIG(status)
                    else:
                        task.status = os.WEXITSTATUS(status)
                    self.maybe_finish(task)

    def maybe_finish(self, task: StubTask) -> None:
        """Report a task once its shell has exited and its pipes are closed."""
        if task.status is None or task.open_fds > 0:
            return
        self.close_stdin(task)
        del self.running[task.pid]
        self.release_slot(task.slot)
        self.note(b"-", task.pid)
        duration = time.monotonic() - task.started
        out, err = self.take_output(task, 1), self.take_output(task, 2)
        number = self.slot_base + task.slot
        result = encode_result(task.seq, task.status, task.flags, duration, out, err, number)
        if len(result) > OUTPUT_PIECE:
            for stream, data in ((1, out), (2, err)):
                if data:
                    self.send(KIND_OUTPUT, OUTPUT_HEAD.pack(task.seq, stream) + data)
            result = encode_result(task.seq, task.status, task.flags, duration, b"", b"", number)
        self.send(KIND_RESULT, result)
        self.finished(task.seq, task.status, task.flags)

    def release_slot(self, slot: int) -> None:
        """A task left job slot SLOT: the next task may take it (the lowest free goes first)."""
        if 0 < slot <= self.slots and slot not in self.free_slots:
            self.free_slots.append(slot)
            self.free_slots.sort()

    def check_deadlines(self) -> "float | None":
        """Kill tasks past their deadline; return seconds until the next deadline."""
        now = time.monotonic()
        wait = None
        due = []
        stuck = []
        for task in self.running.values():
            if task.killed_at is not None:
                if task.open_fds and now - task.killed_at > KILL_GRACE:
                    stuck.append(task)
                    continue
                left = task.killed_at + KILL_GRACE - now
            elif task.deadline is not None and now >= task.deadline:
                due.append(task)
                left = KILL_GRACE
            elif task.deadline is not None:
                left = task.deadline - now
            else:
                continue
            wait = left if wait is None else min(wait, left)
        if due:
            self.kill_tasks(due, FLAG_TIMED_OUT)
        for task in stuck:
            # Still held open after the kill: by a process that /proc cannot show us
            # (another user's, or not Linux). Look once more, then stop waiting for it.
            self.kill_tasks([task], 0)
            for fd in [fd for fd, entry in self.by_fd.items() if entry[0] is task]:
                self.close_fd(fd)
            self.maybe_finish(task)
        return wait

    def kill_tasks(self, tasks: list, flag: int) -> None:
        """Kill TASKS with all they started: process groups, sessions, pipe holders."""
        if not tasks:
            return
        for task in tasks:
            task.kill(flag)
        kill_strays(set(task.pid for task in tasks), set().union(*(t.pipes for t in tasks)))

    def kill_all(self) -> None:
        """Kill every running task and what it started (the head went away)."""
        self.kill_tasks(list(self.running.values()), FLAG_CANCELLED)

    def remove_parts(self) -> None:
        """Remove the files the head was still uploading when it went away: written in
        part, under a temporary name, they would stay on the worker for good."""
        for path in self.parts:
            quietly(os.unlink, path)

    def serve(self) -> None:
        """Main loop: read frames and task output, start tasks, ship results."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.selector.register(self.proto_in, False, "proto")
        self.selector.register(wake_r, False, "wake")
        while not (self.eof and not self.running):
            self.start_tasks()
            timeout = self.check_deadlines()
            flush_in = self.flush_due()
            if flush_in is not None:
                timeout = flush_in if timeout is None else min(timeout, flush_in)
            if self.eof and not self.running:
                break
            if timeout is not None:
                timeout = min(timeout, SELECT_WAIT_MAX)
            for fd, label in self.selector.select(timeout):
                if label == "proto":
                    data = os.read(self.proto_in, 1 << 20)
                    if not data:
                        self.eof = True
                        self.selector.unregister(self.proto_in)
                        self.queue.clear()
                        self.kill_all()
                        self.remove_parts()
                        continue
                    for kind, payload in self.decoder.feed(data):
                        self.handle(kind, payload)
                elif label == "wake":
                    try:
                        while os.read(wake_r, 4096):
                            pass
                    except OSError:
                        pass
                elif label == "stdin":
                    if fd in self.by_stdin:
                        self.feed_task_input(fd)
                elif fd in self.by_fd:
                    self.read_task_output(fd)
            self.reap()
        self.tell_warden()
        self.flush()
        if self.parts:  # the head went away mid-upload: see PARTS_SETTLE
            time.sleep(PARTS_SETTLE)
            self.remove_parts()


def start_warden(close: tuple) -> "int | None":
    """Fork the warden, which kills the tasks' process groups if the stub dies without
    doing it (SIGKILL, the OOM killer); return the pipe to it (None: no warden).

    The stub writes b"+PGID" when a task starts and b"-PGID" once it is done with it.
    When the pipe closes with groups still listed, the stub is gone: the warden kills
    them and exits. It holds none of the stub's pipes to the head (CLOSE and 0-2), so
    the head still sees the stub die, and it reads only every WARDEN_NAP seconds."""
    try:
        r, w = os.pipe()
        pid = os.fork()
    except OSError:
        return None
    if pid:
        os.close(r)
        return w
    try:
        # A session of its own: a SIGKILL to the head's whole process group (a job
        # control or CI timeout) takes the local stub with it, but not its warden.
        quietly(os.setsid)
        os.close(w)
        for fd in close:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)  # it ends when the stub does, not before
        groups = set()
        rest = b""
        while True:
            data = os.read(r, 1 << 16)
            if not data:
                break
            *lines, rest = (rest + data).split(b"\n")
            for line in lines:
                if line[:1] == b"+":
                    groups.add(int(line[1:]))
                else:
                    groups.discard(int(line[1:]))
            time.sleep(WARDEN_NAP)
        for group in groups:
            quietly(os.killpg, group, signal.SIGKILL)
        if groups:
            kill_strays(groups, set())  # what left the group but not the session
    finally:
        os._exit(0)


def stub_main() -> None:
    """Entry point on the worker: move fds aside, say hello, serve until EOF."""
    if not close_on_exec():
        SPAWN_DIRECT[0] = False
    proto_in = os.dup(0)
    proto_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # a stray print goes to stderr, never into the frame stream
    os.close(devnull)
    stub = Stub(proto_in, proto_out)

    def on_signal(signum: int, frame: Any) -> None:
        """Kill the tasks' process groups and leave when told to stop."""
        stub.kill_all()
        stub.remove_parts()
        os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if signal.getsignal(signum) != signal.SIG_IGN:  # (one ignored, as nohup does: left so)
            signal.signal(signum, on_signal)
    # A write to a closed pipe (a task that stopped reading its stdin, or the head gone)
    # must be an error to handle, not a signal that ends the stub; tasks get SIGPIPE back.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    hello = {
        "proto": PROTO_VERSION,
        "python": ".".join(str(part) for part in sys.version_info[:3]),
        "cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        # gethostname() is uname's nodename; the socket module would add to every start
        "hostname": os.uname().nodename,
        "pid": os.getpid(),
    }
    try:
        stub.send(KIND_HELLO, json_text(hello).encode("ascii"))
        stub.flush()
        # After the hello, not before: the fork (about 1 ms) overlaps the round trip
        # to the head, instead of delaying the first task by as much.
        stub.warden = start_warden((proto_in, proto_out))
        stub.serve()
    except BaseException as exc:  # tell the head why, then make sure nothing is left running
        stub.kill_all()
        stub.remove_parts()
        if not isinstance(exc, (BrokenPipeError, KeyboardInterrupt, SystemExit)):
            try:
                stub.outbox = []
                message = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, StubStopError):  # not a bug: the reason as it stands
                    message = str(exc)
                stub.send(KIND_ERROR, message.encode("utf-8", "replace"))
                stub.flush()
            except OSError:
                pass
        os._exit(1)
    os._exit(0)


# <<<<<<<< END SHIPPED <<<<<<<<


# ============================================================================
# 5. Shipping the stub: its source and the bootstrap that starts it
# ============================================================================


@functools.cache
def _module_lines() -> list[str]:
    """This file's lines, read once (the stub is shipped from its own source text)."""
    return Path(__file__).read_text(encoding="utf-8").splitlines()


# The stub's own imports: the shipped region uses these and nothing else (a test checks).
_SHIPPED_IMPORTS = (
    "import collections, mmap, os, select, struct, sys, time\n"
    # signal's own module wraps _signal's in enums, whose import costs a stub's start
    "try:\n    import _signal as signal\nexcept ImportError:\n    import signal\n"
)


@functools.cache
def stub_source() -> str:
    """The worker stub's complete source, as shipped: imports, then the lines between the
    BEGIN SHIPPED and END SHIPPED markers of this file as they are, then the entry call.

    A scan for the two marker lines, not a parse: parsing the file would slow every start."""
    lines = _module_lines()
    begin = next(i for i, line in enumerate(lines) if line.startswith("# >>>>>>>> BEGIN SHIPPED"))
    end = next(i for i, line in enumerate(lines) if line.startswith("# <<<<<<<< END SHIPPED"))
    return "".join(
        [
            f"# sshfan worker stub {__version__} (standard library only, Python 3.6+)\n",
            # Annotations only: importing typing would cost each stub's start 3-5 ms.
            "Any = object\n",
            _SHIPPED_IMPORTS,
            "\n".join(lines[begin + 1 : end]),
            "\nif __name__ == '__main__':\n    stub_main()\n",
        ]
    )


# What a stub's stdin gets first (stub_payload): the bytecode's magic number, the
# source's length and the compiled code's length, then the two.
STUB_HEADER = struct.Struct(">4sII")


@functools.cache
def stub_payload() -> bytes:
    """The stub as shipped on a stub's stdin: STUB_HEADER, its source, and the source
    compiled by this Python (marshal, then zlib), which a worker whose Python has the
    same bytecode magic runs instead of compiling the source (a quarter of a stub's
    start there).

    Any other Python (another version, one without the magic to compare or without
    zlib) compiles the source, as every worker did before; both go, as the head cannot
    know which it is. Compressed, the code adds 30 KB to the source's 46 KB."""
    import importlib.util

    source = stub_source().encode("utf-8")
    magic = importlib.util.MAGIC_NUMBER
    code = _compiled_stub(source, magic)
    return STUB_HEADER.pack(magic, len(source), len(code)) + source + code


def _compiled_stub(source: bytes, magic: bytes) -> bytes:
    """SOURCE compiled by this Python (MAGIC), marshalled and compressed: as an earlier
    run cached it (cache_dir()/stub-HASH), else compiled now and cached, as Python
    caches a module's.

    Compiling takes this process as long as it saves a worker (8-12 ms here), and comes
    before a run can send its first stub. The file holds a digest of the code: a torn or
    damaged one is compiled afresh. Workers run this code, so a file someone else owns or
    may write is not used (a shared XDG_CACHE_HOME); one that cannot be written is only
    not cached."""
    import marshal
    import zlib

    # dont_inherit: without this module's `from __future__` flags, as a worker compiles it
    fresh = functools.partial(compile, source, "sshfan-stub", "exec", dont_inherit=True)
    cache = cache_dir()
    if cache is None:
        return zlib.compress(marshal.dumps(fresh()), 9)
    key = hashlib.sha256(b"marshal+zlib\0" + magic + source).hexdigest()[:32]
    path = cache / f"stub-{key}"
    with contextlib.suppress(OSError), open(path, "rb") as cached:
        info = os.fstat(cached.fileno())
        data = cached.read()
        code = data[32:]
        if (
            info.st_uid == os.getuid()
            and not info.st_mode & 0o022
            and hashlib.sha256(code).digest() == data[:32]
        ):
            return code
    code = zlib.compress(marshal.dumps(fresh()), 9)
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "xb") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(hashlib.sha256(code).digest() + code)
        os.replace(part, path)
    except OSError:
        with contextlib.suppress(OSError):
            part.unlink()
    return code


def cache_dir() -> Path | None:
    """$XDG_CACHE_HOME/sshfan, or ~/.cache/sshfan: what sshfan keeps between runs.

    None without a home to keep it in (no HOME and no passwd entry: a container's
    arbitrary uid), rather than a directory named "~" wherever the run is; a relative
    XDG_CACHE_HOME is ignored, as the XDG spec says."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        home = os.path.expanduser("~")
        if not os.path.isabs(home):
            return None
        base = os.path.join(home, ".cache")
    return Path(base) / "sshfan"


def bootstrap_code() -> str:
    """The fixed short Python program that reads the stub from stdin and runs it.

    It reads exactly the stub's bytes (stub_payload) with os.read: sys.stdin's buffer
    would also take the frames the head sends right behind it, and the stub would never
    see them. The frozen importlib module holds the magic without an import."""
    return (
        "import os,sys\n"
        "def r(n):\n b=b''\n while len(b)<n:b+=os.read(0,n-len(b))or sys.exit(1)\n return b\n"
        f"h=r({STUB_HEADER.size});s=r(int.from_bytes(h[4:8],'big'));c=r(int.from_bytes(h[8:],'big'))\n"
        "m=getattr(sys.modules.get('_frozen_importlib_external'),'MAGIC_NUMBER',0)\n"
        "k=None\n"
        "if h[:4]==m:\n"
        " try:import marshal,zlib;k=marshal.loads(zlib.decompress(c))\n"
        " except ImportError:pass\n"
        "exec(k or compile(s,'sshfan-stub','exec'))"
    )


# ============================================================================
# 6. Scheduler (sans-IO)
# ============================================================================


@dataclasses.dataclass(slots=True)
class Task:
    """A task on its way through the run: its line, tries so far, and pieces of output."""

    seq: int
    command: str
    attempts: int = 0
    avoid: str | None = None  # a host this retry should not go back to
    data: bytes = b""  # stdin for the task (--pipe); empty: /dev/null
    pieces: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    direct: bool = False  # this try's stdout goes straight into the merged output
    arg: str | None = None  # the line, when --command made COMMAND from it (--results)
    long: bool = False  # known long from an earlier run: handed out first, to a free slot
    sent: float = 0.0  # when it went to its host (time.monotonic), for --speculate
    # When it started as far as the head can tell: sent to a free slot, or when a slot
    # freed for it behind others (HostSession.note_starts); 0.0 while queued.
    started: float = 0.0
    pinned: str = ""  # --onall: the only host that may run it


class Scheduler:
    """Hands out tasks: requeued and retried ones first, then the tasks known to be long
    (longest first), then the rest of the tasks file in order."""

    pinned = False  # every task may go to any host (OnAllScheduler: to its own)

    def __init__(
        self, source: Iterator[Task], retries: int = 0, longest: list[Task] | None = None
    ) -> None:
        """Draw fresh tasks lazily from SOURCE; allow RETRIES re-runs of a failed task;
        hand out LONGEST (taken out of SOURCE's order) before the rest."""
        self._source = source
        self._again: deque[Task] = deque()
        self._longest: deque[Task] = deque(longest or ())
        self._pulled = {task.seq for task in self._longest}  # skipped when SOURCE reaches them
        self.ordered = bool(self._longest)  # some tasks go out of file order (LPT)
        self._source_done = False
        self.retries = retries
        self.stopped = False
        self.drawn = 0  # fresh tasks taken from the source so far
        self.error: SshfanError | None = None  # why the source could not be read to its end

    def take(
        self, host: str, count: int, others_alive: bool = False, long_room: int = 0
    ) -> list[Task]:
        """Up to COUNT tasks for HOST; a retry avoids the host it failed on if it can.

        Known-long tasks go out only LONG_ROOM at a time (the host's slots not already
        running one): queued behind one another on a single host, they would undo the
        longest-first order. A host whose every slot got a long task takes nothing more."""
        taken: list[Task] = []
        if self.stopped:
            return taken
        if self._again:
            skipped: list[Task] = []
            while self._again and len(taken) < count:
                task = self._again.popleft()
                if task.avoid == host and others_alive:
                    skipped.append(task)
                else:
                    taken.append(task)
            self._again.extendleft(reversed(skipped))
        longs = 0
        while self._longest and longs < long_room and len(taken) < count:
            taken.append(self._longest.popleft())
            self.drawn += 1
            longs += 1
        if longs and longs >= long_room:
            count = len(taken)
        while len(taken) < count and not self._source_done:
            try:
                task = next(self._source, None)
            except SshfanError as exc:
                self.error = exc
                task = None
            if task is None:
                self._source_done = True
            elif task.seq in self._pulled:
                self._pulled.discard(task.seq)
            else:
                taken.append(task)
                self.drawn += 1
        for task in taken:
            task.attempts += 1
            task.pieces = []
            task.started = 0.0
            task.direct = False
        return taken

    def put_back(self, tasks: list[Task]) -> None:
        """Return tasks from a lost host to the front of the queue (not a failed try)."""
        for task in tasks:
            task.attempts -= 1
        self._again.extendleft(sorted(tasks, key=lambda t: t.seq, reverse=True))

    def should_retry(self, task: Task, host: str) -> bool:
        """Queue a failed task again if it has tries left; say whether it was."""
        if self.stopped or task.attempts > self.retries:
            return False
        task.avoid = host
        self._again.append(task)
        return True

    def has_work(self) -> bool:
        """Whether any task is still waiting to be handed out."""
        if self.stopped:
            return False
        return bool(self._again) or bool(self._longest) or not self._source_done

    def left_over(self) -> int | None:
        """Tasks waiting to be handed (again) once the file is read; None while it is not."""
        if self.stopped or not self._source_done:
            return None
        return len(self._again) + len(self._longest)

    def requeued(self) -> int:
        """Tasks given back or to retry, waiting to be handed out again."""
        return len(self._again)

    def exhausted(self) -> bool:
        """Whether every task has been handed out for good (nothing left, nothing to retry)."""
        return self._source_done and not self._again and not self._longest and self.error is None

    def order_key(self, host: str, seq: int) -> int:
        """Where HOST's task SEQ goes in the merged output and the journal's index: SEQ."""
        return seq

    def host_gone(self, host: str) -> None:
        """A host is lost for good: its tasks go to the others, nothing to do here."""

    def join(self, host: str) -> int:
        """HOST joined mid-run (or came back): how many tasks it adds to the run (none:
        it shares the rest)."""
        return 0


class OnAllScheduler(Scheduler):
    """--onall: every host runs every task, drawn from its own pass over the tasks file.

    The merged output and the journal's index are keyed by (host, seq) folded into one
    number, host-major (order_key), so the output is each host's tasks in host order."""

    pinned = True

    def __init__(
        self,
        sources: dict[str, Iterator[Task]],
        lines: int,
        retries: int = 0,
        new_pass: Callable[[int], tuple[Iterator[Task], int]] | None = None,
    ) -> None:
        """Draw each host's tasks lazily from SOURCES[host]; LINES: the tasks file's lines.
        NEW_PASS(place) gives a host that joins its pass and how many tasks it holds."""
        super().__init__(iter(()), retries)
        self._sources = sources
        self._place = {name: index for index, name in enumerate(sources)}
        self._queued: dict[str, deque[Task]] = {name: deque() for name in sources}
        self._read: set[str] = set()  # hosts whose pass over the file is done
        self._gone: set[str] = set()
        self._new_pass = new_pass
        self.lines = lines

    def hosts(self) -> list[str]:
        """The hosts in place order: those the run started with, then those that joined."""
        return list(self._place)

    def order_key(self, host: str, seq: int) -> int:
        """HOST's task SEQ, host-major: all of the first host's tasks come first."""
        return self._place[host] * self.lines + seq

    def take(
        self, host: str, count: int, others_alive: bool = False, long_room: int = 0
    ) -> list[Task]:
        """Up to COUNT of HOST's own tasks: put back or retried first, then the file."""
        if self.stopped or host not in self._sources:
            return []
        queued = self._queued[host]
        taken = [queued.popleft() for _ in range(min(count, len(queued)))]
        while len(taken) < count and host not in self._read:
            try:
                task = next(self._sources[host], None)
            except SshfanError as exc:  # (the tasks file changed under the run)
                self.error = exc
                task = None
            if task is None:
                self._read.add(host)
            else:
                task.pinned = host
                taken.append(task)
                self.drawn += 1
        for task in taken:
            task.attempts += 1
            task.pieces = []
            task.started = 0.0
            task.direct = False
        return taken

    def put_back(self, tasks: list[Task]) -> None:
        """Return tasks to the front of their own host's queue (not a failed try)."""
        for task in sorted(tasks, key=lambda t: t.seq, reverse=True):
            task.attempts -= 1
            self._queued[task.pinned].appendleft(task)

    def should_retry(self, task: Task, host: str) -> bool:
        """Queue a failed task again on its own host if it has tries left."""
        if self.stopped or task.attempts > self.retries:
            return False
        self._queued[host].append(task)
        return True

    def _pending(self, host: str) -> bool:
        """Whether HOST has tasks it has not been given yet."""
        return bool(self._queued[host]) or host not in self._read

    def has_work(self) -> bool:
        """Whether a host that is not gone has tasks waiting."""
        if self.stopped:
            return False
        return any(self._pending(h) for h in self._sources if h not in self._gone)

    def left_over(self) -> int | None:
        """Never shared out between hosts: None."""
        return None

    def requeued(self) -> int:
        """Tasks put back or to retry, on all hosts."""
        return sum(map(len, self._queued.values()))

    def exhausted(self) -> bool:
        """Whether every host, gone or not, has been given all its tasks."""
        return not any(self._pending(h) for h in self._sources) and self.error is None

    def host_gone(self, host: str) -> None:
        """HOST is lost for good, or left the hosts file: its tasks cannot go elsewhere;
        the run stops waiting on them."""
        self._gone.add(host)

    def join(self, host: str) -> int:
        """HOST joined: every task, as if it had been there from the start, its block in
        the output after the others'. A host that comes back goes on with its own pass."""
        self._gone.discard(host)
        if host in self._sources or self._new_pass is None:
            return 0
        self._place[host] = len(self._place)
        self._queued[host] = deque()
        self._sources[host], todo = self._new_pass(self._place[host])
        return todo

    def drain(self) -> None:
        """Finish every host's pass over the file, so blank lines and tasks from the journal
        reach the merged output even for hosts that ran nothing (their tasks are dropped)."""
        for host, source in self._sources.items():
            with contextlib.suppress(SshfanError):  # (kept by take(), if it met it first)
                for _task in source:
                    pass
            self._read.add(host)


@dataclasses.dataclass(frozen=True)
class HaltPolicy:
    """GNU parallel's --halt WHEN,WHY=N[%]: stop the run once N (or N%) tasks failed,
    succeeded or finished; "soon" lets running tasks end, "now" kills them."""

    when: str = "soon"  # soon or now
    why: str = "fail"  # fail, success or done
    count: int = 1  # tasks, or a percentage of the run's tasks with percent
    percent: bool = False

    _OLD_FORMS = {
        "1": "soon,fail=1",
        "2": "now,fail=1",
        "-1": "soon,success=1",
        "-2": "now,success=1",
    }

    @classmethod
    def parse(cls, text: str) -> HaltPolicy | None:
        """Read --halt as GNU parallel does (also its old forms 0, 1, 2, -1, -2, N%)."""
        spec = text.strip()
        if spec in ("never", "0"):
            return None
        spec = cls._OLD_FORMS.get(spec, spec)
        if re.fullmatch(r"\d+%", spec):
            spec = "soon,fail=" + spec
        match = re.fullmatch(r"(soon|now),(fail|success|done)=(\d+)(%?)", spec)
        if not match or int(match.group(3)) < 1 or (match.group(4) and int(match.group(3)) > 100):
            raise UsageError(
                f"--halt: not a halt condition: {text!r} (e.g. soon,fail=1, now,success=1, "
                "soon,fail=10%)"
            )
        when, why, count, percent = match.groups()
        return cls(when, why, int(count), bool(percent))

    def __str__(self) -> str:
        """The policy as --halt takes it."""
        return f"{self.when},{self.why}={self.count}{'%' if self.percent else ''}"

    def counts(self, ok: bool) -> bool:
        """Whether a finished task (OK or not) counts towards the halt."""
        return self.why == "done" or (self.why == "success") == ok

    def reached(self, counted: int, total: int) -> bool:
        """Whether COUNTED such tasks (of TOTAL in the run) halt it."""
        if self.percent:
            return counted * 100 >= self.count * max(1, total)
        return counted >= self.count


def max_ahead(opts: RunOptions) -> int:
    """Tasks a host may hold beyond its slots, at most: --pipe chunks wait in memory on
    both ends, so large ones are queued few at a time (about PIPE_AHEAD_BYTES of them);
    none with --halt and --retries, so that a retry starts before the tasks after it."""
    if opts.retries and (opts.halt is not None or opts.halt_on_error):
        # GNU parallel puts a failed job back at the head of its queue: with a task queued
        # on the stub behind it, that task would start first, and a halt come one task late.
        return 0
    if opts.pipe and not opts.lines:
        return max(1, min(HostWindow.MAX_AHEAD, PIPE_AHEAD_BYTES // opts.block))
    return HostWindow.MAX_AHEAD


def start_ahead(left: int, slots: int, all_slots: int) -> int:
    """Tasks to queue beyond SLOTS before any duration is known: a quarter of this host's
    share (by slots) of the LEFT tasks, at least its slots, at most START_MAX.

    Over a slow link a first batch that covers a round trip saves a round trip of idle
    slots; a larger one would leave later hosts short if the tasks turn out long."""
    share = left * slots // max(1, all_slots)
    return max(slots, min(HostWindow.START_MAX, share // 4))


class HostWindow:
    """How many tasks a host should hold: its slots plus enough queued to cover a round trip."""

    # Delay between a task finishing and its refill reaching the stub, beyond the
    # measured round trip: the stub's FLUSH_DELAY plus the head's event loop and
    # journal write. The window covers it so the stub's queue never runs dry.
    LATENCY = 0.02
    MAX_AHEAD = 1024
    CHUNK_MAX = 2000  # tasks per TASKS frame

    START_MAX = 64  # tasks queued ahead before any duration is known, at most

    def __init__(self, slots: int, rtt: float = 0.001) -> None:
        """Start with nothing in flight and no estimate of task duration."""
        self.slots = slots
        self.rtt = rtt
        self.in_flight = 0
        self.mean_task: float | None = None
        self.start_ahead = slots  # until a duration is known (see _Run.fair_start)
        self.max_ahead = self.MAX_AHEAD  # fewer for large --pipe chunks (memory)
        self.recent: deque[float] = deque(maxlen=self.RECENT)  # the last durations here
        self._typical: float | None = None  # their median (typical)

    RECENT = 5  # durations typical() looks at

    def observe(self, duration: float, known_long: bool = False) -> None:
        """Fold one finished task's duration into the running estimate (and, unless it
        was KNOWN_LONG from an earlier run, into typical(): it says nothing of the host)."""
        if not known_long:
            self.recent.append(duration)
            ordered = sorted(self.recent)
            self._typical = ordered[len(ordered) // 2]
        if self.mean_task is None:
            self.mean_task = duration
        else:
            self.mean_task += 0.2 * (duration - self.mean_task)

    def typical(self) -> float | None:
        """How long a task takes on this host now: the median of its last few, which an
        odd long task does not skew as it does the mean; tasks known to be long (handed
        out first, LPT) are left out. None before any finished."""
        return self._typical

    def ahead(self) -> int:
        """Tasks to keep queued beyond the slots so that no slot waits on the head."""
        if self.mean_task is None:
            return min(self.start_ahead, self.max_ahead)
        # Twice the cover: want() waits until half the queue ahead is used before it
        # refills, and the half that is left must still last a round trip.
        cover = 2 * self.slots * (self.rtt + self.LATENCY) / max(self.mean_task, 1e-4)
        return max(min(1, self.max_ahead), min(self.max_ahead, math.ceil(cover)))

    def want(self) -> int:
        """How many more tasks to send now: none until half the queue ahead is used up,
        then enough to fill it (one chunk, not a frame per finished task)."""
        ahead = self.ahead()
        missing = self.slots + ahead - self.in_flight
        if missing < max(1, ahead // 2):
            return 0
        return min(self.CHUNK_MAX, missing)


# -- The end of the run: a host markedly slower than the others takes only the tasks it
# would finish before they could (each task to the slot that would end it first), and a
# --speculate copy starts where it would end before the running copy is expected to.

SLOW_HOST = 2.0  # a host whose tasks take this many times the others' (typical) is slow
END_SIMULATED = 20_000  # tasks end_share follows at most (the rest: not near the end)


@dataclasses.dataclass(frozen=True, slots=True)
class HostLoad:
    """What the end-of-run rules know of a ready host: its slots, how long a task takes
    there (HostWindow.typical; None: none finished yet) and, for each task it holds in
    the order sent, when it started (the first SLOTS, running) or was sent (queued)."""

    slots: int
    typical: float | None
    sent: tuple[float, ...] = ()


def _slot_frees(load: HostLoad, now: float) -> list[float]:
    """When each of a host's slots should be free, once what it holds is done."""
    assert load.typical is not None
    frees = [now] * load.slots
    for k, sent in enumerate(load.sent):
        if k < load.slots:  # running: due one typical duration after it was sent, or, if
            # past that (a long task, or stuck), about as long again as it has run so far
            frees[k] = sent + load.typical if sent + load.typical > now else 2 * now - sent
        else:  # queued there: runs next on the slot that frees first
            first = min(range(load.slots), key=frees.__getitem__)
            frees[first] += load.typical
    return frees


def is_slow(load: HostLoad, others: list[HostLoad]) -> bool:
    """Whether LOAD's host takes SLOW_HOST times the median of the other ready hosts'
    typical durations (unknown durations: not slow, so nothing is held back on a guess)."""
    known = sorted(o.typical for o in others if o.typical is not None)
    if load.typical is None or not known or known[len(known) // 2] <= 0:
        return False
    return load.typical >= SLOW_HOST * known[len(known) // 2]


def end_share(load: HostLoad, others: list[HostLoad], left: int, now: float, want: int) -> int:
    """How many of the LEFT tasks not handed out yet a host should take now (up to WANT).

    All of them but for a slow host (is_slow): it takes only the tasks that, handed
    one by one to whichever slot would end them first (its own or the other hosts'),
    would land on it. A task it would finish after the others could have is the run's
    tail: 4x slower, its last task ends long after the others are idle."""
    if want <= 0 or left <= 0 or not is_slow(load, others):
        return max(0, want)
    assert load.typical is not None
    known = [o for o in others if o.typical is not None and o.slots > 0]
    # The rate at which all of them finish tasks: far from the end (more work left than
    # two of this host's tasks), every slot stays busy until then and it takes its window.
    rate = sum(o.slots / o.typical for o in known if o.typical) + load.slots / load.typical
    held = sum(len(o.sent) for o in known) + len(load.sent)
    if (left + held) > 2 * load.typical * rate or left > END_SIMULATED:
        return want
    ends: list[tuple[float, int]] = []  # (when the next task there would end, host)
    for index, host in enumerate([load, *known]):
        assert host.typical is not None
        ends.extend((free + host.typical, index) for free in _slot_frees(host, now))
    heapq.heapify(ends)
    durations = [load.typical] + [o.typical or 0.0 for o in known]
    taken = 0
    for _ in range(left):  # ties go to this host (index 0): held back only if later
        end, index = heapq.heappop(ends)
        if index == 0:
            taken += 1
            if taken >= want:
                break
        heapq.heappush(ends, (end + durations[index], index))
    return taken


def sheds(load: HostLoad, others: list[HostLoad], left: int, now: float) -> bool:
    """Whether a host should give back the tasks queued on it (beyond its running ones)
    with LEFT still to hand out: fewer of them would land on it than it holds (end_share)."""
    queued = len(load.sent) - load.slots
    if queued <= 0:
        return False
    running = HostLoad(load.slots, load.typical, load.sent[: load.slots])
    return end_share(running, others, left + queued, now, queued) < queued


def fair_cap(left: int | None, slots: int, ready_slots: int) -> int | None:
    """At most how many tasks a host of SLOTS takes in one refill: once the file is read
    (LEFT tasks not handed out; None: still reading, no cap), its slots' share of them
    among READY_SLOTS, rounded up, so that what is left is not all given to the first."""
    if left is None:
        return None
    return -(-left * slots // max(ready_slots, 1))


@dataclasses.dataclass(frozen=True, slots=True)
class HostQueue:
    """What rebalancing knows of a ready host's queue: the tasks it holds beyond its slots."""

    queued: int  # tasks held beyond its slots (below 0: it has idle slots)
    slots: int
    mean: float | None  # its mean task duration so far (None: none finished yet)
    waited: float  # seconds since its last result (or since work was sent to it idle)
    cost: float  # seconds a DROP and the hand-over cost (HostSession.drop_cost)
    may_drop: bool = True  # False after a DROP found nothing queued, until a result


def worth_taking_back(held: HostQueue) -> bool:
    """Whether taking back a host's queued tasks can pay: they would wait longer than the
    DROP costs (unknown durations: assume it pays).

    The wait is what the mean duration predicts, or, if longer, how long the host has
    gone without a result: a long task after short ones holds the queue behind it
    before the mean knows about it."""
    if held.queued <= 0 or not held.may_drop:
        return False
    if held.mean is None:
        return True
    return max(held.queued * held.mean / held.slots, held.waited) > held.cost


def take_back(queues: list[HostQueue]) -> tuple[list[int], float]:
    """Rebalancing, once no fresh task is left and a host idles: which of QUEUES (their
    indexes) to ask back their queued tasks now, and in how many seconds to look again
    for the others, once their wait will outlast a DROP's cost (inf: no need)."""
    asked: list[int] = []
    again = math.inf
    for index, held in enumerate(queues):
        if worth_taking_back(held):
            asked.append(index)
        elif held.queued > 0 and held.may_drop:
            again = min(again, held.cost - held.waited)
    return asked, again


def copy_pays(origin: HostLoad, helper: HostLoad, sent: float, now: float) -> bool:
    """--speculate: whether a copy of a task running on a slow ORIGIN since SENT, started
    now on an idle slot of HELPER, would end before the running copy is due there."""
    if origin.typical is None or helper.typical is None or not is_slow(origin, [helper]):
        return False
    return now + helper.typical < sent + origin.typical


# ============================================================================
# 7. Host protocol (sans-IO): a stub's frames in, events out; host states
# ============================================================================
# HostProtocol is the head's side of one stub: receive(bytes) yields events (Hello,
# TaskDone, OutputPiece, TasksGivenBack, Pong), the head's requests return the frames
# to send, and it keeps the host's HostState, moved only as HOST_MOVES allows. A frame
# the head did not ask for raises ProtocolError. It does no I/O: the transports (next
# section) move the bytes and act on what it returns.


class OutputRange(NamedTuple):
    """Bytes of a task's stdout that are in the merged output file, not in the journal."""

    path: str  # the output file (its real path)
    dev: int  # its st_dev and st_ino: a file replaced since is not the one written
    ino: int
    offset: int
    length: int


@dataclasses.dataclass
class TaskResult:
    """A finished task, as the run reports it (stdout/stderr hold the tails in memory)."""

    seq: int
    command: str
    host: str
    exit_code: int
    signal: int | None
    timed_out: bool
    duration_s: float
    attempts: int
    stdout: bytes = b""
    stderr: bytes = b""
    pieces: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    arg: str | None = None  # the tasks file's line, when --command made COMMAND from it
    returned: list[str] = dataclasses.field(default_factory=list)  # --return files fetched
    slot: int = 0  # the job slot it ran in (1..all slots of all hosts; 0: not known)
    sent: int = 0  # bytes fed to its stdin (--pipe)
    # Stdout streamed straight into the merged output file, ahead of the tail in stdout:
    # where it is there (MergedOutput.write_direct).
    in_output: OutputRange | None = None

    @property
    def ok(self) -> bool:
        """Whether the task exited 0 in time."""
        return self.exit_code == 0 and not self.timed_out


def _status_fields(status: int) -> tuple[int, int | None]:
    """Turn the stub's status (exit code, or minus the signal) into exit_code and signal."""
    if status < 0:
        return 128 - status, -status
    return status, None


PROBE_WAIT = 2.0  # seconds at least that a silent stub has to answer a ping (_watch)


class HostState(enum.Enum):
    """Where one host's session is; HOST_MOVES says where it may go from each."""

    CONNECTING = "connecting"  # connecting, starting the stub, waiting for its hello
    READY = "ready"  # up: takes tasks
    DRAINING = "draining"  # left the hosts file: finishes what it runs, takes nothing new
    CLOSING = "closing"  # no more work: its stdin is closed, the stub exits once done
    DONE = "done"  # closed as expected
    LOST = "lost"  # failed once up: its tasks went back
    FAILED = "failed"  # never came up
    ABANDONED = "abandoned"  # the run ended before it was up


# Every move a host's state makes, in one place (h11's _state.py): anything else is a bug.
HOST_MOVES: dict[HostState, frozenset[HostState]] = {
    HostState.CONNECTING: frozenset({HostState.READY, HostState.FAILED, HostState.ABANDONED}),
    HostState.READY: frozenset({HostState.DRAINING, HostState.CLOSING, HostState.LOST}),
    # Back to READY: it came back into the hosts file.
    HostState.DRAINING: frozenset({HostState.READY, HostState.CLOSING, HostState.LOST}),
    HostState.CLOSING: frozenset({HostState.DONE, HostState.LOST}),
    HostState.DONE: frozenset(),
    HostState.LOST: frozenset(),
    HostState.FAILED: frozenset(),
    HostState.ABANDONED: frozenset(),
}
HOST_GONE = frozenset(state for state, moves in HOST_MOVES.items() if not moves)


class Close(enum.Enum):
    """How HostProtocol has the transport end a host's channel (finish, drain, retire)."""

    STDIN = "stdin"  # close the stub's stdin: it exits once its running tasks are done
    CONNECTION = "connection"  # drop the connection (kill the subprocess) at once


class ProtocolError(HostError):
    """The stub sent what the head did not ask for: a broken or hostile worker."""

    def __init__(self, host: str, what: str) -> None:
        """Say what HOST's stub sent."""
        super().__init__(host, "protocol", f"the stub sent {what}")


@dataclasses.dataclass
class Hello:
    """The stub is up: what it says about itself (proto, pid, cpus...)."""

    info: dict[str, Any]


@dataclasses.dataclass
class TaskDone:
    """A task the host held has ended (CANCELLED: killed for a halt or the end of the run)."""

    task: Task
    result: TaskResult
    cancelled: bool


@dataclasses.dataclass
class OutputPiece:
    """A piece of a held task's output on STREAM (1 or 2), as the packets it came in."""

    task: Task
    stream: int
    parts: list[bytes]


@dataclasses.dataclass
class TasksGivenBack:
    """The stub gave back these tasks it had not started (the answer to a DROP)."""

    tasks: list[Task]


@dataclasses.dataclass
class Pong:
    """The answer to the ping PAYLOAD, RTT seconds after it was sent."""

    payload: bytes
    rtt: float


@dataclasses.dataclass
class Silent:
    """The stub did not answer a liveness ping: nothing came from it for SECONDS."""

    seconds: float


HostEvent = Hello | TaskDone | OutputPiece | TasksGivenBack | Pong


class HostProtocol:
    """The head's side of one stub's protocol, sans-IO: frames in, events out.

    It keeps what the head knows of the host (its state, the tasks it holds, its
    window, pings out, DROPs asked) and checks each frame against it: a frame the head
    did not ask for raises ProtocolError, the stub's own ERROR a HostError. It decides
    the host's moves (finish, drain, retire, fail, closed) and says what the transport
    must do for them. It does no I/O and knows nothing of the run: the session acts on
    the events and frames it returns."""

    def __init__(self, name: str, slots: int, timed: bool = False, python: str = "python3") -> None:
        """Start connecting to host NAME (SLOTS job slots; TIMED: the run has --timeout;
        PYTHON: the worker's interpreter, as errors name it)."""
        self.name = name
        self.timed = timed
        self.python = python
        self.decoder = FrameDecoder(parts_of=KIND_OUTPUT)
        self.state = HostState.CONNECTING
        self.hello: dict[str, Any] = {}
        self.in_flight: dict[int, Task] = {}
        # Tasks done on the worker whose --return files (or --cleanup) are under way: the
        # host still holds them (they go back if it is lost).
        self.fetching: dict[int, Task] = {}
        # Held tasks whose files are still on their way (hold with STAGING): not sent to
        # the stub until staged(), so nothing from it may name them before then.
        self.staging: set[int] = set()
        self.cancelled: set[int] = set()  # seqs told to CANCEL whose RESULT has not come yet
        self.window = HostWindow(slots)
        self.dropping = False  # a DROP is on its way
        self.drops_asked = 0  # DROPs sent whose DROPPED has not come yet
        self.killing = False  # a DROP "kill" was sent: running tasks may end CANCELLED
        self.halted = False  # a DROP "halt" or "kill" was sent: the stub starts nothing more
        self.may_drop = True  # False after a DROP found nothing, until the next result
        self.progress_at = time.monotonic()  # its last result, or work sent to it idle
        self.rtt: float | None = None
        self._pings: dict[bytes, float] = {}  # pings sent and not answered: payload -> sent at
        self._pinged = 0  # pings sent so far (each payload is unique)
        self.frames_in = 0  # frames received so far
        self.heard_at = time.monotonic()  # when the stub last sent anything
        self.probe_at: float | None = None  # a liveness ping out since then, sent at
        self.error: HostError | None = None  # why it failed or was lost
        self.stderr_tail = bytearray()  # the end of what the stub (or its shell) wrote there
        self.exit_status: int | None = None  # the stub's, once it has exited

    def move(self, state: HostState) -> None:
        """Go to STATE: a move HOST_MOVES does not list is a bug of the head's."""
        if state not in HOST_MOVES[self.state]:
            raise RuntimeError(f"host {self.name}: no move from {self.state.name} to {state.name}")
        self.state = state

    def ping(self) -> tuple[bytes, bytes]:
        """A PING the stub must answer: its payload (unique here) and the frame to send."""
        self._pinged += 1
        payload = b"%d" % self._pinged
        self._pings[payload] = time.perf_counter()
        return payload, encode_frame(KIND_PING, payload)

    def send_tasks(self, tasks: list[Task]) -> list[bytes]:
        """Count TASKS held by the host; return the frames that send them, in order
        (a list, not one buffer: a large --pipe chunk goes out in views, uncopied)."""
        self.hold(tasks)
        frames: list[bytes] = []
        batch: list[tuple[int, bytes, bytes]] = []
        size = 0
        for task in tasks:  # frames stay under FRAME_MAX even with --pipe's data
            data = task.data
            if len(data) > INPUT_PIECE:  # a large chunk: all but its tail in INPUT frames
                if batch:
                    frames.append(encode_frame(KIND_TASKS, encode_tasks(batch)))
                    batch, size = [], 0
                view = memoryview(data)
                tail = len(data) - (len(data) - 1) % INPUT_PIECE - 1
                for start in range(0, tail, INPUT_PIECE):
                    piece = INPUT_HEAD.pack(task.seq) + view[start : start + INPUT_PIECE]
                    frames.append(encode_frame(KIND_INPUT, piece))
                data = data[tail:]
            entry = (task.seq, as_bytes(task.command), data)
            if batch and size + len(entry[1]) + len(entry[2]) > FRAME_MAX // 2:
                frames.append(encode_frame(KIND_TASKS, encode_tasks(batch)))
                batch, size = [], 0
            batch.append(entry)
            size += len(entry[1]) + len(entry[2]) + TASK_HEAD.size
        frames.append(encode_frame(KIND_TASKS, encode_tasks(batch)))
        return frames

    def configure(self, config: dict[str, Any]) -> bytes:
        """The CONFIG frame that sets the stub up; its slots are the window's."""
        self.window.slots = config["slots"]
        return encode_frame(KIND_CONFIG, encode_config(config))

    def staged(self, task: Task) -> bytes:
        """The TASKS frame for a held TASK whose files are now on the worker."""
        self.staging.discard(task.seq)
        entry = (task.seq, task.command.encode("utf-8"), task.data)
        return encode_frame(KIND_TASKS, encode_tasks([entry]))

    def release(self, seq: int) -> bytes:
        """The RELEASE frame: the stub holds its queue for task SEQ's result (--halt); go on."""
        return encode_frame(KIND_RELEASE, INPUT_HEAD.pack(seq))

    def hold(self, tasks: list[Task], staging: bool = False) -> None:
        """Count TASKS held by the host: sent now, or with STAGING once their files are
        there (staged)."""
        now = time.monotonic()
        if not self.in_flight:
            self.progress_at = now
        for task in tasks:
            task.sent = now
            self.in_flight[task.seq] = task
            if staging:
                self.staging.add(task.seq)
        self.window.in_flight += len(tasks)

    def let_go(self, seq: int) -> Task | None:
        """Stop counting task SEQ as held (never sent after all); return it, if it was."""
        task = self.in_flight.pop(seq, None)
        self.staging.discard(seq)
        if task is not None:
            self.window.in_flight -= 1
        return task

    def drop(self, halt: str = "") -> bytes | None:
        """The DROP frame asking back the tasks not started (HALT "halt": start none of
        them; "kill": and kill the running ones), or None if it is not the time for one."""
        if self.state != HostState.READY or (self.dropping and not halt):  # a halt never waits
            return None
        self.dropping = True
        self.drops_asked += 1
        self.killing = self.killing or halt == "kill"  # its tasks come back CANCELLED
        self.halted = self.halted or bool(halt)
        return encode_frame(KIND_DROP, halt.encode())

    def cancel(self, seq: int) -> bytes | None:
        """Task SEQ is done here at once (a --speculate copy that lost): the CANCEL frame
        to send, if the stub can still read one; the RESULT it still sends is ignored."""
        if self.let_go(seq) is None:
            return None
        self.cancelled.add(seq)
        if self.state in (HostState.READY, HostState.DRAINING, HostState.CLOSING):
            return encode_frame(KIND_CANCEL, INPUT_HEAD.pack(seq))
        return None

    def parts(self, paths: list[str]) -> bytes | None:
        """The PARTS frame: PATHS, the files being uploaded now, for the stub to remove if
        the head goes away first (None: the stub reads no more frames)."""
        if self.state in (HostState.READY, HostState.DRAINING):
            return encode_frame(KIND_PARTS, b"\0".join(map(os.fsencode, paths)))
        return None

    def heard(self, now: float) -> None:
        """The stub sent something at NOW: it is alive, and a liveness ping is answered."""
        self.heard_at = now
        self.probe_at = None

    def check_silence(self, now: float, interval: float) -> Silent | bytes | None:
        """Checked every INTERVAL s: the PING to send a stub silent for an interval, Silent
        once it has not answered one, or None."""
        # At least PROBE_WAIT for the answer: a busy worker must not count as a dead one.
        if self.probe_at is not None and now - self.probe_at >= max(2 * interval, PROBE_WAIT):
            return Silent(now - self.heard_at)
        if self.probe_at is None and now - self.heard_at >= interval:
            self.probe_at = now
            return self.ping()[1]
        return None

    # -- the host's moves: what the head decides, and what the transport must do ---------

    def finish(self) -> list[Close]:
        """No more work: a host that is up closes its stdin (CLOSING: the stub exits once
        its tasks are done); one not up yet is dropped (ABANDONED)."""
        if self.state == HostState.CONNECTING:
            self.move(HostState.ABANDONED)
            return [Close.CONNECTION]
        if self.state in (HostState.READY, HostState.DRAINING):
            self.move(HostState.CLOSING)
            return [Close.STDIN]
        return []

    def drain(self) -> list[bytes | Close]:
        """The host left the hosts file: a DROP for the tasks it has not started, then
        DRAINING (it takes nothing new) until retire() closes it; one not up is finished."""
        if self.state == HostState.CONNECTING:
            return [*self.finish()]
        if self.state != HostState.READY:
            return []
        frame = self.drop()
        self.move(HostState.DRAINING)
        return [*([frame] if frame is not None else []), *self.retire()]

    def retire(self) -> list[Close]:
        """A draining host with nothing running, fetched or asked back: finish it."""
        if self.state != HostState.DRAINING or self.in_flight or self.fetching or self.dropping:
            return []
        return self.finish()

    def undrain(self) -> None:
        """The host came back into the hosts file before it was done draining."""
        if self.state == HostState.DRAINING:
            self.move(HostState.READY)

    def fail(self, error: HostError) -> list[Task] | None:
        """The host failed (FAILED if it never came up, else LOST) for ERROR: the tasks it
        held, to go back to the run; None if it had already gone."""
        if self.state in HOST_GONE:
            return None
        self.move(HostState.FAILED if self.state == HostState.CONNECTING else HostState.LOST)
        self.error = error
        tasks = [*self.in_flight.values(), *self.fetching.values()]
        self.in_flight.clear()
        self.fetching.clear()
        self.staging.clear()
        self.window.in_flight = 0
        return tasks

    def stderr(self, data: bytes) -> None:
        """Keep the tail of what the stub (or the shell before it) wrote on stderr."""
        self.stderr_tail += data
        del self.stderr_tail[:-4096]

    def closed(self, reason: str | None = None) -> HostError | None:
        """The channel went away (REASON: the transport's error; None: closed by the other
        end): DONE if the host was closing, else the error to fail it with (fail())."""
        if self.state == HostState.CLOSING:
            self.move(HostState.DONE)
            return None
        if self.state in HOST_GONE:
            return None
        if self.state == HostState.CONNECTING:
            if not self.hello:
                return HostError(self.name, "bootstrap", self._bootstrap_reason())
            # Its hello and its end came in one read (a task sent behind its source killed
            # it at once): it was up, if only just, so it is lost, not a host that failed
            # to start (whose tasks never ran and go back as first tries).
            self.move(HostState.READY)
        if self.exit_status not in (None, 0):
            reason = f"stub exited {self.exit_status}: {self._stderr_text()}"
        return HostError(self.name, "connection", reason or "closed by the remote end")

    def _stderr_text(self) -> str:
        """The last line or so of what the stub or shell wrote on stderr."""
        text = self.stderr_tail.decode("utf-8", "replace").strip()
        return text.splitlines()[-1] if text else "(nothing on stderr)"

    def _bootstrap_reason(self) -> str:
        """Explain why the stub never said hello."""
        text = self._stderr_text()
        status = self.exit_status
        if status == 127 or "not found" in text:
            return f"{self.python} not found on the worker ({text}); set 'python' for this host"
        if "SyntaxError" in text or "AttributeError" in text:
            return f"{self.python} is too old: sshfan needs Python 3.6+ ({text})"
        return f"the stub exited before saying hello (status {status}): {text}"

    # -- receiving ------------------------------------------------------------------

    def receive(self, data: bytes) -> Iterator[HostEvent]:
        """The events in DATA from the stub's stdout, one frame at a time (the caller acts
        on each before the next frame is checked); raises ProtocolError for bytes that are
        not a frame, a frame not asked for or one that does not decode, HostError for the
        stub's ERROR."""
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            raise ProtocolError(self.name, f"bytes that are not a frame: {exc}") from None
        for kind, payload in frames:
            self.frames_in += 1
            if not self.hello and kind not in (KIND_HELLO, KIND_ERROR):
                raise ProtocolError(self.name, f"{frame_name(kind)} before the hello")
            handler = FRAME_KINDS.get(kind, ("", None))[1]
            if handler is None:
                raise ProtocolError(self.name, f"an unexpected {frame_name(kind)}")
            try:
                event = handler(self, payload)
            except (ValueError, KeyError, TypeError, struct.error) as exc:
                # Its payload does not decode (truncated, not JSON, wrong types): the
                # peer's fault, as any frame it was not asked for.
                raise ProtocolError(self.name, f"a bad {frame_name(kind)}: {exc}") from None
            if event is not None:
                yield event

    def _on_hello(self, payload: bytes) -> HostEvent:
        """HELLO: once, a JSON object, our protocol version."""
        if self.hello:
            raise ProtocolError(self.name, "a second hello")
        hello = json.loads(payload)
        if not isinstance(hello, dict) or not hello:
            raise ProtocolError(self.name, f"a hello that is not a JSON object: {payload[:80]!r}")
        if hello.get("proto") != PROTO_VERSION:
            raise HostError(self.name, "bootstrap", f"stub speaks protocol {hello.get('proto')}")
        cpus = hello.get("cpus")  # (None: a stub whose os.cpu_count() could not tell)
        if cpus is not None and (type(cpus) is not int or cpus < 1):
            # slots = "auto" takes it as the host's slots: none or fewer would never
            # be given a task, and a run with no other host would wait on it for good.
            raise ProtocolError(self.name, f"a hello whose cpus is not a count: {cpus!r}")
        self.hello = hello
        return Hello(hello)

    def _on_pong(self, payload: bytes) -> HostEvent:
        """PONG: the answer to a ping sent; it measures the round trip."""
        sent = self._pings.pop(bytes(payload), None)
        if sent is None:
            raise ProtocolError(self.name, f"a pong for no ping: {payload[:80]!r}")
        self.rtt = time.perf_counter() - sent
        self.window.rtt = self.rtt
        return Pong(bytes(payload), self.rtt)

    def _on_output(self, payload: bytes | list[bytes]) -> HostEvent | None:
        """OUTPUT: a piece of a held task's stdout or stderr (a cancelled copy's is dropped)."""
        # A large piece comes as the list of packets it arrived in (see FrameDecoder).
        parts = payload if isinstance(payload, list) else [payload]
        head = parts[0] if len(parts[0]) >= OUTPUT_HEAD.size else b"".join(parts)
        seq, stream = OUTPUT_HEAD.unpack_from(head, 0)
        task = self.in_flight.get(seq)
        if task is None and seq in self.cancelled:
            return None  # a cancelled copy's output: not journaled
        if task is None:
            raise ProtocolError(self.name, f"output for task {seq} it was not given")
        if seq in self.staging:
            raise ProtocolError(self.name, f"output for task {seq} it was not sent yet")
        if stream not in (1, 2):
            raise ProtocolError(self.name, f"output for task {seq} on stream {stream}")
        return OutputPiece(task, stream, parts)

    def _on_result(self, payload: bytes) -> HostEvent | None:
        """RESULT: a held task ended, with flags the head can account for."""
        seq, status, flags, duration, out, err, slot = decode_result(payload)
        if seq in self.cancelled:  # the answer to a CANCEL (or a result that crossed it)
            self.cancelled.discard(seq)
            return None
        task = self.in_flight.get(seq)
        if task is None:
            raise ProtocolError(
                self.name, f"result for task {seq} it was not given (or a second one)"
            )
        if seq in self.staging:
            raise ProtocolError(self.name, f"result for task {seq} it was not sent yet")
        if flags & ~(FLAG_TIMED_OUT | FLAG_CANCELLED):
            raise ProtocolError(self.name, f"result for task {seq} with unknown flags {flags:#x}")
        if flags & FLAG_CANCELLED and self.state != HostState.CLOSING and not self.killing:
            raise ProtocolError(
                self.name, f"task {seq} reported cancelled, but the run did not cancel it"
            )
        if flags & FLAG_TIMED_OUT and not self.timed:
            raise ProtocolError(
                self.name, f"task {seq} reported timed out, but it has no --timeout"
            )
        if not 0.0 <= duration < math.inf:  # (NaN too) jsonl's duration_s would not be JSON
            raise ProtocolError(self.name, f"result for task {seq} lasting {duration!r} s")
        del self.in_flight[seq]
        self.window.in_flight -= 1
        self.window.observe(duration, known_long=task.long)
        self.may_drop = True
        self.progress_at = time.monotonic()
        exit_code, signum = _status_fields(status)
        command = task.command
        if SLOT_MARK in command:  # {%}: the stub put the slot's number there
            command = command.replace(SLOT_MARK, str(slot))
        result = TaskResult(
            seq=seq,
            command=command,
            host=self.name,
            exit_code=exit_code,
            signal=signum,
            timed_out=bool(flags & FLAG_TIMED_OUT),
            duration_s=duration,
            attempts=task.attempts,
            stdout=out,
            stderr=err,
            pieces=task.pieces,
            arg=task.arg,
            slot=slot,
            sent=len(task.data),
        )
        return TaskDone(task, result, cancelled=bool(flags & FLAG_CANCELLED))

    def _on_dropped(self, payload: bytes) -> HostEvent:
        """DROPPED: the answer to a DROP, naming tasks the host held (or had cancelled)."""
        if not self.drops_asked:
            raise ProtocolError(self.name, "DROPPED without a DROP")
        self.drops_asked -= 1
        seqs = json.loads(payload)
        if not isinstance(seqs, list) or len(set(seqs)) != len(seqs):
            raise ProtocolError(self.name, f"DROPPED with a bad list: {payload[:80]!r}")
        unknown = [seq for seq in seqs if seq not in self.in_flight]
        if set(unknown) - self.cancelled:
            raise ProtocolError(self.name, f"DROPPED task {unknown[0]} it does not hold")
        unsent = [seq for seq in seqs if seq in self.staging]
        if unsent:
            raise ProtocolError(self.name, f"DROPPED task {unsent[0]} it was not sent yet")
        self.cancelled.difference_update(unknown)  # dropped before its CANCEL came
        dropped = [self.in_flight.pop(seq) for seq in seqs if seq in self.in_flight]
        self.window.in_flight -= len(dropped)
        self.dropping = False
        self.may_drop = bool(dropped)  # nothing was queued: wait for a result first
        return TasksGivenBack(dropped)

    def _on_error(self, payload: bytes) -> NoReturn:
        """ERROR: the stub stopped; a setup stage it names is the host's, not a stub bug."""
        text = payload.decode("utf-8", "replace")
        stage, sep, reason = text.partition(": ")
        if stage in STUB_STAGES and sep:  # StubStopError: the host's setup, not a stub bug
            raise HostError(self.name, stage, reason)
        raise HostError(self.name, "stub", text)


# Each frame kind's name and, for those a stub may send the head, its handler (execnet's
# _types): a kind without a handler is one only the head sends.
FRAME_KINDS: dict[int, tuple[str, Callable[[HostProtocol, Any], HostEvent | None] | None]] = {
    KIND_HELLO: ("HELLO", HostProtocol._on_hello),
    KIND_CONFIG: ("CONFIG", None),
    KIND_TASKS: ("TASKS", None),
    KIND_PING: ("PING", None),
    KIND_PONG: ("PONG", HostProtocol._on_pong),
    KIND_OUTPUT: ("OUTPUT", HostProtocol._on_output),
    KIND_RESULT: ("RESULT", HostProtocol._on_result),
    KIND_ERROR: ("ERROR", HostProtocol._on_error),
    KIND_DROP: ("DROP", None),
    KIND_DROPPED: ("DROPPED", HostProtocol._on_dropped),
    KIND_INPUT: ("INPUT", None),
    KIND_RELEASE: ("RELEASE", None),
    KIND_CANCEL: ("CANCEL", None),
    KIND_PARTS: ("PARTS", None),
}


def frame_name(kind: int) -> str:
    """A frame kind as errors name it: "RESULT (kind 8)", or "frame of kind 99"."""
    if kind in FRAME_KINDS:
        return f"{FRAME_KINDS[kind][0]} (kind {kind})"
    return f"frame of kind {kind}"


# ============================================================================
# 8. SSH as OpenSSH does it: ssh config, host keys, identities; the receive path
# ============================================================================


@functools.cache
def _ssh_session_class() -> type:
    """The asyncssh session class, built on first use: local-only runs never import asyncssh."""
    import asyncssh

    class _SshStubSession(asyncssh.SSHClientSession):  # type: ignore[type-arg]
        """Feeds an SSH channel's data to its HostSession."""

        def __init__(self, session: HostSession) -> None:
            """Remember the session to feed."""
            self.session = session

        def data_received(self, data: bytes, datatype: int | None) -> None:
            """Route stdout to the frame decoder and stderr to the tail."""
            if datatype == asyncssh.EXTENDED_DATA_STDERR:
                self.session.on_stderr(data)
            else:
                self.session.on_data(data)

        def exit_status_received(self, status: int) -> None:
            """Record the stub's exit status."""
            self.session.exit_status = status

        def connection_lost(self, exc: Exception | None) -> None:
            """The channel closed (cleanly or not)."""
            self.session.on_closed(exc)

    return _SshStubSession


# asyncssh's receive path costs the head more CPU than all else in a run whose tasks print
# a lot: per packet (sshd sends 32 KiB ones) it re-slices its whole input buffer (a
# `bytes` of up to 256 KiB) once or twice, copies the packet four more times on its way
# to the channel, and formats a log line's arguments that nothing prints. The connection
# class below takes a stub channel's plain data packet, when AES-GCM protects it, in one
# step: decrypted in place from a growing bytearray, and handed to the channel (asyncssh's
# own _accept_data, which keeps the window) as a view of the decrypted packet. Any other
# packet, or one that does not check out, is left in the buffer untouched for asyncssh's
# own code, which then decrypts and handles it as ever (so a bad MAC, a rekey, window
# adjusts, EOF and close, the stub's stderr and forwarded channels all go asyncssh's
# way; an SFTP channel's data comes the fast way, as bytes). It reaches into asyncssh's
# internals, so it is used only with the versions whose receive path it was written
# against (the installed source of what it reproduces is checked by a test); with any
# other, sshfan runs on asyncssh's code unchanged.
FAST_RECEIVE_ASYNCSSH = ("2.24.1",)


@functools.cache
def _fast_receive_class() -> type | None:
    """The client connection class with the fast receive path, or None when the installed
    asyncssh is not one it was written against (or lacks a part it relies on)."""
    import asyncssh
    from asyncssh.channel import SSHChannel, SSHClientChannel
    from asyncssh.connection import SSHClientConnection, SSHConnection
    from asyncssh.crypto.cipher import GCMCipher
    from asyncssh.encryption import GCMEncryption
    from asyncssh.logging import SSHLogger

    parts = (
        (SSHConnection, ("_recv_pkthdr", "_recv_data", "_finish_recv_packet", "data_received")),
        (SSHChannel, ("_accept_data",)),
        (GCMCipher, ("_update_iv",)),
        (SSHLogger, ("_debug_level",)),
    )
    if asyncssh.__version__ not in FAST_RECEIVE_ASYNCSSH or not all(
        hasattr(cls, name) for cls, names in parts for name in names
    ):
        return None
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    channel_data = 94  # MSG_CHANNEL_DATA
    length = struct.Struct(">I")
    session_class = _ssh_session_class()

    class _FastReceiveConnection(SSHClientConnection):  # type: ignore[misc]
        """asyncssh's client connection, with a stub channel's data taken in one step."""

        _fast_aead: tuple[Any, Any] | None = None  # (the GCMCipher, its AESGCM) in use

        def data_received(self, data: bytes, datatype: Any = None) -> None:
            """Append DATA to the input buffer (in place, once it is a bytearray) and parse."""
            buf = self._inpbuf
            if type(buf) is bytearray:
                buf += data
            else:
                self._inpbuf = buf + data
            self._recv_data()

        def _recv_pkthdr(self) -> bool:
            """Take the next packet: a stub's data at once, any other through asyncssh."""
            if (
                type(self._recv_encryption) is GCMEncryption
                and self._decompressor is None
                and self._auth_complete
                and self.logger._debug_level < 2  # asyncssh would log each packet
            ):
                taken = self._recv_channel_data()
                if taken is not None:
                    return taken
            if type(self._inpbuf) is not bytes:  # asyncssh's own code slices bytes
                self._inpbuf = bytes(self._inpbuf)
            return super()._recv_pkthdr()

        def _recv_channel_data(self) -> bool | None:
            """Handle the next packet if it is plain data for a session channel: True when
            it did, False when the packet is not all here yet, None to leave it (and the
            buffer as it was) to asyncssh."""
            buf = self._inpbuf
            if type(buf) is not bytearray:
                buf = self._inpbuf = bytearray(buf)
            if len(buf) < 4:
                return False
            (size,) = length.unpack_from(buf)
            end = 4 + size + self._recv_macsize  # length (clear, authenticated), body, tag
            if size > self._max_recv_pktlen:
                return None  # asyncssh's own check says so
            if len(buf) < end:
                return False
            cipher = self._recv_encryption._cipher
            aead = self._fast_aead
            if aead is None or aead[0] is not cipher:  # new keys: a new GCMCipher
                aead = self._fast_aead = (cipher, AESGCM(cipher._key))
            with memoryview(buf) as view:
                try:
                    plain = aead[1].decrypt(cipher._iv, view[4:end], view[:4])
                except InvalidTag:
                    return None
            # padding length, type, channel (4), data length (4), data, padding
            if len(plain) < 10 or plain[1] != channel_data:
                return None
            channel = self._channels.get(int.from_bytes(plain[2:6], "big"))
            count = int.from_bytes(plain[6:10], "big")
            if (
                type(channel) is not SSHClientChannel
                or channel._recv_state != "open"
                or count > channel._recv_window
                or 10 + count + plain[0] != len(plain)
            ):
                return None
            # Decrypted for good: as asyncssh would have, step the IV, drop the packet.
            cipher._update_iv()
            seq = self._recv_seq
            del buf[:end]  # in place: what is left moves only once it is under half
            data = memoryview(plain)[10 : 10 + count]
            if type(channel._session) is not session_class:
                data = bytes(data)  # asyncssh's own sessions (SFTP) get bytes
            channel._accept_data(data)
            self._finish_recv_packet(channel_data, seq)
            return True

    return _FastReceiveConnection


def _use_fast_receive(conn: Any) -> None:
    """Give CONN (an open asyncssh client connection) the fast receive path, if it may."""
    import asyncssh

    fast = _fast_receive_class()
    if fast is not None and type(conn) is asyncssh.SSHClientConnection:
        conn.__class__ = fast


# A quicker login (section 8). asyncssh logs in as OpenSSH's client does: a "none"
# request first, to learn the server's methods, then each public key offered without a
# signature, and signed only once the server says it would take it. Each of those is a
# round trip, and for sshd a pass through its privilege-separated monitor. RFC 4252
# lets a client send a key with its signature at once (section 7), and a client that
# holds keys has no use for the "none" reply first: the reply to a key that fails lists
# the methods anyway. So a key loaded in this process goes signed straight away, and
# "none" goes last, if nothing else is left. A key held elsewhere is still offered
# first: each signature may ask the user (ssh-add -c) or a security key's touch. With
# a GSS context asyncssh's order stays (OpenSSH tries gssapi-with-mic first too). Like
# the receive path, it reaches into asyncssh's internals, so it is used only with the
# asyncssh versions it was written against (a test checks the installed source).
QUICK_LOGIN_ASYNCSSH = ("2.24.1",)


@functools.cache
def _quick_login_parts() -> tuple[type, Callable[..., Any], Callable[..., None]] | None:
    """What the quick login needs of asyncssh: (its public key auth, signing at once;
    asyncssh's auth lookup; asyncssh's try_next_auth), or None when the installed
    asyncssh is not one it was written against."""
    import asyncssh
    from asyncssh import auth as ssh_auth
    from asyncssh.connection import SSHClientConnection
    from asyncssh.packet import Boolean, String
    from asyncssh.public_key import SSHLocalKeyPair

    parts = (
        (ssh_auth._ClientPublicKeyAuth, ("_start", "_send_signed_request")),
        (SSHClientConnection, ("try_next_auth", "public_key_auth_requested")),
        (ssh_auth, ("lookup_client_auth",)),
    )
    if asyncssh.__version__ not in QUICK_LOGIN_ASYNCSSH or not all(
        hasattr(owner, name) for owner, names in parts for name in names
    ):
        return None

    class _SignedAtOnce(ssh_auth._ClientPublicKeyAuth):  # type: ignore[misc,name-defined]
        """Public key auth that sends a key this process holds with its signature at
        once, and offers any other key first, as asyncssh does."""

        async def _start(self) -> None:
            """Take the next key: send it signed if it is signed here, else offer it."""
            keypair = await self._conn.public_key_auth_requested()
            if keypair is None:
                self._conn.try_next_auth(next_method=True)
                return
            self._keypair = keypair
            self.logger.debug1("Trying public key auth with %s key", keypair.algorithm)
            if type(keypair) is SSHLocalKeyPair and b"sk-" not in bytes(keypair.algorithm):
                await self._send_signed_request()
            else:  # as asyncssh: unsigned, and signed once the server says it would do
                await self.send_request(
                    Boolean(False), String(keypair.algorithm), String(keypair.public_data)
                )

    return _SignedAtOnce, ssh_auth.lookup_client_auth, SSHClientConnection.try_next_auth


def _quicken_login(conn: Any) -> None:
    """Give CONN (an asyncssh client connection whose auth has not begun) the quicker
    login, if the installed asyncssh is one it knows."""
    parts = _quick_login_parts()
    if parts is None or getattr(conn, "_gss", None) is not None:
        return
    signed_at_once, lookup, next_auth = parts
    none = ["first"]  # "none": first (asyncssh's), put off (goes last), or sent

    def try_next_auth(*, next_method: bool = False) -> None:
        """asyncssh's choice of the next method, with "none" put off and public keys
        taken by _SignedAtOnce."""
        if conn._auth:
            conn._auth.cancel()
            conn._auth = None
        methods = conn._auth_methods
        if next_method:
            methods.pop(0)
        elif none[0] == "first" and methods == [b"none"]:  # keys before "none"
            methods[:] = [b"publickey"]
            none[0] = "put off"
        if not methods and none[0] == "put off":
            methods.append(b"none")
            none[0] = "sent"
        while methods:
            method = methods[0]
            auth = signed_at_once(conn, method) if method == b"publickey" else lookup(conn, method)
            if auth:
                conn._auth = auth
                return
            methods.pop(0)
        next_auth(conn)  # nothing left: asyncssh's own end (auth failed)

    conn.try_next_auth = try_next_auth


@functools.cache
def _ssh_client_class() -> type:
    """The asyncssh client every sshfan connection is made with: asyncssh's own, with
    the quicker login given to each connection as it opens."""
    import asyncssh

    class _Client(asyncssh.SSHClient):  # type: ignore[misc]
        """An asyncssh client that quickens its connection's login."""

        def connection_made(self, conn: Any) -> None:
            """The TCP connection is up; the login has not begun."""
            _quicken_login(conn)

    return _Client


def _preferred_ciphers() -> list[str]:
    """asyncssh's default ciphers with AES-GCM first (about 1.6x chacha20's throughput here)."""
    from asyncssh.encryption import get_default_encryption_algs

    names = [alg.decode() for alg in get_default_encryption_algs()]
    first = [n for n in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com") if n in names]
    return first + [n for n in names if n not in first]


def _exc_reason(exc: BaseException) -> str:
    """A short human reason for a connection-level exception."""
    return getattr(exc, "reason", None) or str(exc) or type(exc).__name__


def _jump_host(hop: str) -> tuple[str | None, str, int | None]:
    """User, host and port of one ProxyJump hop: [user@]host[:port] or ssh://... as OpenSSH."""
    hop = hop.strip().removeprefix("ssh://")
    user, _, host = hop.rpartition("@")
    port = None
    if host.startswith("[") and "]" in host:  # [IPv6]:port
        host, _, rest = host[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    elif host.count(":") == 1:
        host, _, text = host.partition(":")
        port = int(text) if text.isdigit() else None
    return user or None, host, port


def _usable_identity(path: str) -> bool:
    """Whether OpenSSH would use an identity file: it exists and only its owner can read it."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return not (info.st_uid == os.getuid() and info.st_mode & 0o077)


def _connect_failure(target: SshTarget, exc: OSError) -> tuple[str, str]:
    """The stage and cause of an OSError met while connecting, named as OpenSSH names them."""
    import errno

    if isinstance(exc, socket.gaierror):
        return "connect", f"cannot resolve {target.host}: {exc.strerror}"
    if exc.filename:  # a file read on this machine: an identity or its certificate
        return "auth", f"cannot read {exc.filename}: {exc.strerror}"
    text = str(exc)
    refused = f"[Errno {errno.ECONNREFUSED}]"
    # Several addresses (IPv6 and IPv4) all refusing come as one "Multiple exceptions".
    if exc.errno == errno.ECONNREFUSED or (
        text.startswith("Multiple exceptions") and text.count(refused) == text.count("[Errno")
    ):
        return "connect", f"{target.where}: connection refused"
    return "connect", f"{target.where}: {exc.strerror or text}"


_DEFAULT_IDENTITIES = (
    "id_ed25519_sk",
    "id_ecdsa_sk",
    "id_ed448",
    "id_ed25519",
    "id_ecdsa",
    "id_rsa",
    "id_dsa",
)


def _auth_failure(target: SshTarget, options: dict[str, Any]) -> str:
    """Say that the server took none of the keys offered, and which they were."""
    keys = options.get("client_keys")
    if keys is None:  # asyncssh's default files, as OpenSSH's
        found = (Path("~", ".ssh", name).expanduser() for name in _DEFAULT_IDENTITIES)
        keys = [str(path) for path in found if path.exists()]
    offered = list(keys)
    if os.environ.get("SSH_AUTH_SOCK"):
        offered.append("the keys in ssh-agent")
    tried = ", ".join(offered) if offered else "none (no identity file, no ssh-agent)"
    return (
        f"permission denied for {target.user}@{target.where}: "
        f"the server accepted none of the keys offered: {tried}"
    )


def _ssh_pattern(pattern: str) -> re.Pattern[str]:
    """An OpenSSH host pattern as a regex: only * and ? are wildcards ([ ] are literal)."""
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    )


@dataclasses.dataclass(frozen=True)
class SshTarget:
    """An SSH host as OpenSSH sees it once ~/.ssh/config is applied: where, and whose key."""

    host: str  # HostName: what is connected to
    port: int
    user: str
    key_name: str  # its name in known_hosts: HostKeyAlias, HOST, or [HOST]:PORT
    known_hosts: tuple[str, ...]  # the files its key is looked up in, expanded
    record_in: str | None  # the file a first-seen key is added to (the first user file)
    strict: str  # StrictHostKeyChecking: "yes", "accept-new", "no"; "off": no checking
    hash_names: bool  # HashKnownHosts: record new names hashed
    identities: tuple[str, ...]  # identity files named for it (hosts file, else IdentityFile)
    proxy_jump: str | None = None  # ssh config's ProxyJump: hosts to connect through

    @property
    def where(self) -> str:
        """Address and port as OpenSSH's messages write them."""
        return f"{self.host} port {self.port}"


# OpenSSH's defaults (ssh_config(5)); "ask" cannot ask in a batch run, so it is "yes".
_USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
_STRICT_VALUES = {
    "yes": "yes",
    "true": "yes",
    "ask": "yes",
    "accept-new": "accept-new",
    "no": "no",
    "off": "no",
    "false": "no",
}


# asyncssh's X.509 certificate support: OpenSSH has none, so neither does sshfan (below).
_ASYNCSSH_X509 = "asyncssh.crypto.x509"


def _import_asyncssh() -> None:
    """Import asyncssh (once) without the parts of its start that an OpenSSH peer never uses.

    As it imports, asyncssh looks for liboqs (post-quantum key exchange) and nettle (UMAC)
    with ctypes.util.find_library, which for a library the ld.so cache does not list goes
    on to run gcc and then ld: ten processes for an absent liboqs, a noticeable part of
    every SSH run's start. While asyncssh imports, the cache alone answers: both are
    optional (asyncssh then offers its other algorithms), and what gcc or ld find outside
    the cache dlopen mostly could not load by that name. Nothing changes with
    LD_LIBRARY_PATH set (ld's step searches it) or where ctypes has no cache step.

    It also tries X.509 certificate support, for host and user keys in X.509
    certificates: an SSH extension OpenSSH does not implement, so no OpenSSH server,
    known_hosts or authorized_keys file sshfan meets holds one. The try imports
    cryptography's x509 package, the largest single part of asyncssh's import, and then
    usually fails anyway (it needs pyOpenSSL). Skipped, asyncssh goes on as it does
    without pyOpenSSL, with OpenSSH's key and certificate types; the module stays
    importable for anyone who asks for it later."""
    if "asyncssh" in sys.modules:
        return
    import ctypes.util

    from_cache = getattr(ctypes.util, "_findSoname_ldconfig", None)
    full = ctypes.util.find_library
    cached = from_cache is not None and not os.environ.get("LD_LIBRARY_PATH")
    blocked = sys.modules.setdefault(_ASYNCSSH_X509, None) is None
    if cached:
        ctypes.util.find_library = from_cache
    try:
        import asyncssh  # noqa: F401
    finally:
        ctypes.util.find_library = full
        if blocked and sys.modules.get(_ASYNCSSH_X509, 0) is None:
            del sys.modules[_ASYNCSSH_X509]


@functools.cache
def _ssh_config_class() -> type:
    """asyncssh's ssh config parser, taught the host key options it does not read itself."""
    from asyncssh.config import SSHClientConfig, SSHConfig

    class _OpenSshConfig(SSHClientConfig):  # type: ignore[misc]
        """~/.ssh/config as asyncssh reads it, plus StrictHostKeyChecking and HashKnownHosts."""

        # OpenSSH expands %d, %h, %p, ... in these file names too.
        _percent_expand = {*SSHClientConfig._percent_expand, "UserKnownHostsFile"}
        _handlers = {
            **SSHClientConfig._handlers,
            "stricthostkeychecking": ("StrictHostKeyChecking", SSHConfig._set_string),
            "hashknownhosts": ("HashKnownHosts", SSHConfig._set_bool),
        }

    return _OpenSshConfig


def _ssh_config_path() -> Path | None:
    """The ssh config file asyncssh reads (~/.ssh/config), if there is a readable one."""
    path = Path("~", ".ssh", "config").expanduser()
    return path if os.access(path, os.R_OK) else None


def ssh_target(spec: HostSpec) -> SshTarget:
    """Resolve SPEC through ~/.ssh/config as OpenSSH would; UsageError if the config is bad."""
    import getpass

    _import_asyncssh()  # (the first SSH step of a run, a check or an `all`)

    address = spec.address or spec.name
    path = _ssh_config_path()
    try:
        config = _ssh_config_class().load(
            None,
            [path] if path else [],
            False,
            False,
            False,
            getpass.getuser(),
            spec.user or (),
            address,
            spec.port or (),
        )
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: {exc}") from None
    host = str(config.get("Hostname") or address).lower()  # as ssh(1) lowercases it
    port = int(config.get("Port") or 22)
    alias = config.get("HostKeyAlias")
    key_name = str(alias) if alias else host if port == 22 else f"[{host}]:{port}"
    user_files = config.get("UserKnownHostsFile")
    user_files = _USER_KNOWN_HOSTS if user_files is None else tuple(user_files)
    global_files = config.get("GlobalKnownHostsFile")
    global_files = _GLOBAL_KNOWN_HOSTS if global_files is None else tuple(global_files)
    strict = str(config.get("StrictHostKeyChecking") or "ask").lower()
    if strict not in _STRICT_VALUES:
        raise UsageError(
            f"{path}: StrictHostKeyChecking {strict!r} is not one of yes, no, ask, accept-new, off"
        )
    strict = _STRICT_VALUES[strict]
    known = spec.known_hosts
    if known is False:
        user_files, global_files = (), ()
        strict = "off"
    elif known == "accept-new":  # as StrictHostKeyChecking=accept-new, in ssh config's files
        strict = "accept-new"
    elif isinstance(known, str):  # a file named in the hosts file: that file, strictly
        user_files, global_files = (known,), ()
        strict = "yes"
    files = (*user_files, *global_files)
    identities = spec.identity or tuple(str(p) for p in config.get("IdentityFile") or ())
    return SshTarget(
        host=host,
        port=port,
        user=str(config.get("User") or getpass.getuser()),
        key_name=key_name,
        known_hosts=tuple(os.path.expanduser(f) for f in files),
        record_in=os.path.expanduser(user_files[0]) if user_files else None,
        strict=strict,
        hash_names=bool(config.get("HashKnownHosts")),
        identities=tuple(os.path.expanduser(p) for p in identities),
        proxy_jump=str(config.get("ProxyJump") or "") or None,
    )


@dataclasses.dataclass(frozen=True)
class KnownHost:
    """One known_hosts line that names a host: where it is, and the key it gives."""

    path: str
    line: int
    marker: str  # "", "@cert-authority" or "@revoked"
    key: str  # "TYPE BASE64"


def _name_matches(patterns: str, name: str) -> bool:
    """Whether a known_hosts line's host field names NAME (plain, wildcard, !negated, hashed)."""
    matched = False
    for pattern in patterns.split(","):
        if pattern.startswith("|1|") and pattern.count("|") == 3:
            salt, digest = pattern[3:].split("|")
            with contextlib.suppress(ValueError):
                mac = hmac.new(base64.b64decode(salt), name.encode(), "sha1").digest()
                matched = matched or mac == base64.b64decode(digest)
        elif pattern.startswith("!"):
            if _ssh_pattern(pattern[1:].lower()).fullmatch(name.lower()):
                return False  # a negated match rules the line out, whatever else matches
        elif _ssh_pattern(pattern.lower()).fullmatch(name.lower()):
            matched = True
    return matched


def known_host_entries(files: Iterable[str], name: str) -> list[KnownHost]:
    """Every line of the known_hosts FILES that names NAME (a key name as OpenSSH files it)."""
    found = []
    for path in files:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue  # a missing file knows no host, as in OpenSSH
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            marker = fields[0] if fields and fields[0].startswith("@") else ""
            if marker:
                fields = fields[1:]
            if len(fields) < 3 or fields[0].startswith("#"):
                continue
            if _name_matches(fields[0], name):
                found.append(KnownHost(path, number, marker, f"{fields[1]} {fields[2]}"))
    return found


def _trusted_keys(entries: list[KnownHost]) -> tuple[list[Any], list[Any], list[Any]]:
    """The host keys, CA keys and revoked keys ENTRIES give, as asyncssh takes them."""
    import asyncssh

    keys: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
    for entry in entries:
        try:
            key = asyncssh.import_public_key(entry.key)
        except (asyncssh.KeyImportError, ValueError):
            continue  # a key type asyncssh does not know cannot match the host's
        index = {"": 0, "@cert-authority": 1, "@revoked": 2}.get(entry.marker)
        if index is not None:
            keys[index].append(key)
    return keys


def _record_host_key(target: SshTarget, key: Any) -> str | None:
    """Record a first-seen host key as OpenSSH does; return the file (None: not recorded)."""
    import fcntl

    path = target.record_in
    if path is None:  # UserKnownHostsFile none: OpenSSH has nowhere to record it either
        return None
    public = " ".join(key.export_public_key("openssh").decode("ascii").split()[:2])
    name = target.key_name
    if target.hash_names:
        salt = os.urandom(20)
        digest = hmac.new(salt, name.encode(), "sha1").digest()
        name = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
    # ~/.ssh may not exist yet on a fresh account: OpenSSH creates it, private (and
    # creates no other directory).
    if os.path.dirname(path) == os.path.expanduser("~/.ssh"):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path, "a", encoding="ascii") as handle:
        # Several hosts (or runs) may meet the same new key at once: one records it.
        fcntl.flock(handle, fcntl.LOCK_EX)
        if any(e.key == public for e in known_host_entries([path], target.key_name)):
            return None
        handle.write(f"{name} {public}\n")
    return path


def _host_key_hint(target: SshTarget, reason: str) -> str:
    """Explain a host key failure (changed key, or unknown host) with a command that fixes it."""
    entries = [e for e in known_host_entries(target.known_hosts, target.key_name) if not e.marker]
    quoted = shlex.quote(target.key_name)
    if entries:
        where = ", ".join(f"{e.path}:{e.line}" for e in entries)
        removes = " && ".join(
            f"ssh-keygen -f {shlex.quote(p)} -R {quoted}"
            for p in dict.fromkeys(e.path for e in entries)
        )
        return (
            f"the host key for {target.key_name} does not match the one recorded at {where} "
            f"({reason}); if the host was reinstalled, remove the old key with: {removes}"
        )
    if not target.known_hosts:
        return f"unknown host: no known_hosts file is set for {target.key_name} ({reason})"
    files = ", ".join(target.known_hosts[:1] if len(target.known_hosts) > 2 else target.known_hosts)
    port = f" -p {target.port}" if target.port != 22 else ""
    scan = f"ssh-keyscan{port} {shlex.quote(target.host)}"
    plain = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
    if target.key_name != plain:  # HostKeyAlias: file the key under the alias
        alias = re.sub(r"([/&\\])", r"\\\1", target.key_name)
        scan += f" | sed {shlex.quote(f's/^[^ ]*/{alias}/')}"
    return (
        f"unknown host: no key for {target.key_name} in {files} ({reason}); "
        'set known_hosts = "accept-new", or add its key with: '
        f"{scan} >> {shlex.quote(target.record_in or target.known_hosts[0])}"
    )


def _agent_keys() -> list[bytes] | None:
    """The public key blobs ssh-agent holds, or None when no agent answers at $SSH_AUTH_SOCK."""
    path = os.environ.get("SSH_AUTH_SOCK")
    if not path:
        return None

    def read(sock: socket.socket, size: int) -> bytes:
        """Exactly SIZE bytes from the agent."""
        data = b""
        while len(data) < size:
            more = sock.recv(size - len(data))
            if not more:
                raise OSError("the agent closed the connection")
            data += more
        return data

    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(struct.pack(">IB", 1, 11))  # SSH_AGENTC_REQUEST_IDENTITIES
            (length,) = struct.unpack(">I", read(sock, 4))
            reply = read(sock, min(length, 1 << 24))
    except OSError:
        return None
    if not reply or reply[0] != 12:  # SSH_AGENT_IDENTITIES_ANSWER
        return None
    blobs, offset = [], 5
    with contextlib.suppress(struct.error):  # a short answer: the keys read so far
        for _ in range(struct.unpack_from(">I", reply, 1)[0]):
            (size,) = struct.unpack_from(">I", reply, offset)
            blobs.append(reply[offset + 4 : offset + 4 + size])
            (comment,) = struct.unpack_from(">I", reply, offset + 4 + size)
            offset += 8 + size + comment
    return blobs


def _public_blob(path: str, data: bytes) -> bytes | None:
    """The public key of an encrypted private key: from PATH.pub, or its openssh-key-v1 header."""
    import asyncssh

    with contextlib.suppress(OSError, ValueError):
        return bytes(asyncssh.read_public_key(path + ".pub").public_data)
    with contextlib.suppress(ValueError, struct.error, IndexError):
        body = b"".join(data.split(b"-----")[2].split())
        raw = base64.b64decode(body)
        magic = b"openssh-key-v1\0"
        if not raw.startswith(magic):
            return None
        offset = len(magic)  # then: cipher, kdf and kdf options, the key count, the key
        for _ in range(3):
            offset += 4 + struct.unpack_from(">I", raw, offset)[0]
        (size,) = struct.unpack_from(">I", raw, offset + 4)  # after the key count
        return raw[offset + 8 : offset + 8 + size]
    return None


def _check_identity(path: str, where: str) -> None:
    """Refuse (exit 2) an identity file OpenSSH could not use: missing, open to others, not a
    private key, or with a passphrase and no ssh-agent holding it."""
    import asyncssh

    try:
        info = os.stat(path)
        with open(path, "rb") as handle:
            data = handle.read(1 << 20)
    except OSError as exc:
        raise UsageError(f"{where}: identity file {path}: {exc.strerror}") from None
    try:
        asyncssh.import_private_key(data)
        problem = ""
    except asyncssh.KeyImportError as exc:
        problem = str(exc)
    if problem and not problem.startswith("Passphrase"):
        with contextlib.suppress(asyncssh.KeyImportError, ValueError):
            asyncssh.import_public_key(data)
            problem = "it is a public key; name the private key (without .pub)"
        raise UsageError(f"{where}: identity file {path} is not a private key: {problem}")
    if info.st_uid == os.getuid() and info.st_mode & 0o077:
        mode = info.st_mode & 0o777
        raise UsageError(
            f"{where}: identity file {path}: permissions {mode:04o} are too open (OpenSSH "
            f"refuses it: UNPROTECTED PRIVATE KEY FILE); run 'chmod 600 {shlex.quote(path)}'"
        )
    if not problem:
        return
    held = _agent_keys()
    blob = _public_blob(path, data)
    if held is None or (blob is not None and blob not in held) or not held:
        agent = "no ssh-agent answers" if held is None else "ssh-agent does not hold it"
        start = "eval $(ssh-agent) && " if held is None else ""
        raise UsageError(
            f"{where}: identity file {path} has a passphrase and {agent}; "
            f"run '{start}ssh-add {shlex.quote(path)}' first"
        )


def preflight(hosts: list[HostSpec], where: str = "hosts file") -> None:
    """Check what this machine holds for the SSH hosts (ssh config, identity and known_hosts
    files), before anything is opened for writing: a problem is bad input (exit 2)."""
    seen: set[tuple[str, ...]] = set()
    for spec in hosts:
        if spec.local:
            continue
        target = ssh_target(spec)
        for path in target.identities if spec.identity else ():
            if ("identity", path) not in seen:
                seen.add(("identity", path))
                _check_identity(path, f"{where}: host {spec.name}")
        named = spec.known_hosts
        if isinstance(named, str) and named != "accept-new" and ("known", named) not in seen:
            # A file the hosts file names that is not there is most likely a typo: with
            # strict checking OpenSSH would call every host unknown.
            seen.add(("known", named))
            path = target.known_hosts[0]
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise UsageError(
                    f"{where}: host {spec.name}: known_hosts file {path}: {exc.strerror}"
                ) from None


# ============================================================================
# 9. Transports (SSH, local, forked) and HostSession, which drives a host's protocol
# ============================================================================


def _protocol_attribute(name: str) -> property:
    """A HostSession attribute that is its HostProtocol's NAME, read and written through."""
    return property(
        lambda self: getattr(self.protocol, name),
        lambda self, value: setattr(self.protocol, name, value),
        doc=f"The protocol's {name}.",
    )


# What a session tells its run, all through _Run.deliver: the protocol's TaskDone (once
# a task's --return files are back), OutputPiece and TasksGivenBack, and these.


@dataclasses.dataclass
class HostLost:
    """The host failed to start or was lost (ERROR says why): TASKS it held go back."""

    error: HostError
    tasks: list[Task]


@dataclasses.dataclass
class Settled:
    """The host's events so far are all delivered: the run may journal, refill, finish."""


@dataclasses.dataclass
class SourceSent:
    """The stub's source is on its way: the run may send CONFIG and tasks behind it."""


RunEvent = TaskDone | OutputPiece | TasksGivenBack | HostLost | Settled | SourceSent


class StubTransport:
    """One stub's channel, and nothing else: it opens (each kind its own way), writes,
    closes the stub's stdin, aborts and closes; what comes out (stdout, stderr, the exit
    status, the end) its callbacks feed to SESSION. Nothing is written before it opens."""

    def __init__(self, session: HostSession) -> None:
        """Prepare (but do not open) the channel that feeds SESSION."""
        self.session = session
        self._stdin: Any = None  # the stub's stdin, once open

    def write(self, data: bytes) -> None:
        """Write DATA to the stub's stdin."""
        if self._stdin is not None:
            self._stdin.write(data)

    def write_eof(self) -> None:
        """Close the stub's stdin: it exits once its tasks are done."""
        if self._stdin is not None:
            self._stdin.close()

    def abort(self) -> None:
        """End the stub at once (kill it, or drop its connection)."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of the channel without waiting (a local stub still running is killed)."""
        raise NotImplementedError


class LocalTransport(StubTransport):
    """A local stub started as a new Python subprocess (no SSH), on its three pipes."""

    _process: asyncio.SubprocessTransport | None = None

    async def open(self, python: str, code: str) -> None:
        """Start PYTHON running CODE (the bootstrap); HostError if it cannot start."""
        loop = asyncio.get_running_loop()
        python = os.path.expanduser(python)
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: _LocalStubProtocol(self.session),
                python,
                "-S",  # no site: the stub needs only the standard library
                "-c",
                code,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=login_environ(),  # as the user's shell gave it, not as Python changed it
            )
        except OSError as exc:
            raise HostError(
                self.session.name, "bootstrap", f"cannot start {python}: {exc.strerror}"
            ) from None
        self._process = transport
        self._stdin = transport.get_pipe_transport(0)

    def abort(self) -> None:
        """Kill the stub."""
        if self._process is not None:
            self._process.kill()

    def close(self) -> None:
        """Let go of the subprocess, killing it if it has not exited."""
        process, self._process = self._process, None
        if process is not None:
            if process.get_returncode() is None:
                process.kill()
            process.close()


class ForkTransport(StubTransport):
    """A local stub forked from the head (no second Python start), on three pipes."""

    _stub: _ForkedStub | None = None

    async def open(self) -> None:
        """Fork the stub and wire its pipes in; HostError if it cannot fork."""
        try:
            pid, in_w, out_r, err_r = _fork_stub()
        except OSError as exc:
            raise HostError(
                self.session.name, "bootstrap", f"cannot fork: {exc.strerror}"
            ) from None
        self._stub = _ForkedStub(self.session, pid)
        self._stdin = await self._stub.connect(in_w, out_r, err_r)

    def abort(self) -> None:
        """Kill the stub (unless it was reaped already)."""
        if self._stub is not None:
            self._stub.kill()

    def close(self) -> None:
        """Close the head's ends of its pipes, killing a stub still running."""
        stub, self._stub = self._stub, None
        if stub is not None:
            stub.close()


class SshTransport(StubTransport):
    """A stub on a session channel of its own SSH connection to SPEC's host: connects as
    OpenSSH would (ssh config, host keys checked and recorded, ProxyJump), then runs the
    bootstrap on a channel. LOG takes its warnings (a changed key let through, a key
    recorded)."""

    conn: Any = None  # the asyncssh connection, once open() has it

    def __init__(self, session: HostSession, spec: HostSpec, log: Callable[[str], None]) -> None:
        """Prepare (but do not open) the connection to SPEC's host that feeds SESSION."""
        super().__init__(session)
        self.spec = spec
        self.name = spec.name
        self.log = log

    async def open(self, code: str) -> None:
        """Connect, and start the stub through the fixed bootstrap command running CODE."""
        spec = self.spec
        target = ssh_target(spec)
        jump = await self._open_jumps(target) if target.proxy_jump else None
        try:
            conn = await self._connect_checked(spec, target, jump)
        except BaseException:
            if jump is not None:
                jump.close()
            raise
        if jump is not None:
            conn.set_tunnel(jump)  # closed with the connection, as asyncssh's own
        # -S: no site module; the stub needs only the standard library, and site's .pth
        # files cost a worker 20-30 ms of start-up.
        command = f"{shlex.quote(spec.python)} -S -c {shlex.quote(code)}"
        await self._start(conn, command)

    async def _start(self, conn: Any, command: str) -> None:
        """Run COMMAND (the bootstrap) on a channel of CONN, which this transport now owns
        (closing it closes CONN); HostError if no channel opens."""
        import asyncssh

        self.conn = conn
        try:
            channel, _ = await conn.create_session(
                lambda: _ssh_session_class()(self.session), command, encoding=None
            )
        except (OSError, asyncssh.Error) as exc:
            self.close()
            reason = getattr(exc, "reason", None) or str(exc)
            raise HostError(
                self.session.name, "bootstrap", f"cannot open a channel: {reason}"
            ) from None
        _use_fast_receive(conn)
        self._stdin = channel

    def write_eof(self) -> None:
        """Send EOF on the channel: the stub exits once its tasks are done."""
        if self._stdin is not None:
            self._stdin.write_eof()

    def abort(self) -> None:
        """Drop the connection at once."""
        if self.conn is not None:
            self.conn.abort()

    def close(self) -> None:
        """Close the connection without waiting."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def take_connection(self) -> Any:
        """Hand the connection over (to wake a stopped stub before closing it): this
        transport no longer writes to it, aborts or closes it."""
        conn, self.conn, self._stdin = self.conn, None, None
        return conn

    async def _connect_checked(self, spec: HostSpec, target: SshTarget, tunnel: Any) -> Any:
        """Connect to TARGET (over TUNNEL, a jump host's connection, if given), its host key
        checked and a first-seen one recorded as OpenSSH does; return the connection."""
        import asyncssh

        options: dict[str, Any] = {
            "connect_timeout": spec.connect_timeout,
            # A keepalive every third of the allowance; the host is lost when two go
            # unanswered, that is about `keepalive` seconds after it fell silent.
            "keepalive_interval": spec.keepalive / 3,
            "keepalive_count_max": 2,
            "agent_forwarding": False,
            "encryption_algs": _preferred_ciphers(),
            "client_factory": _ssh_client_class(),
            # A key with a passphrase is used through ssh-agent, as OpenSSH does (preflight
            # has made sure an agent holds the hosts file's); asyncssh would refuse it.
            "ignore_encrypted": True,
        }
        if tunnel is not None:
            options["tunnel"] = tunnel
        if spec.user:
            options["username"] = spec.user
        if spec.port:
            options["port"] = spec.port
        if target.identities:
            # OpenSSH skips an IdentityFile of ssh config that does not exist, and ignores
            # one that others can read; asyncssh would fail on the first and use the second
            # (the hosts file's are checked before the run).
            options["client_keys"] = [p for p in target.identities if _usable_identity(p)]
        address = spec.address or spec.name
        entries = (
            []
            if target.strict == "off"
            else known_host_entries(target.known_hosts, target.key_name)
        )
        record = False
        if target.strict == "off":
            options["known_hosts"] = None
        elif entries or target.strict == "yes":
            # Only the keys OpenSSH would find for the name (no fallback to the bare host
            # or to the address, which asyncssh's own lookup tries): none means unknown.
            options["known_hosts"] = _trusted_keys(entries)
        else:  # StrictHostKeyChecking accept-new or no: trust a first-seen key, record it
            options["known_hosts"] = None
            record = True
        try:
            try:
                conn = await self._connect(address, options, target)
            except asyncssh.HostKeyNotVerifiable as exc:
                if target.strict != "no" or not entries:
                    raise
                # StrictHostKeyChecking no: OpenSSH warns of a changed key and goes on.
                hint = _host_key_hint(target, exc.reason)
                self.log(f"sshfan: warning: {self.name}: host key: {hint}; connecting anyway")
                conn = await self._connect(address, {**options, "known_hosts": None}, target)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise HostError(self.name, "host key", _host_key_hint(target, exc.reason)) from None
        except asyncssh.PermissionDenied:
            raise HostError(self.name, "auth", _auth_failure(target, options)) from None
        except asyncssh.Error as exc:
            raise HostError(self.name, "connect", f"{target.where}: {exc.reason}") from None
        except OSError as exc:
            raise HostError(self.name, *_connect_failure(target, exc)) from None
        except asyncssh.KeyImportError as exc:
            files = ", ".join(target.identities) or "the default keys"
            raise HostError(self.name, "auth", f"cannot use identity {files}: {exc}") from None
        except ValueError as exc:
            raise HostError(self.name, "connect", f"{target.where}: {exc}") from None
        if record:
            try:
                recorded = _record_host_key(target, conn.get_server_host_key())
            except OSError as exc:  # as OpenSSH: say so, and go on with the trusted key
                recorded = None
                self.log(
                    f"sshfan: warning: {self.name}: cannot record the new host key in "
                    f"{exc.filename or target.record_in}: {exc.strerror}"
                )
            if recorded:
                name = target.key_name
                self.log(f"sshfan: {self.name}: new host key for {name} recorded in {recorded}")
        return conn

    async def _open_jumps(self, target: SshTarget, depth: int = 0) -> Any:
        """Connect through TARGET's ProxyJump hosts in turn, each checked as OpenSSH checks
        it (its own ssh config, not the hosts file's keys); return the last connection."""
        conn = None
        try:
            for hop in str(target.proxy_jump).split(","):
                user, host, port = _jump_host(hop)
                hop_spec = HostSpec(
                    name=host,
                    user=user,
                    port=port,
                    connect_timeout=self.spec.connect_timeout,
                    keepalive=self.spec.keepalive,
                )
                hop_target = ssh_target(hop_spec)
                if conn is None and hop_target.proxy_jump:  # the first hop's own ProxyJump
                    if depth >= 8:
                        raise HostError(self.name, "connect", f"ProxyJump loops at {host}")
                    conn = await self._open_jumps(hop_target, depth + 1)
                try:
                    new = await self._connect_checked(hop_spec, hop_target, conn)
                except HostError as exc:
                    reason = f"jump host {host}: {exc.reason}"
                    raise HostError(self.name, exc.stage, reason) from None
                if conn is not None:
                    new.set_tunnel(conn)
                conn = new
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return conn

    async def _connect(self, address: str, options: dict[str, Any], target: SshTarget) -> Any:
        """asyncssh.connect, within the connect timeout (and a margin for the key exchange)."""
        import asyncssh

        timeout = self.spec.connect_timeout
        try:
            return await asyncio.wait_for(asyncssh.connect(address, **options), timeout + 5)
        except asyncio.TimeoutError:
            raise HostError(
                self.name, "connect", f"{target.where}: timed out after {timeout:g} s"
            ) from None


class HostSession:
    """The head's end of one host: drives its HostProtocol over its StubTransport (which
    only moves bytes), acts on what the protocol returns, and tells the run what it must
    know as events (_tell: the run's deliver)."""

    def __init__(self, spec: HostSpec, run: _Run | None) -> None:
        """Prepare (but do not open) the session for SPEC within RUN."""
        self.spec = spec
        self.name = spec.name
        self.run = run
        self.protocol = HostProtocol(
            self.name, spec.slots or 1, bool(run and run.timeout), spec.python
        )
        self.files: HostFiles | None = None  # an SSH host's file mover, when the run moves files
        self._movers: set[asyncio.Future[None]] = set()
        if run is not None:
            self.window.max_ahead = run.max_ahead
        self.transport: StubTransport | None = None  # once _start_stub has chosen one
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        self._pong: asyncio.Future[float] | None = None
        self._pong_for = b""  # the payload of the ping that ping() waits on
        self._watcher: asyncio.TimerHandle | None = None
        self._waking: asyncio.Future[None] | None = None  # see _wake_and_close
        self.closed = loop.create_future()
        self.early = False  # its CONFIG (and first tasks) went right behind the stub's source
        self.hello_wait_since: float | None = None  # when the stub's source went (SSH hosts)

    # What the protocol knows of the host, as the run and this session read it.
    state = property(lambda self: self.protocol.state, doc="The host's HostState.")
    hello = _protocol_attribute("hello")
    in_flight = _protocol_attribute("in_flight")
    fetching = _protocol_attribute("fetching")
    error = _protocol_attribute("error")
    exit_status = _protocol_attribute("exit_status")
    cancelled = _protocol_attribute("cancelled")
    window = _protocol_attribute("window")
    dropping = _protocol_attribute("dropping")
    drops_asked = _protocol_attribute("drops_asked")
    killing = _protocol_attribute("killing")
    may_drop = _protocol_attribute("may_drop")
    progress_at = _protocol_attribute("progress_at")
    rtt = _protocol_attribute("rtt")

    # -- opening --------------------------------------------------------------

    async def open(self, pacing: Pacing) -> None:
        """Connect, start the stub, wait for its hello, and configure it."""
        try:
            if self.spec.local:
                await self._start_stub()
            else:
                async with pacing.start(self.spec):
                    await self._start_stub()
        except HostError as exc:
            self._fail(exc)
            raise
        except Exception as exc:  # never leave a host "connecting" forever
            error = HostError(self.name, "bootstrap", f"{type(exc).__name__}: {exc}")
            self._fail(error)
            raise error from exc
        if self.early:
            self._send_ping()  # now: before the hello it would time the stub's start-up
        else:
            cpus = int(self.hello.get("cpus") or 1)
            rule = self.spec.cpu_slots
            self._configure(self.spec.slots or (slots_for_cpus(rule, cpus) if rule else cpus))
        self.protocol.move(HostState.READY)
        self.protocol.heard(time.monotonic())
        self._watch()

    async def _start_stub(self) -> None:
        """Open the transport, send the stub's source, and wait for its hello."""
        forked = self.spec.local and _may_fork_stub(self.spec)
        code = bootstrap_code()
        if forked:
            fork = self.transport = ForkTransport(self)
            await fork.open()
        elif self.spec.local:
            local = self.transport = LocalTransport(self)
            await local.open(self.spec.python, code)
        else:
            log = self.run.log if self.run is not None else lambda line: None
            ssh = self.transport = SshTransport(self, self.spec, log)
            await ssh.open(code)
            if self.run is not None and self.run.files:
                self.files = HostFiles(
                    self.name, ssh.conn, self.spec.workdir, self.run.files, self._tell_parts
                )
        # The run may have ended meanwhile (finish() abandoned this host). Checked, not
        # left to cancellation: asyncio.wait_for (Python < 3.12) swallows a cancel that
        # comes as its awaitable completes, and this host would then wait for a hello
        # it will never read, holding the end of the run for the whole wait.
        if self.state != HostState.CONNECTING:
            self._drop()
            raise HostError(self.name, "start", "the run ended before the host was up")
        self._write(b"" if forked else stub_payload())  # a fork has the code
        if not self.spec.local:
            self.hello_wait_since = time.monotonic()
            self._tell(SourceSent())
        # Generous: a loaded machine can take seconds to start Python; a dead host is
        # caught sooner by the connect timeout or the channel closing.
        wait = max(2 * self.spec.connect_timeout, 30.0)
        await asyncio.wait(
            {self._hello, self.closed}, timeout=wait, return_when=asyncio.FIRST_COMPLETED
        )
        if self._hello.done():
            self._hello.result()  # the host's failure, if it failed
            if self.state != HostState.CONNECTING and self.error is not None:
                # Failed right behind its hello: the stub's ERROR for a CONFIG sent early
                # (a workdir that is not there) can come in the same read as the hello.
                raise self.error
        elif self.closed.done():
            raise HostError(self.name, "start", "the run ended before the host was up")
        else:
            raise HostError(self.name, "bootstrap", f"no answer from the stub in {wait:g} s")

    def _configure(self, slots: int, ping: bool = True) -> None:
        """Send the stub its CONFIG, and (PING) a PING to measure the round trip."""
        config = {
            "slots": slots,
            "timeout": self.run.timeout if self.run else None,
            "env": dict(self.spec.env),
            "workdir": self.spec.workdir,
            "make_workdir": self.spec.make_workdir,
            "shell": self.spec.shell,
            "hold": self.run.halt.why if self.run and self.run.halt else None,
            "slot_base": self.run.claim_slots(slots) if self.run else 0,
            "host": self.name,
        }
        self._write(self.protocol.configure(config))
        # Measure the round trip without waiting for it: work goes out at once, and the
        # window deepens when the answer comes (one round trip less before the first task).
        if ping:
            self._send_ping()

    def send_early(self, scheduler: Scheduler, others_alive: bool, start_ahead: int) -> int:
        """Send CONFIG and the first tasks right behind the stub's source, before its hello
        (one round trip less before work starts; the stub reads them in order once up).
        Only for a host whose slots are known before it says how many CPUs it has. Return
        how many tasks went: they are in flight, and come back if the host fails to start."""
        assert self.spec.slots is not None and self.state == HostState.CONNECTING
        self._configure(self.spec.slots, ping=False)
        self.early = True
        self.window.start_ahead = start_ahead
        return self.refill(scheduler, others_alive, early=True)

    def _send_ping(self) -> bytes:
        """Send a PING the stub must answer; return its payload (unique in this session)."""
        payload, frame = self.protocol.ping()
        self._write(frame)
        return payload

    async def ping(self) -> float:
        """Measure one round trip through the stub."""
        loop = asyncio.get_running_loop()
        self._pong = loop.create_future()
        self._pong_for = self._send_ping()
        try:
            return await asyncio.wait_for(
                asyncio.shield(self._pong), max(self.spec.connect_timeout, 10.0)
            )
        except asyncio.TimeoutError:
            error = HostError(self.name, "protocol", "no answer to a ping")
            self._fail(error)
            raise error from None

    # -- receiving ------------------------------------------------------------

    def on_data(self, data: bytes) -> None:
        """Bytes from the stub's stdout: the protocol's events, each acted on in turn.

        Only what the protocol raises is the host's fault (it fails the host); what the
        run does with an event is the run's (_Run.deliver takes its exceptions for bugs)."""
        if self.state in HOST_GONE:
            return
        try:
            self.protocol.heard(time.monotonic())
            events = self.protocol.receive(data)
            before = self.protocol.frames_in
            while True:
                try:
                    event = next(events, None)
                except HostError as exc:  # (ProtocolError: the stub sent what was not asked)
                    self._fail(exc)
                    return
                if event is None:
                    break
                self._act(event)
            if self.protocol.frames_in != before:
                self._tell(Settled())
        except Exception as exc:
            # Any other exception is sshfan's own bug (the protocol's or the session's):
            # raised into the transport's callback it would close the channel and look
            # like a lost host. The run ends on it instead, and the host keeps its tasks.
            if self.run is None:
                raise
            self.run.bug(exc)

    def _act(self, event: HostEvent) -> None:
        """Do what EVENT from the protocol asks of this session, or pass it to the run."""
        if isinstance(event, TaskDone) and self.files is not None and not event.cancelled:
            self.fetching[event.task.seq] = event.task  # done once its files are back
            self._spawn(self._fetch(event.task, event.result))
        elif isinstance(event, Hello):
            if not self._hello.done():
                self._hello.set_result(event.info)
        elif isinstance(event, Pong):
            if self._pong is not None and not self._pong.done() and event.payload == self._pong_for:
                self._pong.set_result(event.rtt)
        else:
            self._tell(event)

    def _tell(self, event: RunEvent) -> None:
        """Deliver EVENT to the run, if there is one: the one way a session talks to it.

        Whatever the run does with it is the run's (_Run.deliver): an exception there is
        never taken for this host's fault."""
        if self.run is not None:
            self.run.deliver(self, event)

    def _watch(self) -> None:
        """Every keepalive/3 s: ping a stub that has gone silent; give the host up when
        nothing at all has come from it for about `keepalive` seconds.

        SSH keepalives only prove that sshd answers: a stopped (SIGSTOP) or wedged stub
        under a healthy sshd would hold its tasks forever. The stub answers a PING at
        once, between tasks' output, so silence after one means the stub itself is stuck."""
        self._watcher = None
        if self.state not in (HostState.READY, HostState.DRAINING):
            return
        interval = self.spec.keepalive / 3
        silence = self.protocol.check_silence(time.monotonic(), interval)
        if isinstance(silence, Silent):
            pid = self.hello.get("pid")
            ssh = self.transport if isinstance(self.transport, SshTransport) else None
            if ssh is not None and ssh.conn is not None and isinstance(pid, int) and pid > 1:
                # sshd still answers: take the connection from _fail, to wake the stub first.
                conn = ssh.take_connection()
                self._waking = asyncio.ensure_future(self._wake_and_close(conn, pid))
            reason = f"no answer from the stub in {silence.seconds:.0f} s"
            self._fail(HostError(self.name, "stub", reason))
            return
        if silence is not None:
            self._write(silence)
        self._watcher = asyncio.get_running_loop().call_later(interval, self._watch)

    async def _wake_and_close(self, conn: Any, pid: int) -> None:
        """Send a stub given up for silence SIGCONT (it may be stopped), then close the
        connection: awake, it sees EOF and kills its tasks, instead of staying there
        stopped with them. SIGCONT is harmless to anything else that pid may be now."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.run(f"kill -CONT {pid}", check=False), 5.0)
        with contextlib.suppress(Exception):
            conn.close()

    def on_stderr(self, data: bytes) -> None:
        """Keep the tail of the stub's stderr for error messages."""
        self.protocol.stderr(data)

    def on_closed(self, exc: BaseException | None) -> None:
        """The channel or connection went away: expected at the end, a loss otherwise."""
        error = self.protocol.closed(_exc_reason(exc) if exc else None)
        if error is not None:
            self._fail(error)
        if not self.closed.done():
            self.closed.set_result(None)

    # -- sending --------------------------------------------------------------

    def refill(
        self, scheduler: Scheduler, others_alive: bool, cap: int | None = None, early: bool = False
    ) -> int:
        """Send this host as many tasks as its window wants (at most CAP); return how many.
        EARLY: before its hello (send_early); otherwise only a ready host takes tasks."""
        if self.state != HostState.READY and not early:
            return 0
        want = self.window.want() if cap is None else min(cap, self.window.want())
        if want <= 0:
            return 0
        long_room = self.window.slots
        if scheduler.ordered:  # slots running a known-long task take nothing behind it
            long_room -= sum(task.long for task in self.in_flight.values())
            if long_room <= 0:
                return 0
        tasks = scheduler.take(self.name, want, others_alive, long_room)
        if not tasks:
            return 0
        return self.send_tasks(tasks)

    def send_tasks(self, tasks: list[Task]) -> int:
        """Send TASKS to the stub and count them in flight; return how many."""
        if self.files is not None:  # each task goes to the stub once its files are there
            self.protocol.hold(tasks, staging=True)
            for task in tasks:
                self._spawn(self._stage(task))
            return len(tasks)
        for frame in self.protocol.send_tasks(tasks):
            self._write(frame)
        self.note_starts(time.monotonic())
        return len(tasks)

    def starts(self) -> tuple[float, ...]:
        """When each task held here started (note_starts) or, if queued, was sent."""
        return tuple(task.started or task.sent for task in self.in_flight.values())

    def note_starts(self, now: float) -> None:
        """Mark the tasks that run from NOW on: the first SLOTS held (the stub starts them in
        the order sent) that were queued until a result freed a slot, or just sent."""
        for task in itertools.islice(self.in_flight.values(), self.window.slots):
            if not task.started:
                task.started = now

    # -- files (--transferfile, --return, --cleanup, --basefile) ---------------

    def _tell_parts(self, paths: list[str]) -> None:
        """Tell the stub which files are being uploaded now (HostFiles): it removes them
        if the head goes away before they are done."""
        frame = self.protocol.parts(paths)
        if frame is not None:
            with contextlib.suppress(Exception):  # (the channel may be closing)
                self._write(frame)

    def _spawn(self, work: Any) -> None:
        """Run a file mover for this host; it is cancelled if the host goes."""
        future = asyncio.ensure_future(work)
        self._movers.add(future)
        future.add_done_callback(self._movers.discard)

    def _ours(self, task: Task, table: dict[int, Task]) -> bool:
        """Whether TASK is still this host's (not requeued since: the host lost, halted).
        A draining host still finishes what it has: a fetch that ends there counts."""
        return self.state in (HostState.READY, HostState.DRAINING) and table.get(task.seq) is task

    async def _stage(self, task: Task) -> None:
        """Send TASK's files, then TASK to the stub: it never starts before they are there."""
        assert self.files is not None
        try:
            await self.files.send_for(task)
        except TransferError as exc:
            if self._ours(task, self.in_flight):
                self.protocol.let_go(task.seq)
                message = f"sshfan: {exc}\n".encode("utf-8", "replace")
                failed = TaskResult(
                    seq=task.seq,
                    command=task.command,
                    host=self.name,
                    exit_code=1,
                    signal=None,
                    timed_out=False,
                    duration_s=0.0,
                    attempts=task.attempts,
                    stderr=message,
                    arg=task.arg,
                )
                self._tell(TaskDone(task, failed, cancelled=False))
                self._tell(Settled())
            return
        except HostError as exc:
            self._fail(exc)
            return
        except Exception as exc:  # a bug must not leave the task waiting forever
            self._fail(HostError(self.name, "files", f"{type(exc).__name__}: {exc}"))
            return
        if not self._ours(task, self.in_flight):
            return
        if self.protocol.halted or self.state == HostState.DRAINING:
            # Halted, or the host left the hosts file, while its files went: not sent after all.
            self.protocol.let_go(task.seq)
            self._tell(TasksGivenBack([task]))
            self._tell(Settled())
            return
        self._write(self.protocol.staged(task))

    async def _fetch(self, task: Task, result: TaskResult) -> None:
        """Fetch TASK's --return files and clean up (--cleanup); then the result counts."""
        assert self.files is not None
        try:
            await self.files.fetch_for(task, result)
            if self.files.options.cleanup:
                await self.files.clean_for(task)
        except HostError as exc:
            self._fail(exc)
            return
        except Exception as exc:  # a bug must not leave the task waiting forever
            self._fail(HostError(self.name, "files", f"{type(exc).__name__}: {exc}"))
            return
        if self._ours(task, self.fetching):
            del self.fetching[task.seq]
            self._tell(TaskDone(task, result, cancelled=False))
            self._tell(Settled())

    def release(self, seq: int) -> None:
        """The stub holds its queue for task SEQ's result (--halt): go on, if it is up."""
        if self.state == HostState.READY:  # (no write past EOF)
            self._write(self.protocol.release(seq))

    def drop_queued(self, halt: str = "") -> None:
        """Ask the stub to give back the tasks it has not started: for idle hosts, or
        HALT ("halt": start none of them; "kill": and kill the running ones)."""
        frame = self.protocol.drop(halt)
        if frame is not None:
            self._write(frame)

    def cancel(self, seq: int) -> None:
        """Have the stub kill task SEQ (a --speculate copy that lost); it is done here at once,
        and the RESULT the stub still sends for it is ignored."""
        frame = self.protocol.cancel(seq)
        if frame is not None:
            with contextlib.suppress(Exception):
                self._write(frame)

    def running_since(self) -> list[tuple[float, Task]]:
        """The tasks that are running now as far as the head can tell (the first SLOTS sent,
        when nothing waits behind them), with when each started (note_starts)."""
        if self.state != HostState.READY or self.queued() > 0:
            return []
        return [(task.started or task.sent, task) for task in self.in_flight.values()]

    def queued(self) -> int:
        """Tasks this host holds beyond its slots (not started yet, as far as the head knows)."""
        return len(self.in_flight) - self.window.slots

    def worth_dropping(self, now: float) -> bool:
        """Whether taking back this host's queued tasks can pay (worth_taking_back)."""
        return worth_taking_back(self.queue_at(now))

    def queue_at(self, now: float) -> HostQueue:
        """What rebalancing knows of this host's queue at NOW (HostQueue)."""
        return HostQueue(
            self.queued(),
            self.window.slots,
            self.window.mean_task,
            now - self.progress_at,
            self.drop_cost(),
            self.may_drop,
        )

    def drop_cost(self) -> float:
        """Seconds a DROP and the hand-over cost: twice a round trip and its latency."""
        return 2 * (self.window.rtt + HostWindow.LATENCY)

    def drain(self) -> None:
        """The host left the hosts file: give back the tasks it has not started, take no
        new ones, and end once the running ones are done (retire_if_idle)."""
        if self.state == HostState.CONNECTING and self.in_flight:
            # Not up yet: tasks sent ahead of its hello (send_early) go back to the queue;
            # the stub sees EOF once the connection is dropped, and kills what it started.
            given = [self.protocol.let_go(seq) for seq in list(self.in_flight)]
            self._tell(TasksGivenBack([task for task in given if task is not None]))
        self._do(self.protocol.drain())

    def retire_if_idle(self) -> None:
        """A draining host with nothing running or coming back: close its stub."""
        self._do(self.protocol.retire())

    def undrain(self) -> None:
        """The host came back into the hosts file before it was done draining."""
        self.protocol.undrain()

    def finish(self) -> None:
        """No more work: close the stub's stdin so it exits once its tasks are done."""
        self._do(self.protocol.finish())

    def _do(self, steps: list[bytes | Close]) -> None:
        """Do what the protocol decided: send its frames, close the stub's stdin or drop
        the connection (a host abandoned before it was up)."""
        for step in steps:
            if step is Close.CONNECTION:
                self._drop()
                if not self.closed.done():
                    self.closed.set_result(None)
            elif step is Close.STDIN:
                with contextlib.suppress(Exception):  # (the channel may be gone already)
                    if self.transport is not None:
                        self.transport.write_eof()
            else:
                self._write(step)

    def _write(self, data: bytes) -> None:
        """Send DATA (frames, or the stub's source) to the stub, once its transport is open."""
        if self.transport is not None:
            self.transport.write(data)

    async def close(self, grace: float = 3.0) -> None:
        """Wait briefly for the stub to exit, then drop the connection.

        An SSH host with nothing in flight is dropped right after the EOF: its stub exits
        on that EOF, and waiting for the channel to close would cost a round trip."""
        self.finish()
        if self.in_flight or self.spec.local:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.closed), grace)
        for mover in list(self._movers):
            mover.cancel()
        if self.files is not None:
            if self.files.options.cleanup and self.state in (HostState.CLOSING, HostState.DONE):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.files.clean_bases(), grace)
            self.files.close()
        if self._waking is not None:
            await asyncio.wait({self._waking}, timeout=6.0)
        self._drop()

    def _drop(self) -> None:
        """Close the connection or subprocess without waiting."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.close()

    def _fail(self, error: HostError) -> None:
        """Mark the host lost (or failed at start) and give its tasks back."""
        tasks = self.protocol.fail(error)
        if tasks is None:
            return
        for mover in list(self._movers):
            mover.cancel()
        if self.files is not None:
            self.files.close()
        for waiter in (self._hello, self._pong):
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # mark retrieved: the opener re-raises it if it waits
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.abort()
        self._drop()
        if not self.closed.done():
            self.closed.set_result(None)
        self._tell(HostLost(error, tasks))

    def give_up(self, error: HostError) -> None:
        """The run gives this host up for ERROR: as if it had failed (_fail)."""
        self._fail(error)


class _LocalStubProtocol(asyncio.SubprocessProtocol):
    """Feeds a local stub subprocess's pipes to its HostSession."""

    def __init__(self, session: HostSession) -> None:
        """Remember the session to feed."""
        self.session = session
        self.transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport to read the exit status later."""
        self.transport = transport  # type: ignore[assignment]

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        """Route stdout to the frame decoder and stderr to the tail."""
        if fd == 1:
            self.session.on_data(data)
        else:
            self.session.on_stderr(data)

    def process_exited(self) -> None:
        """Record the stub's exit status."""
        if self.transport is not None:
            self.session.exit_status = self.transport.get_returncode()

    def connection_lost(self, exc: BaseException | None) -> None:
        """All pipes closed and the process exited."""
        self.session.on_closed(exc)


def _may_fork_stub(spec: HostSpec) -> bool:
    """Whether SPEC's local stub may be a fork of this process instead of a new Python.

    A fork skips a second interpreter start (the bulk of a one-task run's wait) and runs
    the same stub code, in a process of its own as before. Only for the default local
    host (its python is this one; a hosts file's `python` is honoured by exec), on Linux,
    and only while this process has one thread: a fork copies no other thread, so a lock
    one of them held would stay held in the stub (Python 3.12+ warns of it)."""
    if spec.python != sys.executable or not sys.platform.startswith("linux"):
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _fork_stub() -> tuple[int, int, int, int]:
    """Fork a local stub on three new pipes; return its pid and the head's ends of its
    stdin, stdout and stderr. The child runs stub_main and never returns."""
    fds: list[int] = []
    try:
        for _ in range(3):
            fds.extend(os.pipe())
        in_r, in_w, out_r, out_w, err_r, err_w = fds
        # Blocked across the fork: a signal must not reach the child's copy of the head's
        # handlers and wakeup fd (the event loop's self-pipe, shared with the head).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            pid = os.fork()
            if pid == 0:
                _become_stub((in_r, out_w, err_w), mask)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    return pid, in_w, out_r, err_r


def _become_stub(stdio: tuple[int, int, int], mask: Iterable[int]) -> NoReturn:
    """In a forked child: shed the head (its fds, signal handlers and objects), put the
    pipes on 0-2 as an exec'd stub has them, and serve as the stub until it exits."""
    try:
        gc.freeze()  # the head's objects: never scanned (and so never copied) by the stub
        signal.set_wakeup_fd(-1)
        # As exec does: a signal the head (or a program using sshfan) catches is back to
        # its default, one it ignores stays ignored; stub_main and serve set their own.
        # Every one not ignored, as a handler set in C (faulthandler's) may not show here.
        for signum in signal.valid_signals():
            if signal.getsignal(signum) != signal.SIG_IGN:
                with contextlib.suppress(OSError, ValueError):  # (SIGKILL, SIGSTOP)
                    signal.signal(signum, signal.SIG_DFL)
        # A terminal's Ctrl-C goes to its whole foreground process group, this stub too:
        # it is the head's to act on (it stops the run, and the stub with it), not the
        # stub's to die of, as a remote stub in a session of its own would not.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in stdio]  # (0-2 may be one)
        for target, fd in enumerate(high):
            os.dup2(fd, target)
        # None of the head's files stay open here: its journal and output, its lock, its
        # event loop, other stubs' pipes (a head's EOF to them must stay an EOF). The open
        # ones as listed, not a range: without close_range(2) (Linux < 5.9) that is a
        # close() for every possible fd, a million under some limits.
        for name in os.listdir("/proc/self/fd"):
            if int(name) > 2:
                with contextlib.suppress(OSError):  # (the listing's own fd: closed already)
                    os.close(int(name))
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        stub_main()
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(2, f"sshfan stub: {type(exc).__name__}: {exc}\n".encode(errors="replace"))
    os._exit(1)  # never back into the head's code (stub_main ends with os._exit)


class _ForkedStub:
    """The pipes and pid of a forked local stub (ForkTransport's), standing in for the
    subprocess transport an exec'd stub has (kill, close, then on_closed with the
    exit status once both its output pipes reached EOF and it was reaped)."""

    def __init__(self, session: HostSession, pid: int) -> None:
        """Track the child PID serving SESSION."""
        self.session = session
        self.pid = pid
        self.reaped = False
        self.open_pipes = 2  # stdout and stderr, until each reaches EOF
        self.transports: list[asyncio.BaseTransport] = []
        self._wait = 0.001  # between waitpid tries, doubling (see reap)

    async def connect(self, in_w: int, out_r: int, err_r: int) -> asyncio.WriteTransport:
        """Wire the head's pipe ends into the event loop; return the stub's stdin."""
        loop = asyncio.get_running_loop()
        files = [io.FileIO(out_r, "r"), io.FileIO(err_r, "r"), io.FileIO(in_w, "w")]
        feeds = (self.session.on_data, self.session.on_stderr)
        try:
            for file, feed in zip(files[:2], feeds, strict=True):
                reader, _ = await loop.connect_read_pipe(lambda f=feed: _PipeReader(self, f), file)
                self.transports.append(reader)
            stdin, _ = await loop.connect_write_pipe(asyncio.Protocol, files[2])
        except BaseException:
            for file in files:
                file.close()
            self.kill()
            raise
        self.transports.append(stdin)
        return stdin

    def pipe_closed(self) -> None:
        """One output pipe reached EOF: once both have, the stub is exiting."""
        self.open_pipes -= 1
        if self.open_pipes == 0:
            self.reap()

    def reap(self) -> None:
        """Wait for the stub without blocking; then the session hears it closed.

        Its pipes close a moment before the kernel lets it be waited for: try again soon."""
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else: the status is lost
            pid, status = self.pid, None
        if pid == 0:
            asyncio.get_running_loop().call_later(self._wait, self.reap)
            self._wait = min(2 * self._wait, 0.1)
            return
        self.reaped = True
        if status is not None:
            self.session.exit_status = os.waitstatus_to_exitcode(status)
        self.session.on_closed(None)

    def kill(self) -> None:
        """SIGKILL the stub, unless it was reaped already (its pid may be another's now)."""
        if not self.reaped:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        """Close the head's ends of the pipes (a stub still running is killed first)."""
        if self.open_pipes:
            self.kill()
        for transport in self.transports:
            transport.close()


class _PipeReader(asyncio.Protocol):
    """Feeds one output pipe of a forked stub to its session."""

    def __init__(self, stub: _ForkedStub, feed: Callable[[bytes], None]) -> None:
        """Remember where the pipe's bytes go."""
        self.stub = stub
        self.feed = feed

    def data_received(self, data: bytes) -> None:
        """Pass the bytes on."""
        self.feed(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        """EOF (or the head closed it)."""
        self.stub.pipe_closed()


# ============================================================================
# 10. Files to and from workers (GNU parallel's --transferfile, --return, --basefile)
# ============================================================================
# Files travel over SFTP on the host's own SSH connection, in a channel beside the
# stub's: a 100 MB file then never holds up the frames (results, pings) of the tasks
# running meanwhile, the stub stays small, and OpenSSH's sftp-server does the file
# work on the worker. Each file is written under a temporary name and renamed, on
# both ends: a reader never sees half a file, and a file sent onto itself (a worker
# sharing the head's directory) is never truncated while it is read. A symlink is
# sent as the file it points to, as scp does (parallel's rsync -l would send the link,
# which dangles on a worker that lacks its target).


@dataclasses.dataclass(frozen=True)
class FileOptions:
    """The run's file options, as GNU parallel names them (templates use its placeholders)."""

    transfer: tuple[str, ...] = ()  # --transferfile TEMPLATE: sent before the task
    returns: tuple[str, ...] = ()  # --return TEMPLATE: fetched after the task
    cleanup: bool = False  # --cleanup: remove them (and basefiles) on the worker after
    basefiles: tuple[str, ...] = ()  # --basefile FILE: sent once per host, first

    def __bool__(self) -> bool:
        """Whether any file moves at all (--cleanup alone moves nothing)."""
        return bool(self.transfer or self.returns or self.basefiles)


class TransferError(SshfanError):
    """One file could not be moved: the task that needed it fails, naming the file."""


def fill_file_template(template: str, line: str, seq: int) -> str:
    """A --transferfile/--return TEMPLATE for one task: placeholders filled, unquoted.

    The values are exactly those of --command's replacement strings (Template); a file
    name is not shell text, so they are not quoted."""
    return Template(template, kind="plain").render(line, seq)


def transfer_paths(path: str, returned: bool = False) -> tuple[str, str]:
    """Where a transferred file is on the head and on the worker, as rsync -R puts it
    for GNU parallel: (local path, remote path relative to the workdir or absolute).

    `/tmp/./foo/bar` is /tmp/foo/bar here and foo/bar under the workdir there; without
    the `/./` marker the path is the same on both ends (relative to each end's dir). With
    several markers a file sent is cut at the first (rsync -R), a file RETURNED at the
    last (parallel's sshreturn), as `--trc out/./{}.out` on `in/./f` needs."""
    if "/./" not in path:
        return path, path
    cut = path.rpartition("/./")[2] if returned else path.partition("/./")[2]
    return _without_markers(path), _without_markers(cut)


def _without_markers(path: str) -> str:
    """PATH with each `/./` made `/` (overlapping ones too: `a/././b` is `a/b`)."""
    while "/./" in path:
        path = path.replace("/./", "/")
    return path


def _remote_workdir(workdir: str | None) -> str:
    """The task's working dir as an SFTP path (SFTP starts in the login dir; no ~ there)."""
    if not workdir or workdir == "~":
        return ""
    if workdir.startswith("~/"):
        return workdir[2:]
    return workdir


def _file_kind(mode: int) -> str:
    """What a file that is not a regular one is, for a message: "a FIFO", "a directory"."""
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return f"of type {stat.S_IFMT(mode):o}"


def _part_name(path: str, tag: str) -> str:
    """The temporary name a file is written under beside PATH, then renamed to PATH."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.sshfan-{tag}.part")


def _why(exc: BaseException) -> str:
    """A short reason for a failed file operation (SFTP or local)."""
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return reason or type(exc).__name__


class HostFiles:
    """Moves one SSH host's files: basefiles once, each task's files before and after it."""

    PARALLEL = 4  # files moving at once per host: enough to fill a link, bounded memory

    def __init__(
        self,
        name: str,
        conn: Any,
        workdir: str | None,
        options: FileOptions,
        tell_parts: Callable[[list[str]], None] = lambda paths: None,
    ) -> None:
        """Move files over CONN (an asyncssh connection) for host NAME; TELL_PARTS gets the
        temporary files being uploaded, each time that set changes."""
        self.name = name
        self.options = options
        self.workdir = _remote_workdir(workdir)
        self._conn = conn
        self._tell_parts = tell_parts
        self._parts: list[str] = []  # absolute paths on the worker, as the stub needs them
        # In every temporary name this host writes: two hosts entries on one machine (or two
        # runs) sending the same basefile into one directory would otherwise write one
        # file at once, one renaming it into place while the other still truncates and
        # writes it, and one stub's PARTS cleanup would remove the other's upload.
        self._unique = os.urandom(4).hex()
        self._home: str | None = None  # where the SFTP server resolves relative paths
        self._sftp: Any = None
        self._starting: asyncio.Future[Any] | None = None
        self._bases: asyncio.Future[None] | None = None
        self._moving = asyncio.Semaphore(self.PARALLEL)

    def remote(self, path: str) -> str:
        """PATH (relative to the workdir, or absolute) as the worker's SFTP server sees it."""
        return posixpath.join(self.workdir, path) if self.workdir else path

    async def sftp(self) -> Any:
        """The SFTP client on the host's connection, started on first use."""
        import asyncssh

        if self._sftp is not None:
            return self._sftp
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._conn.start_sftp_client())
        try:
            self._sftp = await asyncio.shield(self._starting)
            return self._sftp
        except (OSError, asyncssh.Error) as exc:
            raise HostError(
                self.name,
                "sftp",
                f"cannot start SFTP ({_why(exc)}): the worker's sshd needs an sftp Subsystem",
            ) from None

    # -- before a task --------------------------------------------------------

    async def send_for(self, task: Task) -> None:
        """Send the basefiles (the first time) and TASK's --transferfile files."""
        if self.options.basefiles:
            if self._bases is None:
                self._bases = asyncio.ensure_future(self._send_bases())
            await asyncio.shield(self._bases)
        line = task.command if task.arg is None else task.arg
        for template in self.options.transfer:
            name = fill_file_template(template, line, task.seq)
            local, remote = transfer_paths(name)
            try:
                await self._put(local, remote, str(task.seq))
            except TransferError as exc:
                raise TransferError(f"--transferfile {name!r}: {exc}") from None

    async def _send_bases(self) -> None:
        """Send every --basefile; a failure fails the host (no task could run there)."""
        for name in self.options.basefiles:
            local, remote = transfer_paths(name)
            try:
                await self._put(local, remote, "base")
            except TransferError as exc:
                raise HostError(self.name, "basefile", f"{name!r}: {exc}") from None

    async def _put(self, local: str, remote: str, tag: str) -> None:
        """Copy LOCAL to REMOTE on the worker: parent dirs made, temp name, mode, rename."""
        import asyncssh

        try:
            mode = os.stat(local).st_mode
        except OSError as exc:
            raise TransferError(f"cannot read {local}: {_why(exc)}") from None
        if not stat.S_ISREG(mode):  # a FIFO's open would block the head for good
            raise TransferError(f"{local}: not a regular file ({_file_kind(mode)})")
        sftp = await self.sftp()
        target = self.remote(remote)
        part = _part_name(target, f"{tag}-{self._unique}")
        async with self._moving:
            # The stub learns of the file before the SFTP server does (frames on one
            # connection keep their order): if the head dies mid-upload, the stub sees
            # its EOF and removes it. Cancelled, the head cannot remove it: that is left
            # to the stub too (the run is ending, and its EOF follows).
            noted = ""
            try:
                if self._home is None:
                    self._home = await sftp.realpath(".")
                noted = posixpath.join(self._home, part)
                self._note_part(noted)
                parent = posixpath.dirname(target)
                if parent:
                    await sftp.makedirs(parent, exist_ok=True)
                # Not sparse: asyncssh's sparse copy leaves out a hole at the end of the
                # file, which then arrives short (and a task would read it as whole).
                await sftp.put(local, part, follow_symlinks=True, sparse=False)
                await sftp.chmod(part, mode & 0o7777)
                await sftp.posix_rename(part, target)
            except (OSError, asyncssh.Error) as exc:
                with contextlib.suppress(OSError, asyncssh.Error):
                    await sftp.remove(part)
                if noted:
                    self._forget_part(noted)
                raise TransferError(
                    f"cannot send it to {self.name}:{target}: {_why(exc)}"
                ) from None
            self._forget_part(noted)

    def _note_part(self, path: str) -> None:
        """An upload starts under the temporary name PATH: tell the stub."""
        self._parts.append(path)
        self._tell_parts(list(self._parts))

    def _forget_part(self, path: str) -> None:
        """The upload to PATH is over (renamed into place, or removed): tell the stub."""
        with contextlib.suppress(ValueError):
            self._parts.remove(path)
        self._tell_parts(list(self._parts))

    # -- after a task ---------------------------------------------------------

    async def fetch_for(self, task: Task, result: TaskResult) -> None:
        """Fetch TASK's --return files into place; a missing one fails the result."""
        line = task.command if task.arg is None else task.arg
        problems = []
        for template in self.options.returns:
            name = fill_file_template(template, line, task.seq)
            local, remote = transfer_paths(name, returned=True)
            try:
                await self._get(remote, local, str(task.seq))
            except TransferError as exc:
                problems.append(f"sshfan: --return {name!r}: {exc}\n")
            else:
                result.returned.append(local)
        if problems:
            if result.ok:
                result.exit_code = 1
            result.stderr += "".join(problems).encode("utf-8", "replace")

    async def _get(self, remote: str, local: str, tag: str) -> None:
        """Copy REMOTE from the worker to LOCAL: to a temp name, synced, then renamed."""
        import asyncssh

        sftp = await self.sftp()
        source = self.remote(remote)
        part = _part_name(local, tag)
        async with self._moving:
            try:
                # Only a regular file: the SFTP server's open of a FIFO waits for a writer
                # for good, and a link to /dev/zero never ends.
                mode = (await sftp.stat(source)).permissions
                if mode is not None and not stat.S_ISREG(mode):
                    raise TransferError(
                        f"{self.name}:{source}: not a regular file ({_file_kind(mode)})"
                    )
                parent = os.path.dirname(local)
                if parent:
                    os.makedirs(parent, exist_ok=True)
                await sftp.get(source, part, follow_symlinks=True, sparse=False)  # (see _put)
                await asyncio.get_running_loop().run_in_executor(None, _sync_file, part)
                os.replace(part, local)
            except asyncssh.SFTPNoSuchFile:
                with contextlib.suppress(OSError):
                    os.unlink(part)
                raise TransferError(f"{self.name}:{source} was not created by the task") from None
            except (OSError, asyncssh.Error) as exc:
                with contextlib.suppress(OSError):
                    os.unlink(part)
                raise TransferError(f"cannot fetch {self.name}:{source}: {_why(exc)}") from None
            except BaseException:  # cancelled (the run stops): no half file left behind
                with contextlib.suppress(OSError):
                    os.unlink(part)
                raise

    # -- cleaning up ------------------------------------------------------------

    async def clean_for(self, task: Task) -> None:
        """--cleanup: remove TASK's transferred and returned files on the worker."""
        line = task.command if task.arg is None else task.arg
        paths = [
            transfer_paths(fill_file_template(template, line, task.seq), returned)[1]
            for templates, returned in (
                (self.options.transfer, False),
                (self.options.returns, True),
            )
            for template in templates
        ]
        await self._remove(paths)

    async def clean_bases(self) -> None:
        """--cleanup: remove the basefiles at the end of the host's run."""
        bases = self._bases
        if bases is not None and bases.done() and not bases.cancelled() and not bases.exception():
            await self._remove([transfer_paths(name)[1] for name in self.options.basefiles])

    async def _remove(self, paths: list[str]) -> None:
        """Remove files and then their parent dirs that are left empty (as parallel does,
        but never the workdir itself, where the stub runs); errors are ignored."""
        import asyncssh

        sftp = await self.sftp()
        for path in paths:
            with contextlib.suppress(OSError, asyncssh.Error):
                await sftp.remove(self.remote(path))
            parent = posixpath.dirname(path)
            while parent and parent not in ("/", "."):
                try:
                    await sftp.rmdir(self.remote(parent))
                except (OSError, asyncssh.Error):
                    break  # not empty (or not ours): the dirs above it are not either
                parent = posixpath.dirname(parent)

    def close(self) -> None:
        """Stop the SFTP client (the connection itself is the session's) and what it runs."""
        if self._sftp is not None:
            self._sftp.exit()
            self._sftp = None
        for future in (self._starting, self._bases):
            if future is None:
                continue
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # seen: its waiters reported it (or none was left)


def _sync_file(path: str) -> None:
    """fsync a fetched file before it is renamed into place (no empty file after a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ============================================================================
# 11. Task input: the tasks file, GNU parallel's replacement strings, --pipe chunks
# ============================================================================

TASK_LINE_MAX = 1024 * 1024  # a task line longer than this is refused as bad input


@contextlib.contextmanager
def _reading(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Turn a missing, directory or unreadable input file into one clear line (exit 2)."""
    try:
        yield
    except FileNotFoundError:
        raise UsageError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a {what}") from None
    except PermissionError:
        raise UsageError(f"{path}: {what} is not readable (permission denied)") from None


def _task_line(raw: bytes) -> str:
    """A line of the tasks file as text: its bytes kept as they are (undecodable ones as
    surrogates, as Python does for file names), the line end (LF or CRLF) cut off."""
    line = raw.decode("utf-8", "surrogateescape")
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    return line


def as_bytes(text: str) -> bytes:
    """The bytes a task's text stands for (see _task_line)."""
    return text.encode("utf-8", "surrogateescape")


def _check_exec_length(where: str, command: str) -> None:
    """Refuse (exit 2) a command the worker's kernel could not exec as `/bin/sh -c COMMAND`."""
    size = len(as_bytes(command))
    if size > EXEC_ARG_MAX:
        raise UsageError(
            f"{where}: the command is {size} bytes; a worker can run at most {EXEC_ARG_MAX} "
            "(Linux's limit on one argument, MAX_ARG_STRLEN, and /bin/sh -c takes it as one)"
        )


def scan_tasks(
    path: Path, template: Template | None = None, name: str | None = None
) -> tuple[int, str]:
    """Check a tasks file (no NUL, commands short enough to exec); return its task count
    and sha256. With a --command TEMPLATE every line is a task, blank ones too. Errors
    name NAME (what the user gave, for a spooled copy of stdin or a pipe), else PATH."""
    where = name or str(path)
    digest = hashlib.sha256()
    count = 0
    with _reading(path, "tasks file"), open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            digest.update(raw)
            if len(raw) > TASK_LINE_MAX:
                raise UsageError(f"{where}:{number}: task line longer than {TASK_LINE_MAX} bytes")
            if b"\0" in raw:
                raise UsageError(f"{where}:{number}: task contains a NUL byte")
            line = _task_line(raw)
            if template is not None:
                count += 1
                if template.may_exceed(line):
                    command = template.render(line, number, slot=SLOT_WIDEST)
                    _check_exec_length(f"{where}:{number}", command)
            elif line.strip():
                count += 1
                _check_exec_length(f"{where}:{number}", line)
    return count, digest.hexdigest()


# Replacement strings, as GNU parallel's defaults define them: {} {.} {/} {//} {/.},
# positional {n} {n.} {n/} {n//} {n/.} (n may be negative, or followed by blanks), {#}, {%}.
# {N#} and {N%} too: parallel reads them as a positional {#} or {%}: {0#} is the seq, {0%}
# the slot, and any other N stands for nothing.
_REPLACEMENT = re.compile(r"\{(?:(-?\d+)\s*)?(//|/\.|/|\.|)\}|\{([#%])\}|\{(-?\d+)\s*([#%])\}")
_TAG_REPLACEMENT = re.compile(_REPLACEMENT.pattern + r"|\{(host)\}")
_PERL_EXPRESSION = re.compile(r"\{=.*?=\}", re.S)
_NEEDS_QUOTES = re.compile(r"[^-_.+a-zA-Z0-9/]")
# The slot number is known only when the stub starts the task: the head writes this mark
# (NUL, which no task line or argument can hold) and the stub puts the number in its place.
SLOT_MARK = "\0"
SLOT_WIDEST = "9" * 6  # a slot number as wide as any, for length checks before the run
EXEC_ARG_MAX = 131072 - 1  # Linux's MAX_ARG_STRLEN (32 pages), less the terminating NUL


def shell_quote(text: str) -> str:
    """Quote TEXT for /bin/sh exactly as GNU parallel does (its shell_quote_scalar_default).

    Unlike shlex.quote it also quotes `@ % = : ,` and every non-ASCII byte, and it drops
    the empty '' a leading or trailing single quote would leave."""
    if not text:
        return "''"
    if not _NEEDS_QUOTES.search(text):
        return text
    quoted = "'" + text.replace("'", "'\"'\"'") + "'"
    if quoted.startswith("''"):
        quoted = quoted[2:]
    if quoted.endswith("''"):
        quoted = quoted[:-2]
    return quoted


def _strip_trailing_slashes(path: str) -> str:
    """Perl File::Basename's _strip_trailing_sep: drop the slashes after the last character
    that is not one (a lone run of slashes keeps one)."""
    return re.sub(r"(.)/*\Z", r"\1", path, count=1, flags=re.S)


def _fileparse(path: str) -> tuple[str, str]:
    """Perl File::Basename's fileparse: (basename, directory with its slash, or './')."""
    match = re.match(r"(.*/)?(.*)", path, re.S)
    assert match is not None  # the pattern matches any string
    return match.group(2), match.group(1) or "./"


def perl_dirname(path: str) -> str:
    """dirname() as Perl's File::Basename has it (what {//} uses): 'a/b/' gives 'a'."""
    base, directory = _fileparse(path)
    directory = _strip_trailing_slashes(directory)
    if not base:
        base, directory = _fileparse(directory)
        directory = _strip_trailing_slashes(directory)
    return directory


def _no_extension(text: str) -> str:
    """{.}: the last '.' after the last '/' and what follows it removed."""
    return re.sub(r"\.[^/.]*$", "", text, count=1)


def _basename(text: str) -> str:
    """{/}: everything up to the last '/' removed."""
    return re.sub(r".*/", "", text, count=1)


_TRANSFORMS: dict[str, Callable[[str], str]] = {
    "": lambda text: text,
    ".": _no_extension,
    "/": _basename,
    "//": perl_dirname,
    "/.": lambda text: _no_extension(_basename(text)),
}


def _unescape_tagstring(text: str) -> str:
    """--tagstring's escapes, as GNU parallel reads them: \\t \\n \\r and octal \\NNN, \\N."""
    text = text.replace("\\t", "\t").replace("\\n", "\n").replace("\\r", "\r")
    text = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8) & 0xFF), text)
    return re.sub(r"\\([0-7])", lambda m: chr(int(m.group(1), 8)), text)


# Perl's POSIX bracket classes, as Perl matches them in bytes that are not marked UTF-8
# (GNU parallel's lines): ASCII only, a byte from 0x80 up is in none of them.
_POSIX_CLASSES: dict[str, Callable[[int], bool]] = {
    "alpha": lambda b: chr(b).isalpha(),
    "digit": lambda b: chr(b).isdigit(),
    "alnum": lambda b: chr(b).isalnum(),
    "upper": lambda b: chr(b).isupper(),
    "lower": lambda b: chr(b).islower(),
    "punct": lambda b: 33 <= b <= 126 and not chr(b).isalnum(),
    "blank": lambda b: b in (9, 32),
    "space": lambda b: 9 <= b <= 13 or b == 32,
    "word": lambda b: chr(b).isalnum() or b == 95,
    "xdigit": lambda b: chr(b) in "0123456789abcdefABCDEF",
    "cntrl": lambda b: b < 32 or b == 127,
    "print": lambda b: 32 <= b <= 126,
    "graph": lambda b: 33 <= b <= 126,
    "ascii": lambda b: True,
}
_POSIX_CLASS = re.compile(r"\[([:=.])(\^?)([a-z]*)\1\]")


def _posix_class_ranges(name: str, negated: bool) -> str:
    """The bytes of POSIX class NAME (or all others, NEGATED) as ranges for a bytes regex."""
    member = _POSIX_CLASSES[name]
    inside = [b for b in range(256) if (b < 128 and member(b)) != negated]
    ranges = []
    for _, run in itertools.groupby(enumerate(inside), lambda pair: pair[1] - pair[0]):
        values = [b for _, b in run]
        ranges.append(f"\\x{values[0]:02x}-\\x{values[-1]:02x}")
    return "".join(ranges)


def perl_posix_classes(pattern: str) -> str:
    """PATTERN with the POSIX classes in its brackets ([[:space:]], [^[:^digit:]_]) spelled
    out as byte ranges, which Python's re does not know (it reads `[[:` as a `[` and a `:`).

    A `[` in brackets that starts no POSIX class stays literal, as in Perl."""
    out = []
    at = 0
    in_brackets = False
    while at < len(pattern):
        char = pattern[at]
        if char == "\\":
            out.append(pattern[at : at + 2])
            at += 2
        elif not in_brackets:
            out.append(char)
            at += 1
            if char == "[":
                in_brackets = True
                start = at + (pattern.startswith("^", at))
                if pattern.startswith("]", start):  # a ] first in brackets is literal
                    start += 1
                out.append(pattern[at:start])
                at = start
        elif char == "]":
            in_brackets = False
            out.append(char)
            at += 1
        elif char == "[" and (match := _POSIX_CLASS.match(pattern, at)):
            kind, negated, name = match.groups()
            if kind != ":":
                raise UsageError(f"--colsep: POSIX syntax [{kind} {kind}] is not supported")
            if name not in _POSIX_CLASSES:
                raise UsageError(f"--colsep: unknown POSIX class [:{negated}{name}:]")
            out.append(_posix_class_ranges(name, bool(negated)))
            at = match.end()
        else:
            out.append(char)
            at += 1
    return "".join(out)


class ColumnSplitter:
    """--colsep: cuts a line into columns as GNU parallel does, with Perl's
    `split /REGEX/, LINE, -1` on the line's bytes."""

    def __init__(self, pattern: str) -> None:
        """Compile PATTERN (Perl's POSIX classes translated) as a bytes regex: as in Perl
        on bytes, `.` is a byte and \\s \\w \\d \\b are ASCII."""
        try:
            with warnings.catch_warnings():
                # Python warns that `[[`, `--`, `&&`, `||`, `~~` in brackets may change
                # meaning one day; today they are literal, as in Perl.
                warnings.simplefilter("ignore", FutureWarning)
                self.regex = re.compile(as_bytes(perl_posix_classes(pattern)))
        except re.error as exc:
            raise UsageError(f"--colsep: not a regular expression: {exc}") from None

    def split(self, line: str) -> list[str]:
        """LINE's columns (untrimmed), capture groups' text among them, as Perl splits."""
        data = as_bytes(line)
        fields = []
        start = 0
        for match in self.regex.finditer(data):
            if start >= len(data):
                break
            # Perl's split takes only a match ending past where the field starts: an empty
            # one there (at the line's start, or right after a separator) cuts nothing.
            # finditer then tries a longer match at that place before moving on, as Perl.
            if match.end() == start:
                continue
            fields.append(data[start : match.start()])
            fields += [group or b"" for group in match.groups()]
            start = match.end()
        fields.append(data[start:])  # the rest, even empty (the limit -1 keeps it)
        return [field.decode("utf-8", "surrogateescape") for field in fields]


class Template:
    """A --command, --pipe command or --tagstring, cut once into text and replacement strings,
    filled for each line exactly as GNU parallel fills it."""

    def __init__(self, text: str, colsep: str | None = None, kind: str = "command") -> None:
        """Parse TEXT; KIND is 'command' (-c), 'pipe' (no line: one empty argument, nothing
        appended), 'tag' (--tagstring: nothing quoted, {host} known too) or 'plain' (a file
        name: nothing quoted, nothing appended)."""
        if _PERL_EXPRESSION.search(text):
            raise UsageError(f"{text!r}: {{= perl expression =}} is not supported by sshfan")
        self.text = text
        self.colsep = ColumnSplitter(colsep) if colsep is not None else None
        pattern = _TAG_REPLACEMENT if kind == "tag" else _REPLACEMENT
        self.parts: list[str | tuple[str, str | None, str]] = []
        first = -1
        at = 0
        for match in pattern.finditer(text):
            if first < 0:
                first = match.start()
            self.parts.append(text[at : match.start()])
            position, operation, special = match.group(1), match.group(2), match.group(3)
            if kind == "tag" and match.group(6):
                self.parts.append(("host", None, ""))
            elif match.group(5):
                self.parts.append((match.group(5), None, "") if int(match.group(4)) == 0 else "")
            elif special:
                self.parts.append((special, None, ""))
            else:
                self.parts.append(("arg", position, operation))
            at = match.end()
        self.parts.append(text[at:])
        if first < 0 and kind == "command":  # no replacement string: the line is appended
            self.parts[-1] += " "
            self.parts += [("arg", None, ""), ""]
        # As parallel: when the command's first word holds a replacement string ({}, my_{},
        # V={} excepted), nothing is quoted, so that `-c '{}'` runs the line itself.
        self.quote = kind in ("command", "pipe") and not (
            first >= 0 and not re.search(r"[ \t\n=]", text[:first])
        )
        self.uses_line = any(isinstance(p, tuple) and p[0] == "arg" for p in self.parts)
        self._growth = sum(isinstance(p, tuple) for p in self.parts)
        self._fixed = sum(len(as_bytes(p)) for p in self.parts if isinstance(p, str))

    def columns(self, line: str) -> list[str]:
        """The line's arguments: its --colsep columns, trimmed of blanks (parallel's implied
        --trim rl), or the whole line."""
        if self.colsep is None:
            return [line]
        return [column.strip(" \t\n\r\f\v") for column in self.colsep.split(line)]

    def render(self, line: str, seq: int, slot: str = SLOT_MARK, host: str = "") -> str:
        """The template filled for LINE, task SEQ (slot SLOT, on HOST for a tag)."""
        quote = shell_quote if self.quote else (lambda text: text)
        columns: list[str] | None = None
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            what, position, operation = part
            if what == "#":
                out.append(str(seq))
            elif what == "%":
                out.append(slot)
            elif what == "host":
                out.append(host)
            else:
                if columns is None:
                    columns = self.columns(line)
                transform = _TRANSFORMS[operation]
                if position is None or position == "0":  # parallel reads {0} as {}
                    out.append(" ".join(quote(transform(c)) for c in columns))
                    continue
                number = int(position)
                index = number - 1 if number > 0 else len(columns) + number
                if -len(columns) <= index < len(columns):
                    out.append(quote(transform(columns[index])))
                # else a column that is not there: nothing, not even '' (as parallel)
        return "".join(out)

    def may_exceed(self, line: str) -> bool:
        """Whether the filled template might be too long to exec (a cheap upper bound)."""
        # A replacement is at most the line quoted: 5 bytes for each of its bytes (a ' is
        # '"'"'), and 2 quotes and a space for each of its columns (at most a char each).
        widest = 5 * len(as_bytes(line)) + 3 * (len(line) + 1) + 20
        return self._fixed + self._growth * widest > EXEC_ARG_MAX


def read_tasks(
    path: Path,
    merged: MergedOutput | None,
    done: array.array[int],
    template: Template | None = None,
) -> Iterator[Task]:
    """Stream the tasks file as Tasks; skipped and already-journaled tasks go to MERGED.

    Without a template a line is a command and a blank line is skipped; with one every
    line is an argument, a blank one too (an empty {}), as GNU parallel has it."""
    with open(path, "rb") as handle:
        for seq, raw in enumerate(handle, 1):
            line = _task_line(raw)
            if template is None and not line.strip():
                if merged is not None:
                    merged.skip(seq)
            elif seq < len(done) and done[seq] >= 0:
                if merged is not None:
                    merged.put(seq, done[seq])
            elif template is not None:
                yield Task(seq, template.render(line, seq), arg=line)
            else:
                yield Task(seq, line)


def known_long_tasks(
    path: Path, done: array.array[int], history: DurationHistory, template: Template | None = None
) -> list[Task]:
    """The tasks of the file that HISTORY knows to be long, longest first (for LPT).

    A pass over the file of its own, made only when the history holds something: the
    run itself streams the file, and this keeps only the tasks it finds (a bounded few)."""
    found: list[tuple[float, Task]] = []
    if not history.known:
        return []
    with open(path, "rb") as handle:
        for seq, raw in enumerate(handle, 1):
            line = _task_line(raw)
            if (template is None and not line.strip()) or (seq < len(done) and done[seq] >= 0):
                continue
            command = line if template is None else template.render(line, seq)
            duration = history.known.get(history.key(command))
            if duration is not None:
                arg = line if template is not None else None
                found.append((duration, Task(seq, command, arg=arg, long=True)))
    found.sort(key=lambda pair: (-pair[0], pair[1].seq))
    return [task for _, task in found]


PIPE_READ = 1024 * 1024  # bytes read at a time while looking for the end of a long record
PIPE_AHEAD_BYTES = 16 * 1024 * 1024  # --pipe data a host holds queued beyond its slots, about


def _pipe_chunks(path: Path, lines: int | None, block: int) -> Iterator[bytes]:
    """Cut a data file into --pipe chunks: LINES lines each, or records (lines) up to BLOCK
    bytes, as GNU parallel cuts them: a chunk ends at the last line end within BLOCK bytes,
    a line longer than BLOCK goes whole, and the rest of the file, once it fits, is the last."""
    with open(path, "rb") as handle:
        if lines:
            while first := handle.readline():
                # parallel looks for a chunk's first line end from its second byte on: an
                # empty first line is glued to the next one (they count as one record).
                if first == b"\n":
                    first += handle.readline()
                yield first + b"".join(itertools.islice(handle, lines - 1))
            return
        buf = bytearray()
        eof = False
        while True:
            # More than BLOCK bytes say whether the chunk is the file's last one.
            while len(buf) <= block and not eof:
                more = handle.read(max(block + 1 - len(buf), PIPE_READ))
                eof = not more
                buf += more
            if not buf:
                return
            if len(buf) <= block:
                yield bytes(buf)
                return
            end = buf.rfind(b"\n", 0, block)
            if end < 0:  # one record longer than the block: it goes whole, never cut
                start = block
                while (end := buf.find(b"\n", start)) < 0 and not eof:
                    start = len(buf)
                    more = handle.read(PIPE_READ)
                    eof = not more
                    buf += more
                if end < 0:
                    end = len(buf) - 1
            yield bytes(buf[: end + 1])
            del buf[: end + 1]


def scan_chunks(path: Path, lines: int | None, block: int) -> tuple[int, str]:
    """Count a --pipe data file's chunks and hash it."""
    digest = hashlib.sha256()
    count = 0
    with _reading(path, "data file"):
        for count, chunk in enumerate(_pipe_chunks(path, lines, block), 1):  # noqa: B007
            digest.update(chunk)
    return count, digest.hexdigest()


def read_chunks(
    path: Path,
    merged: MergedOutput | None,
    done: array.array[int],
    command: Template,
    lines: int | None,
    block: int,
) -> Iterator[Task]:
    """Stream --pipe chunks as Tasks running COMMAND with the chunk on stdin; seq counts chunks.

    As in GNU parallel, {#} and {%} in COMMAND are the chunk's number and slot, and the
    other replacement strings stand for an empty argument."""
    for seq, chunk in enumerate(_pipe_chunks(path, lines, block), 1):
        if seq < len(done) and done[seq] >= 0:
            if merged is not None:
                merged.put(seq, done[seq])
        else:
            yield Task(seq, command.render("", seq), data=chunk, arg="")


# ============================================================================
# 12. Journal
# ============================================================================
# The journal is an append-only file of frames (the same framing as the wire):
# a header record, OUTPUT pieces of large outputs as they stream in, and one DONE
# record per finished task. Appending is one write per batch of results; a torn
# last record (the head killed mid-write) is cut off when --resume first writes.
# Nothing earlier is destroyed before the run has a result to record: a new journal
# is renamed over the old one at its first task record, and the output is opened
# then. Readers (`sshfan results`) open it read-only and never cut anything: a run
# may be writing it. One run at a time holds it (a lock file beside it).

JOURNAL_VERSION = 1
_IOV_BATCH = 512  # buffers per writev: well under IOV_MAX (1024 on Linux)
DONE_HEAD = struct.Struct(">I")


class Journal:
    """Append-only record of finished tasks, from which the merged output is rendered."""

    def __init__(self, path: Path, fd: int, size: int, writable: bool = True) -> None:
        """Wrap an open journal file descriptor whose current size is SIZE."""
        self.path = path
        self._fd = fd
        self.size = size
        self.writable = writable
        self._written = size  # the end of the whole records on disk
        self._pending: list[bytes] = []
        self._dirty = False
        # A write or fsync that failed: no record may follow it (it would sit behind a
        # torn one), so every later flush, and close, raises it again.
        self._error: OSError | None = None
        # What must happen before the first record after the header is written (see
        # create and reopen); None once done, or when there is nothing to do.
        self._commit: Callable[[], None] | None = None
        self._settle: Callable[[], None] | None = None  # at close, if never committed
        self.recorded = False  # whether a record after the header was written by this run
        self.failed_before = 0  # failed tasks found in the journal when it was reopened
        self.failed_seqs: list[int] = []  # which ones (the index --resume-failed reruns)
        # Done tasks whose last record has stdout in the merged output (OutputRange),
        # found when it was reopened: --resume copies them in first (take_in_outputs).
        self.in_output: set[int] = set()
        # Made durable before each sync: the merged output's bytes the records point to.
        self.before_sync: Callable[[], None] | None = None

    @classmethod
    def create(cls, path: Path, header: dict[str, Any]) -> Journal:
        """Start a new journal for PATH with a header record.

        It is written beside PATH under a temporary name and renamed over any old
        journal only when the first task's record comes: a run that ends before any
        task finished leaves an earlier journal (and so --resume of it) as it was."""
        target = Path(os.path.realpath(path))  # a symlinked journal: replace its target
        temp = target.with_name(target.name + ".new")
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        journal = cls(path, fd, 0)
        journal.append(KIND_JOURNAL, json.dumps(header).encode())
        journal.flush()
        journal.recorded = False
        journal._commit = functools.partial(journal._rename_into_place, temp, target)
        journal._settle = functools.partial(journal._settle_new, temp, target)
        return journal

    @classmethod
    def reopen(cls, path: Path) -> tuple[Journal, dict[str, Any], array.array[int]]:
        """Open an existing journal to append to (--resume): its header and each done
        task's record offset by seq. A torn last record is cut before the first write."""
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        journal, header, done = cls._scan(path, fd, writable=True)
        end = journal.size
        if os.fstat(fd).st_size > end:  # a record torn when the head died
            journal._commit = functools.partial(os.ftruncate, fd, end)
        return journal, header, done

    @classmethod
    def open_read(cls, path: Path) -> tuple[Journal, dict[str, Any], array.array[int]]:
        """Open a journal only to read it (`sshfan results`), never changing it: a run
        may be appending to it, and what looks like a torn record is its write."""
        fd = os.open(path, os.O_RDONLY)
        return cls._scan(path, fd, writable=False)

    @classmethod
    def _scan(
        cls, path: Path, fd: int, writable: bool
    ) -> tuple[Journal, dict[str, Any], array.array[int]]:
        """Read FD's whole records: the journal (sized to them), its header, done offsets."""
        end = os.fstat(fd).st_size
        journal = cls(path, fd, end, writable)
        done = array.array("q")
        failed = bytearray()  # by seq: whether its last record is a failure
        offset = 0
        header: dict[str, Any] = {}
        while offset < end:
            raw = os.pread(fd, FRAME_HEADER.size, offset)
            if len(raw) < FRAME_HEADER.size:
                break
            magic, kind, length = FRAME_HEADER.unpack(raw)
            if magic != FRAME_MAGIC:
                os.close(fd)
                raise UsageError(f"{path}: journal is corrupt at byte {offset}")
            if offset + FRAME_HEADER.size + length > end:
                break
            try:
                header = cls._scan_record(journal, header, kind, offset, length, done, failed)
            except (ValueError, KeyError, TypeError, IndexError, struct.error):
                # A whole record (a torn one ends the scan above) that does not read as
                # one: the file was changed by something else, or damaged.
                os.close(fd)
                raise UsageError(f"{path}: journal is corrupt at byte {offset}") from None
            except UsageError:
                os.close(fd)
                raise
            offset += FRAME_HEADER.size + length
        if not header:
            os.close(fd)
            raise UsageError(f"{path}: not an sshfan journal")
        journal.failed_before = failed.count(1)
        journal.failed_seqs = [seq for seq, bad in enumerate(failed) if bad]
        journal.size = journal._written = offset
        return journal, header, done

    @staticmethod
    def _scan_record(
        journal: Journal,
        header: dict[str, Any],
        kind: int,
        offset: int,
        length: int,
        done: array.array[int],
        failed: bytearray,
    ) -> dict[str, Any]:
        """Take in the whole record of KIND at OFFSET (_scan); return the header as it
        now stands. A record that does not read as its kind raises ValueError or kin."""
        path, fd = journal.path, journal.fd
        if kind == KIND_JOURNAL and offset == 0:
            header = json.loads(os.pread(fd, length, offset + FRAME_HEADER.size))
            if not isinstance(header, dict):
                raise ValueError("a header that is not an object")
        elif kind == KIND_HOSTS and "onall" in header:
            hosts = json.loads(os.pread(fd, length, offset + FRAME_HEADER.size))["onall"]
            if hosts[: len(header["onall"])] != header["onall"]:  # joined hosts only add
                raise ValueError("a host list that is not the one before and more")
            header["onall"] = hosts
        elif kind == KIND_DONE:
            meta = journal._read_meta(offset)
            seq = meta["seq"]
            if type(seq) is not int or seq < 1:
                raise ValueError(f"seq {seq!r}")
            if "onall" in header:  # every task on every host: indexed by (host, seq)
                seq += _onall_place(header, meta["host"], path) * header["lines"]
            if len(done) <= seq:
                done.extend([-1] * (seq + 1 - len(done)))
                failed.extend(bytes(seq + 1 - len(failed)))
            done[seq] = offset  # a task run again (--resume-failed): its last record
            failed[seq] = bool(meta["exit_code"] or meta["timed_out"])
            if "in_output" in meta:
                journal.in_output.add(seq)
            else:
                journal.in_output.discard(seq)
        return header

    @property
    def committed(self) -> bool:
        """Whether the journal at PATH is this run's (a record of its own was written)."""
        return self._commit is None

    def commit(self) -> None:
        """Make the journal at PATH this run's now (as the first record would): before
        the merged output is written to other than from the journal's records."""
        if self._commit is not None:
            self._pending.append(b"")  # flush runs the commit only when it has something
            self.flush()

    def _rename_into_place(self, temp: Path, target: Path) -> None:
        """Make the new journal (header durable) the one at TARGET, replacing an old one."""
        os.fsync(self._fd)
        os.replace(temp, target)
        _sync_directory(target)

    def _settle_new(self, temp: Path, target: Path) -> None:
        """At close of a journal that recorded no task: keep it only if no old one is there
        (an old journal stays what --resume continues)."""
        if target.exists():
            temp.unlink(missing_ok=True)
        else:
            self._rename_into_place(temp, target)

    def _named(self, exc: OSError) -> OSError:
        """EXC with the journal's path as its file name (a writev error has none)."""
        return OSError(exc.errno, exc.strerror or str(exc), str(self.path))

    def append(self, kind: int, payload: bytes | list) -> int:
        """Queue a record, its payload whole or as a list of pieces, for the next flush;
        return the offset it will have."""
        offset = self.size
        parts = payload if isinstance(payload, list) else [payload]
        length = sum(map(len, parts))
        self._pending.append(FRAME_HEADER.pack(FRAME_MAGIC, kind, length))
        self._pending.extend(parts)
        self.size += FRAME_HEADER.size + length
        return offset

    def flush(self) -> None:
        """Write queued records to the file (one write; the OS holds them if we die)."""
        if self._error is not None:
            self._pending = []  # never to be written: do not hold them while the run ends
            raise self._error
        if not self._pending:
            return
        data = self._pending
        self._pending = []
        try:
            if self._commit is not None:
                commit, self._commit = self._commit, None
                self._settle = None
                commit()
            for start in range(0, len(data), _IOV_BATCH):
                part = data[start : start + _IOV_BATCH]
                written = os.writev(self._fd, part)
                total = sum(len(d) for d in part)
                if written < total:  # a short write to a regular file: the disk is full
                    rest = b"".join(part)[written:]
                    while rest:
                        rest = rest[os.write(self._fd, rest) :]
        except OSError as exc:
            self._error = self._named(exc)
            # Cut what was half written, so that the journal ends with a whole record
            # and --resume can go on from it.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._written)
            raise self._error from None
        self._written = self.size
        self._dirty = True
        self.recorded = True

    def sync(self) -> None:
        """Make written records durable on disk (a failure is raised by the next flush)."""
        if self._dirty and self._error is None:
            self._dirty = False  # first: a write racing this fsync marks it dirty again
            try:
                if self.before_sync is not None:
                    self.before_sync()  # the output bytes records point to, first
                os.fsync(self._fd)
            except OSError as exc:  # (the output's, from before_sync, names the output)
                self._error = exc if exc.filename else self._named(exc)
                raise self._error from None

    @property
    def fd(self) -> int:
        """The journal's file descriptor (for copies done by the kernel)."""
        return self._fd

    def read(self, offset: int, length: int) -> bytes:
        """Read LENGTH bytes at OFFSET (flushed records only)."""
        return os.pread(self._fd, length, offset)

    def _read_meta(self, offset: int) -> dict[str, Any]:
        """Read a DONE record's metadata (and note where its output tails start)."""
        start = offset + FRAME_HEADER.size
        (meta_len,) = DONE_HEAD.unpack(self.read(start, DONE_HEAD.size))
        meta = json.loads(self.read(start + DONE_HEAD.size, meta_len))
        meta["tails_at"] = start + DONE_HEAD.size + meta_len
        return meta

    def load_result(self, offset: int) -> TaskResult:
        """Read a finished task back from its DONE record."""
        meta = self._read_meta(offset)
        tails = self.read(meta["tails_at"], meta["n_out"] + meta["n_err"])
        return TaskResult(
            seq=meta["seq"],
            command=_get_text(meta, "task") or "",
            host=meta["host"],
            exit_code=meta["exit_code"],
            signal=meta.get("signal"),
            timed_out=meta["timed_out"],
            duration_s=meta["duration_s"],
            attempts=meta["attempts"],
            stdout=tails[: meta["n_out"]],
            stderr=tails[meta["n_out"] :],
            pieces=[tuple(p) for p in meta["pieces"]],  # type: ignore[misc]
            arg=_get_text(meta, "arg"),
            returned=meta.get("returned", []),
            slot=meta.get("slot", 0),
            in_output=OutputRange(*meta["in_output"]) if "in_output" in meta else None,
        )

    def add_hosts(self, hosts: list[str]) -> None:
        """Queue --onall's whole host list, hosts that joined mid-run last (KIND_HOSTS):
        their results are indexed by their place in it."""
        self.append(KIND_HOSTS, json.dumps({"onall": hosts}).encode())

    def add_result(self, result: TaskResult) -> int:
        """Queue a finished task's DONE record; return its offset."""
        meta: dict[str, Any] = {"seq": result.seq}
        _put_text(meta, "task", result.command)
        meta.update(
            host=result.host,
            exit_code=result.exit_code,
            signal=result.signal,
            timed_out=result.timed_out,
            duration_s=result.duration_s,
            attempts=result.attempts,
            pieces=result.pieces,
            n_out=len(result.stdout),
            n_err=len(result.stderr),
            slot=result.slot,
        )
        if result.arg is not None:
            _put_text(meta, "arg", result.arg)
        if result.returned:
            meta["returned"] = result.returned
        if result.in_output is not None:
            meta["in_output"] = list(result.in_output)
        encoded = json.dumps(meta).encode()
        payload = b"".join((DONE_HEAD.pack(len(encoded)), encoded, result.stdout, result.stderr))
        return self.append(KIND_DONE, payload)

    def check_in_outputs(self, done: array.array[int]) -> int:
        """--resume: a done task whose stdout is no longer where its record says (the
        output replaced, cut or gone) is not done: it runs again. Return the first seq
        that runs (tasks after it may come out longer or shorter than before)."""
        for seq in sorted(self.in_output):
            if done[seq] < 0:  # to run again anyway (--resume-failed)
                self.in_output.discard(seq)
                continue
            where = self.load_result(done[seq]).in_output
            assert where is not None
            try:
                info = os.stat(where.path)
                there = (info.st_dev, info.st_ino) == (where.dev, where.ino)
                there = there and info.st_size >= where.offset + where.length
            except OSError:
                there = False
            if not there:
                done[seq] = -1
                self.in_output.discard(seq)
                if seq in self.failed_seqs:
                    self.failed_seqs.remove(seq)
                    self.failed_before -= 1
        return next((seq for seq in range(1, len(done)) if done[seq] < 0), len(done))

    def in_output_end(self, done: array.array[int]) -> int:
        """Where in the output the last byte of the done tasks' stdout there ends."""
        ends = [self.load_result(done[seq]).in_output for seq in self.in_output]
        return max((w.offset + w.length for w in ends if w is not None), default=0)

    def take_in_outputs(self, done: array.array[int], seqs: list[int]) -> None:
        """Copy into the journal the stdout that done tasks SEQS left in the merged output,
        each with a new record: it will not be where it was once tasks before it have
        run again. One whose bytes cannot be read after all runs again."""
        for seq in sorted(seqs):
            self.in_output.discard(seq)
            result = self.load_result(done[seq])
            where = result.in_output
            assert where is not None
            pieces: list[tuple[int, int, int]] | None = []
            try:
                source = os.open(where.path, os.O_RDONLY)
            except OSError:
                source = -1
            try:
                info = os.fstat(source) if source >= 0 else None
                if (
                    info is None
                    or (info.st_dev, info.st_ino) != (where.dev, where.ino)
                    or info.st_size < where.offset + where.length
                ):
                    pieces = None
                for at in range(0, where.length if pieces is not None else 0, OUTPUT_PIECE * 4):
                    size = min(OUTPUT_PIECE * 4, where.length - at)
                    try:
                        data = os.pread(source, size, where.offset + at)
                    except OSError:
                        data = b""
                    if len(data) != size:
                        pieces = None
                        break
                    head = OUTPUT_HEAD.pack(seq, 1)
                    start = self.append(KIND_OUTPUT, [head, data])
                    pieces.append((start + FRAME_HEADER.size + len(head), 1, size))
                    self.flush()  # a piece at a time: memory stays flat
            finally:
                if source >= 0:
                    os.close(source)
            if pieces is None:  # not done after all: this run runs it again
                done[seq] = -1
                if seq in self.failed_seqs:
                    self.failed_seqs.remove(seq)
                    self.failed_before -= 1
                continue
            pieces += [p for p in result.pieces if p[1] != 1]
            copied = dataclasses.replace(result, pieces=pieces, in_output=None)
            done[seq] = self.add_result(copied)
            self.flush()

    def close(self) -> None:
        """Flush, sync and close the file; raise a write error met on the way."""
        if self._fd < 0:
            return
        try:
            if self.writable:
                self.flush()
                if self._settle is not None:
                    settle, self._settle = self._settle, None
                    settle()
                if self.before_sync is not None:
                    self.before_sync()
                os.fsync(self._fd)
        except OSError as exc:
            raise (exc if exc.filename else self._named(exc)) from None
        finally:
            os.close(self._fd)
            self._fd = -1


def _write_parts(fd: int, parts: list[Any]) -> int:
    """Write PARTS (bytes-like) to FD in order, in as few writes as it takes; their size."""
    total = 0
    for start in range(0, len(parts), _IOV_BATCH):
        batch = parts[start : start + _IOV_BATCH]
        size = sum(len(part) for part in batch)
        written = os.writev(fd, batch)
        if written < size:  # a short write to a regular file: go on with the rest
            rest = memoryview(b"".join(batch))[written:]
            while rest:
                rest = rest[os.write(fd, rest) :]
        total += size
    return total


def _sync_directory(path: Path) -> None:
    """fsync PATH's directory, so that a rename in it survives a machine crash."""
    with contextlib.suppress(OSError):  # not every filesystem can: the rename stands
        fd = os.open(path.parent if str(path.parent) else ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _onall_place(header: dict[str, Any], host: str, path: Path) -> int:
    """The place of HOST in an --onall journal's host list (its results' block)."""
    try:
        return header["onall"].index(host)
    except ValueError:
        raise UsageError(
            f"{path}: journal has a result from host {host!r} it does not list"
        ) from None


def _put_text(record: dict[str, Any], key: str, text: str) -> None:
    """Store a task's TEXT under KEY, or, when its bytes are not UTF-8, under KEY_b64."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        record[key + "_b64"] = base64.b64encode(as_bytes(text)).decode("ascii")
    else:
        record[key] = text


def _get_text(record: dict[str, Any], key: str) -> str | None:
    """Read back what _put_text stored (None: nothing)."""
    if key + "_b64" in record:
        return base64.b64decode(record[key + "_b64"]).decode("utf-8", "surrogateescape")
    return record.get(key)


# ============================================================================
# 13. Merged output: text, jsonl, gathered hosts and --results, from the journal
# ============================================================================


def _output_chunks(where: OutputRange) -> Iterator[bytes]:
    """The stdout a task wrote straight into the merged output, read back from there."""
    fd = os.open(where.path, os.O_RDONLY)
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != (where.dev, where.ino):
            raise OSError(errno.ESTALE, "replaced since the run wrote it", where.path)
        for at in range(0, where.length, OUTPUT_PIECE * 4):
            size = min(OUTPUT_PIECE * 4, where.length - at)
            data = os.pread(fd, size, where.offset + at)
            if len(data) != size:
                raise OSError(errno.ESTALE, "cut since the run wrote it", where.path)
            yield data
    finally:
        os.close(fd)


def _stream_chunks(result: TaskResult, journal: Journal, stream: int) -> Iterator[bytes]:
    """A task's stdout (1) or stderr (2) as chunks: what is in the merged output or the
    journal, then the tail."""
    if stream == 1 and result.in_output is not None:
        yield from _output_chunks(result.in_output)
    for offset, piece_stream, length in result.pieces:
        if piece_stream == stream:
            yield journal.read(offset, length)
    yield result.stdout if stream == 1 else result.stderr


def _is_utf8(chunks: Iterator[bytes]) -> bool:
    """Whether the concatenated chunks are valid UTF-8 (checked incrementally)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for chunk in chunks:
            decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _write_json_string(out: IO[bytes], chunks: Iterator[bytes]) -> None:
    """Write valid UTF-8 chunks as one JSON string, escaping chunk by chunk."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    out.write(b'"')
    for chunk in chunks:
        text = decoder.decode(chunk)
        if text:
            out.write(json.dumps(text, ensure_ascii=False)[1:-1].encode())
    out.write(b'"')


def _write_base64(out: IO[bytes], chunks: Iterator[bytes]) -> None:
    """Write chunks as one base64 JSON string without holding them all."""
    carry = b""
    out.write(b'"')
    for chunk in chunks:
        data = carry + chunk
        cut = len(data) - len(data) % 3
        out.write(base64.b64encode(data[:cut]))
        carry = data[cut:]
    out.write(base64.b64encode(carry) + b'"')


def _write_tagged(out: IO[bytes], prefix: bytes, chunks: Iterator[bytes]) -> None:
    """Write chunks with PREFIX at the start of every line (--tag): before the first byte
    and before each byte after a LF or a CR, as GNU parallel tags (a progress bar's CR
    lines are tagged too; nothing after a last line end)."""
    at_start = True
    for chunk in chunks:
        for piece in _LINE_PIECES.split(chunk):
            if not piece:
                continue
            if at_start:
                out.write(prefix)
            out.write(piece)
            at_start = piece[-1:] in (b"\n", b"\r")


_LINE_PIECES = re.compile(rb"(?<=[\r\n])")  # cuts after each LF and CR, keeping them


def _write_host_lines(out: IO[bytes], host: str, chunks: Iterator[bytes]) -> None:
    """Write chunks as `host: line` lines, ending the last line if the output did not."""
    last = [b"\n"]

    def noting_last() -> Iterator[bytes]:
        """The chunks, remembering the last non-empty one."""
        for chunk in chunks:
            last[0] = chunk or last[0]
            yield chunk

    _write_tagged(out, f"{host}: ".encode(), noting_last())
    if not last[0].endswith(b"\n"):
        out.write(b"\n")


def fold_names(names: list[str]) -> str:
    """Host names folded into ranges as ClusterShell prints them: web01,web02,web04 is
    `web[01-02,04]` (names without a number, or that do not fold back, stay as they are)."""
    groups: dict[tuple[str, str], list[str]] = {}
    order: list[tuple[str, str] | str] = []
    for name in names:
        match = re.fullmatch(r"(.*?)(\d+)(\D*)", name)
        if not match or "[" in name:
            order.append(name)
            continue
        key = (match.group(1), match.group(3))
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(match.group(2))
    parts = []
    for item in order:
        if isinstance(item, str):
            parts.append(item)
            continue
        numbers = groups[item]
        if len(numbers) == 1:
            parts.append(item[0] + numbers[0] + item[1])
            continue
        spans: list[list[str]] = []
        for number in sorted(numbers, key=int):
            previous = spans[-1][-1] if spans else ""
            padded = number.startswith("0") or previous.startswith("0")
            same_width = len(number) == len(previous) or not padded
            if previous and int(number) == int(previous) + 1 and same_width:
                spans[-1].append(number)
            else:
                spans.append([number])
        inner = ",".join(s[0] if len(s) == 1 else f"{s[0]}-{s[-1]}" for s in spans)
        folded = f"{item[0]}[{inner}]{item[1]}"
        try:
            fine = sorted(expand_range(folded)) == sorted(item[0] + n + item[1] for n in numbers)
        except ValueError:
            fine = False
        parts += [folded] if fine else [item[0] + n + item[1] for n in numbers]
    return ",".join(parts)


def _copy_in_kernel(journal: Journal, pieces: list[tuple[int, int]], out: IO[bytes]) -> bool:
    """Copy journal ranges to OUT's file descriptor without passing them through Python.

    Large outputs are the one place bytes are copied twice (journal, then output):
    copy_file_range (or sendfile into a pipe) halves that cost. False: not possible
    here (OUT has no file descriptor), nothing was written."""
    try:
        target = out.fileno()
    except (OSError, ValueError, AttributeError):
        return False
    out.flush()
    for offset, length in pieces:
        done = 0
        while done < length:
            count = length - done
            try:
                copied = os.copy_file_range(journal.fd, target, count, offset + done)
            except OSError:  # a pipe, another filesystem, an old kernel
                try:
                    copied = os.sendfile(target, journal.fd, offset + done, count)
                except OSError:
                    copied = os.write(target, journal.read(offset + done, count))
            if copied <= 0:
                raise OSError(f"could not copy output from the journal at byte {offset + done}")
            done += copied
    return True


Tagger = Callable[[TaskResult], bytes]  # the prefix of each output line (--tag, --tagstring)


def render_result(
    out: IO[bytes],
    fmt: str,
    result: TaskResult,
    journal: Journal | None,
    tag: Tagger | None = None,
) -> None:
    """Write one finished task to the merged output in FORMAT (text or jsonl; none: nothing,
    as parallel --results prints nothing)."""
    if fmt == "none":
        return
    if fmt == "lines":  # sshfan all: each line after its host's name, as pdsh and clush
        chunks = _stream_chunks(result, journal, 1) if journal else iter([result.stdout])
        _write_host_lines(out, result.host, chunks)
        return
    if fmt == "text":
        if tag is not None:
            prefix = tag(result)
            chunks = _stream_chunks(result, journal, 1) if journal else iter([result.stdout])
            _write_tagged(out, prefix, chunks)
        elif result.in_output is not None and journal is not None:  # read back from there
            for chunk in _stream_chunks(result, journal, 1):
                out.write(chunk)
        elif result.pieces and journal is not None:
            pieces = [(offset, length) for offset, stream, length in result.pieces if stream == 1]
            if not _copy_in_kernel(journal, pieces, out):
                for chunk in _stream_chunks(result, journal, 1):
                    out.write(chunk)
                return
            out.write(result.stdout)
        else:
            out.write(result.stdout)
        return
    command = as_bytes(result.command)
    record: dict[str, Any] = {"seq": result.seq, "task": command.decode("utf-8", "replace")}
    if "\ufffd" in record["task"] and not _is_utf8(iter([command])):
        record["task_b64"] = base64.b64encode(command).decode("ascii")
    record["host"] = result.host
    record["exit_code"] = result.exit_code
    if result.signal is not None:
        record["signal"] = result.signal
    record["timed_out"] = result.timed_out
    record["duration_s"] = round(result.duration_s, 6)
    record["attempts"] = result.attempts
    if (not result.pieces and result.in_output is None) or journal is None:
        for name, data in (("stdout", result.stdout), ("stderr", result.stderr)):
            try:
                record[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                record[name + "_b64"] = base64.b64encode(data).decode("ascii")
        out.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        return
    out.write(json.dumps(record, ensure_ascii=False)[:-1].encode())
    for name, stream in (("stdout", 1), ("stderr", 2)):
        if _is_utf8(_stream_chunks(result, journal, stream)):
            out.write(f', "{name}": '.encode())
            _write_json_string(out, _stream_chunks(result, journal, stream))
        else:
            out.write(f', "{name}_b64": '.encode())
            _write_base64(out, _stream_chunks(result, journal, stream))
    out.write(b"}\n")


COPY_IN_THREAD = 1024 * 1024  # output bytes in the journal from which a thread copies them


class MergedOutput:
    """Writes finished tasks to the merged output in seq order as they come in."""

    BLANK = 0  # offset 0 is the journal's header, never a task: marks a blank line
    WAITING = -1

    def __init__(
        self,
        out: IO[bytes],
        fmt: str,
        journal: Journal,
        tag: Tagger | None = None,
        copier: bool = False,
        name: str = "",
    ) -> None:
        """Render into OUT (called NAME in errors) in FMT, reading out-of-order results
        back from JOURNAL.

        With COPIER, large text outputs are copied from the journal by a thread (the
        kernel does the copy, without the GIL) while the event loop goes on receiving;
        what comes after them in seq order queues behind them. finish() waits for it."""
        self.out = out
        self.name = name or str(getattr(out, "name", "the output"))
        self.fmt = fmt
        self.tag = tag
        self.journal = journal
        self.next_seq = 1
        # Offsets of results waiting for their turn, indexed by seq - next_seq + head:
        # 8 bytes per waiting task, however large its output.
        self._waiting = array.array("q")
        self._head = 0
        self._copier = copier and fmt == "text" and tag is None
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._backlog = 0  # results handed to the thread and not yet written
        self._error: OSError | None = None
        self.written = False  # whether anything was written (the output opened)
        # Whether the task next in order may write its stdout straight into the output
        # as it streams in (write_direct), if the output is a regular file: each byte
        # then goes to disk once, not to the journal and again to the output. The run
        # allows it when nothing else can write that task's output (_Run.__init__).
        self.direct = False
        self._direct_seq = 0  # the task whose stdout went straight in (0: none)
        self._direct_at = 0  # where in the output it starts
        self._direct_length = 0
        self._direct_file: tuple[str, int, int] | None = None  # path, st_dev, st_ino
        self._direct_fd = -1
        self._direct_unsynced = False
        # --resume over an output holding done tasks' stdout (OutputRange): it is not
        # emptied but rendered over, those bytes skipped, and cut at the end (finish)
        # once past the last of them (IN_PLACE_END): a run that stops before leaves
        # them for the next --resume.
        self.in_place = False
        self.in_place_end = 0
        # Told each seq as the output gets past it, in seq order (--joblog's rows follow).
        self.on_pass: Callable[[int], None] | None = None

    def put(self, seq: int, offset: int, result: TaskResult | None = None) -> None:
        """Record that SEQ is done (its DONE record at OFFSET); write what is now in order."""
        if seq == self.next_seq:
            self._emit(offset, result)
            self._advance()
            self._drain()
            return
        index = self._head + seq - self.next_seq
        if index >= len(self._waiting):
            self._waiting.extend([self.WAITING] * (index + 1 - len(self._waiting)))
        self._waiting[index] = offset

    def skip(self, seq: int) -> None:
        """A blank line: nothing to render for SEQ."""
        self.put(seq, self.BLANK)

    def write_direct(self, task: Task, parts: list[Any], skip: int) -> bool:
        """Write a piece of TASK's stdout (PARTS, less their first SKIP bytes) straight
        into the output if it may go there now; say whether it went. It may when the task
        is next in order, nothing is left to write before it, and this try of it has no
        stdout in the journal."""
        if not task.direct:
            if not (self.direct and self._copier) or task.seq != self.next_seq:
                return False
            if self._error is not None or any(p[1] == 1 for p in task.pieces):
                return False
            with self._lock:
                if self._backlog:
                    return False
            # The journal becomes this run's before the output is changed, as at a first
            # record: a head killed now leaves a journal that --resume continues.
            self.journal.commit()
            if not self.written:
                self.open()
            try:
                self.out.flush()
                fd = self.out.fileno()
                if self._direct_seq == task.seq:  # an earlier try's bytes: start over
                    self._rewind()
                else:
                    info = os.fstat(fd)
                    if not stat.S_ISREG(info.st_mode):
                        self.direct = False  # a pipe or a terminal: through the journal
                        return False
                    self._direct_file = (os.path.realpath(self.name), info.st_dev, info.st_ino)
                    self._direct_seq = task.seq
                    self._direct_at = os.lseek(fd, 0, os.SEEK_CUR)
            except OSError as exc:
                raise self._named(exc) from None
            self._direct_fd = fd
            self._direct_length = 0
            task.direct = True
        data = []
        for part in parts:  # the OUTPUT frame's head is not output
            if skip >= len(part):
                skip -= len(part)
                continue
            data.append(memoryview(part)[skip:] if skip else part)
            skip = 0
        try:
            written = _write_parts(self._direct_fd, data)
        except OSError as exc:
            raise self._named(exc) from None
        self._direct_length += written
        self._direct_unsynced = True
        return True

    def direct_range(self) -> OutputRange:
        """Where the stdout that write_direct wrote for the task next in order is."""
        assert self._direct_file is not None
        return OutputRange(*self._direct_file, self._direct_at, self._direct_length)

    def sync_direct(self) -> None:
        """fsync the output if stdout went straight into it since the last time (before
        the journal's records that point to those bytes are made durable)."""
        if self._direct_unsynced:
            self._direct_unsynced = False
            try:
                os.fsync(self._direct_fd)
            except OSError as exc:
                raise self._named(exc) from None

    def _render_from_output(self, result: TaskResult, where: OutputRange) -> None:
        """Render a task an earlier run streamed into the output: skip its bytes if they
        are where this render has got to in the same file, else copy them from there."""
        self._raise_error()
        self.wait()  # the copier thread writes at the file's position too
        self.out.flush()
        fd = self.out.fileno()
        info = os.fstat(fd)
        at = os.lseek(fd, 0, os.SEEK_CUR)
        if (info.st_dev, info.st_ino) == (where.dev, where.ino):
            # Never otherwise: one that could move was copied (take_in_outputs), and only
            # an output opened without emptying it (in_place) still has the bytes.
            if where.offset != at or not self.in_place:
                raise OSError(errno.EIO, f"task {result.seq}'s output is gone", self.name)
            os.lseek(fd, where.length, os.SEEK_CUR)
        else:
            for chunk in _output_chunks(where):
                self.out.write(chunk)
        self.out.write(result.stdout)

    def _rewind(self) -> None:
        """Cut the output back to where the direct task's stdout starts (an earlier try
        of it wrote there; nothing after it has been written)."""
        self.out.flush()
        fd = self.out.fileno()
        os.ftruncate(fd, self._direct_at)
        os.lseek(fd, self._direct_at, os.SEEK_SET)

    def _emit(self, offset: int, result: TaskResult | None) -> None:
        """Render one result (from memory if given, else from the journal)."""
        if offset == self.BLANK:
            return
        self.written = True
        if result is None:
            result = self.journal.load_result(offset)
        if self._direct_seq and result.seq == self._direct_seq:
            self._direct_seq = 0
            if result.in_output is not None:  # its stdout is in place: only the tail is left
                try:
                    self.out.write(result.stdout)
                except OSError as exc:
                    raise self._named(exc) from None
                return
            try:  # this try's stdout is in the journal: an earlier try's bytes go
                self._rewind()
            except OSError as exc:
                raise self._named(exc) from None
        elif result.in_output is not None and self.fmt == "text" and self.tag is None:
            try:  # an earlier run's (--resume)
                self._render_from_output(result, result.in_output)
            except OSError as exc:
                raise self._named(exc) from None
            return
        if self._copier:
            self._raise_error()
            with self._lock:
                if self._backlog or sum(p[2] for p in result.pieces) >= COPY_IN_THREAD:
                    self._backlog += 1
                    if self._thread is None:
                        self._thread = concurrent.futures.ThreadPoolExecutor(1, "sshfan-output")
                    self._thread.submit(self._render_in_thread, result)
                    return
        try:
            render_result(self.out, self.fmt, result, self.journal, self.tag)
        except OSError as exc:
            raise self._named(exc) from None

    def _named(self, exc: BaseException) -> OSError:
        """EXC as an OSError naming the output (a buffered write's error names no file)."""
        if isinstance(exc, OSError):
            return exc if exc.filename else OSError(exc.errno, exc.strerror or str(exc), self.name)
        return OSError(0, f"{type(exc).__name__}: {exc}", self.name)

    def _render_in_thread(self, result: TaskResult) -> None:
        """Render one result on the copier thread; keep an error for the loop to raise."""
        try:
            if self._error is None:
                render_result(self.out, self.fmt, result, self.journal, self.tag)
                self.out.flush()
        except Exception as exc:  # any: an error lost on this thread would leave a gap
            self._error = self._named(exc)
        finally:
            with self._lock:
                self._backlog -= 1

    def _raise_error(self) -> None:
        """Raise the copier thread's write error here, once."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    def flush(self) -> None:
        """Flush the output, unless the copier thread is writing it (it flushes itself)."""
        with self._lock:
            busy = self._backlog
        if not busy:
            try:
                self.out.flush()
            except OSError as exc:
                raise self._named(exc) from None

    def open(self) -> None:
        """Open (create or empty) the output now, before anything is rendered into it."""
        if self._thread is None:
            self.written = True
            try:
                self.out.write(b"")
            except OSError as exc:
                raise self._named(exc) from None

    def wait(self) -> None:
        """Wait for the copier thread to end (the journal must stay open until then)."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    def finish(self) -> None:
        """Wait until everything put so far is written; raise a write error it met."""
        self.wait()
        self._raise_error()
        try:
            if self._direct_seq:  # a task that did not finish: its stdout goes (as --group)
                self._direct_seq = 0
                self._rewind()
            self.out.flush()
            if self.in_place and self.written:  # what an earlier run wrote past the end
                fd = self.out.fileno()
                end = os.lseek(fd, 0, os.SEEK_CUR)
                if end >= self.in_place_end:
                    os.ftruncate(fd, end)
            self._check_still_there()
        except OSError as exc:
            raise self._named(exc) from None

    def _check_still_there(self) -> None:
        """Raise OSError if the output file was removed or replaced while the run wrote it:
        the file at its path is then not the one the run vouches for."""
        path = getattr(self.out, "path", "-")
        if path == "-" or not self.written:
            return
        mine = os.fstat(self.out.fileno())
        if not stat.S_ISREG(mine.st_mode):
            return
        try:
            there = os.stat(path)
        except FileNotFoundError:
            there = None
        if there is None or (there.st_dev, there.st_ino) != (mine.st_dev, mine.st_ino):
            raise OSError(errno.ESTALE, "removed or replaced while the run wrote it", path)

    def _advance(self) -> None:
        """Move past the just-rendered seq."""
        if self.on_pass is not None:
            self.on_pass(self.next_seq)
        self.next_seq += 1
        if self._head < len(self._waiting):
            self._head += 1

    def _drain(self) -> None:
        """Render every waiting result that is now in order."""
        waiting = self._waiting
        while self._head < len(waiting) and waiting[self._head] != self.WAITING:
            self._emit(waiting[self._head], None)
            if self.on_pass is not None:
                self.on_pass(self.next_seq)
            self.next_seq += 1
            self._head += 1
        if self._head >= 4096 or self._head == len(waiting):
            del waiting[: self._head]
            self._head = 0

    def waiting(self) -> int:
        """How many results are done but wait for an earlier one."""
        return sum(1 for off in self._waiting[self._head :] if off != self.WAITING)

    def skip_missing(self, last: int) -> None:
        """Write what waits up to seq LAST, leaving out the seqs that never came (--onall:
        a host that could not run its tasks)."""
        first = self.next_seq
        present = {
            first + index - self._head
            for index in range(self._head, len(self._waiting))
            if self._waiting[index] != self.WAITING
        }
        for seq in range(first, last + 1):
            if seq not in present:
                self.skip(seq)


class GatheredOutput(MergedOutput):
    """sshfan all --gather: hosts whose output is the same bytes are printed once, under
    their names folded into ranges (clush -b, dshbak -c); written when the run ends."""

    RULE = b"-" * 15 + b"\n"

    def __init__(self, out: IO[bytes], journal: Journal, name: str = "") -> None:
        """Gather into OUT (called NAME in errors), reading outputs back from JOURNAL."""
        super().__init__(out, "text", journal, name=name)
        self._hosts: dict[str, tuple[Any, list[TaskResult]]] = {}

    def _emit(self, offset: int, result: TaskResult | None) -> None:
        """Fold one result's stdout into its host's digest (results come in host order)."""
        if offset == self.BLANK:
            return
        self.written = True
        if result is None:
            result = self.journal.load_result(offset)
        digest, results = self._hosts.setdefault(result.host, (hashlib.sha256(), []))
        for chunk in _stream_chunks(result, self.journal, 1):
            digest.update(chunk)
        results.append(result)

    def finish(self) -> None:
        """Write each group of hosts with the same output once, in order of first host."""
        groups: dict[bytes, list[str]] = {}
        for host, (digest, _results) in self._hosts.items():
            groups.setdefault(digest.digest(), []).append(host)
        try:
            for hosts in groups.values():
                self.out.write(self.RULE + f"{fold_names(hosts)} ({len(hosts)})\n".encode())
                self.out.write(self.RULE)
                last = b"\n"
                for result in self._hosts[hosts[0]][1]:
                    for chunk in _stream_chunks(result, self.journal, 1):
                        self.out.write(chunk)
                        last = chunk or last
                if not last.endswith(b"\n"):
                    self.out.write(b"\n")
        except OSError as exc:
            raise self._named(exc) from None
        self._hosts = {}
        super().finish()


def _results_name_max(directory: Path) -> int:
    """The length GNU parallel cuts a too-long --results directory name to.

    parallel finds the longest name the file system takes by a bisection that stops
    within 5 bytes (max_file_name_length); the same search over NAME_MAX gives its cut."""
    try:
        limit = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    low, high = 128, 2048
    while high - low > 5:
        test = (low + high) // 2
        if test <= limit:
            low = test
        else:
            high = test
    return low


def results_dirname(columns: list[str], name_max: int) -> bytes:
    """A task's directory under --results DIR, named from its arguments as parallel names
    it (args_as_dirname): 1/ARG, or 1/COL1/2/COL2/... under --colsep, each as written
    (not trimmed), with backslash, tab, NUL and slash written as \\\\ \\t \\0 \\_, and each
    cut to the longest name the file system takes."""
    parts = []
    for number, column in enumerate(columns, 1):
        text = column.replace("\\", "\\\\").replace("\t", "\\t").replace("\0", "\\0")
        name = text.replace("/", "\\_").encode("utf-8", "surrogateescape")
        parts += [str(number).encode(), name[:name_max]]
    return b"/".join(parts)


class ResultsTree:
    """--results DIR: each task's stdout, stderr, seq and exitval files, in GNU parallel's
    tree (DIR/1/LINE/..., or DIR/1/COL1/2/COL2/... under --colsep), written from the
    journal after its DONE record."""

    def __init__(self, root: str, colsep: str | None = None) -> None:
        """Write under ROOT (created if missing), lines cut into columns at COLSEP."""
        self.root = os.fsencode(root)
        self.colsep = ColumnSplitter(colsep) if colsep is not None else None
        self.name_max = 0  # found on first use

    def write(self, result: TaskResult, journal: Journal) -> None:
        """Write one finished task's files (replacing those of an earlier run of it)."""
        if not self.name_max:
            os.makedirs(self.root, exist_ok=True)
            self.name_max = _results_name_max(Path(os.fsdecode(self.root)))
        arg = result.command if result.arg is None else result.arg
        columns = [arg] if self.colsep is None else self.colsep.split(arg)
        directory = os.path.join(self.root, results_dirname(columns, self.name_max))
        os.makedirs(directory, exist_ok=True)
        for name, chunks in (
            (b"seq", [str(result.seq).encode()]),
            (b"stdout", _stream_chunks(result, journal, 1)),
            (b"stderr", _stream_chunks(result, journal, 2)),
            (b"exitval", [str(result.exit_code).encode()]),
        ):
            with open(os.path.join(directory, name), "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)


# ============================================================================
# 14. The run: hosts, scheduler, journal and output together
# ============================================================================

WATCH_INTERVAL = 1.0  # seconds between looks at the hosts files (hosts that come and go)
CONNECT_PACE = 8  # hosts starting at once per SSH server: under MaxStartups (10) by default
CONNECT_MAX = 64  # hosts starting at once in all
SPECULATE_AFTER = 2.0  # --speculate: a copy once a task ran this many median durations
SPECULATE_MIN = 0.1  # seconds beyond that, so that tiny tasks are not copied
# A host holding tasks sent ahead of its hello is given up once the run has nothing else
# to wait on, a host idles, and its hello is this many times later than the slowest yet
# (counted from when each stub's source went), and at least SLOW_HELLO_MIN seconds late.
SLOW_HELLO_AFTER = 3.0
SLOW_HELLO_MIN = 1.0


class Pacing:
    """Limits how many hosts start at once: per SSH server, and in all.

    A start holds its place from the TCP connect to the stub's hello. Per server,
    because OpenSSH's MaxStartups counts that server's pending handshakes, and
    because many entries for one machine share its CPU for their logins: started
    all at once they finish all late (measured: the first of 100 entries on one
    sshd said hello after 1.3-4 s instead of 0.5 s), a few at a time the first
    ones get to work at once."""

    def __init__(self) -> None:
        """No host started yet."""
        self._all = asyncio.Semaphore(CONNECT_MAX)
        self._per_server: dict[tuple[str, int], asyncio.Semaphore] = {}

    @contextlib.asynccontextmanager
    async def start(self, spec: HostSpec) -> AsyncIterator[None]:
        """Wait for a place to start SPEC's host, and hold it while the block runs."""
        server = ((spec.address or spec.name).lower(), spec.port or 22)
        if server not in self._per_server:
            self._per_server[server] = asyncio.Semaphore(CONNECT_PACE)
        async with self._per_server[server], self._all:
            yield


class DurationStats:
    """Task count and a bounded sample of durations for a median (memory stays flat)."""

    SAMPLE = 1001

    def __init__(self) -> None:
        """Start with no tasks."""
        self.count = 0
        self.sample: list[float] = []
        self._random = random.Random(0)

    def add(self, duration: float) -> None:
        """Count a task; keep its duration with reservoir sampling."""
        self.count += 1
        if len(self.sample) < self.SAMPLE:
            self.sample.append(duration)
        else:
            slot = self._random.randrange(self.count)
            if slot < self.SAMPLE:
                self.sample[slot] = duration

    def median(self) -> float | None:
        """The (sampled) median duration, or None with no tasks."""
        return _median(self.sample) if self.sample else None


class DurationHistory:
    """The long tasks of earlier runs and how long they took, so that a later run of the
    same (or an overlapping) task list can start them first (longest processing time first).

    Kept per task text (a hash of the command as run), not per tasks file, so a list that
    shares tasks with an earlier one benefits too. One small file in the user's cache
    directory, most recent first and bounded (MAX entries); it is a cache: unreadable or
    unwritable means no history, and concurrent runs keep the last writer's view."""

    MAGIC = b"sshfan-durations 1\n"
    RECORD = struct.Struct("<8sf")  # 8-byte hash of the command, seconds
    MAX = 4096  # tasks remembered in all: the file stays under 50 KiB
    PER_RUN = 1024  # longest tasks one run keeps track of (a bounded heap)
    # A task worth starting first: at least twice the run's median and this long; shorter
    # ones gain nothing measurable from going first, and would cost a pass over the file.
    LONG_MIN = 0.1

    def __init__(self, path: Path | None) -> None:
        """A history read from PATH by load() (None: remember nothing)."""
        self.path = path
        self.known: dict[bytes, float] = {}
        self._longest: list[tuple[float, bytes]] = []  # this run's, a min-heap
        self._measured: dict[bytes, float] = {}  # this run's durations of known tasks

    @staticmethod
    def default_path() -> Path | None:
        """$XDG_CACHE_HOME/sshfan/durations, or ~/.cache/sshfan/durations (None: no
        home to keep it in, see cache_dir)."""
        cache = cache_dir()
        return None if cache is None else cache / "durations"

    @staticmethod
    def key(command: str) -> bytes:
        """The history's key for a task: a short hash of its command text."""
        return hashlib.blake2b(command.encode("utf-8", "surrogateescape"), digest_size=8).digest()

    def load(self) -> None:
        """Read the history file, if there is a sound one."""
        if self.path is None:
            return
        try:
            data = self.path.read_bytes()
        except OSError:
            return
        body = data[len(self.MAGIC) :]
        if not data.startswith(self.MAGIC) or len(body) % self.RECORD.size:
            return
        for key, seconds in self.RECORD.iter_unpack(body):
            self.known.setdefault(key, seconds)

    def record(self, command: str, duration: float) -> None:
        """Note one finished task's duration (cheap unless it is among the run's longest)."""
        heap = self._longest
        if len(heap) >= self.PER_RUN and duration <= heap[0][0] and not self.known:
            return
        key = self.key(command)
        if key in self.known:
            self._measured[key] = duration
        if duration < self.LONG_MIN:
            return
        if len(heap) < self.PER_RUN:
            heapq.heappush(heap, (duration, key))
        elif duration > heap[0][0]:
            heapq.heapreplace(heap, (duration, key))

    def save(self, median: float | None) -> None:
        """Write the history back: this run's long tasks first, then the older entries it
        did not measure again; known tasks that ran short this time are forgotten."""
        if self.path is None or median is None:
            return
        threshold = max(self.LONG_MIN, 2 * median)
        # A task text that also ran short in this run is not long: the same command many
        # times over, a few of them on a slow host, would go first on every later run.
        least: dict[bytes, float] = {}
        for d, key in self._longest:
            least[key] = min(d, least.get(key, d))
        fresh = {
            key: d
            for d, key in sorted(self._longest, reverse=True)
            if d >= threshold and least[key] >= threshold
        }
        if not fresh and not self._measured:
            return  # nothing learnt: leave the file alone
        entries = dict(fresh)
        for key, seconds in self.known.items():
            if key not in entries and key not in self._measured and len(entries) < self.MAX:
                entries[key] = seconds
        records = b"".join(
            self.RECORD.pack(k, d) for k, d in itertools.islice(entries.items(), self.MAX)
        )
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(self.MAGIC + records)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()


@dataclasses.dataclass
class RunSummary:
    """What a run did: counts, hosts, where results went, and its exit code."""

    total: int = 0
    ok: int = 0
    failed: int = 0
    timed_out: int = 0
    resumed: int = 0
    resumed_failed: int = 0
    hosts: list[str] = dataclasses.field(default_factory=list)
    per_host: dict[str, DurationStats] = dataclasses.field(default_factory=dict)
    failed_per_host: dict[str, int] = dataclasses.field(default_factory=dict)
    lost_per_host: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped_hosts: dict[str, str] = dataclasses.field(default_factory=dict)
    # Hosts still starting when the run ended, that ran nothing (not a failure of theirs).
    unused_hosts: set[str] = dataclasses.field(default_factory=set)
    lost_hosts: dict[str, str] = dataclasses.field(default_factory=dict)
    # A host served by several stubs (the local host's lanes) that lost some, not all.
    lost_stubs: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    drained: set[str] = dataclasses.field(default_factory=set)  # left the hosts file
    failures: list[TaskResult] = dataclasses.field(default_factory=list)
    onall: bool = False  # every task on every host: a host that could not is a failure
    unrun: dict[str, int] = dataclasses.field(default_factory=dict)  # --onall: host: tasks
    journal_kept: bool = True  # False: a scratch journal (sshfan all to stdout)
    interrupted: bool = False
    halted: bool = False
    halt: str = ""  # the --halt condition that stopped the run
    backups: int = 0  # --speculate: backup copies started
    backups_won: int = 0  # ... and how many of them finished first
    speculating: bool = False  # --speculate was on: the summary says what it did, if nothing
    complete: bool = False
    fatal: str = ""
    output: str = ""
    journal: str = ""
    elapsed_s: float = 0.0

    @property
    def exit_code(self) -> int:
        """The exit code DESIGN.md gives this outcome."""
        if self.interrupted:
            return 130
        if self.halted:
            # Exit 0 means every task ran and exited 0: a halt that left tasks unrun is 1,
            # whatever stopped it (GNU parallel exits 0 after success=N; sshfan does not).
            ran = self.ok + self.failed + self.timed_out + self.resumed
            failed = self.failed or self.timed_out or self.resumed_failed
            return 1 if failed or ran < self.total else 0
        if not self.complete:
            ran = self.ok + self.failed + self.timed_out + self.resumed
            # --onall: some hosts did their tasks, others could not: a failure, not a
            # run that could not finish (none could, or the head failed: that is 3).
            return 1 if self.onall and ran and not self.fatal else 3
        return 1 if self.failed or self.timed_out or self.resumed_failed else 0

    @property
    def journaled(self) -> int:
        """Tasks whose result is in the journal, this run's and earlier ones'."""
        return self.resumed + self.ok + self.failed + self.timed_out

    def count(self, result: TaskResult) -> None:
        """Count a journaled task: its outcome, its host's durations and failures."""
        stats = self.per_host.get(result.host)
        if stats is None:
            stats = self.per_host[result.host] = DurationStats()
        stats.add(result.duration_s)
        if result.timed_out:
            self.timed_out += 1
        elif result.exit_code:
            self.failed += 1
        else:
            self.ok += 1
        if not result.ok:
            self.failed_per_host[result.host] = self.failed_per_host.get(result.host, 0) + 1
            self.failures.append(result)  # the first ones in seq order are kept
            if len(self.failures) > FAILURES_SHOWN:
                self.failures.sort(key=lambda r: r.seq)
                self.failures.pop()

    def stub_lost(self, host: str, reason: str, tasks: int) -> None:
        """One of HOST's stubs (a local host's lanes) was lost for REASON with TASKS
        requeued; the host itself goes on."""
        self.lost_stubs.setdefault(host, []).append(reason)
        self.lost_per_host[host] = self.lost_per_host.get(host, 0) + tasks

    def host_skipped(self, host: str, reason: str) -> None:
        """HOST never came up, for REASON."""
        self.skipped_hosts[host] = reason

    def host_lost(self, host: str, reason: str, tasks: int) -> None:
        """HOST was lost once up, for REASON, with TASKS it held."""
        self.lost_hosts[host] = reason
        self.lost_per_host[host] = self.lost_per_host.get(host, 0) + tasks

    def served(self, host: str) -> bool:
        """Whether HOST ran tasks (or lost some it held) in this run."""
        return host in self.per_host or host in self.lost_per_host


class _Run:
    """One run of tasks over hosts: feeds hosts, journals results, renders the output."""

    def __init__(
        self,
        hosts: list[HostSpec],
        scheduler: Scheduler,
        journal: Journal,
        merged: MergedOutput | None,
        opts: RunOptions,
        log: Callable[[str], None] = lambda line: None,
        on_done: Callable[[TaskResult], None] = lambda result: None,
        whole: bool = False,
    ) -> None:
        """Set up the run's parts; nothing is connected until execute()."""
        self.hosts = hosts
        self.scheduler = scheduler
        self.journal = journal
        self.merged = merged
        self.timeout = opts.timeout
        self.halt = opts.halt or (HaltPolicy() if opts.halt_on_error else None)
        self._halt_counted = 0
        self.max_ahead = max_ahead(opts)
        # Tasks start in file order over a host's slots, numbered as parallel numbers them,
        # only from one stub per host (lanes): a --halt stops the tasks parallel's would,
        # and {%} is parallel's.
        self.in_order = self.halt is not None or numbers_slots(opts)
        self.whole = whole  # hand on_done whole outputs (read back from the journal)
        self.results = ResultsTree(opts.results, opts.colsep) if opts.results else None
        self.joblog: Joblog | None = None  # --joblog: a row for each task as it finishes
        self.files = opts.files if opts.files else None  # files to move for SSH hosts
        self.log = log
        self.on_done = on_done
        self.summary = RunSummary()
        self.sessions: list[HostSession] = []
        self._finished: asyncio.Future[None] | None = None
        self._to_merge: list[tuple[int, int, TaskResult]] = []
        self._syncing: asyncio.Future[None] | None = None
        self._recheck: asyncio.TimerHandle | None = None  # a _rebalance to come
        self._interrupts = 0
        self.history: DurationHistory | None = None  # durations to learn for later runs
        # Not with --halt: a stub holds its queue for results the head ignores from a copy.
        self.speculate = opts.speculate and not self.files and self.halt is None
        self.summary.speculating = self.speculate
        # --speculate: a task running twice -> (the session of its first copy, the backup's)
        self.copies: dict[int, tuple[HostSession, HostSession]] = {}
        self.copied: set[int] = set()  # seqs given a backup copy: one each, ever
        self._spec_timer: asyncio.TimerHandle | None = None  # a _speculate to come
        self._slowest_hello = 0.0  # seconds from a stub's source to its hello, at most yet
        self._hello_timer: asyncio.TimerHandle | None = None  # a _give_up_slow to come
        # Hosts that come and go: the hosts files are watched.
        self.sources = opts.sources
        self.todo: dict[str, int] = {}  # --onall: each host's tasks to run (for unrun)
        self._hosts_journaled = len(hosts)  # --onall: hosts the journal's host list has
        self._opts = opts  # what a host that joins is served with (run_hosts)
        self._pacing: Pacing | None = None
        self._openers: list[asyncio.Future[None]] = []
        self._watcher: asyncio.TimerHandle | None = None
        self._seen: tuple[tuple[str, int, int, int], ...] = ()
        self._slots_claimed = 0
        self._bug: BaseException | None = None  # see bug()

    def claim_slots(self, count: int) -> int:
        """Number a host's COUNT job slots after all claimed so far ({%}, SSHFAN_SLOT):
        slots run 1..N over all hosts, in the order they come up, as parallel's do over
        its sshlogins. Return the number before this host's first slot."""
        base = self._slots_claimed
        self._slots_claimed += count
        return base

    async def execute(self) -> RunSummary:
        """Run every task; return the summary (the exit code says how it ended)."""
        loop = asyncio.get_running_loop()
        self._finished = loop.create_future()
        started = time.monotonic()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, self.interrupt)
        syncer = loop.call_later(1.0, self._sync_tick)
        pacing = self._pacing = Pacing()
        fresh = self.summary.total - self.summary.resumed
        self.sessions = [
            HostSession(lane, self)
            for spec in self.hosts
            for lane in lanes(spec, fresh, self.in_order)
        ]
        openers = self._openers = [
            asyncio.ensure_future(self._open(s, pacing)) for s in self.sessions
        ]
        if self.sources is not None and self.sources.files():
            self._seen = self.sources.signature()
            self._watcher = loop.call_later(WATCH_INTERVAL, self._watch_tick)
        self._check_done()
        try:
            await self._finished
        finally:
            syncer.cancel()
            if self._recheck is not None:
                self._recheck.cancel()
            if self._spec_timer is not None:
                self._spec_timer.cancel()
            if self._hello_timer is not None:
                self._hello_timer.cancel()
            if self._watcher is not None:
                self._watcher.cancel()
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(signum)
            for opener in openers:
                opener.cancel()
            await asyncio.gather(*openers, return_exceptions=True)
            await asyncio.gather(*(s.close() for s in self.sessions), return_exceptions=True)
            if self._syncing is not None:  # (its error, if any, is kept by the journal)
                await asyncio.gather(self._syncing, return_exceptions=True)
            # In this order, each step whatever the one before did: the copier thread
            # reads the journal, so the journal is closed only once the output is done.
            for step in (self._merge_batch, self._finish_output, self.journal.close):
                try:
                    step()
                except OSError as exc:
                    self.abort(_write_error(exc))
        if self._bug is not None:
            raise self._bug
        self.summary.elapsed_s = time.monotonic() - started
        return self.summary

    async def _open(self, session: HostSession, pacing: Pacing) -> None:
        """Open one host; on success give it work, on failure skip it with a warning."""
        try:
            await session.open(pacing)
        except HostError:
            return  # reported by on_host_lost
        except Exception as exc:  # a bug must not leave the run waiting on this host
            session.give_up(HostError(session.name, "start", f"{type(exc).__name__}: {exc}"))
            return
        if session.hello_wait_since is not None:
            waited = time.monotonic() - session.hello_wait_since
            self._slowest_hello = max(self._slowest_hello, waited)
        if session.spec.slots is None and not session.spec.local:
            rule = f"-j {session.spec.cpu_slots}" if session.spec.cpu_slots else "auto"
            self.log(f"sshfan: {session.name}: slots = {rule}: {session.window.slots}")
        session.window.start_ahead = self.fair_start(session)
        self._refill_all()
        self._rebalance()  # a host that finds nothing left may take back queued work
        self._check_done()

    def send_early(self, session: HostSession) -> None:
        """SESSION's stub source is on its way: send its CONFIG and first tasks behind it,
        unless its slots wait for its hello (auto) or the run must see it up first:
        files to move go over its SFTP once it is up, and a --halt must stop every task
        it would start, which only a ready host can be told."""
        if session.spec.slots is None or self.files or self.halt is not None:
            return
        if self.summary.interrupted or self._finished is None or self._finished.done():
            return
        session.send_early(self.scheduler, self._others_alive(session), self.fair_start(session))

    def fair_start(self, session: HostSession) -> int:
        """Tasks a new host queues ahead before it knows their durations (start_ahead)."""
        fresh = self.summary.total - self.summary.resumed - self.scheduler.drawn
        left = max(0, fresh) + self.scheduler.requeued()
        slots = sum(
            s.window.slots
            for s in self.sessions
            if s.state in (HostState.READY, HostState.CONNECTING)
        )
        return start_ahead(left, session.window.slots, slots)

    def _sync_tick(self) -> None:
        """fsync the journal about once a second, so a machine crash loses at most that.

        In a worker thread: with large outputs streaming in, an fsync can take long
        enough to stall every host's channel if it ran on the event loop."""
        loop = asyncio.get_running_loop()
        if self._finished is None or self._finished.done():
            return
        if self._syncing is None or self._syncing.done():
            self._syncing = loop.run_in_executor(None, self.journal.sync)
        loop.call_later(1.0, self._sync_tick)

    # -- events from hosts ----------------------------------------------------

    def deliver(self, session: HostSession, event: RunEvent) -> None:
        """An event from SESSION: the one way a session talks to the run.

        An exception here is the run's own bug: it ends the run (bug), never the host (a
        worker's misbehaviour is the protocol's ProtocolError, raised before this)."""
        if self._bug is not None:
            return  # the run is ending on a bug: nothing more is acted on
        try:
            if isinstance(event, TaskDone):
                self.on_result(session, event.task, event.result, cancelled=event.cancelled)
                halt = self.halt
                counts = halt is not None and halt.counts(event.result.ok)
                if counts and not event.cancelled and not self.summary.halted:
                    # The stub holds its queue for this result (Stub.finished): go on.
                    session.release(event.result.seq)
            elif isinstance(event, OutputPiece):
                if event.stream == 1 and self.write_direct(event.task, event.parts):
                    return
                offset = self.journal.append(KIND_OUTPUT, event.parts)
                skip = FRAME_HEADER.size + OUTPUT_HEAD.size
                size = self.journal.size - offset - skip
                event.task.pieces.append((offset + skip, event.stream, size))
            elif isinstance(event, TasksGivenBack):
                self.scheduler.put_back(event.tasks)
            elif isinstance(event, HostLost):
                self.on_host_lost(session, event.tasks)
            elif isinstance(event, Settled):
                self.after_batch(session)
            elif isinstance(event, SourceSent):
                self.send_early(session)
        except Exception as exc:
            self.bug(exc)

    def on_result(
        self, session: HostSession, task: Task, result: TaskResult, cancelled: bool
    ) -> None:
        """A task finished on SESSION: retry it, or journal it as done."""
        if cancelled:
            return  # killed because the run is stopping: it is not done; --resume reruns it
        pair = self.copies.pop(task.seq, None) if self.copies else None
        if pair is not None:  # --speculate: the first copy to succeed wins, the other is killed
            others = [s for s in pair if s is not session and task.seq in s.in_flight]
            if not result.ok and others:
                self.copies[task.seq] = pair  # the other copy may still succeed: it decides
                return
            for other in others:
                other.cancel(task.seq)
            if session is pair[1]:
                self.summary.backups_won += 1
        if not result.ok and self.scheduler.should_retry(task, session.name):
            why = "timed out" if result.timed_out else f"failed (exit {result.exit_code})"
            self.log(
                f"sshfan: task {task.seq} {why} on {session.name}; "
                f"retrying ({task.attempts}/{self.scheduler.retries})"
            )
            return
        if isinstance(self.scheduler, OnAllScheduler):
            hosts = self.scheduler.hosts()
            if len(hosts) > self._hosts_journaled:  # before any result of a host that joined
                self.journal.add_hosts(hosts)
                self._hosts_journaled = len(hosts)
        if task.direct and self.merged is not None:
            result.in_output = self.merged.direct_range()
        offset = self.journal.add_result(result)
        key = self.scheduler.order_key(session.name, result.seq)
        self._to_merge.append((key, offset, result))
        if self.history is not None:
            self.history.record(task.command, result.duration_s)
        summary = self.summary
        halt = self.halt
        if halt is not None and not summary.halted and halt.counts(result.ok):
            self._halt_counted += 1
            if halt.reached(self._halt_counted, summary.total - summary.resumed):
                self._halt(result)

    def write_direct(self, task: Task, parts: list[Any]) -> bool:
        """Write a piece of stdout of the task next in order straight into the merged
        output (MergedOutput.write_direct); say whether it went."""
        if self.merged is None or not self.merged.direct:
            return False
        try:
            return self.merged.write_direct(task, parts, OUTPUT_HEAD.size)
        except OSError as exc:  # the output or the journal cannot be written: stop the run
            self.abort(_write_error(exc))
            return True

    def _halt(self, result: TaskResult) -> None:
        """The --halt condition is met: no task starts anywhere; with "now" kill the running."""
        assert self.halt is not None
        self.summary.halted = True
        self.summary.halt = str(self.halt)
        self.scheduler.stopped = True
        for other in self.sessions:
            other.drop_queued("kill" if self.halt.when == "now" else "halt")
        how = "failed" if not result.ok else "succeeded"
        then = (
            "killing the running ones"
            if self.halt.when == "now"
            else "waiting for the running ones"
        )
        self.log(f"sshfan: task {result.seq} {how}: --halt {self.halt}: no new tasks; {then}")

    def after_batch(self, session: HostSession) -> None:
        """After a batch of frames from one host: journal, render, refill, maybe finish."""
        try:
            self._merge_batch()
        except OSError as exc:  # the journal or output cannot be written: stop the run
            self.abort(_write_error(exc))
            return
        if not self.summary.interrupted:
            session.note_starts(time.monotonic())  # its results freed slots for queued tasks
            self._refill_all()
            self._shed_late()
            self._rebalance()
            self._speculate()
        self._check_done()

    def _merge_batch(self) -> None:
        """Write the batch's records to the journal, then its results into the merged output."""
        self.journal.flush()  # output pieces too: they must not pile up in memory
        if self.merged is not None and self.journal.recorded and not self.merged.written:
            # This run has results now: the earlier output goes (kept until then, so a
            # run that ends before any task finished leaves it as it was).
            self.merged.open()
        if not self._to_merge:
            return
        batch = self._to_merge
        self._to_merge = []
        for _seq, _offset, result in batch:
            self.summary.count(result)  # a task counts as done once its record is written
        for seq, offset, result in batch:
            if self.joblog is not None:  # before the output passes it: its row is then due
                self.joblog.add(result)
            if self.merged is not None:
                self.merged.put(seq, offset, result)
            if self.results is not None:
                self.results.write(result, self.journal)
            self.on_done(whole_result(result, self.journal) if self.whole else result)
        if self.merged is not None:
            self.merged.flush()

    def _finish_output(self) -> None:
        """Wait until the merged output has everything put so far; raise its write error."""
        if self.merged is not None and isinstance(self.scheduler, OnAllScheduler):
            # A host that could not run its tasks must not hold back the hosts after it:
            # their output is written, its gaps left out (the run ends 1).
            self.scheduler.drain()
            self.merged.skip_missing(len(self.hosts) * self.scheduler.lines)
        if self.merged is not None:
            self.merged.finish()

    def on_host_lost(self, session: HostSession, tasks: list[Task]) -> None:
        """A host failed to start or was lost: requeue its tasks, warn, maybe end the run."""
        if self.copies:  # a task whose other copy runs on is left to that copy
            tasks = [task for task in tasks if not self._other_copy_runs(session, task.seq)]
        error = session.error
        reason = f"{error.stage}: {error.reason}" if error else "unknown reason"
        lanes = [s for s in self.sessions if s.name == session.name]
        serving = [
            s for s in lanes if s.state in (HostState.CONNECTING, HostState.READY, HostState.DONE)
        ]
        if serving:  # one of a local host's stubs: the host itself goes on
            self.summary.stub_lost(session.name, reason, len(tasks))
            self.log(
                f"sshfan: warning: host {session.name} lost one of its {len(lanes)} stubs "
                f"({reason}); {len(tasks)} task(s) requeued"
            )
        elif session.state == HostState.FAILED:
            self.summary.host_skipped(session.name, reason)
            self.scheduler.host_gone(session.name)
            self.log(f"sshfan: warning: skipping host {session.name}: {reason}")
        else:
            self.scheduler.host_gone(session.name)
            self.summary.host_lost(session.name, reason, len(tasks))
            fate = "left unrun (--onall)" if self.scheduler.pinned else "requeued"
            self.log(
                f"sshfan: warning: lost host {session.name} ({reason}); {len(tasks)} task(s) {fate}"
            )
        self.scheduler.put_back(tasks)
        if self._finished is not None:
            self._refill_all()
            self._check_done()

    # -- hosts that come and go ----------------------------------------------

    def _watch_tick(self) -> None:
        """About once a second: if a hosts file changed, read the hosts again."""
        self._watcher = None
        if self._finished is None or self._finished.done() or self.sources is None:
            return
        seen = self.sources.signature()
        if seen != self._seen:
            self._seen = seen
            self.reload_hosts()
        self._watcher = asyncio.get_running_loop().call_later(WATCH_INTERVAL, self._watch_tick)

    def reload_hosts(self) -> None:
        """New hosts join the run; hosts no longer listed drain (finish what they run, take
        nothing new); a host whose settings changed drains and joins again with the new
        ones. A file that cannot be used now is a warning: the hosts stay."""
        assert self.sources is not None
        try:
            specs = load_host_sources(dataclasses.replace(self.sources))
        except SshfanError as exc:
            self.log(f"sshfan: warning: hosts changed, but: {exc}; the run keeps its hosts")
            return
        specs = run_hosts(specs, self._opts)
        wanted = {spec.name for spec in specs}
        serving = {
            s.name for s in self.sessions if s.state in (HostState.CONNECTING, HostState.READY)
        }
        for name in sorted(serving - wanted):
            for session in self.sessions:
                if session.name == name:
                    session.drain()
            self.summary.drained.add(name)
            self.scheduler.host_gone(name)  # --onall: its tasks not begun are not run
            self.log(f"sshfan: host {name} left the hosts file: it takes no new tasks")
        served = {spec.name: spec for spec in self.hosts}  # the settings each host runs with
        for spec in specs:
            changed = spec.name in served and served[spec.name] != spec
            if spec.name in serving and not changed:
                continue
            draining = [
                s for s in self.sessions if s.name == spec.name and s.state == HostState.DRAINING
            ]
            if changed:
                # Its stubs run with the old settings: they finish what they run, and
                # new ones with the new settings take the rest (the same name, the same
                # host in every report).
                for session in self.sessions:
                    if session.name == spec.name:
                        session.drain()
            else:
                for session in draining:
                    session.undrain()
            self.summary.drained.discard(spec.name)
            if spec.name not in self.summary.hosts:
                self.summary.hosts.append(spec.name)
            if draining and not changed:
                self.scheduler.join(spec.name)  # (--onall: it goes on with its own pass)
                self.log(f"sshfan: host {spec.name} is back in the hosts file")
                continue
            if changed and spec.name in serving:
                self.log(
                    f"sshfan: host {spec.name} changed in the hosts file: "
                    "it finishes its running tasks, then goes on with the new settings"
                )
            else:
                self.log(f"sshfan: host {spec.name} joined")
            self._join(spec)
        self._refill_all()
        self._check_done()

    def _join(self, spec: HostSpec) -> None:
        """Start SPEC's stubs in the running run (a host that joined, or came back)."""
        places = [index for index, known in enumerate(self.hosts) if known.name == spec.name]
        if places:  # its place stays: --onall's output block is by place
            self.hosts[places[0]] = spec
        else:
            self.hosts.append(spec)
        added = self.scheduler.join(spec.name)  # --onall: every task, on top of the others'
        if added:
            self.summary.total += added
            self.todo[spec.name] = added
        fresh = self.summary.total - self.summary.resumed
        for lane in lanes(spec, fresh, self.in_order):
            session = HostSession(lane, self)
            self.sessions.append(session)
            assert self._pacing is not None
            self._openers.append(asyncio.ensure_future(self._open(session, self._pacing)))

    # -- decisions ------------------------------------------------------------

    def _others_alive(self, session: HostSession) -> bool:
        """Whether a host other than SESSION's (not one of its lanes) is up or connecting."""
        return any(
            s.name != session.name and s.state in (HostState.READY, HostState.CONNECTING)
            for s in self.sessions
        )

    def _refill_all(self) -> None:
        """Give every ready host the tasks its window wants."""
        if self.summary.interrupted:
            return
        # The emptiest hosts first: work given back by a busy host goes to an idle one.
        # Once the file is read, what is left is shared by slots, not all to the first.
        emptiest_first = sorted(self.sessions, key=HostSession.queued)
        left = self.scheduler.left_over()
        total_slots = sum(s.window.slots for s in self.sessions if s.state == HostState.READY) or 1
        left_to_hand = self._left_to_hand()
        loads = self._near_end(left_to_hand)
        held: list[HostSession] = []
        for session in emptiest_first:
            if not self.scheduler.has_work():
                break
            cap = fair_cap(left, session.window.slots, total_slots)
            if session in loads:  # a slow host near the end takes only what it ends first
                share = self._end_share(session, loads, left_to_hand)
                if cap is None or share < cap:
                    cap = share
                    held.append(session)
            session.refill(self.scheduler, self._others_alive(session), cap)
        if held and self.scheduler.has_work() and not any(s.in_flight for s in self.sessions):
            # The others did not take the tasks after all (a retry that avoids the host it
            # failed on), and no result is coming to look again: the slow hosts take them.
            for session in held:
                session.refill(self.scheduler, self._others_alive(session))

    def _left_to_hand(self) -> int:
        """Tasks not handed out yet: the fresh ones still in the file, and the requeued."""
        fresh = self.summary.total - self.summary.resumed - self.scheduler.drawn
        return max(0, fresh) + self.scheduler.requeued()

    def _near_end(self, left: int) -> dict[HostSession, HostLoad]:
        """The ready hosts' loads (HostLoad) once the run is near its end: the LEFT tasks
        and those held would keep every slot busy for less than two of some host's typical
        tasks. Empty before that (most of a run: it costs nothing then) and with --onall."""
        if self.scheduler.pinned:
            return {}
        ready = [s for s in self.sessions if s.state == HostState.READY]
        typicals = [(s, s.window.typical()) for s in ready]
        rate = sum(s.window.slots / max(t, 1e-6) for s, t in typicals if t is not None)
        slowest = max((t for _, t in typicals if t is not None), default=None)
        if slowest is None or not rate:
            return {}
        held = sum(len(s.in_flight) for s in ready)
        if left + held > 2 * slowest * rate:
            return {}
        return {s: HostLoad(s.window.slots, t, s.starts()) for s, t in typicals}

    def _shed_late(self) -> None:
        """Near the end, a slow host gives back the tasks queued on it that the others
        would end first (sheds); it takes its share again from the refill that follows."""
        left = self._left_to_hand()
        loads = self._near_end(left)
        for session, load in loads.items():
            if session.queued() <= 0 or not session.may_drop or not self._slow(session, loads):
                continue
            others = [o for s, o in loads.items() if s is not session]
            if sheds(load, others, left, time.monotonic()):
                session.drop_queued()

    @staticmethod
    def _slow(session: HostSession, loads: dict[HostSession, HostLoad]) -> bool:
        """Whether SESSION's host is slow (is_slow) next to the other hosts: a local host's
        stubs (lanes) share one machine, and one of them is never slow next to another."""
        others = [load for s, load in loads.items() if s.name != session.name]
        return is_slow(loads[session], others)

    def _end_share(
        self, session: HostSession, loads: dict[HostSession, HostLoad], left: int
    ) -> int:
        """How many of LEFT tasks SESSION takes now, near the end (end_share)."""
        want = session.window.want()
        if not self._slow(session, loads):
            return want
        others = [load for s, load in loads.items() if s is not session]
        return end_share(loads[session], others, left, time.monotonic(), want)

    def _rebalance(self) -> None:
        """At the end of the file, take queued tasks back from busy hosts while one idles.

        Each host holds tasks queued ahead of its slots; once no fresh task is left, a
        long task queued behind another would keep an idle host idle (makespan)."""
        if self.scheduler.has_work() or self.summary.halted or self.summary.interrupted:
            return
        if self.scheduler.pinned:  # --onall: a task taken back could only go back to its host
            return
        ready = [s for s in self.sessions if s.state == HostState.READY]
        idle = [s for s in ready if s.queued() < 0]
        loads = self._near_end(len(idle)) if idle else {}
        if not any(s not in loads or self._end_share(s, loads, 1) for s in idle):
            return  # (a slow host idles by choice at the end: it would not take them)
        now = time.monotonic()
        asked, recheck = take_back([session.queue_at(now) for session in ready])
        for index in asked:
            ready[index].drop_queued()
        if recheck < math.inf and self._recheck is None:
            # No result may come for a while (a long task): look again once it pays.
            self._recheck = asyncio.get_running_loop().call_later(
                max(recheck, 0.001), self._rebalance_later
            )

    def _rebalance_later(self) -> None:
        """The timer set by _rebalance: look again, now that queues have waited longer."""
        self._recheck = None
        self._rebalance()

    def _other_copy_runs(self, session: HostSession, seq: int) -> bool:
        """--speculate: forget SESSION's copy of task SEQ; whether another copy still runs."""
        pair = self.copies.pop(seq, None)
        return pair is not None and any(s is not session and seq in s.in_flight for s in pair)

    def _speculate(self) -> None:
        """--speculate: once nothing is left to hand out, start a backup copy of each task
        that runs late on an idle slot of another host (the fastest idle one).

        Late: it ran SPECULATE_AFTER times the median finished duration (or its host's
        typical one, if longer) plus SPECULATE_MIN (so that a run of tiny tasks does not
        copy its last few), or it runs on a slow host and the copy would end before the
        running one is due (copy_pays). The first copy to succeed wins (on_result); the
        other is cancelled, its process group killed by its stub."""
        if not self.speculate or self.scheduler.has_work() or self.summary.halted:
            return
        if self._finished is None or self._finished.done():
            return
        idle = [
            s
            for s in self.sessions
            if s.state == HostState.READY and len(s.in_flight) < s.window.slots
        ]
        samples = [d for stats in self.summary.per_host.values() for d in stats.sample]
        if not idle or not samples:
            return
        # The fastest first; a host with no finished task yet (speed unknown) last.
        idle.sort(key=lambda s: (s.window.typical() is None, s.window.typical() or 0.0))
        median = _median(samples)
        now = time.monotonic()
        running = [
            (sent, task, origin)
            for origin in self.sessions
            for sent, task in origin.running_since()
            if task.seq not in self.copied
        ]
        due = math.inf  # when the next running task passes AFTER
        for sent, task, origin in sorted(running, key=lambda entry: entry[0]):
            helper = next(
                (
                    s
                    for s in idle
                    if s.name != origin.name
                    and len(s.in_flight) < s.window.slots
                    and task.seq not in s.cancelled
                ),
                None,
            )
            if helper is None:
                continue
            # (a slow host's own typical duration, when longer: it is slow, not stuck)
            after = SPECULATE_AFTER * max(median, origin.window.typical() or 0.0) + SPECULATE_MIN
            late = now - sent >= after
            if not late and not copy_pays(self._speed(origin), self._speed(helper), sent, now):
                due = min(due, sent + after)
                continue
            helper.send_tasks([dataclasses.replace(task, pieces=[], started=0.0)])
            self.copies[task.seq] = (origin, helper)
            self.copied.add(task.seq)
            self.summary.backups += 1
            why = "" if late else f" (a copy there ends before the one on {origin.name} is due)"
            self.log(
                f"sshfan: task {task.seq} is slow on {origin.name}: "
                f"a copy starts on {helper.name}{why}"
            )
        if due < math.inf and self._spec_timer is None:
            self._spec_timer = asyncio.get_running_loop().call_later(
                max(due - now, 0.001), self._speculate_later
            )

    @staticmethod
    def _speed(session: HostSession) -> HostLoad:
        """SESSION's slots and typical duration, for copy_pays."""
        return HostLoad(session.window.slots, session.window.typical())

    def _speculate_later(self) -> None:
        """The timer set by _speculate: look again, now that tasks have run longer."""
        self._spec_timer = None
        self._speculate()

    def _give_up_slow(self) -> None:
        """Give up a host that holds tasks sent ahead of its hello (send_early) and is slow
        to say it, when the run would otherwise wait on it: nothing is left to hand out and
        a host idles. Its tasks go back to the queue, as a host failing to start gives its."""
        if self.scheduler.has_work() or self.scheduler.pinned or self.summary.interrupted:
            return
        waiting = [s for s in self.sessions if s.state == HostState.CONNECTING and s.in_flight]
        if not waiting or not any(
            s.state == HostState.READY and len(s.in_flight) < s.window.slots for s in self.sessions
        ):
            return
        now = time.monotonic()
        allowed = max(SLOW_HELLO_MIN, SLOW_HELLO_AFTER * self._slowest_hello)
        due = math.inf
        for session in waiting:
            assert session.hello_wait_since is not None  # (tasks went behind its source)
            waited = now - session.hello_wait_since
            if waited < allowed:
                due = min(due, allowed - waited)
                continue
            reason = (
                f"no hello {waited:.1f} s after its stub was sent (the slowest other host "
                f"took {self._slowest_hello:.1f} s); its {len(session.in_flight)} task(s) "
                "go to idle hosts"
            )
            session.give_up(HostError(session.name, "bootstrap", reason))
        if due < math.inf and self._hello_timer is None:
            self._hello_timer = asyncio.get_running_loop().call_later(due, self._give_up_later)

    def _give_up_later(self) -> None:
        """The timer set by _give_up_slow: look again, now that the slow hosts are later."""
        self._hello_timer = None
        self._give_up_slow()

    def _check_done(self) -> None:
        """End the run when all work is done, or when no host is left to do it."""
        if self._finished is None or self._finished.done():
            return
        if self.scheduler.error is not None:
            self.abort(str(self.scheduler.error))
            return
        for session in self.sessions:
            session.retire_if_idle()  # (only a draining host with nothing left ends)
        in_flight = sum(len(s.in_flight) + len(s.fetching) for s in self.sessions)
        if self.summary.interrupted:
            self._finish(complete=False)
        elif not self.scheduler.has_work() and not in_flight:
            complete = self.scheduler.exhausted()
            # Results of the batch being read are in the journal, not yet counted.
            missing = self.summary.total - self.summary.journaled - len(self._to_merge)
            # Handed out, yet not done: never call that complete (--onall leaves a lost
            # host's tasks unrun on purpose, and says so).
            if complete and missing > 0 and not self.scheduler.pinned:
                self.abort(f"{missing} task(s) ended without a result in the journal")
                return
            self._finish(complete=complete)
        elif not any(
            s.state in (HostState.READY, HostState.CONNECTING, HostState.DRAINING)
            for s in self.sessions
        ):
            self._finish(complete=False)
        else:
            self._give_up_slow()

    def _finish(self, complete: bool) -> None:
        """Tell every stub there is no more work and wake execute()."""
        self.summary.complete = complete
        for session in self.sessions:
            if session.state == HostState.CONNECTING and not self._host_served(session.name):
                self.summary.unused_hosts.add(session.name)
            session.finish()
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    def _host_served(self, name: str) -> bool:
        """Whether host NAME ran tasks or has a stub up (one of a local host's lanes may
        still be starting when the others have done all the work)."""
        if self.summary.served(name):
            return True
        return any(
            s.name == name and s.state in (HostState.READY, HostState.CLOSING, HostState.DONE)
            for s in self.sessions
        )

    def bug(self, exc: BaseException) -> None:
        """A bug in the run's own handling of a host's events: stop the run, and have
        execute() raise EXC once it has cleaned up. Not the host's fault: it is not failed,
        its tasks not requeued, as they would be for a protocol error."""
        if self._bug is None:
            self._bug = exc
        self.scheduler.stopped = True
        self._finish(complete=False)

    def abort(self, message: str) -> None:
        """A failure of the head itself: stop the run (exit 3, journal kept).

        The first failure is the one reported (by the summary); what follows from it,
        such as later batches meeting the same full disk, adds nothing."""
        if not self.summary.fatal:
            self.summary.fatal = message
        self.scheduler.stopped = True
        self._finish(complete=False)

    def interrupt(self) -> None:
        """Ctrl-C, SIGTERM or SIGHUP: stop handing out tasks; a second one quits at once."""
        self._interrupts += 1
        if self._interrupts > 1:
            with contextlib.suppress(Exception):
                self.journal.flush()
            os._exit(130)
        self.log("sshfan: interrupted: stopping the running tasks (Ctrl-C again to quit at once)")
        self.stop()

    def stop(self) -> None:
        """Stop the run: no new tasks, running ones killed, journal kept for --resume."""
        self.summary.interrupted = True
        self.scheduler.stopped = True
        self._check_done()


def _write_error(exc: OSError) -> str:
    """One line for a failed write to the journal or the output, naming the file."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"cannot write results: {where}{exc.strerror or exc}"


def _in_place_output(output: str) -> bool:
    """OUTPUT is there and is not a file (/dev/null, a FIFO, a terminal): the run writes
    it in place, as to stdout, and keeps nothing beside it (its directory, /dev for one,
    is no place for a journal)."""
    if output == "-":
        return False
    try:
        mode = os.stat(output).st_mode
    except OSError:
        return False
    if os.path.abspath(output).startswith(("/dev/", "/proc/")):
        return True  # /dev/stdout and the like, even when they lead to a file
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def _journal_path(output: str, tasks: str, journal: str | None) -> Path:
    """Where the journal lives: given, or beside the output, or in the current directory
    (output on stdout or another stream)."""
    if journal:
        return Path(journal)
    if output != "-" and not _in_place_output(output):
        return Path(output + ".journal")
    stem = "stdin" if tasks == "-" else Path(tasks).stem
    return Path(f"{stem}.sshfan-journal")


def _check_writable_dir(path: Path, what: str) -> None:
    """Refuse (exit 2) an output path whose directory is missing or not writable (or, for
    an output written in place, one that cannot be written)."""
    if what == "output" and _in_place_output(str(path)):
        if not os.access(path, os.W_OK):
            raise UsageError(f"{path}: {what} is not writable")
        return
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{path}: {what} directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{path}: {what} directory {parent} is not writable")
    if path.is_dir():
        raise UsageError(f"{path}: {what} path is a directory")


def _spool_path(journal: Path) -> Path:
    """Where tasks read from stdin are kept during a run: beside the journal, named after
    it, so that one a killed run left behind is the one the next run (holding the
    journal's lock) writes over and removes. (--resume reads stdin again: same tasks,
    same sha256.)"""
    return journal.with_name(journal.name + ".stdin")


def _spool_stdin(path: Path, tasks: str = "-") -> Path:
    """Copy tasks from stdin (or TASKS, a pipe) to PATH, so they can be scanned and read
    again."""
    with contextlib.ExitStack() as stack:
        source = _stdin() if tasks == "-" else stack.enter_context(open(tasks, "rb"))
        with open(path, "wb") as handle:
            while chunk := source.read(1 << 20):
                handle.write(chunk)
    return path


def _input_name(tasks: str) -> str:
    """TASKS as an error message names it: 'stdin' for '-' (not the spooled copy's path)."""
    return "stdin" if tasks == "-" else tasks


def _is_stream(tasks: str) -> bool:
    """Whether TASKS can be read only once, as stdin ('-') or a pipe (a FIFO, `<(...)`):
    a run copies it (_spool_stdin) to scan it and read it again."""
    if tasks == "-":
        return True
    try:
        mode = os.stat(tasks).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _same_file(one: Path, other: Path) -> bool:
    """Whether ONE and OTHER are the same file: device and inode where both exist (links,
    other spellings), else the same path once resolved."""
    try:
        first, second = os.stat(one), os.stat(other)
    except OSError:
        return os.path.realpath(one) == os.path.realpath(other)
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def _refuse_overlaps(files: list[tuple[str, Path]]) -> None:
    """Refuse (exit 2) a run that would write over a file it reads or writes otherwise
    (`-o tasks.txt`, `--journal` = the output, ...): FILES, in the order they are named."""
    for index, (what, path) in enumerate(files):
        for other_what, other in files[index + 1 :]:
            if _same_file(path, other):
                raise UsageError(
                    f"{other}: the {other_what} would be the {what} ({path}); "
                    f"give the {other_what} another path"
                )


def _file_identity(path: Path) -> tuple[int, int, int, int]:
    """What tells that a file changed: device, inode, size and modification time."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_unchanged(tasks: Iterator[Task], path: Path, identity: tuple) -> Iterator[Task]:
    """TASKS, then a check that PATH is the file that was scanned: one that shrank or
    changed under the reader must not end the run as if every task had been read."""
    yield from tasks
    if _file_identity(path) != identity:
        raise TasksChangedError(f"{path}: the tasks file changed while it was being read")


def _lock_holder() -> str:
    """Who this run is, for the lock file: what a second run names in its refusal."""
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return f"sshfan pid {os.getpid()} on {socket.gethostname()}, started {started}"


def _take_lock(path: Path) -> int:
    """Hold the lock file PATH for this run (one run per journal and output at a time);
    refuse (exit 2) naming the run that holds it. Returns its descriptor."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"{path}: cannot create lock file: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1024, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise UsageError(
                f"{path}: in use by another run ({holder or 'sshfan'}); "
                "wait for it to end or stop it"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise UsageError(f"{path}: cannot lock: {exc.strerror}") from None
        # The run that held it may have removed it between our open and our lock: the
        # lock counts only on the file that is at PATH now.
        mine = os.fstat(fd)
        with contextlib.suppress(FileNotFoundError):
            there = os.stat(path)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (_lock_holder() + "\n").encode(), 0)
    return fd


def _release_lock(path: Path, fd: int) -> None:
    """Remove the lock file, then let go of it (see _take_lock's check of the inode)."""
    with contextlib.suppress(OSError):  # a lock file gone already: nothing to undo
        path.unlink()
    os.close(fd)


# The outputs this process's runs hold (device, inode): see _hold_output.
_HELD_OUTPUTS: set[tuple[int, int]] = set()


def _output_in_use(path: str) -> UsageError:
    """The refusal of a run whose output another run is writing under another name."""
    return UsageError(
        f"{path}: in use by another run (the same file under another name: a link); "
        "wait for it to end or stop it"
    )


def _lock_output(fd: int, path: str) -> None:
    """Hold an flock on the output open at FD (PATH): the lock files go by the output's
    name, this one by the file itself, so a second run writing it through a symbolic or
    hard link is refused too; OSError if another run holds it."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in _HELD_OUTPUTS:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OSError(errno.EBUSY, "in use by another run (through a link)", path) from None
    except OSError:  # a file system without flock (some FUSE ones): the lock files guard
        return


def _hold_output(output: str) -> int | None:
    """Take the flock on OUTPUT, if it is a file already (a new one is locked as it is
    created: _LazyOutput); refuse (exit 2) when another run holds it. Returns the
    descriptor to keep open for the run, or None."""
    if output == "-" or _in_place_output(output):
        return None
    try:
        fd = os.open(output, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None  # not there yet (or not readable: the run's own open says so)
    try:
        _lock_output(fd, output)
    except OSError:  # (only another run's lock: _lock_output passes other errors by)
        os.close(fd)
        raise _output_in_use(output) from None
    st = os.fstat(fd)
    _HELD_OUTPUTS.add((st.st_dev, st.st_ino))
    return fd


def _let_go_of_output(fd: int) -> None:
    """Release what _hold_output took."""
    with contextlib.suppress(OSError):
        st = os.fstat(fd)
        _HELD_OUTPUTS.discard((st.st_dev, st.st_ino))
    os.close(fd)


def _lock_paths(output: str, journal: Path) -> list[Path]:
    """The lock files a run holds: its journal's, and its output's (named after the
    journal a run on that output has by default) if that is another one. (A hard link
    to the output is caught by the output's own flock: _hold_output.)"""
    paths = [journal.with_name(journal.name + ".lock")]
    if output != "-":
        # Named after the file a symbolic link leads to, so that runs on the output
        # through links lock the same file (even before the output exists).
        mine = Path(os.path.realpath(output) + ".journal.lock")
        try:
            regular = Path(output).is_file() or not Path(output).exists()
        except OSError:
            regular = False
        if regular and not _same_file(mine, paths[0]):  # (not /dev/null and the like)
            paths.append(mine)
    return paths


def _shaping_options(opts: RunOptions) -> dict[str, Any]:
    """The options that decide what a task runs or how its result is written, by name:
    recorded in the journal, and a --resume that changes one is refused. (An option
    that shapes tasks or output belongs here.)"""
    shaping: dict[str, Any] = {
        "--command": opts.command,
        "--pipe": opts.pipe,
        "--format": opts.fmt,
        "--tag": opts.tag,
        "--shell": opts.shell,
        "--workdir": opts.workdir,
        "--tagstring": opts.tagstring,
        "--colsep": opts.colsep,
    }
    if opts.pipe:
        shaping["--lines"] = opts.lines
        shaping["--block"] = opts.block
    # What tasks are given and what comes back of them. Recorded only when set, so a
    # journal of a run without them reads the same as before they existed.
    files = opts.files
    for name, value in (
        ("--transferfile", files.transfer),
        ("--return", files.returns),
        ("--basefile", files.basefiles),
    ):
        if value:
            shaping[name] = list(value)
    return json.loads(json.dumps(shaping))  # as it reads back from the journal


def _check_shaping(journal: Path, recorded: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Refuse (exit 2) a --resume whose output-shaping options differ from the journal's."""
    if recorded is None:  # a journal from before they were recorded
        return
    for name in dict.fromkeys([*now, *recorded]):  # in the order options are named
        if recorded.get(name) != now.get(name):
            raise UsageError(
                f"{journal}: the run was started with {name} {_shown(recorded.get(name))}, "
                f"not {_shown(now.get(name))}: resume it with the same options, "
                "or run without --resume to start over"
            )


def _shown(value: Any) -> str:
    """An option's value as a person reads it in an error."""
    if value is None or value is False:
        return "unset"
    if value is True:
        return "set"
    return repr(value) if isinstance(value, str) else str(value)


@dataclasses.dataclass
class RunOptions:
    """Everything `sshfan run` needs, already validated."""

    tasks: str
    hosts: list[HostSpec]
    output: str
    fmt: str = "text"
    resume: bool = False
    resume_failed: bool = False  # --resume, and run the journal's failed tasks again
    timeout: float | None = None
    retries: int = 0
    journal: str | None = None
    slots: int | None = None  # overrides every host's slots
    cpu_slots: str | None = None  # -j +N, -N, N%: every host's slots from its CPUs (parallel's)
    halt_on_error: bool = False  # --halt soon,fail=1
    halt: HaltPolicy | None = None
    tag: bool = False
    joblog: str | None = None
    command: str | None = None  # a template: each line becomes its arguments
    pipe: bool = False  # TASKS is data: chunks of it go to COMMAND's stdin
    lines: int | None = None  # --pipe: lines per chunk
    block: int = 1024 * 1024  # --pipe: bytes per chunk (to the next line end)
    workdir: str | None = None  # --workdir: overrides every host's workdir ("." as parallel)
    shell: str | None = None  # --shell: overrides every host's shell
    # Files as GNU parallel moves them (see the "Files to and from workers" section).
    results: str | None = None  # --results DIR
    files: FileOptions = dataclasses.field(default_factory=FileOptions)
    # Where task durations are remembered between runs (longest first); None: nowhere.
    history: Path | None = dataclasses.field(default_factory=DurationHistory.default_path)
    speculate: bool = False  # start backup copies of straggling tasks (they may run twice)
    onall: bool = False  # every task on every host (GNU parallel's --onall)
    nonall: bool = False  # TASKS holds --nonall's one command (onall is set too)
    sources: HostSources | None = None  # where the hosts came from: watched for changes
    colsep: str | None = None  # --colsep: a regex cutting each line into columns {1}..{n}
    tagstring: str | None = None  # --tagstring: the prefix of each output line (then a TAB)

    def __post_init__(self) -> None:
        """Refuse values no run can use, for the CLI and the Python API alike."""
        timeout, slots = self.timeout, self.slots
        if timeout is not None and not timeout >= 0:  # also NaN
            raise UsageError(f"--timeout: must be 0 or more seconds, not {timeout:g}")
        if timeout == 0:  # parallel's --timeout 0: no timeout
            self.timeout = None
        if self.retries < 0:
            raise UsageError(f"--retries: must be 0 or more, not {self.retries}")
        if slots is not None and slots < 1:
            raise UsageError(f"--slots: must be at least 1, not {slots}")
        if self.cpu_slots is not None and not _CPU_SLOTS.fullmatch(self.cpu_slots):
            raise UsageError(f"--slots: not +N, -N or N%: {self.cpu_slots!r}")
        if slots is not None and slots > SLOTS_MAX:
            raise UsageError(
                f"--slots: must be at most {SLOTS_MAX} (Linux's largest pid_max), not {slots}"
            )
        if self.pipe and not self.command:
            raise UsageError("--pipe needs --command: the command each chunk is fed to")
        if self.lines is not None and self.lines < 0:
            raise UsageError(f"--lines: must be 0 or more, not {self.lines}")
        if self.lines is not None and not self.pipe:
            raise UsageError("--lines works with --pipe only (lines per chunk)")
        if self.block < 1:
            raise UsageError(f"--block: must be at least 1 byte, not {self.block}")
        if self.shell is not None and not self.shell.strip():
            raise UsageError("--shell: needs a shell, e.g. bash or /bin/zsh")
        if self.colsep is not None:
            if not self.command or self.pipe:
                raise UsageError("--colsep needs --command (and no --pipe): it cuts lines")
            ColumnSplitter(self.colsep)  # exit 2 on a bad one, before anything runs
        if self.onall and self.pipe:
            raise UsageError("--onall and --nonall cannot be used with --pipe")


def command_template(opts: RunOptions) -> Template | None:
    """The --command (or --pipe command) as a Template; None when lines are commands."""
    if opts.pipe:
        template = Template(opts.command or "cat", opts.colsep, "pipe")
        # The largest seq and slot numbers it could get: a --pipe command is the same for
        # every chunk but for those, so one check before the run covers them all.
        _check_exec_length("--command", template.render("", 10**12, SLOT_WIDEST))
        return template
    if opts.command is None:
        return None
    return Template(opts.command, opts.colsep)


def numbers_slots(opts: RunOptions) -> bool:
    """Whether the run's commands or tags hold {%} (or {0%}), the job slot, as parallel
    numbers it."""
    texts = [(opts.command or "", _REPLACEMENT)]
    if opts.tagstring is not None:
        texts.append((_unescape_tagstring(opts.tagstring), _TAG_REPLACEMENT))
    return any(
        "%" in (m.group(3), m.group(5)) for text, pattern in texts for m in pattern.finditer(text)
    )


def line_tagger(opts: RunOptions) -> Tagger | None:
    """What --tag or --tagstring puts before each output line, as GNU parallel does (with
    --onall, --tag is the host's name, ':' for this machine as in the joblog, and
    --tagstring is ignored, as there)."""
    local = {spec.name for spec in opts.hosts if spec.local} if opts.onall else set()
    # An empty or "0" tag string is false in Perl: parallel then has none (its
    # `$opt::tagstring ||= ...` drops it), so --tag alone decides.
    tagstring = opts.tagstring if opts.tagstring not in ("", "0") else None
    if opts.onall:
        template = Template("{host}", kind="tag") if opts.tag else None
    elif tagstring is not None:
        template = Template(_unescape_tagstring(tagstring), opts.colsep, "tag")
    elif opts.tag:
        template = Template("{}", opts.colsep, "tag")  # parallel's --tag is --tagstring {}
    else:
        template = None
    if template is None:
        return None

    def tag(result: TaskResult) -> bytes:
        """The prefix for RESULT's lines: the tag string filled in, then a TAB."""
        line = result.command if result.arg is None else result.arg
        host = ":" if result.host in local else result.host
        text = template.render(line, result.seq, str(result.slot), host)
        return as_bytes(text) + b"\t"

    return tag


def _workdir_for(spec: HostSpec, workdir: str) -> str:
    """Where --workdir DIR runs SPEC's tasks. "." is GNU parallel's: here on this machine;
    on a remote one, the current directory's path below the home directory (from the
    login directory there), or the same absolute path when it is not below home."""
    if workdir != ".":
        return workdir
    here = os.getcwd()
    if spec.local:
        return here
    try:
        home = os.stat(os.path.expanduser("~"))
    except OSError:
        return here
    parts = Path(here).parts
    for depth in range(1, len(parts) + 1):
        with contextlib.suppress(OSError):
            found = os.stat(Path(*parts[:depth]))
            if (found.st_dev, found.st_ino) == (home.st_dev, home.st_ino):  # as parallel
                return str(Path(*parts[depth:])) if depth < len(parts) else "."
    return here


def run_hosts(specs: list[HostSpec], opts: RunOptions) -> list[HostSpec]:
    """SPECS as the run serves them, with the options that override the hosts file:
    --slots (else one slot under --onall), --workdir, --shell. Hosts that join from a
    watched hosts file get the same."""
    hosts = specs
    if opts.slots:
        hosts = [dataclasses.replace(spec, slots=opts.slots) for spec in hosts]
    elif opts.cpu_slots:  # this machine's CPUs are known here; a remote host's at its hello
        rule = opts.cpu_slots
        hosts = [
            dataclasses.replace(spec, slots=slots_for_cpus(rule, local_cpus()))
            if spec.local
            else dataclasses.replace(spec, slots=None, cpu_slots=rule)
            for spec in hosts
        ]
    elif opts.onall:  # a host's tasks one at a time, in order, as GNU parallel's --onall
        hosts = [dataclasses.replace(spec, slots=1) for spec in hosts]
    if opts.workdir:
        hosts = [
            dataclasses.replace(spec, workdir=_workdir_for(spec, opts.workdir), make_workdir=True)
            for spec in hosts
        ]
    if opts.shell:
        hosts = [dataclasses.replace(spec, shell=opts.shell) for spec in hosts]
    return hosts


@dataclasses.dataclass
class PreparedRun:
    """A run's inputs checked and its files taken: what prepare_run hands run_async."""

    tasks_path: Path
    count: int
    journal: Journal
    done: array.array[int]
    resumed: bool
    identity: tuple  # the tasks file as scanned (see _read_unchanged)
    locks: list[tuple[Path, int]]
    spooled: bool = False  # tasks_path is a copy of stdin or a pipe (_spool_stdin)
    held_output: int | None = None  # the output's own flock (_hold_output)

    def release(self) -> None:
        """Let go of what the run held (the journal is closed by then): the copy of
        stdin or a pipe, if spooled, then the locks."""
        if self.spooled:
            self.tasks_path.unlink(missing_ok=True)
        if self.held_output is not None:
            _let_go_of_output(self.held_output)
            self.held_output = None
        for path, fd in reversed(self.locks):
            _release_lock(path, fd)
        self.locks = []


def prepare_run(opts: RunOptions) -> PreparedRun:
    """Check inputs, lock the journal and output, and open the journal (fresh or
    resumed); nothing runs yet, and nothing earlier is changed yet."""
    journal_path = _journal_path(opts.output, opts.tasks, opts.journal)
    _check_writable_dir(journal_path, "journal")
    streamed = _is_stream(opts.tasks)
    files = [] if streamed else [("tasks file", Path(opts.tasks))]
    files += _host_files(opts.sources)
    if opts.output != "-":
        _check_writable_dir(Path(opts.output), "output")
        files.append(("output", Path(opts.output)))
    files.append(("journal", journal_path))
    if opts.joblog:
        files.append(("joblog", Path(opts.joblog)))
    lock_paths = _lock_paths(opts.output, journal_path)
    extra = [("journal's new file", journal_path.with_name(journal_path.name + ".new"))]
    extra += [("lock file", path) for path in lock_paths]
    if streamed:
        extra.append(("copy of stdin", _spool_path(journal_path)))
    _refuse_overlaps(files + extra)
    locks: list[tuple[Path, int]] = []
    held: int | None = None
    tasks_path = Path(opts.tasks)
    try:
        for path in lock_paths:
            locks.append((path, _take_lock(path)))
        held = _hold_output(opts.output)
        if streamed:
            tasks_path = _spool_stdin(_spool_path(journal_path), opts.tasks)
        with _reading(tasks_path, "tasks file"):
            identity = _file_identity(tasks_path)
        template = command_template(opts)
        if opts.pipe:
            count, digest = scan_chunks(tasks_path, opts.lines, opts.block)
        else:
            count, digest = scan_tasks(tasks_path, template, _input_name(opts.tasks))
        shaping = _shaping_options(opts)
        onall = _onall_header(opts, tasks_path)
        done = array.array("q")
        resumed = opts.resume and journal_path.exists()
        if resumed:
            journal, header, done = Journal.reopen(journal_path)
            try:
                if header.get("tasks_sha256") != digest:
                    raise UsageError(
                        f"{journal_path}: journal was written for a different tasks file than "
                        f"{opts.tasks} (its contents changed); run without --resume to start over"
                    )
                if header.get("onall") != onall.get("onall"):
                    raise UsageError(_onall_mismatch(journal_path, header.get("onall")))
                _check_shaping(journal_path, header.get("shaping"), shaping)
            except UsageError:
                journal.close()
                raise
            if opts.resume_failed:  # as parallel's: the failed tasks run again, in order
                for seq in journal.failed_seqs:
                    done[seq] = -1
                journal.failed_before = 0
        else:
            header = {
                "version": JOURNAL_VERSION,
                "tasks": str(opts.tasks),
                "tasks_sha256": digest,
                "count": count,
                "shaping": shaping,
                "created": time.time(),
                "sshfan": __version__,
                **onall,
            }
            try:
                journal = Journal.create(journal_path, header)
            except OSError as exc:
                raise UsageError(f"{journal_path}: cannot create journal: {exc.strerror}") from None
    except BaseException:
        if streamed:
            _spool_path(journal_path).unlink(missing_ok=True)
        if held is not None:
            _let_go_of_output(held)
        for path, fd in reversed(locks):
            _release_lock(path, fd)
        raise
    return PreparedRun(tasks_path, count, journal, done, resumed, identity, locks, streamed, held)


def _host_files(sources: HostSources | None) -> list[tuple[str, Path]]:
    """The files the run reads its hosts from (and watches), for _refuse_overlaps."""
    if sources is None:
        return []
    found = [("hosts file", Path(sources.hosts_file))] if sources.hosts_file else []
    for name in sources.sshloginfiles:
        if name != "-":
            found.append(("sshloginfile", Path(sshloginfile_path(name))))
    return found


async def run_async(
    opts: RunOptions,
    out: IO[bytes] | None,
    log: Callable[[str], None] = lambda line: None,
    on_done: Callable[[TaskResult], None] = lambda result: None,
    whole: bool = False,
    on_start: Callable[[_Run], None] = lambda run: None,
) -> RunSummary:
    """Run the tasks described by OPTS, rendering into OUT; return the summary."""
    sources = opts.sources
    preflight(opts.hosts, sources.hosts_file or "hosts" if sources else "hosts")
    prepared = prepare_run(opts)
    tasks_path, count, journal = prepared.tasks_path, prepared.count, prepared.journal
    done, resumed = prepared.done, prepared.resumed
    joblog = None
    merged = None
    run: _Run | None = None
    try:
        if opts.joblog:
            local = {spec.name for spec in opts.hosts if spec.local}
            joblog = Joblog(opts.joblog, resumed, local, " " if opts.nonall else "")
        if out is not None:
            name = "stdout" if opts.output == "-" else opts.output
            if opts.fmt == "gather":
                merged = GatheredOutput(out, journal, name)
            else:
                # parallel --results prints no output: it goes in the files only.
                fmt = "none" if opts.results and opts.fmt == "text" else opts.fmt
                # The joblog on stdout too: its rows go between the tasks' outputs, so the
                # output is not written by a thread of its own.
                copier = not (opts.joblog == "-" and opts.output == "-")
                merged = MergedOutput(
                    out, fmt, journal, line_tagger(opts), copier=copier, name=name
                )
                # Not where two tries of a task may stream at once (--speculate), nor
                # where tasks are not merged in seq order (--onall).
                merged.direct = (
                    opts.output != "-" and not opts.speculate and not opts.onall and fmt != "none"
                )
                if merged.direct:
                    journal.before_sync = merged.sync_direct
                if joblog is not None and not opts.onall:  # (--onall: not keyed by seq)
                    merged.on_pass = joblog.release
        history = None
        longest: list[Task] = []
        template = command_template(opts)
        if template is not None and opts.pipe:
            tasks = read_chunks(tasks_path, merged, done, template, opts.lines, opts.block)
        else:
            tasks = read_tasks(tasks_path, merged, done, template)
            history = DurationHistory(opts.history)
            history.load()
            # --halt keeps file order, as parallel; so does {%}, numbered as parallel's
            # slots; --onall runs a host's tasks in file order, as parallel's.
            if not (opts.halt_on_error or opts.halt or opts.onall or numbers_slots(opts)):
                longest = known_long_tasks(tasks_path, done, history, template)
        tasks = _read_unchanged(tasks, tasks_path, prepared.identity)
        scheduler = Scheduler(tasks, opts.retries, longest)
        todo: dict[str, int] = {}
        if opts.onall:
            scheduler, todo = onall_scheduler(
                tasks_path, merged, done, opts, template, count, prepared.identity
            )
            count *= len(opts.hosts)
        hosts = run_hosts(opts.hosts, opts)
        run = _Run(hosts, scheduler, journal, merged, opts, log, on_done, whole)
        run.todo = todo
        run.joblog = joblog
        if journal.in_output:
            # --resume of a run that wrote tasks' stdout straight into its output: what is
            # still there stays there, the output rendered over it in place (its bytes
            # skipped), unless a task before it runs again and moves it: that is copied
            # into the journal first.
            first = journal.check_in_outputs(done)
            try:
                journal.take_in_outputs(done, [seq for seq in journal.in_output if seq > first])
            except OSError as exc:
                run.abort(_write_error(exc))
                return run.summary
            if merged is not None and journal.in_output and isinstance(out, _LazyOutput):
                out.keep = True
                merged.in_place = True
                merged.in_place_end = journal.in_output_end(done)
        run.summary.total = count
        run.summary.hosts = [spec.name for spec in opts.hosts]
        run.summary.resumed = sum(1 for off in done if off >= 0)
        run.summary.resumed_failed = journal.failed_before
        run.summary.journal = str(journal.path)
        run.summary.output = opts.output
        if run.results is not None:  # earlier runs' tasks too: the tree is rebuilt as a whole
            try:
                for offset in done:
                    if offset >= 0:
                        run.results.write(journal.load_result(offset), journal)
            except OSError as exc:
                raise UsageError(
                    f"--results: cannot write {exc.filename}: {exc.strerror}"
                ) from None
        run.history = history
        run.summary.onall = opts.onall
        on_start(run)
        if count - run.summary.resumed <= 0:
            # Nothing left to run (empty file, or a finished run resumed): no host needed.
            if isinstance(scheduler, OnAllScheduler):
                scheduler.drain()
            leftover = scheduler.take("", 1)
            run.summary.complete = not leftover and scheduler.error is None
            if scheduler.error is not None:
                run.abort(str(scheduler.error))
            try:
                if merged is not None:
                    if run.summary.complete and not merged.written:
                        merged.open()  # an empty run still writes its (empty) output
                    merged.finish()  # before the journal closes: the copier reads it
                journal.close()
            except OSError as exc:
                run.abort(_write_error(exc))
            return run.summary
        summary = await run.execute()
        for name, left in run.todo.items():  # --onall: the hosts that could not run all theirs
            ran = summary.per_host[name].count if name in summary.per_host else 0
            if left > ran:
                summary.unrun[name] = left - ran
        if history is not None:
            samples = [d for stats in summary.per_host.values() for d in stats.sample]
            history.save(_median(samples) if samples else None)
        if merged is not None and summary.complete and not merged.written:
            try:
                merged.open()  # every task was blank: the output exists, empty
                merged.finish()
            except OSError as exc:
                run.abort(_write_error(exc))
        return summary
    finally:
        # Reached with a result already decided (or an exception on its way): only make
        # sure no copy is still reading the journal when it closes.
        if merged is not None:
            merged.wait()
        with contextlib.suppress(OSError):
            journal.close()  # a no-op unless the run ended by an exception
        if joblog is not None:
            try:
                joblog.close()
            except OSError as exc:
                if run is not None:
                    run.abort(_write_error(exc))
        prepared.release()


def _onall_header(opts: RunOptions, tasks_path: Path) -> dict[str, Any]:
    """What an --onall journal records to index its results by (host, seq): the hosts in
    order and the tasks file's line count (empty without --onall)."""
    if not opts.onall:
        return {}
    with open(tasks_path, "rb") as handle:
        lines = sum(1 for _line in handle)
    return {"onall": [spec.name for spec in opts.hosts], "lines": lines}


def _onall_mismatch(path: Path, hosts: list[str] | None) -> str:
    """The error for --resume with other hosts (or with/without --onall) than the journal's."""
    if hosts is None:
        return f"{path}: journal was written without --onall; run without --resume to start over"
    return (
        f"{path}: journal was written for --onall on other hosts ({', '.join(hosts)}); "
        "resume with the same hosts in the same order, or run without --resume"
    )


class _HostBlock:
    """The merged output as one host's tasks see it under --onall: seq S is key BASE + S."""

    def __init__(self, merged: MergedOutput, base: int) -> None:
        """Shift every seq by BASE (the host's place times the file's line count)."""
        self.merged = merged
        self.base = base

    def put(self, seq: int, offset: int, result: TaskResult | None = None) -> None:
        """A task from the journal (--resume)."""
        self.merged.put(self.base + seq, offset, result)

    def skip(self, seq: int) -> None:
        """A blank line."""
        self.merged.skip(self.base + seq)


def onall_scheduler(
    path: Path,
    merged: MergedOutput | None,
    done: array.array[int],
    opts: RunOptions,
    template: Template | None,
    count: int,
    identity: tuple,
) -> tuple[OnAllScheduler, dict[str, int]]:
    """The scheduler for --onall (a pass over the tasks file per host, each checked to be
    the file that was scanned), and how many tasks each host has to run (those not in
    the journal)."""
    lines = _onall_header(opts, path)["lines"]

    def host_pass(place: int) -> tuple[Iterator[Task], int]:
        """The pass over the file of the host at PLACE, and how many tasks it has to run."""
        base = place * lines
        block = None if merged is None else _HostBlock(merged, base)
        mine = done[base : base + lines + 1]  # mine[seq] is done[base + seq]
        tasks = read_tasks(path, block, mine, template)
        return _read_unchanged(tasks, path, identity), count - sum(1 for o in mine[1:] if o >= 0)

    sources: dict[str, Iterator[Task]] = {}
    todo: dict[str, int] = {}
    for index, spec in enumerate(opts.hosts):
        sources[spec.name], todo[spec.name] = host_pass(index)
    return OnAllScheduler(sources, lines, opts.retries, host_pass), todo


JOBLOG_HEADER = b"Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand\n"
JOBLOG_HOLD = 1024 * 1024  # bytes of joblog rows held in memory before they go to a file


class Joblog:
    """--joblog FILE: GNU parallel's joblog, its rows in seq order as `parallel -k` writes
    them: a row is held until the output has got past its task (release), in a spool
    that moves to a file past JOBLOG_HOLD bytes, so memory does not grow with the run."""

    def __init__(self, path: str, append: bool, local: set[str], suffix: str = "") -> None:
        """Open PATH ('-': stdout; '+FILE' appends, as parallel's, with no header ever),
        with a header unless APPENDing to a file that has rows; LOCAL are this machine's
        hosts (':'); SUFFIX ends each Command (--nonall: a space, as parallel's)."""
        self.name = path
        self.local = local
        self.suffix = suffix
        header = True
        if path.startswith("+"):
            path, append, header = path[1:], True, False
            self.name = path
        if path == "-":
            self.file = _stdout()
            header = header and not append
        else:
            try:
                self.file = open(path, "ab" if append else "wb")  # noqa: SIM115 - close()
            except OSError as exc:
                raise UsageError(f"{path}: cannot write joblog: {exc.strerror}") from None
            header = header and self.file.tell() == 0
        self._held: list[tuple[int, int, int]] = []  # heap of (seq, offset, length) in spool
        self._spool = tempfile.SpooledTemporaryFile(JOBLOG_HOLD)  # noqa: SIM115 - close()
        if header:  # flushed with the first row: a write error ends the run there (exit 3)
            self.file.write(JOBLOG_HEADER)

    def add(self, result: TaskResult) -> None:
        """Hold RESULT's row (its task just finished) until release() reaches its seq."""
        row = joblog_row(result, self.local, time.time(), self.suffix)
        self._spool.seek(0, os.SEEK_END)
        heapq.heappush(self._held, (result.seq, self._spool.tell(), len(row)))
        self._spool.write(row)

    def release(self, seq: int) -> None:
        """Write the held rows of tasks up to SEQ, in seq order."""
        rows = []
        while self._held and self._held[0][0] <= seq:
            _, offset, length = heapq.heappop(self._held)
            self._spool.seek(offset)
            rows.append(self._spool.read(length))
        if not self._held:  # nothing held: the spool starts over (its file, if any, shrinks)
            self._spool.seek(0)
            self._spool.truncate()
        if rows:
            self._write(rows)

    def close(self) -> None:
        """Write the rows still held (tasks whose output was not reached), then close."""
        try:
            self.release(sys.maxsize)
        finally:
            self._spool.close()
            if self.file is not sys.stdout.buffer:
                try:
                    self.file.close()
                except OSError as exc:
                    raise OSError(exc.errno, exc.strerror, self.name) from None

    def _write(self, rows: list[bytes]) -> None:
        """Write and flush ROWS (an error names the joblog: a buffered one names no file)."""
        try:
            self.file.writelines(rows)
            self.file.flush()
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.name) from None


def joblog_row(result: TaskResult, local: set[str], now: float, suffix: str = "") -> bytes:
    """One joblog row for RESULT, finished at NOW, byte for byte as GNU parallel writes it.

    Host is ':' for this machine; Send is what went to the task's stdin (--pipe), Receive
    its stdout; JobRuntime is cut (not rounded) to milliseconds; Command is the command as
    run, quoted, with its TABs as they are and newlines as NULs."""
    received = len(result.stdout) + sum(p[2] for p in result.pieces if p[1] == 1)
    if result.in_output is not None:
        received += result.in_output.length
    start = now - result.duration_s
    runtime = int(result.duration_s * 1000) / 1000
    # A task killed for its --timeout is Exitval -1, as parallel marks the jobs it kills.
    exitval = -1 if result.timed_out else 0 if result.signal else result.exit_code
    host = ":" if result.host in local else result.host
    head = (
        f"{result.seq}\t{host}\t{start:.3f}\t{runtime:10.3f}\t{result.sent}\t"
        f"{received}\t{exitval}\t{result.signal or 0}\t"
    )
    return as_bytes(head) + as_bytes(result.command + suffix).replace(b"\n", b"\0") + b"\n"


def whole_result(result: TaskResult, journal: Journal) -> TaskResult:
    """The result with its whole stdout and stderr in memory (pieces read back)."""
    if not result.pieces and result.in_output is None:
        return result
    out = b"".join(_stream_chunks(result, journal, 1))
    err = b"".join(_stream_chunks(result, journal, 2))
    return dataclasses.replace(result, stdout=out, stderr=err, pieces=[], in_output=None)


# ============================================================================
# 15. Python API
# ============================================================================

TasksArg = str | os.PathLike[str] | Iterable[str]
# run_tasks: results handed to the consumer's thread and not yet taken. Past it the run
# goes on but its results wait in the loop, so a slow consumer holds only this many.
_API_HANDOFF = 1024
HostsArg = str | os.PathLike[str] | list[HostSpec] | list[str] | None


def resolve_hosts(hosts: HostsArg) -> list[HostSpec]:
    """Hosts for the API: a hosts file path, HostSpecs, ~/.ssh/config names, or None (local)."""
    if hosts is None:
        return [local_host()]
    if isinstance(hosts, (str, os.PathLike)):
        return load_hosts(hosts)
    specs = [HostSpec(name=h) if isinstance(h, str) else h for h in hosts]
    if not specs:
        raise UsageError("hosts: the list is empty")
    return specs


class RunError(SshfanError):
    """The run could not finish (no host left, or stopped); its summary says more."""

    def __init__(self, summary: RunSummary) -> None:
        """Keep the summary of the run that could not finish."""
        reason = summary.fatal or ("interrupted" if summary.interrupted else "no host is left")
        super().__init__(f"the run could not finish: {reason}; journal: {summary.journal}")
        self.summary = summary


async def run_tasks_async(
    tasks: TasksArg,
    hosts: HostsArg = None,
    *,
    slots: int | None = None,
    timeout: float | None = None,
    retries: int = 0,
    halt_on_error: bool = False,
    log: Callable[[str], None] | None = None,
) -> AsyncIterator[TaskResult]:
    """Run TASKS (a tasks file path, or an iterable of commands) on HOSTS; yield results as
    they finish, with whole stdout and stderr. Raises RunError if no host is left."""
    specs = resolve_hosts(hosts)
    with tempfile.TemporaryDirectory(prefix="sshfan-") as tmp:
        if isinstance(tasks, (str, os.PathLike)):
            path = Path(tasks)
        else:
            path = Path(tmp, "tasks")
            with open(path, "w", encoding="utf-8", errors="surrogateescape") as handle:
                for number, command in enumerate(tasks, 1):
                    if "\n" in command:
                        raise UsageError(f"task {number}: a command must be one line")
                    handle.write(command + "\n")
        opts = RunOptions(
            str(path),
            specs,
            output=str(Path(tmp, "out")),
            journal=str(Path(tmp, "journal")),
            timeout=timeout,
            retries=retries,
            slots=slots,
            halt_on_error=halt_on_error,
        )
        results: asyncio.Queue[TaskResult] = asyncio.Queue()
        started: list[_Run] = []
        runner = asyncio.ensure_future(
            run_async(
                opts, None, log or (lambda line: None), results.put_nowait, True, started.append
            )
        )
        getter: asyncio.Future[TaskResult] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(results.get())
                await asyncio.wait({getter, runner}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                while not results.empty():
                    yield results.get_nowait()
                summary = runner.result()
                if summary.exit_code in (3, 130):
                    raise RunError(summary)
                return
        finally:
            if getter is not None and not getter.done():
                getter.cancel()
            if not runner.done():
                for run in started:
                    run.stop()
                with contextlib.suppress(Exception):
                    await runner


def run_tasks(
    tasks: TasksArg,
    hosts: HostsArg = None,
    *,
    slots: int | None = None,
    timeout: float | None = None,
    retries: int = 0,
    halt_on_error: bool = False,
    log: Callable[[str], None] | None = None,
) -> Iterator[TaskResult]:
    """The synchronous twin of run_tasks_async: an iterator of results as they finish."""
    # The loop's thread never blocks on the consumer: it waits (asynchronously) for room
    # among the results handed over, and the consumer makes room as it takes each one.
    handoff: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    room: list[asyncio.Semaphore] = []  # made on the loop's thread, in produce()

    async def produce() -> None:
        """Run the async iterator, handing each result to the consumer's thread."""
        room.append(asyncio.Semaphore(_API_HANDOFF))
        results = run_tasks_async(
            tasks,
            hosts,
            slots=slots,
            timeout=timeout,
            retries=retries,
            halt_on_error=halt_on_error,
            log=log,
        )
        try:
            async for result in results:
                await room[0].acquire()
                handoff.put(("result", result))
        finally:
            await results.aclose()

    loop = asyncio.new_event_loop()
    producer = loop.create_task(produce())

    def worker() -> None:
        """The event loop's thread."""
        try:
            loop.run_until_complete(producer)
            handoff.put(("end", None))
        except asyncio.CancelledError:
            handoff.put(("end", None))
        except BaseException as exc:  # handed to the consumer, raised there
            handoff.put(("error", exc))
        finally:
            loop.close()

    thread = threading.Thread(target=worker, name="sshfan-run", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = handoff.get()
            if kind == "result":
                with contextlib.suppress(RuntimeError):  # the loop already closed
                    loop.call_soon_threadsafe(room[0].release)
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        with contextlib.suppress(RuntimeError):  # the loop already closed
            loop.call_soon_threadsafe(producer.cancel)
        thread.join()


# ============================================================================
# 16. Checking hosts
# ============================================================================


@dataclasses.dataclass
class HostCheck:
    """How one host answered `sshfan check`."""

    name: str
    ok: bool
    reason: str = ""
    python: str = ""
    cpus: int = 0
    slots: int = 0
    hostname: str = ""
    rtt_ms: float = 0.0
    connect_s: float = 0.0


async def check_hosts(hosts: list[HostSpec]) -> list[HostCheck]:
    """Connect to every host, start the stub, and measure a round trip."""
    pacing = Pacing()

    async def one(spec: HostSpec) -> HostCheck:
        """Check a single host."""
        session = HostSession(spec, None)
        started = time.monotonic()
        try:
            await session.open(pacing)
            rtts = [await session.ping() for _ in range(3)]
        except HostError as exc:
            await session.close(0.5)
            return HostCheck(spec.name, False, f"{exc.stage}: {exc.reason}")
        connect_s = time.monotonic() - started
        await session.close(2.0)
        hello = session.hello
        return HostCheck(
            spec.name,
            True,
            python=str(hello.get("python", "")),
            cpus=int(hello.get("cpus") or 0),
            slots=session.window.slots,
            hostname=str(hello.get("hostname", "")),
            rtt_ms=sorted(rtts)[1] * 1000,
            connect_s=connect_s,
        )

    return list(await asyncio.gather(*(one(spec) for spec in hosts)))


# ============================================================================
# 17. Command line
# ============================================================================

_FORMATS = ("text", "jsonl")


def _printable(text: str) -> str:
    """TEXT with control characters shown escaped (\\x1b, \\n, \\u202e), safe for a terminal.

    Worker text (stderr tails, error reasons, hostnames) reaches the head's terminal in
    the lines it prints: raw, an escape sequence in it could rewrite the screen."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _say(line: str) -> None:
    """Print one line on stderr, above the progress bar if there is one."""
    from tqdm import tqdm

    tqdm.write(_printable(line), file=sys.stderr)


def _median(values: list[float]) -> float:
    """The median of a non-empty list."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


FAILURES_SHOWN = 5  # failed tasks the summary lists (the first ones in seq order)


def format_summary(summary: RunSummary) -> list[str]:
    """The end-of-run summary: counts, a row per host, failures, where results went."""
    done = summary.ok + summary.failed + summary.timed_out
    lines = []
    head = f"sshfan: {done + summary.resumed} of {summary.total} tasks done"
    parts = [f"{summary.ok} ok", f"{summary.failed} failed"]
    if summary.timed_out:
        parts.append(f"{summary.timed_out} timed out")
    if summary.resumed:
        failed = f", {summary.resumed_failed} of them failed" if summary.resumed_failed else ""
        parts.append(f"{summary.resumed} from the journal{failed}")
    lines.append(f"{head}: {', '.join(parts)} in {summary.elapsed_s:.2f} s")
    names = list(dict.fromkeys([*summary.hosts, *summary.per_host]))
    if names:
        lines.append(
            f"  {'host':<20} {'tasks':>7} {'failed':>7} {'lost':>5} {'median s':>9}  status"
        )
        for name in names:
            stats = summary.per_host.get(name) or DurationStats()
            middle = stats.median()
            median = "-" if middle is None else f"{middle:.3f}"
            status = "ok"
            if name in summary.lost_hosts:
                status = f"lost: {summary.lost_hosts[name]}"
            elif name in summary.skipped_hosts:
                status = f"skipped: {summary.skipped_hosts[name]}"
            elif name in summary.unused_hosts:
                status = "not used: the run ended before it was up"
            elif name in summary.drained:
                status = "drained: left the hosts file"
            elif name in summary.lost_stubs:
                reasons = summary.lost_stubs[name]
                status = f"ok (lost {len(reasons)} of its stubs: {reasons[-1]})"
            lines.append(
                f"  {name:<20} {stats.count:>7} {summary.failed_per_host.get(name, 0):>7} "
                f"{summary.lost_per_host.get(name, 0):>5} {median:>9}  {status}"
            )
    for result in sorted(summary.failures, key=lambda r: r.seq):
        why = "timed out" if result.timed_out else f"exit {result.exit_code}"
        tail = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        detail = f": {tail[0][:200]}" if tail else ""
        lines.append(f"  failed: task {result.seq} on {result.host} ({why}){detail}")
    failed_all = summary.failed + summary.timed_out + summary.resumed_failed
    if failed_all > len(summary.failures) and summary.journal_kept:
        more = failed_all - len(summary.failures)
        command = f"sshfan results {shlex.quote(summary.output)}"
        if summary.output == "-" or summary.journal != summary.output + ".journal":
            command += f" --journal {shlex.quote(summary.journal)}"
        lines.append(f"  ... and {more} more failed: {command} --failed lists them all")
    if summary.halted:
        left = summary.total - done - summary.resumed
        lines.append(
            f"sshfan: halted (--halt {summary.halt}): {left} task(s) not run; --resume runs them"
        )
    if summary.backups or summary.speculating:
        lines.append(
            f"sshfan: --speculate: {summary.backups} backup copies started, "
            f"{summary.backups_won} finished first"
        )
    if summary.onall:
        lines += _host_outcomes(summary, {r.host: r for r in reversed(summary.failures)})
    where = "stdout" if summary.output == "-" else summary.output
    if not summary.journal_kept:
        lines.append(f"sshfan: output: {where}")
        lines += _stopped_lines(summary)[:-1]  # no --resume advice: the journal is gone
        return lines
    lines.append(f"sshfan: output: {where}; journal: {summary.journal}")
    if summary.exit_code in (3, 130):
        if summary.fatal:
            lines.append(f"sshfan: the run could not finish: {summary.fatal}")
        elif summary.interrupted:
            lines.append("sshfan: the run was interrupted")
        elif summary.exit_code == 3:
            lines.append("sshfan: the run could not finish: no host is left")
        skipped_all = summary.skipped_hosts and not summary.lost_hosts
        if summary.exit_code == 3 and skipped_all and not (done or summary.fatal):
            # No host started (a setting to fix, or hosts down): --resume would not help.
            again = " with --resume" if summary.resumed else ""
            lines.append(
                f"sshfan: no host could start (reasons above): fix that, "
                f"then run the command again{again}"
            )
        else:
            lines.append("sshfan: to finish the run, repeat the command with --resume")
    return lines


def _host_outcomes(summary: RunSummary, failures: dict[str, TaskResult]) -> list[str]:
    """--onall: the hosts where a task failed (with the first failure's exit and last
    stderr line, when known) and those that could not run all their tasks, and why."""
    lines = []
    count = len(summary.hosts)
    failed = [name for name in summary.hosts if summary.failed_per_host.get(name)]
    if failed:
        parts = []
        for name in failed:
            result = failures.get(name)
            if result is None:
                parts.append(f"{name} ({summary.failed_per_host[name]} task(s))")
                continue
            why = "timed out" if result.timed_out else f"exit {result.exit_code}"
            tail = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
            parts.append(f"{name} ({why}{': ' + tail[0][:100] if tail else ''})")
        lines.append(f"sshfan: failed on {len(failed)} of {count} hosts: {', '.join(parts)}")
    unrun = [name for name in summary.hosts if name in summary.unrun]
    if unrun:
        parts = []
        for name in unrun:
            reason = summary.skipped_hosts.get(name) or summary.lost_hosts.get(name)
            if reason is None and name in summary.drained:
                reason = "it left the hosts file"
            if reason is None:
                reason = "halted" if summary.halted else "the run ended first"
            parts.append(f"{name} ({summary.unrun[name]} task(s) not run: {reason})")
        lines.append(f"sshfan: could not run on {len(unrun)} of {count} hosts: {', '.join(parts)}")
        if summary.journal_kept and summary.exit_code == 1:
            lines.append("sshfan: --resume runs their tasks on them, once they are back")
    return lines


def _stopped_lines(summary: RunSummary) -> list[str]:
    """Why a run that could not finish (exit 3 or 130) stopped, then the --resume advice."""
    if summary.exit_code not in (3, 130):
        return []
    if summary.fatal:
        why = f"sshfan: the run could not finish: {summary.fatal}"
    elif summary.interrupted:
        why = "sshfan: the run was interrupted"
    else:
        why = "sshfan: the run could not finish: no host is left"
    return [why, "sshfan: to finish the run, repeat the command with --resume"]


def format_onall_summary(summary: RunSummary, failures: dict[str, TaskResult]) -> list[str]:
    """`sshfan all`'s summary: nothing when every host succeeded and the output went to
    stdout (as pdsh), else the hosts that failed or could not run it, and the output."""
    lines = _host_outcomes(summary, failures)
    if summary.output != "-":
        lines.append(f"sshfan: output: {summary.output}; journal: {summary.journal}")
    stopped = _stopped_lines(summary)
    return lines + (stopped if summary.journal_kept else stopped[:-1])


def _cli() -> Any:
    """Build the typer application (typer is imported only when the CLI runs)."""
    import typer

    app = typer.Typer(
        add_completion=True,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
        help="Run a file of tasks across SSH hosts and merge the results into one file.",
    )

    def show_version(value: bool) -> None:
        """Print the version and exit."""
        if value:
            typer.echo(f"sshfan {__version__}")
            raise typer.Exit()

    # Hosts on the command line: the same options for run, check and all.
    def host_list_option(*names: str, metavar: str, text: str) -> Any:
        """A repeatable option naming hosts or host patterns (-S, --slf, --only, --exclude)."""
        return typer.Option(None, *names, metavar=metavar, help=text)

    def sshlogin_option() -> Any:
        """-S/--sshlogin, GNU parallel's."""
        return host_list_option(
            "--sshlogin",
            "-S",
            metavar="LOGINS",
            text="Hosts as GNU parallel writes them, comma-separated: host, user@host:port, "
            "N/host (N slots), ':' (this machine), ranges such as web[01-12]; repeatable; "
            "--hosts' defaults apply.",
        )

    def slf_option() -> Any:
        """--slf/--sshloginfile, GNU parallel's."""
        text = "Hosts from a GNU parallel sshloginfile (one sshlogin a line); repeatable."
        return host_list_option("--sshloginfile", "--slf", metavar="FILE", text=text)

    def only_option() -> Any:
        """--only: a subset of the hosts."""
        text = "Only the hosts whose name matches a glob (web*, db[1-3]); repeatable."
        return host_list_option("--only", metavar="PATTERN", text=text)

    def exclude_option() -> Any:
        """--exclude: leave hosts out."""
        text = "Leave out the hosts whose name matches a glob; repeatable."
        return host_list_option("--exclude", metavar="PATTERN", text=text)

    @app.callback()
    def main_options(
        version: bool = typer.Option(
            False, "--version", callback=show_version, is_eager=True, help="Show the version."
        ),
    ) -> None:
        """sshfan: run a file of tasks across SSH hosts; merge results into one file."""

    @app.command()
    def run(
        tasks: str = typer.Argument(
            ..., metavar="TASKS", help="Tasks file, one shell command per line ('-': stdin)."
        ),
        hosts: str | None = typer.Option(
            None,
            "--hosts",
            "-H",
            metavar="HOSTS",
            help="Hosts file (TOML). Default: this machine, a slot per CPU.",
        ),
        sshlogin: list[str] | None = sshlogin_option(),
        sshloginfile: list[str] | None = slf_option(),
        only: list[str] | None = only_option(),
        exclude: list[str] | None = exclude_option(),
        onall: bool = typer.Option(
            False,
            "--onall",
            help="Run every task on every host, a host's one at a time (GNU parallel's); "
            "output per host, in host order.",
        ),
        nonall: bool = typer.Option(
            False,
            "--nonall",
            help="TASKS is one command: run it on every host (GNU parallel's; see sshfan all).",
        ),
        output: str | None = typer.Option(
            None,
            "--output",
            "-o",
            metavar="OUTPUT",
            help="Merged output file ('-': stdout). Default: TASKS stem + .out",
        ),
        fmt: str = typer.Option(
            "text", "--format", "-f", metavar="FORMAT", help="Output format: text or jsonl."
        ),
        command: str | None = typer.Option(
            None,
            "--command",
            "-c",
            metavar="TEMPLATE",
            help="Template: each line becomes its arguments, as in GNU parallel: {} the "
            "quoted line, {.} {/} {//} {/.}, {1}..{n} (columns), {#} seq, {%} slot; "
            "without any the line is appended.",
        ),
        colsep: str | None = typer.Option(
            None,
            "--colsep",
            "-C",
            metavar="REGEX",
            help="--command: cut each line into columns {1}..{n} at REGEX (trimmed).",
        ),
        pipe: bool = typer.Option(
            False,
            "--pipe",
            help="TASKS is data: cut it into chunks, each fed on stdin to one run of --command.",
        ),
        lines: int | None = typer.Option(
            None, "--lines", "-N", metavar="N", help="--pipe: N lines per chunk (parallel's -N)."
        ),
        block: str = typer.Option(
            "1M",
            "--block",
            metavar="SIZE",
            help="--pipe: chunks of whole lines up to SIZE bytes; a longer line goes whole. "
            "1k is 1000, 1K 1024 (also m M g G), as in GNU parallel.",
        ),
        slots: str | None = typer.Option(
            None,
            "--slots",
            "-j",
            metavar="N",
            help="Tasks at once on every host (overrides the hosts file); +N, -N, N%: "
            "that many more, fewer, that share of each host's CPUs (at least 1), as GNU parallel.",
        ),
        timeout: str | None = typer.Option(
            None,
            "--timeout",
            metavar="SECONDS",
            help="Kill a task (its whole process group) after SECONDS (or 1m30s, 2h, 1d,"
            " as GNU parallel).",
        ),
        retries: int = typer.Option(
            0,
            "--retries",
            metavar="N",
            help="Try a failing task up to N times in all, as GNU parallel counts (0 and 1: once).",
        ),
        halt_on_error: bool = typer.Option(
            False, "--halt-on-error", help="Short for --halt soon,fail=1."
        ),
        workdir: str | None = typer.Option(
            None,
            "--workdir",
            "--wd",
            metavar="DIR",
            help="Run tasks in DIR on every host (created if missing). '.': here, and on "
            "remote hosts the same path below home. Default: here on this machine, "
            "the login directory on remote hosts.",
        ),
        shell: str | None = typer.Option(
            None,
            "--shell",
            metavar="SHELL",
            help="Run each task as SHELL -c TASK on every host (default /bin/sh), e.g. bash.",
        ),
        halt: str | None = typer.Option(
            None,
            "--halt",
            metavar="WHEN,WHY=N",
            help="As GNU parallel: once N (or N%) tasks fail|success|done, start no new task; "
            "soon: let the running ones end; now: kill them. E.g. soon,fail=1, now,success=1.",
        ),
        speculate: bool = typer.Option(
            False,
            "--speculate",
            help="At the end, copy a task running far past the usual time to an idle host; "
            "the first copy to finish wins, the other is killed (tasks may run twice).",
        ),
        tag: bool = typer.Option(
            False, "--tag", help="Text output: prefix each line with the task's line and TAB."
        ),
        tagstring: str | None = typer.Option(
            None,
            "--tagstring",
            metavar="STR",
            help="Text output: prefix each line with STR and TAB; replacement strings "
            "and {host} are filled in (e.g. '{host} {#}').",
        ),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="Print the command each task would run; run nothing."
        ),
        joblog: str | None = typer.Option(
            None,
            "--joblog",
            metavar="FILE",
            help="Also write GNU parallel's tab-separated joblog to FILE.",
        ),
        # -- files, as GNU parallel moves them --
        results: str | None = typer.Option(
            None,
            "--results",
            "--res",
            metavar="DIR",
            help="Also write each task's stdout, stderr, seq, exitval in DIR/1/LINE/"
            " (with --colsep DIR/1/COL1/2/COL2/).",
        ),
        transferfile: list[str] | None = typer.Option(
            None,
            "--transferfile",
            "--tf",
            metavar="TEMPLATE",
            help="Send this file to an SSH worker before the task (e.g. {}). Repeatable.",
        ),
        transfer: bool = typer.Option(False, "--transfer", help="Short for --transferfile {}."),
        return_: list[str] | None = typer.Option(
            None,
            "--return",
            metavar="TEMPLATE",
            help="Fetch this file from an SSH worker after the task (e.g. {.}.out). Repeatable.",
        ),
        cleanup: bool = typer.Option(
            False, "--cleanup", help="Remove transferred, returned and base files on workers."
        ),
        trc: list[str] | None = typer.Option(
            None,
            "--trc",
            metavar="TEMPLATE",
            help="--transferfile {} --return TEMPLATE --cleanup, as in GNU parallel.",
        ),
        basefile: list[str] | None = typer.Option(
            None,
            "--basefile",
            "--bf",
            metavar="FILE",
            help="Send FILE to each SSH worker once, before its first task. Repeatable.",
        ),
        resume: bool = typer.Option(False, "--resume", help="Skip tasks already in the journal."),
        resume_failed: bool = typer.Option(
            False,
            "--resume-failed",
            help="As --resume, and run the tasks the journal has as failed again (GNU parallel's).",
        ),
        journal: str | None = typer.Option(
            None, "--journal", metavar="FILE", help="Journal path. Default: OUTPUT + .journal"
        ),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
        keep_order: bool = typer.Option(
            False,
            "--keep-order",
            "-k",
            help="GNU parallel's -k, accepted and needed by no run: the output is always in "
            "task order.",
        ),
    ) -> None:
        """Run every task in TASKS on the hosts; write results in task order."""
        try:
            if fmt not in _FORMATS:
                raise UsageError(f"--format: unknown format {fmt!r} (choose text or jsonl)")
            block_size = _parse_size(block)  # the rest is checked by RunOptions
            jobs, jobs_rule = _parse_jobs(slots)
            if output is None:
                output = "-" if tasks == "-" or nonall else Path(tasks).stem + ".out"
            sources = HostSources(
                hosts, sshlogin or [], sshloginfile or [], only or [], exclude or []
            )
            logins = [p for value in sources.sshlogins for p in split_outside_brackets(value)]
            if tasks == "-" and "-" in [*sources.sshloginfiles, *logins]:
                raise UsageError("sshlogins from stdin ('-'): stdin holds the tasks (TASKS is -)")
            specs = load_host_sources(sources)
            opts = RunOptions(
                tasks,
                specs,
                output,
                fmt=fmt,
                resume=resume or resume_failed,
                resume_failed=resume_failed,
                timeout=_parse_seconds(timeout),
                retries=retries - 1 if retries > 0 else retries,  # N tries: N - 1 more
                journal=journal,
                slots=jobs,
                cpu_slots=jobs_rule,
                halt_on_error=halt_on_error,
                halt=HaltPolicy.parse(halt) if halt is not None else None,
                workdir=_check_workdir(workdir),
                shell=shell,
                tag=tag,
                joblog=joblog,
                command=command,
                pipe=pipe,
                lines=lines,
                block=block_size,
                colsep=colsep,
                tagstring=tagstring,
                results=results,
                files=FileOptions(
                    transfer=tuple(
                        dict.fromkeys([*(transferfile or ()), *(["{}"] if trc or transfer else [])])
                    ),
                    returns=tuple(dict.fromkeys([*(return_ or ()), *(trc or ())])),
                    cleanup=cleanup or bool(trc),
                    basefiles=tuple(basefile or ()),
                ),
                speculate=speculate,
                onall=onall or nonall,
                nonall=nonall,
                sources=sources,
            )
            _check_file_options(opts)
            if speculate and opts.files:
                raise UsageError(
                    "--speculate cannot be combined with --transferfile, --return or --basefile"
                )
            if speculate and opts.onall:
                raise UsageError("--speculate cannot be combined with --onall or --nonall")
            if dry_run and opts.onall:
                raise UsageError("--dry-run cannot be combined with --onall or --nonall")
            if nonall:
                code = _one_command(opts, compact=False)
            elif dry_run:
                code = dry_run_tasks(opts, _stdout())
            else:
                code = _run_command(opts, progress=not no_progress and sys.stderr.isatty())
        except SshfanError as exc:
            print(f"sshfan: error: {exc}", file=sys.stderr)
            code = exc.exit_code
        raise typer.Exit(code)

    @app.command("all", context_settings={"allow_interspersed_args": False})
    def all_hosts(
        command: list[str] = typer.Argument(
            ..., metavar="COMMAND...", help="The command (its words joined by spaces, as ssh)."
        ),
        hosts: str | None = typer.Option(
            None, "--hosts", "-H", metavar="HOSTS", help="Hosts file (TOML)."
        ),
        sshlogin: list[str] | None = sshlogin_option(),
        sshloginfile: list[str] | None = slf_option(),
        only: list[str] | None = only_option(),
        exclude: list[str] | None = exclude_option(),
        gather: bool = typer.Option(
            False,
            "--gather",
            "-b",
            help="Print the output of hosts that printed the same once, under their names "
            "(clush -b, dshbak -c).",
        ),
        output: str = typer.Option(
            "-", "--output", "-o", metavar="OUTPUT", help="Output file. Default: stdout."
        ),
        fmt: str = typer.Option(
            "text", "--format", "-f", metavar="FORMAT", help="Output format: text or jsonl."
        ),
        timeout: str | None = typer.Option(
            None, "--timeout", metavar="SECONDS", help="Kill the command after SECONDS (or 1m30s)."
        ),
        resume: bool = typer.Option(
            False, "--resume", help="Run only on the hosts the journal has no result from."
        ),
        journal: str | None = typer.Option(
            None, "--journal", metavar="FILE", help="Journal path. Default: OUTPUT + .journal"
        ),
    ) -> None:
        """Run one command on every host; print each host's output, in host order."""
        try:
            if fmt not in _FORMATS:
                raise UsageError(f"--format: unknown format {fmt!r} (choose text or jsonl)")
            if gather and fmt != "text":
                raise UsageError("--gather is for text output, not --format jsonl")
            if not (hosts or sshlogin or sshloginfile):
                raise UsageError("all: give the hosts: --hosts FILE, -S or --slf")
            sources = HostSources(
                hosts, sshlogin or [], sshloginfile or [], only or [], exclude or []
            )
            specs = load_host_sources(sources)
            style = "jsonl" if fmt == "jsonl" else "gather" if gather else "lines"
            opts = RunOptions(
                " ".join(command),
                specs,
                output,
                fmt=style,
                resume=resume,
                timeout=_parse_seconds(timeout),
                journal=journal,
                onall=True,
                sources=sources,  # watched, as for run --onall: a host that joins runs it too
            )
            code = _one_command(opts, compact=True)
        except SshfanError as exc:
            print(f"sshfan: error: {exc}", file=sys.stderr)
            code = exc.exit_code
        raise typer.Exit(code)

    @app.command()
    def results(
        output: str = typer.Argument(
            ..., metavar="OUTPUT", help="The run's output file (its journal is beside it)."
        ),
        failed: bool = typer.Option(False, "--failed", help="Only tasks that failed."),
        fmt: str = typer.Option(
            "table", "--format", "-f", metavar="FORMAT", help="table (default) or jsonl."
        ),
        journal: str | None = typer.Option(
            None, "--journal", metavar="FILE", help="Journal path. Default: OUTPUT + .journal"
        ),
    ) -> None:
        """List what a run (or an interrupted run) recorded, without running anything.

        Exit status: 0 if no task listed failed, 1 if one did, 2 if there is no journal."""
        try:
            if fmt not in ("table", "jsonl"):
                raise UsageError(f"--format: unknown format {fmt!r} (choose table or jsonl)")
            path = Path(journal or output + ".journal")
            new = path.with_name(path.name + ".new")  # a run yet to record its first task
            if not path.is_file() and new.is_file():
                path = new
            if not path.is_file():
                raise UsageError(f"{path}: no journal here (was {output} written by sshfan run?)")
            code = _print_results(path, failed, fmt)
        except SshfanError as exc:
            print(f"sshfan: error: {exc}", file=sys.stderr)
            code = exc.exit_code
        raise typer.Exit(code)

    @app.command()
    def check(
        hosts: str | None = typer.Option(
            None, "--hosts", "-H", metavar="HOSTS", help="Hosts file (TOML)."
        ),
        sshlogin: list[str] | None = sshlogin_option(),
        sshloginfile: list[str] | None = slf_option(),
        only: list[str] | None = only_option(),
        exclude: list[str] | None = exclude_option(),
    ) -> None:
        """Connect to every host and report Python, CPUs, slots and round-trip time."""
        try:
            if not (hosts or sshlogin or sshloginfile):
                raise UsageError("check: give the hosts: --hosts FILE, -S or --slf")
            specs = load_host_sources(
                HostSources(hosts, sshlogin or [], sshloginfile or [], only or [], exclude or [])
            )
            preflight(specs, hosts or "hosts")
        except SshfanError as exc:
            print(f"sshfan: error: {exc}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        rows = asyncio.run(check_hosts(specs))
        print(
            f"{'host':<20} {'status':<10} {'python':<8} {'cpus':>4} {'slots':>5} "
            f"{'rtt ms':>7}  detail"
        )
        for row in rows:
            if row.ok:
                detail = f"{row.hostname}, ready in {row.connect_s:.2f} s"
                line = (
                    f"{row.name:<20} {'ok':<10} {row.python:<8} {row.cpus:>4} {row.slots:>5} "
                    f"{row.rtt_ms:>7.2f}  {detail}"
                )
            else:
                line = (
                    f"{row.name:<20} {'FAILED':<10} {'-':<8} {'-':>4} {'-':>5} {'-':>7}  "
                    f"{row.reason}"
                )
            print(_printable(line))
        failed = sum(1 for row in rows if not row.ok)
        if failed:
            print(f"sshfan: {failed} of {len(rows)} hosts failed", file=sys.stderr)
        raise typer.Exit(1 if failed else 0)

    return app


class _Progress:
    """The tqdm bar on stderr: done / total, elapsed, rate, ETA, then what failed, what runs
    and what each host has done; redrawn at least once a second, long tasks or not."""

    HOSTS_SHOWN = 8  # per-host counts on the bar, at most
    TICK = 0.5  # seconds between redraws when no task finishes

    def __init__(self) -> None:
        """Open the bar (its total is set when the run knows it)."""
        from tqdm import tqdm

        class _Bar(tqdm):  # type: ignore[type-arg]
            """tqdm without its monitor thread: the bar is redrawn on a timer (_tick), and
            with no thread running, local stubs can be forked (_may_fork_stub)."""

            monitor_interval = 0

        self.bar = _Bar(total=None, unit="task", file=sys.stderr, dynamic_ncols=True, leave=False)
        self.run: _Run | None = None
        self._shown = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def started(self, run: _Run) -> None:
        """The run is set up: show its total, and start redrawing on a timer."""
        self.run = run
        self.bar.total = max(0, run.summary.total - run.summary.resumed) or None
        self._tick()

    def _tick(self) -> None:
        """Redraw (elapsed time and counts move while long tasks run) and come back."""
        self._show()
        with contextlib.suppress(RuntimeError):  # no loop: the run is over
            self._timer = asyncio.get_running_loop().call_later(self.TICK, self._tick)

    def counts(self, final: bool = False) -> str:
        """The bar's postfix: failed, running (not handed out: running), done per host.

        Each number is padded to the width of the total, so the bar keeps its width."""
        run = self.run
        if run is None:
            return ""
        summary = run.summary
        width = len(str(summary.total))
        failed = summary.failed + summary.timed_out
        running = 0
        for session in [] if final else run.sessions:
            if session.state in (HostState.READY, HostState.CLOSING):
                running += min(len(session.in_flight), session.window.slots)
        names = summary.hosts[: self.HOSTS_SHOWN]
        done = " ".join(
            f"{n}={(summary.per_host[n].count if n in summary.per_host else 0):>{width}}"
            for n in names
        )
        more = (
            f" +{len(summary.hosts) - len(names)} hosts" if len(summary.hosts) > len(names) else ""
        )
        return f"failed={failed:>{width}} running={running:>{width}} done: {done}{more}"

    def _show(self, final: bool = False) -> None:
        """Redraw the bar with the counts as they are now (FINAL: the run is over)."""
        self._shown = time.monotonic()
        if self.run is not None:  # (its total grows when an --onall host joins)
            self.bar.total = max(0, self.run.summary.total - self.run.summary.resumed) or None
        self.bar.set_postfix_str(self.counts(final), refresh=False)
        self.bar.refresh()

    def done(self, result: TaskResult) -> None:
        """One task finished: advance (tqdm redraws at most every 0.1 s), counts with it."""
        now = time.monotonic()
        if now - self._shown > 0.1:
            self._shown = now
            self.bar.set_postfix_str(self.counts(), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        """Draw the last frame (the summary's counts, nothing running), then remove the bar."""
        if self._timer is not None:
            self._timer.cancel()
        if self.run is not None:
            summary = self.run.summary
            self.bar.n = summary.ok + summary.failed + summary.timed_out
            self._show(final=True)
        self.bar.close()


def dry_run_tasks(opts: RunOptions, out: IO[bytes]) -> int:
    """--dry-run: write each task's command as it would run, a line each, in seq order, as
    `parallel --dry-run -k` does; run nothing, and write no output file or journal.

    {%} is the slot task N would take if all tasks took as long: (N-1) mod SLOTS + 1, SLOTS
    the slots of all hosts (a remote host's `slots = "auto"` counts as one: its CPUs are
    not known without connecting). parallel's own dry run numbers them by timing: its
    answer varies from run to run, so there is no same answer to give."""
    slot_hosts: list[str] = []  # the host of each slot, for {host} in a --tagstring
    for spec in opts.hosts:
        count = opts.slots or spec.slots
        if opts.cpu_slots and spec.local:
            count = slots_for_cpus(opts.cpu_slots, local_cpus())
        elif count is None or opts.cpu_slots:
            count = local_cpus() if spec.local else 1
        slot_hosts += [spec.name] * count
    slots = len(slot_hosts)
    tag = line_tagger(opts)
    if opts.results:
        return 0  # parallel --dry-run --results prints nothing (its output goes in files)
    with tempfile.TemporaryDirectory(prefix="sshfan-") as tmp:
        path = Path(opts.tasks)
        if _is_stream(opts.tasks):
            path = _spool_stdin(Path(tmp) / "tasks", opts.tasks)
        template = command_template(opts)
        done: array.array[int] = array.array("q")
        if template is not None and opts.pipe:
            scan_chunks(path, opts.lines, opts.block)
            tasks = read_chunks(path, None, done, template, opts.lines, opts.block)
        else:
            scan_tasks(path, template, _input_name(opts.tasks))
            tasks = read_tasks(path, None, done, template)
        for index, task in enumerate(tasks):
            slot = index % max(slots, 1) + 1
            command = task.command.replace(SLOT_MARK, str(slot))
            if tag is None:
                out.write(as_bytes(command) + b"\n")
                continue
            # As parallel: the command is the job's output, tagged line by line.
            shown = TaskResult(task.seq, command, slot_hosts[slot - 1], 0, None, False, 0.0, 0)
            shown.arg, shown.slot = task.arg, slot
            _write_tagged(out, tag(shown), iter([as_bytes(command) + b"\n"]))
        out.flush()
    return 0


def _run_command(opts: RunOptions, progress: bool) -> int:
    """`sshfan run`: check inputs, run, print the summary; return the exit code."""
    if opts.tasks != "-" and Path(opts.tasks).is_dir():
        raise UsageError(f"{opts.tasks}: is a directory, not a tasks file")
    if opts.tasks != "-" and not Path(opts.tasks).exists():
        raise UsageError(f"{opts.tasks}: tasks file not found")
    if any(spec.known_hosts is False and not spec.local for spec in opts.hosts):
        print(
            "sshfan: warning: host key checking is off for some hosts (known_hosts = false)",
            file=sys.stderr,
        )
    if opts.output != "-":
        _check_writable_dir(Path(opts.output), "output")
    else:
        _stdout()
    bar = _Progress() if progress else None
    out: IO[bytes] = _LazyOutput(opts.output)
    summary: RunSummary | None = None
    # What exists now (modules, classes, the parsed hosts) lives for the whole run: take
    # it out of the collector's sight, so full collections stop walking it (~1.5%).
    gc.freeze()
    try:
        summary = asyncio.run(
            run_async(
                opts,
                out,
                _say if bar else _print_err,
                bar.done if bar else lambda result: None,
                on_start=bar.started if bar else lambda run: None,
            )
        )
    finally:
        if bar is not None:
            bar.close()
        try:
            out.close()
        except OSError as exc:
            if summary is not None and not summary.fatal:
                # (Otherwise reported already: the run ended on this file's error.)
                summary.fatal = _write_error(
                    exc if exc.filename else OSError(exc.errno, exc.strerror, opts.output)
                )
                summary.complete = False
    for line in format_summary(summary):
        print(_printable(line), file=sys.stderr)
    return summary.exit_code


def _one_command(opts: RunOptions, compact: bool) -> int:
    """`sshfan all` and `run --nonall`: run the command in OPTS.tasks once on every host.

    The command goes in a scratch tasks file, so that it runs and resumes as a one-line
    --onall run. With the output on stdout and no --journal the journal is scratch too
    (a pdsh-like command should not leave files behind), so --resume needs either."""
    if "\n" in opts.tasks or not opts.tasks.strip():
        raise UsageError("the command must be one non-empty line")
    kept = opts.journal is not None or not (opts.output == "-" or _in_place_output(opts.output))
    if opts.resume and not kept:
        raise UsageError("--resume needs the earlier run's journal: give -o FILE or --journal")
    if opts.output != "-":
        _check_writable_dir(Path(opts.output), "output")
    else:
        _stdout()
    # In memory where there is such a directory: a scratch journal needs no fsync to disk.
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else None
    scratch = Path(tempfile.mkdtemp(prefix="sshfan-all-", dir=shm))
    try:
        tasks = scratch / "command"
        tasks.write_text(opts.tasks + "\n", encoding="utf-8")
        journal = opts.journal or (opts.output + ".journal" if kept else str(scratch / "journal"))
        opts = dataclasses.replace(opts, tasks=str(tasks), journal=journal)
        failures: dict[str, TaskResult] = {}

        def on_done(result: TaskResult) -> None:
            """Keep each host's failure; show its stderr as pdsh does (host: line)."""
            if not result.ok:
                failures.setdefault(result.host, result)
            if opts.fmt in ("lines", "gather") and result.stderr:
                err = io.BytesIO()
                _write_host_lines(err, result.host, iter([result.stderr]))
                sys.stderr.buffer.write(err.getvalue())
                sys.stderr.buffer.flush()

        out: IO[bytes] = _LazyOutput(opts.output)
        summary: RunSummary | None = None
        try:
            summary = asyncio.run(run_async(opts, out, _print_err, on_done, whole=True))
        except UsageError as exc:  # name the command, not the scratch file it went in
            changed = str(exc).replace(f"a different tasks file than {tasks}", "another command")
            raise UsageError(changed) from None
        finally:
            try:
                out.close()
            except OSError as exc:
                if summary is not None and not summary.fatal:
                    summary.fatal = _write_error(
                        exc if exc.filename else OSError(exc.errno, exc.strerror, opts.output)
                    )
                    summary.complete = False
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary.journal_kept = kept
    lines = format_onall_summary(summary, failures) if compact else format_summary(summary)
    for line in lines:
        print(line, file=sys.stderr)
    return summary.exit_code


def _stdin() -> IO[bytes]:
    """Stdin's bytes, or a usage error when it was closed before sshfan started."""
    if sys.stdin is None:  # (the shell's <&-: Python leaves sys.stdin None)
        raise UsageError("stdin is closed: nothing to read from '-'")
    return sys.stdin.buffer


def _open_std_fds() -> None:
    """As OpenSSH's sanitise_stdfd: a closed fd 0, 1 or 2 is opened on /dev/null, so no
    file sshfan opens takes its number (and output meant for it). sys.stdin and sys.stdout
    stay None (_stdin, _stdout refuse them); text for a closed stderr is dropped, where
    print() would have sent it to stdout, into the merged output of `-o -`."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - fd 2, for the process


def _stdout() -> IO[bytes]:
    """Stdout's bytes, or a usage error when it was closed before sshfan started."""
    if sys.stdout is None:  # (the shell's >&-: Python leaves sys.stdout None)
        raise UsageError("stdout is closed: nowhere to write the output (give -o FILE)")
    return sys.stdout.buffer


class _LazyOutput(io.RawIOBase):
    """The merged output file, created at the first write or close (after inputs are checked)."""

    def __init__(self, path: str) -> None:
        """Remember where the output goes ('-': stdout)."""
        super().__init__()
        self.path = path
        self._file: IO[bytes] | None = None
        self.keep = False  # open it without emptying it (rendered over in place)

    def _target(self) -> IO[bytes]:
        """Open the output on first use."""
        if self._file is None:
            if self.path == "-":
                self._file = _stdout()
            else:
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
                except OSError as exc:  # (checked before the run: this is a change since)
                    raise OSError(exc.errno, exc.strerror, self.path) from None
                try:
                    _lock_output(fd, self.path)  # before emptying it
                    if not self.keep and stat.S_ISREG(os.fstat(fd).st_mode):
                        os.ftruncate(fd, 0)
                except OSError as exc:
                    os.close(fd)
                    raise OSError(exc.errno, exc.strerror, self.path) from None
                self._file = open(fd, "wb")  # noqa: SIM115 - closed in close()
        return self._file

    def writable(self) -> bool:
        """It is an output."""
        return True

    def fileno(self) -> int:
        """The output's file descriptor (opening it if need be)."""
        return self._target().fileno()

    def write(self, data: Any) -> int:
        """Write through to the file."""
        return self._target().write(data)

    def flush(self) -> None:
        """Flush the file if it is open."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and close the file (stdout stays open); raise a write error it meets."""
        if not self.closed and self._file is not None:
            file, self._file = self._file, None
            try:
                file.flush()
            finally:
                if self.path != "-":
                    file.close()
        super().close()


_RESULTS_FILES = (".csv", ".tsv", ".json")  # --results names that parallel writes as one file


def _check_file_options(opts: RunOptions) -> None:
    """Refuse (exit 2) file options that cannot work, before anything is opened."""
    if opts.results is not None:
        if opts.pipe:
            raise UsageError("--results cannot be used with --pipe (its chunks have no names)")
        if opts.onall:
            # Each host's run of a line would write the line's one directory over the
            # last host's (GNU parallel 20221122 writes none there): refused, not lost.
            raise UsageError(
                "--results cannot be used with --onall or --nonall (a line's directory holds "
                "one task's result, not every host's); --format jsonl has them all"
            )
        if not opts.results:
            raise UsageError("--results: needs a directory")
        if _REPLACEMENT.search(opts.results) or opts.results.lower().endswith(_RESULTS_FILES):
            # GNU parallel writes other layouts for these; not the same answer: refused.
            raise UsageError(
                f"--results {opts.results}: only a plain directory is supported "
                "(no {} names, no .csv/.tsv/.json files)"
            )
        try:
            os.makedirs(opts.results, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--results: cannot create {opts.results}: {exc.strerror}") from None
    files = opts.files
    if opts.pipe and (files.transfer or files.returns):
        raise UsageError("--transferfile/--return cannot be used with --pipe (no file names)")
    for name, templates in (("--transferfile", files.transfer), ("--return", files.returns)):
        if any(not template.strip() for template in templates):
            raise UsageError(f"{name}: needs a file name template")
        if any("{%}" in template for template in templates):
            # The slot is known only once the stub starts the task, after files are sent.
            raise UsageError(f"{name}: {{%}} (the job slot) cannot name a file")
    for name in files.basefiles:
        local = transfer_paths(name)[0]
        if not os.path.isfile(local) or not os.access(local, os.R_OK):
            raise UsageError(f"--basefile {name}: no readable file {local}")


BLOCK_MAX = 2**31 - 1  # GNU parallel's ceiling too (it warns and uses 2G-1 above it)


_CPU_SLOTS = re.compile(r"[+-]\d+|\d+(?:\.\d+)?%")  # -j relative to the CPUs


def _parse_jobs(text: str | None) -> tuple[int | None, str | None]:
    """-j as GNU parallel reads it: N slots, or +N, -N, N% of each host's CPUs (the rule,
    applied once the CPUs are known). 0 (parallel: as many as possible) is refused."""
    if text is None:
        return None, None
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return int(text), None
    if _CPU_SLOTS.fullmatch(text):
        return None, text
    raise UsageError(f"--slots: not a number of slots: {text!r} (N, or +N, -N, N% of the CPUs)")


def _check_workdir(workdir: str | None) -> str | None:
    """Refuse --workdir values sshfan does not take (exit 2)."""
    if workdir is None:
        return None
    if not workdir.strip():
        raise UsageError("--workdir: needs a directory")
    if workdir == "...":
        raise UsageError(
            "--workdir ...: GNU parallel's per-task temporary directories are not supported; "
            "use --workdir DIR or --workdir ."
        )
    return workdir


def _parse_seconds(text: str | None) -> float | None:
    """A --timeout as GNU parallel reads it: seconds, or with units s m h d (1m30s, 1.5h,
    2d; a number after the last unit is seconds, as in parallel's 1m30)."""
    if text is None:
        return None
    spec = text.strip()
    with contextlib.suppress(ValueError):
        return float(spec)  # a plain number (RunOptions refuses those not above 0)
    units = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+\.?\d*|\.\d+)([smhd]?)", spec, re.IGNORECASE)
    if not spec or "".join(number + unit for number, unit in parts) != spec:
        hint = " (parallel's N% of the median runtime is not supported)" if "%" in spec else ""
        raise UsageError(f"--timeout: not a duration: {text!r} (e.g. 30, 1.5, 1m30s, 2h){hint}")
    return sum(float(number) * units[unit.lower()] for number, unit in parts)


def _parse_size(text: str) -> int:
    """A --block size as GNU parallel reads it: 1k is 1000, 1K 1024 (also m/M ... p/P)."""
    number, scale = text.strip(), 1
    if number and number[-1].lower() in "kmgtp":
        power = "kmgtp".index(number[-1].lower()) + 1
        scale = (1000 if number[-1].islower() else 1024) ** power
        number = number[:-1]
    try:
        value = float(number) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UsageError(f"--block: not a size: {text!r} (e.g. 512k, 1M, 3.1k)")
    size = int(value)
    if size < 1:
        raise UsageError(f"--block: must be at least 1 byte, not {text}")
    if size > BLOCK_MAX:
        raise UsageError(f"--block: at most 2G-1 bytes (as GNU parallel), not {text}")
    return size


def _print_results(path: Path, failed_only: bool, fmt: str) -> int:
    """Print the journal's finished tasks in seq order; 1 if any shown task failed."""
    out = _stdout()
    journal, header, done = Journal.open_read(path)  # a run may be writing it: never cut
    shown = failures = 0
    try:
        if fmt == "table":
            out.write(f"{'seq':>6} {'host':<16} {'exit':>5} {'seconds':>8}  task\n".encode())
        for offset in done:
            if offset < 0:
                continue
            result = journal.load_result(offset)
            if failed_only and result.ok:
                continue
            shown += 1
            failures += not result.ok
            if fmt == "jsonl":
                render_result(out, "jsonl", result, journal)
                continue
            status = "T/O" if result.timed_out else str(result.exit_code)
            line = f"{result.seq:>6} {result.host:<16} {status:>5} {result.duration_s:>8.3f}  "
            out.write(as_bytes(_printable(line + result.command) + "\n"))
            if not result.ok:
                tail = _stderr_tail(result, journal, 2000).decode("utf-8", "replace")
                for text in tail.strip().splitlines()[-3:]:
                    out.write(f"{'':>6} stderr: {_printable(text)}\n".encode())
    finally:
        journal.close()
    total = header.get("count", "?")
    if "onall" in header and isinstance(total, int):  # every task once on each host
        total *= len(header["onall"])
    recorded = sum(offset >= 0 for offset in done)
    print(f"sshfan: {shown} shown; {recorded} of {total} tasks recorded in {path}", file=sys.stderr)
    return 1 if failures else 0


def _stderr_tail(result: TaskResult, journal: Journal, size: int) -> bytes:
    """The last SIZE bytes of a task's stderr, read back from its last pieces only (its
    stdout may be gigabytes)."""
    parts = [result.stderr]
    have = len(result.stderr)
    for offset, stream, length in reversed(result.pieces):
        if have >= size:
            break
        if stream == 2:
            take = min(length, size - have)
            parts.append(journal.read(offset + length - take, take))
            have += take
    return b"".join(reversed(parts))[-size:]


def _print_err(line: str) -> None:
    """Print one line on stderr (control characters escaped)."""
    print(_printable(line), file=sys.stderr, flush=True)


def main() -> None:
    """Console entry point: usage errors become one line on stderr and exit 2."""
    _open_std_fds()
    app = _cli()
    try:
        code = app(prog_name="sshfan", standalone_mode=False)  # also under python -m sshfan
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        # typer's (click's) own errors: unknown option, a value of the wrong type, ...
        if not hasattr(exc, "format_message") or not hasattr(exc, "exit_code"):
            # Not the user's mistake and not a host's: a bug in sshfan. The run stopped
            # without counting itself complete, so its journal is kept: exit 3, as for
            # any run that could not finish, with the traceback for the bug report.
            import traceback

            traceback.print_exc()
            print(
                f"sshfan: internal error: {type(exc).__name__}: {exc}; this is a bug in "
                "sshfan (the traceback above says where); the journal is kept for --resume",
                file=sys.stderr,
            )
            sys.exit(3)
        message = exc.format_message()
        if message:  # (no arguments at all: the help was printed and there is nothing to add)
            command = getattr(getattr(exc, "ctx", None), "command_path", "sshfan")
            print(f"sshfan: error: {message} (see '{command} --help')", file=sys.stderr)
        code = exc.exit_code
    # Every file is closed by now. What is left is the interpreter's exit (where _console
    # cannot skip it, or main() is called otherwise), whose last full collection walks all
    # imported or made since run's freeze (asyncssh, the connections): most of a run's tail
    # after its last result; frozen, it is skipped.
    gc.freeze()
    sys.exit(code if isinstance(code, int) else 0)


def _console() -> NoReturn:
    """The `sshfan` command: main(), then leave without tearing the interpreter down.

    When main() ends, every file the run wrote is closed and its errors are in the exit
    code. Freeing each object the head made is then work for nothing, and after a local
    stub was forked from the head, each page it writes to is first copied. What the exit
    still owes is done: stdout and stderr flushed.
    Anything unusual (a thread still running, a flush that fails) takes Python's own
    exit, which reports it as it always has."""
    try:
        main()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    if not isinstance(code, int) or threading.active_count() > 1:
        sys.exit(code)
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except BaseException:  # (Python's exit flushes again, reports it, and exits 120)
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    _console()
