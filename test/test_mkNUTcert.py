"""Tests of mkNUTcert.py: the certificates it makes and how it writes them.

Goal of these tests:
* the CA, server and client certificates pass `openssl verify -x509_strict`
  for their purpose, a real loopback TLS handshake with Python's ssl and
  VERIFY_X509_STRICT (by IP address and by name), and NSS; a certificate
  from another CA, a name not in the SAN or the wrong purpose fails;
* keys are 0600 and certificates 0644 whatever the umask; nothing is
  replaced without --force, nothing is written on a configuration error or
  an interrupted run, and such errors exit 2 with a one-line message;
* the report names the files, SANs, end date, fingerprint and the options.

Each test works in its own temporary directory; mkNUTcert runs in-process
through main([...]) except where the exit status, umask or PATH matter.
"""

import contextlib
import importlib.util
import io
import os
import pwd
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock

import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "mkNUTcert.py")
_SPEC = importlib.util.spec_from_file_location("mkNUTcert", SCRIPT)
mkNUTcert = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(mkNUTcert)

# One bound for every blocking step: a subprocess, a handshake, a thread.
TIMEOUT = 30
OPENSSL = shutil.which("openssl")
CERTUTIL = shutil.which("certutil")
REQUIRE_NUT = os.environ.get("NUTTLS_REQUIRE_NUT") == "1"


def run_main(*args):
    """mkNUTcert.main(args) in-process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = mkNUTcert.main(list(args))
        except SystemExit as exc:  # argparse rejects a command line so
            status = exc.code
    return status, out.getvalue(), err.getvalue()


def run_script(*args, env=None, umask=None, user=None, python=None):
    """mkNUTcert.py as a process: the CompletedProcess (text)."""
    old = os.umask(umask) if umask is not None else None
    try:
        return subprocess.run([python or sys.executable, SCRIPT] + list(args),
                              capture_output=True, text=True, env=env,
                              timeout=TIMEOUT, check=False, user=user)
    finally:
        if old is not None:
            os.umask(old)


def openssl(*args):
    """openssl ARGS: (status, stdout + stderr)."""
    done = subprocess.run([OPENSSL] + list(args), capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)
    return done.returncode, done.stdout + done.stderr


def make_pki(directory, *extra):
    """A CA, a server certificate `localhost` (SAN 127.0.0.1, ::1) and a
    client certificate `mgmt1.example.net` in directory (also usable from
    setUpClass, hence no TestCase)."""
    for args in (["ca"],
                 ["server", "localhost", "--san", "127.0.0.1", "--san", "::1"],
                 ["client", "mgmt1.example.net"]):
        status, _, err = run_main(*args, "--dir", directory, *extra)
        if status != 0:
            raise AssertionError(f"mkNUTcert {args}: {status} {err}")


def wrap_tool(directory, real, when, then):
    """A stand-in for the tool at real in directory/bin: it runs the Python
    statement `then` when the expression `when` (on sys.argv) holds, and
    then execs real.  Returns directory/bin, for PATH."""
    bindir = os.path.join(directory, "bin")
    os.makedirs(bindir, exist_ok=True)
    fake = os.path.join(bindir, os.path.basename(real))
    with open(fake, "w", encoding="ascii") as file:
        file.write(f"#!{sys.executable}\nimport os, sys\n"
                   f"if {when}:\n    {then}\n"
                   f"os.execv({real!r}, [{real!r}] + sys.argv[1:])\n")
    os.chmod(fake, 0o755)
    return bindir


def need_nut_as_root(test):
    """The user nut, for --owner; skips test unless run as root with a nut."""
    if os.geteuid() != 0:
        test.skipTest("--owner for another user needs root")
    try:
        return pwd.getpwnam("nut")
    except KeyError:
        test.skipTest("no user nut")
        return None


def make_tmp(test):
    """A temporary directory removed when test ends."""
    path = tempfile.mkdtemp(prefix="test-mkNUTcert-")
    test.addCleanup(shutil.rmtree, path)
    return path


def snapshot(directory):
    """Every file below directory: {relative path: (bytes, mtime_ns, mode)}."""
    files = {}
    for base, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(base, name)
            info = os.stat(path)
            with open(path, "rb") as file:
                files[os.path.relpath(path, directory)] = (
                    file.read(), info.st_mtime_ns, info.st_mode)
    return files


def ipv6_loopback():
    """True when ::1 can be bound here."""
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def need_certutil(test):
    """Skip without certutil, unless NUTTLS_REQUIRE_NUT=1 (then fail)."""
    if CERTUTIL is None:
        if REQUIRE_NUT:
            test.fail("certutil missing and NUTTLS_REQUIRE_NUT=1")
        test.skipTest("certutil (libnss3-tools) not installed")


def server_context(directory, stem="localhost", client_ca=None):
    """A TLS server context with DIR/STEM; client_ca demands a client
    certificate from that CA, verified strictly."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(os.path.join(directory, stem + ".cert.pem"),
                            os.path.join(directory, stem + ".key.pem"))
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.verify_flags |= ssl.VERIFY_X509_STRICT
        context.load_verify_locations(client_ca)
    return context


