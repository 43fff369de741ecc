"""The neutral core shared by server, agent and gateway: types, errors and conversions.

It imports none of `server`, `agent` or `gateway`.
"""
