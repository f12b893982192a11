"""Self-tests of the loopback harness: each helper does what tests rely on.

Every success is paired with a negative control where one makes sense, so a
helper that always says yes cannot pass."""
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import unittest

import harness


def setUpModule():  # pylint: disable=invalid-name
    """One Pki for the module: certificates are the slow part."""
    global PKI, PKI_DIR  # pylint: disable=global-variable-undefined
    # Lives until tearDownModule, so no with-block.
    PKI_DIR = tempfile.TemporaryDirectory(  # pylint: disable=consider-using-with
        prefix='nuttls-pki-')
    PKI = harness.Pki(PKI_DIR.name)


def tearDownModule():  # pylint: disable=invalid-name
    """Remove the certificates."""
    PKI_DIR.cleanup()


def refuses(port):
    """True when nothing accepts on 127.0.0.1:port."""
    try:
        socket.create_connection(('127.0.0.1', port), harness.TIMEOUT).close()
    except ConnectionRefusedError:
        return True
    return False


def alive(pid):
    """True when pid exists and is not a zombie."""
    try:
        with open(f'/proc/{pid}/stat', encoding='ascii') as stat:
            return stat.read().split(') ')[1][0] != 'Z'
    except FileNotFoundError:
        return False


def check_upsd_shapes(test, server):
    """The replies every upsd double must give."""
    with harness.LineClient.connect(server.host, server.port) as client:
        test.assertEqual(client.cmd('GET VAR dummy ups.status'), 'VAR dummy ups.status "OL"')
        block = client.read_list('LIST VAR dummy')
        test.assertEqual((block[0], block[-1]), ('BEGIN LIST VAR dummy', 'END LIST VAR dummy'))
        test.assertGreaterEqual(sum(line.startswith('VAR dummy ') for line in block), 12)
        test.assertEqual(client.cmd(''), 'ERR UNKNOWN-COMMAND')    # control: one reply
        test.assertEqual(client.cmd('STARTTLS'), 'ERR FEATURE-NOT-CONFIGURED')
        test.assertEqual(client.cmd('NONSENSE'), 'ERR UNKNOWN-COMMAND')
        test.assertEqual(client.cmd('LOGOUT'), 'OK Goodbye')
        test.assertEqual(client.readline(), b'')


class RealUpsdTest(unittest.TestCase):
    """NutServer runs real NUT on loopback and cleans up after itself."""

    def setUp(self):
        harness.require_nut(self)

    def test_serves_dummy_ups_and_stops_every_process(self):
        """Real upsd answers GET VAR and LIST VAR; after stop() nothing is left."""
        server = harness.NutServer().start()
        try:
            self.assertTrue(server.real)
            check_upsd_shapes(self, server)
        finally:
            server.stop()
        self.assertFalse([pid for pid in server.pids if alive(pid)])
        self.assertTrue(refuses(server.port))

    def test_restart_keeps_the_port(self):
        """restart() serves again on the same port."""
        with harness.NutServer() as server:
            port, old_pids = server.port, server.pids
            server.restart()
            self.assertEqual(server.port, port)
            self.assertNotEqual(server.pids, old_pids)
            self.assertFalse([pid for pid in old_pids if alive(pid)])
            with harness.LineClient.connect(server.host, server.port) as client:
                self.assertEqual(client.cmd('GET VAR dummy ups.status'),
                                 'VAR dummy ups.status "OL"')

    def test_upsmon_logs_in_and_polls(self):
        """upsmon appears in LIST CLIENT, polls, and leaves it when stopped."""
        with harness.NutServer() as server:
            self.assertEqual(harness.upsd_clients(server), [])   # control
            with harness.Upsmon(server.host, server.port) as upsmon:
                harness.wait_for(lambda: harness.upsd_clients(server), what='upsmon login')
                harness.wait_for(lambda: upsmon.polls() >= 2, what='two upsmon polls')
                self.assertNotIn('/run/nut/upsmon.pid: No such', upsmon.log_text())
            self.assertEqual(harness.wait_for(
                lambda: not harness.upsd_clients(server), what='logout'), True)

    def test_upsmon_with_bad_password_does_not_log_in(self):
        """Control: a wrong password never shows up as a client."""
        with harness.NutServer() as server:
            with harness.Upsmon(server.host, server.port, password='wrong') as upsmon:
                harness.wait_for(lambda: 'ACCESS-DENIED' in upsmon.log_text()
                                 or 'failed' in upsmon.log_text(), what='refused login')
                self.assertEqual(harness.upsd_clients(server), [])

    def test_upsmon_forcessl_refuses_plain_upsd(self):
        """With an NSS database and FORCESSL/CERTVERIFY, plain upsd is refused."""
        with harness.NutServer() as server:
            nss = harness.nss_db(server.tmpdir / 'nss', PKI.ca)
            extra = ['FORCESSL 1', 'CERTVERIFY 1', f'CERTPATH {nss}']
            with harness.Upsmon(server.host, server.port, extra=extra) as upsmon:
                harness.wait_for(lambda: 'SSL is not available' in upsmon.log_text(),
                                 what='upsmon to refuse plaintext')
                self.assertIn('Init SSL with cerificate database', upsmon.log_text())
                self.assertEqual(upsmon.polls(), 0)


