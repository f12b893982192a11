#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Speed of the shims beside a direct upsd session and a stunnel pair (`make bench`).

What runs: real upsd with the dummy UPS (test/harness.py's NutServer) and, in
front of it, side by side:

* direct   - a plain client talking to upsd itself (the floor);
* chain    - plain client -> upsmonTLS -> TLS 1.3 -> upsdTLS -> upsd, the
             deployment the shims are for;
* upsdTLS  - upsdTLS alone, the client doing STARTTLS and TLS in Python;
* stunnel  - a client-mode stunnel -> TLS 1.3 -> server-mode stunnel -> upsd,
             stunnel's defaults (session resumption on), verifying the test
             CA and host name; plain -> TLS -> plain, no STARTTLS;
* stunnel-noresume - the same pair with `sessionResume = no`, new sessions only.

What is measured, every metric for every target in one run, interleaved
round by round (the order of the targets rotates each round) and reported
as the median over rounds:

* request latency on one persistent session (GET VAR, p50 and p99);
* new sessions per second from --clients processes, each looping
  connect -> (STARTTLS + TLS for upsdTLS alone) -> GET VAR -> LOGOUT;
* latency p50/p99 of one active session while 100 and --sessions other
  established sessions are open;
* RSS per idle established session of the relay processes (once, on fresh
  processes: allocators keep freed memory, so a second look would
  under-count).

Client CPU is accounted for (the bench process for latency, the client
processes for new sessions) next to the relays' own CPU, so a client
bottleneck shows in the table.  --pin CPU pins everything (upsd, relays,
clients) to one CPU: on small VMs cross-CPU wake-ups make unpinned latency
bimodal.  The shims need a descriptor limit above 3 x --sessions: as root the
bench raises RLIMIT_NOFILE for itself and every child it starts.

Output: a table on stdout and JSON in bench/results/latest.json (--json).
No assertions: these are numbers to read, and the targets of issue #8 are
printed as met or missed.
"""

import argparse
import contextlib
import json
import multiprocessing
import os
import pathlib
import platform
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / 'test'))
import harness  # pylint: disable=wrong-import-position,import-error

REQUEST = b'GET VAR dummy ups.status\n'
LOGOUT = b'LOGOUT\n'
HOST = '127.0.0.1'
# Requests before the timed ones on a fresh session (first-use costs).
WARMUP = 50
# Idle sessions are opened this many at a time: connect all, then one
# request on each, so the relays' handshakes overlap as a real burst would.
OPEN_BATCH = 50
# A relay is quiet (its sessions torn down) when its CPU time stops moving
# for QUIET_POLLS polls of QUIET_STEP seconds; never wait over QUIET_MAX.
QUIET_STEP = 0.1
QUIET_POLLS = 3
QUIET_MAX = 20.0
# A client using more than this share of the CPUs may be the bottleneck.
CLIENT_SHARE_WARN = 0.5
# New TLS connection objects made with and without a saved session, to price
# CPython's copy of the session (measure_session_copy).
SESSION_COPIES = 500
CLOCK_TICK = os.sysconf('SC_CLK_TCK')
PAGE_KIB = os.sysconf('SC_PAGE_SIZE') // 1024
TARGET_NAMES = ('direct', 'chain', 'upsdTLS', 'stunnel', 'stunnel-noresume')
# The ratio columns of the table: (heading, numerator, denominator).
RATIOS = (('chain/direct', 'chain', 'direct'), ('chain/stunnel', 'chain', 'stunnel'),
          ('upsdTLS/stunnel', 'upsdTLS', 'stunnel'), ('stunnel/direct', 'stunnel', 'direct'))


class Target:
    """One way to reach upsd: a port, whether the client does STARTTLS, the relay pids."""

    def __init__(self, name, port, pids, starttls=False, metrics=None):
        self.name = name
        self.port = port
        self.pids = pids            # the processes whose CPU and RSS belong to this target
        self.starttls = starttls
        self.metrics = metrics      # None: every metric

    def measures(self, metric):
        """True when this target takes part in metric."""
        return self.metrics is None or metric in self.metrics


# --------------------------------------------------------------------------
# Client side: sessions, requests


def read_line(sock):
    """Reads until the reply ends in LF; raises ConnectionError on EOF."""
    data = sock.recv(4096)
    while not data.endswith(b'\n'):
        more = sock.recv(4096)
        if not more:
            raise ConnectionError(f'connection closed after {data!r}')
        data += more
    return data


def request(sock, line=REQUEST):
    """Sends one command and returns its one-line reply."""
    sock.sendall(line)
    return read_line(sock)


def tls_context(cafile):
    """The client context for upsdTLS alone: TLS 1.3, chain and name verified."""
    return harness.client_context(cafile, minimum=ssl.TLSVersion.TLSv1_3)


def open_session(port, context=None, timeout=harness.TIMEOUT):
    """Connects (and with a context, STARTTLS + handshake); returns the socket."""
    sock = socket.create_connection((HOST, port), timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            reply = request(sock, b'STARTTLS\n')
            if reply != b'OK STARTTLS\n':
                raise ConnectionError(f'STARTTLS refused: {reply!r}')
            sock = context.wrap_socket(sock, server_hostname='localhost')
    except BaseException:
        sock.close()
        raise
    return sock


def open_idle(target, context, count):
    """Opens count established sessions (one GET VAR answered on each); caller closes."""
    socks = []
    try:
        while len(socks) < count:
            group = []
            for _ in range(min(OPEN_BATCH, count - len(socks))):
                group.append(open_session(target.port, context if target.starttls else None))
                socks.append(group[-1])
            for sock in group:
                sock.sendall(REQUEST)
            for sock in group:
                reply = read_line(sock)
                if not reply.startswith(b'VAR '):
                    raise ConnectionError(f'{target.name}: unexpected reply {reply!r}')
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks):
    """Closes every socket; the relays see end of stream and tear down."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


def percentile(ordered, fraction):
    """Nearest-rank percentile of an ascending list."""
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def time_requests(target, context, count):
    """Latency of count GET VARs on one fresh session: p50/p99 in us, CPU per request.

    client_cpu_us is this process's CPU per request, relay_cpu_us that of
    the target's processes (10 ms resolution: read it over many requests).
    """
    with contextlib.closing(open_session(target.port, context if target.starttls else None)) \
            as sock:
        for _ in range(WARMUP):
            request(sock)
        samples = []
        relay_before, cpu_before = cpu_seconds(target.pids), time.process_time()
        for _ in range(count):
            start = time.perf_counter_ns()
            sock.sendall(REQUEST)
            read_line(sock)
            samples.append(time.perf_counter_ns() - start)
        client_cpu = time.process_time() - cpu_before
        relay_cpu = cpu_seconds(target.pids) - relay_before
        with contextlib.suppress(OSError):
            sock.sendall(LOGOUT)
    samples.sort()
    return {'p50_us': percentile(samples, 0.50) / 1000, 'p99_us': percentile(samples, 0.99) / 1000,
            'client_cpu_us': client_cpu / count * 1e6, 'relay_cpu_us': relay_cpu / count * 1e6}


_WORKER_CONTEXT = {}


def rate_worker(job):
    """One client process of the new-sessions test; returns (sessions, errors, CPU s).

    Loops connect -> (STARTTLS + TLS) -> GET VAR -> LOGOUT from job's start
    time for its duration; a failed session counts as an error, not a session.
    """
    port, cafile, start_at, duration = job
    context = None
    if cafile:
        context = _WORKER_CONTEXT.get(cafile) or _WORKER_CONTEXT.setdefault(
            cafile, tls_context(cafile))
    time.sleep(max(0.0, start_at - time.monotonic()))
    cpu_before = time.process_time()
    sessions = errors = 0
    end = start_at + duration
    while time.monotonic() < end:
        try:
            with contextlib.closing(open_session(port, context)) as sock:
                if not request(sock).startswith(b'VAR '):
                    raise ConnectionError('no VAR reply')
                if not request(sock, LOGOUT).startswith(b'OK Goodbye'):
                    raise ConnectionError('no OK Goodbye')
            sessions += 1
        except (OSError, ssl.SSLError):
            errors += 1
    return sessions, errors, time.process_time() - cpu_before


def measure_rate(target, pool, cafile, clients, duration):
    """New sessions/s from `clients` processes; with client and relay CPU shares."""
    start_at = time.monotonic() + 0.2
    relay_before = cpu_seconds(target.pids)
    jobs = [(target.port, cafile if target.starttls else None, start_at, duration)] * clients
    results = pool.map(rate_worker, jobs)
    relay_cpu = cpu_seconds(target.pids) - relay_before
    sessions = sum(result[0] for result in results)
    cpus = len(os.sched_getaffinity(0))
    return {'sessions_per_s': sessions / duration,
            'errors': sum(result[1] for result in results),
            'client_cpu_share': sum(result[2] for result in results) / (duration * cpus),
            'relay_cpu_us_per_session': relay_cpu / max(sessions, 1) * 1e6}


def measure_session_copy(target, cafile):
    """Microseconds CPython spends setting a saved TLS session on a new connection.

    upsmonTLS resumes its TLS sessions to upsdTLS.  CPython's session setter
    (SSLSocket.session, wrap_socket(session=)) copies the session through
    DER each time, which decodes the server's certificate again; a C relay
    such as stunnel hands OpenSSL the session as it is.  The price is
    wrap_bio() with the session minus wrap_bio() without, over
    SESSION_COPIES connection objects (no I/O).  None if upsdTLS sent no
    session ticket.
    """
    context = tls_context(cafile)
    with contextlib.closing(open_session(target.port, context)) as sock:
        request(sock)           # the session ticket arrives before this reply
        session = sock.session
    if session is None or not session.has_ticket:
        return None
    spent = {}
    for name, extra in (('without', {}), ('with', {'session': session})):
        start = time.perf_counter()
        for _ in range(SESSION_COPIES):
            context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname='localhost',
                             **extra)
        spent[name] = time.perf_counter() - start
    return (spent['with'] - spent['without']) / SESSION_COPIES * 1e6