def client_context(ca_file, cert_dir=None, stem=None):
    """A strict TLS client context trusting ca_file, with DIR/STEM as its
    client certificate when given."""
    context = ssl.create_default_context(cafile=ca_file)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    if stem is not None:
        context.load_cert_chain(os.path.join(cert_dir, stem + ".cert.pem"),
                                os.path.join(cert_dir, stem + ".key.pem"))
    return context


def handshake(server_ctx, client_ctx, address, server_hostname):
    """One TLS session over loopback at address.

    The server sends b"ok" once its handshake succeeds, so a client
    certificate refused after the client's side of a TLS 1.3 handshake
    shows up too.  Return (peer certificate or None, error or None).
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as listener:
        listener.bind((address, 0))
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]

        def serve():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    with server_ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"ok")
                except (ssl.SSLError, OSError):
                    pass  # the client reports the failure

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection((address, port),
                                          timeout=TIMEOUT) as raw:
                with client_ctx.wrap_socket(
                        raw, server_hostname=server_hostname) as tls:
                    cert = tls.getpeercert()
                    if tls.recv(2) != b"ok":
                        return None, ConnectionError("closed by the server")
                    return cert, None
        except (ssl.SSLError, OSError) as exc:
            return None, exc
        finally:
            thread.join(TIMEOUT)


class VerifyTest(unittest.TestCase):
    """The certificates pass strict verification; others' do not."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="test-mkNUTcert-")
        cls.dir = os.path.join(cls.tmp, "a")
        cls.other = os.path.join(cls.tmp, "b")
        make_pki(cls.dir)
        make_pki(cls.other)
        cls.ca = os.path.join(cls.dir, "ca.cert.pem")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def path(self, name, directory=None):
        """A file in this class's directory (or directory)."""
        return os.path.join(directory or self.dir, name)

    def test_openssl_verify_strict_accepts_server_and_client(self):
        """openssl verify -x509_strict passes each leaf for its purpose."""
        for purpose, name in (("sslserver", "localhost"),
                              ("sslclient", "mgmt1.example.net")):
            status, out = openssl("verify", "-x509_strict", "-purpose",
                                  purpose, "-CAfile", self.ca,
                                  self.path(name + ".cert.pem"))
            self.assertEqual(status, 0, out)
            self.assertIn(": OK", out)

    def test_openssl_verify_rejects_leaf_from_another_ca(self):
        """A server certificate from another CA fails openssl verify."""
        status, out = openssl("verify", "-x509_strict", "-purpose",
                              "sslserver", "-CAfile", self.ca,
                              self.path("localhost.cert.pem", self.other))
        self.assertNotEqual(status, 0, out)

    def test_openssl_verify_rejects_the_wrong_purpose(self):
        """A client certificate is no server's, and the reverse."""
        for purpose, name in (("sslserver", "mgmt1.example.net"),
                              ("sslclient", "localhost")):
            status, out = openssl("verify", "-x509_strict", "-purpose",
                                  purpose, "-CAfile", self.ca,
                                  self.path(name + ".cert.pem"))
            self.assertNotEqual(status, 0, out)

    def test_certificate_profile(self):
        """The extensions of DESIGN.md section 5, on the CA and a leaf."""
        _, text = openssl("x509", "-noout", "-text", "-in", self.ca)
        self.assertIn("X509v3 Basic Constraints: critical\n"
                      "                CA:TRUE", text)
        self.assertIn("X509v3 Key Usage: critical\n"
                      "                Certificate Sign, CRL Sign", text)
        self.assertIn("X509v3 Subject Key Identifier", text)
        _, text = openssl("x509", "-noout", "-text", "-in",
                          self.path("localhost.cert.pem"))
        self.assertIn("CA:FALSE", text)
        self.assertIn("X509v3 Authority Key Identifier", text)
        self.assertIn("X509v3 Subject Key Identifier", text)
        self.assertIn("Digital Signature", text)
        self.assertIn("TLS Web Server Authentication", text)
        self.assertNotIn("TLS Web Client Authentication", text)
        self.assertIn("DNS:localhost, IP Address:127.0.0.1, "
                      "IP Address:0:0:0:0:0:0:0:1", text)
        self.assertIn("Not After", text)

    def test_serials_are_random_and_distinct(self):
        """Every certificate has its own random 120-bit serial."""
        serials = set()
        for directory in (self.dir, self.other):
            for name in ("ca", "localhost", "mgmt1.example.net"):
                _, out = openssl("x509", "-noout", "-serial", "-in",
                                 self.path(name + ".cert.pem", directory))
                serials.add(out.strip())
        self.assertEqual(len(serials), 6, serials)
        for serial in serials:  # 120 bits, top bit set: 30 hex digits
            self.assertEqual(len(serial.partition("=")[2]), 30, serial)

    def test_tls_handshake_by_ip_address_and_name(self):
        """Strict Python ssl accepts 127.0.0.1 (an IP SAN) and localhost."""
        server = server_context(self.dir)
        client = client_context(self.ca)
        for hostname in ("127.0.0.1", "localhost"):
            cert, error = handshake(server, client, "127.0.0.1", hostname)
            self.assertIsNone(error, hostname)
        self.assertIn(("IP Address", "127.0.0.1"), cert["subjectAltName"])
        self.assertIn(("DNS", "localhost"), cert["subjectAltName"])

    def test_tls_handshake_over_ipv6_loopback(self):
        """Strict Python ssl accepts ::1 as an IP SAN."""
        if not ipv6_loopback():
            self.skipTest("no IPv6 loopback here")
        cert, error = handshake(server_context(self.dir),
                                client_context(self.ca), "::1", "::1")
        self.assertIsNone(error)
        self.assertIn(("IP Address", "0:0:0:0:0:0:0:1"),
                      cert["subjectAltName"])

    def test_tls_handshake_fails_for_a_name_not_in_the_san(self):
        """A name or address not in the SAN fails the handshake."""
        for hostname in ("other.example.net", "127.0.0.2"):
            _, error = handshake(server_context(self.dir),
                                 client_context(self.ca), "127.0.0.1",
                                 hostname)
            self.assertIsInstance(error, ssl.SSLCertVerificationError)

    def test_tls_handshake_fails_with_another_ca(self):
        """A server certificate from another CA fails the handshake."""
        _, error = handshake(server_context(self.other),
                             client_context(self.ca), "127.0.0.1",
                             "localhost")
        self.assertIsInstance(error, ssl.SSLCertVerificationError)

    def test_mutual_tls_accepts_client_certificate(self):
        """A strict server accepts the client certificate."""
        server = server_context(self.dir, client_ca=self.ca)
        client = client_context(self.ca, self.dir, "mgmt1.example.net")
        _, error = handshake(server, client, "127.0.0.1", "localhost")
        self.assertIsNone(error)

    def test_mutual_tls_refuses_client_of_another_ca_or_purpose(self):
        """A client certificate from another CA, or a server one, is refused."""
        server = server_context(self.dir, client_ca=self.ca)
        for directory, stem in ((self.other, "mgmt1.example.net"),
                                (self.dir, "localhost")):
            client = client_context(self.ca, directory, stem)
            _, error = handshake(server, client, "127.0.0.1", "localhost")
            self.assertIsNotNone(error, stem)

    def test_nss_accepts_server_and_client_certificates(self):
        """NSS (certutil -V) accepts each leaf for its use only, and this CA's only."""
        need_certutil(self)
        database = os.path.join(self.tmp, "nss-verify")
        status, _, err = run_main("nssdb", database, "--dir", self.dir)
        self.assertEqual(status, 0, err)
        checks = (("localhost", self.dir, "V", True),
                  ("mgmt1.example.net", self.dir, "C", True),
                  ("mgmt1.example.net", self.dir, "V", False),
                  ("localhost", self.other, "V", False))
        for number, (stem, directory, usage, valid) in enumerate(checks):
            nick = f"leaf{number}"
            subprocess.run([CERTUTIL, "-A", "-d", "sql:" + database, "-n",
                            nick, "-t", ",,", "-a", "-i",
                            self.path(stem + ".cert.pem", directory)],
                           check=True, capture_output=True, timeout=TIMEOUT)
            done = subprocess.run([CERTUTIL, "-V", "-u", usage, "-d",
                                   "sql:" + database, "-n", nick],
                                  capture_output=True, text=True,
                                  timeout=TIMEOUT, check=False)
            self.assertEqual(done.returncode == 0, valid,
                             (stem, usage, done.stdout, done.stderr))


