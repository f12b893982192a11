#!/usr/bin/env python3
"""mkNUTcert: a small private CA and TLS certificates for NUT and its shims.

    mkNUTcert.py [--dir DIR] [--days N] [--key-type ec|rsa] [--force]
                 [--owner USER[:GROUP]] [COMMAND]

What it makes, in DIR (default /etc/nut/tls when run as root, else ./nut-tls
in the current directory; created, mode 0755, when missing):

    ca [--name CN]            ca.cert.pem, ca.key.pem: the CA (3650 days)
    server NAME [--san N]...  NAME.cert.pem, NAME.key.pem: serverAuth; the
                              SAN holds NAME and every --san (IP addresses
                              as IP entries, names as DNS entries)
    client NAME               NAME.cert.pem, NAME.key.pem: clientAuth
    nssdb PATH                an NSS database at PATH trusting the CA, for
                              CERTPATH of stock NUT clients built with NSS
                              (Debian, Ubuntu); needs certutil
    (no command)              the CA unless DIR has one, then a server
                              certificate for this host (its name,
                              localhost, 127.0.0.1, ::1) in HOST.cert.pem and
                              a client certificate for it in
                              HOST-client.cert.pem

The options may come before or after the command. It prints what it wrote,
each certificate's names, end date and SHA-256 fingerprint, and the shim
options (or upsmon.conf lines) that use them.

What it trusts: the openssl command on PATH (and certutil for nssdb), run with
argument lists and a generated config, never through a shell.

Files: keys are mode 0600 from the first byte (a hidden temporary file made
with O_EXCL and mode 0600, filled from openssl's standard output),
certificates 0644, whatever the umask. Everything is written under a
temporary name in DIR and renamed into place once every file of the run is
complete, so an interrupted run leaves no half-written file. An existing file
is never replaced without --force; a run that would replace one stops before
writing anything. The no-command run reuses a CA that DIR already holds, even
with --force: replace a CA only with `ca --force`, which invalidates every
certificate it signed. --owner USER[:GROUP] gives the server and client keys
(and the NSS database's files, and its directory when this run creates it) to
the user the shims or upsmon run as, so that they can read them after
dropping privileges; the CA key stays with the caller.

Certificates: EC P-256 keys (--key-type rsa: RSA 3072), SHA-256 signatures,
random 120-bit serials, an end date --days ahead (default 825 days for
server and client certificates, 3650 for the CA). The CA has
basicConstraints critical CA:TRUE, pathlen:0, keyUsage critical keyCertSign,
cRLSign and an SKI; the others have CA:FALSE, AKI, SKI, keyUsage
digitalSignature (plus keyEncipherment for RSA), extendedKeyUsage serverAuth
or clientAuth and a SAN. They pass `openssl verify -x509_strict`, Python's
ssl with VERIFY_X509_STRICT and NSS.

What it does not do: no revocation lists, no passphrases on keys (the shims
start unattended), no renewal: renew by running it again with --force.
Keep ca.key.pem on one host; other hosts need only ca.cert.pem.

Exit status: 0 done; 2 usage or configuration error (missing openssl or
certutil, an unwritable DIR, no CA for server/client/nssdb, a file that
exists without --force), with nothing written; 1 openssl or certutil failed.
"""

import argparse
import contextlib
import dataclasses
import errno
import grp
import ipaddress
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

VERSION = "1.0"
PROG = "mkNUTcert.py"

# Defaults of the contract (DESIGN.md section 5).  825 days is the longest
# leaf lifetime some TLS clients still accept; the CA outlives several
# generations of leaves.
DEFAULT_DAYS_LEAF = 825
DEFAULT_DAYS_CA = 3650
# Beyond a century an end date is a typo, not a policy.
MAX_DAYS = 36500
# Random serials: 120 bits stay well under the 20-octet limit of RFC 5280
# and make two certificates from the same CA never share a serial (NSS
# refuses a reused issuer and serial).
SERIAL_BITS = 120
# openssl and certutil finish in well under a second (RSA 3072 in a few);
# the bound only stops a wedged tool from hanging an init script.
TOOL_TIMEOUT = 120

KEY_MODE = 0o600
CERT_MODE = 0o644
# DIR and the NSS directory must be traversable by the user the shims drop
# to; what is secret in them is protected by the files' own modes.
DIR_MODE = 0o755

