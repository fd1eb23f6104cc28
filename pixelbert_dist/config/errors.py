"""The one error a config raises, and the check that raises it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
