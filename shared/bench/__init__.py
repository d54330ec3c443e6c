"""``walship bench``: throughput, latency, bootstrap, fan-out and memory on the embedded cluster.

Every measured component runs in its own process (``python -m
walship.shared.bench.worker ROLE PARAMS``), started together and released by
a "go" line on stdin, so the figures include inter-process handoff and each
process's peak RSS is its own. The orchestrator (``runner``) owns the embedded
cluster and the report (``report``).
"""
