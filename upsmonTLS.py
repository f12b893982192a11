#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""upsmonTLS - TLS 1.3 for stock NUT clients (upsmon, upsc, upsrw, upscmd).

What it relays: NUT network protocol sessions (RFC 9271).  A plaintext
client connects on loopback (127.0.0.1:3493 by default, where the clients
look for upsd); for each one the shim connects to a remote upsdTLS (or any
upsd with STARTTLS) given with --upsd, sends STARTTLS, requires exactly
`OK STARTTLS`, completes a verified TLS handshake, and only then relays the
client's bytes.  The client's own STARTTLS is answered
`ERR FEATURE-NOT-CONFIGURED`, so stock clients carry on in plaintext to the
shim.  There is no fallback to plaintext, ever.

What it trusts: the CA in --cafile (else the system trust store) for the
server's certificate, and the name in --server-name (else the --upsd host;
an IP address is matched against IP subjectAltNames).  With --cert/--key it
presents a client certificate (mutual TLS).

What it refuses: a STARTTLS reply other than `OK STARTTLS`, or one with
more bytes behind it (a response injection: a man in the middle answering
before TLS), a certificate that fails verification, a non-loopback --listen
without --unsafe-listen.  Any of these closes that client with one log
line; the daemon keeps serving.

What it does not protect: the hop from the client to the shim is
plaintext, so it stays on loopback by default; NUT passwords cross it in
clear.  Clients with FORCESSL 1 or CERTVERIFY 1 cannot use the shim (it
answers their STARTTLS with an error by design): point them at upsdTLS.

Design: socketserver.ThreadingTCPServer, one thread per session.  Each
session runs one non-blocking poll() loop for both of its sockets, with a
bounded buffer per direction, so a peer that stops reading stalls only its
own session, and memory stays bounded.  Every phase has a deadline:
--handshake-timeout covers connect, STARTTLS and the TLS handshake upstream,
--idle-timeout the relay.
"""

import argparse
import collections
import datetime
import errno
import ipaddress
import itertools
import logging
import logging.handlers
import os
import pwd
import queue
import re
import resource
import select
import shlex
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time

# Host name lookups import the idna codec lazily; import it now, while the
# Python installation is still readable (before the privilege drop).
import encodings.idna  # noqa: F401  pylint: disable=unused-import

PROG = "upsmonTLS"
VERSION = "1.0.0"

DEFAULT_LISTEN = ("127.0.0.1:3493",)
# Where NUT clients look for upsd.
DEFAULT_PORT = 3493
# upsdTLS's port.
UPSTREAM_PORT = 401

# Longest command line accepted, its LF included, before and after TLS.  NUT
# clients send lines well under 512 bytes; anything longer is not a NUT client.
LINE_MAX = 1024
# Bytes queued towards one side before the shim stops reading the other:
# the backpressure bound that keeps memory flat when a peer stops reading.
BUFFER_MAX = 64 * 1024
# Commands in flight to upsd (answers not yet seen) before the shim stops
# reading the client; keeps the reply-order queue bounded as well.
PENDING_MAX = 4096
RECV_SIZE = 16 * 1024
# One TLS record's worth of plaintext per send().
SEND_CHUNK = 16 * 1024
# After one side has closed: how long the other may still deliver what is
# due (replies to commands already sent, queued bytes).
CLOSE_TIMEOUT = 2.0
# How long one resumable TLS session is reused before a newer one is kept:
# OpenSSL's tickets live 7200 s, and reading tls.session copies the session
# (its certificate included), too dear to do at every close.
SESSION_REFRESH = 60.0
# On SIGTERM: how long open sessions get to close before the process exits.
STOP_GRACE = 2.0
# The options that name certificate, key and CA files: checked at start,
# read again on SIGHUP.
FILE_OPTIONS = ("cert", "key", "cafile")
# The longest --handshake-timeout and --idle-timeout: poll() takes its
# timeout in milliseconds as a C int (2**31 - 1 ms, about 24 days).
TIMEOUT_MAX = 2147483
# The default backlog of 5 makes a burst of upsmon clients reconnecting
# after a power event wait on SYN retries.
BACKLOG = 256
# Warn about the daemon's own certificate this long before it ends.
EXPIRY_WARNING = datetime.timedelta(days=30)
# A session thread that has finished waits this long for the next session
# before it exits: starting a thread costs more than a short NUT session.
WORKER_LINGER = 2.0
# Finished session threads kept waiting at most.
WORKERS_IDLE_MAX = 16
# A failing accept() (EMFILE and friends) is retried after this pause
# instead of spinning the accept loop.
ACCEPT_BACKOFF = 0.1

# Commands answered by the shim, never relayed: the client's STARTTLS gets
# what upsd itself says when it has no certificate, so stock clients carry
# on in plaintext, which here only crosses loopback.
LOCAL_REPLIES = {b"STARTTLS": b"ERR FEATURE-NOT-CONFIGURED\n"}

log = logging.getLogger(PROG)


class ConfigError(Exception):
    """A usage or configuration error: exit status 2, message names the option."""


class SessionEnd(Exception):
    """Ends one session; the message is the reason logged on its close line."""

    def __init__(self, reason, level=logging.INFO):
        super().__init__(reason)
        self.level = level


# --------------------------------------------------------------------------
# Options


class OptionParser(argparse.ArgumentParser):
    """argparse with @FILE holding options one per line, shell-quoted, # comments."""

    def convert_arg_line_to_args(self, arg_line):
        return shlex.split(arg_line, comments=True)


def build_parser():
    """Returns the parser for the command line described in DESIGN.md section 4."""
    parser = OptionParser(
        prog=PROG + ".py", fromfile_prefix_chars="@",
        description="TLS 1.3 for stock NUT clients: plaintext on loopback, TLS upstream.",
        epilog="@FILE reads options from FILE, one option (and its value) per line.")
    add = parser.add_argument
    add("--listen", action="append", metavar="ADDR:PORT",
        help="where plaintext clients connect; repeatable (default: 127.0.0.1:3493)")
    add("--unsafe-listen", action="store_true",
        help="allow a non-loopback --listen (plaintext then crosses the network)")
    add("--upsd", required=True, metavar="HOST[:PORT]",
        help="the upsdTLS to connect to (port 401 unless given)")
    add("--cafile", metavar="FILE",
        help="CA that signed the server certificate (default: the system trust store)")
    add("--server-name", metavar="NAME",
        help="name expected in the server certificate, DNS or IP (default: HOST of --upsd)")
    add("--cert", metavar="FILE", help="client certificate for mutual TLS, PEM")
    add("--key", metavar="FILE", help="its private key, PEM (default: the --cert file)")
    add_common_options(parser)
    return parser


