"""What a node's result signature covers: every delivered field, deterministically."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.convert.generation import logprobs_from_pb, logprobs_to_pb
from core.inference import TokenLogprob, TopLogprob, token_text
from core.node_signing import OutputDigest, result_payload, verify

LOGPROBS = (
    TokenLogprob(" Paris", b" Paris", -0.25, (TopLogprob(" Paris", b" Paris", -0.25),)),
    TokenLogprob("\ufffd", b"\xe2\x82", -1.5, (TopLogprob("\ufffd", b"\xe2\x82", -1.5),)),
)
EMBEDDING = (0.125, -0.5, 0.3)


def _payload(
    text: str = "Paris is",
    logprobs: tuple[TokenLogprob, ...] = LOGPROBS,
    embedding: tuple[float, ...] = (),
) -> bytes:
    digest = OutputDigest()
    digest.add(text, (1, 2), logprobs, embedding)
    return result_payload(
        job_id="job",
        epoch=1,
        done=True,
        reason=1,
        prompt_tokens=3,
        completion_tokens=2,
        output=digest,
    )


def test_payload_is_deterministic_and_names_its_version() -> None:
    assert _payload() == _payload()
    lines = _payload().decode().split("\n")
    assert lines[0] == "resultity-result-v2"
    assert len(lines) == 11


@pytest.mark.parametrize(
    "tampered",
    [
        (replace(LOGPROBS[0], logprob=-0.26), LOGPROBS[1]),
        (replace(LOGPROBS[0], token=" Lyon"), LOGPROBS[1]),
        (replace(LOGPROBS[0], token_bytes=b" Lyon"), LOGPROBS[1]),
        (replace(LOGPROBS[0], top_logprobs=()), LOGPROBS[1]),
        (
            replace(LOGPROBS[0], top_logprobs=(TopLogprob(" Paris", b" Paris", -0.5),)),
            LOGPROBS[1],
        ),
        (LOGPROBS[1], LOGPROBS[0]),
        LOGPROBS[:1],
    ],
)
def test_any_change_to_the_logprobs_changes_the_payload(
    tampered: tuple[TokenLogprob, ...],
) -> None:
    assert _payload(logprobs=tampered) != _payload()


def test_field_boundaries_are_unambiguous() -> None:
    """Text moved between a token and its bytes does not collide."""
    a = (TokenLogprob("ab", b"c", -1.0),)
    b = (TokenLogprob("a", b"bc", -1.0),)
    assert _payload(logprobs=a) != _payload(logprobs=b)


def test_any_change_to_the_embedding_changes_the_payload() -> None:
    assert _payload(embedding=EMBEDDING) != _payload(embedding=(0.125, -0.5, 0.31))
    assert _payload(embedding=EMBEDDING) != _payload(embedding=EMBEDDING[:2])
    assert _payload(embedding=EMBEDDING) != _payload()


def test_embedding_is_digested_as_the_float32_it_is_sent_as() -> None:
    """The node hashes its float64 values, the network what arrived as float32."""
    sent = (0.1, 1 / 3, -2.7182818284590453)
    received = struct.unpack("<3f", struct.pack("<3f", *sent))
    assert received != sent
    assert _payload(embedding=sent) == _payload(embedding=received)


def test_agent_and_network_digest_the_same_logprobs() -> None:
    """The agent digests what it sends; the network what it parsed off the wire."""
    piece = b"\xe2\x82"
    sent = (
        TokenLogprob(
            token_text(piece),
            piece,
            -1.5,
            (TopLogprob(token_text(piece), piece, -1.5), TopLogprob("x", b"x", -2)),
        ),
    )
    received = logprobs_from_pb(logprobs_to_pb(sent))
    assert _payload(logprobs=sent) == _payload(logprobs=received)


def test_a_signature_verifies_under_its_key_only_and_for_its_message_only() -> None:
    signer, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    key = signer.public_key().public_bytes_raw()
    signature = signer.sign(b"result")
    for _ in range(2):  # the second time with the key already loaded
        assert verify(key, signature, b"result")
        assert not verify(key, signature, b"other result")
        assert not verify(key, other.sign(b"result"), b"result")
        assert not verify(other.public_key().public_bytes_raw(), signature, b"result")
        assert not verify(key[:31], signature, b"result")
