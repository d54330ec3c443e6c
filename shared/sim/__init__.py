"""Deterministic simulation of walship's replication logic (TigerBeetle-style).

One ``random.Random(seed)`` drives a simulated writer, publisher, Kafka and
readers through the REAL pure pieces (codec, part assembler, sequence merger,
in-memory applier); a checker verifies the correctness contract after every
step. See docs/reliability.md, section "Deterministic simulation".
"""

from walship.shared.sim.checker import Checker, InvariantViolation
from walship.shared.sim.world import SimConfig, World

__all__ = ["Checker", "InvariantViolation", "SimConfig", "World"]