def add_common_options(parser):
    """Adds the options both shims share, with the same names and defaults."""
    add = parser.add_argument
    add("--tls-min", choices=("1.2", "1.3"), default="1.3",
        help="lowest TLS version (default: %(default)s)")
    add("--handshake-timeout", type=float, default=10.0, metavar="S",
        help="seconds from accept until TLS is up (default: %(default)s)")
    add("--idle-timeout", type=float, default=600.0, metavar="S",
        help="close a session with no traffic either way (default: %(default)s)")
    add("--max-connections", type=int, default=1024, metavar="N",
        help="sessions at once; more are closed at accept (default: %(default)s)")
    add("--user", metavar="NAME",
        help="drop to this user after binding (default: nut, when started as root "
             "and the user exists)")
    add("--pidfile", metavar="FILE", help="write the process id here, remove it on exit")
    add("--daemon", action="store_true",
        help="detach from the terminal (for SysV init scripts); implies --syslog")
    add("--syslog", action="store_true", help="log to syslog instead of stderr")
    add("-v", "--verbose", action="count", default=0, help="more detail; repeatable")
    add("--version", action="version", version=f"{PROG}.py {VERSION}")


def parse_args(argv):
    """Parses and validates argv; returns the settings or raises ConfigError.

    Checks every option and file before any socket is opened, so a mistake
    is reported at start with the option's name, never at the first client.
    """
    try:
        settings = build_parser().parse_args(argv)
    except ValueError as exc:
        # argparse reports an unreadable @FILE itself, but lets shlex's "No
        # closing quotation" and a file that is not UTF-8 escape as ValueError.
        raise ConfigError(f"@FILE: {exc}") from None
    if settings.key and not settings.cert:
        raise ConfigError("--key needs --cert")
    settings.key = settings.key or settings.cert
    settings.default_listen = not settings.listen
    settings.listen = [parse_listen(text) for text in settings.listen or DEFAULT_LISTEN]
    for host, port in settings.listen:
        if not ipaddress.ip_address(host).is_loopback and not settings.unsafe_listen:
            raise ConfigError(f"--listen {format_address((host, port))}: not a loopback "
                              "address; clients would send passwords in plaintext across "
                              "the network (add --unsafe-listen if that is intended)")
    settings.upsd = parse_hostport(settings.upsd, UPSTREAM_PORT, "--upsd")
    settings.server_name = settings.server_name or settings.upsd[0]
    check_host(settings.server_name, "--server-name")
    check_common_options(settings)
    for option in FILE_OPTIONS:
        path = getattr(settings, option)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"--{option} {path}: no such file")
    return settings


def check_common_options(settings):
    """Validates the options both shims share; raises ConfigError naming the option."""
    for option in ("handshake_timeout", "idle_timeout"):
        if not 0 < getattr(settings, option) <= TIMEOUT_MAX:
            raise ConfigError(f"--{option.replace('_', '-')} must be a positive number of "
                              f"seconds, at most {TIMEOUT_MAX} (about 24 days)")
    if settings.max_connections < 1:
        raise ConfigError("--max-connections must be at least 1")
    settings.tls_min = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[
        settings.tls_min]
    settings.user = choose_user(settings.user)
    # --daemon changes to /: a SIGHUP reload and the pidfile's removal must
    # still find the files a relative path named at start.
    for option in (*FILE_OPTIONS, "pidfile"):
        if getattr(settings, option):
            setattr(settings, option, os.path.abspath(getattr(settings, option)))


def parse_hostport(text, default_port, option):
    """Splits HOST[:PORT] or [IPV6]:PORT; returns (host, port) or raises ConfigError."""
    host, port = text, ""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigError(f"{option} {text}: expected [IPV6]:PORT")
        port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host:
        raise ConfigError(f"{option} {text}: missing host")
    check_host(host, f"{option} {text}")
    if not port:
        return host, default_port
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} {text}: port must be 1-65535")
    return host, int(port)


def check_host(host, where):
    """Raises ConfigError (naming where) unless host is an IP address or a host name.

    The resolver and ssl encode a name with the idna codec at every
    session; a name it refuses (an empty label, a label over 63 bytes)
    would fail them all, so it is refused at start instead.
    """
    if ip_text(host) is not None:
        return
    try:
        host.encode("idna")
    except UnicodeError:
        raise ConfigError(f"{where}: {escape(host)} is not a valid host name") from None


def parse_listen(text):
    """Parses one --listen value; ADDR must be an IP address."""
    host, port = parse_hostport(text, DEFAULT_PORT, "--listen")
    if ip_text(host) is None:
        raise ConfigError(f"--listen {text}: ADDR must be an IP address")
    return host, port


def choose_user(name):
    """Returns the pwd entry to drop to, or None to keep the current user."""
    if name is None:
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("nut")
        except KeyError:
            return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"--user {name}: no such user") from None
    if os.geteuid() != 0 and entry.pw_uid != os.geteuid():
        raise ConfigError(f"--user {name}: only root can switch users")
    return entry


# --------------------------------------------------------------------------
# TLS context


