"""Host keys, ssh config and SSH errors as OpenSSH has them, and the local checks before a run."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from sshd import SshServer
from support import closed_port

import sshfan


def _home_with_config(tmp_path: Path, name: str, body: str) -> tuple[Path, Path]:
    """A HOME whose ~/.ssh/config holds BODY (also written as a file for `ssh -F`)."""
    home = tmp_path / name
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    (home / ".ssh" / "config").write_text(body)
    return home, home / ".ssh" / "config"


def _alias(server: SshServer, known_hosts: Path, extra: str = "") -> str:
    """An ssh config block: alias a1 for SERVER, its keys in KNOWN_HOSTS."""
    return (
        f"Host a1\n  HostName 127.0.0.1\n  Port {server.port}\n  User {server.user}\n"
        f"  IdentityFile {server.client_key}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {known_hosts}\n{extra}"
    )


def _ssh(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real OpenSSH client with CONFIG (it reads ~ from the password file, not HOME)."""
    return subprocess.run(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", *args, "a1", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "SSH_AUTH_SOCK": ""},
    )


def _run(run_sshfan, tmp_path: Path, hosts: str, home: Path, *extra: str):
    """Run `echo hi` on HOSTS (a hosts file's text) with HOME and no ssh-agent."""
    (tmp_path / "hosts.toml").write_text(hosts)
    (tmp_path / "tasks.txt").write_text("echo hi\n")
    args = ["run", "tasks.txt", "--hosts", "hosts.toml", "-o", "out.txt", "--no-progress"]
    return run_sshfan([*args, *extra], env={"HOME": str(home), "SSH_AUTH_SOCK": ""})


def test_accept_new_records_what_openssh_records(
    sshd: SshServer, tmp_path: Path, run_sshfan
) -> None:
    """Through an ssh config alias, accept-new files the key as OpenSSH does, once; OpenSSH
    then trusts what sshfan recorded (HostKeyAlias and HashKnownHosts too)."""
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    strict = "  StrictHostKeyChecking accept-new\n"
    _home, ssh_config = _home_with_config(tmp_path, "ssh", _alias(sshd, theirs, strict))
    home, _ = _home_with_config(tmp_path, "fan", _alias(sshd, ours, strict))
    assert _ssh(ssh_config).returncode == 0
    # Two hosts behind the same alias meet the new key at once: it is recorded once.
    hosts = '[[hosts]]\nname = "x1"\naddress = "a1"\n[[hosts]]\nname = "x2"\naddress = "a1"\n'
    for _ in range(2):
        result = _run(run_sshfan, tmp_path, hosts, home)
        assert result.returncode == 0, result.stderr
        assert ours.read_text() == theirs.read_text()
    assert ours.read_text().startswith(f"[127.0.0.1]:{sshd.port} ")

    # HostKeyAlias and hashed names: OpenSSH, strict, accepts the line sshfan wrote.
    ours.unlink()
    extra = f"{strict}  HostKeyAlias box1\n  HashKnownHosts yes\n"
    home, _ = _home_with_config(tmp_path, "fan2", _alias(sshd, ours, extra))
    result = _run(run_sshfan, tmp_path, '[[hosts]]\nname = "a1"\n', home)
    assert result.returncode == 0, result.stderr
    assert ours.read_text().startswith("|1|") and len(ours.read_text().splitlines()) == 1
    strict_config = tmp_path / "strict_config"
    strict_config.write_text(_alias(sshd, ours, "  HostKeyAlias box1\n"))
    checked = _ssh(strict_config, "-o", "StrictHostKeyChecking=yes")
    assert checked.returncode == 0, checked.stderr