class StandInTest(unittest.TestCase):
    """The StandIn answers like upsd and records what it got."""

    def test_same_shapes_and_records_lines(self):
        """The StandIn gives upsd's reply shapes and records every line."""
        with harness.StandIn() as server:
            self.assertFalse(server.real)
            check_upsd_shapes(self, server)
            self.assertIn(b'GET VAR dummy ups.status', server.received)
            self.assertIn(b'', server.received)
            self.assertNotIn(b'NEVER SENT', server.received)
        self.assertTrue(refuses(server.port))

    def test_restart_keeps_the_port(self):
        """restart() serves again on the same port."""
        with harness.StandIn() as server:
            port = server.port
            server.restart()
            self.assertEqual(server.port, port)
            check_upsd_shapes(self, server)

    def test_start_upsd_picks_real_nut_when_installed(self):
        """start_upsd() uses real NUT exactly when it is installed."""
        server = harness.start_upsd(self)
        self.addCleanup(server.stop)
        self.assertEqual(server.real, harness.nut_installed())


class TapTest(unittest.TestCase):
    """Tap forwards both ways and records only what clients sent."""

    def test_forwards_and_records(self):
        """Tap relays replies and records exactly the client bytes."""
        with harness.StandIn() as server, harness.Tap(server.host, server.port) as tap:
            self.assertEqual(tap.received, b'')                        # control
            for _ in range(2):
                with harness.LineClient.connect('127.0.0.1', tap.port) as client:
                    self.assertEqual(client.cmd('GET VAR dummy ups.load'),
                                     'VAR dummy ups.load "23"')
            harness.wait_for(lambda: len(server.received) == 2, what='both lines upstream')
            self.assertEqual(tap.received, b'GET VAR dummy ups.load\n' * 2)
        self.assertTrue(refuses(tap.port))