def build_context(settings):
    """Returns a client SSLContext from the files named in settings.

    Verification is always on: the chain against --cafile (or the system
    store) and the name against --server-name.  Raises ConfigError naming
    the option whose file failed; called at start and again on SIGHUP
    (then possibly as the unprivileged user).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED, check_hostname
    context.minimum_version = settings.tls_min
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    # TLS 1.2 renegotiation is a second handshake inside the session: refuse it.
    # (getattr: the constant is missing when Python was built without it.)
    context.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        if settings.cafile:
            context.load_verify_locations(cafile=settings.cafile)
        else:
            context.load_default_certs()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--cafile {settings.cafile}: cannot load: "
                          f"{describe_error(exc)}") from None
    if settings.cert:
        try:
            context.load_cert_chain(settings.cert, settings.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--cert {settings.cert} / --key {settings.key}: "
                              f"cannot load: {describe_error(exc)}") from None
    return context


def own_certificate(path, option):
    """Logs the certificate's names and end date; returns the end date.

    Raises ConfigError when it has expired, so a daemon never starts with a
    certificate every client will refuse.
    """
    try:
        # The one stdlib way to read a certificate file without a TLS
        # connection; present in every CPython 3 (used by its own tests).
        info = ssl._ssl._test_decode_cert(path)  # pylint: disable=protected-access
    except (AttributeError, OSError, ssl.SSLError) as exc:
        log.warning("%s %s: cannot read its names and dates: %s", option, path,
                    describe_error(exc))
        return None
    starts, ends = (datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(info[key]),
                                                    datetime.timezone.utc)
                    for key in ("notBefore", "notAfter"))
    names = ", ".join(certificate_names(info)) or "(no names)"
    now = datetime.datetime.now(datetime.timezone.utc)
    if ends <= now:
        raise ConfigError(f"{option} {path}: certificate expired on {ends:%Y-%m-%d %H:%M} UTC")
    log.info("%s %s: %s, valid until %s UTC", option, path, names, f"{ends:%Y-%m-%d %H:%M}")
    if starts > now:
        # Not an error: a host that boots with a wrong clock must still start.
        log.warning("certificate %s is not valid before %s UTC: peers will refuse it until "
                    "then (check this host's clock)", path, f"{starts:%Y-%m-%d %H:%M}")
    warn_if_expiring(path, ends)
    return ends


def warn_if_expiring(path, ends):
    """Logs a warning when the certificate ends within EXPIRY_WARNING."""
    left = ends - datetime.datetime.now(datetime.timezone.utc)
    if left < EXPIRY_WARNING:
        log.warning("certificate %s ends in %d days (%s UTC): renew it and send SIGHUP",
                    path, max(left.days, 0), f"{ends:%Y-%m-%d %H:%M}")


# Peer certificates seen, by their DER bytes: decoding one into names costs
# more than the rest of a resumed session's setup, and peers are few.
_PEERS = {}
PEERS_CACHED = 64


def peer_certificate(tls):
    """(decoded certificate or None, its names for the log) of a TLS peer."""
    der = tls.getpeercert(binary_form=True)
    if der is None:
        return None, "none"
    known = _PEERS.get(der)
    if known is None:
        if len(_PEERS) >= PEERS_CACHED:
            _PEERS.clear()
        info = tls.getpeercert()
        known = _PEERS[der] = (info, ", ".join(certificate_names(info)))
    return known


def certificate_names(info):
    """Returns 'CN=...', 'DNS:...', 'IP:...' strings from a decoded certificate."""
    names = [f"CN={value}" for rdn in info.get("subject", ()) for key, value in rdn
             if key == "commonName"]
    for kind, value in info.get("subjectAltName", ()):
        if kind == "DNS":
            names.append(f"DNS:{value}")
        elif kind == "IP Address":
            # OpenSSL shows an IP entry of an odd length as <invalid>.
            names.append(f"IP:{ip_text(value) or value}")
    return [escape(name) for name in names]


def ip_text(value):
    """value as a canonical IP address, or None when it is not one."""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return None


# --------------------------------------------------------------------------
# The NUT line protocol


# Bytes that make upsd's parser leave the simple "words separated by blanks"
# path: quotes and backslashes can carry a line across LF, # starts a
# comment, = is a word of its own.
_SPECIAL = re.compile(rb'["\\#=]')
# upsd drops control characters and non-ASCII bytes from words (CVE-2012-2944).
_DROPPED = bytes(range(0x20)) + bytes(range(0x80, 0x100))
_START, _COMMENT, _QUOTE, _QUOTE_ESC, _WORD, _WORD_ESC = range(6)
# Bytes that end a word outside quotes: the state they lead to, and whether
# the line ends there.
_WORD_ENDS = {10: (_START, True), 35: (_COMMENT, False),
              **{blank: (_START, False) for blank in b" \t\r\x0b\x0c"}}


class LineTooLong(Exception):
    """A command line over LINE_MAX bytes."""


class CommandFramer:
    """Splits a client's byte stream into upsd's logical command lines.

    upsd reads commands with NUT's parseconf state machine: a line ends at
    LF unless the LF is inside double quotes or right after a backslash, and
    upsd answers every logical line exactly once (blank and comment-only
    lines with ERR UNKNOWN-COMMAND; measured on NUT 2.8.0).  The shim needs
    both facts: where lines end, to keep its own replies in command order,
    and the first word as upsd will read it, so that no spelling of STARTTLS
    (lowercase, quoted, with CR or dropped control bytes) slips past it.

    feed() owns the unfinished line and returns completed ones; it raises
    LineTooLong when a line grows past the limit.
    """

    def __init__(self, limit=LINE_MAX):
        self.limit = limit
        self._partial = bytearray()
        self._state = _START
        self._word = bytearray()
        self._word_done = False

    def feed(self, data):
        """Returns [(line_with_lf, FIRST_WORD_UPPERCASE)] for each line data completes."""
        if (self._state == _START and not self._partial and data.find(b"\n") == len(data) - 1
                and not _SPECIAL.search(data)):
            return [self._simple_line(data)]   # what a NUT client sends at a time
        lines = []
        pos, end = 0, len(data)
        while pos < end:
            if self._state == _START and not self._partial:
                newline = data.find(b"\n", pos)
                if newline >= 0 and not _SPECIAL.search(data, pos, newline):
                    lines.append(self._simple_line(bytes(data[pos:newline + 1])))
                    pos = newline + 1
                    continue
            pos = self._feed_slowly(data, pos, lines)
        if len(self._partial) > self.limit:
            raise LineTooLong()
        return lines

    def _simple_line(self, line):
        """(line, FIRST WORD) for a whole line without quotes, backslashes, # or =.

        Such a line needs no state machine: its words are what split() finds.
        """
        if len(line) > self.limit:
            raise LineTooLong()
        words = line.split(None, 1)
        return line, words[0].translate(None, _DROPPED).upper() if words else b""

    def buffered(self):
        """How many bytes of an unfinished line are held."""
        return len(self._partial)

    def _feed_slowly(self, data, pos, lines):
        """Runs upsd's parser byte by byte until one line ends; returns the next position."""
        state = self._state
        for index in range(pos, len(data)):
            char = data[index]
            ended = False
            if state in (_QUOTE_ESC, _WORD_ESC):
                if char != 10:
                    self._add(char)
                state = _QUOTE if state == _QUOTE_ESC else _WORD
            elif state == _QUOTE:
                if char == 34:        # "
                    self._word_done = True
                    state = _START
                elif char == 92:      # backslash
                    state = _QUOTE_ESC
                else:
                    self._add(char)
            elif state == _COMMENT:
                ended = char == 10
            else:                     # _START or _WORD
                state, ended = self._step_word(state, char)
            if ended:
                self._partial += data[pos:index + 1]
                if len(self._partial) > self.limit:
                    raise LineTooLong()
                lines.append((bytes(self._partial), bytes(self._word).upper()))
                self._partial = bytearray()
                self._word = bytearray()
                self._word_done = False
                self._state = _START
                return index + 1
        self._state = state
        self._partial += data[pos:]
        return len(data)

    def _step_word(self, state, char):
        """One byte outside quotes; returns (new state, line ended)."""
        if char in _WORD_ENDS:        # LF, # (comment) or a blank
            self._word_done = self._word_done or state == _WORD
            return _WORD_ENDS[char]
        if char == 92:                # backslash: take the next byte as it is
            return _WORD_ESC, False
        if char == 34 and state == _START:
            return _QUOTE, False
        if char == 61:                # = is a word of its own
            self._word_done = self._word_done or state == _WORD
            self._add(char)
            self._word_done = True
            return _START, False
        self._add(char)
        return _WORD, False

    def _add(self, char):
        """Adds a byte to the first word, dropping what upsd drops."""
        if not self._word_done and 0x20 <= char <= 0x7f and len(self._word) < 16:
            self._word.append(char)


