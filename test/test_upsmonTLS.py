"""upsmonTLS.py in the full chain: client -> upsmonTLS -> upsdTLS -> upsd.

Goal of these tests: stock plaintext clients get the same answers through
the chain as from upsd directly; the client's STARTTLS is answered
FEATURE-NOT-CONFIGURED in command order; nothing but STARTTLS ever goes
upstream in plaintext, a reply with extra bytes (response injection) or any
other reply closes the client; certificates are verified (CA, name, dates);
an upstream outage closes clients promptly and the shim recovers on its
own; mutual TLS works; non-loopback listening needs --unsafe-listen.  Each
success sits beside a negative control.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import unittest

import harness
from harness import TIMEOUT, LineClient, wait_for

PKI = None


def setUpModule():  # pylint: disable=invalid-name
    """The run's test PKI, for the module's helpers."""
    global PKI  # pylint: disable=global-statement
    PKI = harness.shared_pki()


class FakeUpstream:
    """A hostile or broken 'upsdTLS': answers STARTTLS with canned bytes, records input.

    Serves every connection the same way until close(); `received` holds
    all bytes it was sent.  With hang_up it closes each connection right
    after its answer.
    """

    def __init__(self, answer, hang_up=False):
        self.answer = answer
        self.hang_up = hang_up
        self.received = b""
        self.connections = 0
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return   # listener closed: the test is over
            with conn:
                conn.settimeout(TIMEOUT)
                with self._lock:
                    self.connections += 1
                try:
                    data = conn.recv(4096)
                    self._record(data)
                    conn.sendall(self.answer)
                    while data and not self.hang_up:
                        data = conn.recv(4096)
                        self._record(data)
                except OSError:
                    continue   # the shim hung up: what it sent is recorded

    def _record(self, data):
        with self._lock:
            self.received += data

    def close(self):
        """Stops accepting."""
        self.listener.close()


class ChainCase(harness.UpsdCase):
    """upsd once per class; each test builds the chain it needs."""

    def start_upsdtls(self, *extra):
        """Starts upsdTLS in front of upsd; returns its port."""
        port = harness.free_port()
        proc = harness.start_shim(harness.UPSD_TLS, [
            "--listen", f"127.0.0.1:{port}", "--upsd", f"127.0.0.1:{self.nut.port}",
            "--cert", PKI.server_cert, "--key", PKI.server_key, *extra])
        self.addCleanup(proc.stop)
        return port

    def start_upsmontls(self, upstream_port, *extra, cafile=None):
        """Starts upsmonTLS towards upstream_port; returns (proc, port)."""
        port = harness.free_port()
        args = ["--listen", f"127.0.0.1:{port}", "--upsd", f"127.0.0.1:{upstream_port}",
                *extra]
        if "--cafile" not in extra:
            args += ["--cafile", cafile or PKI.ca]
        proc = harness.start_shim(harness.UPSMON_TLS, args)
        self.addCleanup(proc.stop)
        return proc, port

    def chain(self, *upsmon_extra, upsd_extra=()):
        """Starts the whole chain; returns (upsmonTLS proc, its port)."""
        return self.start_upsmontls(self.start_upsdtls(*upsd_extra), *upsmon_extra)

    def assert_closed_without_reply(self, port, command="GET VAR dummy ups.status"):
        """A client of upsmonTLS on port gets no reply and a closed connection."""
        client = self.plain(port)
        try:
            client.send(command.encode() + b"\n")
        except harness.CLOSED_ERRORS:
            return
        self.assertEqual(client.read_until_closed(), b"")


class TestChain(ChainCase):
    """A plaintext client through the whole chain."""

    def test_same_replies_as_upsd_and_starttls_answered_locally(self):
        _, port = self.chain()
        client = self.plain(port)
        self.assertEqual(client.cmd("STARTTLS"), "ERR FEATURE-NOT-CONFIGURED")
        self.assertEqual(client.cmd("GET VAR dummy ups.status"),
                         self.direct("GET VAR dummy ups.status")[0])
        self.assertEqual(client.read_list("LIST VAR dummy"), self.direct_list("LIST VAR dummy"))
        self.assertEqual(client.read_list("LIST UPS"), self.direct_list("LIST UPS"))
        # Negative control: upsd itself does not say FEATURE-NOT-CONFIGURED
        # to the shim's STARTTLS (the chain runs TLS).
        self.assertEqual(client.cmd("starttls"), "ERR FEATURE-NOT-CONFIGURED")

    def test_pipelined_commands_keep_their_order(self):
        _, port = self.chain()
        listing = self.direct_list("LIST VAR dummy")
        ver, status = self.direct("VER", "GET VAR dummy ups.status")
        client = self.plain(port)
        client.send(b"VER\nSTARTTLS\nLIST VAR dummy\nstarttls\nGET VAR dummy ups.status\n")
        expected = [ver, "ERR FEATURE-NOT-CONFIGURED", *listing,
                    "ERR FEATURE-NOT-CONFIGURED", status]
        self.assertEqual(client.read_lines(len(expected)), expected)

    def test_line_limit_counts_the_lf_with_or_without_quotes(self):
        proc, port = self.chain()
        self.assert_line_limit(proc, lambda: self.plain(port))

    def test_mutual_tls(self):
        upsd_port = self.start_upsdtls("--client-ca", PKI.ca)
        _, with_cert = self.start_upsmontls(upsd_port, "--cert", PKI.client_cert,
                                            "--key", PKI.client_key)
        self.assertEqual(self.plain(with_cert).cmd("GET VAR dummy ups.status"),
                         'VAR dummy ups.status "OL"')
        # Negative control: the same chain without the client certificate.
        _, without = self.start_upsmontls(upsd_port)
        self.assert_closed_without_reply(without)


    def test_later_sessions_resume_tls_and_keep_the_client_certificate(self):
        proc, port = self.start_upsmontls(
            self.start_upsdtls("--client-ca", PKI.ca, "--allow-client", "client1"),
            "--cert", PKI.client_cert, "--key", PKI.client_key)
        for _ in range(3):
            with LineClient.connect("127.0.0.1", port) as client:
                self.assertEqual(client.cmd("GET VAR dummy ups.status"),
                                 'VAR dummy ups.status "OL"')
                self.assertEqual(client.cmd("LOGOUT"), "OK Goodbye")
        wait_for(lambda: proc.log_text().count("closed: peer") == 3, what="three sessions")
        opened = [line for line in proc.log_text().splitlines() if " open: " in line]
        # Negative control: the first session has nothing to resume.
        self.assertEqual(["(resumed)" in line for line in opened], [False, True, True])


class TestStockClients(ChainCase):
    """Real upsc and upsmon through the chain."""

    def setUp(self):
        harness.require_nut(self)

    def upsc(self, port):
        """upsc's stdout for the dummy UPS at port."""
        result = subprocess.run(["upsc", f"dummy@127.0.0.1:{port}"], capture_output=True,
                                text=True, timeout=TIMEOUT, check=False)
        return result.returncode, result.stdout

    def test_upsc_prints_what_upsd_gives_directly(self):
        _, port = self.chain()
        status, through = self.upsc(port)
        self.assertEqual(status, 0)
        self.assertEqual(through, self.upsc(self.nut.port)[1])
        self.assertIn("ups.status: OL", through)
        # Negative control: a chain with the wrong CA gives upsc nothing.
        _, bad = self.start_upsmontls(self.start_upsdtls(), cafile=PKI.other_ca)
        self.assertNotEqual(self.upsc(bad), (0, through))

    def test_upsmon_logs_in_and_polls(self):
        _, port = self.chain()
        with harness.Upsmon("127.0.0.1", port) as upsmon:
            wait_for(lambda: upsmon.logged_in() and upsmon.polls() >= 2,
                     what="upsmon logged in and polling through the chain")
            self.assertEqual(len(harness.upsd_clients(self.nut)), 1)
        # Negative control: with the upstream gone, upsmon cannot log in.
        _, broken = self.start_upsmontls(harness.free_port())
        with harness.Upsmon("127.0.0.1", broken) as upsmon:
            wait_for(lambda: "connect failed" in upsmon.log_text().lower() or
                     "disconnect" in upsmon.log_text().lower(), what="upsmon failing")
            self.assertFalse(upsmon.logged_in())


