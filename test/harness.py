"""Loopback test harness for the NUT TLS shims (DESIGN.md section 7).

Everything here runs on 127.0.0.1 (or ::1) on free high ports, in temporary
directories, and cleans up after itself:

* NutServer - real NUT (dummy-ups driver + upsd) with its own configuration;
  StandIn - a scripted upsd in a thread for machines without NUT;
  start_upsd() picks one.
* Tap - a recording TCP forwarder, to prove which bytes reached upsd.
* Pki - test CA and certificates made with the openssl command.
* Proc / start_shim() - run a shim script and wait until it listens.
* LineClient, client_context() - a raw NUT protocol client, plain or TLS.
* Upsmon, nss_db() - real upsmon in the foreground, NSS trust database.

Readiness is always polled with a deadline (wait_for), never slept for; every
process and thread is stopped in stop()/close()/__exit__.
"""
import atexit
import contextlib
import getpass
import os
import pathlib
import pwd
import grp
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest

# One bound for every blocking step in the tests: long enough for a loaded CI
# machine, short enough that a hang fails quickly.
TIMEOUT = 10.0

ROOT = pathlib.Path(__file__).resolve().parent.parent
UPSD_TLS = ROOT / 'upsdTLS.py'
UPSMON_TLS = ROOT / 'upsmonTLS.py'
MKNUTCERT = ROOT / 'mkNUTcert.py'
SCRIPTS = {'upsdTLS': UPSD_TLS, 'upsmonTLS': UPSMON_TLS, 'mkNUTcert': MKNUTCERT}

NUT_USER = 'nut'
UPSD_BIN = '/lib/nut/upsd'
DUMMY_BIN = '/lib/nut/dummy-ups'

# The dummy UPS: a dozen variables, served by dummy-ups or by the StandIn.
UPS_VARS = {
    'battery.charge': '100',
    'battery.runtime': '1800',
    'battery.voltage': '13.6',
    'device.type': 'ups',
    'input.voltage': '230.0',
    'output.voltage': '230.0',
    'ups.load': '23',
    'ups.mfr': 'NUT TLS shims',
    'ups.model': 'Loopback 1000',
    'ups.realpower.nominal': '600',
    'ups.status': 'OL',
    'ups.temperature': '25.0',
}


def free_port():
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout=TIMEOUT, what='condition'):
    """Poll predicate every 20 ms; return its first truthy value.

    Raises AssertionError naming `what` when the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout:g} s waiting for {what}')
        time.sleep(0.02)


# How a peer that closed while we still send shows up, plain or TLS.
CLOSED_ERRORS = (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError)


def processes_mentioning(text):
    """Pids of processes whose command line or environment contains text."""
    found = []
    for entry in pathlib.Path('/proc').iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for name in ('cmdline', 'environ'):
            with contextlib.suppress(OSError):   # gone, or not ours to read
                if text.encode() in (entry / name).read_bytes():
                    found.append(int(entry.name))
                    break
    return found


def nut_installed():
    """True when the NUT binaries the harness runs are present."""
    return (os.access(UPSD_BIN, os.X_OK) and os.access(DUMMY_BIN, os.X_OK)
            and shutil.which('upsc') is not None)


def require_nut(testcase):
    """Skip testcase without NUT, or fail it when NUTTLS_REQUIRE_NUT=1."""
    if nut_installed():
        return
    reason = f'NUT not installed ({UPSD_BIN}, {DUMMY_BIN}, upsc)'
    if os.environ.get('NUTTLS_REQUIRE_NUT') == '1':
        testcase.fail(reason + ' but NUTTLS_REQUIRE_NUT=1')
    testcase.skipTest(reason)


def start_upsd(testcase):
    """Start real NUT when installed, else a StandIn; the caller stops it."""
    if nut_installed():
        return NutServer().start()
    if os.environ.get('NUTTLS_REQUIRE_NUT') == '1':
        raise AssertionError(f'{testcase}: NUT not installed but NUTTLS_REQUIRE_NUT=1')
    return StandIn().start()


_SHARED_PKI = []


def shared_pki():
    """The run's test PKI, made once (certificates are the slow part), removed at exit."""
    if not _SHARED_PKI:
        tmpdir = tempfile.mkdtemp(prefix='nuttls-pki-')
        atexit.register(shutil.rmtree, tmpdir, True)
        _SHARED_PKI.append(Pki(tmpdir))
    return _SHARED_PKI[0]