class ReplyFramer:
    """Finds where upsd's replies end: one line, or BEGIN LIST ... END LIST.

    upsd sends a LIST reply in several writes, so reply boundaries, not
    read() boundaries, decide where the shim may insert a reply of its own.
    """

    def __init__(self):
        self._head = b""
        self._in_list = False

    def feed(self, data):
        """Returns the offsets in data just past each reply that data completes."""
        if (not self._in_list and not self._head and data.find(b"\n") == len(data) - 1
                and not data.startswith(b"BEGIN LIST ")):
            return [len(data)]       # one whole one-line reply, the usual case
        ends = []
        pos = 0
        while True:
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._head = (self._head + data[pos:pos + 11])[:11]
                return ends
            head = (self._head + data[pos:min(newline, pos + 11)])[:11]
            self._head = b""
            if self._in_list:
                if head.startswith(b"END LIST "):
                    self._in_list = False
                    ends.append(newline + 1)
            elif head.startswith(b"BEGIN LIST "):
                self._in_list = True
            else:
                ends.append(newline + 1)
            pos = newline + 1


# --------------------------------------------------------------------------
# Sessions


class Endpoint:
    """One side of a session: a non-blocking socket (TLS or plain) and the bytes owed to it.

    read() returns data, b'' at end of stream (FIN or TLS close_notify), or
    None when nothing is readable yet; flush() writes what the socket takes
    now.  A reset or a TLS failure raises SessionEnd naming this side.
    close() sends close_notify on TLS sockets without waiting for the
    peer's, then closes the socket.
    """

    def __init__(self, sock, name):
        self.sock = sock
        self.name = name
        self.fd = sock.fileno()
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.out = bytearray()
        self.eof = False
        self.half_closed = False
        self.received = 0
        self.sent = 0
        self.filled = False
        self.events = 0      # what the relay's poll() watches on this socket

    def use_socket(self, sock):
        """Continues on sock, the TLS layer now wrapped around this side's socket."""
        self.sock = sock
        self.fd = sock.fileno()
        self.tls = isinstance(sock, ssl.SSLSocket)

    def read(self):
        """Reads what is there now; see the class contract."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except ssl.SSLZeroReturnError:
            data = b""
        except (ssl.SSLError, OSError) as exc:
            raise self._failure(exc) from None
        self.received += len(data)
        self.eof = not data
        self.filled = len(data) == RECV_SIZE
        return data

    def flush(self):
        """Writes as much of out as the socket accepts without blocking."""
        while self.out:
            try:
                sent = self.sock.send(self.out if len(self.out) <= SEND_CHUNK
                                      else self.out[:SEND_CHUNK])
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (ssl.SSLError, OSError) as exc:
                raise self._failure(exc) from None
            del self.out[:sent]
            self.sent += sent

    def pending(self):
        """True when TLS holds decrypted bytes that poll() cannot see.

        Only a read that filled its buffer can have left some behind: a
        shorter one emptied the TLS record it came from.
        """
        return self.filled and self.tls and self.sock.pending() > 0

    def half_close(self):
        """Signals end of stream once out is written; plain TCP only.

        A TLS socket is never half-closed: Python drops the TLS layer on
        shutdown(SHUT_WR), and the peer could then no longer be read.
        """
        if not self.tls and not self.half_closed:
            self.half_closed = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                raise self._failure(exc) from None

    def close(self):
        """Sends close_notify (TLS) and closes; errors here are routine and only logged.

        A plain socket is shut down and its unread bytes discarded first, so
        the peer sees a clean end of stream rather than a reset.
        """
        if not self.tls:
            try:
                self.sock.shutdown(socket.SHUT_WR)
                while self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT):
                    pass  # discarding: the session is over
            except OSError as exc:
                log.debug("closing %s: %s", self.name, describe_error(exc))
        if self.tls:
            try:
                self.sock.unwrap()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass  # close_notify is sent; the peer's is not awaited
            except (ssl.SSLError, OSError) as exc:
                log.debug("close_notify to %s: %s", self.name, describe_error(exc))
        self.sock.close()

    def _failure(self, exc):
        """Sorts an I/O error: routine resets quietly, TLS failures at warning."""
        if isinstance(exc, ssl.SSLError):
            return SessionEnd(f"TLS error from {self.name}: {describe_error(exc)}",
                              logging.WARNING)
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            return SessionEnd(f"{self.name} reset the connection")
        return SessionEnd(f"{self.name}: {describe_error(exc)}", logging.WARNING)


class Relay:
    """Moves bytes both ways between the client and upstream until one side ends.

    upstream is upsd for upsdTLS and upsdTLS for upsmonTLS; either way the
    commands are framed as upsd reads them, so the shim's own reply to a
    command it answers itself (local_replies) goes out after upstream's
    replies to earlier commands and before later ones.  Each direction
    buffers at most BUFFER_MAX bytes before the shim stops reading its
    source.  After the client's end of stream the replies still due are
    delivered; after upstream's, the bytes queued for the client; either
    within CLOSE_TIMEOUT.  The endpoints stay owned by the session, which
    closes them.

    The idle timeout is poll()'s own timeout: the loop turns only when a
    side is ready, and every turn moves bytes, so a poll() that waits out
    the whole --idle-timeout saw no traffic either way.  (This keeps clock
    reads out of the path every request takes.)
    """

    def __init__(self, client, upstream, shared, local_replies):
        self.client, self.upstream = client, upstream
        self.shared = shared
        self.local_replies = local_replies   # {FIRST WORD: the shim's reply}
        self.commands, self.replies = CommandFramer(), ReplyFramer()
        self.due = collections.deque()   # per command in flight: None (upstream answers) or bytes
        self.poller = select.poll()
        self.poller.register(shared.stop_fd, select.POLLIN)
        self.closing_since = None

    def run(self):
        """Returns the reason the session ended; SessionEnd for resets and TLS errors."""
        client, upstream = self.client, self.upstream
        poll, stop_fd = self.poller.poll, self.shared.stop_fd
        idle_ms = self.shared.settings.idle_timeout * 1000
        while True:
            read_client, read_upstream = self.arm()
            buffered_client = read_client and client.pending()
            buffered_upstream = read_upstream and upstream.pending()
            buffered = buffered_client or buffered_upstream
            timeout = idle_ms if self.closing_since is None else self.close_wait()
            ready = dict(poll(0 if buffered else timeout))
            if stop_fd in ready:
                return "daemon stopping"
            if not ready and not buffered:
                if self.closing_since is not None:
                    return "closed with replies still due (close timeout)"
                return f"idle for {self.shared.settings.idle_timeout:g} s"
            if read_client and (client.fd in ready or buffered_client):
                self.from_client(client.read())
            if read_upstream and (upstream.fd in ready or buffered_upstream):
                self.from_upstream(upstream.read())
            if upstream.out:
                upstream.flush()
            if client.out:
                client.flush()
            if client.eof or upstream.eof:
                reason = self.ending()
                if reason:
                    return reason

    def close_wait(self):
        """Milliseconds poll() may still wait once a side has ended (CLOSE_TIMEOUT)."""
        return max(self.closing_since + CLOSE_TIMEOUT - time.monotonic(), 0) * 1000

    def arm(self):
        """Decides which sides to read and tells poll(); returns (read_client, read_upstream).

        A side that needs nothing is not watched at all: it cannot spin the
        loop with a hang-up it may not read yet.  What poll() watches seldom
        changes, so it is registered again only when it does.
        """
        client, upstream = self.client, self.upstream
        read_client = (not client.eof and not upstream.eof and len(self.due) < PENDING_MAX
                       and len(upstream.out) < BUFFER_MAX and len(client.out) < BUFFER_MAX)
        read_upstream = not upstream.eof and len(client.out) < BUFFER_MAX
        events = (select.POLLIN if read_client else 0) | (select.POLLOUT if client.out else 0)
        if events != client.events:
            self.watch(client, events)
        events = (select.POLLIN if read_upstream else 0) | (select.POLLOUT if upstream.out else 0)
        if events != upstream.events:
            self.watch(upstream, events)
        return read_client, read_upstream

    def watch(self, endpoint, events):
        """Registers events for endpoint with poll(); none at all unregisters it."""
        if events:
            self.poller.register(endpoint.fd, events)
        else:
            self.poller.unregister(endpoint.fd)
        endpoint.events = events

    def ending(self):
        """Once a side has ended: why the session is over, or None while there is more to do."""
        client, upstream = self.client, self.upstream
        if upstream.eof:
            if not client.out:
                return f"{upstream.name} closed the connection"
        elif not upstream.out:
            if not self.due and not client.out:
                return "client closed the connection"
            upstream.half_close()
        if self.closing_since is None:
            self.closing_since = time.monotonic()
        return None

    def from_client(self, data):
        """Queues the client's complete commands for upstream, answering some itself."""
        if not data:
            return
        for line, word in self.commands.feed(data):
            reply = self.local_replies.get(word)
            if reply is None:
                self.upstream.out += line
                self.due.append(None)
            elif self.due:
                self.due.append(reply)
            else:
                self.client.out += reply

    def from_upstream(self, data):
        """Queues upstream's bytes for the client, inserting the shim's replies in order."""
        if not data:
            return
        due, out = self.due, self.client.out
        start = 0
        for end in self.replies.feed(data):
            if due:
                due.popleft()
                if due and due[0] is not None:
                    out += data[start:end]
                    start = end
                    while due and due[0] is not None:
                        out += due.popleft()
        out += data[start:]


