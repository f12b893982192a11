"""First run and deployment: `make demo`, the README quick start, `make
install`/`uninstall`, the systemd units and the SysV init scripts (dist/).

Goal of these tests:
* `make demo` shows the UPS variables, TLS 1.3 and the verified certificate
  names, exits 0 within 15 s and leaves no process and no file behind; a
  demo that cannot work (no openssl) says so and exits 1.
* Every command of the README's quick start block succeeds as written.
* `make install DESTDIR=...` writes exactly the expected files with the
  expected modes, with the installed paths inside the units and init
  scripts, never touches a real options file or an existing directory's
  mode; `make uninstall` removes exactly what install wrote.
* The units pass `systemd-analyze verify` (a unit with a missing ExecStart
  does not), and the unit's CapabilityBoundingSet is enough to bind a port
  below 1024, read keys owned by nut and drop to nut (and less is not).
* The init scripts pass `sh -n`, start a shim under a temporary pidfile
  (logging to syslog), report status, reload and stop it; a bad options
  file makes `start` fail with nothing left running.
"""
import contextlib
import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import harness
from harness import TIMEOUT, processes_mentioning, wait_for

ROOT = harness.ROOT
SCRIPTS = ('upsdTLS.py', 'upsmonTLS.py', 'mkNUTcert.py')
UNITS = ('upsdTLS.service', 'upsmonTLS.service', 'upsmonTLS@.service')
EXAMPLES = ('upsdTLS.conf.example', 'upsmonTLS.conf.example')
INITS = ('upsdTLS', 'upsmonTLS')
DEMO_LIMIT = 15.0


def make(*args, env=None, timeout=60):
    """Runs make in the repository; returns the CompletedProcess (text)."""
    return subprocess.run(['make', '--no-print-directory', '-C', str(ROOT), *args],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env=env)


def tree(top):
    """{relative path: mode} of every file below top."""
    top = pathlib.Path(top)
    return {str(path.relative_to(top)): path.stat().st_mode & 0o7777
            for path in top.rglob('*') if path.is_file()}


def alive(pid):
    """True while pid runs (a zombie, waiting for its reaper, does not)."""
    try:
        stat = pathlib.Path(f'/proc/{pid}/stat').read_text(encoding='utf-8')
    except OSError:
        return False
    return stat.rsplit(')', 1)[1].split()[0] != 'Z'


def quick_start_commands(readme_text):
    """The command lines of the first fenced block after '## Quick start'."""
    match = re.search(r'^## Quick start\n.*?^```[a-z]*\n(.*?)^```', readme_text,
                      re.MULTILINE | re.DOTALL)
    if not match:
        return []
    return [line for line in match[1].splitlines()
            if line.strip() and not line.lstrip().startswith('#')]


def server_name(tls):
    """HOST of the HOST.cert.pem that mkNUTcert.py's no-command run wrote in tls."""
    names = [path.name[:-len('.cert.pem')] for path in pathlib.Path(tls).glob('*.cert.pem')]
    return next(name for name in names if name != 'ca' and not name.endswith('-client'))


def tempdir(testcase, mode=0o700):
    """A temporary directory removed at cleanup."""
    path = pathlib.Path(tempfile.mkdtemp(prefix='nuttls-deploy-'))
    os.chmod(path, mode)
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


