"""Redis for tests: the server at RESULTITY_REDIS_URL (default: loopback).

Each user gets its own key prefix, so tests never see each other's keys.
Redis is a real service like PostgreSQL: a test that needs it fails, not
skips, when it cannot be reached.
"""

from __future__ import annotations

import os
import uuid

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_url() -> str:
    return os.environ.get("RESULTITY_REDIS_URL", DEFAULT_REDIS_URL)


def fresh_prefix() -> str:
    return f"resultity-test:{uuid.uuid4().hex[:12]}"