class Session:
    """One client session from accept to close.

    Owns the accepted socket and, once opened, the upsd connection; close()
    releases both whatever happened.  run() never raises for anything a peer
    does: every ending is one log line.
    """

    ids = itertools.count(1)

    def __init__(self, sock, peer, shared):
        self.shared = shared
        self.settings = shared.settings
        self.id = next(self.ids)
        self.peer = format_address(peer)
        self.started = time.monotonic()
        self.client = Endpoint(sock, "client")
        self.upstream = None
        self.context = None      # the TLS context of a verified upstream session

    def run(self):
        """Opens, relays and closes the session, logging its open and close lines."""
        reason, level = "", logging.INFO
        try:
            self.open()
            reason = self.relay()
        except SessionEnd as end:
            reason, level = str(end), end.level
        except LineTooLong:
            reason, level = f"command line over {LINE_MAX} bytes", logging.WARNING
        finally:
            self.close()
        log.log(level, "session %d closed: peer %s, %d bytes in, %d bytes out, %.3f s, %s",
                self.id, self.peer, self.client.received, self.client.sent,
                time.monotonic() - self.started, reason)

    def close(self):
        """Closes both sides, the client first, keeping the TLS session for resumption.

        Only a verified upstream session is kept (self.context is set once
        the handshake succeeded): a failed handshake has no session to give.
        """
        try:
            if self.context is not None:
                self.shared.keep_session(self.context, self.upstream.sock)
        finally:
            for endpoint in (self.client, self.upstream):
                if endpoint is not None:
                    endpoint.close()

    # -- what only upsmonTLS does: the connection upstream, STARTTLS, the
    #    client handshake

    def open(self):
        """Connects upstream, asks for STARTTLS and runs a verified TLS handshake.

        Raises SessionEnd naming the cause if any step fails; the client's
        connection is then closed without a byte relayed either way.
        """
        deadline = self.started + self.settings.handshake_timeout
        self.client.sock.setblocking(False)
        self.client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = self.connect(self.settings.upsd, "upstream", deadline)
        self.upstream = Endpoint(sock, "upstream")
        self.starttls(sock, deadline)
        context = self.shared.context
        tls = context.wrap_socket(sock, server_hostname=self.settings.server_name,
                                  session=self.shared.resumable_session(context),
                                  do_handshake_on_connect=False)
        self.upstream.use_socket(tls)
        self.handshake(tls, deadline)
        self.context = context
        _, names = peer_certificate(tls)
        log.info("session %d open: peer %s, upstream %s from local port %d, %s %s%s, "
                 "server certificate %s", self.id, self.peer,
                 format_address(self.settings.upsd), tls.getsockname()[1], tls.version(),
                 tls.cipher()[0], " (resumed)" if tls.session_reused else "", names)

    def starttls(self, sock, deadline):
        """Sends STARTTLS and requires exactly `OK STARTTLS` with nothing behind it.

        Bytes after the reply line would be a response injected by someone
        on the path before TLS protects anything; they end the session.
        """
        self.send_plain(self.upstream, b"STARTTLS\n", deadline)
        reply = b""
        while b"\n" not in reply:
            data = self.recv_plain(self.upstream, deadline)
            reply += data
            if len(reply) > LINE_MAX:
                raise SessionEnd("upstream sent an overlong reply to STARTTLS", logging.ERROR)
        line, _, extra = reply.partition(b"\n")
        if line not in (b"OK STARTTLS", b"OK STARTTLS\r"):   # one CR: a CRLF line end
            raise SessionEnd(f"upstream refused STARTTLS: {escape(line)}", logging.ERROR)
        extra_bytes = len(extra) + self.unread_bytes(sock)
        if extra_bytes:
            raise SessionEnd(f"response injection: {extra_bytes} bytes after OK STARTTLS "
                             "before TLS", logging.WARNING)

    def handshake(self, tls, deadline):
        """Runs the TLS handshake, verifying the server, bounded by deadline."""
        while True:
            try:
                tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                self.wait(tls, select.POLLIN, deadline, "TLS handshake")
            except ssl.SSLWantWriteError:
                self.wait(tls, select.POLLOUT, deadline, "TLS handshake")
            except (ssl.SSLError, OSError) as exc:
                raise SessionEnd(f"TLS handshake with upstream failed: {describe_error(exc)}",
                                 logging.ERROR) from None

    def relay(self):
        """Relays until one side ends; returns the reason (see Relay)."""
        return Relay(self.client, self.upstream, self.shared, LOCAL_REPLIES).run()

    # -- small blocking helpers for the phases before the relay

    def connect(self, address, name, deadline):
        """Returns a non-blocking TCP_NODELAY socket connected to address by deadline.

        Tries every address the host resolves to; raises SessionEnd naming
        the last cause when none answers.
        """
        host, port = address
        where = f"{name} {format_address(address)}"
        try:
            candidates = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise SessionEnd(f"cannot connect to {where}: {describe_error(exc)}",
                             logging.ERROR) from None
        error = 0
        for family, kind, proto, _, sockaddr in candidates:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                error = sock.connect_ex(sockaddr)
                if error == errno.EINPROGRESS:
                    self.wait(sock, select.POLLOUT, deadline, f"connect to {where}")
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except BaseException:
                sock.close()
                raise
            if not error:
                return sock
            sock.close()
        raise SessionEnd(f"cannot connect to {where}: {os.strerror(error)}", logging.ERROR)

    def wait(self, sock, events, deadline, phase):
        """Blocks until sock is ready for events; raises SessionEnd on deadline or stop."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SessionEnd(f"{phase} timed out after {self.settings.handshake_timeout:g} s")
        poller = select.poll()
        poller.register(sock, events)
        poller.register(self.shared.stop_fd, select.POLLIN)
        ready = dict(poller.poll(remaining * 1000))
        if self.shared.stop_fd in ready:
            raise SessionEnd("daemon stopping")
        if not ready:
            raise SessionEnd(f"{phase} timed out after {self.settings.handshake_timeout:g} s")

    def recv_plain(self, endpoint, deadline):
        """Returns the next bytes from endpoint before TLS; SessionEnd on EOF or deadline."""
        while True:
            try:
                data = endpoint.sock.recv(RECV_SIZE)
            except BlockingIOError:
                self.wait(endpoint.sock, select.POLLIN, deadline, "plaintext phase")
                continue
            except OSError as exc:
                raise SessionEnd(f"{endpoint.name}: {describe_error(exc)} before TLS") from None
            if not data:
                raise SessionEnd(f"{endpoint.name} closed the connection before TLS")
            endpoint.received += len(data)
            return data

    def send_plain(self, endpoint, data, deadline):
        """Writes all of data to endpoint before TLS and deadline, or raises SessionEnd."""
        view = memoryview(data)
        while view:
            try:
                sent = endpoint.sock.send(view)
            except BlockingIOError:
                self.wait(endpoint.sock, select.POLLOUT, deadline, "plaintext phase")
                continue
            except OSError as exc:
                raise SessionEnd(f"{endpoint.name}: {describe_error(exc)} before TLS") from None
            view = view[sent:]
            endpoint.sent += sent

    @staticmethod
    def unread_bytes(sock):
        """How many bytes already wait in the kernel, unread (0 or more)."""
        try:
            return len(sock.recv(RECV_SIZE, socket.MSG_PEEK))
        except BlockingIOError:
            return 0
        except OSError:
            return 0  # a reset shows up in the handshake that follows


# --------------------------------------------------------------------------
# The server


class Shared:
    """State every session reads: settings, the current TLS context, the stop pipe.

    The context is replaced whole on SIGHUP; a session takes the one current
    at its handshake.  The stop pipe becomes readable once, at shutdown, and
    every waiting session sees it.
    """

    def __init__(self, settings, context):
        self.settings = settings
        self.context = context
        self.stop_fd, self._stop_w = os.pipe()
        self._lock = threading.Lock()
        self._sessions = 0
        self.workers = Workers()
        # The last TLS session upstream that can be resumed, with the
        # context it belongs to: resumption skips the certificate exchange
        # and signatures, the bulk of a new session's cost.
        self._resumable = (None, None, 0.0)

    def admit(self):
        """Takes a session slot; False when --max-connections are open."""
        with self._lock:
            if self._sessions >= self.settings.max_connections:
                return False
            self._sessions += 1
            return True

    def release(self):
        """Returns a session slot."""
        with self._lock:
            self._sessions -= 1

    def sessions(self):
        """The number of sessions open now."""
        with self._lock:
            return self._sessions

    def resumable_session(self, context):
        """A TLS session to resume with context, or None."""
        owner, session, _ = self._resumable
        return session if owner is context else None

    def keep_session(self, context, tls):
        """Remembers tls's session for resumption, if the server gave a ticket.

        TLS 1.3 tickets arrive after the handshake, so this is called when
        the session ends, not when it starts.
        """
        owner, kept, since = self._resumable
        if owner is context and kept is not None and time.monotonic() - since < SESSION_REFRESH:
            return
        session = tls.session
        if session is not None and session.has_ticket:
            self._resumable = (context, session, time.monotonic())

    def stop(self):
        """Wakes every session so it closes; called once, at shutdown."""
        os.write(self._stop_w, b"x")

    def check_certificate(self):
        """The daily look at the daemon's own certificate: warns near its end."""
        if not self.settings.cert:
            return
        try:
            own_certificate(self.settings.cert, "--cert")
        except ConfigError as exc:
            log.error("%s: clients will refuse this daemon until it is renewed", exc)

    def reload(self):
        """Rebuilds the TLS context from the files on disk; keeps the old one on failure."""
        try:
            if self.settings.cert:
                own_certificate(self.settings.cert, "--cert")
            context = build_context(self.settings)
        except ConfigError as exc:
            hint = ""
            if os.geteuid() != 0:
                hint = (f" (files are read as user {pwd.getpwuid(os.geteuid()).pw_name}: "
                        "make the key readable by it, e.g. mkNUTcert.py --owner)")
            log.error("reload failed, keeping the previous certificates: %s%s", exc, hint)
            return
        self.context = context
        log.info("reloaded certificates for new sessions")


