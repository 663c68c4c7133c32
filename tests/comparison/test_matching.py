"""How calls and tensors of two dumps pair up, and the notes that say what could not."""

import contextlib
import json

import numpy as np
import pytest

import alignkit as ak
from alignkit.comparison.matching import NameMap, nests
from alignkit.errors import UsageError


def _record(path, count, calls=None, **options):
    """A run of one watched submodel on steps ``0 … count - 1``, one call a step or as many as
    ``calls`` says for each, every call of a step fed the same batch."""
    with ak.Recorder(path, **options) as rec:
        unet = rec.watch(lambda sample: sample * 2, "unet")
        for step in range(count):
            for _ in range(calls[step] if calls else 1):
                unet(np.full((2, 4), step, dtype=np.float32))
            ak.step()
    return path


def test_a_name_map_file_of_lines_skips_comments_and_blank_lines_and_trims_each_side(tmp_path):
    (tmp_path / "names.txt").write_text(
        "# engine names\n\nunet.input.1 = sample   # the latent # as exported\n"
        "  timesteps.1=timestep\nvae_decoder=vae.decode\n"
    )
    names = NameMap.build(path=tmp_path / "names.txt")
    assert names.entries == {"unet.input.1": "sample", "timesteps.1": "timestep", "vae_decoder": "vae.decode"}


def test_a_json_name_map_nests_tensors_under_their_submodel_and_keeps_flat_sections_flat(tmp_path):
    (tmp_path / "names.json").write_text(
        json.dumps(
            {
                "submodels": {"vae_decoder": "vae.decode"},
                "tensors": {"input.1": "sample"},
                "unet": {"timesteps.1": "timestep", "out": {"0": "output.0"}},
                "text_encoder": "clip",
                "guidance": 7,
            }
        )
    )
    names = NameMap.build(path=tmp_path / "names.json")
    assert names.entries == {
        "vae_decoder": "vae.decode",
        "input.1": "sample",
        "unet.timesteps.1": "timestep",
        "unet.out.0": "output.0",
        "text_encoder": "clip",
        "guidance": "7",
    }
    assert NameMap.build({"unet": {"timesteps.1": "timestep"}}, tmp_path / "names.json").entries[
        "unet.timesteps.1"
    ] == ("timestep")  # the entries given beside a file win over it, and nest the same way


def test_entries_given_beside_a_map_file_override_it(tmp_path):
    (tmp_path / "names.txt").write_text("a=b\nc=d\n")
    assert NameMap.build(["a=z"], tmp_path / "names.txt").entries == {"a": "z", "c": "d"}


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        ("names.json", "{", "names.json: not valid JSON (Expecting property name enclosed in double quotes, line 1)"),
        ("names.json", "\n\n[1, 2]", "names.json: the name map must be a JSON object"),
        ("names.txt", "a=b\n# fine\nno equals sign\n", "names.txt:3: expected target=reference, got 'no equals sign'"),
    ],
)
def test_a_bad_name_map_file_is_refused_in_one_line_that_says_where(tmp_path, name, text, error):
    (tmp_path / name).write_text(text)
    with pytest.raises(UsageError) as caught:
        NameMap.build(path=tmp_path / name)
    assert str(caught.value).endswith(error) and "\n" not in str(caught.value)


def test_a_name_map_file_that_cannot_be_read_says_why(tmp_path):
    with pytest.raises(UsageError, match=r"missing\.txt: cannot read the name map \(No such file or directory\)$"):
        NameMap.build(path=tmp_path / "missing.txt")


def test_an_entry_that_names_a_map_file_points_to_the_file_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "names").write_text("a=b\n")
    hint = "; a file of names is given with --map-file (map_file= in Python)"
    for item in ("names.json", "NAMES.TXT", "ports.map", "names"):  # by its suffix, or a file that is there
        with pytest.raises(UsageError) as caught:
            NameMap.build([item])
        assert str(caught.value) == f"name map entry {item!r} is not of the form target=reference{hint}"
    for item in ("oops", "=sample", "input.1=", "=names.json"):
        with pytest.raises(UsageError) as caught:
            NameMap.build([item])
        assert str(caught.value) == f"name map entry {item!r} is not of the form target=reference"


def test_a_dotted_tail_nests_only_at_a_dot():
    assert nests("added_cond_kwargs.text_embeds", "text_embeds")
    assert nests("text_embeds", "added_cond_kwargs.text_embeds")
    assert not nests("added_cond_kwargs.text_embeds", "xt_embeds")
    assert not nests("prompt_embeds", "embeds") and not nests("text_embeds", "text_embeds")


