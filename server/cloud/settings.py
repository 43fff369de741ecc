"""The cloud service's settings read from the environment."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.common.rate_limits import RateLimits


class RateLimitSettings(BaseSettings):
    """Limits every key and every account gets, from RESULTITY_RATE_LIMIT_* variables
    (e.g. RESULTITY_RATE_LIMIT_KEY_REQUESTS_PER_MINUTE=600). Unset: unlimited."""

    model_config = SettingsConfigDict(env_prefix="RESULTITY_RATE_LIMIT_", frozen=True)

    key_requests_per_minute: int | None = Field(default=None, gt=0)
    key_tokens_per_minute: int | None = Field(default=None, gt=0)
    key_concurrent_requests: int | None = Field(default=None, gt=0)
    account_requests_per_minute: int | None = Field(default=None, gt=0)
    account_tokens_per_minute: int | None = Field(default=None, gt=0)
    account_concurrent_requests: int | None = Field(default=None, gt=0)

    def over(self, defaults: RateLimitSettings) -> RateLimitSettings:
        """These settings, with ``defaults``' values where no variable set a field."""
        unset = {
            name: getattr(defaults, name)
            for name in type(self).model_fields
            if name not in self.model_fields_set
        }
        return self.model_copy(update=unset)

    @property
    def per_key(self) -> RateLimits:
        return RateLimits(
            self.key_requests_per_minute,
            self.key_tokens_per_minute,
            self.key_concurrent_requests,
        )

    @property
    def per_account(self) -> RateLimits:
        return RateLimits(
            self.account_requests_per_minute,
            self.account_tokens_per_minute,
            self.account_concurrent_requests,
        )


# What `resultity up` applies where no RESULTITY_RATE_LIMIT_* variable says otherwise:
# generous for one person on one machine, a bound on a runaway client. Tokens count
# each request's worst case (prompt bound plus max_tokens, the context when unset).
LOCAL_RATE_LIMITS = RateLimitSettings.model_construct(
    key_requests_per_minute=600,
    key_tokens_per_minute=1_000_000,
    key_concurrent_requests=32,
)


class CacheSettings(BaseSettings):
    """How long cloud trusts a cached key lookup or subcloud resolution, from
    RESULTITY_CLOUD_CACHE_TTL_S. Changes reach every replica's cache as
    invalidations at once; the TTL bounds how long a lost one keeps an entry."""

    model_config = SettingsConfigDict(env_prefix="RESULTITY_CLOUD_", frozen=True)

    cache_ttl_s: float = Field(default=5.0, gt=0)


class InFlightSettings(BaseSettings):
    """How fast a dead replica's requests are settled, from RESULTITY_CLOUD_INFLIGHT_*.

    A replica renews the lease of its requests every third of ``lease_s``; every
    replica looks for lapsed leases every ``sweep_interval_s`` and settles them from
    the network's job records, waiting up to ``running_grace_s`` for a job the
    network still records as running. A dead replica's holds are settled within
    about ``lease_s + sweep_interval_s``."""

    model_config = SettingsConfigDict(env_prefix="RESULTITY_CLOUD_INFLIGHT_", frozen=True)

    lease_s: float = Field(default=30.0, gt=0)
    sweep_interval_s: float = Field(default=10.0, gt=0)
    running_grace_s: float = Field(default=60.0, ge=0)


class InferenceLogSettings(BaseSettings):
    """How inference logs are written and swept, from RESULTITY_CLOUD_INFERENCE_LOG_*.

    Logs wait in a queue of ``queue_capacity`` entries for the writer; when it is
    full, new ones are dropped (a warning says how many) rather than slow a request.
    Expired logs are deleted every ``sweep_interval_s``."""

    model_config = SettingsConfigDict(env_prefix="RESULTITY_CLOUD_INFERENCE_LOG_", frozen=True)

    queue_capacity: int = Field(default=1_000, gt=0)
    sweep_interval_s: float = Field(default=300.0, gt=0)