class Workers:
    """Session threads, reused: one whose session ended takes the next.

    run() hands a job to a waiting thread or starts a new one (RuntimeError
    when the system has none to give).  A waiting thread exits after
    WORKER_LINGER, so after a burst the thread count falls back to what
    steady traffic needs.
    """

    def __init__(self):
        self._waiting = []
        self._lock = threading.Lock()

    def run(self, job):
        """Runs job() in a session thread."""
        with self._lock:
            inbox = self._waiting.pop() if self._waiting else None
        if inbox is None:
            threading.Thread(target=self._work, args=(job,), daemon=True).start()
        else:
            inbox.put(job)

    def _work(self, job):
        inbox = queue.SimpleQueue()
        while job is not None:
            job()
            job = self._next(inbox)

    def _next(self, inbox):
        """The thread's next job, or None when it should exit."""
        with self._lock:
            if len(self._waiting) >= WORKERS_IDLE_MAX:
                return None
            self._waiting.append(inbox)
        try:
            return inbox.get(timeout=WORKER_LINGER)
        except queue.Empty:
            with self._lock:
                if inbox in self._waiting:
                    self._waiting.remove(inbox)
                    return None
            return inbox.get()    # a job was handed over as the wait ended


class SessionHandler(socketserver.BaseRequestHandler):
    """Runs one Session in the thread socketserver gives each connection."""

    def handle(self):
        Session(self.request, self.client_address, self.server.shared).run()


