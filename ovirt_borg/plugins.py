"""Builds the plugin manager: hook specs, built-in plugins, entry points, plugin files.

Built-in behaviour is registered as plugins with ``trylast=True`` so that users can override
it. Third-party plugins come from the ``ovirt_borg`` entry-point group. A plugin file
``NAME.py`` (the ready ones in the project's ``hooks/`` directory, or the user's own in a
directory of ``[plugins] directories``) is loaded when the config has a section for it,
``[hooks.NAME]``; the section's options are handed to the plugin's ``configure(options)``.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

import pluggy

from ovirt_borg import hookspecs, logs, naming, selection
from ovirt_borg.config import Config
from ovirt_borg.errors import ConfigError, PluginError

log = logging.getLogger(__name__)

hookimpl = pluggy.HookimplMarker("ovirt_borg")

NOTIFY_HOOKS = ("ovirt_borg_run_started", "ovirt_borg_vm_finished", "ovirt_borg_backup_failed",
                "ovirt_borg_run_finished")


class DefaultBehaviour:
    """ovirt-borg's own answers to the decision hooks (registered last)."""

    @hookimpl(trylast=True)
    def ovirt_borg_select_vms(self, config, vms, requested, all_vms):
        return selection.select(vms, selection_rule(config), requested)

    @hookimpl(trylast=True)
    def ovirt_borg_archive_name(self, config, vm, timestamp):
        return naming.archive_name(config.repository.prefix, vm.name, timestamp)


def selection_rule(config: Config) -> selection.Rule:
    """The VM rule of the configuration's ``[selection]`` section."""
    sel = config.selection
    return selection.Rule(names=tuple(sel.names), tags=tuple(sel.tags), clusters=tuple(sel.clusters),
                          exclude=tuple(sel.exclude))


def ready_plugin_dirs() -> list[Path]:
    """Where the ready plugins live: the source tree's hooks/ and the installed share dir."""
    return [Path(__file__).resolve().parent.parent / "hooks",
            Path(sys.prefix) / "share" / "ovirt-borg" / "hooks"]


