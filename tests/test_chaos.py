"""The fault-injection run at its default size: 1,000 tasks through kills."""

from __future__ import annotations

from .chaos import Plan, run


def test_default_chaos_run_keeps_every_guarantee() -> None:
    """2 nodes, 2 kills, 1 Redis restart, 1 SIGTERM: one result per id, none pending."""
    report = run(Plan())
    print("\n".join(report.lines()))
    assert report.results == 1000
    assert report.ids_with_one_result == 1000
    assert report.pending == 0
    assert report.ids_billed_more == 0
    assert report.ids_billed_twice <= report.held_at_kills
    assert report.bad_exit_codes == []
    assert len(report.events) == 4
