"""The platform's two secrets: the API-key hashing secret and the service token.

The hashing secret keys the HMAC under which API keys are stored; the service
token is the credential internal callers (cloud, bootstrap, operator CLI)
present to the account layer. Settings or environment variables may give
them (RESULTITY_KEY_HASH_SECRET, RESULTITY_SERVICE_TOKEN); otherwise
`resultity up` generates them into the data dir on first start, mode 0600.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from server.common.credentials import generate_service_token

KEY_HASH_SECRET_FILE = "key-hash-secret"
SERVICE_TOKEN_FILE = "service-token"


@dataclass(frozen=True)
class PlatformSecrets:
    # repr=False: logging or printing the object never shows them.
    key_hash_secret: bytes = field(repr=False)
    service_token: str = field(repr=False)

    @classmethod
    def generate(cls) -> PlatformSecrets:
        return cls(secrets.token_bytes(32), generate_service_token())


def load_or_create_secrets(
    data_dir: Path, *, key_hash_secret: str | None = None, service_token: str | None = None
) -> PlatformSecrets:
    """Given values win; otherwise each secret is read from, or created in, ``data_dir``."""
    hashing = key_hash_secret or _load_or_create(
        data_dir / KEY_HASH_SECRET_FILE, lambda: secrets.token_hex(32)
    )
    token = service_token or read_service_token(data_dir, create=True)
    return PlatformSecrets(hashing.encode(), token)


def read_service_token(data_dir: Path, *, create: bool = False) -> str:
    path = data_dir / SERVICE_TOKEN_FILE
    if create:
        return _load_or_create(path, generate_service_token)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise SystemExit(
            f"no service token: set RESULTITY_SERVICE_TOKEN or start `resultity up` "
            f"once with this data dir ({path} is missing)"
        ) from None


def service_token(data_dir: Path, *, create: bool = False) -> str:
    """RESULTITY_SERVICE_TOKEN if set, else the data dir's (created if ``create``)."""
    return os.environ.get("RESULTITY_SERVICE_TOKEN") or read_service_token(data_dir, create=create)


def cli_credential(data_dir: Path) -> str:
    """What operator commands present: RESULTITY_API_KEY (a management or admin key) if
    set, else the service token."""
    return os.environ.get("RESULTITY_API_KEY") or service_token(data_dir)


def _load_or_create(path: Path, make: object) -> str:
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    assert callable(make)
    value = str(make())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another process created it first (an empty file is being written): use theirs.
        return path.read_text().strip() or _load_or_create(path, make)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value + "\n")
    return value
