"""The chaos suite: real walship processes on the embedded cluster, seeded faults.

``walship chaos`` (:mod:`walship.shared.cli.chaos`) starts the embedded cluster
in its own process (so it can take brokers down, move leaders and delete log
prefixes), runs a writer under load, a publisher and readers as subprocesses,
injects faults chosen by ``random.Random(seed)``, then stops the faults, lets
everything catch up and compares every replica with the writer byte for byte
(digests). ``plan`` is the pure part (schedule, verdict, report), ``procs``
supervises subprocesses, ``faults`` builds corrupt messages, ``run`` drives it.
"""

from walship.shared.chaos.plan import ChaosConfig, ChaosReport, FaultKind
from walship.shared.chaos.run import run_chaos

__all__ = ["ChaosConfig", "ChaosReport", "FaultKind", "run_chaos"]