class FilesTest(unittest.TestCase):
    """Modes, --force, and nothing half-written."""

    def setUp(self):
        self.tmp = make_tmp(self)
        self.dir = os.path.join(self.tmp, "tls")

    def assert_modes(self, directory):
        """Keys 0600, certificates 0644, DIR 0755."""
        names = sorted(os.listdir(directory))
        self.assertEqual(len(names), 6, names)
        for name in names:
            mode = stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode)
            want = 0o600 if name.endswith(".key.pem") else 0o644
            self.assertEqual(mode, want, f"{name}: {mode:o}")
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o755)

    def test_modes_whatever_the_umask(self):
        """Keys 0600, certificates 0644, DIR 0755 under umask 000 and 077."""
        for umask in (0o000, 0o077):
            directory = os.path.join(self.tmp, f"umask{umask:03o}")
            done = run_script("--dir", directory, umask=umask)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assert_modes(directory)

    def test_second_run_without_force_changes_nothing(self):
        """A second run without --force exits 2 and leaves every file as it was."""
        status, _, err = run_main("--dir", self.dir)
        self.assertEqual(status, 0, err)
        before = snapshot(self.dir)
        done = run_script("--dir", self.dir)
        self.assertEqual(done.returncode, 2)
        self.assertIn("--force", done.stderr)
        self.assertEqual(len(done.stderr.strip().splitlines()), 1)
        self.assertEqual(snapshot(self.dir), before)
        host = mkNUTcert.this_host()[0]
        for args in (["ca"], ["server", host], ["client", host + "-client"]):
            status, _, err = run_main(*args, "--dir", self.dir)
            self.assertEqual(status, 2, args)
            self.assertEqual(snapshot(self.dir), before)
        # the control: a name not there yet is written
        status, _, err = run_main("server", "new.example.net", "--dir",
                                  self.dir)
        self.assertEqual(status, 0, err)

    def test_force_replaces_but_the_default_run_keeps_the_ca(self):
        """--force replaces the leaves; only `ca --force` replaces the CA."""
        status, _, err = run_main("--dir", self.dir)
        self.assertEqual(status, 0, err)
        before = snapshot(self.dir)
        status, _, err = run_main("--dir", self.dir, "--force")
        self.assertEqual(status, 0, err)
        after = snapshot(self.dir)
        self.assertEqual(sorted(after), sorted(before))
        for name, (data, mtime, mode) in after.items():
            if name.startswith("ca."):
                self.assertEqual((data, mtime, mode), before[name], name)
            else:
                self.assertNotEqual(data, before[name][0], name)
        status, _, err = run_main("ca", "--force", "--dir", self.dir)
        self.assertEqual(status, 0, err)
        self.assertNotEqual(snapshot(self.dir)["ca.key.pem"][0],
                            after["ca.key.pem"][0])

    def test_server_without_ca_exits_2_and_writes_nothing(self):
        """server, client and nssdb without a CA exit 2 and create nothing."""
        for prepare in (None, os.mkdir):
            if prepare is not None:
                prepare(self.dir)
            for args in (["server", "localhost"], ["client", "m.example"],
                         ["nssdb", os.path.join(self.tmp, "nss")]):
                done = run_script(*args, "--dir", self.dir)
                self.assertEqual(done.returncode, 2, args)
                self.assertIn("ca.cert.pem", done.stderr)
            self.assertEqual(sorted(os.listdir(self.tmp)),
                             ["tls"] if prepare else [])
            if prepare:
                self.assertEqual(os.listdir(self.dir), [])
        status, _, err = run_main("ca", "--dir", self.dir)  # the control
        self.assertEqual(status, 0, err)
        status, _, err = run_main("server", "localhost", "--dir", self.dir)
        self.assertEqual(status, 0, err)

    def test_missing_openssl_exits_2(self):
        """Without openssl on PATH: exit 2, a clear message, nothing made."""
        empty = os.path.join(self.tmp, "bin")
        os.mkdir(empty)
        env = dict(os.environ, PATH=empty)
        done = run_script("--dir", self.dir, env=env)
        self.assertEqual(done.returncode, 2)
        self.assertIn("openssl not found on PATH", done.stderr)
        self.assertFalse(os.path.exists(self.dir))
        os.symlink(OPENSSL, os.path.join(empty, "openssl"))  # the control
        done = run_script("--dir", self.dir, env=env)
        self.assertEqual(done.returncode, 0, done.stderr)

    def test_dir_that_is_not_a_directory_exits_2(self):
        """A --dir that is a file, or below one, exits 2 naming --dir."""
        a_file = os.path.join(self.tmp, "file")
        with open(a_file, "w", encoding="ascii"):
            pass
        for directory, why in ((a_file, "is not a directory"),
                               (os.path.join(a_file, "sub"),
                                "is not a directory")):
            status, _, err = run_main("--dir", directory)
            self.assertEqual(status, 2)
            self.assertIn(f"--dir={directory}", err)
            self.assertIn(why, err)

    def test_unwritable_dir_exits_2(self):
        """A --dir the caller cannot write exits 2 naming --dir."""
        os.mkdir(self.dir, 0o555)
        os.chmod(self.dir, 0o555)
        user = python = None
        if os.geteuid() == 0:
            user, python = self.unprivileged_python()
            os.chmod(self.tmp, 0o755)
        done = run_script("--dir", self.dir, user=user, python=python)
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn(f"--dir={self.dir} is not writable", done.stderr)
        self.assertEqual(os.listdir(self.dir), [])
        os.chmod(self.dir, 0o777)  # the control
        done = run_script("--dir", self.dir, user=user, python=python)
        self.assertEqual(done.returncode, 0, done.stderr)

    def unprivileged_python(self):
        """As root: a user other than root and a Python it can run."""
        for user in ("nobody", "nut"):
            for python in (sys.executable, "/usr/bin/python3"):
                try:
                    done = subprocess.run([python, "-c", "pass"], user=user,
                                          capture_output=True,
                                          timeout=TIMEOUT, check=False)
                except (KeyError, OSError):
                    continue
                if done.returncode == 0 and os.access(SCRIPT, os.R_OK):
                    return user, python
        self.skipTest("no Python that an unprivileged user can run")
        return None, None

    def test_failed_run_leaves_nothing(self):
        """openssl failing halfway leaves neither final nor temporary files."""
        # An openssl that fails when it signs a server or client certificate:
        # the CA and the first key are made by then, under temporary names.
        bindir = wrap_tool(self.tmp, OPENSSL, "sys.argv[1:3] == ['x509', '-req']",
                           "sys.exit('openssl: simulated failure')")
        env = dict(os.environ, PATH=bindir)
        done = run_script("--dir", self.dir, env=env)
        self.assertEqual(done.returncode, 1)
        self.assertIn("simulated failure", done.stderr)
        self.assertEqual(os.listdir(self.dir), [])
        done = run_script("--dir", self.dir, "ca", env=env)  # the control
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(sorted(os.listdir(self.dir)),
                         ["ca.cert.pem", "ca.key.pem"])

    def test_a_name_taken_while_writing_leaves_none_of_the_run(self):
        """Another run making a final name meanwhile: this run keeps nothing."""
        status, _, err = run_main("ca", "--dir", self.dir)
        self.assertEqual(status, 0, err)
        # An openssl that, while it signs, makes the certificate's final name
        # as a concurrent run would: the key is installed first, then the
        # certificate's name is taken.
        racer = os.path.join(self.dir, "racer.cert.pem")
        bindir = wrap_tool(self.tmp, OPENSSL, "sys.argv[1:3] == ['x509', '-req']",
                           f"open({racer!r}, 'x').write('the other run')")
        done = run_script("--dir", self.dir, "client", "racer",
                          env=dict(os.environ, PATH=bindir))
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("appeared while writing", done.stderr)
        self.assertEqual(sorted(os.listdir(self.dir)),
                         ["ca.cert.pem", "ca.key.pem", "racer.cert.pem"])
        with open(racer, encoding="ascii") as file:
            self.assertEqual(file.read(), "the other run")
        os.unlink(racer)                                   # the control
        done = run_script("--dir", self.dir, "client", "racer")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("racer.key.pem", os.listdir(self.dir))

    def test_owner_gets_the_leaf_keys_only(self):
        """--owner gives the server and client keys away, not the CA key."""
        nut = need_nut_as_root(self)
        status, _, err = run_main("--dir", self.dir, "--owner", "nut")
        self.assertEqual(status, 0, err)
        for name in os.listdir(self.dir):
            uid = os.stat(os.path.join(self.dir, name)).st_uid
            want = nut.pw_uid if name.endswith(".key.pem") \
                and not name.startswith("ca.") else 0
            self.assertEqual(uid, want, name)
        status, _, err = run_main("--dir", self.dir, "--owner", "no-such-user")
        self.assertEqual(status, 2)
        self.assertIn("--owner=no-such-user", err)


