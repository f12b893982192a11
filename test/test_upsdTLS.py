"""upsdTLS.py against real upsd on loopback (the stand-in where NUT is missing).

Goal of these tests: the shim serves only STARTTLS and LOGOUT before TLS and
lets nothing through to upsd until TLS is up; inside TLS it relays
transparently, answers a second STARTTLS itself and keeps replies in command
order; stock NUT clients (upsc, upsmon with FORCESSL/CERTVERIFY) work
against it; TLS versions, client certificates, timeouts, limits, signals
and configuration errors behave as DESIGN.md section 3 and 6 say.  Each
success sits beside a negative control.
"""

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest

import harness
from harness import TIMEOUT, LineClient, wait_for

PKI = None


def setUpModule():  # pylint: disable=invalid-name
    """The run's test PKI, for the module's helpers."""
    global PKI  # pylint: disable=global-statement
    PKI = harness.shared_pki()


def client_context(maximum=None, cert=None, key=None, cafile=None):
    """A verifying client context for the test CA."""
    return harness.client_context(cafile or PKI.ca, certfile=cert, keyfile=key,
                                  maximum=maximum)


def process_counts(pid):
    """(threads, open descriptors) of a process."""
    return (len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd")))


def read_file(path):
    """The text of path, or '' while it does not exist."""
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def alive(pid):
    """True while pid runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def current_user():
    """The name of the user running the tests."""
    return pwd.getpwuid(os.geteuid()).pw_name


class ShimCase(harness.UpsdCase):
    """Starts upsd once per class; each test starts the upsdTLS it needs."""

    def start_shim(self, *extra, upsd_port=None, cert=None, key=None, port=None):
        """Starts upsdTLS on a free loopback port; returns (proc, port)."""
        port = port or harness.free_port()
        args = ["--listen", f"127.0.0.1:{port}",
                "--upsd", f"127.0.0.1:{upsd_port or self.nut.port}",
                "--cert", cert or PKI.server_cert, "--key", key or PKI.server_key, *extra]
        proc = harness.start_shim(harness.UPSD_TLS, args)
        self.addCleanup(proc.stop)
        return proc, port

    def tap(self):
        """A recording forwarder in front of upsd: proves what reached it."""
        tap = harness.Tap(self.nut.host, self.nut.port)
        self.addCleanup(tap.close)
        return tap

    def tls(self, port, context=None, server_hostname="127.0.0.1"):
        """A client that has done STARTTLS and the handshake."""
        client = self.plain(port)
        self.assertEqual(client.starttls(context or client_context(), server_hostname),
                         "OK STARTTLS")
        return client


class TestSession(ShimCase):
    """The protocol as a STARTTLS client sees it."""

    def test_starttls_gives_tls13_and_the_same_replies_as_upsd(self):
        _, port = self.start_shim()
        client = self.tls(port)
        self.assertEqual(client.sock.version(), "TLSv1.3")
        self.assertEqual(client.cmd("GET VAR dummy ups.status"), 'VAR dummy ups.status "OL"')
        self.assertEqual(client.read_list("LIST VAR dummy"), self.direct_list("LIST VAR dummy"))
        self.assertEqual(client.cmd("VER"), self.direct("VER")[0])
        # Negative control: the same GET before STARTTLS is refused.
        self.assertEqual(self.plain(port).cmd("GET VAR dummy ups.status"),
                         "ERR TLS-NOT-ENABLED")

    def test_plaintext_commands_are_refused_and_never_reach_upsd(self):
        tap = self.tap()
        _, port = self.start_shim(upsd_port=tap.port)
        client = self.plain(port)
        for command in ("GET VAR dummy ups.status", "LIST VAR dummy", "USERNAME mon",
                        "PASSWORD pw", "LOGIN dummy", "VER", "HELP", "STARTTLSX"):
            self.assertEqual(client.cmd(command), "ERR TLS-NOT-ENABLED", command)
        client.send(b"\n\n")    # blank lines are ignored: the next reply is VER's
        self.assertEqual(client.cmd("VER"), "ERR TLS-NOT-ENABLED")
        self.assertEqual(tap.received, b"")
        # Negative control: once TLS is up the same command does reach upsd.
        self.assertEqual(self.tls(port).cmd("VER"), self.direct("VER")[0])
        wait_for(lambda: b"VER\n" in tap.received, what="VER at upsd")

    def test_starttls_is_recognised_in_any_case_and_with_crlf(self):
        _, port = self.start_shim()
        for spelling in (b"starttls\r\n", b"StartTls\n", b"  STARTTLS \r\n", b'"STARTTLS"\n'):
            client = self.plain(port)
            client.send(spelling)
            self.assertEqual(client.readline(), b"OK STARTTLS\n", spelling)
            client.wrap(client_context(), "127.0.0.1")
            self.assertEqual(client.cmd("GET VAR dummy ups.status"),
                             'VAR dummy ups.status "OL"')

    def test_second_starttls_is_answered_by_the_shim(self):
        tap = self.tap()
        _, port = self.start_shim(upsd_port=tap.port)
        client = self.tls(port)
        self.assertEqual(client.cmd("STARTTLS"), "ERR ALREADY-SSL-MODE")
        self.assertEqual(client.cmd("starttls"), "ERR ALREADY-SSL-MODE")
        self.assertEqual(client.cmd("GET VAR dummy ups.status"), 'VAR dummy ups.status "OL"')
        self.assertNotIn(b"STARTTLS", tap.received.upper())
        # Negative control: upsd itself would have answered differently.
        self.assertNotEqual(self.direct("STARTTLS")[0], "ERR ALREADY-SSL-MODE")

    def test_pipelined_commands_keep_their_order(self):
        _, port = self.start_shim()
        listing = self.direct_list("LIST VAR dummy")
        ver, status, unknown = self.direct("VER", "GET VAR dummy ups.status", "")
        client = self.tls(port)
        client.send(b"GET VAR dummy ups.status\nSTARTTLS\nLIST VAR dummy\nSTARTTLS\n\n"
                    b"STARTTLS\nVER\nstarttls\n")
        expected = [status, "ERR ALREADY-SSL-MODE", *listing, "ERR ALREADY-SSL-MODE",
                    unknown, "ERR ALREADY-SSL-MODE", ver, "ERR ALREADY-SSL-MODE"]
        self.assertEqual(client.read_lines(len(expected)), expected)
        # Negative control: a STARTTLS alone is answered at once.
        self.assertEqual(client.cmd("STARTTLS"), "ERR ALREADY-SSL-MODE")

    def test_logout_before_and_after_tls(self):
        _, port = self.start_shim()
        client = self.plain(port)
        self.assertEqual(client.cmd("LOGOUT"), "OK Goodbye")
        self.assertEqual(client.readline(), b"")
        client = self.tls(port)
        self.assertEqual(client.cmd("LOGOUT"), "OK Goodbye")
        self.assertEqual(client.readline(), b"")
        # Negative control: without LOGOUT the session stays open.
        client = self.tls(port)
        self.assertEqual(client.cmd("GET VAR dummy ups.status"), 'VAR dummy ups.status "OL"')

    def test_commands_pipelined_behind_starttls_are_never_executed(self):
        tap = self.tap()
        proc, port = self.start_shim(upsd_port=tap.port)
        for attack in (b"STARTTLS\nGET VAR dummy ups.status\n", b"STARTTLS\r\nVER\n",
                       b"STARTTLS\nx", b"GET VAR dummy ups.status\nSTARTTLS\nLOGIN dummy\n"):
            client = self.plain(port)
            client.send(attack)
            replies = client.read_until_closed()
            self.assertNotIn(b"OK STARTTLS", replies, attack)
            self.assertNotIn(b"VAR dummy", replies, attack)
        wait_for(lambda: proc.log_text().count("STARTTLS injection attempt") == 4,
                 what="four injection log lines")
        self.assertEqual(tap.received, b"")
        # Negative control: STARTTLS alone still works.
        self.assertEqual(self.tls(port).cmd("VER"), self.direct("VER")[0])

    def test_overlong_line_closes_only_that_connection(self):
        proc, port = self.start_shim()
        good = self.tls(port)
        for phase in ("plaintext", "tls"):
            bad = self.plain(port) if phase == "plaintext" else self.tls(port)
            try:
                bad.send(b"G" * 100_000)
            except harness.CLOSED_ERRORS:
                pass  # the shim may close while the line is still arriving
            self.assertEqual(bad.read_until_closed(), b"", phase)
        # The close line follows the close, so the client may see EOF first.
        wait_for(lambda: proc.log_text().count("command line over 1024 bytes") == 2,
                 what="a long-line log line for each phase")
        self.assertEqual(good.cmd("GET VAR dummy ups.status"), 'VAR dummy ups.status "OL"')

    def test_line_limit_counts_the_lf_with_or_without_quotes(self):
        proc, port = self.start_shim()
        self.assert_line_limit(proc, lambda: self.tls(port))

    def test_upsd_down_closes_the_session_and_the_shim_keeps_running(self):
        dead_port = harness.free_port()
        proc, port = self.start_shim(upsd_port=dead_port)
        client = self.plain(port)
        self.assertEqual(client.starttls(client_context(), "127.0.0.1"), "OK STARTTLS")
        self.assertEqual(client.readline(), b"")
        wait_for(lambda: "cannot connect to upsd" in proc.log_text(), what="connect error log")
        self.assertIsNone(proc.proc.poll())
        # Negative control: a shim pointing at the live upsd serves.
        _, good_port = self.start_shim()
        self.assertEqual(self.tls(good_port).cmd("VER"), self.direct("VER")[0])

    def test_session_log_lines(self):
        proc, port = self.start_shim()
        client = self.tls(port)
        client.cmd("GET VAR dummy ups.status")
        local = client.sock.getsockname()[1]
        client.close()
        wait_for(lambda: "closed: peer" in proc.log_text(), what="close line")
        text = proc.log_text()
        self.assertRegex(text, rf"session \d+ open: peer 127\.0\.0\.1:{local}, TLSv1\.3 "
                               r"TLS_\S+, client certificate none, upsd 127\.0\.0\.1:\d+ "
                               r"from local port \d+")
        self.assertRegex(text, rf"session \d+ closed: peer 127\.0\.0\.1:{local}, \d+ bytes in, "
                               r"\d+ bytes out, [\d.]+ s, client closed the connection")

    def test_ipv6_listener(self):
        if not socket.has_ipv6:
            self.skipTest("no IPv6 on this host")
        port = harness.free_port()
        proc = harness.start_shim(harness.UPSD_TLS, [
            "--listen", f"[::1]:{port}", "--upsd", f"127.0.0.1:{self.nut.port}",
            "--cert", PKI.server_cert, "--key", PKI.server_key])
        self.addCleanup(proc.stop)
        client = LineClient.connect("::1", port)
        self.addCleanup(client.close)
        self.assertEqual(client.starttls(client_context(), "::1"), "OK STARTTLS")
        self.assertEqual(client.cmd("GET VAR dummy ups.status"), 'VAR dummy ups.status "OL"')
        # Negative control: the IPv4 loopback on that port has no listener.
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()


class TestStockClients(ShimCase):
    """Real upsc and upsmon pointed directly at upsdTLS."""

    def setUp(self):
        harness.require_nut(self)

    def test_upsc_reads_status_over_tls(self):
        proc, port = self.start_shim()
        result = subprocess.run(["upsc", f"dummy@127.0.0.1:{port}", "ups.status"],
                                capture_output=True, text=True, timeout=TIMEOUT, check=False)
        self.assertEqual((result.returncode, result.stdout), (0, "OL\n"), result.stderr)
        self.assertIn("SSL handshake done", result.stderr)
        self.assertRegex(proc.log_text(), r"open: .*TLSv1\.3")
        # Negative control: under --client-ca, upsc (no certificate) gets nothing.
        _, strict_port = self.start_shim("--client-ca", PKI.ca)
        result = subprocess.run(["upsc", f"dummy@127.0.0.1:{strict_port}", "ups.status"],
                                capture_output=True, text=True, timeout=TIMEOUT, check=False)
        self.assertNotEqual(result.stdout, "OL\n")

    def test_upsmon_with_forcessl_and_certverify_logs_in_and_polls(self):
        _, port = self.start_shim()
        for ca, works in ((PKI.ca, True), (PKI.other_ca, False)):
            nssdir = tempfile.mkdtemp(prefix="nuttls-nss-")
            self.addCleanup(shutil.rmtree, nssdir, True)
            os.chmod(nssdir, 0o755)   # upsmon runs as an unprivileged user
            harness.nss_db(os.path.join(nssdir, "db"), ca)
            with harness.Upsmon("127.0.0.1", port, extra=[
                    "FORCESSL 1", "CERTVERIFY 1", f"CERTPATH {nssdir}/db"]) as upsmon:
                if works:
                    wait_for(lambda m=upsmon: m.logged_in() and m.polls() >= 2,
                             what="upsmon logged in and polling through upsdTLS")
                    self.assertEqual(len(harness.upsd_clients(self.nut)), 1)
                else:
                    # Negative control: an NSS database without the CA refuses upsdTLS.
                    wait_for(lambda m=upsmon: "SSL" in m.log_text() and "failed" in
                             m.log_text(), what="upsmon refusing the untrusted certificate")
                    self.assertFalse(upsmon.logged_in())
                    self.assertEqual(upsmon.polls(), 0)


class TestTLSPolicy(ShimCase):
    """Versions and client certificates."""

    def test_tls12_needs_tls_min(self):
        _, port = self.start_shim()
        tls12 = client_context(maximum=ssl.TLSVersion.TLSv1_2)
        client = self.plain(port)
        with self.assertRaises(ssl.SSLError):
            client.starttls(tls12, "127.0.0.1")
        _, port12 = self.start_shim("--tls-min", "1.2")
        client = self.tls(port12, tls12)
        self.assertEqual(client.sock.version(), "TLSv1.2")
        self.assertEqual(client.cmd("GET VAR dummy ups.status"), 'VAR dummy ups.status "OL"')

    def assert_refused(self, port, context):
        """The handshake or the first command fails for this client."""
        client = self.plain(port)
        try:
            client.starttls(context, "127.0.0.1")
            reply = client.cmd("GET VAR dummy ups.status")
        except (ssl.SSLError, OSError):
            return
        self.assertEqual(reply, "", "a refused client got a reply")

    def test_client_ca_requires_a_certificate_from_that_ca(self):
        proc, port = self.start_shim("--client-ca", PKI.ca)
        self.assert_refused(port, client_context())
        self.assert_refused(port, client_context(cert=PKI.other_client_cert,
                                                 key=PKI.other_client_key))
        client = self.tls(port, client_context(cert=PKI.client_cert, key=PKI.client_key))
        self.assertEqual(client.cmd("GET VAR dummy ups.status"), 'VAR dummy ups.status "OL"')
        wait_for(lambda: 'client certificate CN=client1' in proc.log_text(), what="cert name")

    def test_allow_client_names_the_accepted_certificates(self):
        proc, port = self.start_shim("--client-ca", PKI.ca, "--allow-client", "client1")
        refused = self.tls(port, client_context(cert=PKI.client2_cert, key=PKI.client2_key))
        self.assertEqual(refused.readline(), b"ERR ACCESS-DENIED\n")
        self.assertEqual(refused.read_until_closed(), b"")
        wait_for(lambda: "not allowed (--allow-client): CN=client2" in proc.log_text(),
                 what="refusal log line")
        client = self.tls(port, client_context(cert=PKI.client_cert, key=PKI.client_key))
        self.assertEqual(client.cmd("GET VAR dummy ups.status"), 'VAR dummy ups.status "OL"')


class TestBounds(ShimCase):
    """Timeouts, limits and resource use."""

    def test_stalled_connections_neither_block_others_nor_outlive_the_timeout(self):
        proc, port = self.start_shim("--handshake-timeout", "2")
        stalled = []
        for index in range(50):
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            self.addCleanup(sock.close)
            if index % 2:
                sock.sendall(b"STARTTLS\n")
            stalled.append(sock)
        started = time.monotonic()
        client = self.tls(port)
        self.assertEqual(client.cmd("GET VAR dummy ups.status"), 'VAR dummy ups.status "OL"')
        self.assertLess(time.monotonic() - started, 2.0, "a good client waited on stalled ones")
        for sock in stalled:
            sock.settimeout(TIMEOUT)
            data = sock.recv(100)
            while data:   # OK STARTTLS, then the close
                data = sock.recv(100)
        wait_for(lambda: proc.log_text().count("timed out after 2 s") == 50,
                 what="50 handshake timeouts logged")
        # Negative control: the good client, idle for longer than the handshake
        # timeout, is still served.
        self.assertEqual(client.cmd("GET VAR dummy ups.status"), 'VAR dummy ups.status "OL"')

    def test_idle_timeout_closes_a_silent_session(self):
        proc, port = self.start_shim("--idle-timeout", "1")
        client = self.tls(port)
        self.assertEqual(client.readline(), b"")
        wait_for(lambda: "idle for 1 s" in proc.log_text(), what="idle close line")

    def test_max_connections(self):
        proc, port = self.start_shim("--max-connections", "2")
        first, second = self.tls(port), self.tls(port)
        third = self.plain(port)
        self.assertEqual(third.readline(), b"")
        wait_for(lambda: "(--max-connections)" in proc.log_text(), what="refusal log line")
        self.assertEqual(first.cmd("VER"), second.cmd("VER"))
        # Negative control: a slot freed is a slot available.
        first.close()
        wait_for(lambda: "closed: peer" in proc.log_text(), what="first closed")
        self.assertEqual(self.tls(port).cmd("GET VAR dummy ups.status"),
                         'VAR dummy ups.status "OL"')

    def test_threads_and_descriptors_return_to_baseline_after_300_sessions(self):
        proc, port = self.start_shim()
        threads, _ = process_counts(proc.pid)
        self.tls(port).close()
        wait_for(lambda: "closed: peer" in proc.log_text(), what="warm-up session closed")
        # Finished session threads wait a moment for the next session, then exit.
        wait_for(lambda: process_counts(proc.pid)[0] == threads, what="idle threads gone")
        baseline = process_counts(proc.pid)
        context = client_context()
        for index in range(300):
            with LineClient.connect("127.0.0.1", port) as client:
                client.starttls(context, "127.0.0.1")
                if index % 3 == 0:
                    client.cmd("GET VAR dummy ups.status")
                elif index % 3 == 1:
                    client.cmd("LOGOUT")
        wait_for(lambda: process_counts(proc.pid) == baseline,
                 what=f"threads and descriptors back to {baseline}")


class TestDaemon(ShimCase):
    """Signals, pidfile, privileges and configuration errors."""

    def test_sighup_reloads_the_certificate_for_new_sessions(self):
        workdir = tempfile.mkdtemp(prefix="nuttls-hup-")
        self.addCleanup(shutil.rmtree, workdir, True)
        cert, key = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
        shutil.copy(PKI.server_cert, cert)
        shutil.copy(PKI.server_key, key)
        proc, port = self.start_shim(cert=cert, key=key)
        before = self.tls(port).sock.getpeercert()["serialNumber"]
        renewed_cert, renewed_key = PKI.make_server("renewed", ["localhost", "127.0.0.1"])
        shutil.copy(renewed_cert, cert)
        shutil.copy(renewed_key, key)
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: "reloaded certificates" in proc.log_text(), what="reload log line")
        after = self.tls(port).sock.getpeercert()["serialNumber"]
        self.assertNotEqual(before, after)
        # Negative control: a broken file is refused and the last good one kept.
        with open(cert, "w", encoding="ascii") as handle:
            handle.write("not a certificate\n")
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: "reload failed, keeping the previous" in proc.log_text(),
                 what="failed reload log line")
        self.assertEqual(self.tls(port).sock.getpeercert()["serialNumber"], after)

    def test_sigterm_exits_0_and_removes_the_pidfile(self):
        workdir = tempfile.mkdtemp(prefix="nuttls-pid-")
        self.addCleanup(shutil.rmtree, workdir, True)
        pidfile = os.path.join(workdir, "upsdTLS.pid")
        proc, port = self.start_shim("--pidfile", pidfile)
        with open(pidfile, encoding="ascii") as handle:
            self.assertEqual(int(handle.read()), proc.pid)
        client = self.tls(port)
        started = time.monotonic()
        self.assertEqual(proc.stop(signal.SIGTERM), 0)
        self.assertLess(time.monotonic() - started, 5)
        self.assertFalse(os.path.exists(pidfile))
        self.assertEqual(client.readline(), b"")   # the open session was closed

    def test_sigint_exits_0(self):
        proc, _ = self.start_shim()
        self.assertEqual(proc.stop(signal.SIGINT), 0)

    def test_drops_to_nut_by_default_and_still_works_without_reading_python(self):
        # Started as root without --user, the shim becomes nut.  The Python
        # running it lives under /root, which nut cannot read: everything the
        # daemon needs after the drop must already be imported.
        if os.geteuid() != 0:
            self.skipTest("needs root to switch users")
        try:
            nut = pwd.getpwnam("nut")
        except KeyError:
            self.skipTest("no user nut")
        port = harness.free_port()
        piddir = tempfile.mkdtemp(prefix="nuttls-run-")    # as /run/nut, owned by nut
        self.addCleanup(shutil.rmtree, piddir, True)
        os.chown(piddir, nut.pw_uid, nut.pw_gid)
        pidfile = os.path.join(piddir, "upsdTLS.pid")
        cert = shutil.copy(PKI.server_cert, piddir)        # 0644: nut may read it
        proc = harness.Proc([sys.executable, str(harness.UPSD_TLS), "--listen",
                             f"127.0.0.1:{port}", "--upsd", f"127.0.0.1:{self.nut.port}",
                             "--cert", cert, "--key", PKI.server_key,
                             "--pidfile", pidfile],
                            ready_marks=[f"listening on 127.0.0.1:{port}"])
        self.addCleanup(proc.stop)
        wait_for(lambda: "running as user nut" in proc.log_text(), what="drop log line")
        # The key is root's and 0600, which the log says at start; the copy
        # of the certificate is readable (the control).
        self.assertIn(f"--key {PKI.server_key} is not readable by user nut", proc.log_text())
        self.assertNotIn(f"--cert {cert} is not readable", proc.log_text())
        with open(f"/proc/{proc.pid}/status", encoding="ascii") as handle:
            uids = [line.split()[1:] for line in handle if line.startswith("Uid:")][0]
        self.assertEqual(set(uids), {str(nut.pw_uid)})
        self.assertEqual(self.tls(port).cmd("GET VAR dummy ups.status"),
                         'VAR dummy ups.status "OL"')
        with self.assertRaises(ssl.SSLError):     # a failed handshake is logged
            self.plain(port).starttls(client_context(maximum=ssl.TLSVersion.TLSv1_2),
                                      "127.0.0.1")
        self.plain(port).send("STARTTLS\nGET \u00e9\x00\n".encode())   # so is an injection
        # The key is root's and 0600: the reload fails, says why, keeps serving.
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: "files are read as user nut" in proc.log_text(), what="reload hint")
        wait_for(lambda: proc.log_text().count("closed: peer") >= 2, what="close lines")
        self.assertEqual(self.tls(port).cmd("GET VAR dummy ups.status"),
                         'VAR dummy ups.status "OL"')
        # A clean stop as nut: exit 0 and the pidfile gone.
        self.assertTrue(os.path.exists(pidfile))
        self.assertEqual(proc.stop(), 0, proc.log_text())
        self.assertFalse(os.path.exists(pidfile))
        self.assertNotIn("Traceback", proc.log_text())
        self.assertNotIn("unknown encoding", proc.log_text())

    def test_options_from_a_file(self):
        workdir = tempfile.mkdtemp(prefix="nuttls-opt-")
        self.addCleanup(shutil.rmtree, workdir, True)
        port = harness.free_port()
        options = os.path.join(workdir, "upsdTLS.conf")
        with open(options, "w", encoding="ascii") as handle:
            handle.write(f"# upsdTLS options\n--listen 127.0.0.1:{port}\n"
                         f"--upsd 127.0.0.1:{self.nut.port}\n\n--cert '{PKI.server_cert}'\n"
                         f"--key {PKI.server_key}  # the key\n")
        proc = harness.Proc([sys.executable, str(harness.UPSD_TLS), f"@{options}", "--user",
                             current_user()], ready_marks=[f"listening on 127.0.0.1:{port}"])
        self.addCleanup(proc.stop)
        self.assertEqual(self.tls(port).cmd("GET VAR dummy ups.status"),
                         'VAR dummy ups.status "OL"')
        self.assertIsNone(proc.proc.poll())
        # Negative control: an unknown option in the file is a usage error.
        with open(options, "a", encoding="ascii") as handle:
            handle.write("--no-such-option\n")
        status, stderr = self.run_shim(f"@{options}")
        self.assertEqual(status, 2)
        self.assertIn("--no-such-option", stderr)

    def test_daemon_detaches_logs_to_syslog_and_stops_on_sigterm(self):
        if os.path.exists("/dev/log") or os.geteuid() != 0:
            self.skipTest("needs root and no syslog daemon, to listen on /dev/log itself")
        syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(syslog.close)
        # Negative control first: without /dev/log, --syslog is a configuration error.
        status, stderr = self.run_shim("--syslog", "--cert", PKI.server_cert)
        self.assertEqual((status, "--syslog" in stderr), (2, True), stderr)
        syslog.bind("/dev/log")
        self.addCleanup(os.unlink, "/dev/log")
        workdir = tempfile.mkdtemp(prefix="nuttls-daemon-")
        self.addCleanup(shutil.rmtree, workdir, True)
        pidfile, port = os.path.join(workdir, "upsdTLS.pid"), harness.free_port()
        # Paths relative to where it started: the daemon changes to / and
        # must still remove its pidfile and reload its files.  Should the
        # pidfile go astray, the daemon is still found (by its port) and killed.
        self.addCleanup(lambda: [os.kill(found, signal.SIGKILL) for found in
                                 harness.processes_mentioning(f"127.0.0.1:{port}\0")])
        status, stderr = self.run_shim(
            "--daemon", "--pidfile", "upsdTLS.pid", "--listen", f"127.0.0.1:{port}",
            "--upsd", f"127.0.0.1:{self.nut.port}",
            "--cert", os.path.relpath(PKI.server_cert, workdir),
            "--key", os.path.relpath(PKI.server_key, workdir), "--user", current_user(),
            cwd=workdir)
        self.assertEqual((status, stderr), (0, ""))
        pid = int(wait_for(lambda: read_file(pidfile).strip(), what="pidfile"))
        # Negative control: a pidfile the daemon cannot write fails the start.
        status, _ = self.run_shim(
            "--daemon", "--pidfile", os.path.join(workdir, "no", "such.pid"), "--listen",
            f"127.0.0.1:{harness.free_port()}", "--cert", PKI.server_cert,
            "--key", PKI.server_key, "--user", current_user())
        self.assertEqual(status, 2)
        self.addCleanup(lambda: alive(pid) and os.kill(pid, signal.SIGKILL))
        self.assertEqual(self.tls(port).cmd("GET VAR dummy ups.status"),
                         'VAR dummy ups.status "OL"')
        syslog.settimeout(TIMEOUT)
        messages = b""
        while b"session 1 open" not in messages:
            messages += syslog.recv(4096) + b"\n"
        self.assertIn(f"upsdTLS[{pid}]: listening on 127.0.0.1:{port}".encode(), messages)
        self.assertIn(f"upsdTLS[{pid}]: session 1 open".encode(), messages)
        os.kill(pid, signal.SIGHUP)
        while b"reloaded certificates" not in messages and b"reload failed" not in messages:
            messages += syslog.recv(4096) + b"\n"
        self.assertNotIn(b"reload failed", messages)
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not alive(pid) and not os.path.exists(pidfile),
                 what="daemon gone and pidfile removed")

    def run_shim(self, *args, cwd=None):
        """Runs upsdTLS to completion (in cwd); returns (status, stderr)."""
        result = subprocess.run(["python3", str(harness.UPSD_TLS), *args], capture_output=True,
                                text=True, timeout=TIMEOUT, check=False, cwd=cwd)
        return result.returncode, result.stderr

    def test_configuration_errors_exit_2_naming_the_option(self):
        workdir = tempfile.mkdtemp(prefix="nuttls-opt-")
        self.addCleanup(shutil.rmtree, workdir, True)
        bad_quote, not_utf8 = os.path.join(workdir, "quote"), os.path.join(workdir, "latin1")
        with open(bad_quote, "w", encoding="ascii") as handle:
            handle.write("--idle-timeout \"5\n")
        with open(not_utf8, "wb") as handle:
            handle.write(b"--allow-client caf\xe9\n")
        port = str(harness.free_port())
        good = ["--listen", f"127.0.0.1:{port}", "--user", current_user()]
        cases = [
            (["--cert", "/nonexistent.pem"], "--cert /nonexistent.pem"),
            (["--cert", PKI.server_cert, "--key", PKI.server_key, "--upsd", "host:notaport"],
             "--upsd"),
            (["--cert", PKI.server_cert, "--key", PKI.other_server_key], "--key"),
            (["--cert", PKI.server_cert, "--key", PKI.server_key, "--allow-client", "x"],
             "--allow-client"),
            (["--cert", PKI.expired_server_cert, "--key", PKI.expired_server_key], "expired"),
            (["--cert", PKI.server_cert, "--key", PKI.server_key, "--listen", "nohost:1"],
             "--listen"),
            ([], "--cert"),
            # Values every session would fail on: refused at start instead.
            (["--cert", PKI.server_cert, "--upsd", "a..b:3493"], "--upsd a..b:3493"),
            (["--cert", PKI.server_cert, "--idle-timeout", "inf"], "--idle-timeout"),
            (["--cert", PKI.server_cert, "--idle-timeout", "nan"], "--idle-timeout"),
            (["--cert", PKI.server_cert, "--handshake-timeout", "3e6"], "--handshake-timeout"),
            (["--cert", PKI.server_cert, "--upsd", "127.0.0.1:\u00b3"], "--upsd"),
            (["--cert", PKI.server_cert, f"@{bad_quote}"], "@FILE: No closing quotation"),
            (["--cert", PKI.server_cert, f"@{not_utf8}"], "codec can't decode"),
        ]
        for args, needle in cases:
            status, stderr = self.run_shim(*good, *args)
            self.assertEqual(status, 2, (args, stderr))
            self.assertIn(needle, stderr, args)
        # Negative control: the port was never taken by a failed start.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", int(port)))

    def test_port_in_use_exits_1(self):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            status, stderr = self.run_shim("--listen", f"127.0.0.1:{busy.getsockname()[1]}",
                                           "--cert", PKI.server_cert, "--key", PKI.server_key,
                                           "--user", current_user())
        self.assertEqual(status, 1, stderr)
        self.assertIn("cannot listen on", stderr)


class TestCertificateNames(unittest.TestCase):
    """How a peer certificate's names are logged and matched, in both shims."""

    INFO = {"subject": ((("commonName", "c1"),),),
            "subjectAltName": (("IP Address", "<invalid>"), ("IP Address", "127.0.0.1"),
                               ("DNS", "c1.example"))}

    def test_an_ip_entry_python_cannot_read_is_logged_and_never_matches(self):
        # Python shows an IP entry of odd length as <invalid>; a CA-signed
        # certificate carrying one once ended its session with a traceback.
        for path in (harness.UPSD_TLS, harness.UPSMON_TLS):
            spec = importlib.util.spec_from_file_location(path.stem, path)
            shim = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(shim)
            self.assertEqual(shim.certificate_names(self.INFO),
                             ["CN=c1", "IP:<invalid>", "IP:127.0.0.1", "DNS:c1.example"])
            if path == harness.UPSD_TLS:
                allowed = shim.client_certificate_allowed
                self.assertFalse(allowed(self.INFO, ["<invalid>"]))
                for name in ("127.0.0.1", "c1", "c1.example"):   # the controls
                    self.assertTrue(allowed(self.INFO, [name]), name)


if __name__ == "__main__":
    unittest.main()
