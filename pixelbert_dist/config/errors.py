"""The one error a config raises, and the check that raises it."""

from __future__ import annotations

from pixelbert_dist.config.redact import redact


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message quotes values, so
    credentials in a quoted URL are redacted."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
