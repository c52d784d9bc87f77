"""Configuration checks declared per option (ranges), the nearest-name hints, the API URL, the
sample written to a file."""

from __future__ import annotations

import dataclasses
import stat
import tomllib

import pytest

from ovirt_borg import config as config_mod
from ovirt_borg.errors import ConfigError

URL = "https://engine.example.com/ovirt-engine/api"


def ranged_options():
    """(section, key, metadata) of every option with a minimum, maximum or bound it must exceed."""
    for section, cls in config_mod._SECTIONS.items():
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if any(meta.get(k) is not None for k in ("minimum", "maximum", "above")):
                yield section, f.name, meta


def out_of_range(meta):
    if meta.get("above") is not None:
        return meta["above"] - 5
    if meta.get("minimum") is not None:
        return meta["minimum"] - 5
    return meta["maximum"] + 5


RANGED = list(ranged_options())


def test_the_numbers_that_must_be_bounded_are():
    """Every int or float option has a range, so no negative timeout or count slips through."""
    for section, cls in config_mod._SECTIONS.items():
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, tp in hints.items():
            if tp in ("int", "float"):
                assert any((section, name) == (s, k) for s, k, _ in RANGED), f"{section}.{name} has no range"


@pytest.mark.parametrize("section, key, meta", RANGED, ids=[f"{s}.{k}" for s, k, _ in RANGED])
def test_a_value_out_of_range_names_the_file_and_the_key(section, key, meta):
    data = {"engine": {"url": URL}}
    data.setdefault(section, {})[key] = out_of_range(meta)
    with pytest.raises(ConfigError) as e:
        config_mod.from_dict(data, "/etc/ovirt-borg/job.toml")
    assert str(e.value).startswith(f"/etc/ovirt-borg/job.toml: '{section}.{key}' must "), e.value


def test_read_timeout_of_minus_five():
    with pytest.raises(ConfigError, match=r"^job.toml: 'transfer.read_timeout' must be positive \(got -5\)$"):
        config_mod.from_dict({"engine": {"url": URL}, "transfer": {"read_timeout": -5}}, "job.toml")


def test_unknown_keys_and_sections_name_the_nearest_ones():
    with pytest.raises(ConfigError, match=r"unknown key 'transfer.read_timout'; did you mean 'read_timeout'"):
        config_mod.from_dict({"engine": {"url": URL}, "transfer": {"read_timout": 5}}, "job.toml")
    with pytest.raises(ConfigError, match=r"unknown section \[retenion\]; did you mean 'retention'\?"):
        config_mod.from_dict({"engine": {"url": URL}, "retenion": {}}, "job.toml")


@pytest.mark.parametrize("url, ok", [
    (URL, True), (URL + "/", True), (URL + "/v4", True), ("https://engine.example.com:8443/ovirt-engine/api", True),
    ("https://engine.example.com", False), ("https://engine.example.com/", False),
    ("https://engine.example.com/ovirt-engine", False), ("https://engine.example.com/api", False),
    ("https:///ovirt-engine/api", False),
])
def test_the_engine_url_must_be_the_apis(url, ok):
    if ok:
        config_mod.from_dict({"engine": {"url": url}}, "job.toml")
    else:
        with pytest.raises(ConfigError, match=r"'engine.url' must be the engine's API URL, ending in /ovirt-engine/api"):
            config_mod.from_dict({"engine": {"url": url}}, "job.toml")


def test_the_sample_says_an_empty_selection_takes_every_vm():
    sample = config_mod.sample_config()
    section = sample[sample.index("[selection]"):].split("\n\n")[0]
    assert "every VM of the engine" in section
    tomllib.loads(sample)


def test_the_sample_is_written_private_and_never_over_a_file(tmp_path):
    path = tmp_path / "job.toml"
    config_mod.write_sample(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == config_mod.sample_config()
    path.write_text("mine\n")
    with pytest.raises(ConfigError, match="exists; not overwritten"):
        config_mod.write_sample(path)
    assert path.read_text() == "mine\n"
    config_mod.write_sample(path, force=True)
    assert path.read_text() == config_mod.sample_config() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml"], "no temporary file is left"
    with pytest.raises(ConfigError, match="cannot write the sample configuration"):
        config_mod.write_sample(tmp_path / "missing" / "job.toml")


@pytest.mark.parametrize("value, ok", [(0, True), (1, True), (8, True), (-1, False), (9, False)])
def test_prepare_ahead_is_from_0_to_8(value, ok):
    data = {"engine": {"url": URL}, "backup": {"prepare_ahead": value}}
    if ok:
        assert config_mod.from_dict(data, "job.toml").backup.prepare_ahead == value
    else:
        with pytest.raises(ConfigError, match=rf"^job.toml: 'backup.prepare_ahead' must be from 0 to 8 "
                                              rf"\(got {value}\)$"):
            config_mod.from_dict(data, "job.toml")


def test_prepare_ahead_defaults_to_4_and_reaches_the_backup_settings():
    from ovirt_borg import jobs

    config = config_mod.from_dict({"engine": {"url": URL}}, "job.toml")
    assert config.backup.prepare_ahead == 4
    assert jobs.backup_settings(config).prepare_ahead == 4
    assert "#prepare_ahead = 4" in config_mod.sample_config()
