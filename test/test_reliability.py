"""Reliability and security of both shims with real upsd: faults, hostile input, load.

Goal of these tests (issue #7; the long versions run in bench/stress.py,
which calls the same case functions with larger numbers):

* Faults: upsd restarted under live sessions ends them cleanly and new ones
  work, with no thread or descriptor left behind; upsdTLS killed with
  SIGKILL and restarted on its port is used again by upsmonTLS without a
  restart; a peer that stops reading keeps the shim's memory bounded and is
  ended by --idle-timeout; a peer that vanishes without FIN is ended by
  --idle-timeout; certificates expired or not yet valid are refused with a
  log line that says so.
* Hostile input at both shims, before and after TLS: seeded random bytes,
  NUL and non-ASCII bytes, long lines, an HTTP request and a TLS
  ClientHello in the plaintext phase, STARTTLS injection variants, TLS 1.2
  and 1.0 ClientHellos, no shared cipher, a second handshake inside TLS, a
  client certificate from another CA.  Each gets a clear reply or a clean
  close, the daemon keeps serving, and a harness.Tap between upsdTLS and
  upsd proves upsd never sees a pre-TLS byte.
* Load, scaled down: concurrent sessions with a latency probe, short
  sessions back to back with threads and descriptors back to their
  baseline, pipelined commands delivered in order, byte for byte as upsd
  sends them on a direct session.

Each case function returns an Outcome (held, survived, lost) for the stress
table and raises AssertionError when the shims fall short.  Every success
sits beside a negative control.  The process's descriptor limit is raised
(resource.setrlimit) before any daemon starts, so the shims and upsd
inherit it.
"""

import collections
import contextlib
import os
import random
import re
import resource
import select
import socket
import ssl
import subprocess
import threading
import time
import unittest
import warnings

import harness
from harness import CLOSED_ERRORS, TIMEOUT, LineClient, wait_for

# Each case is one scenario read top to bottom (start, act, check, negative
# control); splitting it to save locals would scatter its checks.
# pylint: disable=too-many-locals

GET_STATUS = "GET VAR dummy ups.status"
STATUS = 'VAR dummy ups.status "OL"'
# Descriptors wanted for 1000 sessions: the test process holds two per
# chain session and the shims two each; upsd inherits the limit too.
NOFILE_WANTED = 65536
# upsd's own client limit (MAXCONN, default 1024) must exceed the load cases.
UPSD_MAXCONN = 4096
# Short timeouts for the shims of the fault and hostile cases, so a session
# that must end by timeout ends quickly.
SHORT = "2"
# Growth of a shim's resident memory still called bounded (kB).
RSS_BOUND_KB = 16 * 1024

Outcome = collections.namedtuple("Outcome", "held survived lost")
Stats = collections.namedtuple("Stats", "rss_kb threads fds")

PKI = None


def raise_nofile(wanted=NOFILE_WANTED):
    """Raises RLIMIT_NOFILE (hard too, as root) so children inherit it; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0 and hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def setUpModule():  # pylint: disable=invalid-name
    """The run's test PKI, and a descriptor limit high enough for the load cases."""
    global PKI  # pylint: disable=global-statement
    raise_nofile()
    PKI = harness.shared_pki()


def check(condition, message):
    """AssertionError(message) unless condition (kept under python -O, unlike assert)."""
    if not condition:
        raise AssertionError(message)


def stats(pid):
    """Resident memory (kB), threads and open descriptors of a process."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        rss = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
    return Stats(rss, len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd")))


def counts(pid):
    """(threads, descriptors): what must return to its baseline after sessions end."""
    return stats(pid)[1:]


def closes(proc):
    """How many sessions the shim has logged as closed."""
    return proc.log_text().count(" closed: peer ")


def percentile(values, fraction):
    """The value below which fraction of values lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class BigNutServer(harness.NutServer):
    """Real NUT whose upsd accepts UPSD_MAXCONN clients (default 1024)."""

    def _configure(self):
        super()._configure()
        with open(self.tmpdir / "upsd.conf", "a", encoding="ascii") as handle:
            handle.write(f"MAXCONN {UPSD_MAXCONN}\n")