def _load_file_plugin(name: str, dirs: list[Path]) -> Any:
    for directory in dirs:
        path = directory / f"{name}.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location(f"ovirt_borg_hooks.{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    return None


def build_manager(hooks_config: dict[str, dict] | None = None,
                  extra_dirs: list[Path] | None = None) -> pluggy.PluginManager:
    """Return a plugin manager with specs, built-ins, entry points and configured ready hooks.

    Raises ConfigError when a ``[hooks.NAME]`` section names no known plugin or its options are
    refused by the plugin's ``configure``.
    """
    pm = pluggy.PluginManager("ovirt_borg")
    pm.add_hookspecs(hookspecs)
    pm.register(DefaultBehaviour(), name="ovirt_borg.default")
    pm.load_setuptools_entrypoints("ovirt_borg")
    dirs = list(extra_dirs or []) + ready_plugin_dirs()
    for name, options in (hooks_config or {}).items():
        if pm.get_plugin(name) is not None:
            plugin = pm.get_plugin(name)
        else:
            plugin = _load_file_plugin(name, dirs)
            if plugin is None:
                raise ConfigError(f"[hooks.{name}]: no plugin named {name!r} (looked in "
                                  + ", ".join(str(d) for d in dirs) + " and the 'ovirt_borg' entry points)")
            pm.register(plugin, name=name)
        configure = getattr(plugin, "configure", None)
        if configure is not None:
            try:
                configure(dict(options))
            except (ValueError, TypeError, KeyError) as e:
                raise ConfigError(f"[hooks.{name}]: {e}") from None
    pm.check_pending()
    return pm


def notify(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> None:
    """Call a notification hook on every plugin; a plugin's error is logged, never raised.

    Only an interrupt that arrives while a plugin runs goes through (``Interrupted`` and
    ``KeyboardInterrupt`` are no ``Exception``), so that stopping ovirt-borg is not taken for a
    plugin failure.
    """
    assert hook_name in NOTIFY_HOOKS
    hook = getattr(pm.hook, hook_name)
    for impl in reversed(hook.get_hookimpls()):
        try:
            impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
        except Exception as e:  # a monitoring plugin never fails a backup
            log.warning("plugin %s failed in %s: %s", impl.plugin_name, hook_name, e)


class RunHooks:
    """The plugins as a backup run's hooks (``backup.VmHooks``): given the manager and the
    job's configuration, which every hook receives."""

    def __init__(self, pm: pluggy.PluginManager, config: Config):
        self.pm = pm
        self.config = config

    def before_vm(self, vm: Any) -> list[str]:
        """The reasons plugins give to skip ``vm``.

        A plugin that raises here may have meant to veto, so ``vm`` must not be backed up as if
        nothing were said: raises PluginError naming the plugin (the run fails that VM alone).
        An interrupt goes through.
        """
        reasons = []
        for impl in reversed(self.pm.hook.ovirt_borg_before_vm.get_hookimpls()):
            try:
                reason = impl.function(**{k: v for k, v in {"config": self.config, "vm": vm}.items()
                                          if k in impl.argnames})
            except Exception as e:
                log.debug("plugin %s failed in ovirt_borg_before_vm", impl.plugin_name, exc_info=True)
                raise PluginError(f"plugin {impl.plugin_name} failed before the VM's backup: {e}; "
                                  "the VM is not backed up (fix or remove the plugin)") from e
            if reason:
                reasons.append(reason)
        return reasons

    def vm_finished(self, vm: Any, result: Any) -> None:
        notify(self.pm, "ovirt_borg_vm_finished", config=self.config, vm=vm, result=result.as_dict())

    def backup_failed(self, vm: Any, error: str, exit_code: int) -> None:
        notify(self.pm, "ovirt_borg_backup_failed", config=self.config, vm=vm, error=error, exit_code=exit_code)


REQUIRED = object()
"""The default of a plugin option that must be given (see ``plugin_options``)."""


def _type_names(types: tuple[type, ...]) -> str:
    names = {str: "a string", bool: "true or false", int: "an integer", float: "a number",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def plugin_options(options: Mapping[str, Any],
                   spec: Mapping[str, tuple[type | tuple[type, ...], Any]]) -> dict[str, Any]:
    """Check a plugin's ``[hooks.NAME]`` options against its option spec.

    Given the options and the spec (option name -> (type or types, default), the default
    ``REQUIRED`` for an option that must be given), return every option of the spec with the
    defaults filled in. An int is accepted for a float; a bool is never taken for a number.
    Raises ValueError naming an unknown option (with the known ones), a missing required one,
    or one of the wrong type; ``build_manager`` turns it into a one-line ConfigError.
    """
    unknown = sorted(set(options) - set(spec))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; known options: " + ", ".join(sorted(spec)))
    values = {}
    for name, (types, default) in spec.items():
        types = types if isinstance(types, tuple) else (types,)
        if name not in options:
            if default is REQUIRED:
                raise ValueError(f"missing required option {name!r}")
            values[name] = default
            continue
        value = options[name]
        if isinstance(value, bool) and bool not in types:
            ok = False
        elif float in types and isinstance(value, int):
            ok, value = True, float(value)
        else:
            ok = isinstance(value, types)
        if not ok:
            raise ValueError(f"option {name!r} must be {_type_names(types)}, got {value!r}")
        values[name] = value
    return values


_MIN_URL_SECRET = 8


def secret_url(url: str, option: str = "url") -> str:
    """Mark the secret parts of a plugin's ``url`` so that no log record shows them.

    Monitoring URLs carry their credential in the path (a healthchecks UUID, an ntfy topic),
    the query (``?token=``) or the user info. Given the URL, registers those parts with
    ``logs.add_secret`` and returns a form safe to log (``https://host/****``). Raises
    ValueError, naming the ``option``, when the URL is not an absolute http(s) URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"option {option!r} must be an http:// or https:// URL with a host "
                         f"(got {parts.scheme or 'no'} scheme)")
    # Tokens are long (a UUID, a random topic); a short word such as "ping" or "backup" is not
    # a secret, and masking it would garble every log line that happens to contain it.
    for secret in (parts.path.strip("/"), parts.query, parts.password):
        if secret and len(secret) >= _MIN_URL_SECRET:
            logs.add_secret(secret)
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, "/****" if parts.path.strip("/") or parts.query else "", "", ""))