class UpsdCase(unittest.TestCase):
    """A test class with upsd (real NUT, else the stand-in) started once, as cls.nut."""

    nut = None

    @classmethod
    def setUpClass(cls):
        cls.nut = start_upsd(cls)

    @classmethod
    def tearDownClass(cls):
        if cls.nut is not None:
            cls.nut.stop()

    def plain(self, port):
        """A plaintext line client to 127.0.0.1:port, closed at cleanup."""
        client = LineClient.connect('127.0.0.1', port)
        self.addCleanup(client.close)
        return client

    def direct(self, *commands):
        """upsd's own replies to commands, one line each, on a direct session."""
        with LineClient.connect(self.nut.host, self.nut.port) as client:
            return [client.cmd(command) for command in commands]

    def direct_list(self, query):
        """upsd's own LIST reply, on a direct session."""
        with LineClient.connect(self.nut.host, self.nut.port) as client:
            return client.read_list(query)

    def assert_line_limit(self, proc, connect):
        """Through proc (connect() gives a client): 1024 bytes with the LF pass, 1025 close.

        Both with and without quotes: a quote sends the line through the
        shim's full parser, a plain line takes its fast path, and the limit
        must not depend on which one reads it.
        """
        for text in ("G" * 1023, '"' + "G" * 1021 + '"'):     # 1024 bytes with the LF
            with self.subTest(quoted=text.startswith('"')):
                self.assertEqual(connect().cmd(text), self.direct(text)[0])
                bad = connect()
                bad.send(text.encode() + b"G\n")             # one byte more
                self.assertEqual(bad.read_until_closed(), b"")
        wait_for(lambda: proc.log_text().count("command line over 1024 bytes") == 2,
                 what="a log line for each overlong line")


