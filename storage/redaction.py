"""Keep credentials out of text a person sees: URL user info, values under credential-looking keys,
and the values of credential environment variables. Used on every error message the CLI prints.
"""
from __future__ import annotations

import os
import re

REDACTED = "<redacted>"
# A key that names a credential: AWS_SECRET_ACCESS_KEY, aws_session_token, password, api-key, key_id ...
CREDENTIAL_KEY = re.compile(
    r"(secret|passw(or)?d|passwd|token|key[_-]?id|access[_-]?key|session|credential|api[_-]?key|private[_-]?key"
    r"|auth)", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]*@")
# key = value, key: value, 'key': 'value', "key"="value", KEY=value in an env listing.
_KEY_VALUE = re.compile(
    r"""(?ix)
    (?P<key>\b[\w.-]*?(?:secret|passw(?:or)?d|passwd|token|key[_-]?id|access[_-]?key|session|credentials?
                        |api[_-]?key|private[_-]?key)(?:[_.-][\w.-]*)?)
    (?P<sep>['"]?\s*[:=]\s*)
    (?P<value>'[^']*'?|"[^"]*"?|[^\s,}\]]+)""")
_MIN_SECRET = 4  # shorter given secrets are not searched for (they would match everywhere)
# An environment variable's value is searched for only when it could be a credential: at least 8
# characters, matched as a whole word. A CI runner that sets e.g. GH_TOKEN=token must not turn every
# "tokenizer" and "unknown token" of an error message into <redacted>.
_MIN_ENVIRONMENT_SECRET = 8


def is_credential_key(key: object) -> bool:
    return CREDENTIAL_KEY.search(str(key)) is not None


def _environment_secrets() -> list[str]:
    return sorted({v for k, v in os.environ.items() if is_credential_key(k) and len(v) >= _MIN_ENVIRONMENT_SECRET},
                  key=len, reverse=True)


def redact(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """`text` with URL user info, values after credential-looking keys, the values of credential
    environment variables and the given `secrets` replaced by REDACTED."""
    text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", str(text))

    def keep_key(m: re.Match) -> str:
        value = m.group("value")
        quote = value[0] if value[:1] in ("'", '"') else ""
        return f"{m.group('key')}{m.group('sep')}{quote}{REDACTED}{quote}"

    text = _KEY_VALUE.sub(keep_key, text)
    for secret in sorted((s for s in secrets if len(s) >= _MIN_SECRET), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    for secret in _environment_secrets():
        # Whole words only: the value must not continue a longer word on either side.
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", REDACTED, text)
    return text
