"""The engine client's error mapping and retries (no engine: the SDK's own error objects)."""

from __future__ import annotations

import ovirtsdk4 as sdk
import pytest

from ovirt_borg.engine import Engine, EngineSettings, engine_error, is_transient
from ovirt_borg.errors import AuthError, EngineError, NotFound

URL = "https://engine.example.com/ovirt-engine/api"
DNS = sdk.ConnectionError("Error while sending HTTP request: (6, 'Could not resolve host: engine.example.com')")
REFUSED = sdk.ConnectionError("Error while sending HTTP request: (7, 'Failed to connect to engine.example.com "
                              "port 443 after 0 ms: Could not connect to server')")
UNTRUSTED = sdk.Error("Error while sending HTTP request: (60, 'SSL certificate problem: unable to get local "
                      "issuer certificate')")


def http_error(code: int) -> sdk.Error:
    error = sdk.Error(f'Fault reason is "x". HTTP response code is {code}.')
    error.code = code
    return error


@pytest.mark.parametrize("error, transient", [
    (DNS, False), (REFUSED, True), (UNTRUSTED, False), (http_error(503), True), (http_error(500), True),
    (http_error(400), False), (sdk.AuthError("no"), False), (sdk.NotFoundError("gone"), False),
    (sdk.TimeoutError("slow"), True), (ValueError("not an SDK error"), False),
])
def test_which_errors_are_worth_repeating(error, transient):
    assert is_transient(error) is transient


def test_a_name_that_does_not_resolve_says_so_without_suggesting_the_ca_file():
    mapped = engine_error(DNS, "connecting", URL)
    assert isinstance(mapped, EngineError)
    text = str(mapped)
    assert "cannot resolve the engine's host name 'engine.example.com'" in text and "DNS" in text
    assert "CA" not in text and "ca_file" not in text


def test_a_refused_connection_names_the_host_and_port():
    assert "engine.example.com:443" in str(engine_error(REFUSED, "connecting", URL))
    assert "engine.example.com:8443" in str(engine_error(REFUSED, "connecting",
                                                         "https://engine.example.com:8443/ovirt-engine/api"))


def test_other_mappings():
    assert isinstance(engine_error(sdk.AuthError("no"), "x"), AuthError)
    assert isinstance(engine_error(sdk.NotFoundError("no"), "x"), NotFound)
    assert "engine.ca_file" in str(engine_error(UNTRUSTED, "x"))
    assert "(HTTP 409)" in str(engine_error(http_error(409), "x"))


class Calls:
    """An SDK call that fails with the given errors, then answers 'done'."""

    def __init__(self, *errors):
        self.errors = list(errors)
        self.count = 0

    def __call__(self):
        self.count += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def engine(retries: int) -> Engine:
    return Engine(EngineSettings(url=URL, user="u", password="p", poll_interval=0.001, retries=retries))


def test_transient_failures_are_repeated_up_to_the_retries():
    call = Calls(REFUSED, http_error(503))
    assert engine(3)._retry(call, "reading") == "done" and call.count == 3
    call = Calls(REFUSED, REFUSED, REFUSED)
    with pytest.raises(sdk.ConnectionError):
        engine(2)._retry(call, "reading")
    assert call.count == 3


def test_a_dns_failure_is_not_repeated(caplog):
    call = Calls(DNS)
    with pytest.raises(sdk.ConnectionError):
        engine(3)._retry(call, "connecting")
    assert call.count == 1
    assert "retrying" not in caplog.text
