"""A small PKI for the lab: one CA and one server certificate for 127.0.0.1 / localhost.

The lab's HTTPS services (the imageio daemons, the engine) present the server certificate;
clients trust the CA file, exactly as an oVirt deployment hands out the engine CA. Everything is
made with the ``openssl`` command so the lab needs no Python crypto package.
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
    """Paths of the lab CA certificate and of the server certificate and its key (PEM)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_lab_pki(dir: Path) -> LabPki:
    """Create (or reuse) a lab CA and a server certificate signed by it.

    Given a directory (created when missing). Writes ``ca.pem``/``ca.key`` and
    ``server.pem``/``server.key`` there; private keys are mode 0600. When the CA and server
    files already exist they are reused, so calling this again is cheap and keeps clients that
    already trust the CA working.

    Returns the ``LabPki`` with the CA, certificate and key paths.
    Raises ``LabError`` when ``openssl`` fails or is missing.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    pki = LabPki(
        ca_file=dir / "ca.pem",
        cert_file=dir / "server.pem",
        key_file=dir / "server.key",
    )
    ca_key = dir / "ca.key"
    if all(p.exists() for p in (pki.ca_file, ca_key, pki.cert_file, pki.key_file)):
        log.debug("reusing lab PKI in %s", dir)
        return pki

    # Keys must never be readable by others, not even for the instant between write and chmod.
    old_umask = os.umask(0o077)
    try:
        if not (pki.ca_file.exists() and ca_key.exists()):
            _openssl(
                "req", "-x509", *_KEY_ALGORITHM, "-nodes",
                "-keyout", ca_key, "-out", pki.ca_file, "-days", _DAYS,
                "-subj", "/O=ovirt-borg lab/CN=ovirt-borg lab CA",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-addext", "subjectKeyIdentifier=hash",
            )
        csr = dir / "server.csr"
        extensions = dir / "server.ext"
        extensions.write_text(_SERVER_EXTENSIONS)
        _openssl(
            "req", "-new", *_KEY_ALGORITHM, "-nodes",
            "-keyout", pki.key_file, "-out", csr,
            "-subj", "/O=ovirt-borg lab/CN=localhost",
        )
        _openssl(
            "x509", "-req", "-in", csr, "-CA", pki.ca_file, "-CAkey", ca_key,
            "-CAcreateserial", "-CAserial", dir / "ca.srl",
            "-out", pki.cert_file, "-days", _DAYS, "-sha256", "-extfile", extensions,
        )
        csr.unlink()
        extensions.unlink()
    finally:
        os.umask(old_umask)
    for key in (ca_key, pki.key_file):
        key.chmod(0o600)
    for cert in (pki.ca_file, pki.cert_file):
        cert.chmod(0o644)
    log.info("created lab PKI in %s", dir)
    return pki


def _openssl(*args: str | Path) -> None:
    """Run ``openssl`` with the given arguments; raise ``LabError`` with its stderr on failure."""
    cmd = ["openssl", *(str(a) for a in args)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise LabError("openssl is not installed; install the Debian package openssl") from e
    except subprocess.CalledProcessError as e:
        raise LabError(f"openssl {args[0]} failed: {e.stderr.strip()}") from e