class KeyTypeTest(unittest.TestCase):
    """EC P-256 by default; RSA 3072 with --key-type rsa."""

    def setUp(self):
        self.tmp = make_tmp(self)

    def check(self, key_type, expect, refuse):
        """Make a PKI, check the key text, and run a strict handshake."""
        directory = os.path.join(self.tmp, key_type or "default")
        make_pki(directory, *(["--key-type", key_type] if key_type
                                    else []))
        for name in ("ca", "localhost", "mgmt1.example.net"):
            _, text = openssl("x509", "-noout", "-text", "-in",
                              os.path.join(directory, name + ".cert.pem"))
            for line in expect:
                self.assertIn(line, text, name)
            self.assertNotIn(refuse, text, name)
        cert, error = handshake(
            server_context(directory),
            client_context(os.path.join(directory, "ca.cert.pem"), directory,
                           "mgmt1.example.net"), "127.0.0.1", "127.0.0.1")
        self.assertIsNone(error)
        self.assertIsNotNone(cert)
        return directory

    def test_default_key_is_ec_p256(self):
        """Without --key-type the keys are EC P-256."""
        self.check(None, ["Public-Key: (256 bit)", "NIST CURVE: P-256"],
                   "rsaEncryption")

    def test_rsa_3072(self):
        """--key-type rsa gives RSA 3072 keys, with keyEncipherment."""
        directory = self.check("rsa", ["Public-Key: (3072 bit)",
                                       "rsaEncryption"], "id-ecPublicKey")
        _, text = openssl("x509", "-noout", "-text", "-in",
                          os.path.join(directory, "localhost.cert.pem"))
        self.assertIn("Digital Signature, Key Encipherment", text)


