"""Where the oracle's API token comes from: a flag, ``$MEDIMESH_API_TOKEN``, or a 0600 file.

The rule (docs/security.md): an explicit token wins, then the environment variable, then the
token file (``.medimesh/api-token`` under the working directory). When there is none, a random
one is generated, written to that file with mode 0600 and shown once; later starts read it
back silently. A token file that other users can read is refused rather than used.
"""

from __future__ import annotations

import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from medimesh.access import TOKEN_ENV
from medimesh.errors import ConfigError
from medimesh.keys import _write_private

__all__ = ["ResolvedToken", "default_token_file", "resolve_token"]


@dataclass(frozen=True, slots=True)
class ResolvedToken:
    """The token and where it came from ("flag", "env", "file" or "generated")."""

    token: str
    source: str
    path: Path | None = None

    def notice(self) -> str:
        """One line for stderr; the token itself only when it was just generated."""
        if self.source == "generated":
            return (f"API token (shown once; kept in {self.path}, mode 0600): {self.token}\n"
                    f"clients: export {TOKEN_ENV}=… or send 'Authorization: Bearer <token>'")
        where = {"flag": "--api-token", "env": f"${TOKEN_ENV}"}.get(self.source, str(self.path))
        return f"API token required on every path but /health (token from {where})"


def default_token_file() -> Path:
    return Path.cwd() / ".medimesh" / "api-token"


def resolve_token(
    explicit: str | None, env: Mapping[str, str], path: Path | None = None
) -> ResolvedToken:
    """The token to require: ``explicit``, else ``env[TOKEN_ENV]``, else the file (created)."""
    if explicit:
        return ResolvedToken(explicit, "flag")
    if env.get(TOKEN_ENV):
        return ResolvedToken(env[TOKEN_ENV], "env")
    path = path or default_token_file()
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(f"{path} is readable by other users (mode {mode:o}): "
                              f"chmod 600 {path}, or remove it to get a new token")
        token = path.read_text().strip()
        if not token:
            raise ConfigError(f"{path} is empty: remove it to get a new token")
        return ResolvedToken(token, "file", path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    _write_private(path, token + "\n")
    return ResolvedToken(token, "generated", path)
