"""API keys: random secrets shown once, stored as sha256; each key belongs to one tenant."""

from __future__ import annotations

import hashlib
import secrets

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


def tenant_for_key(session: Session, secret: str) -> Tenant | None:
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None)))
    return None if key is None else session.get(Tenant, key.tenant_id)