class DemoTest(unittest.TestCase):
    """`make demo` and test/demo.py."""

    def test_make_demo_shows_variables_tls13_and_names_and_leaves_nothing(self):
        started = time.monotonic()
        done = make('demo', timeout=DEMO_LIMIT * 2)
        elapsed = time.monotonic() - started
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertLess(elapsed, DEMO_LIMIT, done.stdout)
        out = done.stdout
        for name, value in harness.UPS_VARS.items():
            self.assertIn(f'{name}: {value}\n', out)
        self.assertRegex(out, r'TLS version: TLSv1\.3, cipher: TLS_\w+')
        host = re.search(r'verified the server certificate: CN=(\S+), .*DNS:localhost', out)
        self.assertIsNotNone(host, out)
        self.assertRegex(out, rf'verified the client certificate: +CN={re.escape(host[1])}')
        tmp = re.search(r'(/\S*nuttls-demo-\w+) removed', out)[1]
        self.assertFalse(os.path.exists(tmp))
        self.assertEqual(processes_mentioning(tmp), [])

    def test_process_scan_finds_a_process_left_behind(self):
        # Negative control for the check above: a process holding the demo's
        # kind of path in its environment is found.  Popen returns once the
        # kernel has swapped in sleep's memory, a moment before it lays out
        # the new environment (empty until then, and a CI run caught that
        # moment), so poll; a scan that cannot see the process times out.
        marker = f'/tmp/nuttls-demo-control{os.getpid()}'
        with subprocess.Popen(['sleep', '60'], env=dict(os.environ, X=marker)) as proc:
            try:
                found = wait_for(lambda: processes_mentioning(marker),
                                 what=f'pid {proc.pid} in the process scan')
                self.assertEqual(found, [proc.pid])
            finally:
                proc.kill()

    def test_demo_without_openssl_fails_and_leaves_nothing(self):
        empty = tempdir(self)
        done = subprocess.run([sys.executable, str(ROOT / 'test' / 'demo.py')],
                              capture_output=True, text=True, timeout=TIMEOUT * 2,
                              check=False, env=dict(os.environ, PATH=str(empty)))
        self.assertEqual(done.returncode, 1, done.stdout)
        self.assertIn('demo failed: mkNUTcert.py failed', done.stderr)
        self.assertNotIn('TLS version', done.stdout)
        tmp = re.search(r'(/\S*nuttls-demo-\w+) removed', done.stdout)[1]
        self.assertFalse(os.path.exists(tmp))
        self.assertEqual(processes_mentioning(tmp), [])


class ReadmeTest(unittest.TestCase):
    """The README's quick start, as written."""

    def test_quick_start_commands_all_succeed(self):
        commands = quick_start_commands((ROOT / 'README.md').read_text(encoding='utf-8'))
        self.assertIn('make demo', commands)
        for command in commands:
            with self.subTest(command=command):
                done = subprocess.run(['bash', '-euc', command], cwd=ROOT, capture_output=True,
                                      text=True, timeout=60, check=False)
                self.assertEqual(done.returncode, 0, done.stdout + done.stderr)

    def test_quick_start_extraction_takes_only_that_block(self):
        text = ('## Install\n```\nrm -rf /\n```\n## Quick start\nRun:\n```sh\n'
                '# a comment\nmake demo\n\necho ok\n```\n```\nfalse\n```\n')
        self.assertEqual(quick_start_commands(text), ['make demo', 'echo ok'])
        self.assertEqual(quick_start_commands('## Quick start\nno block\n'), [])


class InstallTest(unittest.TestCase):
    """`make install` and `make uninstall` under DESTDIR."""

    def expected(self, prefix='usr/local', init=False):
        """{path: mode} that install must write below DESTDIR."""
        files = {f'{prefix}/sbin/{name}': 0o755 for name in SCRIPTS}
        files.update({f'{prefix}/lib/systemd/system/{name}': 0o644 for name in UNITS})
        files.update({f'etc/nut/{name}': 0o644 for name in EXAMPLES})
        if init:
            files.update({f'etc/init.d/{name}': 0o755 for name in INITS})
        return files

    def test_install_destdir_writes_exactly_the_expected_files(self):
        dest = tempdir(self)
        done = make('install', f'DESTDIR={dest}')
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(tree(dest), self.expected())
        for name in SCRIPTS:
            self.assertEqual((dest / 'usr/local/sbin' / name).read_bytes(),
                             (ROOT / name).read_bytes())
        units = dest / 'usr/local/lib/systemd/system'
        unit = (units / 'upsdTLS.service').read_text(encoding='utf-8')
        self.assertIn('\nExecStart=/usr/local/sbin/upsdTLS.py @/etc/nut/upsdTLS.conf\n', unit)
        template = (units / 'upsmonTLS@.service').read_text(encoding='utf-8')
        self.assertIn('\nExecStart=/usr/local/sbin/upsmonTLS.py @/etc/nut/upsmonTLS-%i.conf\n',
                      template)

    def test_install_with_prefix_and_initdir_fills_in_those_paths(self):
        dest = tempdir(self)
        done = make('install', f'DESTDIR={dest}', 'PREFIX=/opt/nuttls', 'INITDIR=/etc/init.d')
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(tree(dest), self.expected('opt/nuttls', init=True))
        text = ''.join(path.read_text(encoding='utf-8') for path in dest.rglob('*')
                       if path.is_file() and path.suffix != '.py')
        self.assertNotIn('@SBINDIR@', text)
        self.assertNotIn('@CONFDIR@', text)
        self.assertNotIn('/usr/local', text)
        self.assertIn('ExecStart=/opt/nuttls/sbin/upsmonTLS.py ', text)
        self.assertIn('\nDAEMON=/opt/nuttls/sbin/upsdTLS.py\n', text)

    def test_install_keeps_options_files_and_directory_modes(self):
        dest = tempdir(self)
        confdir = dest / 'etc/nut'
        confdir.mkdir(parents=True)
        os.chmod(confdir, 0o750)
        real = confdir / 'upsdTLS.conf'
        real.write_text('--cert /etc/nut/tls/mine.cert.pem\n', encoding='utf-8')
        self.assertEqual(make('install', f'DESTDIR={dest}').returncode, 0)
        self.assertEqual(real.read_text(encoding='utf-8'), '--cert /etc/nut/tls/mine.cert.pem\n')
        self.assertEqual(confdir.stat().st_mode & 0o777, 0o750)
        # Uninstall removes what install wrote and nothing else.
        done = make('uninstall', f'DESTDIR={dest}')
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(list(tree(dest)), ['etc/nut/upsdTLS.conf'])

    def test_uninstall_with_initdir_removes_init_scripts(self):
        dest = tempdir(self)
        self.assertEqual(make('install', f'DESTDIR={dest}', 'INITDIR=/etc/init.d').returncode, 0)
        self.assertEqual(make('uninstall', f'DESTDIR={dest}', 'INITDIR=/etc/init.d').returncode,
                         0)
        self.assertEqual(tree(dest), {})