def client_hello(maximum, minimum=None, ciphers=None):
    """The bytes of a TLS ClientHello offering at most `maximum`, made without a socket."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # TLSv1 is meant to be old
        context.minimum_version = minimum or maximum
        context.maximum_version = maximum
    if ciphers:
        context.set_ciphers(ciphers)
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def old_context(version, ciphers="DEFAULT:@SECLEVEL=0"):
    """A client context offering only `version` (no verification: it must fail anyway)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers(ciphers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = version
        context.maximum_version = version
    return context


def send_quietly(sock, data):
    """Sends data; a peer that already closed is not an error here."""
    with contextlib.suppress(*CLOSED_ERRORS):
        sock.sendall(data)


def read_until_closed(client):
    """Everything until the peer closes; a reset or a TLS EOF counts as a close."""
    received = b""
    with contextlib.suppress(*CLOSED_ERRORS):
        for line in iter(client.readline, b""):
            received += line
    return received


def read_replies(client, marker):
    """Lines until one starts with marker or the peer closes; returns (lines, marker_seen)."""
    lines = []
    try:
        for line in iter(client.readline, b""):
            check(line.endswith(b"\n"), f"a partial reply line before the close: {line!r}")
            lines.append(line)
            if line.startswith(marker):
                return lines, True
    except CLOSED_ERRORS:
        pass  # a close with our bytes unread: still a close
    return lines, False


def tls_records(data):
    """True when data is a whole sequence of TLS records (nothing in plaintext)."""
    pos = 0
    while pos < len(data):
        if len(data) - pos < 5 or data[pos] not in (20, 21, 22, 23) or data[pos + 1] != 3:
            return False
        pos += 5 + int.from_bytes(data[pos + 3:pos + 5], "big")
    return pos == len(data) and bool(data)


class Rig:
    """The processes and sockets of one case; close() releases them in reverse order."""

    def __init__(self, pki, nut):
        self.pki, self.nut = pki, nut
        self.stack = contextlib.ExitStack()

    def close(self):
        """Stops and closes everything the case started."""
        self.stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def own_nut(self):
        """A NUT of the case's own (for restarts), stopped at close."""
        nut = BigNutServer().start()
        self.stack.callback(nut.stop)
        return nut

    def upsdtls(self, *extra, upsd_port=None, port=None, cert=None, key=None):
        """Starts upsdTLS; returns (proc, port)."""
        port = port or harness.free_port()
        proc = harness.start_shim(harness.UPSD_TLS, [
            "--listen", f"127.0.0.1:{port}",
            "--upsd", f"127.0.0.1:{upsd_port or self.nut.port}",
            "--cert", cert or self.pki.server_cert, "--key", key or self.pki.server_key,
            "--max-connections", str(UPSD_MAXCONN), *extra])
        self.stack.callback(proc.stop)
        return proc, port

    def upsmontls(self, upstream_port, *extra):
        """Starts upsmonTLS towards upstream_port; returns (proc, port)."""
        port = harness.free_port()
        proc = harness.start_shim(harness.UPSMON_TLS, [
            "--listen", f"127.0.0.1:{port}", "--upsd", f"127.0.0.1:{upstream_port}",
            "--cafile", self.pki.ca, "--max-connections", str(UPSD_MAXCONN), *extra])
        self.stack.callback(proc.stop)
        return proc, port

    def tap(self, port):
        """A recording forwarder to 127.0.0.1:port, closed at close."""
        return self.stack.enter_context(harness.Tap("127.0.0.1", port))

    def blackhole(self, port):
        """A forwarder to 127.0.0.1:port that cut() turns into a vanished peer."""
        return self.tap(port)

    def context(self, cert=None, key=None, maximum=None):
        """A verifying client context for the test CA."""
        return harness.client_context(self.pki.ca, certfile=cert, keyfile=key, maximum=maximum)

    def plain(self, port, rcvbuf=None):
        """A plaintext LineClient, closed at close."""
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(TIMEOUT)
        self.stack.callback(sock.close)
        sock.connect(("127.0.0.1", port))
        client = LineClient(sock)
        self.stack.callback(client.close)
        return client

    def tls(self, port, context=None, rcvbuf=None):
        """A client of upsdTLS after STARTTLS and the handshake."""
        client = self.plain(port, rcvbuf)
        reply = client.starttls(context or self.context(), "127.0.0.1")
        check(reply == "OK STARTTLS", f"STARTTLS answered {reply!r}")
        return client

    def client(self, port, via):
        """A live session: TLS to upsdTLS (via 'upsdTLS') or plain to upsmonTLS ('chain')."""
        return self.tls(port) if via == "upsdTLS" else self.plain(port)

    def serves(self, port, via="upsdTLS"):
        """True when a new session on port answers GET VAR like upsd."""
        try:
            with contextlib.closing(self.client(port, via)) as client:
                return client.cmd(GET_STATUS) == STATUS
        except (OSError, AssertionError):
            return False

    def relays(self, via, *args):
        """The shims a case drives: upsdTLS alone, or the chain, with args for the
        shim the client talks to; returns (processes, upsdTLS first; its port)."""
        if via == "upsdTLS":
            proc, port = self.upsdtls(*args)
            return [proc], port
        upsd_proc, proc, port = self.chain(upsmon_extra=args)
        return [upsd_proc, proc], port

    def chain(self, *upsd_extra, upsmon_extra=(), upsd_port=None):
        """upsdTLS and upsmonTLS in front of it; returns (upsdTLS proc, upsmonTLS proc, port)."""
        upsd_proc, upsd_tls_port = self.upsdtls(*upsd_extra, upsd_port=upsd_port)
        upsmon_proc, port = self.upsmontls(upsd_tls_port, *upsmon_extra)
        return upsd_proc, upsmon_proc, port


def settle(rig, procs, port, via):
    """Returns each idle proc's (threads, descriptors), after checking one session works.

    The case ends with wait_flat() against these: an idle shim has only its
    main and accept threads, and every session thread exits once idle (the
    shims keep a finished thread for the next session for a moment).
    """
    baselines = [counts(proc.pid) for proc in procs]
    before = [closes(proc) for proc in procs]
    with contextlib.closing(rig.client(port, via)) as client:
        check(client.cmd(GET_STATUS) == STATUS, f"no service on {port} ({via}) before the case")
    for proc, count in zip(procs, before):
        wait_for(lambda p=proc, c=count: closes(p) > c, what="the first session's close line")
    return baselines


def end_sessions(clients):
    """Closes clients now (not at rig close)."""
    for client in clients:
        client.close()


def wait_flat(procs, baselines, what):
    """Waits until every proc is back to its (threads, descriptors) baseline."""
    for proc, baseline in zip(procs, baselines):
        wait_for(lambda p=proc, b=baseline: counts(p.pid) == b,
                 what=f"{what}: threads and descriptors back to {baseline} "
                      f"(now {counts(proc.pid)})")


# --------------------------------------------------------------------------
# Faults


def case_upsd_restart(rig, sessions=5):
    """upsd restarted under live sessions through upsdTLS and through the chain."""
    nut = rig.own_nut()
    upsd_proc, upsmon_proc, chain_port = rig.chain(upsd_port=nut.port)
    upsd_port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", upsd_proc.log_text())[1])
    procs = (upsd_proc, upsmon_proc)
    baselines = settle(rig, procs, chain_port, "chain")
    live = [rig.tls(upsd_port) for _ in range(sessions)]
    live += [rig.plain(chain_port) for _ in range(sessions)]
    for client in live:   # negative control: every session is live before the restart
        check(client.cmd(GET_STATUS) == STATUS, "a session was not live before the restart")
    nut.restart()
    leftovers = [read_until_closed(client) for client in live]
    check(leftovers == [b""] * len(live), f"bytes after upsd went away: {leftovers!r}")
    check(rig.serves(upsd_port) and rig.serves(chain_port, "chain"),
          "no new session once upsd was back")
    end_sessions(live)
    wait_flat(procs, baselines, "after the upsd restart")
    check(upsd_proc.proc.poll() is None and upsmon_proc.proc.poll() is None, "a shim exited")
    return Outcome(f"{2 * sessions} live sessions (half through the chain)",
                   "every session ended cleanly; new sessions served at once; "
                   "threads and descriptors back to baseline",
                   "the live sessions (upsd went away)")


def case_upsdtls_sigkill(rig):
    """upsdTLS SIGKILLed and restarted on its port while upsmonTLS serves."""
    upsd_tls_port = harness.free_port()
    upsd_proc, _ = rig.upsdtls(port=upsd_tls_port)
    upsmon_proc, port = rig.upsmontls(upsd_tls_port, "--handshake-timeout", SHORT)
    [baseline] = settle(rig, [upsmon_proc], port, "chain")
    held = rig.plain(port)
    check(held.cmd(GET_STATUS) == STATUS, "the held session was not live")
    upsd_proc.proc.kill()
    upsd_proc.proc.wait(TIMEOUT)
    check(read_until_closed(held) == b"", "bytes after upsdTLS was killed")
    # Negative control: while upsdTLS is down, upsmonTLS closes new clients.
    down = rig.plain(port)
    send_quietly(down.sock, f"{GET_STATUS}\n".encode())
    check(read_until_closed(down) == b"", "a reply while upsdTLS was down")
    wait_for(lambda: "cannot connect to" in upsmon_proc.log_text(), what="connect failure log")
    started = time.monotonic()
    rig.upsdtls(port=upsd_tls_port)
    check(rig.serves(port, "chain"), "upsmonTLS did not recover")
    recovery = time.monotonic() - started
    end_sessions([held, down])
    wait_flat([upsmon_proc], [baseline], "upsmonTLS after the upsdTLS restart")
    check(upsmon_proc.proc.poll() is None, "upsmonTLS exited")
    return Outcome("1 chain session; upsmonTLS kept running",
                   f"upsmonTLS served again {recovery:.2f} s after upsdTLS restarted, "
                   "no restart of its own; threads and descriptors back to baseline",
                   "the session open at the kill; new sessions while upsdTLS was down")


def case_stalled_reader(rig, via="upsdTLS", limit=None, command=b"LIST VAR dummy"):
    """A peer that keeps sending command and never reads: bounded memory, idle timeout.

    LIST VAR fills the buffers with upsd's replies; STARTTLS with the
    replies the shim gives itself (ERR ALREADY-SSL-MODE at upsdTLS, ERR
    FEATURE-NOT-CONFIGURED at upsmonTLS), which must be bounded as well.
    """
    args = ("--idle-timeout", SHORT)
    procs, port = rig.relays(via, *args)
    proc = procs[-1]
    settle(rig, [proc], port, via)
    before = stats(proc.pid)
    first = closes(proc)
    staller = rig.plain(port, rcvbuf=4096) if via == "chain" else rig.tls(port, rcvbuf=4096)
    staller.sock.settimeout(0.2)
    payload = command + b"\n"
    payload *= 1500 // len(payload)
    sent, peak, started = 0, before.rss_kb, time.monotonic()
    limit = limit or float(SHORT) + 20
    while closes(proc) == first:
        check(time.monotonic() - started < limit, f"the stalled session outlived {limit} s")
        try:
            sent += staller.sock.send(payload)
        except (socket.timeout, ssl.SSLWantWriteError):
            pass   # our send buffer is full: the shim stopped reading us
        except OSError:
            break  # the shim closed the session
        peak = max(peak, stats(proc.pid).rss_kb)
    wait_for(lambda: closes(proc) > first, what="the stalled session's close line")
    ended = time.monotonic() - started
    close_line = [line for line in proc.log_text().splitlines() if " closed: peer " in line][-1]
    reason = close_line.rsplit(", ", 1)[-1]
    check("idle for 2 s" in reason, f"the stalled session ended otherwise: {close_line}")
    growth = peak - before.rss_kb
    check(growth < RSS_BOUND_KB, f"RSS grew by {growth} kB")
    check(rig.serves(port, via), "the shim stopped serving")   # negative control
    name = " ".join(command.decode().split()[:2])     # LIST VAR, STARTTLS
    return Outcome(f"{via}: {sent // (len(command) + 1)} {name} sent ({sent // 1024} kB), "
                   "none read",
                   f"RSS +{growth} kB at peak; other sessions served",
                   f"the stalled session, after {ended:.1f} s ({reason})")


def case_vanished_peer(rig, via="upsdTLS"):
    """A peer gone without FIN or RST: --idle-timeout ends the session."""
    args = ("--idle-timeout", SHORT)
    procs, port = rig.relays(via, *args)
    proc = procs[-1]
    [baseline] = settle(rig, [proc], port, via)
    hole = rig.blackhole(port)
    client = rig.client(hole.port, via)
    check(client.cmd(GET_STATUS) == STATUS, "no reply through the forwarder before the cut")
    first = closes(proc)
    hole.cut()
    started = time.monotonic()
    client.send(f"{GET_STATUS}\n".encode())   # lost in the hole, as on a dead link
    wait_for(lambda: closes(proc) > first, timeout=float(SHORT) + TIMEOUT,
             what="the vanished peer's session closed")
    ended = time.monotonic() - started
    check("idle for 2 s" in proc.log_text(), "not ended by the idle timeout")
    check(ended >= float(SHORT) - 0.1, f"ended after {ended:.2f} s, before the idle timeout")
    wait_flat([proc], [baseline], "after the vanished peer")
    check(rig.serves(port, via), "the shim stopped serving")
    return Outcome(f"{via}: 1 session whose peer vanished (no FIN, no RST)",
                   "shim kept serving; threads and descriptors back to baseline",
                   f"that session, {ended:.1f} s after the peer vanished (idle timeout 2 s)")


def case_certificate_dates(rig):
    """Certificates expired or not yet valid, on either side, are refused and logged."""
    pki = rig.pki
    fmt = "%Y%m%d%H%M%SZ"
    future = (time.strftime(fmt, time.gmtime(time.time() + 86400)),
              time.strftime(fmt, time.gmtime(time.time() + 30 * 86400)))
    past = ("20200101000000Z", "20210101000000Z")
    early_server = pki.make_server("early_server", ["localhost", "127.0.0.1"], dates=future)
    early_client = pki.make_client("early_client", "client1", dates=future)
    old_client = pki.make_client("old_client", "client1", dates=past)
    refused = []
    # upsdTLS with a server certificate not yet valid: upsmonTLS refuses it.
    early_proc, early_port = rig.upsdtls(cert=early_server[0], key=early_server[1])
    upsmon_proc, port = rig.upsmontls(early_port)
    client = rig.plain(port)
    send_quietly(client.sock, f"{GET_STATUS}\n".encode())
    check(read_until_closed(client) == b"", "a reply through a not-yet-valid certificate")
    wait_for(lambda: "certificate is not yet valid" in upsmon_proc.log_text(),
             what="upsmonTLS logging 'certificate is not yet valid'")
    refused.append("server not yet valid (upsmonTLS)")
    # upsdTLS with an expired certificate does not start.
    result = subprocess.run(
        ["python3", str(harness.UPSD_TLS), "--listen", f"127.0.0.1:{harness.free_port()}",
         "--cert", pki.expired_server_cert, "--key", pki.expired_server_key],
        capture_output=True, text=True, timeout=TIMEOUT, check=False)
    check(result.returncode == 2 and "expired" in result.stderr,
          f"upsdTLS started with an expired certificate: {result!r}")
    refused.append("server expired (upsdTLS exits 2)")
    # Client certificates, at upsdTLS with --client-ca.
    proc, strict_port = rig.upsdtls("--client-ca", pki.ca)
    for (cert, key), words in ((old_client, "certificate has expired"),
                               (early_client, "certificate is not yet valid")):
        client = rig.plain(strict_port)
        try:
            client.starttls(rig.context(cert=cert, key=key), "127.0.0.1")
            reply = client.cmd(GET_STATUS)
        except (ssl.SSLError, OSError):
            reply = ""
        check(reply == "", f"a reply to a client whose certificate is {words}")
        wait_for(lambda w=words: w in proc.log_text(), what=f"upsdTLS logging {words!r}")
        refused.append("client " + words.replace("certificate ", "").replace("has ", ""))
    # Negative controls: valid certificates on both sides are served.
    check(rig.tls(strict_port, rig.context(cert=pki.client_cert, key=pki.client_key))
          .cmd(GET_STATUS) == STATUS, "a valid client certificate was refused")
    _, _, good_port = rig.chain()
    check(rig.serves(good_port, "chain"), "a valid server certificate was refused")
    check("not valid before" in early_proc.log_text(),
          "upsdTLS started with a not-yet-valid certificate without a warning")
    return Outcome("4 certificates outside their dates", "; ".join(refused) +
                   "; each refusal logged with its cause; upsdTLS warns at start about its own "
                   "not-yet-valid certificate; valid ones served", "nothing")


# --------------------------------------------------------------------------
# Hostile input

# Pieces of the random inputs: protocol words and the bytes upsd's parser
# treats specially, mixed with raw random bytes.
TOKENS = (b"STARTTLS", b"starttls", b"LOGOUT", b"GET", b"VAR", b"LIST", b"dummy",
          b"ups.status", b"VER", b"HELP", b"USERNAME", b" ", b"\t", b"\r", b"\n", b"\n",
          b"\r\n", b"\x00", b"#", b"=", b"\xff", b"\xc3\xa9", b"\x16\x03\x01")
QUOTING = (b'"', b"\\")
PLAINTEXT_REPLIES = {b"ERR TLS-NOT-ENABLED\n"}
LAST_PLAINTEXT_REPLIES = {b"OK STARTTLS\n", b"OK Goodbye\n"}
MARKER = b"Network UPS Tools"


def random_blob(rng, quoting=True):
    """Seeded random input: mostly short lines, sometimes one over 1024 bytes."""
    parts = []
    for _ in range(rng.randint(1, 40)):
        roll = rng.random()
        if roll < 0.55:
            parts.append(rng.choice(TOKENS))
        elif roll < 0.62:
            parts.append(rng.choice(QUOTING))
        elif roll < 0.64:
            parts.append(rng.randbytes(rng.randint(1000, 3000)).replace(b"\n", b"."))
        else:
            parts.append(rng.randbytes(rng.randint(1, 48)))
    blob = b"".join(parts)
    if not quoting:
        # Inside TLS the case ends with a marker command; an open quote or a
        # trailing backslash would (rightly) swallow it, so leave those out.
        blob = blob.replace(b'"', b"'").replace(b"\\", b"/")
    return blob


def check_plaintext_replies(replies, what):
    """Before TLS only ERR TLS-NOT-ENABLED, and OK STARTTLS or OK Goodbye last.

    After OK STARTTLS the shim is in the TLS handshake: our end of stream
    there gets at most a TLS alert (OpenSSL 3 sends one on an unexpected EOF).
    """
    replies, ok_starttls, handshake = replies.partition(b"OK STARTTLS\n")
    check(not handshake or (tls_records(handshake) and handshake[0] == 21),
          f"{what}: after OK STARTTLS, more than a TLS alert: {handshake[:40]!r}")
    replies += ok_starttls
    lines = replies.splitlines(keepends=True)
    check(not lines or lines[-1].endswith(b"\n"), f"{what}: partial reply {replies[-40:]!r}")
    for index, line in enumerate(lines):
        allowed = PLAINTEXT_REPLIES | (LAST_PLAINTEXT_REPLIES if index == len(lines) - 1
                                       else set())
        check(line in allowed, f"{what}: unexpected plaintext reply {line!r}")


def check_relayed_replies(lines, what):
    """Replies inside TLS: whole printable ASCII lines of NUT's size."""
    for line in lines:
        text = line[:-1]
        check(len(line) <= 512 and all(0x20 <= byte < 0x7f for byte in text),
              f"{what}: odd reply line {line[:80]!r}")


def case_random_plaintext(rig, cases=300, seed=7):
    """Seeded random bytes in upsdTLS's plaintext phase: never a byte to upsd."""
    tap = rig.tap(rig.nut.port)
    proc, port = rig.upsdtls("--handshake-timeout", SHORT, upsd_port=tap.port)
    [baseline] = settle(rig, [proc], port, "upsdTLS")
    tap_before = len(tap.received)
    rng = random.Random(seed)
    kinds = collections.Counter()
    for index in range(cases):
        blob = random_blob(rng)
        client = rig.plain(port)
        send_quietly(client.sock, blob)
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_WR)
        replies = read_until_closed(client)
        check_plaintext_replies(replies, f"case {index} (seed {seed})")
        if b"OK STARTTLS\n" in replies:
            kinds["OK STARTTLS"] += 1
        else:
            kinds[replies.splitlines()[-1].decode() if replies else "closed, no reply"] += 1
        client.close()
    check(len(tap.received) == tap_before, "pre-TLS bytes reached upsd")
    wait_flat([proc], [baseline], "after random plaintext")
    check(rig.serves(port), "upsdTLS stopped serving")
    return Outcome(f"upsdTLS plaintext: {cases} random inputs (seed {seed})",
                   "only ERR TLS-NOT-ENABLED / OK STARTTLS / OK Goodbye, then a clean close; "
                   "0 bytes reached upsd; still serving; no leak",
                   "nothing (last replies: "
                   + ", ".join(f"{n} {k}" for k, n in kinds.most_common()) + ")")


