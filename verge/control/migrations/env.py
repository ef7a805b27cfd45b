"""Alembic environment for the control-plane store.

``Store.migrate()`` builds the Alembic config in code and hands over an open connection (in
``config.attributes["connection"]``), already inside the transaction that holds the migration
lock, so there is no alembic.ini. Without one (offline SQL generation, or a developer running
alembic by hand with ``sqlalchemy.url`` set) an engine is made from the URL.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from verge.control.models import Base

config = context.config
OPTIONS = {"target_metadata": Base.metadata, "render_as_batch": True, "compare_type": True}


def run_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, **OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as connection:
        context.configure(connection=connection, **OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