# --------------------------------------------------------------------------
# Process accounting


def cpu_seconds(pids):
    """utime + stime of every pid (all its threads, living and ended), in seconds."""
    total = 0
    for pid in pids:
        with open(f'/proc/{pid}/stat', encoding='ascii') as stat:
            fields = stat.read().rsplit(')', 1)[1].split()
        total += int(fields[11]) + int(fields[12])      # fields 14 and 15 of proc(5)
    return total / CLOCK_TICK


def rss_kib(pids):
    """Resident memory of every pid together, in KiB."""
    total = 0
    for pid in pids:
        with open(f'/proc/{pid}/statm', encoding='ascii') as statm:
            total += int(statm.read().split()[1]) * PAGE_KIB
    return total


def wait_quiet(pids):
    """Waits until the processes stop using CPU (sessions torn down), at most QUIET_MAX."""
    deadline = time.monotonic() + QUIET_MAX
    last, still = cpu_seconds(pids), 0
    while still < QUIET_POLLS and time.monotonic() < deadline:
        time.sleep(QUIET_STEP)
        now = cpu_seconds(pids)
        still = still + 1 if now == last else 0
        last = now


def measure_rss(target, context, count):
    """KiB of relay RSS per idle established session, from count sessions."""
    wait_quiet(target.pids)
    before = rss_kib(target.pids)
    socks = open_idle(target, context, count)
    try:
        wait_quiet(target.pids)
        after = rss_kib(target.pids)
    finally:
        close_all(socks)
    wait_quiet(target.pids)
    return {'rss_kib_per_session': (after - before) / count, 'rss_kib_before': before}