# openssl genpkey arguments per --key-type.  named_curve: explicit curve
# parameters are rejected by strict verification.
KEY_TYPES = {
    "ec": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
           "-pkeyopt", "ec_param_enc:named_curve"],
    "rsa": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"],
}

CA_CERT = "ca.cert.pem"
CA_KEY = "ca.key.pem"
NSS_FILES = ("cert9.db", "key4.db", "pkcs11.txt")
# The default run names this host's client certificate HOST-client, since
# its server certificate already takes HOST.cert.pem.
CLIENT_SUFFIX = "-client"
# A host name label (RFC 1123): letters, digits, inner hyphens.  Used with
# fullmatch: `$` would also match before a final newline.
LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
CN_MAX = 64  # the upper bound of a commonName in X.509 (ub-common-name)


class ConfigError(Exception):
    """A usage or configuration error: exit status 2, nothing written."""


class ToolError(Exception):
    """openssl or certutil failed: exit status 1."""


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who gets the server and client keys (--owner USER[:GROUP])."""
    uid: int
    gid: int
    text: str


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A server or client certificate to make.

    name is the subject CN (see common_name); stem names the files
    DIR/STEM.cert.pem and DIR/STEM.key.pem; sans holds ("DNS", name) and
    ("IP", address) pairs, name always among them.
    """
    usage: str
    name: str
    stem: str
    sans: tuple

    def cert_path(self, directory):
        """Where the certificate goes."""
        return os.path.join(directory, self.stem + ".cert.pem")

    def key_path(self, directory):
        """Where the private key goes."""
        return os.path.join(directory, self.stem + ".key.pem")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated command line.

    command is "default", "ca", "server", "client" or "nssdb"; days is None
    for the per-certificate default; leaves are the certificates other than
    the CA that the command makes; nssdb is the absolute PATH of `nssdb`.
    """
    command: str
    directory: str
    days: object
    key_type: str
    force: bool
    owner: object
    ca_name: str
    leaves: tuple
    nssdb: object


@dataclasses.dataclass(frozen=True)
class CertInfo:
    """What the report shows of a certificate, read back from the file."""
    subject: str
    names: tuple
    not_after: float
    fingerprint: str


# ---------------------------------------------------------------------------
# Option parsing and validation

def default_dir():
    """The DIR an administrator expects: NUT's config tree as root, else a
    directory beside the caller (who cannot write /etc/nut)."""
    if os.geteuid() == 0:
        return "/etc/nut/tls"
    return os.path.join(".", "nut-tls")


def build_parser():
    """The argparse parser: options are accepted before and after COMMAND."""
    common = argparse.ArgumentParser(add_help=False,
                                     argument_default=argparse.SUPPRESS)
    common.add_argument(
        "--dir", metavar="DIR",
        help="where the CA and certificates live (default: /etc/nut/tls as "
             "root, else ./nut-tls; created when missing)")
    common.add_argument(
        "--days", metavar="N",
        help=f"days until the new certificates end (default: "
             f"{DEFAULT_DAYS_LEAF} for server and client, {DEFAULT_DAYS_CA} "
             f"for the CA)")
    common.add_argument(
        "--key-type", choices=sorted(KEY_TYPES),
        help="ec: EC P-256 (default); rsa: RSA 3072")
    common.add_argument(
        "--force", action="store_true",
        help="replace existing files (the no-command run still keeps an "
             "existing CA)")
    common.add_argument(
        "--owner", metavar="USER[:GROUP]",
        help="give the server and client keys (and the NSS database) to "
             "USER, e.g. nut (default: the caller)")

    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 2)[2],
        epilog="examples:\n"
               "  mkNUTcert.py --owner nut    "
               "# CA, this host's server and client certificates\n"
               "  mkNUTcert.py server ups1.example.net --san 192.0.2.10\n"
               "  mkNUTcert.py --owner nut client mgmt1.example.net\n"
               "  mkNUTcert.py --owner nut nssdb /etc/nut/nssdb")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {VERSION}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    ca_cmd = commands.add_parser("ca", parents=[common],
                                 help="make the CA: DIR/ca.cert.pem, "
                                      "DIR/ca.key.pem")
    ca_cmd.add_argument("--name", metavar="CN",
                        help="the CA's common name (default: "
                             "'NUT TLS CA HOST DATE')")
    server = commands.add_parser("server", parents=[common],
                                 help="make DIR/NAME.cert.pem, "
                                      "DIR/NAME.key.pem for upsdTLS.py")
    server.add_argument("name", metavar="NAME",
                        help="the server's DNS name or IP address")
    server.add_argument("--san", metavar="NAME_OR_IP", action="append",
                        default=[],
                        help="another name or IP address; repeatable")
    client = commands.add_parser("client", parents=[common],
                                 help="make DIR/NAME.cert.pem, "
                                      "DIR/NAME.key.pem for upsmonTLS.py")
    client.add_argument("name", metavar="NAME",
                        help="the client's DNS name or IP address")
    nssdb = commands.add_parser("nssdb", parents=[common],
                                help="make an NSS database at PATH trusting "
                                     "the CA (upsmon.conf CERTPATH)")
    nssdb.add_argument("path", metavar="PATH",
                       help="the database directory, e.g. /etc/nut/nssdb")
    return parser


def check_host(option, value):
    """Return ("IP", address) or ("DNS", name) for a host name or address.

    Raise ConfigError naming option when value is neither.  Names are
    lower-cased (DNS is case-insensitive; file names should not be).
    """
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        address = None
    if address is not None:
        if getattr(address, "scope_id", None):
            raise ConfigError(f"{option}={value}: a scoped address cannot "
                              f"be in a certificate")
        return ("IP", str(address))
    name = value.lower()
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    if (not name or len(name) > 253
            or not all(LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        shown = value if value.isprintable() else repr(value)  # one line
        raise ConfigError(f"{option}={shown} is not a host name or IP "
                          f"address")
    return ("DNS", name)


def check_stem(option, name):
    """Refuse a NAME whose files would be the CA's."""
    if name == "ca":
        raise ConfigError(f"{option}={name} would take the CA's files "
                          f"ca.cert.pem, ca.key.pem; use a longer name")
    return name