def _stop_process(proc, sig=signal.SIGTERM):
    """Signal proc, wait up to TIMEOUT, then SIGKILL; return its status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(TIMEOUT)
    return proc.returncode


def _give_to_nut(path, mode):
    """chmod path; as root also chown it to root:nut so NUT can read it."""
    os.chmod(path, mode)
    if os.geteuid() == 0:
        os.chown(path, 0, grp.getgrnam(NUT_USER).gr_gid)


def _write(path, text, mode=0o640):
    path = pathlib.Path(path)
    path.write_text(text, encoding='ascii')
    _give_to_nut(path, mode)
    return path


def _log_text(path):
    try:
        return pathlib.Path(path).read_text(encoding='utf-8', errors='replace')
    except FileNotFoundError:
        return ''


class _Server:
    """Shared shape of NutServer and StandIn: attributes and with-support."""
    host = '127.0.0.1'
    ups = 'dummy'
    user = 'mon'
    password = 'pw'
    real = False

    def __init__(self, port=None):
        self.port = port or free_port()
        self.tmpdir = None
        self.pids = []

    def start(self):
        """Start serving; return self."""
        raise NotImplementedError

    def stop(self):
        """Stop serving and release everything."""
        raise NotImplementedError

    def restart(self):
        """Stop, then start again on the same port."""
        self.stop()
        return self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class NutServer(_Server):
    """Real NUT on loopback: /lib/nut/dummy-ups and /lib/nut/upsd in -F mode.

    Configuration lives in tmpdir (NUT_CONFPATH/STATEPATH/ALTPIDPATH); as root
    both daemons drop to user nut.  The driver is always stopped and started
    with upsd: dummy-ups spins on a CPU once its upsd goes away."""
    real = True

    def __init__(self, port=None):
        super().__init__(port)
        self._procs = []

    def _configure(self):
        tmp = pathlib.Path(tempfile.mkdtemp(prefix='nuttls-upsd-'))
        os.chmod(tmp, 0o755)        # so user nut can traverse into it
        state = tmp / 'state'
        state.mkdir(mode=0o770)
        _give_to_nut(state, 0o770)
        if os.geteuid() == 0:
            os.chown(state, pwd.getpwnam(NUT_USER).pw_uid, -1)
        dev = ''.join(f'{name}: {value}\n' for name, value in UPS_VARS.items())
        _write(tmp / 'dummy.dev', dev)
        _write(tmp / 'ups.conf', f'[{self.ups}]\n\tdriver = dummy-ups\n'
               f'\tport = {tmp / "dummy.dev"}\n\tdesc = "loopback test UPS"\n')
        _write(tmp / 'upsd.conf', f'LISTEN 127.0.0.1 {self.port}\n')
        _write(tmp / 'upsd.users',
               f'[{self.user}]\n\tpassword = {self.password}\n\tupsmon primary\n'
               '[admin]\n\tpassword = adminpw\n\tactions = SET\n\tinstcmds = ALL\n')
        _write(tmp / 'nut.conf', 'MODE=standalone\n')
        self.tmpdir = tmp

    def start(self):
        self._configure()
        env = dict(os.environ, NUT_CONFPATH=str(self.tmpdir),
                   NUT_STATEPATH=str(self.tmpdir / 'state'),
                   NUT_ALTPIDPATH=str(self.tmpdir / 'state'))
        try:
            for name, argv in (('dummy-ups', [DUMMY_BIN, '-a', self.ups, '-F']),
                               ('upsd', [UPSD_BIN, '-F'])):
                with open(self.tmpdir / f'{name}.log', 'wb') as log:
                    # The daemons outlive this call; stop() reaps them.
                    self._procs.append(subprocess.Popen(  # pylint: disable=consider-using-with
                        argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                        stderr=subprocess.STDOUT))
            self.pids = [proc.pid for proc in self._procs]
            wait_for(self._ready, what=f'upsd on port {self.port} to serve {self.ups}')
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self):
        for proc in self._procs:
            if proc.poll() is not None:
                raise AssertionError(f'{proc.args[0]} exited {proc.returncode}:\n'
                                     + self.log_text())
        try:
            with LineClient.connect(self.host, self.port, timeout=1.0) as client:
                reply = client.cmd(f'GET VAR {self.ups} ups.status')
        except OSError:
            return False
        # Until the driver has dumped its data, upsd answers VAR ... "WAIT".
        return reply.startswith('VAR ') and not reply.endswith('"WAIT"')

    def log_text(self):
        """Both daemons' logs, for failure messages."""
        if self.tmpdir is None:
            return ''
        return ''.join(f'--- {name}\n' + _log_text(self.tmpdir / f'{name}.log')
                       for name in ('dummy-ups', 'upsd'))

    def stop(self):
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self._procs):
            _stop_process(proc)
        self._procs = []
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