def test_steps_on_one_side_only_are_said_as_spans(tmp_path):
    ref = _record(tmp_path / "ref.h5", 3)
    one = ak.compare(ref, _record(tmp_path / "one.h5", 1))
    assert "unet: the reference has steps 0–2, the target step 0; compared the 1 shared step" in one.notes
    two = ak.compare(_record(tmp_path / "two.h5", 2), ref)
    assert "unet: the reference has steps 0–1, the target steps 0–2; compared the 2 shared steps" in two.notes


def test_the_filters_a_run_was_recorded_with_are_said_as_given_and_its_gaps_in_steps_shown(tmp_path):
    ref = _record(tmp_path / "ref.h5", 4)
    with pytest.warns(RuntimeWarning) as caught:
        tgt = _record(
            tmp_path / "tgt.h5", 4, include="un.*", steps=[3, 0, 1], tensors="sample|output.*", layers=["unet", "vae"]
        )
    assert len(caught) == 2
    result = ak.compare(ref, tgt)
    given = "include 'un.*', tensors 'sample|output.*', steps 0–1, 3, layers 'unet', 'vae'"
    assert f"the target was recorded with filters ({given})" in result.notes
    assert "unet: the reference has steps 0–3, the target steps 0–1, 3; compared the 3 shared steps" in result.notes
    assert (
        "recording the target: layers: unet ran 4 times but no layer output was recorded (the way it is watched "
        "cannot reach its layers)"
    ) in result.notes


def test_another_number_of_calls_a_step_is_said_with_both_counts_when_each_run_keeps_to_one(tmp_path):
    result = ak.compare(_record(tmp_path / "ref.h5", 1, [2]), _record(tmp_path / "tgt.h5", 1, [3]))
    assert result.notes == [
        "unet: the reference calls it 2 times a step, the target 3; calls are paired by their index within the step "
        "(the target's do not split one batch between them)"
    ]
    assert result.table["call"].tolist() == [0, 0, 1, 1] and result.aligned  # the calls both made


def test_calls_a_step_that_vary_in_one_run_are_said_so(tmp_path):
    result = ak.compare(_record(tmp_path / "ref.h5", 3), _record(tmp_path / "tgt.h5", 3, [2, 1, 1]))
    assert result.notes == [
        "unet: the two runs call it a different number of times in some steps; calls are paired by their index "
        "within the step"
    ]


def test_dumps_with_no_submodel_in_common_are_refused_with_what_each_holds(tmp_path):
    ref = _record(tmp_path / "ref.h5", 1)
    with ak.Recorder(tmp_path / "engine.h5") as rec:
        rec.watch(lambda x: x, "EngineOV")(np.ones(2))
        rec.watch(lambda x: x, "decoder")(np.ones(2))
    with ak.Recorder(tmp_path / "empty.h5"):
        pass
    with pytest.raises(UsageError) as caught:
        ak.compare(ref, tmp_path / "engine.h5")
    assert str(caught.value) == (
        f"{ref} and {tmp_path / 'engine.h5'} have no submodel in common (reference: unet; target: EngineOV, "
        "decoder); map target names with --map target=reference"
    )
    with pytest.raises(UsageError, match=r"\(reference: none; target: unet\); map target names"):
        ak.compare(tmp_path / "empty.h5", ref)
    with pytest.raises(UsageError, match=r"\(reference: EngineOV, decoder; target: none\); map target names"):
        ak.compare(tmp_path / "engine.h5", tmp_path / "empty.h5")


def test_a_reference_that_ended_early_is_said_before_the_target(tmp_path):
    def record(path, fail_at):
        with pytest.raises(RuntimeError) if fail_at is not None else contextlib.nullcontext():
            with ak.Recorder(path) as rec:
                unet = rec.watch(lambda sample: sample * 2, "unet")
                for step in range(3):
                    if step == fail_at:
                        raise RuntimeError(f"out of memory at step {step}")
                    unet(np.ones(2, np.float32))
                    ak.step()
        return path

    result = ak.compare(record(tmp_path / "ref.h5", 1), record(tmp_path / "tgt.h5", 2))
    assert result.notes[:2] == [
        "the reference ended early, with RuntimeError: out of memory at step 1",
        "the target ended early, with RuntimeError: out of memory at step 2",
    ]


def _record_engines(path, names, steps=None, calls=None):
    """A text encoder once, then each named submodel called ``calls[name]`` times (1) at each
    of ``steps[name]`` (0–2), in the order named."""
    steps, calls = steps or {}, calls or {}
    x = np.ones(4, np.float32)
    with ak.Recorder(path) as rec:
        rec.watch(lambda ids: ids * 2, "text_encoder")(x)
        watched = {name: rec.watch(lambda s: s + 1, name) for name in names}
        for step in range(4):
            for name, fn in watched.items():
                for _ in range(calls.get(name, 1) if step in steps.get(name, (0, 1, 2)) else 0):
                    fn(x)
            ak.step()
    return path


