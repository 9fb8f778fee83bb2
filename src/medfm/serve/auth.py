"""Bearer tokens with scopes: ``read`` (run models, read the PACS) and ``write`` (store results in the PACS).

Tokens live in a JSON file ``{"tokens": [{"name": "viewer", "sha256": "<hex>", "scopes": ["read"]}]}`` —
only their hashes, so the file can be shared with operations without handing out access. With no file the
service makes one read+write token and prints it once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from medfm.errors import InputError

SCOPES = ("read", "write")
COOKIE = "medfm_token"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Grant:
    name: str
    scopes: frozenset[str]


class Tokens:
    """token hash -> Grant; ``check`` compares in constant time."""

    def __init__(self, grants: dict[str, Grant]) -> None:
        self._grants = grants

    @classmethod
    def from_file(cls, path: str | Path) -> Tokens:
        p = Path(path)
        try:
            rows = json.loads(p.read_text())["tokens"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(p, f"not a tokens file ({type(e).__name__}); expected "
                             '{"tokens": [{"name", "sha256" or "token", "scopes"}]}') from None
        grants = {}
        for i, r in enumerate(rows):
            h = r.get("sha256") or (digest(r["token"]) if r.get("token") else None)
            scopes = set(r.get("scopes") or [])
            if not h or not scopes or scopes - set(SCOPES):
                raise InputError(p, f"token {i}: needs sha256 (or token) and scopes from {', '.join(SCOPES)}")
            grants[str(h)] = Grant(str(r.get("name") or f"token{i}"), frozenset(scopes))
        return cls(grants)

    @classmethod
    def generated(cls, scopes: tuple[str, ...] = SCOPES) -> tuple[Tokens, str]:
        token = secrets.token_urlsafe(24)
        return cls({digest(token): Grant("generated", frozenset(scopes))}), token

    def check(self, token: str | None) -> Grant | None:
        if not token:
            return None
        h = digest(token)
        for known, grant in self._grants.items():
            if hmac.compare_digest(known, h):
                return grant
        return None


def make_token_entry(name: str, scopes: list[str]) -> tuple[str, dict]:
    """A new token and the line for the tokens file (hash only)."""
    token = secrets.token_urlsafe(24)
    return token, {"name": name, "sha256": digest(token), "scopes": sorted(set(scopes))}
