from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect

from db.models import Base
from db.session import alembic_config, head_revision, make_engine, migrate, schema_revision, upgrade_to_head


def _in_models(name: str | None, type_: str, parent_names: object) -> bool:
    """As migrations/env.py: tables that are not the models' (the search index's FTS5 tables) are not compared."""
    return type_ != "table" or name in Base.metadata.tables


def _compare(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection, opts={"include_name": _in_models}),
                                     Base.metadata))


def test_migrations_produce_exactly_the_models_schema(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    upgrade_to_head(path)
    engine = make_engine(path)
    assert _compare(engine) == []
    assert schema_revision(engine) == head_revision()
    engine.dispose()


def test_on_postgresql_too_and_down_to_nothing_and_back(postgres_url: str) -> None:
    """One history for both dialects: 64-bit counts, time zones and enforced lengths as the models say."""
    migrate(Path("unused.db"), postgres_url)
    engine = create_engine(postgres_url)
    try:
        assert _compare(engine) == []
        assert schema_revision(engine) == head_revision()
        config = alembic_config(postgres_url)
        command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        migrate(Path("unused.db"), postgres_url)
        assert _compare(engine) == []
    finally:
        engine.dispose()


def _diff(path: Path) -> list[Any]:
    engine = make_engine(path)
    diff = _compare(engine)
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
