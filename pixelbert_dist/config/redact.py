"""Secrets out of everything a run records: the user info of URLs and secret-looking values.

A run config is copied into MLflow params, the `config/resolved.yaml` artifact, every
checkpoint's client_state.json (mirrored to a bucket others read), the model's config.json
and the CLI's output. A `tracking.uri` such as `postgresql://user:PASSWORD@db/mlflow` must
still say which server, never the password:

    redact("postgresql://user:pw@db:5432/mlflow")   # 'postgresql://***@db:5432/mlflow'
    redact("https://h/x?X-Amz-Signature=abc&n=1")   # 'https://h/x?X-Amz-Signature=***&n=1'

Any string is searched for URLs, so a field, a log line or an error message all go through
the same function; dicts and lists are redacted value by value, and a dict entry whose key
names a secret (`password`, `api_key`, `...token`) is masked whole. The live config keeps
the real values: only recorded copies are redacted.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

_URL = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)([^\s'\"<>]+)")
# a query parameter whose name says it holds a secret (presigned S3/GCS URLs, SAS tokens, DSNs)
_SECRET_PARAM = re.compile(r"pass|pwd|token|secret|key|sig|credential|auth", re.IGNORECASE)
# a config/JSON key that holds a secret; anchored at the end so `tokenizer` is not one
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_?key|access_?key|credentials?)$", re.IGNORECASE)
# SQLAlchemy also reads `user:pa/ss@host` (a password with an unescaped '/'), which a URL
# parser would take as the host `user` and the path `/ss@host`
_LENIENT_USERINFO = re.compile(r"[^:/@?#]*:[^@]*@")


def redact(value: Any) -> Any:
    """`value` with every URL's user info and secret query values replaced by `***`."""
    if isinstance(value, str):
        return _URL.sub(lambda m: m.group(1) + _redact_rest(m.group(2)), value)
    if isinstance(value, dict):
        return {key: MASK if _is_secret_key(key, item) else redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    return value


def _is_secret_key(key: Any, item: Any) -> bool:
    return isinstance(key, str) and isinstance(item, str) and bool(item) and bool(_SECRET_KEY.search(key))


def _redact_rest(rest: str) -> str:
    """What follows `scheme://`: authority (user info masked), path, query (secrets masked)."""
    authority_end = len(rest)
    for stop in "/?#":
        at = rest.find(stop)
        if at != -1:
            authority_end = min(authority_end, at)
    authority = rest[:authority_end]
    if "@" in authority:  # user info ends at the authority's last '@' (as urllib reads it)
        rest = f"{MASK}@{rest[authority.rindex('@') + 1:]}"
    else:
        lenient = _LENIENT_USERINFO.match(rest)
        if lenient:
            rest = f"{MASK}@{rest[lenient.end():]}"
    head, question, query = rest.partition("?")
    if not question:
        return rest
    query, hash_, fragment = query.partition("#")
    params = [_redact_param(p) for p in query.split("&")]
    return f"{head}?{'&'.join(params)}{hash_}{fragment}"


def _redact_param(param: str) -> str:
    name, equals, value = param.partition("=")
    return f"{name}={MASK}" if equals and value and _SECRET_PARAM.search(name) else param