def test_submodels_under_other_names_are_mapped_in_the_order_each_run_calls_them(tmp_path):
    ref = _record_engines(tmp_path / "ref.h5", ["unet", "adapter"])
    tgt = _record_engines(tmp_path / "tgt.h5", ["Engine_b", "Engine_a"])
    result = ak.compare(ref, tgt)
    assert result.verdict == "incomplete" and result.uncompared == ["unet", "adapter"]
    assert result.suggested_map == ["Engine_b=unet", "Engine_a=adapter"]


def test_a_submodel_at_steps_the_target_ran_nothing_else_at_is_left_out_not_blind(tmp_path):
    ref = _record_engines(tmp_path / "ref.h5", ["unet", "vae.decode"], steps={"vae.decode": [2]})
    tgt = _record_engines(tmp_path / "tgt.h5", ["unet", "postprocess"], steps={"postprocess": [3]})
    result = ak.compare(ref, tgt)
    assert result.verdict == "aligned" and result.uncompared == [] and result.suggested_map == []


def test_a_blind_submodel_whose_calls_fit_no_other_is_named_without_a_map(tmp_path):
    ref = _record_engines(tmp_path / "ref.h5", ["unet", "controlnet"], calls={"controlnet": 2})
    tgt = _record_engines(tmp_path / "tgt.h5", ["unet", "Engine"])
    result = ak.compare(ref, tgt)
    assert result.verdict == "incomplete" and result.uncompared == ["controlnet"] and result.suggested_map == []
    assert result.headline().endswith("controlnet not compared: the target ran submodels of other names at their steps")


@pytest.mark.parametrize(("ref_first", "tgt_first"), [((), (2, 4)), ((2, 4), ()), (None, None)])
def test_calls_whose_first_input_has_no_batch_are_never_joined_as_a_split(tmp_path, ref_first, tgt_first):
    """A submodel fed a scalar first (or no tensor at all) on one side, once a step in the
    reference and twice in the target: nothing to split along, so paired by index."""

    def record(path, calls, shape):
        with ak.Recorder(path) as rec:
            fn = rec.watch((lambda t: t * 2) if shape is not None else (lambda: np.ones(2)), "scheduler")
            for _ in range(2):
                for _ in range(calls):
                    fn(*([np.ones(shape, np.float32)] if shape is not None else []))
                ak.step()
        return path

    result = ak.compare(record(tmp_path / "ref.h5", 1, ref_first), record(tmp_path / "tgt.h5", 2, tgt_first))
    assert not any("splits" in n for n in result.notes)
    assert any("the reference calls it 1 time a step, the target 2" in n for n in result.notes), result.notes


def test_calls_numbered_otherwise_in_a_step_are_said_to_be_on_one_side(tmp_path):
    """An imported folder whose files number a step's calls from 1 against one from 0: as many
    calls a step on each side, but some on one side only."""
    from alignkit.importing import import_dump

    for name, first in (("ref", 0), ("tgt", 1)):
        folder = tmp_path / name
        folder.mkdir()
        for step in range(2):
            for call in (first, first + 1):
                np.save(folder / f"sample-{step}-{call}.npy", np.full(3, call - first, np.float32))
        import_dump("npy-dir", folder, tmp_path / f"{name}.h5", pattern="{tensor}-{step}-{call}.npy", submodel="unet")
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    assert result.notes == ["4 calls are on one side only: the two runs number a step's calls differently"]
    assert list(result.table["call"]) == [1, 1] and result.verdict == "diverged"  # call 1 of each: other values


def _record_calls(path, calls):
    """``calls``: (submodel, input) in the order the run makes them, all at step 0."""
    with ak.Recorder(path) as rec:
        watched = {}
        for name, value in calls:
            fn = watched.setdefault(name, rec.watch(lambda input_ids: input_ids * 0.5, name))
            fn(np.array(value, np.int64))
        ak.step()
    return path