class TestUpstreamFailures(ChainCase):
    """Whatever goes wrong upstream closes that client; nothing leaks in plaintext."""

    def fake(self, answer, hang_up=False):
        """A FakeUpstream answering STARTTLS with answer."""
        fake = FakeUpstream(answer, hang_up)
        self.addCleanup(fake.close)
        return fake

    def test_injected_reply_after_ok_starttls_never_reaches_the_client(self):
        fake = self.fake(b'OK STARTTLS\nVAR dummy ups.status "OB LB"\n')
        proc, port = self.start_upsmontls(fake.port)
        client = self.plain(port)
        client.send(b"GET VAR dummy ups.status\n")
        self.assertEqual(client.read_until_closed(), b"")
        wait_for(lambda: "response injection" in proc.log_text(), what="injection log line")
        self.assertEqual(fake.received, b"STARTTLS\n")

    def test_refused_starttls_closes_the_client_and_sends_nothing_else(self):
        for answer in (b"ERR FEATURE-NOT-CONFIGURED\n", b"OK STARTTLS NOW\n", b"\n",
                       b"OK STARTTLS\r\r\n"):
            fake = self.fake(answer)
            proc, port = self.start_upsmontls(fake.port)
            client = self.plain(port)
            client.send(b"USERNAME mon\nPASSWORD pw\n")
            self.assertEqual(client.read_until_closed(), b"", answer)
            wait_for(lambda p=proc: "refused STARTTLS" in p.log_text(), what="log line")
            self.assertEqual(fake.received, b"STARTTLS\n", answer)

    def test_a_handshake_that_never_completes_is_logged_with_its_cause(self):
        # OK STARTTLS, then silence or a hang-up: there is no TLS session to
        # keep for resumption, and each session still ends in a close line
        # naming the cause (it once ended in a 'bug' traceback instead).
        for hang_up, cause in ((False, "TLS handshake timed out after 1 s"),
                               (True, "TLS handshake with upstream failed")):
            fake = self.fake(b"OK STARTTLS\n", hang_up)
            proc, port = self.start_upsmontls(fake.port, "--handshake-timeout", "1")
            for _ in range(2):
                self.assert_closed_without_reply(port)
            wait_for(lambda p=proc, c=cause: p.log_text().count(c) == 2, what=cause)
            self.assertNotIn("bug:", proc.log_text())
        # Negative control: a real upsdTLS behind the same options serves.
        _, port = self.start_upsmontls(self.start_upsdtls(), "--handshake-timeout", "1")
        self.assertEqual(self.plain(port).cmd("GET VAR dummy ups.status"),
                         'VAR dummy ups.status "OL"')

    def test_certificate_problems_are_refused_and_logged(self):
        upsd_port = self.start_upsdtls()
        expired_port = harness.free_port()
        expired = harness.start_shim(harness.UPSD_TLS, [
            "--listen", f"127.0.0.1:{expired_port}", "--upsd", f"127.0.0.1:{self.nut.port}",
            "--cert", PKI.server_cert, "--key", PKI.server_key])
        self.addCleanup(expired.stop)
        cases = [
            (upsd_port, ["--cafile", PKI.other_ca], "CERTIFICATE_VERIFY_FAILED"),
            (upsd_port, ["--server-name", "wrong.example"], "Hostname mismatch"),
        ]
        for upstream, extra, needle in cases:
            proc, port = self.start_upsmontls(upstream, *extra)
            self.assert_closed_without_reply(port)
            wait_for(lambda p=proc, n=needle: n in p.log_text(), what=needle)
        # Negative control: the right CA and name work against the same upsdTLS.
        _, good = self.start_upsmontls(upsd_port, "--server-name", "localhost")
        self.assertEqual(self.plain(good).cmd("GET VAR dummy ups.status"),
                         'VAR dummy ups.status "OL"')

    def test_expired_server_certificate_is_refused(self):
        # upsdTLS refuses to start with an expired certificate, so serve one
        # from a bare TLS server that answers STARTTLS like upsdTLS.
        fake = ExpiredTLSUpstream(PKI.expired_server_cert, PKI.expired_server_key)
        self.addCleanup(fake.close)
        proc, port = self.start_upsmontls(fake.port)
        self.assert_closed_without_reply(port)
        wait_for(lambda: "certificate has expired" in proc.log_text(), what="expiry log line")

    def test_upstream_down_then_back(self):
        upstream_port = harness.free_port()
        proc, port = self.start_upsmontls(upstream_port, "--handshake-timeout", "3")
        self.assert_closed_without_reply(port)
        wait_for(lambda: "cannot connect to" in proc.log_text(), what="connect error")
        upsd_tls = harness.start_shim(harness.UPSD_TLS, [
            "--listen", f"127.0.0.1:{upstream_port}", "--upsd", f"127.0.0.1:{self.nut.port}",
            "--cert", PKI.server_cert, "--key", PKI.server_key])
        self.addCleanup(upsd_tls.stop)
        self.assertEqual(self.plain(port).cmd("GET VAR dummy ups.status"),
                         'VAR dummy ups.status "OL"')
        self.assertIsNone(proc.proc.poll())

    def test_non_loopback_listen_needs_unsafe_listen(self):
        port = harness.free_port()
        result = subprocess.run(["python3", str(harness.UPSMON_TLS), "--upsd", "127.0.0.1",
                                 "--listen", f"0.0.0.0:{port}", "--cafile", PKI.ca],
                                capture_output=True, text=True, timeout=TIMEOUT, check=False)
        self.assertEqual(result.returncode, 2)
        self.assertIn("--unsafe-listen", result.stderr)
        # Negative control: with --unsafe-listen it starts.
        proc = harness.start_shim(harness.UPSMON_TLS, [
            "--upsd", "127.0.0.1", "--listen", f"0.0.0.0:{port}", "--cafile", PKI.ca,
            "--unsafe-listen"])
        self.addCleanup(proc.stop)
        self.assertIsNone(proc.proc.poll())


