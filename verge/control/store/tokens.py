"""API tokens and logins in the control-plane store.

A token is an id and a secret of which only a digest is stored; it has a role and, but for
admin and join tokens, a tenant. Nodes log in with the credential ``join_node`` gave them
(verge.control.store.nodes); ``authenticate`` answers both. Revoking a token forgets cached
logins here and, through the base's ``logins_revoked``, on every replica.
"""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from verge.control import auth
from verge.control.auth import Principal
from verge.control.models import Node, Tenant, Token, utcnow
from verge.control.store.base import Conflict, Forbidden, Invalid, NotFound, iso
from verge.control.store.tenants import Tenants

_BOOTSTRAP_LOCK = 0x7661646D  # "vadm": held while the first admin token is made (PostgreSQL)


class Tokens(Tenants):
    """Tokens: bootstrap, create, list, revoke, and authenticate any bearer credential."""

    def authenticate(self, text: str) -> Principal | None:
        """The caller behind a bearer token, or None (unknown, wrong secret, revoked).

        Valid answers are remembered for AUTH_CACHE_SECONDS (auth.LoginCache), forgotten at
        once on any revocation or re-join: this process's, and another replica's as soon as
        its notification arrives. A PostgreSQL store that listens but has lost its LISTEN
        connection caches nothing (it would not hear of revocations).
        """
        return self.remembered_login(text, self._authenticate)

    def _authenticate(self, text: str) -> Principal | None:
        token_id, secret = auth.parse(text)
        with self.reading() as session:
            node = None
            if auth.is_node_id(token_id):
                node = session.scalar(select(Node).where(Node.credential_id == token_id))
            if node is not None:
                if node.revoked or not auth.matches(secret, node.credential_sha256):
                    return None
                return Principal(token_id, node.name, "node", node_id=node.id)
            token = session.get(Token, token_id)
            if token is None or token.revoked_at is not None:
                return None
            if not auth.matches(secret, token.secret_sha256):
                return None
            tenant = token.tenant.name if token.tenant else None
            return Principal(token.id, token.name, token.role, token.tenant_id, tenant)  # type: ignore[arg-type]

    def ensure_admin_token(self, given: str | None = None) -> str | None:
        """Make sure an admin can log in; returns the token text only when one was generated.

        ``given`` (``--admin-token``) is added as an admin token unless it exists already.
        Without it, a random admin token is made when the store has no active admin token.
        Replicas starting together on one PostgreSQL database take turns (an advisory lock),
        so the given token is added once and at most one random admin token is ever made.
        A unique-key clash anyway (a replica of an older version) is retried once.
        """
        try:
            return self._ensure_admin_token(given)
        except Conflict as exc:
            if "concurrent change" not in exc.message:
                raise
            return self._ensure_admin_token(given)

    def _ensure_admin_token(self, given: str | None) -> str | None:
        with self.writing() as session:
            if self.is_postgres:
                session.execute(text(f"SELECT pg_advisory_xact_lock({_BOOTSTRAP_LOCK})"))
            if given:
                issued = auth.from_text(given)
                existing = session.get(Token, issued.id)
                if existing is None:
                    self._add_token(session, "bootstrap", issued, "admin", "admin", None)
                elif existing.role != "admin" or existing.secret_sha256 != issued.digest:
                    raise Conflict("the given admin token collides with another token")
                elif existing.revoked_at is not None:
                    raise Conflict("the given admin token has been revoked; choose another")
                return None
            active = session.scalar(
                select(func.count())
                .select_from(Token)
                .where(Token.role == "admin", Token.revoked_at.is_(None))
            )
            if active:
                return None
            issued = auth.issue()
            self._add_token(session, "bootstrap", issued, "admin", "admin", None)
            return issued.text

    def _add_token(
        self,
        session: Session,
        actor: Principal | str,
        issued: auth.IssuedToken,
        name: str,
        role: str,
        tenant: Tenant | None,
    ) -> Token:
        created_by = actor.actor if isinstance(actor, Principal) else actor
        token = Token(
            id=issued.id,
            name=name,
            role=role,
            tenant_id=tenant.id if tenant else None,
            secret_sha256=issued.digest,
            created_by=created_by,
            created_at=utcnow(),
        )
        token.tenant = tenant
        session.add(token)
        self.audit(
            session,
            actor,
            "token.create",
            f"token:{issued.id}",
            tenant.id if tenant else None,
            {"name": name, "role": role},
        )
        return token

    def create_token(
        self, principal: Principal, role: str, name: str | None = None, tenant: str | None = None
    ) -> dict:
        if role not in auth.TOKEN_ROLES:
            raise Invalid(
                f"role must be one of {', '.join(auth.TOKEN_ROLES)} (node credentials "
                "come from POST /nodes/join)",
                "role",
            )
        with self.writing() as session:
            tenant_row = self._token_tenant(session, principal, role, tenant)
            issued = auth.issue()
            token = self._add_token(session, principal, issued, name or role, role, tenant_row)
            return {**_token_view(token), "token": issued.text}

    def _token_tenant(
        self, session: Session, principal: Principal, role: str, tenant: str | None
    ) -> Tenant | None:
        """Which tenant a new token belongs to, and whether the caller may make it."""
        if principal.role != "admin":
            if role not in ("tenant_admin", "read_only"):
                raise Forbidden(f"a tenant admin cannot create {role} tokens", "role")
            if tenant not in (None, principal.tenant):
                raise Forbidden("a tenant admin can only create tokens of its tenant", "tenant")
            return session.get(Tenant, principal.tenant_id)
        if role in ("admin", "join"):
            if tenant is not None:
                raise Invalid(f"{role} tokens belong to no tenant", "tenant")
            return None
        if tenant is None:
            if role == "tenant_admin":
                raise Invalid("a tenant_admin token needs a tenant", "tenant")
            return None
        return self.tenant_named(session, tenant)

    def list_tokens(self, principal: Principal, limit: int = 50, offset: int = 0) -> dict:
        query = select(Token).order_by(Token.created_at, Token.id)
        return self.list_scoped(principal, query, Token.tenant_id, limit, offset, _token_view)

    def revoke_token(self, principal: Principal, token_id: str) -> None:
        with self.writing() as session:
            token = session.get(Token, token_id)
            if token is None or not principal.can_see_tenant(token.tenant_id):
                raise NotFound(f"no token with id {token_id!r}")
            if token.revoked_at is not None:
                return
            if token.role == "admin":
                others = session.scalar(
                    select(func.count())
                    .select_from(Token)
                    .where(Token.role == "admin", Token.revoked_at.is_(None), Token.id != token_id)
                )
                if not others:
                    raise Conflict("this is the last admin token; create another one first")
            token.revoked_at = utcnow()
            self.logins_revoked(session)
            self.audit(
                session,
                principal,
                "token.revoke",
                f"token:{token_id}",
                token.tenant_id,
                {"name": token.name, "role": token.role},
            )
        self.forget_logins()  # again: a login looked up meanwhile saw the token unrevoked


# ---------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------


def _token_view(token: Token) -> dict:
    return {
        "id": token.id,
        "name": token.name,
        "role": token.role,
        "tenant": token.tenant.name if token.tenant else None,
        "created_at": iso(token.created_at),
        "created_by": token.created_by,
        "revoked": token.revoked_at is not None,
    }