def case_random_relayed(rig, via="upsdTLS", cases=200, seed=11):
    """Seeded random bytes inside TLS (upsdTLS) or from a plaintext client (chain)."""
    upsd_proc, port = rig.upsdtls("--idle-timeout", "5")
    procs = [upsd_proc]
    tap = None
    if via == "chain":
        tap = rig.tap(port)
        upsmon_proc, port = rig.upsmontls(tap.port, "--idle-timeout", "5")
        procs.append(upsmon_proc)
    baselines = settle(rig, procs, port, via)
    rng = random.Random(seed)
    marked = closed = 0
    for index in range(cases):
        blob = random_blob(rng, quoting=False)
        client = rig.client(port, via)
        send_quietly(client.sock, blob + b"\nVER\n")
        lines, seen = read_replies(client, MARKER)
        check_relayed_replies(lines, f"case {index} (seed {seed}, {via})")
        marked += seen
        closed += not seen
        client.close()
    if tap is not None:
        for stream in tap.streams():
            check(stream.startswith(b"STARTTLS\n") and tls_records(stream[9:]),
                  f"upsmonTLS sent upstream more than STARTTLS and TLS: {stream[:40]!r}")
    wait_flat(procs, baselines, f"after random input ({via})")
    check(rig.serves(port, via), "stopped serving")
    return Outcome(f"{via} after TLS: {cases} random inputs (seed {seed})",
                   f"{marked} answered up to the closing VER; {closed} closed cleanly "
                   "(line over 1024 bytes or LOGOUT); no odd reply line; still serving; no leak"
                   + ("; upstream saw only STARTTLS then TLS records" if tap else ""),
                   "nothing")


