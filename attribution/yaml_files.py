"""Reading the YAML files users hand us (job configs, concept files) safely: bounded in size and
nesting, no aliases (a 600-byte "billion laughs" file expands to gigabytes), UTF-8 only, and syntax
errors quoted without the source line when that line holds a credential.
"""
from __future__ import annotations

from pathlib import Path

import yaml

MAX_YAML_BYTES = 4 * 1024 * 1024  # far above any real config or concept file
MAX_DEPTH = 64  # nesting of mappings and lists


class YamlFileError(ValueError):
    """Why the file cannot be read as data; the caller prefixes which file it is."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (*name) and nesting deeper than MAX_DEPTH."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise YamlFileError(f"line {event.start_mark.line + 1}: YAML aliases (*{str(event.anchor)[:40]}) are "
                                "not accepted: write the value out")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlFileError(f"line {mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _syntax_message(err: yaml.YAMLError, text: str) -> str:
    """The problem and its line, with the line quoted (bounded) unless it holds a credential."""
    from storage.read import excerpt
    from storage.redaction import is_credential_key, redact

    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or type(err).__name__
    if mark is None:
        return excerpt(redact(problem), 200)
    lines = text.splitlines()
    line = lines[mark.line] if 0 <= mark.line < len(lines) else ""
    quoted = "<a line holding a credential, not shown>" if is_credential_key(line) or "://" in line and "@" in line \
        else repr(excerpt(line, 120))
    return f"{excerpt(redact(problem), 200)} at line {mark.line + 1}, column {mark.column + 1}: {quoted}"


def load_yaml_file(path: Path, *, max_bytes: int = MAX_YAML_BYTES) -> object:
    """The file's data; YamlFileError (one line, no value quoted whole) when it cannot be had safely."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise YamlFileError(f"cannot be read: {e.strerror or type(e).__name__}") from None
    if len(raw) > max_bytes:
        raise YamlFileError(f"is larger than {max_bytes:,} bytes: not a config or concept file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise YamlFileError(f"is not UTF-8 text (byte {e.start}): a binary file?") from None
    if "\x00" in text:
        raise YamlFileError("holds NUL bytes: a binary file?")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except YamlFileError:
        raise
    except yaml.YAMLError as err:
        raise YamlFileError(f"is not valid YAML: {_syntax_message(err, text)}") from None
    except RecursionError:
        raise YamlFileError(f"nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()