def measure_crowded(target, context, others, count):
    """Latency of one active session while `others` idle sessions are open."""
    socks = open_idle(target, context, others)
    try:
        return time_requests(target, context, count)
    finally:
        close_all(socks)
        wait_quiet(target.pids)


# --------------------------------------------------------------------------
# What is measured: upsd, the shims, the stunnel pair


class BenchUpsd(harness.NutServer):  # pylint: disable=too-few-public-methods
    """The test NutServer with MAXCONN raised for the concurrency test."""

    maxconn = 4096

    def _configure(self):
        super()._configure()
        with open(self.tmpdir / 'upsd.conf', 'a', encoding='ascii') as conf:
            conf.write(f'MAXCONN {self.maxconn}\n')


def stunnel_binary():
    """The stunnel command, or None."""
    return shutil.which('stunnel4') or shutil.which('stunnel')


def start_stunnel_pair(stack, workdir, pki, upsd_port, resume=True):
    """Starts server- and client-mode stunnel; returns (client port, [pids])."""
    binary = stunnel_binary()
    server_port, client_port = harness.free_port(), harness.free_port()
    suffix = '' if resume else '-noresume'
    server_conf = workdir / f'stunnel-server{suffix}.conf'
    # foreground = yes logs to stderr *and* syslog; syslog = no keeps stunnel's
    # log in its stderr file like the shims' (without a syslog daemon glibc
    # writes to the console, which costs milliseconds per line on a VM).
    server_conf.write_text(
        'foreground = yes\npid =\nsyslog = no\n[nut]\n'
        f'accept = {HOST}:{server_port}\nconnect = {HOST}:{upsd_port}\n'
        f'cert = {pki.server_cert}\nkey = {pki.server_key}\nsslVersionMin = TLSv1.3\n',
        encoding='ascii')
    client_conf = workdir / f'stunnel-client{suffix}.conf'
    client_conf.write_text(
        'foreground = yes\npid =\nsyslog = no\n[nut]\nclient = yes\n'
        f'accept = {HOST}:{client_port}\nconnect = {HOST}:{server_port}\n'
        f'verifyChain = yes\nCAfile = {pki.ca}\ncheckHost = localhost\n'
        'sslVersionMin = TLSv1.3\n' + ('' if resume else 'sessionResume = no\n'),
        encoding='ascii')
    pids = []
    for conf in (server_conf, client_conf):
        proc = stack.enter_context(harness.Proc([binary, str(conf)],
                                                ready_marks=['Configuration successful']))
        pids.append(proc.pid)
    return client_port, pids