def case_odd_bytes(rig):
    """NUL, control and non-ASCII bytes at both shims, before and after TLS."""
    tap = rig.tap(rig.nut.port)
    upsd_proc, port = rig.upsdtls(upsd_port=tap.port)
    _, chain_port = rig.upsmontls(port)
    inputs = [b"\x00\n", b"GET VAR dummy\x00 ups.status\n", b"\xff\xfe\xfd\n",
              "GET VAR dummy ups.statüs\n".encode(), b"\x1b[2J\x07\n", b"\r\r\r\n",
              b"VER\x00\x00\x00\n", b"\x80" * 900 + b"\n"]
    for data in inputs:
        client = rig.plain(port)
        client.send(data + b"LOGOUT\n")
        replies = read_until_closed(client)
        check(replies in (b"OK Goodbye\n", b"ERR TLS-NOT-ENABLED\nOK Goodbye\n"),
              f"plaintext {data[:20]!r}: {replies!r}")
    check(tap.received == b"", "pre-TLS bytes reached upsd")
    for data in inputs:
        for client in (rig.tls(port), rig.plain(chain_port)):
            client.send(data + b"VER\n")
            lines, seen = read_replies(client, MARKER)
            check(seen, f"no VER reply after {data[:20]!r}")
            check_relayed_replies(lines, f"after {data[:20]!r}")
    # upsd drops control bytes from words, so START\0TLS is STARTTLS to it: the
    # shims must see it as STARTTLS too (answered locally, never relayed).
    for client, reply in ((rig.tls(port), b"ERR ALREADY-SSL-MODE\n"),
                          (rig.plain(chain_port), b"ERR FEATURE-NOT-CONFIGURED\n")):
        client.send(b"START\x00TLS\n")
        check(client.readline() == reply, f"START\\0TLS not answered {reply!r}")
    client = rig.plain(port)
    client.send(b"START\x00TLS\n")
    check(client.readline() == b"OK STARTTLS\n", "START\\0TLS before TLS")
    check(b"START" not in tap.received.upper(), "a STARTTLS spelling reached upsd")
    check(upsd_proc.proc.poll() is None, "upsdTLS exited")
    return Outcome(f"{len(inputs) + 1} inputs with NUL, control and non-ASCII bytes, "
                   "at both shims, before and after TLS",
                   "before TLS: ERR TLS-NOT-ENABLED, nothing to upsd; after: upsd's reply; "
                   "START\\0TLS treated as STARTTLS as upsd would", "nothing")