def install_into(testcase, top):
    """`make install` with every path below top (so the paths exist)."""
    done = make('install', f'PREFIX={top}/usr', f'SYSCONFDIR={top}/etc',
                f'INITDIR={top}/etc/init.d')
    testcase.assertEqual(done.returncode, 0, done.stderr)
    return top / 'usr/lib/systemd/system'


@unittest.skipUnless(shutil.which('systemd-analyze'), 'systemd-analyze not installed')
class SystemdUnitTest(unittest.TestCase):
    """The installed units under `systemd-analyze verify`."""

    def verify(self, unitdir, *units):
        """Runs systemd-analyze verify on units in unitdir."""
        return subprocess.run(['systemd-analyze', 'verify', *(str(unitdir / u) for u in units)],
                              capture_output=True, text=True, timeout=TIMEOUT * 3, check=False)

    def test_units_pass_systemd_analyze_verify(self):
        unitdir = install_into(self, tempdir(self, 0o755))
        done = self.verify(unitdir, 'upsdTLS.service', 'upsmonTLS.service',
                           'upsmonTLS@ups1.service')
        self.assertEqual((done.returncode, done.stderr), (0, ''))

    def test_verify_fails_for_a_unit_whose_program_is_missing(self):
        unitdir = install_into(self, tempdir(self, 0o755))
        os.unlink(unitdir.parent.parent.parent / 'sbin/upsdTLS.py')
        done = self.verify(unitdir, 'upsdTLS.service')
        self.assertNotEqual(done.returncode, 0)
        self.assertIn('upsdTLS.py is not executable', done.stderr)


def bounding_set(unit_path):
    """The capability names of a unit's CapabilityBoundingSet, lower case, no CAP_."""
    text = pathlib.Path(unit_path).read_text(encoding='utf-8')
    line = re.search(r'^CapabilityBoundingSet=(.*)$', text, re.MULTILINE)[1]
    return [name.lower().removeprefix('cap_') for name in line.split()]


def free_low_port():
    """A port below 1024 free on 127.0.0.1 (needs root), or None."""
    for port in range(400, 1024):
        with socket.socket() as sock:
            try:
                sock.bind(('127.0.0.1', port))
            except OSError:
                continue
            return port
    return None


@unittest.skipUnless(os.geteuid() == 0 and shutil.which('setpriv')
                     and os.access('/usr/bin/python3', os.X_OK),
                     'needs root, setpriv and /usr/bin/python3')