def check_days(value):
    """--days: a whole number of days, 1 to MAX_DAYS, or None."""
    if value is None:
        return None
    try:
        days = int(value, 10)
    except ValueError:
        raise ConfigError(f"--days={value} is not a whole number") from None
    if not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"--days={value} is not between 1 and {MAX_DAYS}")
    return days


def check_owner(value):
    """--owner USER[:GROUP] as an Owner; the group defaults to USER's."""
    if value is None:
        return None
    user, _, group = value.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"--owner={value}: no user {user!r}") from None
    gid = entry.pw_gid
    if group:
        try:
            if group.isdigit():
                gid = grp.getgrgid(int(group)).gr_gid
            else:
                gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"--owner={value}: no group {group!r}") from None
    if os.geteuid() not in (0, entry.pw_uid):
        raise ConfigError(f"--owner={value}: only root can give files to "
                          f"another user")
    return Owner(entry.pw_uid, gid, value)


def check_ca_name(value):
    """--name: printable text of at most CN_MAX characters."""
    if not value or len(value) > CN_MAX or not value.isprintable():
        raise ConfigError(f"--name={value!r} must be 1 to {CN_MAX} "
                          f"printable characters")
    return value


def default_ca_name():
    """`NUT TLS CA HOST DATE`, HOST shortened so that it fits a commonName."""
    date = time.strftime("%Y-%m-%d")
    room = CN_MAX - len(f"NUT TLS CA  {date}")
    host = socket.gethostname()
    if len(host) > room:
        host = host.split(".")[0][:room]
    return f"NUT TLS CA {host} {date}"


def this_host():
    """This host's name and the names its server certificate holds.

    socket.getfqdn() often answers `localhost` on hosts without a DNS entry;
    then the kernel's host name is the better name.
    """
    short = socket.gethostname()
    fqdn = socket.getfqdn()
    name = fqdn if fqdn and not fqdn.startswith("localhost") else short
    names = []
    for value in (name, short, "localhost", "127.0.0.1", "::1"):
        entry = check_host("this host's name", value)
        if entry not in names:
            names.append(entry)
    return names[0][1], tuple(names)


