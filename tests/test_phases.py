"""The one phase loop (synthct.phases.run_phases) with a recording driver: phase order, unit
numbering, a phase ended early, a resumable stop, and a finished run given more units."""

from __future__ import annotations

from typing import Any

from synthct.phases import DONE, PHASES, Next, PhasePosition, run_phases


class Recorder:
    """A driver that records every call; ``rules[(phase, index)]`` says what follows a unit
    (a ``None`` record: the stop is decided before the unit runs)."""

    def __init__(self, totals: dict[str, int], rules: dict | None = None) -> None:
        self.position = PhasePosition()
        self.totals, self.rules = totals, rules or {}
        self.calls: list[tuple] = []

    def total(self, phase: str) -> int:
        return self.totals[phase]

    def start(self, phase: str) -> None:
        self.calls.append(("start", phase))

    def unit(self, phase: str, index: int) -> tuple[dict[str, Any] | None, Next]:
        then = self.rules.get((phase, index), Next.CONTINUE)
        if then == "before":
            return None, Next.STOP
        self.calls.append(("unit", phase, index))
        return {"phase": phase, "index": index}, then

    def commit(self, phase: str, record: dict[str, Any]) -> None:
        assert (self.position.phase, self.position.unit) == (phase, record["index"])
        self.calls.append(("commit", phase, record["index"]))

    def end(self, phase: str) -> None:
        self.calls.append(("end", phase, self.position.phase, self.position.unit))


def test_phases_run_in_order_and_each_unit_is_committed():
    d = Recorder({"autoencoder": 2, "decoder": 0, "diffusion": 1})
    assert run_phases(d)
    assert d.calls == [
        ("start", "autoencoder"),
        ("unit", "autoencoder", 1),
        ("commit", "autoencoder", 1),
        ("unit", "autoencoder", 2),
        ("commit", "autoencoder", 2),
        ("end", "autoencoder", "decoder", 0),  # the position has moved on when end() runs
        ("start", "decoder"),
        ("end", "decoder", "diffusion", 0),
        ("start", "diffusion"),
        ("unit", "diffusion", 1),
        ("commit", "diffusion", 1),
        ("end", "diffusion", DONE, 1),  # at done the unit count stays
    ]
    assert PHASES == ("autoencoder", "decoder", "diffusion")


def test_a_phase_ended_early_hands_over_and_a_stop_resumes_where_it_stopped():
    d = Recorder(
        {"autoencoder": 5, "decoder": 3, "diffusion": 4},
        {("autoencoder", 2): Next.END_PHASE, ("diffusion", 2): Next.STOP},
    )
    assert not run_phases(d)
    assert d.calls[-2:] == [("unit", "diffusion", 2), ("commit", "diffusion", 2)]
    assert ("end", "autoencoder", "decoder", 0) in d.calls and (
        "unit",
        "autoencoder",
        3,
    ) not in d.calls
    assert (d.position.phase, d.position.unit) == ("diffusion", 2)
    # resume: a new driver at the saved position runs units 3-4 only
    again = Recorder({"autoencoder": 5, "decoder": 3, "diffusion": 4})
    again.position.phase, again.position.unit = "diffusion", 2
    assert run_phases(again)
    units = [c for c in again.calls if c[0] == "unit"]
    assert units == [("unit", "diffusion", 3), ("unit", "diffusion", 4)]


def test_a_stop_before_a_unit_commits_nothing_and_done_runs_extend():
    d = Recorder({"autoencoder": 0, "decoder": 0, "diffusion": 3}, {("diffusion", 1): "before"})
    assert not run_phases(d)
    assert not [c for c in d.calls if c[0] in ("unit", "commit")]
    assert (d.position.phase, d.position.unit) == ("diffusion", 0)
    done = Recorder({"autoencoder": 1, "decoder": 1, "diffusion": 5})
    done.position.phase, done.position.unit = DONE, 3  # finished at 3; the schedule says 5
    assert run_phases(done)
    assert [c for c in done.calls if c[0] == "unit"] == [
        ("unit", "diffusion", 4),
        ("unit", "diffusion", 5),
    ]
    finished = Recorder({"autoencoder": 1, "decoder": 1, "diffusion": 3})
    finished.position.phase, finished.position.unit = DONE, 3
    assert run_phases(finished) and finished.calls == []
