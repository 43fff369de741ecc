"""Keys of the gRPC call metadata the platform's services, its CLIs and the gateway
exchange (the gateway copies some to and from HTTP headers of the same names)."""

from __future__ import annotations

# The caller's credential: "Bearer <API key, node token or service token>".
AUTHORIZATION = "authorization"
# The gateway's id of the HTTP request, for cloud's logs.
REQUEST_ID = "x-request-id"
# Trailing metadata: milliseconds the nodes spent on a request's jobs.
GENERATION_MS = "x-resultity-generation-ms"
# Initial metadata: the caller's rate limit state, copied onto the HTTP response.
RATE_LIMIT_PREFIX = "x-ratelimit-"
LIMIT_REQUESTS = RATE_LIMIT_PREFIX + "limit-requests"
REMAINING_REQUESTS = RATE_LIMIT_PREFIX + "remaining-requests"
LIMIT_TOKENS = RATE_LIMIT_PREFIX + "limit-tokens"
REMAINING_TOKENS = RATE_LIMIT_PREFIX + "remaining-tokens"
# Until the bucket is full again, as OpenAI writes durations ("1s", "6m0s", "20ms").
RESET_REQUESTS = RATE_LIMIT_PREFIX + "reset-requests"
RESET_TOKENS = RATE_LIMIT_PREFIX + "reset-tokens"
# Where gRPC carries a google.rpc.Status (with its ErrorInfo).
STATUS_DETAILS = "grpc-status-details-bin"

Metadata = tuple[tuple[str, str], ...]


def bearer_metadata(credential: str) -> Metadata:
    """Call metadata presenting ``credential`` (an API key, the service token, the CLI's
    credential) as every layer's gRPC API expects it: ``authorization: Bearer <credential>``."""
    return ((AUTHORIZATION, f"Bearer {credential}"),)