def start_targets(stack, workdir, pki, upsd, settings):
    """Starts every relay; returns the Targets, stopped by stack."""
    limit = str(settings.sessions + 500)
    upsd_pid = upsd.pids[-1]
    targets = [Target('direct', upsd.port, [upsd_pid])]
    ports = [harness.free_port() for _ in range(3)]
    alone = stack.enter_context(harness.start_shim(harness.UPSD_TLS, [
        '--listen', f'{HOST}:{ports[0]}', '--upsd', f'{HOST}:{upsd.port}',
        '--cert', pki.server_cert, '--key', pki.server_key, '--max-connections', limit]))
    front = stack.enter_context(harness.start_shim(harness.UPSD_TLS, [
        '--listen', f'{HOST}:{ports[1]}', '--upsd', f'{HOST}:{upsd.port}',
        '--cert', pki.server_cert, '--key', pki.server_key, '--max-connections', limit]))
    back = stack.enter_context(harness.start_shim(harness.UPSMON_TLS, [
        '--listen', f'{HOST}:{ports[2]}', '--upsd', f'{HOST}:{ports[1]}',
        '--cafile', pki.ca, '--max-connections', limit]))
    targets.append(Target('chain', ports[2], [back.pid, front.pid]))
    targets.append(Target('upsdTLS', ports[0], [alone.pid], starttls=True))
    if stunnel_binary() and not settings.no_stunnel:
        port, pids = start_stunnel_pair(stack, workdir, pki, upsd.port)
        targets.append(Target('stunnel', port, pids))
        port, pids = start_stunnel_pair(stack, workdir, pki, upsd.port, resume=False)
        targets.append(Target('stunnel-noresume', port, pids, metrics={'rate'}))
    return targets


# --------------------------------------------------------------------------
# Running, summarising, reporting


def rotated(targets, round_index):
    """The targets in this round's order: each round starts one further along."""
    shift = round_index % len(targets)
    return targets[shift:] + targets[:shift]