def case_long_lines(rig, sizes=(1023, 1024, 4096, 1 << 20)):
    """Lines from 1 KB up: up to 1024 bytes with LF answered, longer ones closed."""
    tap = rig.tap(rig.nut.port)
    upsd_proc, port = rig.upsdtls(upsd_port=tap.port)
    upsmon_proc, chain_port = rig.upsmontls(port)
    procs = (upsd_proc, upsmon_proc)
    baselines = settle(rig, procs, chain_port, "chain")
    results = []
    for size in sizes:
        line = b"G" * size + b"\n"
        for phase in ("plaintext", "upsdTLS", "chain"):
            if phase == "plaintext":
                client = rig.plain(port)
            else:
                client = rig.client(chain_port if phase == "chain" else port, phase)
            tap_before = len(tap.received)
            send_quietly(client.sock, line)
            if size < 1024:
                if phase == "plaintext":
                    check(client.readline() == b"ERR TLS-NOT-ENABLED\n", f"{size} plaintext")
                else:
                    send_quietly(client.sock, b"VER\n")
                    lines, seen = read_replies(client, MARKER)
                    check(seen, f"{size}-byte line {phase}: no reply to the VER after it")
                    check_relayed_replies(lines, f"{size} {phase}")
            else:
                check(read_until_closed(client) == b"", f"{size}-byte line {phase}: a reply")
            client.close()
            if phase == "plaintext":
                check(len(tap.received) == tap_before, "a plaintext line reached upsd")
        results.append(f"{size + 1} B " + ("answered" if size < 1024 else "closed"))
    # A session's close line follows its close: the client may see EOF first.
    for shim, name in ((upsd_proc, "upsdTLS"), (upsmon_proc, "upsmonTLS")):
        wait_for(lambda s=shim: "command line over 1024 bytes" in s.log_text(),
                 what=f"the long-line log line of {name}")
    wait_flat(procs, baselines, "after long lines")
    check(rig.serves(port) and rig.serves(chain_port, "chain"), "stopped serving")
    return Outcome(f"lines of {', '.join(str(s + 1) for s in sizes)} bytes at upsdTLS "
                   "(before and after TLS) and upsmonTLS",
                   "; ".join(results) + " (each logged); still serving; no leak",
                   "the sessions with an overlong line")