class NssdbTest(unittest.TestCase):
    """`nssdb PATH`: an NSS database trusting the CA for stock NUT clients."""

    def setUp(self):
        need_certutil(self)
        self.tmp = make_tmp(self)
        self.dir = os.path.join(self.tmp, "tls")
        self.database = os.path.join(self.tmp, "nssdb")
        status, _, err = run_main("ca", "--name", "Test CA / one",
                                  "--dir", self.dir)
        self.assertEqual(status, 0, err)

    def listing(self):
        """certutil -L of the database."""
        return subprocess.run([CERTUTIL, "-L", "-d", "sql:" + self.database],
                              capture_output=True, text=True,
                              timeout=TIMEOUT, check=True).stdout

    def test_nssdb_trusts_the_ca_and_prints_upsmon_lines(self):
        """certutil -L lists the CA as CT,,; the report gives upsmon.conf lines."""
        status, out, err = run_main("nssdb", self.database, "--dir", self.dir)
        self.assertEqual(status, 0, err)
        listed = [line.split() for line in self.listing().splitlines()]
        self.assertIn(["Test", "CA", "/", "one", "CT,,"], listed)
        for line in (f"CERTPATH {self.database}", "CERTVERIFY 1",
                     "FORCESSL 1"):
            self.assertIn(line, out)
        for name in ("cert9.db", "key4.db", "pkcs11.txt"):
            self.assertIn(name, out)
        self.assertEqual([name for name in os.listdir(self.database)
                          if name.startswith(".")], [])

    def test_owner_gets_a_new_database_directory_not_an_existing_one(self):
        """--owner gives PATH away only when the run makes it."""
        nut = need_nut_as_root(self)
        existing = os.path.join(self.tmp, "etc-nut")   # as /etc/nut would be
        os.mkdir(existing, 0o750)
        for path, dir_uid in ((existing, 0), (self.database, nut.pw_uid)):
            status, _, err = run_main("--owner", "nut", "nssdb", path,
                                      "--dir", self.dir)
            self.assertEqual(status, 0, err)
            self.assertEqual(os.stat(path).st_uid, dir_uid, path)
            for name in ("cert9.db", "key4.db", "pkcs11.txt"):
                self.assertEqual(os.stat(os.path.join(path, name)).st_uid,
                                 nut.pw_uid, name)
        self.assertEqual(stat.S_IMODE(os.stat(existing).st_mode), 0o750)

    def test_a_name_taken_while_writing_leaves_none_of_the_database(self):
        """Another run making key4.db meanwhile: cert9.db is not left alone."""
        racer = os.path.join(self.database, "key4.db")
        bindir = wrap_tool(self.tmp, CERTUTIL, "'-A' in sys.argv",
                           f"open({racer!r}, 'x').write('the other run')")
        path = os.pathsep.join([bindir, os.path.dirname(OPENSSL)])
        done = run_script("nssdb", self.database, "--dir", self.dir,
                          env=dict(os.environ, PATH=path))
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("appeared while writing", done.stderr)
        self.assertEqual(os.listdir(self.database), ["key4.db"])
        os.unlink(racer)                                   # the control
        status, _, err = run_main("nssdb", self.database, "--dir", self.dir)
        self.assertEqual(status, 0, err)
        self.assertIn("CT,,", self.listing())

    def test_nssdb_is_not_replaced_without_force(self):
        """An existing database is kept without --force, replaced with it."""
        status, _, err = run_main("nssdb", self.database, "--dir", self.dir)
        self.assertEqual(status, 0, err)
        before = snapshot(self.database)
        status, _, err = run_main("nssdb", self.database, "--dir", self.dir)
        self.assertEqual(status, 2)
        self.assertIn("--force", err)
        self.assertEqual(snapshot(self.database), before)
        status, _, err = run_main("nssdb", self.database, "--dir", self.dir,
                                  "--force")
        self.assertEqual(status, 0, err)
        self.assertIn("CT,,", self.listing())


