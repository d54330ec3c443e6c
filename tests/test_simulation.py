"""Deterministic simulation: a fixed set of seeds must pass, and the checker must be able to fail.

Replay any seed with ``python -m walship.shared.sim.run --seed S --steps K --trace``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from walship.consumer.merge import SequenceMerger
from walship.shared.model import Batch
from walship.shared.sim.checker import Checker, InvariantViolation
from walship.shared.sim.run import SeedResult, Variant, main, run_seed
from walship.shared.sim.world import MergerFactory, SimConfig, World

CI_SEEDS = range(300)
CI_STEPS = 2500


@pytest.fixture(scope="module")
def ci_results() -> list[SeedResult]:
    return [run_seed(seed, CI_STEPS) for seed in CI_SEEDS]


def test_fixed_seeds_pass(ci_results: list[SeedResult]) -> None:
    failed = [r for r in ci_results if not r.ok]
    assert not failed, "\n\n".join(r.report() for r in failed[:3])


def test_fixed_seeds_exercise_every_fault(ci_results: list[SeedResult]) -> None:
    """The seeds must actually reach the situations the checker is there for."""
    total: Counter[str] = Counter()
    for r in ci_results:
        total.update(r.stats)
    for kind in (
        "writer_crashes",
        "publisher_crashes",
        "reader_crashes",
        "retention_truncations",
        "bootstraps",
        "log_corruptions",
        "delivery_corruptions",
        "decode_stops",
        "rogue_batches",
        "split_brain_stops",
    ):
        assert total[kind] > 0, f"no seed exercised {kind}: {dict(total)}"
    assert total["txns"] > 30_000


def test_replay_is_exact() -> None:
    a = run_seed(7, 600, full_trace=True)
    b = run_seed(7, 600, full_trace=True)
    assert a.ok and b.ok
    assert a.trace == b.trace
    assert a.stats == b.stats


def test_without_faults_everyone_catches_up_without_bootstrap() -> None:
    for seed in range(20):
        r = run_seed(seed, 400, faults=False)
        assert r.ok, r.report()
        assert r.stats.get("bootstraps", 0) == 0
        assert r.stats.get("decode_stops", 0) == 0


# --- the checker can fail: deliberately broken mergers are caught -------------------


class SkipsGaps(SequenceMerger):
    """Gives up waiting and jumps over a gap (rule 5 broken)."""

    def take_ready(self, max_entries: int) -> tuple[list[Batch], dict[int, int]]:
        if self.waiting_for() is not None:
            earliest = self.earliest_buffered_seq()
            assert earliest is not None
            self._applied = earliest - 1
        return super().take_ready(max_entries)


class Duplicates(SequenceMerger):
    """Now and then hands out a batch again (rule 3 broken)."""

    def take_ready(self, max_entries: int) -> tuple[list[Batch], dict[int, int]]:
        batches, offsets = super().take_ready(max_entries)
        if batches and self.stats.emitted_batches % 5 == 0:
            batches = [batches[0], *batches]
        return batches, offsets


class Tampers(SequenceMerger):
    """Changes a value on the way (rule 8 broken)."""

    def take_ready(self, max_entries: int) -> tuple[list[Batch], dict[int, int]]:
        batches, offsets = super().take_ready(max_entries)
        if batches and batches[0].first_seq % 7 == 0 and batches[0].ops[0] == 0:
            values = list(batches[0].values)
            values[0] += b"!"
            batches[0] = dataclasses.replace(batches[0], values=values)
        return batches, offsets


class CommitsTooFar(SequenceMerger):
    """Commits offsets past batches still buffered (lost after a restart: rules 2/5)."""

    def take_ready(self, max_entries: int) -> tuple[list[Batch], dict[int, int]]:
        batches, _ = super().take_ready(max_entries)
        return batches, dict(self._next_offset_seen)


class IgnoresHeldParts(SequenceMerger):
    """Commits past parts the reader still holds (lost after a restart: rules 2/5)."""

    def hold(self, partition: int, offset: int | None) -> None:
        pass


@pytest.mark.parametrize(
    ("broken", "expect"),
    [
        (SkipsGaps, "(d)"),
        (Duplicates, "(d)"),
        (Tampers, "(a)"),
        (CommitsTooFar, "(c)"),
        (IgnoresHeldParts, "(c)"),
    ],
)
def test_broken_merger_is_caught(broken: MergerFactory, expect: str) -> None:
    failures = [
        r for seed in range(40) if not (r := run_seed(seed, 1000, merger_factory=broken)).ok
    ]
    assert failures, f"{broken} went unnoticed"
    first = failures[0]
    assert first.error.startswith(expect), first.error
    report = first.report()
    assert f"replay: python -m walship.shared.sim.run --seed {first.seed}" in report
    assert "last " in report and "events:" in report


def test_checker_catches_a_diverged_replica() -> None:
    world = World(SimConfig(seed=3, steps=0))
    checker = Checker()
    for _ in range(300):
        world.step()
        checker.after_step(world)
    reader = max(world.readers, key=lambda r: r.applied_seq)
    reader.applier.data[b"intruder"] = b"x"
    with pytest.raises(InvariantViolation, match=r"\(a\)"):
        checker.after_step(world)


def test_cli_runs_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seeds", "3", "--seed", "10", "--steps", "200"]) == 0
    out = capsys.readouterr().out
    assert "seed     10 ok" in out
    assert "3 seeds, 0 failed" in out


# --- issues the simulation found, replayed ---------------------------------------------


def test_rogue_message_between_parts_leaves_the_transaction_whole() -> None:
    """A second writer's batch between the parts of a split transaction used to make
    PartAssembler drop them: the reader stalled silently. Now the parts survive it,
    the reader never commits past them, and every reader ends caught up."""
    r = run_seed(26819, 3000, variant=Variant(rogue_between_parts=True))
    assert r.ok, r.report()
    assert r.stats.get("rogue_batches") == 1


def test_rogue_between_parts_seeds_pass() -> None:
    failed = [
        r
        for seed in range(150)
        if not (r := run_seed(seed, 1000, variant=Variant(rogue_between_parts=True))).ok
    ]
    assert not failed, "\n\n".join(r.report() for r in failed[:3])


def test_idle_stream_writer_snapshot_connects() -> None:
    """Seed 73 ends idle with retention past the publisher's last acked message on a
    partition (later messages there came from a crashed session). The caught-up
    publisher records the end offsets, so the final writer snapshot connects."""
    r = run_seed(73, 1000)
    assert r.ok, r.report()
    assert r.stats.get("retention_truncations", 0) > 0