def run_rounds(settings, targets, pool, cafile):
    """Runs every round; returns {target: {metric_key: [value per round]}}."""
    context = tls_context(cafile)
    raw = {target.name: {} for target in targets}

    def note(target, prefix, measure, *args):
        try:
            values = measure(target, *args)
        except (OSError, ssl.SSLError) as exc:
            # One failed sample is reported, not fatal: the round goes on.
            progress(f'  {target.name}: {measure.__name__} failed: {exc!r}')
            raw[target.name].setdefault('failures', []).append(f'{measure.__name__}: {exc!r}')
            wait_quiet(target.pids)
            return
        for key, value in values.items():
            raw[target.name].setdefault(f'{prefix}{key}', []).append(value)

    for target in targets:
        if target.measures('rss'):
            close_all(open_idle(target, context, 20))       # warm-up: lazy first-use costs
            note(target, '', measure_rss, context, settings.rss_sessions)
    levels = sorted({level for level in (100, settings.sessions) if level <= settings.sessions})
    for index in range(settings.rounds):
        progress(f'round {index + 1}/{settings.rounds}')
        for target in rotated(targets, index):
            if target.measures('latency'):
                note(target, 'idle0_', time_requests, context, settings.requests)
        for target in rotated(targets, index):
            if target.measures('rate'):
                note(target, 'rate_', measure_rate, pool, cafile, settings.clients,
                     settings.duration)
                wait_quiet(target.pids)
        for level in levels:
            for target in rotated(targets, index):
                if target.measures('crowded'):
                    note(target, f'idle{level}_', measure_crowded, context, level,
                         settings.crowded_requests)
        for target in targets:
            summary = raw[target.name]
            progress('  ' + target.name + ': ' + ', '.join(
                f'{key}={values[-1]:.1f}' for key, values in summary.items()
                if key in ('rss_kib_per_session', 'idle0_p50_us', 'rate_sessions_per_s',
                           f'idle{settings.sessions}_p99_us')))
    return raw, levels


def medians(raw):
    """{target: {key: median over rounds}}."""
    return {name: {key: statistics.median(values) for key, values in keys.items()
                   if key != 'failures'}
            for name, keys in raw.items()}


def ratio(table, key, top, bottom):
    """table[top][key] / table[bottom][key], or None when either is missing."""
    try:
        return table[top][key] / table[bottom][key]
    except (KeyError, ZeroDivisionError):
        return None


def checks(table, settings):
    """The targets of issue #8, as (text, value, limit, met)."""
    crowded = f'idle{settings.sessions}_p99_us'
    rows = [
        ('chain latency p50 / stunnel', ratio(table, 'idle0_p50_us', 'chain', 'stunnel'),
         '<= 1.0', lambda value: value <= 1.0),
        ('chain new sessions/s / stunnel', ratio(table, 'rate_sessions_per_s', 'chain',
                                                 'stunnel'), '>= 1.0', lambda value: value >= 1.0),
        ('chain RSS per idle session / stunnel', ratio(table, 'rss_kib_per_session', 'chain',
                                                       'stunnel'), '<= 0.75',
         lambda value: value <= 0.75),
        (f'chain p99 with {settings.sessions} open / with none',
         ratio({'chain': table['chain'], 'none': {crowded: table['chain']['idle0_p99_us']}},
               crowded, 'chain', 'none'), '< 2.0', lambda value: value < 2.0),
    ]
    return [(text, value, limit, None if value is None else test(value))
            for text, value, limit, test in rows]


def table_rows(settings, levels):
    """(label, key, format) for each line of the table."""
    rows = [('latency p50, us', 'idle0_p50_us', '{:.0f}'),
            ('latency p99, us', 'idle0_p99_us', '{:.0f}'),
            ('  client CPU per request, us', 'idle0_client_cpu_us', '{:.0f}'),
            ('  relay CPU per request, us', 'idle0_relay_cpu_us', '{:.0f}'),
            (f'new sessions/s ({settings.clients} clients)', 'rate_sessions_per_s', '{:.0f}'),
            ('  relay CPU per session, us', 'rate_relay_cpu_us_per_session', '{:.0f}'),
            ('  client CPU share', 'rate_client_cpu_share', '{:.0%}'),
            ('  failed sessions', 'rate_errors', '{:.0f}')]
    for level in levels:
        rows += [(f'p50 with {level} open, us', f'idle{level}_p50_us', '{:.0f}'),
                 (f'p99 with {level} open, us', f'idle{level}_p99_us', '{:.0f}'),
                 ('  relay CPU per request, us', f'idle{level}_relay_cpu_us', '{:.0f}')]
    rows.append((f'RSS per idle session, KiB ({settings.rss_sessions})',
                 'rss_kib_per_session', '{:.1f}'))
    return rows