class OutputTest(unittest.TestCase):
    """The report: files, SANs, end date, fingerprint and shim options."""

    def setUp(self):
        self.tmp = make_tmp(self)
        self.dir = os.path.join(self.tmp, "tls")

    def facts(self, name):
        """End date (as printed) and SHA-256 fingerprint, from openssl."""
        _, out = openssl("x509", "-noout", "-enddate", "-fingerprint",
                         "-sha256", "-in",
                         os.path.join(self.dir, name + ".cert.pem"))
        fields = dict(line.split("=", 1) for line in out.splitlines())
        end = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(
            ssl.cert_time_to_seconds(fields["notAfter"])))
        return end, fields["sha256 Fingerprint"]

    def test_report_names_files_sans_dates_fingerprints_options(self):
        """The report names files, SANs, end dates, fingerprints, shim options."""
        status, ca_out, err = run_main("ca", "--dir", self.dir)
        self.assertEqual(status, 0, err)
        status, out, err = run_main("server", "localhost", "--san",
                                    "127.0.0.1", "--san", "::1",
                                    "--dir", self.dir)
        self.assertEqual(status, 0, err)
        status, client_out, err = run_main("client", "mgmt1.example.net",
                                           "--dir", self.dir)
        self.assertEqual(status, 0, err)
        ca_file = os.path.join(self.dir, "ca.cert.pem")
        cert = os.path.join(self.dir, "localhost.cert.pem")
        key = os.path.join(self.dir, "localhost.key.pem")
        for text, name in ((ca_out, "ca"), (out, "localhost"),
                           (client_out, "mgmt1.example.net")):
            end, fingerprint = self.facts(name)
            self.assertIn(os.path.join(self.dir, name + ".cert.pem"), text)
            self.assertIn(os.path.join(self.dir, name + ".key.pem"), text)
            self.assertIn(end, text)
            self.assertIn(fingerprint, text)
        self.assertIn("DNS:localhost, IP:127.0.0.1, IP:::1", out)
        self.assertIn(f"upsdTLS.py --cert {cert} --key {key}\n", out)
        self.assertIn(f"upsdTLS.py --cert {cert} --key {key} "
                      f"--client-ca {ca_file}\n", out)
        self.assertIn(f"upsmonTLS.py --upsd localhost --cafile {ca_file}\n",
                      out)
        self.assertIn(f"upsmonTLS.py --upsd HOST --cafile {ca_file}\n", ca_out)
        self.assertIn(
            f"--cafile {ca_file} "
            f"--cert {os.path.join(self.dir, 'mgmt1.example.net.cert.pem')} "
            f"--key {os.path.join(self.dir, 'mgmt1.example.net.key.pem')}\n",
            client_out)
        self.assertIn("DNS:mgmt1.example.net", client_out)
        # the control: the server's report does not carry the CA's
        # fingerprint as its own, nor the client's names
        self.assertNotIn(self.facts("mgmt1.example.net")[1], out)
        self.assertNotIn("mgmt1", out)

    def test_a_name_longer_than_a_cn_keeps_the_whole_name_in_the_san(self):
        """A DNS name over 64 characters: CN is its first label, SAN the name."""
        status, _, err = run_main("ca", "--dir", self.dir)
        self.assertEqual(status, 0, err)
        long_name = "a" * 63 + ".example.net"          # 75 characters
        fits = "b" * 52 + ".example.net"               # 64: the control
        for name, cn in ((long_name, "a" * 63), (fits, fits)):
            status, _, err = run_main("server", name, "--dir", self.dir)
            self.assertEqual(status, 0, err)
            cert = os.path.join(self.dir, name + ".cert.pem")
            _, text = openssl("x509", "-noout", "-subject", "-nameopt",
                              "RFC2253", "-ext", "subjectAltName", "-in", cert)
            self.assertIn(f"subject=CN={cn}\n", text)
            self.assertIn(f"DNS:{name}", text)
            code, text = openssl("verify", "-x509_strict", "-purpose",
                                 "sslserver", "-verify_hostname", name,
                                 "-CAfile",
                                 os.path.join(self.dir, "ca.cert.pem"), cert)
            self.assertEqual(code, 0, text)

    def test_a_long_host_name_is_shortened_in_the_default_ca_name(self):
        """The default CA name fits a CN whatever the host name's length."""
        long_host = "ups-attachment-host-01.rack7.dc2.example.net"
        for host, want in ((long_host, "NUT TLS CA ups-attachment-host-01 "),
                           ("ups1", "NUT TLS CA ups1 ")):     # the control
            directory = os.path.join(self.tmp, host)
            with unittest.mock.patch.object(mkNUTcert.socket, "gethostname",
                                            return_value=host):
                status, out, err = run_main("ca", "--dir", directory)
                self.assertEqual(status, 0, err)
                self.assertIn(f"CN={want}", out)
                status, _, err = run_main("client", "mgmt1", "--dir",
                                          directory)
                self.assertEqual(status, 0, err)

    def test_bad_names_exit_2_naming_the_option(self):
        """Bad names and days exit 2 naming the option, writing nothing."""
        status, _, err = run_main("ca", "--dir", self.dir)
        self.assertEqual(status, 0, err)
        for args, option in ((["server", "bad_name"], "NAME=bad_name"),
                             (["server", "ok.example", "--san", "a b"],
                              "--san=a b"),
                             (["server", "ca"], "NAME=ca"),
                             # `$` alone would let a final newline through
                             (["server", "nl.example\n"],
                              "NAME='nl.example\\n'"),
                             (["server", "ok.example", "--san", "nl\n"],
                              "--san='nl\\n'"),
                             (["--days", "0", "client", "c.example"],
                              "--days=0"),
                             (["--days", "x", "client", "c.example"],
                              "--days=x")):
            status, out, err = run_main(*args, "--dir", self.dir)
            self.assertEqual(status, 2, args)
            self.assertIn(option, err)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertEqual(out, "")
        self.assertEqual(sorted(os.listdir(self.dir)),
                         ["ca.cert.pem", "ca.key.pem"])