class CapabilityTest(unittest.TestCase):
    """The unit's CapabilityBoundingSet, applied with setpriv as systemd does.

    /usr/bin/python3 (readable by nut, unlike a Python under /root) runs the
    installed upsdTLS.py with keys from `mkNUTcert.py --owner nut`."""

    def setUp(self):
        try:
            pwd.getpwnam('nut')
        except KeyError:
            self.skipTest('no user nut')
        top = tempdir(self, 0o755)
        self.unit = install_into(self, top) / 'upsdTLS.service'
        self.script = top / 'usr/sbin/upsdTLS.py'
        self.tls = top / 'tls'
        done = subprocess.run([sys.executable, str(harness.MKNUTCERT), '--dir', str(self.tls),
                               '--owner', 'nut'], capture_output=True, timeout=TIMEOUT,
                              check=False)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.host = server_name(self.tls)
        self.port = free_low_port()

    def run_with(self, caps):
        """argv running the installed upsdTLS.py with bounding set caps."""
        argv = ['setpriv', '--bounding-set', ','.join(['-all'] + [f'+{c}' for c in caps]),
                '--no-new-privs', '/usr/bin/python3', str(self.script),
                '--listen', f'127.0.0.1:{self.port}', '--user', 'nut',
                '--cert', str(self.tls / f'{self.host}.cert.pem'),
                '--key', str(self.tls / f'{self.host}.key.pem')]
        return argv

    def test_unit_capabilities_bind_low_port_read_nut_key_and_drop(self):
        caps = bounding_set(self.unit)
        self.assertEqual(sorted(caps), ['dac_read_search', 'net_bind_service', 'setgid',
                                        'setuid'])
        with harness.Proc(self.run_with(caps), ready_marks=[
                f'listening on 127.0.0.1:{self.port}', 'running as user nut']) as proc:
            with harness.LineClient.connect('127.0.0.1', self.port) as client:
                self.assertEqual(client.cmd('STARTTLS'), 'OK STARTTLS')
            self.assertEqual(proc.stop(), 0)

    def test_fewer_capabilities_fail_with_the_cause(self):
        caps = bounding_set(self.unit)
        for missing, message, status in (
                ('dac_read_search', 'cannot load: Permission denied', 2),
                ('net_bind_service', 'Permission denied', 1),
                ('setuid', 'Operation not permitted', 1)):
            with self.subTest(missing=missing):
                argv = self.run_with([c for c in caps if c != missing])
                done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                                      check=False)
                self.assertEqual(done.returncode, status, done.stderr)
                self.assertIn(message, done.stderr)


NS_SETUP = r'''set -e
# Private mount namespace: a fresh /dev with the usual devices and /dev/log
# bound to the test's syslog socket; nothing outside the namespace changes.
mkdir -p "$T/realdev"
mount --rbind /dev "$T/realdev"
mount -t tmpfs -o mode=0755 nuttls-dev /dev
for n in null zero full random urandom tty; do
    touch "/dev/$n"; mount --bind "$T/realdev/$n" "/dev/$n"
done
ln -s /proc/self/fd /dev/fd
touch /dev/log
mount --bind "$T/log.sock" /dev/log
exec "$@"
'''


