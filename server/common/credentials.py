"""The platform's credentials on the wire: bearer metadata and the service token.

Every layer's gRPC API takes ``authorization: Bearer <credential>``. The
service token is what the platform's own services and the operator CLI
present; an API key is checked by the account layer.
"""

from __future__ import annotations

import hmac
import secrets

from core.errors import InvalidApiKey

SERVICE_TOKEN_PREFIX = "rst_"
# Longer than any key or token the platform issues; a longer credential is refused
# before anything hashes, compares or logs it.
MAX_CREDENTIAL_LENGTH = 256


def generate_service_token() -> str:
    return SERVICE_TOKEN_PREFIX + secrets.token_urlsafe(32)


def is_service_token(credential: str, service_token: str) -> bool:
    """Constant-time comparison, so the token cannot be guessed byte by byte."""
    return hmac.compare_digest(credential.encode(), service_token.encode())


def bearer_credential(authorization: str | None) -> str:
    if not authorization:
        raise InvalidApiKey("You didn't provide an API key (authorization: Bearer <key>)")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidApiKey("The authorization must be 'Bearer <key>'")
    if len(token) > MAX_CREDENTIAL_LENGTH:
        raise InvalidApiKey("Invalid API key")
    return token.strip()