def test_unknown_host_hint_is_a_command_that_works(
    sshd: SshServer, tmp_path: Path, run_sshfan
) -> None:
    """ssh config's UserKnownHostsFile and StrictHostKeyChecking are honoured; the hint for an
    unknown host runs as given (ssh-keyscan reads no ssh config: it needs the address)."""
    known = tmp_path / "known"
    home, _ = _home_with_config(
        tmp_path, "home", _alias(sshd, known, "  StrictHostKeyChecking yes\n")
    )
    hosts = '[[hosts]]\nname = "a1"\n'
    refused = _run(run_sshfan, tmp_path, hosts, home)
    assert refused.returncode == 3
    assert not known.exists()  # "yes": nothing recorded
    line = next(ln for ln in refused.stderr.decode().splitlines() if "unknown host" in ln)
    command = line.split("add its key with: ", 1)[1]
    assert command.startswith(f"ssh-keyscan -p {sshd.port} 127.0.0.1 ")
    subprocess.run(["sh", "-c", command], check=True, capture_output=True, timeout=60)
    assert _run(run_sshfan, tmp_path, hosts, home).returncode == 0

    # A changed key: refused under "yes"; under "no" OpenSSH warns and goes on, so does sshfan.
    fields = known.read_text().split()
    other = "AAAAC3NzaC1lZDI1NTE5AAAAIBAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    known.write_text(f"{fields[0]} ssh-ed25519 {other}\n")
    changed = _run(run_sshfan, tmp_path, hosts, home)
    assert changed.returncode == 3 and b"does not match" in changed.stderr
    line = next(ln for ln in changed.stderr.decode().splitlines() if "does not match" in ln)
    command = line.split("remove the old key with: ", 1)[1]
    assert command.startswith(f"ssh-keygen -f {shlex.quote(str(known))} -R ")
    changed_lines = known.read_text()
    home, _ = _home_with_config(
        tmp_path, "home2", _alias(sshd, known, "  StrictHostKeyChecking no\n")
    )
    anyway = _run(run_sshfan, tmp_path, hosts, home)
    assert anyway.returncode == 0, anyway.stderr
    assert b"does not match" in anyway.stderr and b"connecting anyway" in anyway.stderr
    assert known.read_text() == changed_lines  # a changed key is not recorded over the old

    # The hint's removal command runs as given and takes the old key out.
    subprocess.run(["sh", "-c", command], check=True, capture_output=True, timeout=60)
    assert not sshfan.known_host_entries([str(known)], f"[127.0.0.1]:{sshd.port}")


def test_connect_errors_name_the_cause_and_where(
    sshd: SshServer, tmp_path: Path, run_sshfan
) -> None:
    """A refused port, a name that does not resolve, and keys the server refuses, each said
    as such with the stage and the address; nothing ran, so no --resume advice."""
    closed = closed_port()
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    hosts = (
        sshd.hosts_toml(["wrongkey"], identity=str(other))
        + f'[[hosts]]\nname = "refused"\naddress = "127.0.0.1"\nport = {closed}\n'
        + '[[hosts]]\nname = "nowhere"\naddress = "nosuch.invalid"\n'
    )
    result = _run(run_sshfan, tmp_path, hosts, tmp_path)
    assert result.returncode == 3
    err = result.stderr.decode()
    assert f"refused: connect: 127.0.0.1 port {closed}: connection refused" in err
    assert "nowhere: connect: cannot resolve nosuch.invalid" in err
    assert f"wrongkey: auth: permission denied for {sshd.user}@127.0.0.1 port {sshd.port}" in err
    assert f"keys offered: {other}" in err
    assert "--resume" not in err and "run the command again" in err