def parse_args(argv):
    """Parse and validate argv into Settings; argparse exits 2 on syntax."""
    args = build_parser().parse_args(argv)
    command = args.command or "default"
    directory = os.path.abspath(getattr(args, "dir", None) or default_dir())
    key_type = getattr(args, "key_type", "ec")
    leaves = ()
    if command in ("server", "client"):
        kind, name = check_host("NAME", args.name)
        check_stem("NAME", name)
        sans = [(kind, name)]
        for value in getattr(args, "san", []):
            entry = check_host("--san", value)
            if entry not in sans:
                sans.append(entry)
        leaves = (Leaf(command, name, name, tuple(sans)),)
    elif command == "default":
        name, sans = this_host()
        check_stem("this host's name", name)
        leaves = (Leaf("server", name, name, sans),
                  Leaf("client", name, name + CLIENT_SUFFIX,
                       (("DNS", name),)))
    ca_name = getattr(args, "name", None) if command == "ca" else None
    if ca_name is None:
        ca_name = default_ca_name()
    return Settings(
        command=command,
        directory=directory,
        days=check_days(getattr(args, "days", None)),
        key_type=key_type,
        force=getattr(args, "force", False),
        owner=check_owner(getattr(args, "owner", None)),
        ca_name=check_ca_name(ca_name),
        leaves=leaves,
        nssdb=os.path.abspath(args.path) if command == "nssdb" else None)


# ---------------------------------------------------------------------------
# Checks of the file system, made before anything is written

def find_tool(name, package):
    """The absolute path of a tool on PATH, or ConfigError naming it."""
    path = shutil.which(name)
    if path is None:
        raise ConfigError(f"{name} not found on PATH (install the {package} "
                          f"package)")
    return path


def check_writable_dir(option, path):
    """Make sure path is, or can become, a directory this process writes in.

    Nothing is created here: a missing directory is checked through its
    nearest existing parent.
    """
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{option}={path} is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{option}={path} is not writable")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{option}={path} cannot be created: {parent} is "
                          f"not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}={path} cannot be created: {parent} is "
                          f"not writable")


def make_dir(path):
    """Create path (and its parents) with DIR_MODE whatever the umask."""
    if not os.path.isdir(path):
        os.makedirs(path, exist_ok=True)
        os.chmod(path, DIR_MODE)


def check_ca(settings, need_key):
    """Return True when the CA must be made, False when DIR holds one.

    Raise ConfigError when a command needs a CA that DIR lacks, or when DIR
    holds only half a CA.
    """
    cert = os.path.join(settings.directory, CA_CERT)
    key = os.path.join(settings.directory, CA_KEY)
    have = [os.path.lexists(cert), os.path.lexists(key)]
    if settings.command == "ca":
        return True
    if not any(have) and settings.command == "default":
        return True
    hint = f"(make one with: {PROG} --dir {shlex.quote(settings.directory)} ca)"
    if not have[0]:
        raise ConfigError(f"no CA in --dir={settings.directory}: {cert} is "
                          f"missing {hint}")
    if need_key and not have[1]:
        raise ConfigError(f"no CA key in --dir={settings.directory}: {key} "
                          f"is missing")
    if need_key and not os.access(key, os.R_OK):
        raise ConfigError(f"{key} is not readable")
    return False


def check_targets(paths, force):
    """Refuse to go on when a file would be replaced without --force."""
    if force:
        return
    existing = [path for path in paths if os.path.lexists(path)]
    if existing:
        raise ConfigError(f"{', '.join(existing)} already exist"
                          f"{'s' if len(existing) == 1 else ''}; nothing "
                          f"written (--force replaces)")


# ---------------------------------------------------------------------------
# Running openssl and certutil

def run_tool(argv, stdin=None, cwd=None):
    """Run a tool (argument list, no shell) and return its standard output.

    Raise ToolError with the tool's last line of standard error when it
    fails or runs longer than TOOL_TIMEOUT.
    """
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True,
                              check=False, timeout=TOOL_TIMEOUT, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise ToolError(f"{' '.join(argv[:2])} took more than "
                        f"{TOOL_TIMEOUT} s") from None
    except OSError as exc:
        raise ToolError(f"cannot run {argv[0]}: {exc.strerror}") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else f"exit status {done.returncode}"
        raise ToolError(f"{' '.join(argv[:2])} failed: {why}")
    return done.stdout


