#!/usr/bin/env python3
"""Faults, hostile input and load for both shims with real upsd (`make stress`).

Runs the case functions of test/test_reliability.py with the full numbers
of issue #7 (1000 concurrent sessions held for a minute, 10,000 short
sessions, 10,000 pipelined commands, thousands of random inputs, 10 MB
lines), plus real upsmon reconnecting through upsmonTLS after upsdTLS is
killed.  Prints a Markdown table (case | held | survived | lost) and the
machine it ran on, and writes the same to bench/results/stress.md for the
README.  --quick runs every case with smaller numbers (about two minutes).

The descriptor limit (RLIMIT_NOFILE) of this process is raised to 65536
(hard limit too when run as root) before upsd and the shims start, so they
inherit it; upsd is configured with MAXCONN 4096.  A failing case is listed
with FAILED and its message in the `lost` column, and the exit status is 1.
"""

import argparse
import os
import pathlib
import platform
import shutil
import ssl
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "test"))
# The harness and the case functions live with the tests.
import harness  # noqa: E402  pylint: disable=import-error,wrong-import-position
import test_reliability as rel  # noqa: E402  pylint: disable=import-error,wrong-import-position

RESULTS = ROOT / "bench" / "results" / "stress.md"


def case_upsmon_reconnects(rig):
    """Real upsmon through upsmonTLS; upsdTLS SIGKILLed and restarted on its port."""
    upsd_tls_port = harness.free_port()
    upsd_proc, _ = rig.upsdtls(port=upsd_tls_port)
    upsmon_tls, port = rig.upsmontls(upsd_tls_port, "--handshake-timeout", "2")
    upsmon = harness.Upsmon("127.0.0.1", port)
    rig.stack.callback(upsmon.stop)
    harness.wait_for(lambda: upsmon.logged_in() and upsmon.polls() >= 2,
                     what="upsmon logged in and polling through the chain")
    upsd_proc.proc.kill()
    upsd_proc.proc.wait(harness.TIMEOUT)
    killed = time.monotonic()
    # upsmon notices the lost connection on its next poll (POLLFREQ 1).
    harness.wait_for(lambda: "failed" in upsmon.log_text().lower()
                     or "lost" in upsmon.log_text().lower(),
                     what="upsmon noticing the lost connection")
    polls_down = upsmon.polls()
    restarted = time.monotonic()
    rig.upsdtls(port=upsd_tls_port)
    harness.wait_for(lambda: upsmon.polls() >= polls_down + 2, timeout=harness.TIMEOUT * 6,
                     what="upsmon polling again after upsdTLS came back")
    back = time.monotonic() - restarted
    rel.check(upsmon_tls.proc.poll() is None, "upsmonTLS exited")
    rel.check(upsmon.proc.poll() is None, "upsmon exited")
    return rel.Outcome("real upsmon (POLLFREQ 1) through upsmonTLS; upsdTLS SIGKILLed",
                       f"upsmon polling again {back:.1f} s after upsdTLS restarted "
                       f"(down {restarted - killed:.1f} s); upsmonTLS not restarted",
                       "the upsmon session at the kill (upsmon logged in again by itself)")