class StandIn(_Server):
    """A scripted upsd in a thread, for machines without NUT.

    One reply per LF-terminated line, as upsd 2.8.0 does (a blank line gets
    ERR UNKNOWN-COMMAND); LIST replies come in several writes.  Every line
    received is appended to `received` (bytes, without LF)."""

    def __init__(self, port=None):
        super().__init__(port)
        self.received = []
        self._lock = threading.Lock()
        self._listener = None
        self._conns = []
        self._threads = []

    def start(self):
        self._listener = socket.create_server((self.host, self.port))
        self.pids = []     # a thread in this process: no pid of its own
        self._spawn(self._accept_loop)
        return self

    def _spawn(self, target, *args):
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self):
        listener = self._listener
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return      # listener closed by stop()
            with self._lock:
                self._conns.append(conn)
            self._spawn(self._serve, conn)

    def _serve(self, conn):
        """Answer lines until EOF, reset, LOGOUT or stop()."""
        buf = b''
        with contextlib.suppress(OSError), conn:
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                while b'\n' in buf:
                    line, buf = buf.split(b'\n', 1)
                    with self._lock:
                        self.received.append(line)
                    if not self._answer(conn, line.decode('latin-1').split()):
                        return

    def _answer(self, conn, words):
        """Send the reply to one command; False when the session ends."""
        cmd = [w.upper() for w in words[:2]]
        args = [w.strip('"') for w in words]
        if cmd[:2] == ['LIST', 'VAR'] and args[2:] == [self.ups]:
            conn.sendall(f'BEGIN LIST VAR {self.ups}\n'.encode())
            for name, value in UPS_VARS.items():
                time.sleep(0.005)   # several separate writes, like upsd
                conn.sendall(f'VAR {self.ups} {name} "{value}"\n'.encode())
            conn.sendall(f'END LIST VAR {self.ups}\n'.encode())
            return True
        if cmd[:1] == ['LOGOUT']:
            conn.sendall(b'OK Goodbye\n')
            return False
        conn.sendall((self._reply(cmd, args) + '\n').encode())
        return True

    def _reply(self, cmd, args):
        if cmd == ['LIST', 'UPS'] and len(args) == 2:
            return (f'BEGIN LIST UPS\nUPS {self.ups} "loopback test UPS"\n'
                    'END LIST UPS')
        if cmd == ['GET', 'VAR'] and len(args) == 4:
            if args[2] != self.ups:
                return 'ERR UNKNOWN-UPS'
            if args[3] not in UPS_VARS:
                return 'ERR VAR-NOT-SUPPORTED'
            return f'VAR {self.ups} {args[3]} "{UPS_VARS[args[3]]}"'
        simple = {('USERNAME',): 'OK', ('PASSWORD',): 'OK', ('LOGIN',): 'OK',
                  ('STARTTLS',): 'ERR FEATURE-NOT-CONFIGURED',
                  ('VER',): 'Network UPS Tools upsd 2.8.0 - http://www.networkupstools.org/',
                  ('HELP',): 'Commands: HELP VER GET LIST SET INSTCMD LOGIN LOGOUT '
                             'USERNAME PASSWORD STARTTLS'}
        return simple.get(tuple(cmd[:1]), 'ERR UNKNOWN-COMMAND')

    def stop(self):
        if self._listener is not None:
            _close_listener(self._listener)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)     # wakes the blocked recv()
        for thread in self._threads:
            thread.join(TIMEOUT)
        self._threads = []
        self._listener = None
        for conn in conns:
            conn.close()


class Tap:
    """Recording TCP forwarder: 127.0.0.1:port -> (host, port) upstream.

    Every byte received from clients, over all connections, is appended to
    `received` (and, per connection, to streams()); replies are forwarded
    unrecorded.  After cut() nothing passes and nothing is closed, as a peer
    that vanished without FIN or RST looks."""

    def __init__(self, upstream_host, upstream_port):
        self.upstream = (upstream_host, upstream_port)
        self.received = b''
        self._streams = {}
        self._cut = threading.Event()
        self._lock = threading.Lock()
        self._socks = []
        self._threads = []
        self._listener = socket.create_server(('127.0.0.1', 0))
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop)

    def _spawn(self, target, *args):
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, TIMEOUT)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._socks += [client, upstream]
            self._spawn(self._pump, client, upstream, True)
            self._spawn(self._pump, upstream, client, False)

    def _pump(self, src, dst, record):
        """Copy src to dst until EOF or error, then shut down both ways (unless cut)."""
        with contextlib.suppress(OSError):
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self._cut.is_set():
                    continue    # swallowed: nothing passes, nothing answers
                if record:
                    with self._lock:
                        self.received += data
                        self._streams[src] = self._streams.get(src, b'') + data
                dst.sendall(data)
        if not self._cut.is_set():
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self):
        """From now on nothing passes and nothing is closed."""
        self._cut.set()

    def streams(self):
        """What each client connection sent, one bytes per connection."""
        with self._lock:
            return list(self._streams.values())

    def close(self):
        """Stop listening, cut every connection, join the threads."""
        _close_listener(self._listener)
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(TIMEOUT)
        for sock in socks:
            sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _close_listener(listener):
    """Close a listening socket another thread is blocked in accept() on.

    close() alone neither wakes accept() nor frees the port; shutdown() does."""
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
    listener.close()