def make_key(openssl, key_type):
    """A new private key, PEM, from openssl's standard output (never a file
    openssl creates itself, whose mode would follow the umask)."""
    return run_tool([openssl, "genpkey"] + KEY_TYPES[key_type])


def common_name(name):
    """The CN for a leaf named name: name itself, or its first label when
    name is longer than a CN may be.  Verification uses the SAN, which
    always holds the whole name; the CN is only what people read."""
    return name if len(name) <= CN_MAX else name.split(".")[0]


def subject(name):
    """An openssl -subj argument; the backslash keeps /, + and = literal."""
    escaped = re.sub(r"([\\/+=])", r"\\\1", name)
    return f"/CN={escaped}"


def new_serial():
    """A random positive serial with the top bit set (fixed length)."""
    return hex(secrets.randbits(SERIAL_BITS - 1) | 1 << (SERIAL_BITS - 1))


def openssl_config(leaf, key_type):
    """The generated openssl config: `req` needs a distinguished_name
    section even when -subj gives the name; `ext` is the profile."""
    lines = ["[req]", "distinguished_name = req_dn", "[req_dn]", "[ext]"]
    if leaf is None:
        lines += ["basicConstraints = critical, CA:TRUE, pathlen:0",
                  "keyUsage = critical, keyCertSign, cRLSign",
                  "subjectKeyIdentifier = hash",
                  "authorityKeyIdentifier = keyid:always"]
    else:
        usage = "digitalSignature"
        if key_type == "rsa":
            # RSA key exchange (TLS 1.2 without ECDHE) encrypts to the key.
            usage += ", keyEncipherment"
        lines += ["basicConstraints = critical, CA:FALSE",
                  f"keyUsage = critical, {usage}",
                  "extendedKeyUsage = "
                  + ("serverAuth" if leaf.usage == "server" else "clientAuth"),
                  "subjectKeyIdentifier = hash",
                  "authorityKeyIdentifier = keyid:always",
                  "subjectAltName = @san", "[san]"]
        counts = {}
        for kind, value in leaf.sans:
            counts[kind] = counts.get(kind, 0) + 1
            lines.append(f"{kind}.{counts[kind]} = {value}")
    return "\n".join(lines) + "\n"


def make_ca_cert(openssl, workdir, key_path, settings):
    """The self-signed CA certificate, PEM, for the key at key_path."""
    config = os.path.join(workdir, "ca.cnf")
    with open(config, "w", encoding="ascii") as file:
        file.write(openssl_config(None, settings.key_type))
    days = settings.days or DEFAULT_DAYS_CA
    return run_tool([openssl, "req", "-new", "-x509", "-utf8", "-sha256",
                     "-config", config, "-extensions", "ext",
                     "-key", key_path, "-subj", subject(settings.ca_name),
                     "-days", str(days), "-set_serial", new_serial()])


def make_leaf_cert(openssl, workdir, leaf, key_path, ca_paths, settings):
    """A server or client certificate, PEM, signed by the CA at ca_paths
    (certificate, key): a request made in memory, then `x509 -req`."""
    config = os.path.join(workdir, leaf.stem + ".cnf")
    with open(config, "w", encoding="ascii") as file:
        file.write(openssl_config(leaf, settings.key_type))
    request = run_tool([openssl, "req", "-new", "-utf8", "-config", config,
                        "-key", key_path, "-subj", subject(common_name(leaf.name))])
    days = settings.days or DEFAULT_DAYS_LEAF
    return run_tool([openssl, "x509", "-req", "-sha256",
                     "-CA", ca_paths[0], "-CAkey", ca_paths[1],
                     "-set_serial", new_serial(), "-days", str(days),
                     "-extfile", config, "-extensions", "ext"],
                    stdin=request)


