"""Reading borgmatic configurations, checked against the real borgmatic's own loader.

The reader in ovirt_borg.borgmatic must see in a borgmatic file what borgmatic itself sees: each
sample below is also parsed by borgmatic's own loader (which validates it against borgmatic's
schema), and the repository, passphrase and Borg environment are compared; then which setting
wins when the job, borgmatic's file and the environment all name one. No repository: the runs
of the real borgmatic on a real Borg repository are in tests/test_borgmatic.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ovirt_borg import borgmatic, config as config_mod, credentials
from ovirt_borg.errors import ConfigError

PREFIX = "ovirt-"
# The options ovirt-borg passes on to Borg, by borgmatic's name.
PASSED_ON = ("ssh_command", "remote_path", "borg_base_directory", "borg_config_directory",
             "borg_cache_directory", "borg_security_directory", "borg_keys_directory", "borg_key_file")


def borgmatic_view(path: Path, choose: str | None = None) -> dict:
    """What the installed borgmatic makes of ``path``: repository, secrets, Borg environment."""
    from borgmatic.borg import environment
    from borgmatic.config import load, validate
    from borgmatic.hooks.credential import parse

    config, _, _ = validate.parse_configuration(str(path), validate.schema_filename(), {}, resolve_env=True)
    repositories = config["repositories"]
    if choose is None:
        assert len(repositories) == 1
        chosen = repositories[0]
    else:
        chosen = next(r for r in repositories if choose in (r["path"], r.get("label")))
    merged = load.merge_repository_configuration(chosen, config)
    parse.resolve_credential.cache_clear()
    passphrase = parse.resolve_credential(merged.get("encryption_passphrase"), merged)
    env = {environment.OPTION_TO_ENVIRONMENT_VARIABLE[name]: str(merged[name])
           for name in PASSED_ON if merged.get(name) is not None}
    return {"repository": chosen["path"], "passphrase": passphrase,
            "passcommand": merged.get("encryption_passcommand"), "environment": env,
            "archive_name_format": merged.get("archive_name_format"),
            "match_archives": merged.get("match_archives")}


def ours(path: Path, choose: str | None = None) -> dict:
    settings = borgmatic.load(path, choose)
    return {"repository": settings.repository, "passphrase": settings.passphrase,
            "passcommand": settings.passcommand, "environment": settings.environment,
            "archive_name_format": settings.archive_name_format, "match_archives": settings.match_archives}


SAMPLES = {
    "flat 2.x": """
source_directories: [/etc]
repositories:
    - path: ssh://backup@borg.example.com/./host
      label: remote
encryption_passcommand: cat /etc/borgmatic/passphrase
ssh_command: ssh -i /root/.ssh/borg -p 2222
remote_path: /usr/local/bin/borg1
borg_base_directory: /var/lib/borg
borg_keys_directory: /var/lib/borg/keys
archive_name_format: "{hostname}-files-{now}"
match_archives: "sh:{hostname}-files-*"
keep_daily: 7
""",
    "1.x sections": """
location:
    source_directories: [/etc, /home]
    repositories:
        - /srv/borg/sectioned
    remote_path: borg1
storage:
    encryption_passphrase: "s3cret: with 'quotes' and #hash"
    ssh_command: ssh -i /k
    borg_cache_directory: /var/cache/borg
    archive_name_format: "files-{now}"
    lock_wait: 30
retention:
    keep_daily: 7
    prefix: "files-"
consistency:
    checks:
        - name: repository
""",
    "constants and variables": """
constants:
    base: /srv/borg
    user: backup
source_directories: [/etc]
repositories:
    - path: "{base}/constants"
encryption_passcommand: "cat ${OVIRT_BORG_TEST_SECRETS}/{user}.pass"
ssh_command: "ssh -i ${OVIRT_BORG_TEST_UNSET:-/root/.ssh/id_default}"
borg_security_directory: "\\\\${NOT_A_VARIABLE}"
""",
    "file url": """
source_directories: [/etc]
repositories:
    - path: file:///srv/borg/url
encryption_passphrase: plain
""",
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_reads_what_borgmatic_reads(tmp_path, monkeypatch, name):
    monkeypatch.setenv("OVIRT_BORG_TEST_SECRETS", "/run/secrets")
    monkeypatch.delenv("OVIRT_BORG_TEST_UNSET", raising=False)
    path = tmp_path / "config.yaml"
    path.write_text(SAMPLES[name])
    assert ours(path) == borgmatic_view(path)


def test_includes_merge_like_borgmatic(tmp_path):
    (tmp_path / "common.yaml").write_text("""
