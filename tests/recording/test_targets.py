import collections
import gc

import pytest

from alignkit.recording.targets import ObjectNames


class Session:
    pass


def test_names_are_kept_per_living_object_and_handed_on_once_it_is_freed():
    names, given = ObjectNames(), collections.Counter()

    def unique(base: str) -> str:
        given[base] += 1
        return base if given[base] == 1 else f"{base}#{given[base]}"

    a, b = Session(), Session()
    assert names.name_for(a, "unet", unique) == "unet"
    assert names.name_for(b, "unet", unique) == "unet#2"  # two alive at once
    assert names.name_for(a, "unet", unique) == "unet"
    del a
    gc.collect()
    assert names.name_for(Session(), "unet", unique) == "unet"  # made again for the same model file
    assert names.name_for(Session(), "vae", unique) == "vae"
    assert given == {"unet": 2, "vae": 1}


def test_a_freed_objects_id_does_not_carry_its_name():
    names, seen = ObjectNames(), set()
    for i in range(100):
        obj = Session()
        if id(obj) in seen:
            assert names.get(obj) is None
            return
        seen.add(id(obj))
        names.add(obj, f"session{i}")
        assert names.get(obj) == f"session{i}"
        del obj
        gc.collect()
    pytest.fail("no id was reused in 100 objects")


def test_objects_without_weak_references_are_held_and_keep_their_name():
    names = ObjectNames()
    value = [1, 2]  # lists take no weak reference
    names.add(value, "engine")
    assert names.get(value) == "engine" and names.get([1, 2]) is None
