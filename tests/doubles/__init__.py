"""Test doubles: scripted stand-ins for services, speaking the real gRPC contracts, and
in-memory ports for testing services without them."""