def format_table(table, settings, levels):
    """The result table as text: one column per target, then the ratios."""
    names = [name for name in TARGET_NAMES if name in table]
    ratios = [item for item in RATIOS if item[1] in table and item[2] in table]
    rows = table_rows(settings, levels)
    width = max(len(label) for label, _, _ in rows) + 2
    head = 'metric'.ljust(width) + ''.join(f'{name:>17}' for name in names)
    head += ''.join(f'{label:>16}' for label, _, _ in ratios)
    lines = [head, '-' * len(head)]
    for label, key, fmt in rows:
        cells = [table[name].get(key) for name in names]
        line = label.ljust(width) + ''.join(
            f'{"-" if value is None else fmt.format(value):>17}' for value in cells)
        cells = [ratio(table, key, top, bottom) for _, top, bottom in ratios]
        lines.append(line + ''.join(
            f'{"-" if value is None else f"{value:.2f}x":>16}' for value in cells))
    return '\n'.join(lines)


def machine():
    """What the numbers were measured on."""
    model = 'unknown CPU'
    with contextlib.suppress(OSError), open('/proc/cpuinfo', encoding='utf-8') as cpuinfo:
        for line in cpuinfo:
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
                break
    versions = {}
    for name, argv in (('upsd', [harness.UPSD_BIN, '-V']),
                       ('stunnel', [stunnel_binary() or 'stunnel', '-version'])):
        try:
            done = subprocess.run(argv, capture_output=True, timeout=harness.TIMEOUT,
                                  check=False, text=True)
            lines = (done.stdout + done.stderr).splitlines()
            versions[name] = next((line for line in lines if name in line.lower()
                                   and any(ch.isdigit() for ch in line)), '?').strip()
        except OSError:
            versions[name] = 'not installed'
    return {'cpu': model, 'cpus': os.cpu_count(),
            'affinity': sorted(os.sched_getaffinity(0)), 'kernel': platform.release(),
            'python': platform.python_version(), 'openssl': ssl.OPENSSL_VERSION, **versions}


def machine_line(info):
    """One line for the README: CPU, cores, kernel, versions."""
    pinned = '' if len(info['affinity']) == info['cpus'] else \
        f', pinned to CPU {",".join(map(str, info["affinity"]))}'
    return (f"{info['cpu']}, {info['cpus']} CPUs{pinned}; Linux {info['kernel']}; "
            f"Python {info['python']}; {info['openssl']}; {info['upsd']}; {info['stunnel']}")


def progress(text):
    """A progress line on stderr (the table goes to stdout)."""
    print(text, file=sys.stderr, flush=True)


