"""Test doubles: scripted stand-ins for services, speaking the real gRPC contracts."""