class Server(socketserver.ThreadingTCPServer):
    """One listening socket; a thread per session (see Workers), at most --max-connections."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = BACKLOG

    def __init__(self, address, shared):
        self.shared = shared
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, SessionHandler, bind_and_activate=False)
        try:
            if self.address_family == socket.AF_INET6:
                # [::] must not also claim IPv4: 0.0.0.0 has its own listener.
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def get_request(self):
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("accept failed: %s; pausing %g s", describe_error(exc), ACCEPT_BACKOFF)
                time.sleep(ACCEPT_BACKOFF)
            raise

    def verify_request(self, request, client_address):
        if self.shared.admit():
            return True
        log.warning("refused %s: %d sessions open (--max-connections)",
                    format_address(client_address), self.shared.settings.max_connections)
        return False

    def process_request(self, request, client_address):
        try:
            self.shared.workers.run(
                lambda: self.process_request_thread(request, client_address))
        except RuntimeError as exc:   # no thread could be started
            self.shared.release()
            log.error("refused %s: %s", format_address(client_address), exc)
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.shared.release()

    def handle_error(self, request, client_address):
        log.exception("bug: session from %s failed", format_address(client_address))


def open_servers(settings, shared):
    """Binds every --listen address; returns the servers or raises OSError.

    With the default listeners, an IPv6 address family this host lacks is
    skipped with a warning; an address given with --listen must bind.
    """
    servers = []
    try:
        for address in settings.listen:
            try:
                servers.append(Server(address, shared))
            except OSError as exc:
                if settings.default_listen and ":" in address[0] and exc.errno in (
                        errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    log.warning("not listening on %s: %s", format_address(address),
                                describe_error(exc))
                    continue
                raise OSError(f"cannot listen on {format_address(address)}: "
                              f"{describe_error(exc)}") from None
    except BaseException:
        for server in servers:
            server.server_close()
        raise
    return servers


# --------------------------------------------------------------------------
# Logging, privileges, daemon


def escape(text, limit=200):
    """Makes peer-supplied text safe for one log line: no control bytes, bounded length."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("latin-1")
    more = "..." if len(text) > limit else ""
    return "".join(c if c.isprintable() and c != "\\" else ascii(c)[1:-1]
                   for c in text[:limit]) + more


def describe_error(exc):
    """A short, single-line description of an exception."""
    reason = getattr(exc, "reason", None)    # not every SSLError carries one
    if isinstance(exc, ssl.SSLError) and reason:
        detail = getattr(exc, "verify_message", None)
        return escape(f"{reason}" + (f": {detail}" if detail else ""))
    return escape(exc.strerror or str(exc)) if isinstance(exc, OSError) else escape(str(exc))


