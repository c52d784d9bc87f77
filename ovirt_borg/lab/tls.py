"""A small PKI for the lab, laid out as an oVirt engine's: two certificate authorities.

- The engine's internal CA (``ca.pem``, the engine's ``/etc/pki/ovirt-engine/ca.pem``, served
  by ``pki-resource?resource=ca-certificate``) signs the hosts' certificates: the host imageio
  daemon (port 54322) presents ``host.pem`` (vdsm's ``50-vdsm.conf``: ``/etc/pki/vdsm/certs``).
- The web certificate (``server.pem``, the engine's ``apache.cer``) is presented by the
  engine's HTTPS and by the imageio proxy (ovirt-engine-setup's ``50-engine.conf`` gives the
  proxy the Apache key, certificate and ``apache-ca.pem``, and trusts the hosts through
  ``[backend_http] ca_file`` = the internal CA). engine-setup signs it with the internal CA;
  admins often replace it with a commercial one: with ``separate_web_ca`` a second CA
  (``web-ca.pem``) signs it, so the engine's CA file does not verify the hosts.

All certificates are for 127.0.0.1 / localhost. Everything is made with the ``openssl``
command so the lab needs no Python crypto package.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ovirt_borg.lab import LabError

log = logging.getLogger(__name__)

# Ten years: lab certificates must never expire in the middle of a long-lived demo directory.
_DAYS = "3650"

# EC P-256 keys are generated in milliseconds, RSA keys take far longer on a small CI machine.
_KEY_ALGORITHM = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]

_SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class LabPki:
    """Paths (PEM) of the web side: the CA that signed the web certificate (``ca_file``), the
    certificate and its key; and of the host side (``host_*``: the engine's internal CA, the
    host imageio's certificate and key). Both CA files are the same file unless the web
    certificate has a CA of its own."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    host_ca_file: Path | None = None
    host_cert_file: Path | None = None
    host_key_file: Path | None = None

    def host(self) -> LabPki:
        """The PKI the host imageio daemon presents and trusts (the internal CA's)."""
        assert self.host_ca_file and self.host_cert_file and self.host_key_file
        return LabPki(self.host_ca_file, self.host_cert_file, self.host_key_file)


def make_lab_pki(dir: Path, *, separate_web_ca: bool | None = None) -> LabPki:
    """Create (or reuse) the lab's CAs and certificates (see the module docstring).

    Given a directory (created when missing) and whether a CA of its own signs the web
    certificate (None: as the directory has it). Writes ``ca.pem``/``ca.key`` (the internal
    CA), ``host.pem``/``host.key``, ``server.pem``/``server.key`` and, for a separate web CA,
    ``web-ca.pem``/``web-ca.key``; private keys are mode 0600. Existing files are reused, so
    calling this again is cheap and keeps clients that trust the CAs working; only a change of
    ``separate_web_ca`` makes the web certificate again.

    Returns the ``LabPki``. Raises ``LabError`` when ``openssl`` fails or is missing.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    ca, ca_key = dir / "ca.pem", dir / "ca.key"
    web_ca, web_ca_key = dir / "web-ca.pem", dir / "web-ca.key"
    if separate_web_ca is None:
        separate_web_ca = web_ca.exists()
    pki = LabPki(
        ca_file=web_ca if separate_web_ca else ca, cert_file=dir / "server.pem", key_file=dir / "server.key",
        host_ca_file=ca, host_cert_file=dir / "host.pem", host_key_file=dir / "host.key",
    )
    wanted = [ca, ca_key, pki.cert_file, pki.key_file, pki.host_cert_file, pki.host_key_file]
    if separate_web_ca:
        wanted += [web_ca, web_ca_key]
    if all(p.exists() for p in wanted) and separate_web_ca == web_ca.exists():
        log.debug("reusing lab PKI in %s", dir)
        return pki

    # Keys must never be readable by others, not even for the instant between write and chmod.
    old_umask = os.umask(0o077)
    try:
        if not (ca.exists() and ca_key.exists()):
            _make_ca(ca, ca_key, "ovirt-borg lab engine CA")
        if not (pki.host_cert_file.exists() and pki.host_key_file.exists()):
            _make_cert(dir, "host", ca, ca_key)
        if separate_web_ca and not (web_ca.exists() and web_ca_key.exists()):
            _make_ca(web_ca, web_ca_key, "ovirt-borg lab commercial CA")
        elif not separate_web_ca:
            web_ca.unlink(missing_ok=True)
            web_ca_key.unlink(missing_ok=True)
        if separate_web_ca:
            _make_cert(dir, "server", web_ca, web_ca_key)
        else:
            _make_cert(dir, "server", ca, ca_key)
    finally:
        os.umask(old_umask)
    for path in dir.glob("*.key"):
        path.chmod(0o600)
    for path in dir.glob("*.pem"):
        path.chmod(0o644)
    log.info("created lab PKI in %s%s", dir, " (the web certificate has a CA of its own)" if separate_web_ca else "")
    return pki


def _make_ca(cert: Path, key: Path, name: str) -> None:
    _openssl(
        "req", "-x509", *_KEY_ALGORITHM, "-nodes", "-keyout", key, "-out", cert, "-days", _DAYS,
        "-subj", f"/O=ovirt-borg lab/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )


def _make_cert(dir: Path, name: str, ca: Path, ca_key: Path) -> None:
    """Make ``dir/name.pem`` and ``dir/name.key``, a server certificate signed by ``ca``."""
    csr = dir / f"{name}.csr"
    extensions = dir / f"{name}.ext"
    extensions.write_text(_SERVER_EXTENSIONS)
    _openssl("req", "-new", *_KEY_ALGORITHM, "-nodes", "-keyout", dir / f"{name}.key", "-out", csr,
             "-subj", f"/O=ovirt-borg lab/CN=localhost/OU={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-CAserial", dir / f"{ca.stem}.srl", "-out", dir / f"{name}.pem", "-days", _DAYS,
             "-sha256", "-extfile", extensions)
    csr.unlink()
    extensions.unlink()


def _openssl(*args: str | Path) -> None:
    """Run ``openssl`` with the given arguments; raise ``LabError`` with its stderr on failure."""
    cmd = ["openssl", *(str(a) for a in args)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise LabError("openssl is not installed; install the Debian package openssl") from e
    except subprocess.CalledProcessError as e:
        raise LabError(f"openssl {args[0]} failed: {e.stderr.strip()}") from e
