"""The lab: an oVirt engine look-alike built from real parts (imageio, qemu, qcow2 bitmaps)."""

from __future__ import annotations


class LabError(Exception):
    """A lab component (openssl, qemu tools, the imageio daemon) failed or misbehaved."""