if __name__ == "__main__":
    unittest.main()


class ChainTest(harness.UpsdCase):
    """Certificates from a bare `mkNUTcert.py --dir D` drive the whole chain.

    Goal of this test: the default run's files work as-is for upsdTLS
    (--cert, --client-ca) and upsmonTLS (--cafile, --cert) against real
    upsd, for EC and RSA keys, and an `nssdb` database lets real upsmon
    verify upsdTLS with CERTVERIFY 1 and FORCESSL 1; the same chain without
    the client certificate, or an NSS database of another CA, fails.
    """

    def default_run(self, *extra):
        """A bare default run in a new directory: (dir, {role: (cert, key)})."""
        directory = make_tmp(self)
        os.chmod(directory, 0o755)   # upsmon (as nobody) reads an nssdb below it
        status, _, err = run_main("--dir", directory, *extra)
        self.assertEqual(status, 0, err)
        files = {}
        for name in os.listdir(directory):
            if name.endswith(".cert.pem") and name != "ca.cert.pem":
                stem = name[:-len(".cert.pem")]
                role = "client" if stem.endswith("-client") else "server"
                files[role] = (os.path.join(directory, name),
                               os.path.join(directory, stem + ".key.pem"))
        return directory, files

    def chain(self, directory, files, client_cert=True):
        """upsdTLS (--client-ca) and upsmonTLS from the run's files: upsmonTLS's port."""
        upsd_port, mon_port = harness.free_port(), harness.free_port()
        cert, key = files["server"]
        harness.start_shim(harness.UPSD_TLS, [
            "--listen", f"127.0.0.1:{upsd_port}", "--upsd", f"127.0.0.1:{self.nut.port}",
            "--cert", cert, "--key", key,
            "--client-ca", os.path.join(directory, "ca.cert.pem")], testcase=self)
        args = ["--listen", f"127.0.0.1:{mon_port}", "--upsd", f"127.0.0.1:{upsd_port}",
                "--cafile", os.path.join(directory, "ca.cert.pem")]
        if client_cert:
            args += ["--cert", files["client"][0], "--key", files["client"][1]]
        harness.start_shim(harness.UPSMON_TLS, args, testcase=self)
        return mon_port, upsd_port

    def assert_chain_works(self, *extra):
        """The default run's certificates (with extra options) carry a GET VAR."""
        directory, files = self.default_run(*extra)
        port, _ = self.chain(directory, files)
        with harness.LineClient.connect("127.0.0.1", port) as client:
            self.assertEqual(client.cmd("GET VAR dummy ups.status"),
                             'VAR dummy ups.status "OL"')
        # Negative control: without the client certificate upsdTLS refuses.
        port, _ = self.chain(directory, files, client_cert=False)
        with harness.LineClient.connect("127.0.0.1", port) as client:
            client.send(b"GET VAR dummy ups.status\n")
            self.assertEqual(client.read_until_closed(), b"")

    def test_default_ec_certificates_work_end_to_end(self):
        self.assert_chain_works()

    def test_rsa_certificates_work_end_to_end(self):
        self.assert_chain_works("--key-type", "rsa")

    def test_upsmon_verifies_upsdtls_through_an_nssdb(self):
        harness.require_nut(self)
        need_certutil(self)
        owner = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        directory, files = self.default_run()
        other, _ = self.default_run()
        for ca_dir, works in ((directory, True), (other, False)):
            nssdir = os.path.join(ca_dir, "nssdb")
            status, out, err = run_main("--dir", ca_dir, "--owner", owner, "nssdb", nssdir)
            self.assertEqual(status, 0, err)
            self.assertIn(f"CERTPATH {nssdir}", out)
            # upsmon has no client certificate: an upsdTLS without --client-ca.
            port = harness.free_port()
            harness.start_shim(harness.UPSD_TLS, [
                "--listen", f"127.0.0.1:{port}", "--upsd", f"127.0.0.1:{self.nut.port}",
                "--cert", files["server"][0], "--key", files["server"][1]], testcase=self)
            with harness.Upsmon("127.0.0.1", port, extra=[
                    "FORCESSL 1", "CERTVERIFY 1", f"CERTPATH {nssdir}"]) as upsmon:
                if works:
                    harness.wait_for(lambda m=upsmon: m.logged_in() and m.polls() >= 2,
                                     what="upsmon polling with the nssdb")
                else:
                    harness.wait_for(lambda m=upsmon: "failed" in m.log_text(),
                                     what="upsmon refusing another CA")
                    self.assertFalse(upsmon.logged_in())