def _openssl(*args, stdin=None):
    """Run openssl with an argument list; return stdout bytes."""
    done = subprocess.run(['openssl', *args], input=stdin, capture_output=True,
                          timeout=TIMEOUT, check=False)
    if done.returncode:
        raise AssertionError(f'openssl {" ".join(args)} failed:\n'
                             + done.stderr.decode(errors='replace'))
    return done.stdout


_CA_CONF = """\
[ca]
default_ca = test_ca
[test_ca]
dir = {dir}
database = $dir/index.txt
serial = $dir/serial
new_certs_dir = $dir
default_md = sha256
policy = policy_any
unique_subject = no
email_in_dn = no
copy_extensions = none
[policy_any]
commonName = supplied
[req]
distinguished_name = req_dn
[req_dn]
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
"""

_LEAF_EXT = """\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = {usage}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


# The names a loopback server certificate carries by default.
LOOPBACK_NAMES = ('localhost', '127.0.0.1', '::1')


def _pem_pair(name):
    """Properties for NAME.cert.pem and NAME.key.pem under Pki.dir."""
    return (property(lambda self: str(self.dir / f'{name}.cert.pem')),
            property(lambda self: str(self.dir / f'{name}.key.pem')))


class Pki:
    """Test certificates (EC P-256) under tmpdir, made with openssl.

    Attributes are paths (str): ca, ca_key, server_cert/key (localhost,
    127.0.0.1, ::1), client_cert/key (CN client1), client2_cert/key,
    other_ca, other_server_cert/key, other_client_cert/key (CN client1 from
    an unrelated CA), expired_server_cert/key (validity entirely in the past)."""
    ca, ca_key = _pem_pair('ca')
    other_ca, _other_ca_key = _pem_pair('other_ca')
    server_cert, server_key = _pem_pair('server')
    client_cert, client_key = _pem_pair('client1')
    client2_cert, client2_key = _pem_pair('client2')
    other_server_cert, other_server_key = _pem_pair('other_server')
    other_client_cert, other_client_key = _pem_pair('other_client')
    expired_server_cert, expired_server_key = _pem_pair('expired_server')

    def __init__(self, tmpdir):
        self.dir = pathlib.Path(tmpdir)
        self._make_ca('ca', 'NUT TLS test CA')
        self._make_ca('other_ca', 'Unrelated CA')
        self.make_server('server')
        self.make_client('client1')
        self.make_client('client2')
        self.make_server('other_server', ca='other_ca')
        self.make_client('other_client', cn='client1', ca='other_ca')
        self._make_leaf('expired_server', 'localhost', 'serverAuth',
                        _san_text(LOOPBACK_NAMES), 'ca', ('20200101000000Z', '20210101000000Z'))

    def _key(self, name):
        path = self.dir / f'{name}.key.pem'
        pem = _openssl('genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256')
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, 'wb') as out:
            out.write(pem)
        return str(path)

    def _make_ca(self, name, cn):
        cadir = self.dir / name
        cadir.mkdir()
        (cadir / 'index.txt').write_text('', encoding='ascii')
        conf = cadir / 'openssl.cnf'
        conf.write_text(_CA_CONF.format(dir=cadir), encoding='ascii')
        key = self._key(name)
        cert = str(self.dir / f'{name}.cert.pem')
        _openssl('req', '-x509', '-new', '-config', str(conf), '-extensions', 'v3_ca',
                 '-key', key, '-subj', f'/CN={cn}', '-days', '3650', '-sha256', '-out', cert)
        return cert, key

    def _make_leaf(self, name, cn, usage, san_text, ca, dates):
        key = self._key(name)
        csr = self.dir / f'{name}.csr'
        ext = self.dir / f'{name}.ext'
        cert = str(self.dir / f'{name}.cert.pem')
        ext_text = _LEAF_EXT.format(usage=usage)
        if san_text:
            ext_text += f'subjectAltName = {san_text}\n'
        ext.write_text(ext_text, encoding='ascii')
        _openssl('req', '-new', '-config', str(self.dir / ca / 'openssl.cnf'),
                 '-key', key, '-subj', f'/CN={cn}', '-out', str(csr))
        _openssl('ca', '-batch', '-notext', '-rand_serial',
                 '-config', str(self.dir / ca / 'openssl.cnf'),
                 '-cert', str(self.dir / f'{ca}.cert.pem'),
                 '-keyfile', str(self.dir / f'{ca}.key.pem'),
                 '-startdate', dates[0], '-enddate', dates[1],
                 '-extfile', str(ext), '-in', str(csr), '-out', cert)
        return cert, key

    def make_server(self, name, sans=None, days=30, ca='ca', dates=None):
        """A server certificate NAME.cert.pem/NAME.key.pem; CN = first SAN.

        dates: (notBefore, notAfter) as YYYYMMDDHHMMSSZ, instead of days from now."""
        sans = sans or LOOPBACK_NAMES
        return self._make_leaf(name, sans[0], 'serverAuth', _san_text(sans), ca,
                               dates or _validity(days))

    def make_client(self, name, cn=None, days=30, ca='ca', dates=None):
        """A client certificate NAME.cert.pem/NAME.key.pem with CN cn or name."""
        return self._make_leaf(name, cn or name, 'clientAuth', '', ca,
                               dates or _validity(days))


def _san_text(sans):
    """subjectAltName value: IP entries for addresses, DNS for names."""
    return ','.join(('IP:' if _is_ip(name) else 'DNS:') + name for name in sans)


def _validity(days):
    fmt = '%Y%m%d%H%M%SZ'
    now = time.time()
    return (time.strftime(fmt, time.gmtime(now - 3600)),
            time.strftime(fmt, time.gmtime(now + days * 86400)))


def _is_ip(text):
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return True
        except OSError:
            pass
    return False


class Proc:
    """A subprocess with stdout and stderr in a log file; stop() in finally.

    ready_marks: strings that must all appear in the log before the
    constructor returns; exiting first raises AssertionError with the log."""

    def __init__(self, argv, ready_marks=(), env=None):
        self._final_log = None
        fd, self.log_path = tempfile.mkstemp(prefix='nuttls-proc-', suffix='.log')
        with os.fdopen(fd, 'wb') as log:
            # The process outlives this call; stop() reaps it.
            self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid
        try:
            wait_for(lambda: self._has(ready_marks), what=f'{argv[:2]} to log {ready_marks}')
        except BaseException:
            self.stop()
            raise

    def _has(self, marks):
        text = self.log_text()
        if all(mark in text for mark in marks):
            return True
        if self.proc.poll() is not None:
            raise AssertionError(f'{self.proc.args} exited {self.proc.returncode} '
                                 f'before logging {list(marks)}:\n{text}')
        return False

    def log_text(self):
        """Everything the process wrote so far."""
        if self._final_log is not None:
            return self._final_log
        return _log_text(self.log_path)

    def stop(self, sig=signal.SIGTERM):
        """Send sig, wait up to TIMEOUT, then SIGKILL; return the exit status.

        The log is kept in memory (log_text() still works) and its file removed."""
        status = _stop_process(self.proc, sig)
        if self._final_log is None:
            self._final_log = self.log_text()
            os.unlink(self.log_path)
        return status

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_shim(script, args, testcase=None, user_arg=True):
    """Start [python, script, *args]; wait for 'listening on ADDR' per --listen.

    With testcase, stopping is registered with addCleanup (the log is printed
    into the failure when the test fails)."""
    args = [str(arg) for arg in args]
    if user_arg and '--user' not in args:
        args += ['--user', getpass.getuser()]
    marks = [f'listening on {args[i + 1]}' for i, arg in enumerate(args[:-1])
             if arg == '--listen']
    proc = Proc([sys.executable, str(script), *args], ready_marks=marks)
    if testcase is not None:
        testcase.addCleanup(proc.stop)
    return proc


class LineClient:
    """A raw NUT protocol client; every read is bounded by TIMEOUT."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b''

    @classmethod
    def connect(cls, host, port, timeout=TIMEOUT):
        """Connect over plain TCP."""
        return cls(socket.create_connection((host, port), timeout))

    def send(self, data):
        """Send raw bytes."""
        self.sock.sendall(data)

    def readline(self):
        """One line including its LF; b'' on EOF (partial line on EOF is returned)."""
        while b'\n' not in self.buffer:
            data = self.sock.recv(4096)
            if not data:
                line, self.buffer = self.buffer, b''
                return line
            self.buffer += data
        line, self.buffer = self.buffer.split(b'\n', 1)
        return line + b'\n'

    def read_until_closed(self):
        """Everything received until the peer closes; a reset counts as a close."""
        received = b''
        try:
            for line in iter(self.readline, b''):
                received += line
        except ConnectionResetError:
            pass  # the peer closed with our bytes unread: still a close
        return received

    def read_lines(self, count):
        """The next count lines without their LF; AssertionError on an early EOF."""
        lines = []
        for _ in range(count):
            line = self.readline()
            if not line:
                raise AssertionError(f'EOF after {lines!r}')
            lines.append(line.decode('latin-1').rstrip('\n'))
        return lines

    def cmd(self, line):
        """Send line + LF; return one reply line without LF."""
        self.send(line.encode() + b'\n')
        return self.readline().decode('latin-1').rstrip('\n')

    def read_list(self, query):
        """Send query; return its lines up to END LIST (or a single ERR line)."""
        lines = [self.cmd(query)]
        while not (lines[-1].startswith(('END LIST', 'ERR')) or lines[-1] == ''):
            lines.append(self.readline().decode('latin-1').rstrip('\n'))
        return lines

    def starttls(self, context, server_hostname):
        """Send STARTTLS; wrap the socket only on a clean 'OK STARTTLS'."""
        reply = self.cmd('STARTTLS')
        if reply == 'OK STARTTLS' and not self.buffer:
            self.wrap(context, server_hostname)
        return reply

    def wrap(self, context, server_hostname):
        """Run the TLS handshake now (after an OK STARTTLS read by the caller)."""
        if self.buffer:
            raise AssertionError(f'bytes after OK STARTTLS: {self.buffer!r}')
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    def close(self):
        """Close the socket."""
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def client_context(cafile, certfile=None, keyfile=None,
                   minimum=ssl.TLSVersion.TLSv1_2, maximum=None):
    """A client SSLContext verifying chain and name (X509 strict) against cafile."""
    context = ssl.create_default_context(cafile=cafile)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    if certfile:
        context.load_cert_chain(certfile, keyfile)
    return context


