from alignkit.phrasing import count, ranges


def test_steps_read_as_runs_of_consecutive_ones():
    assert ranges([7, 0, 1, 2, 3, 9, 10, 3]) == "0–3, 7, 9–10"
    assert ranges([4]) == "4" and ranges([]) == ""


def test_a_count_is_plural_where_english_wants_it():
    assert (count(1, "step"), count(0, "step"), count(3, "call")) == ("1 step", "0 steps", "3 calls")