def describe_cert(openssl, path):
    """Read back a certificate's subject, SAN, end date and fingerprint."""
    out = run_tool([openssl, "x509", "-in", path, "-noout",
                    "-subject", "-nameopt", "RFC2253", "-enddate",
                    "-fingerprint", "-sha256", "-ext", "subjectAltName"])
    fields = {}
    names = []
    in_san = False
    for line in out.decode(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if line.startswith("X509v3 Subject Alternative Name"):
            in_san = True
        elif in_san and line.startswith(" "):
            names += [show_san(entry) for entry in line.strip().split(", ")]
        else:
            in_san = False
            fields[key.strip().lower()] = value.strip()
    return CertInfo(
        subject=fields.get("subject", "?"),
        names=tuple(names),
        not_after=ssl.cert_time_to_seconds(fields["notafter"]),
        fingerprint=fields.get("sha256 fingerprint", "?"))


def show_san(entry):
    """A SAN entry as `DNS:name` or `IP:address` (IPv6 compressed)."""
    if entry.startswith("IP Address:"):
        value = entry[len("IP Address:"):]
        try:
            value = str(ipaddress.ip_address(value))
        except ValueError:
            pass  # shown as openssl prints it
        return "IP:" + value
    return entry


# ---------------------------------------------------------------------------
# Writing files

class Staging:
    """Files written under temporary names in one directory, then installed.

    Owns its temporary files until install() renames every one of them to
    its final name, in the order written (a key before its certificate);
    discard() removes any still left, so an interruption or an error
    leaves no half-written file under a final name.
    """

    def __init__(self, directory, force):
        self.directory = directory
        self.force = force
        self._pending = []

    def write(self, final, data, mode, owner=None):
        """Write data to a new temporary file for final; return its path.

        mkstemp creates the file with O_EXCL and mode 0600, so a key is
        never readable by others; fchmod then sets exactly `mode`, whatever
        the umask, and fchown gives it to owner before any byte is written.
        """
        prefix = "." + os.path.basename(final) + "."
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=prefix,
                                   suffix=".tmp")
        self._pending.append((tmp, final))
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            if owner is not None:
                os.fchown(file.fileno(), owner.uid, owner.gid)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        return tmp

    def install(self):
        """Rename every temporary file to its final name (all or none)."""
        install_files(self._pending, self.force)
        fsync_dir(self.directory)

    def discard(self):
        """Remove the temporary files not installed."""
        for tmp, _ in self._pending:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass  # never written, or already gone: nothing to discard
        self._pending = []


def install_files(pending, force):
    """Install each (tmp, final) of the list pending in order, taking it off
    the list.

    If one cannot be installed (another run made its name meanwhile, an I/O
    error, a signal), the final names this call already made are removed
    again, so a run leaves all of its files or none; what is left in
    pending is the caller's to discard.  A file --force replaced is not
    brought back.
    """
    installed = []
    try:
        while pending:
            tmp, final = pending[0]
            install_file(tmp, final, force)
            pending.pop(0)
            installed.append(final)
    except BaseException:
        for final in installed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(final)
        raise


def install_file(tmp, final, force):
    """Give the file tmp the name final.

    Without force a hard link makes the name, which fails when final exists
    - also when another run made it after the checks at the start - and
    the temporary name is then removed.  With force, os.replace.
    """
    if force:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise ConfigError(f"{final} appeared while writing; not replaced "
                          f"(--force replaces)") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # A file system without hard links: the check is only as good as
        # the one made at the start.
        if os.path.lexists(final):
            raise ConfigError(f"{final} exists; not replaced (--force "
                              f"replaces)") from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


