"""Alembic environment of nanobot.

Run by ``alembic upgrade head`` from the repository root (the database comes from nanobot's
configuration) and by nanobot itself at start (the engine is passed in ``config.attributes``).
"""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import Engine

from nanobot.config import get_config
from nanobot.db import get_engine
from nanobot.exceptions import ConfigError
from nanobot.models import Base

config = context.config
target_metadata = Base.metadata

if config.attributes.get("engine") is None and config.config_file_name is not None:
    # Only when Alembic is run as a command: inside nanobot, logging is nanobot's own. Never
    # silence the application's loggers (fileConfig would disable them by default).
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _engine() -> Engine:
    engine = config.attributes.get("engine")
    if isinstance(engine, Engine):
        return engine
    try:
        return get_engine(get_config())
    except ConfigError as exc:
        # One line, as nanobot's own commands say it, rather than a traceback.
        raise SystemExit(f"nanobot: error: {exc}") from None


def _include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    # Alembic's own version table is Alembic's business.
    return not (type_ == "table" and name == "alembic_version")


def run_migrations_offline() -> None:
    context.configure(
        url=str(_engine().url),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        include_object=_include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = _engine()
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            # SQLite cannot ALTER most things: batch mode copies the table instead.
            render_as_batch=connection.dialect.name == "sqlite",
            transaction_per_migration=True,
            include_object=_include_object,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