def upsmon_binary():
    """The real upsmon (/usr/sbin/upsmon on Debian is a shell wrapper)."""
    for path in ('/lib/nut/upsmon', '/sbin/upsmon', '/usr/sbin/upsmon'):
        if os.access(path, os.X_OK):
            return path
    return shutil.which('upsmon')


# Every upsmon 2.8.0 event; each is sent to syslog only, never to a command.
UPSMON_EVENTS = ('ONLINE', 'ONBATT', 'LOWBATT', 'FSD', 'COMMOK', 'COMMBAD',
                 'SHUTDOWN', 'REPLBATT', 'NOCOMM', 'NOPARENT')


class Upsmon:
    """Real upsmon in the foreground (-p -F -DD) against HOST:PORT.

    upsmon 2.8.0 reads and writes /run/nut/upsmon.pid whatever NUT_ALTPIDPATH
    says, and refuses to start when that pid is alive.  So as root it runs as
    user `nobody` (-p: one process, no privileged parent), which can neither
    read nor write /run/nut; otherwise as the current user.  -DD logs one
    'parse_status: [OL]' per poll; POLLFREQ is 1 s."""

    def __init__(self, host, port, ups='dummy', user='mon', password='pw', extra=()):
        self.tmpdir = pathlib.Path(tempfile.mkdtemp(prefix='nuttls-upsmon-'))
        os.chmod(self.tmpdir, 0o755)
        self.run_as = 'nobody' if os.geteuid() == 0 else None
        lines = [f'MONITOR {ups}@{_host_port(host, port)} 1 {user} {password} primary',
                 'MINSUPPLIES 1', 'SHUTDOWNCMD "/bin/true"', 'POLLFREQ 1',
                 'POLLFREQALERT 1', 'DEADTIME 15',
                 *(f'NOTIFYFLAG {event} SYSLOG' for event in UPSMON_EVENTS), *extra]
        conf = self.tmpdir / 'upsmon.conf'
        conf.write_text('\n'.join(lines) + '\n', encoding='ascii')
        os.chmod(conf, 0o600)
        if self.run_as:
            os.chown(conf, pwd.getpwnam(self.run_as).pw_uid, -1)
        env = dict(os.environ, NUT_CONFPATH=str(self.tmpdir),
                   NUT_STATEPATH=str(self.tmpdir), NUT_ALTPIDPATH=str(self.tmpdir))
        self.log_path = self.tmpdir / 'upsmon.log'
        with open(self.log_path, 'wb') as log:
            # upsmon outlives this call; stop() reaps it.
            self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
                [upsmon_binary(), '-p', '-F', '-DD'], env=env, user=self.run_as,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def log_text(self):
        """upsmon's debug output so far."""
        return _log_text(self.log_path)

    def polls(self):
        """How many status polls upsmon has logged."""
        return self.log_text().count('parse_status: [')

    def logged_in(self):
        """True once upsmon logged 'Logged into UPS'."""
        return 'Logged into UPS' in self.log_text()

    def stop(self):
        """SIGTERM (then SIGKILL), remove the temp dir; return the exit status."""
        status = _stop_process(self.proc)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        return status

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _host_port(host, port):
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


