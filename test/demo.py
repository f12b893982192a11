"""`make demo`: the whole chain on loopback, in one temporary directory.

    upsc --plain--> upsmonTLS ==TLS 1.3, mutual==> upsdTLS --plain--> upsd

1. mkNUTcert.py makes a CA, a server and a client certificate for this host.
2. upsd starts: real NUT (dummy-ups + /lib/nut/upsd) where installed, else
   the test stand-in (a scripted upsd in this process).
3. upsdTLS starts in front of it, requiring a client certificate from the CA
   and admitting only this host's name (--client-ca, --allow-client).
4. upsmonTLS starts in front of the client, verifying upsdTLS's certificate.
5. One query runs through the chain: `upsc dummy@127.0.0.1:PORT` where
   installed, else LIST VAR with the harness's line client.
6. It prints the UPS variables, then the TLS version and cipher and the
   certificate names each shim verified, taken from the shims' own log lines.

Every port is a free high port on 127.0.0.1, no root is needed, and every
process is stopped and the directory removed in `finally`.  As root the shims
are told `--user root` (they would otherwise drop to `nut`, which may not be
able to read this Python), and real NUT drops to `nut` as usual.
Exit status 0 when the query came back through TLS, 1 otherwise.
"""
import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import harness

# The open lines the shims log for each session (DESIGN.md section 6).
UPSD_TLS_OPEN = re.compile(r'session \d+ open: peer \S+, (TLSv[\d.]+) (\S+), '
                           r'client certificate (.*), upsd \S+ from local port (\d+)')
UPSMON_TLS_OPEN = re.compile(r'session \d+ open: peer \S+, upstream \S+ from local port \d+, '
                             r'(TLSv[\d.]+) (\S+), server certificate (.*)')


def step(text):
    """Prints one progress line."""
    print(f'== {text}', flush=True)


def make_certificates(tmp):
    """Runs mkNUTcert.py with no command; returns (dir, this host's name)."""
    tls = tmp / 'tls'
    done = subprocess.run([sys.executable, str(harness.MKNUTCERT), '--dir', str(tls)],
                          capture_output=True, text=True, timeout=harness.TIMEOUT, check=False)
    if done.returncode:
        raise RuntimeError(f'mkNUTcert.py failed ({done.returncode}):\n{done.stderr}')
    for line in done.stdout.splitlines():
        if line.startswith(('wrote', '    key', '    names')):
            print('   ', line.strip())
    # The no-command run names the certificates after this host (its FQDN
    # where it has one): HOST.cert.pem and HOST-client.cert.pem.
    host = re.search(r'^wrote server certificate .*/([^/]+)\.cert\.pem ', done.stdout,
                     re.MULTILINE)[1]
    return tls, host


def query(port, ups):
    """The UPS variables through upsmonTLS: upsc's output, or LIST VAR lines."""
    if shutil.which('upsc'):
        done = subprocess.run(['upsc', f'{ups}@127.0.0.1:{port}'], capture_output=True,
                              text=True, timeout=harness.TIMEOUT, check=False)
        if done.returncode:
            raise RuntimeError(f'upsc failed ({done.returncode}): {done.stderr.strip()}')
        return done.stdout
    with harness.LineClient.connect('127.0.0.1', port) as client:
        lines = client.read_list(f'LIST VAR {ups}')
        client.cmd('LOGOUT')
    text = ''.join(f'{m[1]}: {m[2]}\n' for m in
                   (re.match(r'VAR \S+ (\S+) "(.*)"', line) for line in lines) if m)
    if not text:
        raise RuntimeError(f'LIST VAR {ups} failed: {lines}')
    return text


def log_match(proc, pattern, name):
    """Waits until proc's log has a line matching pattern; returns the match."""
    return harness.wait_for(lambda: pattern.search(proc.log_text()),
                            what=f'the session open line of {name}')


def run(tmp):
    """Runs the chain in tmp; returns 0.  Everything started is stopped here."""
    step('certificates (mkNUTcert.py)')
    tls, host = make_certificates(tmp)
    procs = []
    upsd = harness.NutServer() if harness.nut_installed() else harness.StandIn()
    try:
        step(f'upsd: {"real NUT, dummy-ups driver" if upsd.real else "test stand-in"}')
        upsd.start()
        print(f'    listening on 127.0.0.1:{upsd.port}, UPS "{upsd.ups}"')

        tls_port, plain_port = harness.free_port(), harness.free_port()
        step(f'upsdTLS on 127.0.0.1:{tls_port} (mutual TLS, --allow-client {host})')
        procs.append(harness.start_shim(harness.UPSD_TLS, [
            '--listen', f'127.0.0.1:{tls_port}', '--upsd', f'127.0.0.1:{upsd.port}',
            '--cert', tls / f'{host}.cert.pem', '--key', tls / f'{host}.key.pem',
            '--client-ca', tls / 'ca.cert.pem', '--allow-client', host]))
        step(f'upsmonTLS on 127.0.0.1:{plain_port} -> upsdTLS, verifying name localhost')
        procs.append(harness.start_shim(harness.UPSMON_TLS, [
            '--listen', f'127.0.0.1:{plain_port}', '--upsd', f'127.0.0.1:{tls_port}',
            '--cafile', tls / 'ca.cert.pem', '--server-name', 'localhost',
            '--cert', tls / f'{host}-client.cert.pem',
            '--key', tls / f'{host}-client.key.pem']))

        step(f'{"upsc" if shutil.which("upsc") else "LIST VAR"} {upsd.ups}@127.0.0.1:'
             f'{plain_port} (through upsmonTLS and upsdTLS)')
        text = query(plain_port, upsd.ups)
        print(text, end='', flush=True)

        server_side = log_match(procs[0], UPSD_TLS_OPEN, 'upsdTLS')
        client_side = log_match(procs[1], UPSMON_TLS_OPEN, 'upsmonTLS')
        step('what the shims logged for this session')
        print(f'    TLS version: {server_side[1]}, cipher: {server_side[2]}')
        print(f'    upsmonTLS verified the server certificate: {client_side[3]}')
        print(f'    upsdTLS verified the client certificate:   {server_side[3]}')
        print(f'    upsd saw the session from 127.0.0.1:{server_side[4]}')
    finally:
        step('stopping')
        for proc in reversed(procs):
            proc.stop()
        upsd.stop()
    return 0


def main(argv=None):
    """Runs the demo; returns the exit status."""
    argparse.ArgumentParser(description=__doc__.split('\n', 1)[0]).parse_args(argv)
    started = time.monotonic()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix='nuttls-demo-'))
    saved_tempdir = tempfile.tempdir
    try:
        # Real NUT drops to user nut and reads its configuration below tmp.
        os.chmod(tmp, 0o755)
        tempfile.tempdir = str(tmp)     # the harness's own files go here too
        status = run(tmp)
    except (RuntimeError, AssertionError, OSError) as exc:
        print(f'demo failed: {exc}', file=sys.stderr)
        status = 1
    finally:
        tempfile.tempdir = saved_tempdir
        shutil.rmtree(tmp, ignore_errors=True)
    print(f'== done in {time.monotonic() - started:.1f} s, exit status {status}; '
          f'nothing left running, {tmp} removed')
    return status


if __name__ == '__main__':
    sys.exit(main())
