"""Schema upgrades with Alembic, run on the store's own async engine."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect

from quarantine.db import Store

MIGRATIONS = Path(__file__).parent / "migrations"


class SchemaStatus(StrEnum):
    EMPTY = "empty"  # no tables at all: safe to create
    CURRENT = "current"
    OUTDATED = "outdated"  # older than this release: run `sekisho migrate`
    NEWER = "newer"  # written by a newer release: refuse to touch it
    FOREIGN = "foreign"  # tables but no version: not ours


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def _status(connection: Connection) -> SchemaStatus:
    current = MigrationContext.configure(connection).get_current_revision()
    if current is None:
        tables = set(inspect(connection).get_table_names())
        return SchemaStatus.FOREIGN if tables - {"alembic_version"} else SchemaStatus.EMPTY
    if current == head_revision():
        return SchemaStatus.CURRENT
    scripts = ScriptDirectory.from_config(_alembic_config())
    known = {rev.revision for rev in scripts.walk_revisions()}
    return SchemaStatus.OUTDATED if current in known else SchemaStatus.NEWER


def _upgrade(connection: Connection, target: str) -> None:
    config = _alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, target)


async def schema_status(store: Store) -> SchemaStatus:
    async with store.engine.connect() as connection:
        return await connection.run_sync(_status)


async def upgrade(store: Store, target: str = "head") -> None:
    async with store.engine.begin() as connection:
        await connection.run_sync(_upgrade, target)