def upsd_clients(server):
    """The CLIENT lines of LIST CLIENT for server.ups (upsd needs no login)."""
    with LineClient.connect(server.host, server.port) as client:
        lines = client.read_list(f'LIST CLIENT {server.ups}')
    return [line for line in lines if line.startswith('CLIENT ')]


def nss_db(dirpath, ca_pem, owner=None):
    """Make an NSS database at dirpath trusting ca_pem (for upsmon CERTPATH).

    owner (default: `nobody` as root, as Upsmon runs) gets the files; every
    directory above dirpath must be searchable by it (not a 0700 temp dir)."""
    path = pathlib.Path(dirpath)
    path.mkdir(parents=True, exist_ok=True)
    for argv in (['certutil', '-N', '-d', f'sql:{path}', '--empty-password'],
                 ['certutil', '-A', '-d', f'sql:{path}', '-n', 'nuttls-ca',
                  '-t', 'CT,,', '-a', '-i', str(ca_pem)]):
        done = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, check=False)
        if done.returncode:
            raise AssertionError(f'{argv} failed:\n{done.stderr.decode(errors="replace")}')
    owner = owner or ('nobody' if os.geteuid() == 0 else None)
    if owner:
        uid = pwd.getpwnam(owner).pw_uid
        for item in [path, *path.iterdir()]:
            os.chown(item, uid, -1)
    return str(path)
