"""Run the deterministic simulation for one or many seeds.

    python -m walship.shared.sim.run --seeds 1000            # seeds 0..999
    python -m walship.shared.sim.run --seed 42 --steps 400   # replay one seed exactly
    python -m walship.shared.sim.run --seed 42 --trace       # ... and print its whole trace

A failure prints the seed, the step, the tail of the event trace and the exact
replay command. Exit code 1 when any seed fails.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field

from walship.shared.sim.checker import Checker, InvariantViolation
from walship.shared.sim.world import TRACE_KEEP, MergerFactory, Shape, SimConfig, World

STEPS_DEFAULT = 1000
TRACE_TAIL = 40


@dataclass(frozen=True)
class Variant:
    """Switches that steer a run to a rare situation (off in CI); part of the replay command."""

    rogue_between_parts: bool = False

    def flags(self) -> str:
        return "--rogue-between-parts " if self.rogue_between_parts else ""


@dataclass
class SeedResult:
    seed: int
    steps: int
    ok: bool
    error: str = ""
    failed_step: int | None = None
    trace: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    shape: Shape | None = None
    elapsed_s: float = 0.0
    variant: Variant = Variant()

    @property
    def replay_command(self) -> str:
        return (
            f"python -m walship.shared.sim.run --seed {self.seed} --steps {self.steps} "
            f"{self.variant.flags()}--trace"
        )

    def summary(self) -> str:
        s = self.stats
        keys = (
            "txns",
            "messages",
            "writer_crashes",
            "publisher_crashes",
            "reader_crashes",
            "retention_truncations",
            "bootstraps",
            "decode_stops",
            "split_brain_stops",
        )
        figures = " ".join(f"{k}={s.get(k, 0)}" for k in keys)
        verdict = "ok  " if self.ok else "FAIL"
        return f"seed {self.seed:6d} {verdict} {self.elapsed_s * 1000:6.0f} ms {figures}"

    def report(self, tail: int = TRACE_TAIL) -> str:
        lines = [self.summary()]
        if not self.ok:
            lines.append(f"  failed at step {self.failed_step}: {self.error}")
            lines.append(f"  shape: {self.shape}")
            lines.append(f"  last {min(tail, len(self.trace))} events:")
            lines.extend(f"    {t}" for t in self.trace[-tail:])
            lines.append(f"  replay: {self.replay_command}")
        return "\n".join(lines)


def run_seed(
    seed: int,
    steps: int = STEPS_DEFAULT,
    *,
    merger_factory: MergerFactory | None = None,
    faults: bool = True,
    full_trace: bool = False,
    variant: Variant = Variant(),
) -> SeedResult:
    """Run one seed to the end (or to the first violated invariant)."""
    started = time.perf_counter()
    world: World | None = None
    result = SeedResult(seed, steps, ok=True, variant=variant)
    try:
        config = SimConfig(
            seed=seed,
            steps=steps,
            faults=faults,
            trace_keep=None if full_trace else TRACE_KEEP,
            rogue_between_parts=variant.rogue_between_parts,
        )
        world = World(config, merger_factory)
        result.shape = world.shape
        checker = Checker()
        for _ in range(steps):
            world.step()
            checker.after_step(world)
        world.quiesce(checker.after_step)
        checker.at_end(world)
    except InvariantViolation as exc:
        result.ok = False
        result.error = str(exc)
    except Exception as exc:  # a crash in the real code under test is a finding too
        result.ok = False
        result.error = f"unexpected {type(exc).__name__}: {exc}\n" + traceback.format_exc()
    if world is not None:
        result.trace = list(world.trace)
        result.stats = dict(world.stats)
        if not result.ok:
            result.failed_step = world.step_no
    result.elapsed_s = time.perf_counter() - started
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m walship.shared.sim.run",
        description="Deterministic simulation of walship replication (see docs/reliability.md).",
    )
    ap.add_argument("--seeds", type=int, default=None, help="how many seeds to run (from --seed)")
    ap.add_argument("--seed", type=int, default=0, help="the (first) seed")
    ap.add_argument("--steps", type=int, default=STEPS_DEFAULT, help="random steps per seed")
    ap.add_argument("--trace", action="store_true", help="print the whole event trace")
    ap.add_argument("--quiet", action="store_true", help="print failures and the total only")
    ap.add_argument(
        "--rogue-between-parts",
        action="store_true",
        help="make the second writer's message land between the parts of a split transaction",
    )
    args = ap.parse_args(argv)
    count = 1 if args.seeds is None else args.seeds
    seeds = range(args.seed, args.seed + count)

    def show(r: SeedResult) -> None:
        if not r.ok or not args.quiet:
            print(r.report(), flush=True)
        if args.trace:
            print("\n".join(r.trace))

    started = time.perf_counter()
    variant = Variant(rogue_between_parts=args.rogue_between_parts)
    results = []
    for seed in seeds:
        r = run_seed(seed, args.steps, full_trace=args.trace, variant=variant)
        show(r)
        results.append(r)
    failed = [r.seed for r in results if not r.ok]
    total = {k: sum(r.stats.get(k, 0) for r in results) for k in ("txns", "bootstraps")}
    print(
        f"{len(results)} seeds, {len(failed)} failed, {time.perf_counter() - started:.1f} s, "
        f"{total['txns']} txns, {total['bootstraps']} bootstraps"
        + (f"; failing seeds: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