def raise_file_limit(sessions):
    """Raises RLIMIT_NOFILE (inherited by every child) for the concurrency test.

    Returns the number of sessions that fit: each crowded session holds up
    to three descriptors in one process (the shim's two, the client's one).
    """
    need = 3 * sessions + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return sessions
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        fits = max((hard - 1024) // 3, 1)
        progress(f'RLIMIT_NOFILE {hard} is too low for --sessions {sessions}: using {fits} '
                 '(run as root or raise ulimit -n)')
        return fits
    return sessions


def parse_args(argv):
    """The bench's options; --quick shortens every phase."""
    parser = argparse.ArgumentParser(prog='bench.py',
                                     description=__doc__.split('\n', maxsplit=1)[0])
    add = parser.add_argument
    add('--quick', action='store_true', help='one round, shorter phases')
    add('--rounds', type=int, help='interleaved rounds (default 3, --quick 1)')
    add('--requests', type=int, help='timed requests per latency sample (default 3000)')
    add('--duration', type=float, help='seconds per new-sessions sample (default 2)')
    add('--clients', type=int, default=4, help='client processes for new sessions (4)')
    add('--sessions', type=int, default=1000, help='open sessions for the crowded test (1000)')
    add('--rss-sessions', type=int, default=200, help='idle sessions for RSS (200)')
    add('--pin', type=int, metavar='CPU', help='pin upsd, relays and clients to this CPU')
    add('--no-stunnel', action='store_true', help='leave the stunnel pair out')
    add('--json', default=str(HERE / 'results' / 'latest.json'), metavar='PATH',
        help='where to write the JSON results (default: bench/results/latest.json)')
    settings = parser.parse_args(argv)
    quick = settings.quick
    settings.rounds = settings.rounds or (1 if quick else 3)
    settings.requests = settings.requests or (1000 if quick else 3000)
    settings.crowded_requests = max(settings.requests // 2, 200)
    settings.duration = settings.duration or (1.0 if quick else 2.0)
    if min(settings.rounds, settings.requests, settings.clients, settings.sessions,
           settings.rss_sessions) < 1 or settings.duration <= 0:
        parser.error('counts and durations must be positive')
    return settings


def print_checks(table, result_checks, info):
    """Prints the issue #8 targets, the session copy's price and any client-bottleneck warning."""
    if result_checks:
        print('\nissue #8 targets for the chain:')
    for text, value, limit, met in result_checks:
        shown = '-' if value is None else f'{value:.2f}x'
        print(f'  {text:<42} {shown:>7}  (target {limit}): '
              f'{"met" if met else "MISSED" if met is not None else "n/a"}')
    if info.get('session_copy_us') is not None:
        print(f'  note: CPython copies a saved TLS session each time it is resumed: '
              f'{info["session_copy_us"]:.0f} us per new upstream session of upsmonTLS')
    for name, values in table.items():
        share = values.get('rate_client_cpu_share')
        if share is not None and share > CLIENT_SHARE_WARN:
            print(f'  note: {name}: the clients used {share:.0%} of the CPUs during the '
                  'new-sessions test; the client may limit that number')


def report(settings, info, raw, levels):
    """Prints the table and the targets; writes the JSON file."""
    table = medians(raw)
    result_checks = checks(table, settings) if 'stunnel' in table else []
    print(f'machine: {machine_line(info)}')
    print(f'{settings.rounds} interleaved rounds, medians; {settings.requests} requests per '
          f'latency sample, {settings.duration:g} s per new-sessions sample\n')
    print(format_table(table, settings, levels))
    print_checks(table, result_checks, info)
    path = pathlib.Path(settings.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {'machine': info, 'machine_line': machine_line(info),
                'settings': dict(vars(settings)),
                'medians': table, 'rounds': raw,
                'checks': [{'target': text, 'ratio': value, 'limit': limit, 'met': met}
                           for text, value, limit, met in result_checks]}
    temp = path.with_suffix('.tmp')
    temp.write_text(json.dumps(document, indent=2) + '\n', encoding='utf-8')
    os.replace(temp, path)
    print(f'\nJSON: {path}')


def main(argv=None):
    """Runs the bench; returns 0, or 2 when real NUT is missing."""
    settings = parse_args(argv)
    if not harness.nut_installed():
        print('bench.py: needs real NUT (/lib/nut/upsd, /lib/nut/dummy-ups)', file=sys.stderr)
        return 2
    if settings.pin is not None:
        os.sched_setaffinity(0, {settings.pin})     # inherited by every child
    settings.sessions = raise_file_limit(settings.sessions)
    BenchUpsd.maxconn = settings.sessions + settings.rss_sessions + 500
    info = machine()
    # The client processes fork now, before any socket is open here.
    pool = multiprocessing.get_context('fork').Pool(settings.clients)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix='nuttls-bench-'))
    try:
        with contextlib.ExitStack() as stack:
            progress('making certificates, starting upsd and the relays')
            pki = harness.Pki(workdir)
            upsd = stack.enter_context(BenchUpsd())
            targets = start_targets(stack, workdir, pki, upsd, settings)
            alone = next(target for target in targets if target.name == 'upsdTLS')
            info['session_copy_us'] = measure_session_copy(alone, pki.ca)
            raw, levels = run_rounds(settings, targets, pool, pki.ca)
        report(settings, info, raw, levels)
    finally:
        pool.terminate()
        pool.join()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
