"""ovirt-borg: incremental oVirt VM backups into BorgBackup as synthetic full disk images."""

__version__ = "0.1.0"
