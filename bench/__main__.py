"""`python -m bench` (`make bench`): every benchmark, one after another.

The LLM throughput benchmark takes the command-line options (see
`python -m bench --help`); the others run with their defaults. Every one
records the machine's load per round (bench/machine_load.py). Method and
results: bench/README.md.
"""

from bench import gateway, ledger, network, routing, scaled_out
from bench.llm_throughput import main

if __name__ == "__main__":
    main()
    ledger.main([])  # ledger throughput next to pgbench on the same database
    routing.main([])  # routing decision time at 100 to 10,000 simulated nodes
    routing.main(["--replicas", "4"])  # the same fleets spread over 4 network replicas
    gateway.main([])  # platform overhead per streamed request, zero-latency runtime
    network.main([])  # heartbeat ingestion and failover recovery of the network server
    try:  # the control plane as separate processes on real PostgreSQL and Redis
        scaled_out.main([])
    except scaled_out.ServicesUnreachable as error:
        print(f"scaled-out benchmark skipped: {error}")