def case_wrong_protocol(rig):
    """An HTTP request and a TLS ClientHello where NUT's plaintext phase is."""
    tap = rig.tap(rig.nut.port)
    proc, port = rig.upsdtls("--handshake-timeout", SHORT, "--idle-timeout", SHORT,
                             upsd_port=tap.port)
    _, chain_port = rig.upsmontls(port, "--idle-timeout", SHORT)
    http = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: x\r\n\r\n"
    client = rig.plain(port)
    client.send(http)
    check(read_lines_raw(client, 3) == [b"ERR TLS-NOT-ENABLED\n"] * 3, "HTTP at upsdTLS")
    client.close()
    hello = client_hello(ssl.TLSVersion.TLSv1_3)
    client = rig.plain(port)
    send_quietly(client.sock, hello)
    replies = read_until_closed(client)
    check_plaintext_replies(replies, "raw ClientHello")
    check(tap.received == b"", "pre-TLS bytes reached upsd")
    client = rig.plain(chain_port)    # relayed to upsd inside TLS, as any client's lines
    client.send(http + b"VER\n")
    lines, seen = read_replies(client, MARKER)
    check(seen and all(line.startswith(b"ERR ") for line in lines[:-1]),
          f"HTTP at upsmonTLS: {lines!r}")
    # Implicit TLS (a ClientHello at once), at both: refused, then closed by a timeout.
    for target in (port, chain_port):
        sock = socket.create_connection(("127.0.0.1", target), TIMEOUT)
        with sock, contextlib.suppress(ssl.SSLError, OSError):
            rig.context().wrap_socket(sock, server_hostname="127.0.0.1")
            raise AssertionError("a TLS handshake succeeded without STARTTLS")
    # Only the request upsmonTLS relayed inside TLS reached upsd.
    check(tap.received.count(b"GET / HTTP") == 1, "the plaintext HTTP request reached upsd")
    check(rig.serves(port) and rig.serves(chain_port, "chain"), "stopped serving")
    check(proc.proc.poll() is None, "upsdTLS exited")
    return Outcome("an HTTP request and a TLS ClientHello instead of NUT's plaintext",
                   "HTTP: ERR TLS-NOT-ENABLED per line at upsdTLS (nothing to upsd), upsd's "
                   "ERR per line through upsmonTLS; ClientHello: handshake fails at the client, "
                   "session closed by timeout; still serving", "nothing")


def read_lines_raw(client, count):
    """count lines (with LF) from client; fewer on EOF."""
    lines = []
    for _ in range(count):
        line = client.readline()
        if not line:
            break
        lines.append(line)
    return lines


def corked(sock, chunks):
    """Sends chunks as separate writes that leave in one TCP segment (TCP_CORK)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    for chunk in chunks:
        sock.send(chunk)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)


def case_injection(rig):
    """STARTTLS injection variants at upsdTLS; the client's STARTTLS at upsmonTLS."""
    tap = rig.tap(rig.nut.port)
    proc, port = rig.upsdtls("--handshake-timeout", SHORT, upsd_port=tap.port)
    hello = client_hello(ssl.TLSVersion.TLSv1_3)
    attacks = [
        ("pipelined", [b"STARTTLS\nGET VAR dummy ups.status\n"]),
        ("CRLF", [b"STARTTLS\r\nVER\r\n"]),
        ("CR only, no LF", [b"STARTTLS\rVER\r"]),
        ("lowercase", [b"starttls\nver\n"]),
        ("quoted", [b'"STARTTLS"\nVER\n']),
        ("NUL inside", [b"START\x00TLS\nVER\n"]),
        ("same segment, two writes", [b"STARTTLS\n", b"VER\n"]),
        ("same segment, split in the word", [b"STAR", b"TLS\nVER\n"]),
        ("ClientHello behind STARTTLS", [b"STARTTLS\n" + hello]),
        ("after a refused command", [b"VER\nSTARTTLS\nVER\n"]),
    ]
    outcomes = collections.Counter()
    for name, chunks in attacks:
        client = rig.plain(port)
        corked(client.sock, chunks)
        client.sock.shutdown(socket.SHUT_WR)
        replies = read_until_closed(client)
        check(b"OK STARTTLS" not in replies, f"{name}: OK STARTTLS to an injection")
        check(MARKER not in replies and b"VAR dummy" not in replies, f"{name}: executed")
        outcomes["closed without OK STARTTLS"] += 1
    # Separate segments race the shim: the injected bytes either arrive in time
    # (no OK STARTTLS) or after it, where they break the TLS handshake.
    for _ in range(20):
        client = rig.plain(port)
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.send(b"STARTTLS\n")
        send_quietly(client.sock, b"VER\n")
        replies = read_until_closed(client)
        check(replies in (b"", b"OK STARTTLS\n"), f"separate segments: {replies!r}")
        outcomes["separate segments: " + ("handshake broken" if replies else "closed")] += 1
    # The CR-joined line is one STARTTLS line to upsd as well: OK STARTTLS, and
    # what followed the CR is dropped, never run.
    client = rig.plain(port)
    client.send(b"STARTTLS\rVER\n")
    check(client.readline() == b"OK STARTTLS\n", "STARTTLS<CR>VER<LF> as one line")
    client.wrap(rig.context(), "127.0.0.1")
    check(client.cmd(GET_STATUS) == STATUS, "the first reply inside TLS is not the GET's")
    check(tap.received == b"GET VAR dummy ups.status\n" or
          tap.received.endswith(b"GET VAR dummy ups.status\n"), "pre-TLS bytes reached upsd")
    check(b"VER" not in tap.received, "an injected command reached upsd")
    wait_for(lambda: proc.log_text().count("STARTTLS injection attempt") >= len(attacks) - 1,
             what="a log line for each injection")
    # upsmonTLS answers every client STARTTLS itself, in command order.
    _, chain_port = rig.upsmontls(port)
    for spelling in (b"STARTTLS\n", b"starttls\r\n", b"STARTTLS\r\n"):
        client = rig.plain(chain_port)
        corked(client.sock, [spelling, f"{GET_STATUS}\n".encode()])
        check(read_lines_raw(client, 2) == [b"ERR FEATURE-NOT-CONFIGURED\n",
                                            STATUS.encode() + b"\n"], f"upsmonTLS {spelling!r}")
    check(rig.serves(port), "upsdTLS stopped serving")   # negative control
    return Outcome(f"{len(attacks) + 21} STARTTLS injection attempts at upsdTLS, 3 at upsmonTLS",
                   "; ".join(f"{n} {k}" for k, n in outcomes.items()) +
                   "; no injected command reached upsd; upsmonTLS answered "
                   "FEATURE-NOT-CONFIGURED in order", "nothing")


