"""backend.blocks helpers."""

from pynbd.backend import Extent, extents_of_runs


def test_runs_become_merged_data_with_holes_between():
    runs = [(10, 20), (20, 30), (40, 50)]
    assert list(extents_of_runs(0, 60, runs)) == [
        Extent(0, 10, True, True), Extent(10, 20), Extent(30, 10, True, True),
        Extent(40, 10), Extent(50, 10, True, True)]


def test_no_runs_is_one_hole_and_full_runs_one_extent():
    assert list(extents_of_runs(5, 9, [])) == [Extent(5, 4, True, True)]
    assert list(extents_of_runs(0, 8, [(0, 4), (4, 8)])) == [Extent(0, 8)]
