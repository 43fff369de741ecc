"""The control plane and the `resultity` command (server/cli.py).

Every process of the command imports this package before gRPC. None of them uses
gRPC in a forked child (each child they start, PostgreSQL or an agent or a
runtime worker, execs at once), so gRPC's fork support is off unless asked for:
with it on, gRPC logs "skipping fork() handlers" whenever such a child starts.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
