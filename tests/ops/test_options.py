"""The custom-kernel switches and the one-time fallback log."""

import logging

import pytest

from tpu_embed_adam.ops import options


@pytest.fixture(autouse=True)
def _fresh_options(monkeypatch):
    monkeypatch.setattr(options, "_disabled_by_code", None)
    monkeypatch.setattr(options, "_warned", set())
    monkeypatch.delenv(options.DISABLE_ENV_VAR, raising=False)


def test_enabled_by_default():
    assert not options.is_custom_kernel_disabled()


def test_disable_and_enable():
    options.disable_custom_kernel()
    assert options.is_custom_kernel_disabled()
    options.enable_custom_kernel()
    assert not options.is_custom_kernel_disabled()


@pytest.mark.parametrize(("value", "disabled"), [("1", True), ("true", True), ("0", False),
                                                   ("", False), ("False", False)])
def test_environment_variable(monkeypatch, value, disabled):
    monkeypatch.setenv(options.DISABLE_ENV_VAR, value)
    assert options.is_custom_kernel_disabled() is disabled


def test_code_overrides_environment(monkeypatch):
    monkeypatch.setenv(options.DISABLE_ENV_VAR, "1")
    options.enable_custom_kernel()
    assert not options.is_custom_kernel_disabled()


def test_warn_fallback_logs_each_reason_once(caplog):
    with caplog.at_level(logging.WARNING):
        for reason in ("no library", "no library", "on GPU"):
            options.warn_fallback(reason)
    messages = [r.getMessage() for r in caplog.records if "pure-TF" in r.getMessage()]
    assert len(messages) == 2
    assert "(no library)" in messages[0] and "(on GPU)" in messages[1]
