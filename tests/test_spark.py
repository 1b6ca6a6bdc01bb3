"""Sparklines of the terminal UI."""

from halo_p2p.cli.spark import sparkline


def test_sparkline_scales_and_keeps_the_tail() -> None:
    assert sparkline([0, 7]) == "▁█"
    assert sparkline([1, 2, 3, 8, 2, 1], floor=None) == "▁▂▃█▂▁"
    assert len(sparkline(list(range(100)), width=24)) == 24
    assert sparkline([3, 3], floor=None) == "▁▁"
    assert sparkline([]) == ""
