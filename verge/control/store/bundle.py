"""The config bundle: every service, certificate and active function, as edges load it.

Edges long-poll for a newer config version and load the bundle whole; every change of a
service, certificate or function bumps that version in its own transaction. A bundle is built
once per version and remembered, but only when built in one snapshot (``bundle()``), so every
replica's bundle V is the same bundle.
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from verge import config as vconfig
from verge.control.models import CONFIG_VERSION, FunctionVersion, Service
from verge.control.store.base import Unavailable
from verge.control.store.certificates import Certificates


class ConfigBundle(Certificates):
    """The config version and the bundle built from it."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self._config_cache: tuple[int, vconfig.Config, dict] | None = None
        self._cache_lock = threading.Lock()

    def config_version(self) -> int:
        with self.reading() as session:
            return self.counter(session, CONFIG_VERSION)

    def bundle(self) -> dict:
        """``{"version": V, "digest": "sha256:<hex>", "config": Config JSON}``.

        Every service of every tenant. The version and the content come from one snapshot
        (PostgreSQL: REPEATABLE READ), so every replica's bundle V is the same bundle; the
        digest (sha256 of the canonical config JSON) names that content itself. A bundle that
        cannot be built whole (a certificate key no configured secret opens) is Unavailable,
        never handed out without the part.
        """
        with self.snapshot() as session:
            return self.current_config(session, snapshot=True)[2]

    def current_config(
        self, session: Session, snapshot: bool = False
    ) -> tuple[int, vconfig.Config, dict]:
        """(version, Config, bundle), built once per version.

        Only a build in one snapshot (``bundle()``) is remembered: in another transaction a
        change may commit between reading the version and the content. Outside a snapshot
        (routing a purge) certificates whose keys cannot be opened are left out instead of
        failing: routing needs none.
        """
        version = self.counter(session, CONFIG_VERSION)
        cached = self._config_cache
        if cached is not None and cached[0] == version:
            return cached
        specs = session.scalars(select(Service.spec).order_by(Service.name)).all()
        functions = session.scalars(
            select(FunctionVersion.spec)
            .where(FunctionVersion.active.is_(True))
            .order_by(FunctionVersion.name)
        ).all()
        try:
            tls = self.tls_section(session)
        except Unavailable:
            if snapshot:
                raise
            tls = {}
        data = {"services": list(specs), "tls": tls, "functions": list(functions)}
        config = vconfig.config_from_data(data, "<control-plane bundle>")
        content = config.model_dump(mode="json")
        bundle = {"version": version, "digest": bundle_digest(content), "config": content}
        built = (version, config, bundle)
        if not snapshot:
            return built
        with self._cache_lock:
            if self._config_cache is None or self._config_cache[0] <= version:
                self._config_cache = built
        return built


def bundle_digest(config_json: dict) -> str:
    """The content identity of a bundle: sha256 of its canonical JSON (sorted keys)."""
    canonical = json.dumps(config_json, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