def test_every_step_group_is_re_paired_on_its_own_in_the_order_the_runs_make_them(tmp_path):
    """A lone call, a pair in order and a pair no order fixes come first; each re-paired group after them is
    said, in call order; six calls is still few enough to re-pair, beside a batch split."""
    six = [[i, i, i] for i in range(6)]
    ref = [("image_encoder", [9]), ("clip", [5]), ("clip", [6]), ("controlnet", [1]), ("controlnet", [2])]
    ref += [("vision", [3]), ("vision", [4])] + [("text", ids) for ids in six] + [("unet", [[1, 2], [3, 4]])]
    tgt = [("image_encoder", [9]), ("clip", [5]), ("clip", [6]), ("controlnet", [2]), ("controlnet", [7])]
    tgt += [("vision", [4]), ("vision", [3])] + [("text", ids) for ids in six[1:] + six[:1]]
    tgt += [("unet", [[1, 2]]), ("unet", [[3, 4]])]
    result = ak.compare(_record_calls(tmp_path / "ref.h5", ref), _record_calls(tmp_path / "tgt.h5", tgt))
    assert result.notes == [
        "unet: the target splits each call into 2 along the batch (as classifier-free guidance at batch 1 does); "
        "compared with the reference's call as one, concatenated",
        "vision step 0: the target makes these calls in another order; paired by their inputs (the reference's "
        "call 0 with 1, 1 with 0 of the target's)",
        "text step 0: the target makes these calls in another order; paired by their inputs (the reference's "
        "call 0 with 5, 1 with 0, 2 with 1, 3 with 2, 4 with 3, 5 with 4 of the target's)",
    ]
    fd = result.first_divergence
    assert (fd.submodel, fd.call, fd.kind) == ("controlnet", 0, "input mismatch")  # left by index
    assert result.uncompared == []  # the submodels beside the split are compared, not blind
    paired = result.table[result.table["submodel"] != "controlnet"]
    assert (paired["status"] == "ok").all()
    assert paired.groupby("submodel").size().to_dict() == {
        "image_encoder": 2,
        "clip": 4,
        "vision": 4,
        "text": 12,
        "unet": 2,
    }


def _record_outputs(path, outputs, name="controlnet"):
    """One call that returns ``outputs`` (a dict by name, or a list), fed one input."""
    with ak.Recorder(path) as rec:
        rec.watch(lambda sample: outputs, name)(np.ones(2, np.float32))
    return path


def test_a_dotted_tail_pairs_each_tensor_once_and_leaves_nothing_on_one_side(tmp_path):
    """diffusers nests SDXL's extra inputs; an export names them by the tail."""
    rng = np.random.default_rng(0)
    embeds, ids = rng.standard_normal((2, 32)).astype(np.float32), np.ones((2, 6), np.float32)
    with ak.Recorder(tmp_path / "ref.h5") as rec:
        unet = rec.watch(lambda sample, added_cond_kwargs: sample * 2, "unet")
        unet(np.ones(3, np.float32), added_cond_kwargs={"text_embeds": embeds, "time_ids": ids})
    with ak.Recorder(tmp_path / "tgt.h5") as rec:
        rec.watch(lambda sample, text_embeds, time_ids: sample * 2, "unet")(np.ones(3, np.float32), embeds, ids)
    table = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5").table
    inputs = table[table["io"] == "inputs"].set_index("tensor")
    assert inputs["matched_by"].to_dict() == {
        "sample": "name",
        "added_cond_kwargs.text_embeds": "suffix",
        "added_cond_kwargs.time_ids": "suffix",
    }
    assert (table["status"] == "ok").all()


def test_names_that_collide_pair_by_name_when_the_two_sides_hold_other_counts(tmp_path):
    """Structure pairs only tensors as many on each side; with one fewer, a name that pairs
    two shapes is a shape difference."""
    a, b = np.ones(2, np.float32), np.ones(3, np.float32)
    ref = _record_outputs(tmp_path / "ref.h5", {"skip": a, "out": b})
    tgt = _record_outputs(tmp_path / "tgt.h5", {"out": a})
    outputs = ak.compare(ref, tgt).table.query("io == 'outputs'").set_index("tensor")
    assert outputs["matched_by"].to_dict() == {"skip": "one side", "out": "name"}
    assert outputs["status"].to_dict() == {"skip": "ref only", "out": "shape"}


def test_a_map_entry_for_the_submodels_tensor_decides_over_structure(tmp_path):
    a, b = np.ones(2, np.float32), np.full(3, 2, np.float32)
    ref = _record_outputs(tmp_path / "ref.h5", {"x": a, "y": b})
    tgt = _record_outputs(tmp_path / "tgt.h5", {"y": a, "x": b})  # by structure, x ↔ y
    assert set(ak.compare(ref, tgt).table.query("io == 'outputs'")["matched_by"]) == {"structure"}
    mapped = ak.compare(ref, tgt, name_map=["controlnet.y=x"]).table.query("io == 'outputs'").set_index("tensor")
    assert mapped["matched_by"].to_dict() == {"x": "map", "y": "position"}


def test_a_calls_tensors_are_listed_in_the_references_order_and_the_targets_own_last(tmp_path):
    a, b, c = np.ones(2, np.float32), np.full(3, 2, np.float32), np.zeros(4, np.float32)
    ref = _record_outputs(tmp_path / "ref.h5", {"x": a, "y": b})
    tgt = _record_outputs(tmp_path / "tgt.h5", {"extra": c, "y": b, "x": a})
    outputs = ak.compare(ref, tgt).table.query("io == 'outputs'")
    assert list(outputs["tgt_tensor"]) == ["x", "y", "extra"]
    assert list(outputs["matched_by"]) == ["name", "name", "one side"]
    assert list(outputs["status"]) == ["ok", "ok", "tgt only"]
