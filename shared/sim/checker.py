"""The invariants the simulation checks after every step and at the end.

(a) every replica's data equals the writer's state at the replica's applied seq
    (rule 8; a rogue writer's batch applied anywhere breaks this too);
(b) a replica's applied seq never decreases (bootstrap only moves it forward);
(c) at the end, after the quiescent phase, every reader not stopped by a split
    brain is healthy and holds the writer's last acknowledged seq (rule 2, 5);
(d) nothing is applied twice and the merger hands out exactly applied+1 onwards
    (rule 3; checked by the world as it applies, before the applier sees a batch);
(e) the writer's WAL is dense across restarts (rule 1);
plus: a reader stops on a split brain only if a second writer published
(rule 7), and on a DecodeError only if bytes were corrupted (rule 6).
"""

from __future__ import annotations

from walship.shared.sim.world import InvariantViolation, Snapshot, State, World

__all__ = ["Checker", "InvariantViolation", "describe_diff"]


def describe_diff(got: State, want: State, limit: int = 4) -> str:
    keys = sorted(set(got) | set(want))
    diffs = [k for k in keys if got.get(k) != want.get(k)]
    shown = ", ".join(
        f"{k!r}: replica {_short(got.get(k))} writer {_short(want.get(k))}" for k in diffs[:limit]
    )
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return f"{len(diffs)} keys differ: {shown}{more}"


def _short(v: bytes | None) -> str:
    if v is None:
        return "absent"
    return repr(v[:12] + b"..." if len(v) > 12 else v)


def _describe(snaps: list[Snapshot]) -> str:
    return ", ".join(f"{s.source} seq {s.seq} offsets {dict(s.offsets)}" for s in snaps) or "none"


class Checker:
    def __init__(self) -> None:
        self._last_applied: dict[str, int] = {}
        self._wal_checked = 0

    def after_step(self, world: World) -> None:
        self._check_wal(world)
        for r in world.readers:
            cp = r.applier.checkpoint()
            seq = cp.applied_seq
            last = self._last_applied.get(r.name, 0)
            if seq < last:
                raise InvariantViolation(
                    f"(b) reader {r.name}: applied seq went back from {last} to {seq}"
                )
            self._last_applied[r.name] = seq
            want = world.writer.states.get(seq)
            if want is None:
                raise InvariantViolation(
                    f"(a) reader {r.name}: applied seq {seq} is not a transaction boundary of "
                    f"the writer's durable WAL (last durable {world.writer.last_seq})"
                )
            if r.applier.data != want:
                raise InvariantViolation(
                    f"(a) reader {r.name} at seq {seq} differs from the writer's state there: "
                    + describe_diff(r.applier.data, want)
                )
            if r.stopped == "split_brain" and not world.rogue_published:
                raise InvariantViolation(
                    f"(7) reader {r.name} reported a split brain but no second writer "
                    f"published: {r.stop_error}"
                )
            if r.stopped == "decode" and not world.corruption_injected:
                raise InvariantViolation(
                    f"(6) reader {r.name} failed to decode uncorrupted input: {r.stop_error}"
                )
        if world.publisher.saved_seq > world.writer.last_seq:
            raise InvariantViolation(
                f"publisher saved position {world.publisher.saved_seq} beyond the durable WAL "
                f"({world.writer.last_seq})"
            )

    def _check_wal(self, world: World) -> None:
        wal = world.writer.wal
        for i in range(self._wal_checked, len(wal)):
            expected = wal[i - 1].last_seq + 1 if i else 1
            if wal[i].first_seq != expected or len(wal[i]) == 0:
                raise InvariantViolation(
                    f"(e) WAL not dense: txn {i} starts at {wal[i].first_seq}, "
                    f"expected {expected} ({len(wal[i])} entries)"
                )
        self._wal_checked = len(wal)

    def at_end(self, world: World) -> None:
        self.after_step(world)
        last = world.writer.last_seq
        if world.publisher.position != last:
            raise InvariantViolation(
                f"(c) publisher drained only through {world.publisher.position} of {last}"
            )
        for r in world.readers:
            if r.stopped == "split_brain":
                continue  # expected outcome after a second writer; (a) held all along
            if r.stopped is not None:
                raise InvariantViolation(
                    f"(c) reader {r.name} still stopped ({r.stopped}) at the end: {r.stop_error}"
                )
            if r.applied_seq != last:
                k = world.kafka
                expired = [p for p in range(k.partitions) if r.fetch_pos[p] < k.log_start[p]]
                where = (
                    f"retention deleted what it needs on partitions {expired} and no snapshot "
                    f"connects (newest: {_describe(world.snapshots[-1:])})"
                    if expired
                    else "on an intact log"
                )
                raise InvariantViolation(
                    f"(c) reader {r.name} stuck at seq {r.applied_seq} of {last} {where}: merger waiting_for={r.merger.waiting_for()} buffered="
                    f"{r.merger.buffered_batches} fetch_pos={r.fetch_pos} "
                    f"checkpoint_offsets={dict(r.applier.checkpoint().offsets)} "
                    f"log_start={k.log_start} log_end={[k.end(p) for p in range(k.partitions)]}"
                )