encryption_passcommand: cat /etc/common.pass
ssh_command: ssh -i /common
keep_daily: 3
exclude_patterns: [/tmp, /var/tmp]
repositories:
    - path: /srv/borg/from-include
      label: included
""")
    (tmp_path / "keys.yaml").write_text("borg_keys_directory: /srv/keys\n")
    path = tmp_path / "config.yaml"
    path.write_text("""
<<: !include common.yaml
source_directories: [/etc]
borg_base_directory: !include keys.yaml
ssh_command: ssh -i /local
exclude_patterns:
    - !omit /var/tmp
    - /scratch
repositories: !retain
    - path: /srv/borg/local
      label: local
""")
    # borg_base_directory as an included mapping is not a valid string for borgmatic: use a copy
    # without it for the comparison, then check the include itself.
    plain = tmp_path / "plain.yaml"
    plain.write_text(path.read_text().replace("borg_base_directory: !include keys.yaml\n", ""))
    assert ours(plain) == borgmatic_view(plain)
    assert ours(plain)["environment"]["BORG_RSH"] == "ssh -i /local"
    raw = borgmatic.read_config(path)
    assert raw["borg_base_directory"] == {"borg_keys_directory": "/srv/keys"}
    assert raw["exclude_patterns"] == ["/tmp", "/scratch"]
    assert [r["label"] for r in raw["repositories"]] == ["local"]


def test_includes_without_retain_join_lists_and_need_a_choice(tmp_path):
    (tmp_path / "common.yaml").write_text("repositories:\n    - path: /srv/borg/one\n      label: one\n")
    path = tmp_path / "config.yaml"
    path.write_text("<<: !include common.yaml\nsource_directories: [/etc]\n"
                    "encryption_passcommand: cat /p\n"
                    "repositories:\n    - path: /srv/borg/two\n      label: two\n      ssh_command: ssh -p 2\n")
    with pytest.raises(ConfigError, match=r"several repositories \(one, two\).*repository.location"):
        borgmatic.load(path)
    assert ours(path, "two") == borgmatic_view(path, "two")
    assert ours(path, "/srv/borg/one") == borgmatic_view(path, "one")
    assert borgmatic.load(path, "two").environment == {"BORG_RSH": "ssh -p 2"}
    # a location borgmatic does not know keeps borgmatic's global options
    other = borgmatic.load(path, "/srv/borg/elsewhere")
    assert other.repository == "/srv/borg/elsewhere" and other.passcommand == "cat /p"
    assert other.environment == {}


def test_credentials_systemd_and_file(tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "borg_pass").write_text("from systemd\n")
    (tmp_path / "pass.txt").write_text("from a file\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    path = tmp_path / "config.yaml"
    for value, expected in (("{credential systemd borg_pass}", "from systemd"),
                            (f"{{credential file {tmp_path / 'pass.txt'}}}", "from a file")):
        path.write_text(f"source_directories: [/etc]\nrepositories:\n    - path: /srv/r\n"
                        f"encryption_passphrase: \"{value}\"\n")
        assert ours(path) == borgmatic_view(path)
        assert borgmatic.load(path).passphrase == expected
    path.write_text("source_directories: [/etc]\nrepositories:\n    - path: /srv/r\n"
                    "encryption_passphrase: \"{credential keepassxc /db.kdbx title}\"\n")
    with pytest.raises(ConfigError, match="'keepassxc' credential hook.*encryption_passcommand"):
        borgmatic.load(path)
    path.write_text("source_directories: [/etc]\nrepositories:\n    - path: /srv/r\n"
                    "encryption_passphrase: \"{credential systemd borg_pass}\"\n")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="LoadCredential=borg_pass"):
        borgmatic.load(path)


@pytest.mark.parametrize("text, expected", [
    ("repositories: []\nsource_directories: [/etc]\n", "names no repository"),
    ("- just\n- a list\n", "not a borgmatic configuration"),
    ("repositories: /srv/borg\n", "'repositories' must be a list"),
    ("repositories:\n    - label: nolocation\n", "needs a path"),
    ("repositories:\n    - path: /srv/r\nencryption_passcommand: \"cat ${OVIRT_BORG_TEST_UNSET}\"\n",
     "'encryption_passcommand' uses ${OVIRT_BORG_TEST_UNSET}"),
    ("repositories:\n    - path: /srv/r\nlock_wait: soon\n", "'lock_wait' must be int"),
    ("repositories: [\n", "not valid YAML"),
    ("<<: !include nothere.yaml\n", "included file nothere.yaml not found"),
])
def test_unusable_configurations_are_config_errors(tmp_path, monkeypatch, text, expected):
    monkeypatch.delenv("OVIRT_BORG_TEST_UNSET", raising=False)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        borgmatic.load(path)
    assert expected in str(error.value)


def test_include_loop_is_a_config_error(tmp_path):
    (tmp_path / "a.yaml").write_text("<<: !include b.yaml\nx: 1\n")
    (tmp_path / "b.yaml").write_text("<<: !include a.yaml\ny: 1\n")
    with pytest.raises(ConfigError, match="nest deeper"):
        borgmatic.read_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        borgmatic.read_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        borgmatic.read_config(tmp_path)


def test_without_ruamel_yaml_the_error_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("repositories:\n    - path: /srv/r\n")
    # An interpreter where the package cannot be imported.
    monkeypatch.setitem(sys.modules, "ruamel.yaml", None)
    with pytest.raises(ConfigError, match="needs the Python package ruamel.yaml.*pip install ruamel.yaml"):
        borgmatic.load(path)


# --------------------------------------------------------------------------------------------
# Which setting wins (credentials.borg_env)


def job_config(tmp_path: Path, repository: str) -> config_mod.Config:
    return config_mod.from_dict({"engine": {"url": "https://engine.example.com/ovirt-engine/api"},
                                 "repository": {"borgmatic_config": repository}},
                                str(tmp_path / "job.toml"))


def write_borgmatic(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "borgmatic.yaml"
    path.write_text("source_directories: [/etc]\nrepositories:\n    - path: /srv/borg/shared\n"
                    "encryption_passcommand: cat /etc/borgmatic/passphrase\nssh_command: ssh -i /bm\n"
                    "borg_base_directory: /var/lib/bm\n"
                    "archive_name_format: \"{hostname}-files-{now}\"\n"
                    "match_archives: \"sh:{hostname}-files-*\"\narchive_hostname: fileserver\n" + extra)
    return path


def test_borg_env_takes_borgmatic_settings_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("BORG_REPO", "/from/env")
    monkeypatch.setenv("BORG_PASSPHRASE", "inherited")
    monkeypatch.setenv("BORG_RSH", "ssh -i /env")
    monkeypatch.setenv("BORG_FILES_CACHE_TTL", "40")
    env = credentials.borg_env(job_config(tmp_path, str(write_borgmatic(tmp_path))))
    assert env["BORG_REPO"] == "/srv/borg/shared"
    assert env["BORG_PASSCOMMAND"] == "cat /etc/borgmatic/passphrase" and "BORG_PASSPHRASE" not in env
    assert env["BORG_RSH"] == "ssh -i /bm" and env["BORG_BASE_DIR"] == "/var/lib/bm"
    assert env["BORG_FILES_CACHE_TTL"] == "40", "other BORG_* variables pass through"


def test_borg_env_own_settings_win_over_borgmatic(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    passphrase = tmp_path / "own.pass"
    passphrase.write_text("own passphrase\n")
    config = config_mod.from_dict({
        "engine": {"url": "https://engine.example.com/ovirt-engine/api"},
        "repository": {"borgmatic_config": str(write_borgmatic(tmp_path, "encryption_passphrase: bm\n")),
                       "location": "/srv/borg/own", "passphrase_file": str(passphrase), "rsh": "ssh -i /own"}},
        str(tmp_path / "job.toml"))
    env = credentials.borg_env(config)
    assert env["BORG_REPO"] == "/srv/borg/own" and env["BORG_PASSPHRASE"] == "own passphrase"
    assert "BORG_PASSCOMMAND" not in env and env["BORG_RSH"] == "ssh -i /own"
    assert env["BORG_BASE_DIR"] == "/var/lib/bm", "what the job does not set still comes from borgmatic"


def test_borg_env_location_may_name_a_borgmatic_label(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = tmp_path / "borgmatic.yaml"
    path.write_text("source_directories: [/etc]\nencryption_passcommand: cat /p\nrepositories:\n"
                    "    - path: /srv/borg/a\n      label: a\n"
                    "    - path: ssh://backup@nas/./b\n      label: nas\n      ssh_command: ssh -i /nas\n")
    config = config_mod.from_dict({"engine": {"url": "https://engine.example.com/ovirt-engine/api"},
                                   "repository": {"borgmatic_config": str(path), "location": "nas"}},
                                  str(tmp_path / "job.toml"))
    env = credentials.borg_env(config)
    assert env["BORG_REPO"] == "ssh://backup@nas/./b" and env["BORG_RSH"] == "ssh -i /nas"
    assert env["BORG_PASSCOMMAND"] == "cat /p"


def test_borg_env_borgmatic_passphrase_wins_over_its_passcommand_and_the_credential(tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "borg-passphrase").write_text("from the unit\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("BORG_PASSCOMMAND", "cat /inherited")
    env = credentials.borg_env(job_config(tmp_path, str(write_borgmatic(tmp_path, "encryption_passphrase: bm\n"))))
    assert env["BORG_PASSPHRASE"] == "bm" and "BORG_PASSCOMMAND" not in env
    # without a borgmatic secret the credential is next
    bare = tmp_path / "bare"
    bare.mkdir()
    path = bare / "borgmatic.yaml"
    path.write_text("source_directories: [/etc]\nrepositories:\n    - path: /srv/borg/shared\n")
    env = credentials.borg_env(job_config(bare, str(path)))
    assert env["BORG_PASSPHRASE"] == "from the unit" and "BORG_PASSCOMMAND" not in env


def test_borg_env_warns_when_borgmatic_prune_reaches_vm_archives(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    credentials.borg_env(job_config(tmp_path, str(write_borgmatic(tmp_path))))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    path = write_borgmatic(tmp_path, "").read_text().replace('"sh:{hostname}-files-*"', '"*"')
    (tmp_path / "borgmatic.yaml").write_text(path)
    credentials.borg_env(job_config(tmp_path, str(tmp_path / "borgmatic.yaml")))
    assert any("applies its keep rules to every archive" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------
# Which archives borgmatic reaches (pure)


def settings(**options) -> borgmatic.BorgmaticSettings:
    return borgmatic.BorgmaticSettings(config_path="/etc/borgmatic/config.yaml", repository="/srv/r", **options)


@pytest.mark.parametrize("options, hostname, glob, warnings", [
    ({}, "backup1", "backup1-*", 0),
    ({}, "ovirt", "ovirt-*", 2),
    ({"archive_name_format": "{hostname}-files-{now}", "match_archives": "sh:{hostname}-files-*"},
     "backup1", "backup1-files-*", 0),
    ({"archive_name_format": "{hostname}-files-{now}"}, "backup1", "backup1-files-*", 0),
    ({"match_archives": "*"}, "backup1", None, 1),
    ({"archive_name_format": "{now}"}, "backup1", None, 1),
    ({"archive_name_format": "{utcnow}-{hostname}"}, "backup1", "*-backup1", 0),
    ({"archive_name_format": "{hostname}-{now:%Y-%m-%dT%H:%M:%SZ}"}, "", "-*", 0),
    ({"match_archives": "sh:*Z"}, "backup1", "*Z", 1),
    ({"match_archives": "sh:*-files-*"}, "backup1", "*-files-*", 1),
    ({"match_archives": "re:^files-"}, "backup1", "re:^files-", 1),
    ({"prefix": "{hostname}-"}, "backup1", "backup1-*", 0),
    ({"archive_name_format": "ovirt-{now}", "match_archives": "sh:ovirt-*"}, "backup1", "ovirt-*", 2),
    ({"archive_name_format": "ov-{now}", "match_archives": "sh:ov-*"}, "backup1", "ov-*", 0),
    ({"match_archives": "sh:ov*"}, "backup1", "ov*", 1),
    ({"archive_name_format": "ovirt-{hostname}-{now}", "match_archives": "sh:files-*"}, "backup1", "files-*", 1),
    ({"archive_hostname": "files"}, "ovirt", "files-*", 0),
])
def test_archive_glob_and_overlap(options, hostname, glob, warnings):
    shared = settings(**options)
    assert borgmatic.archive_glob(shared, hostname=hostname, fqdn="h.example.com", user="root") == glob
    found = borgmatic.overlap_warnings(shared, PREFIX, hostname=hostname, fqdn="h.example.com", user="root")
    assert len(found) == warnings, found


def test_empty_prefix_always_overlaps():
    shared = settings(archive_name_format="{hostname}-files-{now}", match_archives="sh:{hostname}-files-*")
    assert len(borgmatic.overlap_warnings(shared, "", hostname="backup1", fqdn="f", user="u")) == 2