def fsync_dir(directory):
    """Make the renames in directory durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def owner_text(path):
    """`mode user:group` of path, for the report."""
    info = os.stat(path)
    try:
        user = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        user = str(info.st_uid)
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return f"{info.st_mode & 0o7777:04o} {user}:{group}"


# ---------------------------------------------------------------------------
# The certificate commands: ca, server, client and the no-command run

def issue(settings, openssl):
    """Make the CA (when needed) and the leaves; return the new CA flag.

    Every check comes first; then all keys and certificates are made under
    temporary names and installed together.
    """
    directory = settings.directory
    check_writable_dir("--dir", directory)
    new_ca = check_ca(settings, need_key=bool(settings.leaves))
    ca_paths = (os.path.join(directory, CA_CERT),
                os.path.join(directory, CA_KEY))
    targets = list(ca_paths[::-1]) if new_ca else []
    for leaf in settings.leaves:
        targets += [leaf.key_path(directory), leaf.cert_path(directory)]
    check_targets(targets, settings.force)

    try:
        make_dir(directory)
    except OSError as exc:
        raise ConfigError(f"--dir={directory}: {exc.strerror}") from None
    staging = Staging(directory, settings.force)
    try:
        with tempfile.TemporaryDirectory(prefix="mkNUTcert-") as workdir:
            if new_ca:
                key = staging.write(ca_paths[1], make_key(
                    openssl, settings.key_type), KEY_MODE)
                cert = staging.write(ca_paths[0], make_ca_cert(
                    openssl, workdir, key, settings), CERT_MODE)
                signer = (cert, key)
            else:
                signer = ca_paths
            for leaf in settings.leaves:
                key = staging.write(leaf.key_path(directory), make_key(
                    openssl, settings.key_type), KEY_MODE, settings.owner)
                staging.write(leaf.cert_path(directory), make_leaf_cert(
                    openssl, workdir, leaf, key, signer, settings), CERT_MODE)
        staging.install()
    except OSError as exc:
        raise ConfigError(f"cannot write in --dir={directory}: "
                          f"{exc.strerror} ({exc.filename or directory})") \
            from None
    finally:
        staging.discard()
    return new_ca


def report_cert(openssl, title, cert_path, key_path):
    """Print one certificate: files, names, end date, fingerprint.

    Return its CertInfo.
    """
    info = describe_cert(openssl, cert_path)
    print(f"{title} {cert_path} ({owner_text(cert_path)})")
    if key_path is not None:
        print(f"    key       {key_path} ({owner_text(key_path)})")
    print(f"    subject   {info.subject}")
    if info.names:
        print(f"    names     {', '.join(info.names)}")
    print(f"    ends      {show_time(info.not_after)}")
    print(f"    SHA-256   {info.fingerprint}")
    return info


def show_time(seconds):
    """An end date as `YYYY-MM-DD HH:MM:SS UTC`."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def report_issue(settings, openssl, new_ca):
    """Print what issue() wrote and the shim options that use it."""
    directory = settings.directory
    ca_cert = os.path.join(directory, CA_CERT)
    ca_info = report_cert(openssl, "wrote CA certificate" if new_ca
                          else "using CA certificate", ca_cert,
                          os.path.join(directory, CA_KEY) if new_ca else None)
    if new_ca:
        print("    keep ca.key.pem on this host; other hosts need only "
              "ca.cert.pem")
    for leaf in settings.leaves:
        info = report_cert(openssl, f"wrote {leaf.usage} certificate",
                           leaf.cert_path(directory), leaf.key_path(directory))
        if info.not_after > ca_info.not_after:
            print(f"    note: it outlives the CA, which ends "
                  f"{show_time(ca_info.not_after)}")
    print()
    print("Shim options:")
    for line in shim_options(directory, settings.leaves):
        print("    " + line)
    if settings.leaves and settings.owner is None and os.geteuid() == 0:
        print("The keys belong to root: the shims drop to user nut, and a "
              "SIGHUP reload then cannot read them; --owner nut gives them "
              "to nut.")


def shim_options(directory, leaves):
    """The upsdTLS.py and upsmonTLS.py command lines for these files."""
    ca_cert = shlex.quote(os.path.join(directory, CA_CERT))
    servers = [leaf for leaf in leaves if leaf.usage == "server"]
    clients = [leaf for leaf in leaves if leaf.usage == "client"]
    host = servers[0].name if servers else "HOST"
    lines = []
    for leaf in servers:
        files = (f"--cert {shlex.quote(leaf.cert_path(directory))} "
                 f"--key {shlex.quote(leaf.key_path(directory))}")
        lines += [f"# attachment host {leaf.name}:",
                  f"upsdTLS.py {files}",
                  "# the same, accepting only clients with a certificate "
                  "from this CA:",
                  f"upsdTLS.py {files} --client-ca {ca_cert}"]
    if not servers:
        lines += ["# attachment host, accepting only clients with a "
                  "certificate from this CA:",
                  f"upsdTLS.py --cert FILE --key FILE --client-ca {ca_cert}"]
    lines += [f"# management host (copy {CA_CERT} there"
              + ("; HOST is the attachment host):" if host == "HOST"
                 else "):"),
              f"upsmonTLS.py --upsd {host} --cafile {ca_cert}"]
    for leaf in clients:
        lines += [f"# management host {leaf.name}, with its client "
                  f"certificate:",
                  f"upsmonTLS.py --upsd {host} --cafile {ca_cert} "
                  f"--cert {shlex.quote(leaf.cert_path(directory))} "
                  f"--key {shlex.quote(leaf.key_path(directory))}",
                  f"# to admit only {leaf.name}, add to upsdTLS.py: "
                  f"--client-ca {ca_cert} --allow-client {leaf.name}"]
    return lines


