"""Password hashes: the schemes accepted, hashing, verifying, and checking that a hash is complete.

passlib is imported on first use, so reading a config without users, or `-help`, never loads it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from passlib.context import CryptContext

SCHEMES = ("bcrypt", "argon2", "sha512_crypt", "sha256_crypt", "pbkdf2_sha256")


@functools.cache
def context() -> CryptContext:
    from passlib.context import CryptContext
    return CryptContext(schemes=list(SCHEMES), default="bcrypt")


def hash_password(password: str) -> str:
    return context().hash(password)


def verify(password: str, password_hash: str) -> bool:
    try:
        return bool(context().verify(password, password_hash))
    except (ValueError, TypeError):
        # passlib refuses some inputs (e.g. over-long passwords); that is a failed login, not a 500.
        return False


def well_formed(text: str) -> bool:
    """A complete hash of a supported scheme; a truncated paste would otherwise fail every login."""
    ctx = context()
    scheme = ctx.identify(text)
    if scheme is None:
        return False
    try:
        return ctx.handler(scheme).from_string(text).checksum is not None
    except ValueError:
        return False
