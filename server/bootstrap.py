"""First-start set-up of a local platform: a demo account with credits and a key.

The key is written to <data dir>/demo-api-key (mode 0600) and reused on later
starts for as long as it still authenticates. It has the inference and
management scopes, so its holder can also read the demo account's balance
and history. Bootstrap calls the account layer with the service token.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import structlog
from resultity.account.v1 import account_service_pb2 as account_pb
from resultity.account.v1 import account_service_pb2_grpc as account_grpc
from resultity.account.v1 import api_key_service_pb2 as keys_pb
from resultity.account.v1 import api_key_service_pb2_grpc as keys_grpc
from resultity.account.v1 import ledger_service_pb2 as ledger_pb
from resultity.account.v1 import ledger_service_pb2_grpc as ledger_grpc
from resultity.account.v1 import node_token_service_pb2 as node_token_pb
from resultity.account.v1 import node_token_service_pb2_grpc as node_token_grpc

from core.metadata import bearer_metadata

log = structlog.get_logger(__name__)

DEMO_KEY_FILE = "demo-api-key"
DEMO_KEY_SCOPES = (keys_pb.API_KEY_SCOPE_INFERENCE, keys_pb.API_KEY_SCOPE_MANAGEMENT)


async def ensure_demo_key(
    channel: grpc.aio.Channel, data_dir: Path, credits: int, service_token: str
) -> str:
    """The demo account's API key, creating account, credits and key if needed."""
    key_file = data_dir / DEMO_KEY_FILE
    keys = keys_grpc.ApiKeyServiceStub(channel)
    secret = _read_key(key_file)
    metadata = bearer_metadata(service_token)
    if secret is not None:
        try:
            await keys.AuthenticateApiKey(
                keys_pb.AuthenticateApiKeyRequest(secret=secret), metadata=metadata
            )
            return secret
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            log.warning("stored demo key no longer valid; creating a new demo account")

    account = (
        await account_grpc.AccountServiceStub(channel).CreateAccount(
            account_pb.CreateAccountRequest(name="demo"), metadata=metadata
        )
    ).account
    await ledger_grpc.LedgerServiceStub(channel).TopUp(
        ledger_pb.TopUpRequest(
            account_id=account.account_id,
            amount_micro_credits=credits,
            idempotency_key=f"demo-grant:{account.account_id}",
        ),
        metadata=metadata,
    )
    issued = await keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(
            account_id=account.account_id, name="demo", scopes=DEMO_KEY_SCOPES
        ),
        metadata=metadata,
    )
    _write_key(key_file, issued.secret)
    log.info("demo account created", account_id=account.account_id, credits=credits / 1e6)
    return issued.secret


def _read_key(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _write_key(path: Path, secret: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secret + "\n")


NODE_TOKEN_FILE = "node-token"


async def ensure_node_token(channel: grpc.aio.Channel, data_dir: Path, service_token: str) -> str:
    """A node token of the platform's own operator account, for the local agent.

    Created on first start (with the account) and reused while it still works;
    the local agent's earnings go to that account.
    """
    key_file = data_dir / NODE_TOKEN_FILE
    tokens = node_token_grpc.NodeTokenServiceStub(channel)
    metadata = bearer_metadata(service_token)
    secret = _read_key(key_file)
    if secret is not None:
        try:
            await tokens.AuthenticateNodeToken(
                node_token_pb.AuthenticateNodeTokenRequest(secret=secret), metadata=metadata
            )
            return secret
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            log.warning("stored node token no longer valid; creating a new operator account")
    account = (
        await account_grpc.AccountServiceStub(channel).CreateAccount(
            account_pb.CreateAccountRequest(name="platform operator"), metadata=metadata
        )
    ).account
    issued = await tokens.CreateNodeToken(
        node_token_pb.CreateNodeTokenRequest(account_id=account.account_id, name="local agent"),
        metadata=metadata,
    )
    _write_key(key_file, issued.secret)
    log.info("platform operator account created", account_id=account.account_id)
    return issued.secret
