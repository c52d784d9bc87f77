"""Where a lab keeps its files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LabLayout:
    """Where a lab keeps its files, given the lab directory."""

    dir: Path

    @property
    def lab_json(self) -> Path:
        return self.dir / "lab.json"

    @property
    def config(self) -> Path:
        return self.dir / "config.toml"

    @property
    def password(self) -> Path:
        return self.dir / "password"

    @property
    def passphrase(self) -> Path:
        return self.dir / "passphrase"

    @property
    def control_token(self) -> Path:
        return self.dir / "control.token"

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def storage(self) -> Path:
        return self.dir / "storage"

    @property
    def engine_state(self) -> Path:
        return self.dir / "engine-state.json"

    @property
    def sample(self) -> Path:
        return self.dir / "sample.json"

    @property
    def repo(self) -> Path:
        return self.dir / "repo"

    @property
    def state(self) -> Path:
        """The ovirt-borg state directory the lab's config.toml names."""
        return self.dir / "state"

    @property
    def run(self) -> Path:
        return self.dir / "run"

    @property
    def engine_json(self) -> Path:
        """Written by the running engine: its pid, port and children."""
        return self.run / "engine.json"

    @property
    def engine_log(self) -> Path:
        return self.dir / "engine.log"