class TestDaemon(ChainCase):
    """Signals, pidfile and configuration errors of upsmonTLS."""

    def test_sighup_reloads_the_ca_for_new_sessions(self):
        workdir = tempfile.mkdtemp(prefix="nuttls-hup-")
        self.addCleanup(shutil.rmtree, workdir, True)
        cafile = os.path.join(workdir, "ca.pem")
        shutil.copy(PKI.other_ca, cafile)
        proc, port = self.start_upsmontls(self.start_upsdtls(), cafile=cafile)
        self.assert_closed_without_reply(port)      # the wrong CA: refused
        shutil.copy(PKI.ca, cafile)
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: "reloaded certificates" in proc.log_text(), what="reload log line")
        self.assertEqual(self.plain(port).cmd("GET VAR dummy ups.status"),
                         'VAR dummy ups.status "OL"')
        # Negative control: a broken CA file is refused and the good one kept.
        with open(cafile, "w", encoding="ascii") as handle:
            handle.write("garbage\n")
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: "reload failed, keeping the previous" in proc.log_text(),
                 what="failed reload log line")
        self.assertEqual(self.plain(port).cmd("GET VAR dummy ups.status"),
                         'VAR dummy ups.status "OL"')

    def test_sigterm_exits_0_and_removes_the_pidfile(self):
        workdir = tempfile.mkdtemp(prefix="nuttls-pid-")
        self.addCleanup(shutil.rmtree, workdir, True)
        pidfile = os.path.join(workdir, "upsmonTLS.pid")
        proc, port = self.start_upsmontls(self.start_upsdtls(), "--pidfile", pidfile)
        client = self.plain(port)
        self.assertEqual(client.cmd("GET VAR dummy ups.status"), 'VAR dummy ups.status "OL"')
        self.assertTrue(os.path.exists(pidfile))
        self.assertEqual(proc.stop(signal.SIGTERM), 0)
        self.assertFalse(os.path.exists(pidfile))
        self.assertEqual(client.readline(), b"")

    def test_configuration_errors_exit_2_naming_the_option(self):
        cases = [([], "--upsd"), (["--upsd", "h", "--cafile", "/nonexistent.pem"], "--cafile"),
                 (["--upsd", "h", "--key", PKI.client_key], "--key needs --cert"),
                 (["--upsd", "h:0"], "--upsd"), (["--upsd", "h", "--tls-min", "1.1"],
                                                   "--tls-min"),
                 (["--upsd", "h", "--cafile", PKI.server_key], "--cafile"),
                 # Values every session would fail on: refused at start instead.
                 (["--upsd", "h", "--server-name", ".localhost"], "--server-name"),
                 (["--upsd", "a" * 64 + ".example"], "--upsd"),
                 (["--upsd", "h", "--idle-timeout", "inf"], "--idle-timeout"),
                 (["--upsd", "h", "--handshake-timeout", "3e6"], "--handshake-timeout")]
        for args, needle in cases:
            result = subprocess.run(["python3", str(harness.UPSMON_TLS), "--listen",
                                     f"127.0.0.1:{harness.free_port()}", *args],
                                    capture_output=True, text=True, timeout=TIMEOUT,
                                    check=False)
            self.assertEqual(result.returncode, 2, (args, result.stderr))
            self.assertIn(needle, result.stderr, args)
        # Negative control: the largest timeouts and a name work, session and all.
        _, port = self.start_upsmontls(self.start_upsdtls(), "--server-name", "localhost",
                                       "--idle-timeout", "2147483",
                                       "--handshake-timeout", "2147483")
        self.assertEqual(self.plain(port).cmd("GET VAR dummy ups.status"),
                         'VAR dummy ups.status "OL"')


class ExpiredTLSUpstream(FakeUpstream):
    """Answers STARTTLS with OK STARTTLS, then TLS with an expired certificate."""

    def __init__(self, cert, key):
        self.context = __import__("ssl").SSLContext(__import__("ssl").PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        super().__init__(b"OK STARTTLS\n")

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    conn.recv(4096)
                    conn.sendall(self.answer)
                    self.context.wrap_socket(conn, server_side=True).close()
                except OSError:
                    continue   # the client refused the certificate, as it should


if __name__ == "__main__":
    unittest.main()
