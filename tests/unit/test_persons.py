"""Choosing a detected person and the crop around them (shared by RemoveBackground and jobs)."""

from __future__ import annotations

import pytest

from server.vision.persons import PersonChoiceError, crop_box, select_person

# Highest score first, as the callers pass them: a small person, a big one, one inside the big one.
BOXES = [(10.0, 10.0, 30.0, 50.0), (100.0, 20.0, 300.0, 400.0), (150.0, 50.0, 200.0, 150.0)]


def test_largest_by_default() -> None:
    assert select_person(BOXES) == 1


def test_by_index() -> None:
    assert select_person(BOXES, index=0) == 0 and select_person(BOXES, index=2) == 2


@pytest.mark.parametrize("index", [3, 99, -1])
def test_index_out_of_range_says_how_many_were_found(index: int) -> None:
    with pytest.raises(PersonChoiceError) as error:
        select_person(BOXES, index=index, field="person_index")
    assert error.value.kind == "person_index_out_of_range"
    assert f"person_index is {index}" in str(error.value) and "3 person(s)" in str(error.value) and "0..2" in str(error.value)


def test_by_point_picks_the_smallest_box_containing_it() -> None:
    assert select_person(BOXES, point=(160, 60)) == 2
    assert select_person(BOXES, point=(250, 300)) == 1
    with pytest.raises(PersonChoiceError) as error:
        select_person(BOXES, point=(5, 5))
    assert error.value.kind == "no_person_at_point"


def test_nobody() -> None:
    with pytest.raises(PersonChoiceError) as error:
        select_person([])
    assert error.value.kind == "no_person_found" and "no person found" in str(error.value)


def test_crop_box_grows_by_the_margin_and_clamps() -> None:
    assert crop_box((100, 100, 200, 300), 1000, 1000, 0.1) == (90, 80, 210, 320)
    assert crop_box((5, 5, 95, 95), 100, 100, 0.15) == (0, 0, 100, 100)
    assert crop_box((10.5, 10.5, 20.2, 20.2), 100, 100, 0.0) == (10, 10, 21, 21)