@unittest.skipUnless(shutil.which('start-stop-daemon'), 'start-stop-daemon not installed')
class InitScriptTest(unittest.TestCase):
    """The init scripts start the shim with --daemon, which logs to /dev/log.

    As root (with unshare) the start runs in a private mount namespace whose
    /dev/log is a socket of this test, so the syslog lines are checked too;
    otherwise a host's own /dev/log is used."""

    def setUp(self):
        self.top = tempdir(self, 0o755)
        install_into(self, self.top)
        done = subprocess.run([sys.executable, str(harness.MKNUTCERT), '--dir',
                               str(self.top / 'tls')], capture_output=True, timeout=TIMEOUT,
                              check=False)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.syslog = None
        if os.geteuid() == 0 and shutil.which('unshare'):
            self.syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.addCleanup(self.syslog.close)
            self.syslog.bind(str(self.top / 'log.sock'))
            self.syslog.setblocking(False)
            self.log = ''
        elif not os.path.exists('/dev/log'):
            self.skipTest('no /dev/log, and not root with unshare to provide one')
        self.pidfile = self.top / 'run' / 'shim.pid'
        self.env = dict(os.environ, PIDFILE=str(self.pidfile), PYTHON=sys.executable,
                        CONFFILE=str(self.top / 'shim.conf'))

    def init(self, name, action):
        """Runs the installed init script NAME with action; start in the namespace."""
        argv = ['sh', str(self.top / 'etc/init.d' / name), action]
        if action == 'start' and self.syslog is not None:
            argv = ['unshare', '--mount', '--propagation', 'private', 'sh', '-c', NS_SETUP,
                    'sh', *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT * 3,
                              check=False, env=dict(self.env, T=str(self.top)))

    def logged(self, text):
        """True once the test's syslog socket received text (always True without it)."""
        if self.syslog is None:
            return True
        with contextlib.suppress(BlockingIOError):
            while True:
                self.log += self.syslog.recv(65536).decode(errors='replace') + '\n'
        return text in self.log

    def write_conf(self, name, port):
        """The installed example with this test's paths and ports."""
        tls = self.top / 'tls'
        host = server_name(tls)
        example = (self.top / 'etc/nut' / f'{name}.conf.example').read_text(encoding='utf-8')
        text = (example.replace(f'{self.top}/etc/nut/tls/HOSTNAME', f'{tls}/{host}')
                .replace(f'{self.top}/etc/nut/tls/ca.cert.pem', f'{tls}/ca.cert.pem')
                .replace('--upsd ups1.example.net', f'--upsd 127.0.0.1:{harness.free_port()}'))
        text += f'--listen 127.0.0.1:{port}\n--user {pwd.getpwuid(os.getuid()).pw_name}\n'
        pathlib.Path(self.env['CONFFILE']).write_text(text, encoding='utf-8')

    def stop_by_pidfile(self):
        """Cleanup: SIGKILL a daemon the test failed to stop."""
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(self.pidfile.read_text(encoding='utf-8')), signal.SIGKILL)

    def test_init_scripts_pass_sh_n(self):
        for path in [*(ROOT / 'dist').glob('*.init'), *(self.top / 'etc/init.d').iterdir()]:
            with self.subTest(path=path.name):
                done = subprocess.run(['sh', '-n', str(path)], capture_output=True,
                                      timeout=TIMEOUT, check=False)
                self.assertEqual(done.returncode, 0, done.stderr)
        broken = self.top / 'broken'
        text = (ROOT / 'dist/upsdTLS.init').read_text(encoding='utf-8')
        broken.write_text(text.replace('esac', '', 1), encoding='utf-8')
        self.assertNotEqual(subprocess.run(['sh', '-n', str(broken)], capture_output=True,
                                           timeout=TIMEOUT, check=False).returncode, 0)

    def test_init_script_starts_reloads_and_stops_each_shim(self):
        for name in INITS:
            with self.subTest(name=name):
                self.start_reload_stop(name)

    def start_reload_stop(self, name):
        """start, status, start again, reload, stop, status, stop again."""
        port = harness.free_port()
        self.write_conf(name, port)
        self.addCleanup(self.stop_by_pidfile)
        self.assertEqual(self.init(name, 'status').returncode, 3)
        done = self.init(name, 'start')
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        pid = int(wait_for(lambda: self.pidfile.exists()
                           and self.pidfile.read_text(encoding='utf-8'),
                           what='the pidfile'))
        self.assertTrue(alive(pid))
        wait_for(lambda: self.logged(f'listening on 127.0.0.1:{port}'), what='syslog line')
        with harness.LineClient.connect('127.0.0.1', port):
            pass
        done = self.init(name, 'status')
        self.assertEqual(done.returncode, 0, done.stdout)
        self.assertIn(f'(pid {pid})', done.stdout)
        done = self.init(name, 'start')
        self.assertIn('already running', done.stdout)
        self.assertEqual(int(self.pidfile.read_text(encoding='utf-8')), pid)
        self.assertEqual(self.init(name, 'reload').returncode, 0)
        wait_for(lambda: self.logged('reloaded certificates for new sessions'),
                 what='the reload in syslog')
        done = self.init(name, 'stop')
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        # start-stop-daemon returns once the process no longer matches; its
        # exit may take a moment longer.
        wait_for(lambda: not alive(pid), what=f'pid {pid} to exit')
        self.assertFalse(self.pidfile.exists())
        self.assertEqual(self.init(name, 'status').returncode, 3)
        self.assertIn('not running', self.init(name, 'stop').stdout)

    def test_start_with_a_bad_option_fails_and_leaves_nothing(self):
        port = harness.free_port()
        self.write_conf('upsdTLS', port)
        conf = pathlib.Path(self.env['CONFFILE'])
        text = conf.read_text(encoding='utf-8') + '--cert /nonexistent.pem\n'
        conf.write_text(text, encoding='utf-8')
        self.addCleanup(self.stop_by_pidfile)
        done = self.init('upsdTLS', 'start')
        self.assertNotEqual(done.returncode, 0)
        self.assertIn('--cert /nonexistent.pem', done.stderr)
        self.assertFalse(self.pidfile.exists())
        with self.assertRaises(OSError):
            socket.create_connection(('127.0.0.1', port), TIMEOUT).close()


if __name__ == '__main__':
    unittest.main()