def case_downgrade(rig):
    """Old TLS versions, no shared cipher, a second handshake, another CA's certificate."""
    proc13, port13 = rig.upsdtls()
    proc12, port12 = rig.upsdtls("--tls-min", "1.2", "--idle-timeout", SHORT)
    proc_ca, port_ca = rig.upsdtls("--client-ca", rig.pki.ca)
    attempts = [
        (port13, proc13, old_context(ssl.TLSVersion.TLSv1_2, "DEFAULT"), "TLS 1.2 vs 1.3 only"),
        (port13, proc13, old_context(ssl.TLSVersion.TLSv1), "TLS 1.0 vs 1.3 only"),
        (port12, proc12, old_context(ssl.TLSVersion.TLSv1), "TLS 1.0 vs --tls-min 1.2"),
        (port12, proc12, old_context(ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256"),
         "no shared cipher"),
        (port_ca, proc_ca, rig.context(cert=rig.pki.other_client_cert,
                                       key=rig.pki.other_client_key), "client cert, other CA"),
    ]
    for port, proc, context, name in attempts:
        failures = proc.log_text().count("TLS handshake failed")
        client = rig.plain(port)
        try:
            client.starttls(context, "127.0.0.1")
            reply = client.cmd(GET_STATUS)
        except (ssl.SSLError, OSError):
            reply = ""
        check(reply == "", f"{name}: served")
        wait_for(lambda p=proc, f=failures: p.log_text().count("TLS handshake failed") > f,
                 what=f"{name}: 'TLS handshake failed' log line")
    # A second handshake inside TLS: STARTTLS again, then a ClientHello anyway.
    client = rig.tls(port12, rig.context(maximum=ssl.TLSVersion.TLSv1_2))
    check(client.cmd("STARTTLS") == "ERR ALREADY-SSL-MODE", "second STARTTLS")
    client.send(client_hello(ssl.TLSVersion.TLSv1_2).replace(b"\n", b" ") + b"\nVER\n")
    lines, seen = read_replies(client, MARKER)
    check(seen, "no reply after a nested ClientHello")
    check_relayed_replies(lines, "nested ClientHello")
    # Negative controls: what each shim allows still works.
    check(rig.tls(port12, rig.context(maximum=ssl.TLSVersion.TLSv1_2)).cmd(GET_STATUS)
          == STATUS, "TLS 1.2 refused under --tls-min 1.2")
    check(rig.tls(port_ca, rig.context(cert=rig.pki.client_cert, key=rig.pki.client_key))
          .cmd(GET_STATUS) == STATUS, "the right client certificate refused")
    check(rig.serves(port13), "TLS 1.3 refused")
    return Outcome(f"{len(attempts)} downgrade or wrong-certificate handshakes; a second "
                   "STARTTLS and a nested ClientHello inside TLS",
                   "each handshake refused and logged; second STARTTLS answered "
                   "ERR ALREADY-SSL-MODE, the nested ClientHello relayed as text to upsd, "
                   "which answered it; allowed versions still served", "nothing")


# --------------------------------------------------------------------------
# Load


def case_concurrent(rig, sessions=100, hold=2.0, via="upsdTLS", poll_every=5.0):
    """sessions held open (each polled like upsmon) while an active client measures GET VAR."""
    procs, port = rig.relays(via)
    baselines = settle(rig, procs, port, via)
    opened = time.monotonic()
    held = [rig.client(port, via) for _ in range(sessions)]
    opened = time.monotonic() - opened
    for client in held:
        check(client.cmd(GET_STATUS) == STATUS, "a held session was not live")
    active = rig.client(port, via)
    stop = threading.Event()
    polls = collections.Counter()

    def poll_held():
        """Each held session sends one GET VAR per poll_every seconds, as upsmon does."""
        gap = poll_every / len(held)
        while not stop.is_set():
            for client in held:
                if stop.wait(gap):
                    return
                polls["ok" if client.cmd(GET_STATUS) == STATUS else "bad"] += 1

    poller = threading.Thread(target=poll_held, daemon=True)
    poller.start()
    latencies = []
    ends = time.monotonic() + hold
    try:
        while time.monotonic() < ends:
            started = time.perf_counter()
            reply = active.cmd(GET_STATUS)
            latencies.append(time.perf_counter() - started)
            check(reply == STATUS, f"active client got {reply!r}")
    finally:
        stop.set()
        poller.join(TIMEOUT)
    alive = sum(client.cmd(GET_STATUS) == STATUS for client in held)
    check(alive == sessions, f"{sessions - alive} held sessions lost")
    check(polls["bad"] == 0, f"{polls['bad']} bad polls")
    peak = [stats(p.pid) for p in procs]
    end_sessions([*held, active])
    wait_flat(procs, baselines, f"after {sessions} concurrent sessions")
    p50, p99 = percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000
    check(p99 < 1000, f"GET VAR p99 {p99:.1f} ms")
    return Outcome(f"{sessions} sessions via {via} for {hold:g} s (opened in {opened:.1f} s), "
                   f"each polled every {poll_every:g} s",
                   f"all {sessions} answering at the end, {polls['ok']} polls OK; active GET VAR "
                   f"p50 {p50:.2f} ms, p99 {p99:.2f} ms ({len(latencies)} requests); "
                   f"peak RSS {', '.join(f'{s.rss_kb // 1024} MB' for s in peak)}; "
                   "threads and descriptors back to baseline", "nothing")


def case_short_sessions(rig, sessions=300, via="upsdTLS"):
    """Short sessions back to back: RSS, threads and descriptors flat at the end."""
    procs, port = rig.relays(via)
    proc = procs[-1]
    context = rig.context()

    def session(index):
        with LineClient.connect("127.0.0.1", port) as client:
            if via == "upsdTLS":
                client.starttls(context, "127.0.0.1")
            if index % 2:
                check(client.cmd(GET_STATUS) == STATUS, f"session {index} not served")
            else:
                check(client.cmd("LOGOUT") == "OK Goodbye", f"session {index}: no Goodbye")

    baselines = settle(rig, procs, port, via)
    for index in range(min(100, sessions)):   # allocators and caches reach working size
        session(index)
    rig_count = [closes(p) for p in procs]
    before = [stats(p.pid) for p in procs]
    started = time.monotonic()
    for index in range(sessions):
        session(index)
    elapsed = time.monotonic() - started
    for proc, count in zip(procs, rig_count):
        wait_for(lambda p=proc, c=count: closes(p) >= c + sessions, timeout=TIMEOUT * 3,
                 what="every short session closed")
    wait_flat(procs, baselines, f"after {sessions} short sessions")
    after = [stats(p.pid) for p in procs]
    growth = [a.rss_kb - b.rss_kb for a, b in zip(after, before)]
    check(max(growth) < RSS_BOUND_KB, f"RSS grew by {growth} kB")
    return Outcome(f"{sessions} short sessions via {via} ({sessions / elapsed:.0f}/s)",
                   "every session served; threads and descriptors equal before and after; RSS "
                   + ", ".join(f"{b.rss_kb // 1024} -> {a.rss_kb // 1024} MB"
                               for b, a in zip(before, after)), "nothing")


PIPELINE = [f"GET VAR dummy {name}" for name in harness.UPS_VARS] + [
    "VER", "GET VAR dummy no.such.var", "LIST UPS", "GET NUMLOGINS dummy", "HELP",
    "GET UPSDESC dummy", "LIST VAR dummy"]


def pipeline_commands(count):
    """count commands cycling through PIPELINE (one LIST VAR per cycle)."""
    return "".join(PIPELINE[index % len(PIPELINE)] + "\n" for index in range(count)).encode()


def exchange(sock, payload, expected):
    """Sends payload while reading until `expected` bytes came or EOF; returns them.

    One thread does both, with the socket non-blocking: an SSLSocket must not
    be read and written from two threads at once (OpenSSL's SSL object is not
    thread-safe; a sender thread made the TLS case fail now and then).
    Raises TimeoutError when nothing moves for the socket's timeout.
    """
    timeout = sock.gettimeout()
    view = memoryview(payload)
    received = bytearray()
    sock.setblocking(False)
    try:
        while len(received) < expected:
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                readable, writable, _ = select.select([sock], [sock] if view else [], [], timeout)
                if not readable and not writable:
                    raise TimeoutError(f"nothing moved for {timeout} s")
            if view:
                try:
                    view = view[sock.send(view[:65536]):]
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass         # the socket is full: the same bytes go again after select()
                except CLOSED_ERRORS:
                    view = view[:0]      # the peer closed: read what it sent before
            try:
                data = sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue         # nothing to read yet (or only part of a TLS record)
            if not data:
                break
            received += data
    finally:
        sock.settimeout(timeout)
    return bytes(received)


def case_pipelined(rig, commands=1000, via="upsdTLS"):
    """commands in one write; every reply in order, byte for byte as a direct upsd session."""
    payload = pipeline_commands(commands)
    with LineClient.connect(rig.nut.host, rig.nut.port, timeout=TIMEOUT * 6) as direct:
        started = time.monotonic()
        # The reply length is unknown up front; LOGOUT's Goodbye ends the direct stream.
        expected = exchange(direct.sock, payload + b"LOGOUT\n", 1 << 40)
        direct_time = time.monotonic() - started
    check(expected.endswith(b"OK Goodbye\n"), "direct session did not end with Goodbye")
    _, port = rig.relays(via)
    client = rig.client(port, via)
    client.sock.settimeout(TIMEOUT * 6)
    started = time.monotonic()
    got = exchange(client.sock, payload + b"LOGOUT\n", len(expected))
    shim_time = time.monotonic() - started
    if got != expected:
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                  min(len(got), len(expected)))
        raise AssertionError(f"{via}: replies differ at byte {at} of {len(expected)}: "
                             f"got {got[at:at + 60]!r}, upsd {expected[at:at + 60]!r}")
    check(client.readline() == b"", "bytes after Goodbye")
    return Outcome(f"{commands} pipelined commands in one session via {via}",
                   f"all {len(expected)} reply bytes identical to a direct upsd session "
                   f"({shim_time:.2f} s vs {direct_time:.2f} s direct)", "nothing")