def test_local_mistakes_exit_2_and_leave_earlier_results(
    sshd: SshServer, tmp_path: Path, run_sshfan
) -> None:
    """A rerun with an identity or known_hosts file OpenSSH could not use exits 2 with one line
    naming the file, before the earlier output and journal are touched."""
    good = sshd.hosts_toml(["h1"])
    first = _run(run_sshfan, tmp_path, good, tmp_path)
    assert first.returncode == 0, first.stderr
    before = {p: (tmp_path / p).read_bytes() for p in ("out.txt", "out.txt.journal")}
    open_key = tmp_path / "open_key"
    open_key.write_bytes(sshd.client_key.read_bytes())
    open_key.chmod(0o644)
    locked = tmp_path / "locked_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "pw", "-f", str(locked)], check=True)
    key, known = str(sshd.client_key), str(sshd.known_hosts)
    cases = {
        "missing identity": (good.replace(key, key + ".gone"), key + ".gone"),
        "public key": (good.replace(key, key + ".pub"), "is a public key"),
        "open to others": (good.replace(key, str(open_key)), "UNPROTECTED PRIVATE KEY FILE"),
        "passphrase": (good.replace(key, str(locked)), "has a passphrase and no ssh-agent"),
        "known_hosts typo": (good.replace(known, known + "2"), f"known_hosts file {known}2"),
    }
    for case, (hosts, words) in cases.items():
        for extra in ((), ("--resume",)):
            result = _run(run_sshfan, tmp_path, hosts, tmp_path, *extra)
            lines = result.stderr.decode().strip().splitlines()
            assert result.returncode == 2, (case, lines)
            assert len(lines) == 1 and words in lines[0], (case, lines)
            assert lines[0].startswith("sshfan: error: hosts.toml: host h1: "), (case, lines)
            for path, data in before.items():
                assert (tmp_path / path).read_bytes() == data, (case, path)


def test_check_refuses_local_mistakes_too(sshd: SshServer, tmp_path: Path, run_sshfan) -> None:
    """`sshfan check` reports a missing identity file as bad input, naming it."""
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(sshd.hosts_toml(["h1"], identity=str(tmp_path / "nokey")))
    result = run_sshfan(["check", "--hosts", str(hosts)], env={"SSH_AUTH_SOCK": ""})
    assert result.returncode == 2
    assert f"identity file {tmp_path / 'nokey'}: No such file" in result.stderr.decode()