# ---------------------------------------------------------------------------
# The nssdb command

def make_nssdb(settings, openssl, certutil):
    """Make an NSS database at settings.nssdb trusting the CA (CT,,).

    The database is built by certutil in a temporary directory inside PATH
    and its files are then renamed into PATH, so PATH never holds a
    half-made database.  Return the CA's nickname.
    """
    path = settings.nssdb
    ca_cert = os.path.join(settings.directory, CA_CERT)
    check_ca(settings, need_key=False)
    check_writable_dir("PATH", path)
    check_targets([os.path.join(path, name) for name in NSS_FILES],
                  settings.force)
    nickname = describe_cert(openssl, ca_cert).subject
    if nickname.startswith("CN="):
        nickname = nickname[3:]
    # --owner gives PATH away only when this run makes it: an existing
    # directory such as /etc/nut keeps its owner.
    give_dir = settings.owner is not None and not os.path.isdir(path)
    try:
        make_dir(path)
        workdir = tempfile.mkdtemp(dir=path, prefix=".mkNUTcert-")
    except OSError as exc:
        raise ConfigError(f"PATH={path}: {exc.strerror}") from None
    try:
        # cwd and `sql:.`: pkcs11.txt records the directory as given, and
        # a relative one stays true after the files move.
        run_tool([certutil, "-N", "-d", "sql:.", "--empty-password"],
                 cwd=workdir)
        run_tool([certutil, "-A", "-d", "sql:.", "-n", nickname,
                  "-t", "CT,,", "-a", "-i", ca_cert], cwd=workdir)
        made = [(os.path.join(workdir, name), os.path.join(path, name))
                for name in NSS_FILES]
        if settings.owner is not None:
            for tmp, _ in made:
                os.chown(tmp, settings.owner.uid, settings.owner.gid)
        install_files(made, settings.force)
        if give_dir:
            os.chown(path, settings.owner.uid, settings.owner.gid)
        fsync_dir(path)
    except OSError as exc:
        raise ConfigError(f"cannot write in PATH={path}: {exc.strerror}") \
            from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return nickname


def report_nssdb(settings, openssl, nickname):
    """Print the database made and the upsmon.conf lines that use it."""
    path = settings.nssdb
    report_cert(openssl, "trusted CA certificate",
                os.path.join(settings.directory, CA_CERT), None)
    print(f"wrote NSS database {path} ({owner_text(path)})")
    for name in NSS_FILES:
        print(f"    {name} ({owner_text(os.path.join(path, name))})")
    print(f"    trusts {nickname!r} as CT,, (server and client CA)")
    print()
    print("upsmon.conf (NUT clients built with NSS talk TLS to upsdTLS.py "
          "directly, port 401):")
    print(f"    CERTPATH {path}")
    print("    CERTVERIFY 1")
    print("    FORCESSL 1")
    print("    # MONITOR UPS@HOST:401 ... where HOST is a name or IP address "
          "in the server certificate")
    if settings.owner is None and os.geteuid() == 0:
        print("The files belong to root and upsmon runs as user nut: "
              "--owner nut gives them to nut.")


# ---------------------------------------------------------------------------

def main(argv=None):
    """Run mkNUTcert with argv (default: sys.argv[1:]); return the exit
    status.  argparse itself exits 2 on a malformed command line."""
    try:
        settings = parse_args(argv)
        openssl = find_tool("openssl", "openssl")
        if settings.command == "nssdb":
            certutil = find_tool("certutil", "libnss3-tools")
            nickname = make_nssdb(settings, openssl, certutil)
            report_nssdb(settings, openssl, nickname)
        else:
            new_ca = issue(settings, openssl)
            report_issue(settings, openssl, new_ca)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except ToolError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing half-written", file=sys.stderr)
        return 130
    return 0


def _exit_on_signal(signum, _frame):
    """SIGTERM or SIGHUP: unwind through the `finally` clauses that remove
    temporary files, as Ctrl-C does."""
    raise KeyboardInterrupt(signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    sys.exit(main())