# --------------------------------------------------------------------------
# The fast suite


class RigCase(harness.UpsdCase):
    """Real upsd (or the stand-in) once per class; each test gets a Rig."""

    def setUp(self):
        self.rig = Rig(PKI, self.nut)
        self.addCleanup(self.rig.close)


class TestFaults(RigCase):
    """upsd and upsdTLS going away, peers that stall or vanish, certificate dates."""

    def setUp(self):
        harness.require_nut(self)
        super().setUp()

    def test_upsd_restart_ends_live_sessions_cleanly_and_new_ones_work(self):
        case_upsd_restart(self.rig, sessions=3)

    def test_upsmontls_recovers_when_upsdtls_is_killed_and_restarted(self):
        case_upsdtls_sigkill(self.rig)

    def test_peer_that_stops_reading_keeps_memory_bounded_and_is_timed_out(self):
        case_stalled_reader(self.rig)

    def test_peer_that_sends_only_starttls_and_never_reads_is_bounded_too(self):
        for via in ("upsdTLS", "chain"):
            case_stalled_reader(self.rig, via, command=b"STARTTLS")

    def test_peer_that_vanishes_without_fin_is_timed_out(self):
        case_vanished_peer(self.rig)

    def test_certificates_outside_their_dates_are_refused_with_a_log_line(self):
        case_certificate_dates(self.rig)


class TestHostileInput(RigCase):
    """Random, malformed and malicious input at both shims."""

    def test_random_bytes_before_tls_get_only_refusals_and_never_reach_upsd(self):
        case_random_plaintext(self.rig, cases=300)

    def test_random_bytes_inside_tls_and_through_the_chain_keep_both_serving(self):
        harness.require_nut(self)
        case_random_relayed(self.rig, "upsdTLS", cases=80)
        case_random_relayed(self.rig, "chain", cases=60)

    def test_nul_control_and_non_ascii_bytes(self):
        harness.require_nut(self)
        case_odd_bytes(self.rig)

    def test_lines_up_to_1024_bytes_are_served_and_longer_ones_closed(self):
        harness.require_nut(self)
        case_long_lines(self.rig)

    def test_http_request_and_clienthello_in_the_plaintext_phase(self):
        harness.require_nut(self)
        case_wrong_protocol(self.rig)

    def test_starttls_injection_variants(self):
        case_injection(self.rig)

    def test_downgrades_second_handshake_and_foreign_client_certificate(self):
        harness.require_nut(self)
        case_downgrade(self.rig)


class TestLoad(RigCase):
    """Scaled-down load: the full numbers are in bench/stress.py."""

    def setUp(self):
        harness.require_nut(self)
        super().setUp()

    def test_100_concurrent_sessions_with_bounded_latency(self):
        case_concurrent(self.rig, sessions=100, hold=2.0)

    def test_300_short_sessions_leave_threads_and_descriptors_flat(self):
        case_short_sessions(self.rig, sessions=300)

    def test_1000_pipelined_commands_match_a_direct_session_byte_for_byte(self):
        case_pipelined(self.rig, 1000, "upsdTLS")
        case_pipelined(self.rig, 1000, "chain")


if __name__ == "__main__":
    unittest.main()
