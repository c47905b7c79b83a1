"""API tokens: named, stored hashed, checked in constant time.

A token is a random secret (``nbt_`` and 43 URL-safe characters, 256 bits) that an operator
keeps; the configuration holds only its SHA-256 (``sha256:<64 hex digits>``), its name and
whether it is read-only. A single fast hash is enough here: the secret is random and long, so
there is nothing to guess from the hash, unlike a password, which would need a slow one.

Tokens come from the ``http.tokens`` setting (a list of ``{"name", "hash", "read_only"}``) and
from the file named by ``http.token_file`` (one ``NAME HASH [read-only]`` per line, ``#``
comments). ``nanobot http token NAME`` makes a new one and prints the line to add.

A presented token is hashed and compared with every stored hash by :func:`hmac.compare_digest`,
all of them, so that neither the answer nor its timing tells which hash came close. Neither the
token nor its hash is ever logged: only the token's name is.

Immutable after construction; safe to share between the event loop and threads.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from nanobot.exceptions import ConfigError

TOKEN_PREFIX: Final = "nbt_"
HASH_PREFIX: Final = "sha256:"
_HASH_RE: Final = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
READ_ONLY_WORDS: Final = frozenset({"read-only", "readonly", "ro"})


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One configured token: its name (shown in logs as who did what), hash and rights."""

    name: str
    hash: str
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: the name of its token and whether it may change anything."""

    name: str
    read_only: bool

    @property
    def can_write(self) -> bool:
        return not self.read_only


def new_token() -> str:
    """A fresh random token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of ``token``."""
    return HASH_PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


def _entry(raw: Any, where: str) -> TokenEntry:
    if not isinstance(raw, dict):
        raise ValueError(f'{where}: an object {{"name", "hash", "read_only"}}')
    unknown = set(raw) - {"name", "hash", "read_only"}
    if unknown:
        raise ValueError(f"{where}: only name, hash and read_only (not {sorted(unknown)})")
    name, digest, read_only = raw.get("name"), raw.get("hash"), raw.get("read_only", False)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{where}: a name of 1-64 letters, digits or _.@-")
    if not isinstance(digest, str) or not _HASH_RE.match(digest):
        # Never echo the value: someone may have pasted the token itself here.
        raise ValueError(
            f"{where}: a hash written sha256:<64 hex digits> (from 'nanobot http token'), "
            "not the token itself"
        )
    if not isinstance(read_only, bool):
        raise ValueError(f"{where}: read_only true or false")
    return TokenEntry(name=name, hash=digest, read_only=read_only)


def parse_token_entries(raw: Iterable[Any]) -> list[TokenEntry]:
    """Check the ``http.tokens`` list; :class:`ValueError` says which entry and what is wrong."""
    entries = [
        value if isinstance(value, TokenEntry) else _entry(value, f"entry {i + 1}")
        for i, value in enumerate(raw)
    ]
    _check_unique(entries)
    return entries


def _check_unique(entries: list[TokenEntry]) -> None:
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise ValueError(f"token names unique (two are named {entry.name!r})")
        seen.add(entry.name)


def read_token_file(path: Path) -> list[TokenEntry]:
    """The tokens of a token file, or :class:`ConfigError` naming the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"http.token_file {path}: cannot be read: {exc.strerror}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        flags = words[2:]
        if len(words) < 2 or any(f.lower() not in READ_ONLY_WORDS for f in flags):
            raise ConfigError(
                f"http.token_file {path} line {number}: expected 'NAME HASH [read-only]'"
            )
        try:
            entries.append(
                _entry(
                    {"name": words[0], "hash": words[1], "read_only": bool(flags)},
                    f"line {number}",
                )
            )
        except ValueError as exc:
            raise ConfigError(f"http.token_file {path}: {exc}") from None
    return entries


class TokenStore:
    """The configured tokens; :meth:`check` finds whose a presented token is."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries = tuple(entries)
        try:
            _check_unique(list(self._entries))
        except ValueError as exc:
            raise ConfigError(f"http.tokens and http.token_file: {exc}") from None

    @classmethod
    def from_config(cls, tokens: Iterable[TokenEntry], token_file: str | None) -> TokenStore:
        entries = list(tokens)
        if token_file:
            entries += read_token_file(Path(token_file).expanduser())
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    def check(self, presented: str) -> Principal | None:
        """The principal of ``presented``, or None; compares with every entry, in constant time."""
        digest = hash_token(presented).encode("ascii")
        found: TokenEntry | None = None
        for entry in self._entries:
            # No early exit: the time taken does not depend on which entry matched.
            if hmac.compare_digest(digest, entry.hash.encode("ascii")):
                found = entry
        return None if found is None else Principal(found.name, found.read_only)
