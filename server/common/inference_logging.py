"""Opting in to inference logs: an account's setting (kept by the account layer) and a
subcloud's (kept by cloud), and the retention a request's log gets from both."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from core.errors import InvalidArgument

DEFAULT_RETENTION_DAYS = 30
MAX_RETENTION_DAYS = 365


@dataclass(frozen=True, slots=True)
class InferenceLogging:
    enabled: bool = False
    retention_days: int = DEFAULT_RETENTION_DAYS

    @property
    def retention(self) -> timedelta:
        return timedelta(days=self.retention_days)


# Nobody's requests are logged unless they opted in.
LOGGING_OFF = InferenceLogging()


def validate_logging(
    setting: InferenceLogging, *, field: str = "inference_logging"
) -> InferenceLogging:
    """The setting with the default retention for 0; a retention out of range is
    refused."""
    if setting.retention_days == 0:
        return InferenceLogging(setting.enabled, DEFAULT_RETENTION_DAYS)
    if not 1 <= setting.retention_days <= MAX_RETENTION_DAYS:
        raise InvalidArgument(
            f"retention_days must be 1 to {MAX_RETENTION_DAYS} (0: {DEFAULT_RETENTION_DAYS})",
            field=f"{field}.retention_days",
        )
    return setting


def log_retention(account: InferenceLogging, subcloud: InferenceLogging | None) -> timedelta | None:
    """How long a request's log is kept, None when it is not logged: the account must
    have opted in and, for a request made with a subcloud's key, the subcloud too;
    the shorter retention wins."""
    if not account.enabled:
        return None
    if subcloud is None:
        return account.retention
    if not subcloud.enabled:
        return None
    return min(account.retention, subcloud.retention)
