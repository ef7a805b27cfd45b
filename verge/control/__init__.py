"""The control plane: the store of tenants, services, nodes and purges, and its HTTP API.

``store.Store`` keeps the state (SQLite or PostgreSQL, Alembic migrations), ``api.create_app``
serves it over HTTP for operators and edge nodes, ``server.run_control`` runs it, and
``client.ControlClient`` talks to it. Nothing here imports ``verge.edge`` (see DESIGN.md):
edges are reached only through the config bundle and the node API.
"""
