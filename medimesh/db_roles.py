"""Two PostgreSQL roles: the owner migrates, the application only reads and appends.

The role that owns the tables can disable the append-only trigger (``ALTER TABLE ... DISABLE
TRIGGER``), so the application must not run as it. :func:`ensure_app_role` — run with the
owner's URL — migrates the schema, creates the application role if it is missing and grants it
exactly what MediMesh's writes need:

* ``audit_entries``: SELECT and INSERT only — no UPDATE, DELETE or TRUNCATE; not the owner, so
  no ALTER (the trigger stays on) and no DROP;
* the record tables (models, rounds, nodes, checkpoints, runs, run_models): SELECT, INSERT,
  UPDATE (the upserts), no DELETE, TRUNCATE or ALTER; ``schema_migrations``: SELECT.

It returns the application's URL: ``$MEDIMESH_APP_DATABASE_URL`` when set (that role, with its
own password, is the one granted), else the owner's URL with the user replaced by
:data:`APP_ROLE` — which logs in only where the server trusts local connections (the embedded
pgserver does). The owner's role must be allowed to CREATE ROLE (or the app role must exist)
and to GRANT on the tables it owns. Integrity still rests on ``audit verify``: a database
superuser can do anything; these roles stop the application (and whoever holds its URL).
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = ["APP_DATABASE_URL_ENV", "APP_ROLE", "app_url_for", "ensure_app_role"]

APP_ROLE = "medimesh_app"
APP_DATABASE_URL_ENV = "MEDIMESH_APP_DATABASE_URL"
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

_RECORD_TABLES = ("models", "rounds", "nodes", "checkpoints", "runs", "run_models")


def app_url_for(owner_url: str, role: str = APP_ROLE) -> str:
    """The owner's URL with the user replaced by ``role`` (no password: trusted local login)."""
    parts = urlsplit(owner_url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(role)}:@{host}"))


def _user_of(url: str) -> str:
    user = urlsplit(url).username or ""
    if not _IDENT.match(user):
        raise ValueError(f"application role {user!r} is not a plain lowercase identifier")
    return user


async def ensure_app_role(owner_url: str) -> str:
    """Migrate as the owner, create and grant the application role; return the app's URL."""
    import asyncpg

    from medimesh.store import Store, _db_errors

    app_url = os.environ.get(APP_DATABASE_URL_ENV) or app_url_for(owner_url)
    role = _user_of(app_url)
    await (await Store.open(owner_url, min_size=0)).close()  # migrates, as the owner
    async with _db_errors("app role"):
        conn = await asyncpg.connect(owner_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
        if not exists:
            await conn.execute(
                f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS"
            )
        db = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'GRANT CONNECT ON DATABASE "{db}" TO {role}')
        await conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        await conn.execute(f"REVOKE ALL ON audit_entries FROM {role}")
        await conn.execute(f"GRANT SELECT, INSERT ON audit_entries TO {role}")
        tables = ", ".join(_RECORD_TABLES)
        await conn.execute(f"REVOKE ALL ON {tables} FROM {role}")
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE ON {tables} TO {role}")
        await conn.execute(f"GRANT SELECT ON schema_migrations TO {role}")
        await conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    finally:
        await conn.close()
    return app_url
