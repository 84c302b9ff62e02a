"""Alembic's entry point: migrate the store to the tables of `service.store.tables`.

The URL is `sqlalchemy.url` when `service.store.db.migrate` set it, else `PANDASYNC_DATABASE_URL`,
else `sqlite:///pandasync.db`. Migrations only: nothing here touches outbox rows.
"""

import os
from logging.config import fileConfig

from alembic import context

from service.store import db, tables

config = context.config


def _url() -> str:
    return (
        config.get_main_option("sqlalchemy.url")
        or os.environ.get("PANDASYNC_DATABASE_URL")
        or "sqlite:///pandasync.db"
    )


def run_migrations_offline() -> None:
    """Write the migrations' SQL to stdout (`alembic upgrade head --sql`)."""
    context.configure(
        url=db.database_url(_url()),
        target_metadata=tables.metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate through the same engine setup as the service, all in one transaction.

    `transactional_ddl` holds on SQLite too, since `service.store.db` emits its own BEGIN: a failed
    migration leaves nothing half done.
    """
    engine = db.create_engine(_url())
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=tables.metadata,
                render_as_batch=True,
                compare_type=True,
                transactional_ddl=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
