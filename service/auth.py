"""API keys: random secrets shown once, stored as sha256; each key belongs to one tenant."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.base import new_id, utcnow
from service.db.tables import ApiKey, Tenant

KEY_PREFIX = "atk_"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(id=new_id("tnt"), name=name, created_at=utcnow())
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, tenant_name: str) -> str:
    """Create the tenant if needed and a new key for it; returns the secret (never stored)."""
    tenant = get_or_create_tenant(session, tenant_name)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(id=new_id("key"), tenant_id=tenant.id, key_hash=hash_key(secret), prefix=secret[:8]))
    session.flush()
    return secret


@dataclass(frozen=True)
class Caller:
    """Who a valid key belongs to: what a request needs of its tenant."""

    id: str
    name: str


KEY_CACHE_SECONDS = 10.0  # a revoked key stops working within this time
_known_keys: dict[str, tuple[float, Caller]] = {}
_known_keys_lock = threading.Lock()


def known_caller(secret: str) -> Caller | None:
    """The tenant of a key found valid less than KEY_CACHE_SECONDS ago, without the database; else None."""
    with _known_keys_lock:
        known = _known_keys.get(hash_key(secret))
    if known is not None and time.monotonic() - known[0] < KEY_CACHE_SECONDS:
        return known[1]
    return None


def tenant_for_key(session: Session, secret: str) -> Caller | None:
    """The tenant of a valid key. Valid keys are remembered for KEY_CACHE_SECONDS (a hash lookup per request
    instead of a database round trip); unknown keys are always looked up."""
    known = known_caller(secret)
    if known is not None:
        return known
    digest = hash_key(secret)
    now = time.monotonic()
    row = session.execute(
        select(Tenant.id, Tenant.name)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
    ).first()
    if row is None:
        return None
    caller = Caller(id=row.id, name=row.name)
    with _known_keys_lock:
        if len(_known_keys) > 100_000:
            _known_keys.clear()
        _known_keys[digest] = (now, caller)
    return caller