class PkiTest(unittest.TestCase):
    """Certificates pass a strict loopback handshake; bad ones fail it."""

    def handshake(self, cert, key, host, client_ca=None):
        """TLS over loopback (IPv6 for ::1) with the server on cert."""
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert, key)
        family = socket.AF_INET6 if host == '::1' else socket.AF_INET
        with socket.create_server(('::1' if host == '::1' else '127.0.0.1', 0),
                                  family=family) as listener:
            client = socket.create_connection(listener.getsockname()[:2], harness.TIMEOUT)
            conn, _ = listener.accept()
        with conn, client:
            conn.settimeout(harness.TIMEOUT)
            result = {}
            server_side = threading.Thread(
                target=lambda: result.update(error=_server_handshake(server_ctx, conn)))
            server_side.start()
            try:
                ctx = harness.client_context(client_ca or PKI.ca, PKI.client_cert, PKI.client_key)
                with ctx.wrap_socket(client, server_hostname=host) as tls:
                    return tls.version()
            finally:
                server_side.join(harness.TIMEOUT)

    def test_server_cert_verifies_strictly_for_each_name(self):
        """X509-strict handshake succeeds for localhost, 127.0.0.1 and ::1."""
        for host in ('127.0.0.1', '::1', 'localhost'):
            with self.subTest(host=host):
                self.assertEqual(self.handshake(PKI.server_cert, PKI.server_key, host),
                                 'TLSv1.3')

    def test_wrong_ca_wrong_name_and_expired_fail(self):
        """Controls: unrelated CA, a name not in the SAN, expired."""
        cases = {'other CA': (PKI.other_server_cert, PKI.other_server_key, '127.0.0.1'),
                 'expired': (PKI.expired_server_cert, PKI.expired_server_key, '127.0.0.1'),
                 'wrong name': (PKI.server_cert, PKI.server_key, '127.0.0.2')}
        for name, (cert, key, host) in cases.items():
            with self.subTest(name), self.assertRaises(ssl.SSLCertVerificationError):
                self.handshake(cert, key, host)

    def test_keys_are_private(self):
        """Private keys are mode 0600."""
        for key in (PKI.ca_key, PKI.server_key, PKI.client_key, PKI.expired_server_key):
            self.assertEqual(os.stat(key).st_mode & 0o777, 0o600, key)


def _server_handshake(context, conn):
    try:
        with context.wrap_socket(conn, server_side=True):
            pass
    except (ssl.SSLError, OSError) as exc:
        return exc
    return None


class ProcTest(unittest.TestCase):
    """start_shim waits for 'listening on', reports early exits, stops."""

    def test_waits_for_listening_and_stops(self):
        """start_shim returns once the process logs listening on, adds --user."""
        port = harness.free_port()
        script = ('import sys, time; print("listening on", sys.argv[2], '
                  'file=sys.stderr, flush=True); time.sleep(60)')
        with tempfile.NamedTemporaryFile('w', suffix='.py') as fake:
            fake.write(script)
            fake.flush()
            proc = harness.start_shim(fake.name, ['--listen', f'127.0.0.1:{port}'])
            self.assertIn('--user', proc.proc.args)
            self.assertEqual(proc.stop(), -signal.SIGTERM)
            self.assertIn('listening on 127.0.0.1', proc.log_text())
            self.assertFalse(alive(proc.pid))

    def test_early_exit_raises_with_log(self):
        """A process that exits before listening fails with its log."""
        with tempfile.NamedTemporaryFile('w', suffix='.py') as fake:
            fake.write('import sys; print("bad option", file=sys.stderr); sys.exit(2)')
            fake.flush()
            with self.assertRaisesRegex(AssertionError, 'bad option'):
                harness.start_shim(fake.name, ['--listen', '127.0.0.1:1'])

    def test_wait_for_times_out_naming_what(self):
        """wait_for returns the value, or names what it waited for."""
        with self.assertRaisesRegex(AssertionError, 'the moon'):
            harness.wait_for(lambda: False, timeout=0.05, what='the moon')
        self.assertEqual(harness.wait_for(lambda: 7), 7)


class RequireNutTest(unittest.TestCase):
    """NUTTLS_REQUIRE_NUT=1 turns a missing NUT into a failure."""

    def test_missing_nut_fails_when_required(self):
        """Missing NUT: skip by default, fail with NUTTLS_REQUIRE_NUT=1."""
        code = ('import unittest, harness\n'
                'harness.nut_installed = lambda: False\n'
                'class T(unittest.TestCase):\n'
                '    def test(self):\n        harness.require_nut(self)\n'
                'unittest.main(argv=["x"])\n')
        for required, verdict in (('1', 'FAILED'), ('', 'skipped=1')):
            env = dict(os.environ, NUTTLS_REQUIRE_NUT=required)
            done = subprocess.run([sys.executable, '-c', code], cwd=harness.ROOT / 'test',
                                  env=env, capture_output=True, text=True,
                                  timeout=harness.TIMEOUT, check=False)
            self.assertIn(verdict, done.stderr)


if __name__ == '__main__':
    unittest.main()