def format_address(address):
    """'host:port', with IPv6 hosts in brackets."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def setup_logging(settings):
    """Logs to stderr, or to syslog with --syslog/--daemon; raises ConfigError if unusable."""
    level = logging.DEBUG if settings.verbose else logging.INFO
    # Two lines per session: skip what the format does not show, as the
    # logging HOWTO's "Optimization" section describes (the caller's source
    # line is looked up by walking the stack otherwise).
    logging._srcfile = None  # pylint: disable=protected-access
    logging.logThreads = False
    logging.logMultiprocessing = False
    if settings.syslog or settings.daemon:
        # SysLogHandler ignores a missing syslog daemon and would then drop
        # every line; find out now instead.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
                probe.connect("/dev/log")
        except OSError as exc:
            raise ConfigError(f"--syslog: cannot reach /dev/log: {describe_error(exc)}") from None
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter(f"{PROG}[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {PROG}[%(process)d] %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def daemonize():
    """Detaches from the terminal: double fork, new session, stdio to /dev/null.

    The starting process waits until the daemon calls report_ready() and
    exits with the status it reports (1 if the daemon dies first), so an
    init script learns about a bad --pidfile or --user like a foreground
    start would.  Returns the descriptor to pass to report_ready().
    """
    ready_r, ready_w = os.pipe()
    if os.fork() > 0:
        os.close(ready_w)
        status = os.read(ready_r, 1)
        os._exit(status[0] if status else 1)  # pylint: disable=protected-access
    os.close(ready_r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)  # pylint: disable=protected-access
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return ready_w


def report_ready(ready_fd, status):
    """Tells the process that started the daemon how the start went (see daemonize)."""
    if ready_fd is not None:
        os.write(ready_fd, bytes([status]))
        os.close(ready_fd)


def write_pidfile(path):
    """Writes this process's id to path; raises ConfigError naming --pidfile."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
    except OSError as exc:
        raise ConfigError(f"--pidfile {path}: {describe_error(exc)}") from None


def remove_pidfile(path):
    """Removes the pidfile if it still holds this process's id."""
    try:
        # Bytes: a codec imported this late may be unreadable after the drop.
        with open(path, "rb") as handle:
            if handle.read().strip() != str(os.getpid()).encode():
                return
        os.unlink(path)
    except OSError as exc:
        log.warning("--pidfile %s: cannot remove it: %s", path, describe_error(exc))


def raise_descriptor_limit(settings):
    """Raises the soft RLIMIT_NOFILE to what --max-connections needs, up to the hard limit.

    Each session holds two sockets; the usual soft limit of 1024 would cap
    the default 1024 sessions at about 500, with accept() failing beyond.
    """
    needed = 2 * settings.max_connections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("--max-connections %d needs about %d descriptors, the limit is %d: "
                    "raise it (ulimit -n, LimitNOFILE=)", settings.max_connections, needed, soft)


def drop_privileges(user):
    """Switches to user (groups, then gid, then uid); no-op when already that user."""
    if user is None or (os.geteuid() == user.pw_uid and os.getegid() == user.pw_gid):
        return
    os.setgroups(os.getgrouplist(user.pw_name, user.pw_gid))
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    log.info("running as user %s", user.pw_name)


def warn_unreadable_files(settings):
    """After the drop: warns about each file a SIGHUP reload could not read again."""
    for option in FILE_OPTIONS:
        path = getattr(settings, option)
        if settings.user and path and not os.access(path, os.R_OK):
            log.warning("--%s %s is not readable by user %s: a SIGHUP reload would fail "
                        "(mkNUTcert.py --owner gives keys to that user)",
                        option.replace("_", "-"), path, settings.user.pw_name)


def serve(servers, shared):
    """Runs the servers until SIGTERM or SIGINT; SIGHUP reloads certificates.

    Signal handlers only note the signal (set_wakeup_fd); this loop, in the
    main thread, acts on it.  Returns once sessions are closed or
    STOP_GRACE has passed.
    """
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: None)
    threads = [threading.Thread(target=server.serve_forever, name=f"accept-{index}",
                                daemon=True) for index, server in enumerate(servers)]
    for thread in threads:
        thread.start()
    # Logged only now, as the sign that the daemon serves: the pidfile is
    # written, privileges are dropped and every accept loop runs.
    for server in servers:
        log.info("listening on %s", format_address(server.server_address))
    last_check = time.monotonic()
    try:
        while True:
            ready, _, _ = select.select([wake_r], [], [], 3600)
            signums = os.read(wake_r, 64) if ready else b""
            if time.monotonic() - last_check > 86400:
                last_check = time.monotonic()
                shared.check_certificate()
            if signal.SIGHUP in signums:
                log.info("SIGHUP: reloading certificates")
                shared.reload()
            if signal.SIGTERM in signums or signal.SIGINT in signums:
                log.info("stopping")
                break
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        shared.stop()
        deadline = time.monotonic() + STOP_GRACE
        while shared.sessions() and time.monotonic() < deadline:
            time.sleep(0.02)
        signal.set_wakeup_fd(-1)


def main(argv=None):
    """Runs the daemon; returns the exit status (0 stop, 1 runtime failure, 2 configuration)."""
    try:
        settings = parse_args(argv)
        setup_logging(settings)
        if settings.cert:
            own_certificate(settings.cert, "--cert")
        shared = Shared(settings, build_context(settings))
    except ConfigError as exc:
        print(f"{PROG}.py: error: {exc}", file=sys.stderr)
        return 2
    raise_descriptor_limit(settings)
    try:
        servers = open_servers(settings, shared)
    except OSError as exc:
        log.error("%s", exc)
        return 1
    ready_fd = daemonize() if settings.daemon else None
    try:
        if settings.pidfile:
            write_pidfile(settings.pidfile)
        drop_privileges(settings.user)
        warn_unreadable_files(settings)
        if os.geteuid() == 0 and settings.user is None:
            log.warning("running as root: no --user given and no user nut")
    except (ConfigError, OSError) as exc:
        log.error("%s", exc)
        status = 2 if isinstance(exc, ConfigError) else 1
        report_ready(ready_fd, status)
        return status
    report_ready(ready_fd, 0)
    try:
        serve(servers, shared)
    finally:
        if settings.pidfile:
            remove_pidfile(settings.pidfile)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
