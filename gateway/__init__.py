"""The OpenAI-compatible HTTP gateway: translates the OpenAI REST/SSE API to cloud's gRPC API."""