def test_known_hosts_lines_match_as_ssh_keygen_finds_them(tmp_path: Path) -> None:
    """Wildcards, negations, [host]:port with no fallback, hashed names, markers and case:
    the lines found for a name are those `ssh-keygen -F NAME` finds."""
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    public = " ".join(key.with_name("key.pub").read_text().split()[:2])
    to_hash = tmp_path / "to_hash"
    to_hash.write_text(f"box {public}\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(to_hash)], check=True, capture_output=True)
    hashed_box = to_hash.read_text().split()[0]
    assert hashed_box.startswith("|1|")
    lines = [
        "*.example.com,!bad.example.com",
        "[127.0.0.1]:2222",
        "127.0.0.1",
        hashed_box,
        "@revoked Box",
        "web?",
        "# web1",
        "@cert-authority *.ca",
    ]
    known = tmp_path / "known_hosts"
    known.write_text("".join(f"{line} {public}\n" for line in lines))
    names = ["good.example.com", "bad.example.com", "[127.0.0.1]:2222", "127.0.0.1"]
    names += ["[127.0.0.1]:2200", "box", "BOX", "web1", "web12", "x.ca"]
    for name in names:
        found = subprocess.run(
            ["ssh-keygen", "-F", name, "-f", str(known)], capture_output=True, text=True
        ).stdout
        theirs = [
            int(ln.split("line ")[1].split()[0]) for ln in found.splitlines() if "found" in ln
        ]
        ours = [entry.line for entry in sshfan.known_host_entries([str(known)], name)]
        assert ours == theirs, name


def test_ssh_config_resolves_as_ssh_dash_g_says(tmp_path: Path, monkeypatch) -> None:
    """HostName (with %h), Port, HostKeyAlias, UserKnownHostsFile (with tokens, or none),
    StrictHostKeyChecking and HashKnownHosts come out as `ssh -G` resolves them."""
    config = (
        "Host a1 b*\n  HostName example-%h.test\n  Port 2200\n"
        f"  UserKnownHostsFile {tmp_path}/kh-%h-%p {tmp_path}/second\n"
        "  StrictHostKeyChecking accept-new\n  HashKnownHosts yes\n"
        "Host c1\n  HostKeyAlias box\n  StrictHostKeyChecking off\n  UserKnownHostsFile none\n"
        f"Host *\n  UserKnownHostsFile {tmp_path}/default\n"
    )
    (tmp_path / ".ssh").mkdir(mode=0o700)
    (tmp_path / ".ssh" / "config").write_text(config)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ["a1", "bx", "c1", "zz"]:
        shown = subprocess.run(
            ["ssh", "-G", "-F", str(tmp_path / ".ssh" / "config"), name],
            capture_output=True,
            text=True,
            check=True,
            stdin=subprocess.DEVNULL,
        ).stdout
        g = dict(line.split(" ", 1) for line in shown.splitlines() if " " in line)
        target = sshfan.ssh_target(sshfan.HostSpec(name=name))
        assert (target.host, target.port) == (g["hostname"], int(g["port"])), name
        plain = g["hostname"] if g["port"] == "22" else f"[{g['hostname']}]:{g['port']}"
        assert target.key_name == g.get("hostkeyalias", plain), name
        user = [] if g["userknownhostsfile"] == "none" else g["userknownhostsfile"].split()
        assert target.known_hosts == (*user, *g["globalknownhostsfile"].split()), name
        assert target.record_in == (user[0] if user else None), name
        strict = {"true": "yes", "ask": "yes", "false": "no"}
        assert target.strict == strict.get(g["stricthostkeychecking"], "accept-new"), name
        assert target.hash_names == (g["hashknownhosts"] == "yes"), name


def test_ssh_config_identity_files_used_as_openssh_uses_them(
    sshd: SshServer, tmp_path: Path, run_sshfan
) -> None:
    """An IdentityFile of ssh config that is missing is skipped, one others can read is
    ignored: sshfan logs in exactly when `ssh` does."""
    open_copy = tmp_path / "open_copy"
    open_copy.write_bytes(sshd.client_key.read_bytes())
    open_copy.chmod(0o644)
    cases = {
        "missing, then good": [tmp_path / "missing", sshd.client_key],
        "open to others": [open_copy],
    }
    for case, files in cases.items():
        body = _alias(sshd, sshd.known_hosts).replace(
            f"  IdentityFile {sshd.client_key}\n", "".join(f"  IdentityFile {f}\n" for f in files)
        )
        home, config = _home_with_config(tmp_path, f"home{len(files)}", body)
        theirs = _ssh(config).returncode == 0
        ours = _run(run_sshfan, tmp_path, '[[hosts]]\nname = "a1"\n', home)
        assert (ours.returncode == 0) == theirs, (case, theirs, ours.stderr)
        assert theirs == (case == "missing, then good")


def test_proxyjump_host_keys_checked_and_recorded_as_openssh(
    sshd: SshServer, tmp_path: Path, run_sshfan
) -> None:
    """The ProxyJump host's key is looked up and recorded by its own ssh config (here
    accept-new under a HostKeyAlias), as OpenSSH does: both clients write the same lines."""

    def config(known: Path) -> str:
        """A jump host and a host behind it, both first met, both on the test server."""
        strict = "  StrictHostKeyChecking accept-new\n"
        jump = _alias(sshd, known, f"{strict}  HostKeyAlias jumpbox\n").replace("a1", "jump")
        return jump + _alias(sshd, known, f"{strict}  ProxyJump jump\n")

    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    _home, ssh_config = _home_with_config(tmp_path, "ssh", config(theirs))
    home, _ = _home_with_config(tmp_path, "fan", config(ours))
    assert _ssh(ssh_config).returncode == 0
    result = _run(run_sshfan, tmp_path, '[[hosts]]\nname = "a1"\n', home)
    assert result.returncode == 0, result.stderr
    assert ours.read_text() == theirs.read_text()
    assert [line.split()[0] for line in ours.read_text().splitlines()] == [
        "jumpbox",
        f"[127.0.0.1]:{sshd.port}",
    ]
