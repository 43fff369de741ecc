"""PostgreSQL adapter for accounts, API keys and referrals (the ledger is in ledger_store.py)."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID, uuid4

import asyncpg

from core.errors import InvalidArgument
from server.account.api_keys import ActiveKey, ApiKey, GeneratedKey, KeyPolicy, Scope
from server.account.profiles import Account, Referral, ReferralRules
from server.common.inference_logging import InferenceLogging
from server.common.rate_limits import RateLimits

Record = asyncpg.Record


def _rate_limits(row: Record) -> RateLimits:
    return RateLimits(
        row["requests_per_minute"], row["tokens_per_minute"], row["concurrent_requests"]
    )


def _account(row: Record) -> Account:
    return Account(
        account_id=row["id"],
        name=row["name"],
        created_at=row["created_at"],
        disabled=row["disabled"],
        email=row["email"],
        referred_by=row["referred_by"],
        updated_at=row["updated_at"],
        rate_limits=_rate_limits(row),
        inference_logging=_logging(row),
    )


def _logging(row: Record, prefix: str = "") -> InferenceLogging:
    return InferenceLogging(
        row[f"{prefix}inference_logging"], row[f"{prefix}inference_log_retention_days"]
    )


def _api_key(row: Record) -> ApiKey:
    return ApiKey(
        api_key_id=row["id"],
        account_id=row["account_id"],
        name=row["name"],
        prefix=row["prefix"],
        created_at=row["created_at"],
        policy=KeyPolicy(
            scopes=frozenset(Scope(scope) for scope in row["scopes"]),
            expires_at=row["expires_at"],
            allowed_models=tuple(row["allowed_models"]),
            subcloud_id=row["subcloud_id"],
            rate_limits=_rate_limits(row),
        ),
        revoked_at=row["revoked_at"],
    )


class PostgresAccountStore:
    def __init__(self, pool: asyncpg.Pool[Record]) -> None:
        self._pool = pool

    # accounts

    async def insert_account(self, name: str, email: str, referral_code: str) -> Account:
        account_id = uuid4()
        async with self._pool.acquire() as conn, conn.transaction():
            referrer = None
            if referral_code:
                referrer = await conn.fetchval(
                    "SELECT id FROM accounts WHERE referral_code = $1 AND NOT disabled",
                    referral_code,
                )
                if referrer is None:
                    raise InvalidArgument("Unknown referral code", field="referral_code")
            row = await conn.fetchrow(
                """INSERT INTO accounts (id, name, email, referred_by) VALUES ($1, $2, $3, $4)
                   RETURNING *""",
                account_id,
                name,
                email,
                referrer,
            )
            await conn.executemany(
                """INSERT INTO ledger_accounts (id, owner_id, kind, debits_must_not_exceed_credits)
                   VALUES ($1, $2, $3, true)""",
                [(uuid4(), account_id, "consumer"), (uuid4(), account_id, "operator")],
            )
        assert row is not None
        return _account(row)

    async def get_account(self, account_id: UUID) -> Account | None:
        row = await self._pool.fetchrow("SELECT * FROM accounts WHERE id = $1", account_id)
        return None if row is None else _account(row)

    async def update_account(
        self, account_id: UUID, name: str | None, email: str | None
    ) -> Account | None:
        row = await self._pool.fetchrow(
            """UPDATE accounts SET name = coalesce($2, name), email = coalesce($3, email),
                                   updated_at = now()
               WHERE id = $1 RETURNING *""",
            account_id,
            name,
            email,
        )
        return None if row is None else _account(row)

    async def disable_account(self, account_id: UUID) -> Account | None:
        row = await self._pool.fetchrow(
            "UPDATE accounts SET disabled = true, updated_at = now() WHERE id = $1 RETURNING *",
            account_id,
        )
        return None if row is None else _account(row)

    async def set_account_rate_limits(self, account_id: UUID, limits: RateLimits) -> Account | None:
        row = await self._pool.fetchrow(
            """UPDATE accounts SET requests_per_minute = $2, tokens_per_minute = $3,
                                   concurrent_requests = $4, updated_at = now()
               WHERE id = $1 RETURNING *""",
            account_id,
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.concurrent_requests,
        )
        return None if row is None else _account(row)

    async def set_account_inference_logging(
        self, account_id: UUID, setting: InferenceLogging
    ) -> Account | None:
        row = await self._pool.fetchrow(
            """UPDATE accounts SET inference_logging = $2, inference_log_retention_days = $3,
                                   updated_at = now()
               WHERE id = $1 RETURNING *""",
            account_id,
            setting.enabled,
            setting.retention_days,
        )
        return None if row is None else _account(row)

    async def list_accounts(self, limit: int, after: tuple[datetime, UUID] | None) -> list[Account]:
        rows = await self._pool.fetch(
            """SELECT * FROM accounts
               WHERE $1::timestamptz IS NULL OR (created_at, id) > ($1, $2)
               ORDER BY created_at, id LIMIT $3""",
            after[0] if after else None,
            after[1] if after else None,
            limit,
        )
        return [_account(row) for row in rows]

    # API keys

    async def insert_api_key(
        self, account_id: UUID, name: str, key: GeneratedKey, policy: KeyPolicy
    ) -> ApiKey | None:
        row = await self._pool.fetchrow(
            """INSERT INTO api_keys (id, account_id, name, prefix, key_hash, scopes, expires_at,
                                     allowed_models, subcloud_id, requests_per_minute,
                                     tokens_per_minute, concurrent_requests)
               SELECT $1, id, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 FROM accounts
               WHERE id = $2 AND NOT disabled
               RETURNING *""",
            uuid4(),
            account_id,
            name,
            key.prefix,
            key.key_hash,
            sorted(scope.value for scope in policy.scopes),
            policy.expires_at,
            list(policy.allowed_models),
            policy.subcloud_id,
            policy.rate_limits.requests_per_minute,
            policy.rate_limits.tokens_per_minute,
            policy.rate_limits.concurrent_requests,
        )
        return None if row is None else _api_key(row)

    async def find_active_api_key(self, key_hash: str) -> tuple[ActiveKey, str] | None:
        """The usable key with this hash (and its account's limits), and the stored hash
        to compare it with."""
        row = await self._pool.fetchrow(
            """SELECT k.*, a.requests_per_minute AS account_requests_per_minute,
                      a.tokens_per_minute AS account_tokens_per_minute,
                      a.concurrent_requests AS account_concurrent_requests,
                      a.inference_logging AS account_inference_logging,
                      a.inference_log_retention_days AS account_inference_log_retention_days
               FROM api_keys k JOIN accounts a ON a.id = k.account_id
               WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND NOT a.disabled
                 AND (k.expires_at IS NULL OR k.expires_at > now())""",
            key_hash,
        )
        if row is None:
            return None
        account_limits = RateLimits(
            row["account_requests_per_minute"],
            row["account_tokens_per_minute"],
            row["account_concurrent_requests"],
        )
        return (
            ActiveKey(_api_key(row), account_limits, _logging(row, "account_")),
            row["key_hash"],
        )

    async def get_api_key(self, api_key_id: UUID) -> ApiKey | None:
        row = await self._pool.fetchrow("SELECT * FROM api_keys WHERE id = $1", api_key_id)
        return None if row is None else _api_key(row)

    async def list_api_keys(
        self, account_id: UUID, limit: int, after: tuple[datetime, UUID] | None
    ) -> list[ApiKey]:
        rows = await self._pool.fetch(
            """SELECT * FROM api_keys WHERE account_id = $1
                 AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
               ORDER BY created_at DESC, id DESC LIMIT $4""",
            account_id,
            after[0] if after else None,
            after[1] if after else None,
            limit,
        )
        return [_api_key(row) for row in rows]

    async def revoke_api_key(self, api_key_id: UUID) -> ApiKey | None:
        row = await self._pool.fetchrow(
            """UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
               WHERE id = $1 RETURNING *""",
            api_key_id,
        )
        return None if row is None else _api_key(row)

    # referrals

    async def referral_code(self, account_id: UUID, candidate: str) -> str | None:
        """The account's code, setting ``candidate`` if it has none.

        None if there is no such account; "" if ``candidate`` is taken.
        """
        try:
            code: str | None = await self._pool.fetchval(
                """UPDATE accounts SET referral_code = coalesce(referral_code, $2)
                   WHERE id = $1 RETURNING referral_code""",
                account_id,
                candidate,
            )
        except asyncpg.UniqueViolationError:
            return ""
        return code

    async def list_referrals(self, account_id: UUID) -> list[Referral]:
        rows = await self._pool.fetch(
            """SELECT a.id, a.created_at, coalesce(sum(b.amount), 0) AS paid,
                      count(b.top_up_id) AS rewarded
               FROM accounts a LEFT JOIN referral_bonuses b ON b.referee_id = a.id
               WHERE a.referred_by = $1
               GROUP BY a.id, a.created_at ORDER BY a.created_at, a.id""",
            account_id,
        )
        return [
            Referral(row["id"], row["created_at"], int(row["paid"]), row["rewarded"])
            for row in rows
        ]

    async def referral_rules(self) -> ReferralRules:
        row = await self._pool.fetchrow("SELECT * FROM referral_rules")
        assert row is not None  # migration 0002 inserts the row
        return ReferralRules(row["bonus_bps"], row["rewarded_top_ups"], row["max_bonus"])

    async def set_referral_rules(self, rules: ReferralRules) -> ReferralRules:
        await self._pool.execute(
            "UPDATE referral_rules SET bonus_bps = $1, rewarded_top_ups = $2, max_bonus = $3",
            rules.bonus_bps,
            rules.rewarded_top_ups,
            rules.max_bonus,
        )
        return rules