def cases(quick):
    """(name, function, keyword arguments) for every row of the table."""
    def size(full, small):
        return small if quick else full
    return [
        ("upsd restarted under live sessions", rel.case_upsd_restart,
         {"sessions": size(50, 10)}),
        ("upsdTLS SIGKILL + restart, raw client via upsmonTLS", rel.case_upsdtls_sigkill, {}),
        ("upsdTLS SIGKILL + restart, real upsmon via upsmonTLS", case_upsmon_reconnects, {}),
        ("peer stops reading, keeps sending LIST VAR (upsdTLS)", rel.case_stalled_reader,
         {"via": "upsdTLS"}),
        ("peer stops reading, keeps sending LIST VAR (chain)", rel.case_stalled_reader,
         {"via": "chain"}),
        ("peer vanishes without FIN (upsdTLS)", rel.case_vanished_peer, {"via": "upsdTLS"}),
        ("peer vanishes without FIN (upsmonTLS)", rel.case_vanished_peer, {"via": "chain"}),
        ("certificates expired / not yet valid", rel.case_certificate_dates, {}),
        ("random bytes before TLS (upsdTLS)", rel.case_random_plaintext,
         {"cases": size(5000, 1000)}),
        ("random bytes inside TLS (upsdTLS)", rel.case_random_relayed,
         {"via": "upsdTLS", "cases": size(2000, 300)}),
        ("random bytes from clients (upsmonTLS chain)", rel.case_random_relayed,
         {"via": "chain", "cases": size(2000, 300)}),
        ("NUL, control and non-ASCII bytes", rel.case_odd_bytes, {}),
        ("lines of 1 KB to 10 MB", rel.case_long_lines,
         {"sizes": (1023, 1024, 4096, 1 << 20, 10 << 20)}),
        ("HTTP request / TLS ClientHello in the plaintext phase", rel.case_wrong_protocol, {}),
        ("STARTTLS injection variants", rel.case_injection, {}),
        ("downgrades, second handshake, other CA", rel.case_downgrade, {}),
        ("concurrent sessions through upsdTLS", rel.case_concurrent,
         {"sessions": size(1000, 200), "hold": size(60.0, 5.0), "via": "upsdTLS"}),
        ("concurrent sessions through the chain", rel.case_concurrent,
         {"sessions": size(1000, 200), "hold": size(60.0, 5.0), "via": "chain"}),
        ("short sessions back to back (upsdTLS)", rel.case_short_sessions,
         {"sessions": size(10000, 1000), "via": "upsdTLS"}),
        ("short sessions back to back (chain)", rel.case_short_sessions,
         {"sessions": size(10000, 1000), "via": "chain"}),
        ("pipelined commands, one session (upsdTLS)", rel.case_pipelined,
         {"commands": size(10000, 2000), "via": "upsdTLS"}),
        ("pipelined commands, one session (chain)", rel.case_pipelined,
         {"commands": size(10000, 2000), "via": "chain"}),
    ]


def machine(nofile, quick, elapsed):
    """Lines describing where and how the table was made."""
    cpu = "unknown CPU"
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="ascii") as handle:
        mem_kb = int(handle.readline().split()[1])
    distro = platform.system()
    with open("/etc/os-release", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip().strip('"')
    upsd = subprocess.run([harness.UPSD_BIN, "-V"], capture_output=True, text=True,
                          check=False, timeout=harness.TIMEOUT)
    nut = (upsd.stdout or upsd.stderr).strip().splitlines()[0]
    return [
        f"Machine: {distro}, Linux {platform.release()}, {cpu}, {os.cpu_count()} cores, "
        f"{mem_kb // 1024} MB RAM.",
        f"Software: {nut}, Python {platform.python_version()}, {ssl.OPENSSL_VERSION}.",
        f"Run: `bench/stress.py{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s; "
        f"RLIMIT_NOFILE raised to {nofile} for the run (inherited by upsd and the shims), "
        f"upsd MAXCONN {rel.UPSD_MAXCONN}.",
    ]


def cell(text):
    """Text made safe for one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def run(pki, nut, selected):
    """Runs each (name, function, kwargs); returns the table rows and the failure count."""
    rows, failed = [], 0
    for name, function, kwargs in selected:
        started = time.monotonic()
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            with rel.Rig(pki, nut) as rig:
                outcome = function(rig, **kwargs)
        except (AssertionError, OSError, ssl.SSLError) as exc:
            failed += 1
            outcome = rel.Outcome("-", "FAILED", f"FAILED: {exc}")
        print(f"    {time.monotonic() - started:.1f} s: {outcome}", file=sys.stderr, flush=True)
        rows.append((name, *outcome))
    return rows, failed


def main(argv=None):
    """Runs every case; prints and writes the table; returns 1 if any case failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smaller numbers, about 2 minutes")
    parser.add_argument("--only", metavar="TEXT", help="run only cases whose name contains TEXT")
    parser.add_argument("--out", default=str(RESULTS), metavar="FILE",
                        help="where to write the Markdown (default: %(default)s)")
    args = parser.parse_args(argv)
    if not harness.nut_installed():
        print("stress.py: real NUT is needed (nut-server, nut-client)", file=sys.stderr)
        return 2
    nofile = rel.raise_nofile()
    started = time.monotonic()
    selected = [case for case in cases(args.quick)
                if not args.only or args.only.lower() in case[0].lower()]
    pki_dir = tempfile.mkdtemp(prefix="nuttls-stress-pki-")
    nut = None
    try:
        pki = harness.Pki(pki_dir)
        nut = rel.BigNutServer().start()
        rows, failed = run(pki, nut, selected)
    finally:
        if nut is not None:
            nut.stop()
        shutil.rmtree(pki_dir, ignore_errors=True)
    lines = ["| case | held | survived | lost |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(cell(part) for part in row) + " |" for row in rows]
    text = "\n".join(lines + [""] + machine(nofile, args.quick, time.monotonic() - started))
    print(text)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
