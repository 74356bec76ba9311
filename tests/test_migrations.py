from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from db.models import Base
from db.session import alembic_config, head_revision, make_engine, schema_revision, upgrade_to_head


def test_migrations_produce_exactly_the_models_schema(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    upgrade_to_head(path)
    engine = make_engine(path)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []
    assert schema_revision(engine) == head_revision()
    engine.dispose()


def _diff(path: Path) -> list:
    engine = make_engine(path)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    return diff


def test_latest_migration_downgrades_and_upgrades_again(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    upgrade_to_head(path)
    command.downgrade(alembic_config(path), "-1")
    assert _diff(path) != []
    upgrade_to_head(path)
    assert _diff(path) == []


def test_downgrade_to_base_removes_every_table(tmp_path: Path) -> None:
    path = tmp_path / "base.db"
    upgrade_to_head(path)
    command.downgrade(alembic_config(path), "base")
    engine = make_engine(path)
    assert inspect(engine).get_table_names() == ["alembic_version"]
    engine.dispose()


def test_database_file_is_not_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    upgrade_to_head(path)
    assert path.stat().st_mode & 0o007 == 0
