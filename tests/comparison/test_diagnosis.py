"""Planted bugs on the tiny real diffusers pipeline are found and classified."""

import contextlib
import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

import alignkit as ak
from alignkit.comparison.result import growth_text
from alignkit.errors import UsageError


def _kinds(result):
    """Each compared call's kind, by (submodel, step)."""
    return dict(zip(zip(result.calls["submodel"], result.calls["step"]), result.calls["kind"]))


def test_truncated_timestep_is_an_input_mismatch_with_growing_drift(demo_dumps):
    result = ak.compare(*demo_dumps["timestep"])
    fd = result.first_divergence
    assert result.verdict == "diverged" and result.exit_code == 1
    assert (fd.submodel, fd.step, fd.io, fd.tensor, fd.kind) == ("unet", 1, "inputs", "timestep", "input mismatch")
    assert fd.evidence["ref_value"] != fd.evidence["tgt_value"]
    assert fd.message.startswith("unet step 1: input mismatch — `timestep`: reference float32 ")
    assert "reference float32" in fd.message and "target float32" in fd.message
    kinds = _kinds(result)
    assert kinds["unet", 0] == "" and kinds["scheduler", 1] == "propagated"
    assert result.growth["submodel"] == "scheduler" and result.growth["steps"][0] == 1
    assert result.growth["l1"][-1] > 2 * result.growth["l1"][0]  # the drift accumulates
    assert result.tolerance["rel_l1_max"] > 1e-3


def test_another_seed_is_named_as_different_starting_noise(tmp_path):
    from alignkit.demo.pipeline import generate, tiny_pipeline

    pipe = tiny_pipeline()
    for seed in (0, 1):
        with ak.record(tmp_path / f"seed{seed}.h5", pipe):
            generate(pipe, 2, seed=seed, size=32)
    fd = ak.compare(tmp_path / "seed0.h5", tmp_path / "seed1.h5").first_divergence
    assert (fd.submodel, fd.step, fd.tensor, fd.kind) == ("unet", 0, "sample", "input mismatch")
    assert (
        "uncorrelated but alike in size, as two draws of random noise are: the runs start from different noise"
        in fd.message
    )
    assert abs(fd.evidence["cos"]) < 0.1
    assert fd.message.startswith("unet step 0: input mismatch — `sample` differs: rel_l1 ")
    assert (
        "the runs start from different noise (another seed or generator, or noise drawn on another device or in "
        "another dtype); "
    ) in fd.message


def test_a_noise_like_difference_under_the_same_seed_is_a_glue_bug(tmp_path):
    """Both runs are given seed 0, but the target's glue draws the latents from a generator of
    its own: no other seed, but other noise fed in."""
    from alignkit.demo.pipeline import generate, tiny_pipeline

    pipe = tiny_pipeline()
    with ak.record(tmp_path / "ref.h5", pipe):
        generate(pipe, 2, seed=0, size=32)
    prepare = pipe.prepare_latents
    pipe.prepare_latents = lambda *args, **kwargs: prepare(*args[:-2], torch.Generator().manual_seed(1), None)
    with ak.record(tmp_path / "tgt.h5", pipe):
        generate(pipe, 2, seed=0, size=32)
    fd = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5").first_divergence
    assert (fd.submodel, fd.step, fd.tensor, fd.kind) == ("unet", 0, "sample", "input mismatch")
    assert "yet both runs were given the same seed (seed=0): not other starting noise but glue that feeds unet" in (
        fd.message
    )
    assert "different noise" not in fd.message
    assert fd.message.startswith("unet step 0: input mismatch — `sample` differs: rel_l1 ")
    assert fd.message.endswith("(an inverted mask, another tensor, noise drawn again)")


def test_perturbed_weights_are_a_local_error_at_step_0(demo_dumps):
    result = ak.compare(*demo_dumps["weights"])
    fd = result.first_divergence
    assert (fd.submodel, fd.step, fd.io, fd.kind) == ("unet", 0, "outputs", "local error")
    assert fd.message.startswith("unet step 0: local error — the inputs match but output `")
    inputs = result.table[(result.table["seq"] == fd.seq) & (result.table["io"] == "inputs")]
    assert (inputs["status"] == "ok").all()
    kinds = _kinds(result)
    assert kinds["scheduler", 0] == "propagated"  # fed by the UNet's error: not the glue's fault


def test_int64_vs_float32_timestep_with_equal_values_is_aligned_with_a_warning(demo_dumps):
    result = ak.compare(*demo_dumps["timestep-dtype"])
    assert result.verdict == "aligned" and result.first_divergence is None
    assert any("`timestep`: reference float32, target int64 (values equal)" in w for w in result.warnings)


def test_identical_rerun_is_aligned(demo_dumps):
    result = ak.compare(*demo_dumps["none"])
    assert result.verdict == "aligned" and result.exit_code == 0
    assert set(ak.compare(*demo_dumps["none"], submodels=["unet"]).table["submodel"]) == {"unet"}
    with pytest.raises(
        UsageError, match=r"submodels 'unett': not in both dumps \(in both: text_encoder, unet, scheduler, vae.decode\)"
    ):
        ak.compare(*demo_dumps["none"], submodels=["unett"])  # not an empty "aligned"
    assert (result.table["status"] == "ok").all()
    assert (result.table["cos"] == 1.0).all()


def test_outputs_are_views_of_one_table(demo_dumps, tmp_path):
    import json

    import pandas as pd

    result = ak.compare(*demo_dumps["timestep"])
    result.to_csv(tmp_path / "t.csv")
    assert len(pd.read_csv(tmp_path / "t.csv")) == len(result.table)
    data = json.loads(result.to_json(tmp_path / "t.json"))
    assert data["first_divergence"]["tensor"] == "timestep" and len(data["table"]) == len(result.table)
    assert "input mismatch" in result.summary()


class Unet(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, sample, timestep, encoder_hidden_states):
        return (self.lin(sample) * timestep + encoder_hidden_states.sum(),)


class EngineOV:
    def __init__(self, net):
        self.net = net

    def __call__(self, args):
        with torch.no_grad():
            x, t, e = (torch.from_numpy(args[k]) for k in ("input.1", "timesteps.1", "input0.1"))
            return self.net(x, t, e)[0].numpy()


def _record_pair(tmp_path, engine_feed):
    net = Unet()
    x, t, e = torch.randn(2, 4), torch.tensor(3), torch.randn(2, 3)
    with ak.Recorder(tmp_path / "ref.h5") as rec:
        rec.watch(net, "unet")
        with torch.no_grad():
            net(x, t, e)
    engine = EngineOV(net)
    with ak.Recorder(tmp_path / "tgt.h5") as rec:
        rec.watch(engine, "unet")
        engine(engine_feed(x.numpy(), t.numpy(), e.numpy()))
    return tmp_path / "ref.h5", tmp_path / "tgt.h5"


def test_engine_names_are_mapped_to_the_reference(tmp_path):
    ref, tgt = _record_pair(tmp_path, lambda x, t, e: {"input.1": x, "timesteps.1": t, "input0.1": e})
    names = {
        "unet.input.1": "sample",
        "timesteps.1": "timestep",
        "input0.1": "encoder_hidden_states",
        "output": "output.0",
    }
    result = ak.compare(ref, tgt, name_map=names)
    assert result.verdict == "aligned"
    assert set(result.table["matched_by"]) == {"map"}
    with pytest.raises(UsageError, match="'nothing' matches no submodel or tensor"):
        ak.compare(ref, tgt, name_map={**names, "nothing": "x"})


def test_position_fallback_when_names_differ_but_shapes_agree(tmp_path):
    ref, tgt = _record_pair(tmp_path, lambda x, t, e: {"input.1": x, "timesteps.1": t, "input0.1": e})
    result = ak.compare(ref, tgt)
    assert set(result.table["matched_by"]) == {"position"}
    assert result.verdict == "aligned"


def test_nested_names_pair_with_an_exports_flat_names_in_any_order(tmp_path):
    def unet(sample, timestep, added_cond_kwargs=None, return_dict=True):
        return sample * 2

    rng = np.random.default_rng(0)
    sample, text_embeds = (
        rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
        rng.standard_normal((2, 32), dtype=np.float32),
    )
    time_ids = np.tile(np.float32([64, 64, 0, 0, 64, 64]), (2, 1))
    with ak.Recorder(tmp_path / "ref.h5") as rec:  # SDXL: diffusers nests the extra inputs
        rec.watch(unet, "unet")(
            sample, np.float32(999), added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}
        )
    with ak.Recorder(tmp_path / "tgt.h5") as rec:  # the export takes them flat, in its own order
        rec.watch(lambda feed: {"out_sample": feed["sample"] * 2}, "unet")(
            {"time_ids": time_ids, "sample": sample, "timestep": np.float32(999), "text_embeds": text_embeds * 1.5}
        )
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    inputs = result.table[result.table["io"] == "inputs"].set_index("tensor")
    assert inputs.loc["added_cond_kwargs.time_ids", ["tgt_tensor", "matched_by", "status"]].tolist() == [
        "time_ids",
        "suffix",
        "ok",
    ]
    assert inputs.loc["added_cond_kwargs.text_embeds", ["tgt_tensor", "matched_by", "status"]].tolist() == [
        "text_embeds",
        "suffix",
        "mismatch",
    ]
    first = result.first_divergence
    assert (first.tensor, first.kind) == ("added_cond_kwargs.text_embeds", "input mismatch")


def test_a_dotted_tail_with_two_candidates_is_left_to_position(tmp_path):
    with ak.Recorder(tmp_path / "ref.h5") as rec:
        rec.watch(lambda a, b: None, "net")({"x": np.zeros(2)}, {"x": np.ones(2)})
    with ak.Recorder(tmp_path / "tgt.h5") as rec:
        rec.watch(lambda x, y: None, "net")(np.zeros(2), np.ones(2))
    table = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5").table
    assert table[["tensor", "tgt_tensor", "matched_by"]].values.tolist() == [
        ["a.x", "x", "position"],
        ["b.x", "y", "position"],
    ]


def _record_attention(tmp_path, feed):
    """A reference function of (query, key) and an engine fed a dict with compiler-made names."""
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal((4, 8)).astype(np.float32)
    with ak.Recorder(tmp_path / "ref.h5") as rec:
        rec.watch(lambda query, key: query @ key.T, "attn")(q, k)
    with ak.Recorder(tmp_path / "tgt.h5") as rec:
        rec.watch(lambda args: args["q.1"] @ args["k.1"].T, "attn")(feed(q, k))
    return tmp_path / "ref.h5", tmp_path / "tgt.h5"


def test_position_matched_tensors_in_the_other_order_are_said_to_be_swapped(tmp_path):
    ref, tgt = _record_attention(tmp_path, lambda q, k: {"k.1": k, "q.1": q})  # the engine records k first
    result = ak.compare(ref, tgt)
    inputs = result.table[result.table["io"] == "inputs"].set_index("tensor")
    assert list(inputs["matched_by"]) == ["position", "position"]
    assert dict(inputs["swapped_with"]) == {"query": "key", "key": "query"}
    assert result.first_divergence.kind == "input mismatch"
    assert "holds the reference's `key`" in result.first_divergence.message
    assert result.first_divergence.message.startswith("attn step 0: input mismatch — `query` differs: ")
    assert (
        result.growth_text() == "none — every output from there on matches exactly (L1 0)"
    )  # the engine computes right
    [warning] = [w for w in result.warnings if "hold each other's values" in w]
    assert "target `k.1` and `q.1`, matched by position to `query` and `key`" in warning
    assert "(--map k.1=key --map q.1=query)" in warning
    html = result.to_html(tmp_path / "r.html").read_text()
    assert "<th>tgt_tensor</th>" in html and "<th>swapped_with</th>" in html  # the report's call table shows both
    assert ak.compare(ref, tgt, name_map=["k.1=key", "q.1=query"]).verdict == "aligned"  # the advice works


def test_a_position_matched_mismatch_that_is_no_swap_is_not_called_one(tmp_path):
    ref, tgt = _record_attention(tmp_path, lambda q, k: {"k.1": k * 1.5, "q.1": q})
    result = ak.compare(ref, tgt)
    assert result.table["swapped_with"].isna().all()
    assert not any("hold each other's values" in w for w in result.warnings)
    assert "swapped" not in result.first_divergence.message


def _record_timesteps(path, timesteps, as_engine):
    """A UNet-like callee fed a scalar float timestep (diffusers) or, like the engine of
    seed 001, the timestep tiled to the batch as int64 (``np.tile(t, batch)``)."""
    x = np.ones((2, 4), np.float32)
    with ak.Recorder(path) as rec:
        unet = rec.watch(lambda sample, timestep: sample * 2, "unet")
        for t in timesteps:
            unet(x, np.tile(np.array(t), 2).astype(np.int64) if as_engine else torch.tensor(t))
            ak.step()
    return path


def test_a_scalar_timestep_against_one_tiled_to_the_batch_compares_value_by_value(tmp_path):
    ref = _record_timesteps(tmp_path / "ref.h5", [999.0, 979.0], as_engine=False)
    fixed = _record_timesteps(tmp_path / "fixed.h5", [999.0, 979.0], as_engine=True)
    result = ak.compare(ref, fixed)
    assert result.verdict == "aligned"
    timestep = result.table[result.table["tensor"] == "timestep"]
    assert list(timestep["broadcast"]) == [True, True] and list(timestep["status"]) == ["ok", "ok"]
    assert (
        "unet input `timestep`: reference shape [], target [2]: one value compared with each of the other's at 2 "
        "steps (the values agree)" in result.warnings
    )

    truncated = _record_timesteps(tmp_path / "truncated.h5", [999.5, 979.5], as_engine=True)
    fd = ak.compare(
        _record_timesteps(tmp_path / "ref2.h5", [999.5, 979.5], as_engine=False), truncated
    ).first_divergence
    assert (fd.step, fd.tensor, fd.kind) == (0, "timestep", "input mismatch")
    assert "reference float32 999.5, target int64 [999, 999]" in fd.message


def test_one_value_against_many_is_a_shape_difference_beyond_small_inputs(tmp_path):
    for path, n in ((tmp_path / "ref.h5", 1), (tmp_path / "tgt.h5", 100)):
        with ak.Recorder(path) as rec:
            rec.watch(lambda x: x, "f")(np.ones(n, np.float32))
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    assert list(result.table["status"]) == ["shape", "shape"] and not result.table["broadcast"].any()


def _record_unet_calls(path, batches_per_step, steps=3):
    with ak.Recorder(path) as rec:
        unet = rec.watch(lambda sample, timestep: sample * 2, "unet")
        for step in range(steps):
            for batch in batches_per_step(step):
                unet(batch, torch.tensor(999.0 - step))
            ak.step()
    return path


def test_a_batch_split_into_calls_is_compared_joined_again(tmp_path):
    """Classifier-free guidance at batch 2 in the reference, as two batch-1 calls a step in a
    port with a static batch of 1."""
    x = np.random.default_rng(4).standard_normal((2, 4)).astype(np.float32)
    ref = _record_unet_calls(tmp_path / "ref.h5", lambda step: [x])
    split = _record_unet_calls(tmp_path / "split.h5", lambda step: [x[:1], x[1:]])
    result = ak.compare(ref, split)
    assert result.verdict == "aligned", result.summary()
    assert result.notes == [
        "unet: the target splits each call into 2 along the batch (as classifier-free guidance at batch 1 does); "
        "compared with the reference's call as one, concatenated"
    ]
    sample = result.table[result.table["tensor"] == "sample"]
    assert list(sample["tgt_shape"]) == ["[2,4]"] * 3 and (sample["status"] == "ok").all()

    cond_first = _record_unet_calls(tmp_path / "cond_first.h5", lambda step: [x[1:], x[:1]])  # the other order
    assert ak.compare(ref, cond_first).verdict == "aligned"

    wrong_half = _record_unet_calls(tmp_path / "wrong.h5", lambda step: [x[:1], x[1:] * (1.5 if step == 2 else 1)])
    fd = ak.compare(ref, wrong_half).first_divergence
    assert (fd.submodel, fd.step, fd.tensor, fd.kind) == ("unet", 2, "sample", "input mismatch")


def test_a_batch_split_is_joined_on_the_steps_both_runs_have(tmp_path):
    """A port killed after two steps, or recorded at some steps only, still splits the calls it made."""
    x = np.random.default_rng(4).standard_normal((2, 4)).astype(np.float32)
    ref = _record_unet_calls(tmp_path / "ref.h5", lambda step: [x])
    cut = _record_unet_calls(tmp_path / "cut.h5", lambda step: [x[:1], x[1:]], steps=2)
    result = ak.compare(ref, cut)
    assert result.verdict == "aligned", result.summary()
    assert result.notes[0].startswith("unet: the target splits each call into 2 along the batch")
    assert "unet: the reference has steps 0–2, the target steps 0–1; compared the 2 shared steps" in result.notes
    assert set(result.table["tgt_shape"]) == {"[2,4]", "[2]"} and (result.table["status"] == "ok").all()


def test_a_reference_that_calls_twice_a_step_is_no_batch_the_target_splits(tmp_path):
    """Two calls at batch 2 a step against two at batch 1: paired by index, never joined."""
    x = np.ones((2, 4), np.float32)
    ref = _record_unet_calls(tmp_path / "ref.h5", lambda step: [x, x])
    halves = _record_unet_calls(tmp_path / "halves.h5", lambda step: [x[:1], x[1:]])
    result = ak.compare(ref, halves)
    assert not any("splits" in n for n in result.notes)
    sample = result.table[result.table["tensor"] == "sample"]
    assert list(sample["call"]) == [0, 1] * 3 and set(sample["tgt_shape"]) == {"[1,4]"}


def test_two_submodels_split_along_the_batch_are_each_joined_again(tmp_path):
    """A port that runs both the text encoder and the UNet at batch 1 (prompt and negative
    prompt as two calls each): joining the second must keep the first joined."""
    rng = np.random.default_rng(5)
    ids, x = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((2, 4)).astype(np.float32)

    def record(path, split):
        with ak.Recorder(path) as rec:
            encoder = rec.watch(lambda input_ids: input_ids * 3, "text_encoder")
            unet = rec.watch(lambda sample, timestep: sample * 2, "unet")
            for batch in [ids[:1], ids[1:]] if split else [ids]:
                encoder(batch)
            for step in range(2):
                ak.step()
                for batch in [x[:1], x[1:]] if split else [x]:
                    unet(batch, torch.tensor(999.0 - step))
        return path

    result = ak.compare(record(tmp_path / "ref.h5", False), record(tmp_path / "split.h5", True))
    assert result.verdict == "aligned", result.summary()
    assert len(result.notes) == 2 and all("splits each call into 2" in n for n in result.notes)
    assert set(result.table.loc[result.table["io"] == "outputs", "tgt_shape"]) == {"[2,3]", "[2,4]"}


def test_calls_that_do_not_split_the_batch_are_paired_by_index_and_said(tmp_path):
    x = np.ones((2, 4), np.float32)
    ref = _record_unet_calls(tmp_path / "ref.h5", lambda step: [x])
    twice = _record_unet_calls(tmp_path / "twice.h5", lambda step: [x, x])  # the whole batch twice: no split
    result = ak.compare(ref, twice)
    assert result.notes == [
        "unet: the reference calls it 1 time a step, the target 2; calls are paired by their index within the step "
        "(the target's do not split one batch between them)"
    ]
    assert (
        result.verdict == "aligned" and (result.table["status"] == "ok").all()
    )  # call 0 with call 0; call 1 on one side


def _record_with_vae_named(tmp_path, ref_vae, tgt_vae):
    x = np.ones((2, 4), np.float32)
    for path, vae in ((tmp_path / "ref.h5", ref_vae), (tmp_path / "tgt.h5", tgt_vae)):
        with ak.Recorder(path) as rec:
            unet, decode = rec.watch(lambda sample: sample, "unet"), rec.watch(lambda z: z, vae)
            unet(x)
            ak.step()
            decode(x)
    return tmp_path / "ref.h5", tmp_path / "tgt.h5"


def test_a_submodel_under_another_name_is_pointed_out_with_the_map_that_pairs_it(tmp_path):
    ref, tgt = _record_with_vae_named(tmp_path, "vae.decode", "decoder")
    result = ak.compare(ref, tgt)
    assert result.notes == [
        "vae.decode: only in the reference (1 step); not compared",
        "decoder: only in the target (1 step); not compared",
        "decoder looks like the target's name for vae.decode (the same steps): compare them with --map "
        "decoder=vae.decode",
    ]
    assert set(ak.compare(ref, tgt, name_map=["decoder=vae.decode"]).table["submodel"]) == {"unet", "vae.decode"}


@pytest.mark.parametrize("ref_vae, tgt_vae", [("vae.decode", "vae_decoder"), ("vae_encoder", "vae.encode")])
def test_the_vae_halves_of_an_onnx_export_pair_with_a_torch_pipelines(tmp_path, ref_vae, tgt_vae):
    """diffusers' ONNX layout (``vae_decoder/model.onnx``) against the torch VAE's methods, either way round."""
    ref, tgt = _record_with_vae_named(tmp_path, ref_vae, tgt_vae)
    result = ak.compare(ref, tgt)
    assert set(result.table["submodel"]) == {"unet", ref_vae} and result.verdict == "aligned"
    assert result.notes == [
        f"{tgt_vae} (target) is compared with {ref_vae} (reference): the names diffusers' ONNX export "
        "and a torch pipeline give the same VAE half"
    ]
    mapped = ak.compare(ref, tgt, name_map=[f"{tgt_vae}=unet"])  # a map entry of its own wins
    assert f"{ref_vae}: only in the reference (1 step); not compared" in mapped.notes


def test_a_dtype_downcast_target_within_the_noise_floor_is_precision_not_divergence(tmp_path):
    r = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    for path, value in (
        (tmp_path / "ref.h5", torch.from_numpy(r)),
        (tmp_path / "tgt.h5", torch.from_numpy(r).to(torch.bfloat16)),
    ):
        with ak.Recorder(path) as rec:
            rec.watch(lambda x: x, "layer")(value)
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    outputs = result.table[result.table["io"] == "outputs"]
    assert list(outputs["status"]) == ["precision"]
    assert 0.9 < float(outputs["floor_ratio"].iloc[0]) < 1.1
    assert result.verdict == "aligned"


def test_a_tensor_larger_than_a_block_is_streamed_to_the_same_metrics(tmp_path):
    from alignkit.comparison.metrics import BLOCK_ELEMENTS, array_metrics

    r = np.random.default_rng(2).standard_normal((3, BLOCK_ELEMENTS)).astype(np.float32)
    t = torch.from_numpy(r * 1.001).to(torch.bfloat16)
    for path, value in ((tmp_path / "ref.h5", torch.from_numpy(r)), (tmp_path / "tgt.h5", t)):
        with ak.Recorder(path) as rec:
            rec.watch(lambda x: x, "layer")(value)
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    row = result.table[result.table["io"] == "outputs"].iloc[0]
    want = array_metrics(r, t.float().numpy(), "bfloat16")
    for key in ("l1", "rel_l1", "max_abs", "cos", "rmse", "floor_rel_l1", "floor_cos_dist"):
        assert row[key] == pytest.approx(want[key], rel=1e-9), key
    assert row["ref_dtype"] == "float32" and row["tgt_dtype"] == "bfloat16"
    assert row["status"] == "precision"  # bf16 rounding, measured against its floor on the streamed path too
    with ak.open_dump(tmp_path / "tgt.h5") as dump:
        info = dump.tensors.iloc[-1]
        assert dump.dataset(info.path).dtype == np.uint16  # the stored bits, streamed by compare


def test_dumps_with_different_step_counts_compare_the_shared_steps(tmp_path):
    net = Unet()
    for path, steps in ((tmp_path / "ref.h5", 5), (tmp_path / "tgt.h5", 3)):
        x = torch.ones(2, 4)
        with ak.Recorder(path) as rec, torch.no_grad():
            rec.watch(net, "unet")
            for _ in range(steps):
                x = net(x, torch.tensor(1), torch.zeros(2, 3))[0]
                ak.step()
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    assert result.verdict == "aligned"
    assert sorted(set(result.table["step"])) == [0, 1, 2]
    assert any("reference has steps 0–4, the target steps 0–2; compared the 3 shared steps" in n for n in result.notes)


def test_a_bf16_computation_is_precision_loss_not_a_divergence(tmp_path):
    """A layer computed in bf16 errs a few times the floor of storing its output in bf16."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256))
    x = torch.randn(16, 256)
    for path, model, value in (
        (tmp_path / "ref.h5", layer, x),
        (tmp_path / "tgt.h5", copy.deepcopy(layer).to(torch.bfloat16), x.to(torch.bfloat16)),
    ):
        with ak.Recorder(path) as rec, torch.no_grad():
            rec.watch(model, "mlp")
            model(value)
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    assert result.verdict == "aligned", result.summary()
    assert set(result.table["status"]) == {"precision"}
    ratio = result.table.set_index("io")["floor_ratio"]
    assert ratio["inputs"] == pytest.approx(1.0)  # the input is only rounded to bf16
    assert ratio["outputs"] > 1.5  # computing in bf16 is worse than rounding alone, and still expected


def _record_prompts(path, prompts):
    with ak.Recorder(path) as rec:
        encode = rec.watch(lambda input_ids: input_ids * 0.5, "text_encoder")
        for ids in prompts:
            encode(np.array(ids, np.int64))
        ak.step()  # both calls belong to step 0


def test_calls_of_a_step_made_in_another_order_are_paired_by_their_inputs(tmp_path):
    prompt, negative = [[5, 6, 7]], [[1, 1, 1]]
    _record_prompts(tmp_path / "ref.h5", [prompt, negative])
    _record_prompts(tmp_path / "tgt.h5", [negative, prompt])  # the negative prompt encoded first
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    assert result.verdict == "aligned" and (result.table["status"] == "ok").all()
    assert result.notes == [
        "text_encoder step 0: the target makes these calls in another order; paired by their inputs "
        "(the reference's call 0 with 1, 1 with 0 of the target's)"
    ]
    _record_prompts(tmp_path / "bug.h5", [negative, [[5, 6, 8]]])  # no order makes every pair agree: left by index
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "bug.h5")
    assert result.verdict == "diverged" and not result.notes
    assert (result.first_divergence.call, result.first_divergence.kind) == (0, "input mismatch")


def test_an_input_mismatch_in_a_lower_precision_says_how_far_past_its_noise_floor(tmp_path):
    """Classifier-free guidance in bf16: each UNet half is within bf16's noise floor, and the
    guided noise the scheduler gets is far past it, as the guidance scale amplifies rounding."""
    rng = np.random.default_rng(0)
    uncond, text = rng.standard_normal((2, 4096)).astype(np.float32)
    text = uncond * (1 - 1 / 7.5) + 0.05 * text  # halves whose guided difference is small beside each
    for path, dtype in ((tmp_path / "ref.h5", torch.float32), (tmp_path / "tgt.h5", torch.bfloat16)):
        with ak.Recorder(path) as rec:
            unet = rec.watch(lambda sample: torch.from_numpy(np.stack([uncond, text])).to(dtype), "unet")
            step = rec.watch(lambda model_output: model_output, "scheduler")
            u, t = unet(torch.zeros(2, dtype=dtype))
            step(u + 7.5 * (t - u))
            ak.step()
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    fd = result.first_divergence
    assert (fd.submodel, fd.kind, fd.tensor) == ("scheduler", "input mismatch", "model_output")
    assert fd.evidence["floor_ratio"] > 10
    assert f"{fd.evidence['floor_ratio']:.3g}× the noise floor of bfloat16" in fd.message
    assert fd.message.startswith(
        "scheduler step 0: input mismatch — `model_output` differs (float32 vs bfloat16): rel_l1 "
    )
    assert ", although every earlier call matched; the glue code that feeds scheduler differs, or computes in" in (
        fd.message
    )
    assert fd.message.endswith(
        "or computes in bfloat16 what the reference computes in float32 and amplifies its rounding "
        "(as classifier-free guidance does, by about its guidance scale)"
    )
    same_dtype = ak.compare(*_record_timestep_bug(tmp_path)).first_divergence
    assert "noise floor" not in same_dtype.message and "amplifies" not in same_dtype.message


def _record_timestep_bug(tmp_path):
    for path, t in ((tmp_path / "a.h5", 999.5), (tmp_path / "b.h5", 999.0)):
        with ak.Recorder(path) as rec:
            rec.watch(lambda sample, timestep: sample, "unet")(np.ones(4, np.float32), np.float32(t))
    return tmp_path / "a.h5", tmp_path / "b.h5"


def _record_engine(path, raises):
    def engine(input_ids):
        if raises:
            raise ValueError("Unexpected input data type. Actual: (tensor(int32)), expected: (tensor(int64))")
        return input_ids * 2.0

    with ak.Recorder(path) as rec:
        watched = rec.watch(engine, "text_encoder")
        try:
            watched(np.arange(4, dtype=np.int32 if raises else np.int64))  # what diffusers' ONNX pipeline feeds
        except ValueError:
            pass


def test_a_call_that_raises_on_one_side_only_is_the_divergence(tmp_path):
    _record_engine(tmp_path / "ref.h5", raises=False)
    _record_engine(tmp_path / "tgt.h5", raises=True)
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    fd = result.first_divergence
    assert result.verdict == "diverged" and (fd.submodel, fd.kind, fd.tensor) == ("text_encoder", "raised", "")
    assert fd.message == (
        "text_encoder step 0: raised — the target raised ValueError: Unexpected input data type. Actual: "
        "(tensor(int32)), "
        "expected: (tensor(int64)), where the reference returned, from matching inputs "
        "(equal values, but `input_ids` is int32 in the target, int64 in the reference)"
    )
    report = result.to_html(tmp_path / "r.html").read_text()
    assert "raised:   the target raised ValueError" in report and "output ``" not in report
    both = ak.compare(tmp_path / "tgt.h5", tmp_path / "tgt.h5")  # raising alike is no divergence
    assert both.verdict == "aligned"


def test_calls_after_the_first_divergence_stay_propagated_past_a_call_that_matches(tmp_path):
    """The UNet's port is off; a clock call between it and the scheduler matches: the
    scheduler's differing input is still the UNet's doing, not a glue bug of its own."""
    for path, off in ((tmp_path / "ref.h5", 0.0), (tmp_path / "tgt.h5", 0.5)):
        with ak.Recorder(path) as rec:
            unet = rec.watch(lambda sample: sample * 2 + off, "unet")
            clock = rec.watch(lambda timestep: timestep - 1, "clock")
            scheduler = rec.watch(lambda model_output: model_output / 2, "scheduler")
            x = torch.linspace(-1, 1, 300)
            for step in range(2):
                out = unet(x)
                clock(torch.tensor(999.0 - step))
                x = scheduler(out)
                ak.step()
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    assert _kinds(result) == {
        ("unet", 0): "local error",
        ("clock", 0): "",
        ("scheduler", 0): "propagated",
        ("unet", 1): "propagated",
        ("clock", 1): "",
        ("scheduler", 1): "propagated",
    }


def test_an_input_that_differs_after_a_call_raised_is_propagated(tmp_path):
    """The target's engine raises on the dtypes it is fed; the script goes on with zeros in
    its place, so the scheduler is fed something else: the raise's doing."""
    for path, port in ((tmp_path / "ref.h5", False), (tmp_path / "tgt.h5", True)):

        def engine(sample, timestep, port=port):
            if port:
                raise ValueError("unsupported dtype")
            return sample * 2

        with ak.Recorder(path) as rec:
            unet, scheduler = rec.watch(engine, "unet"), rec.watch(lambda model_output: model_output / 2, "scheduler")
            x = torch.linspace(-1, 1, 300)
            try:
                out = unet(x.double() if port else x, torch.tensor(999) if port else torch.tensor(999.0))
            except ValueError:
                out = torch.zeros(300, dtype=torch.float64)
            scheduler(out)
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    fd = result.first_divergence
    assert (fd.submodel, fd.step, fd.call, fd.seq, fd.io, fd.tensor, fd.kind) == (
        "unet",
        0,
        0,
        0,
        "outputs",
        "",
        "raised",
    )
    assert fd.message == (
        "unet step 0: raised — the target raised ValueError: unsupported dtype, where the reference returned, from "
        "matching inputs (equal values, but `sample` is float64 in the target, float32 in the reference; "
        "`timestep` is int64 in the target, float32 in the reference)"
    )
    assert _kinds(result) == {("unet", 0): "raised", ("scheduler", 0): "propagated"}


def test_a_raise_from_inputs_of_the_same_dtypes_says_only_that_they_match(tmp_path):
    for path, port in ((tmp_path / "ref.h5", False), (tmp_path / "tgt.h5", True)):

        def engine(sample, port=port):
            if port:
                raise RuntimeError("out of memory")
            return sample * 2

        with ak.Recorder(path) as rec, contextlib.suppress(RuntimeError):
            rec.watch(engine, "unet")(torch.ones(4))
    fd = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5").first_divergence
    assert fd.message == (
        "unet step 0: raised — the target raised RuntimeError: out of memory, where the reference returned, from "
        "matching inputs"
    )


def test_a_submodel_the_target_does_not_split_is_still_diagnosed_beside_one_it_does(tmp_path):
    """The target runs the UNet at batch 1 (two calls a step) and its scheduler is off at
    step 1: the scheduler's calls, which have no parts, are classified like any other."""
    x = np.random.default_rng(6).standard_normal((2, 4)).astype(np.float32)

    def record(path, split, off):
        with ak.Recorder(path) as rec:
            unet = rec.watch(lambda sample: sample * 2, "unet")
            scheduler = rec.watch(lambda model_output, step: model_output / 2 + off * step, "scheduler")
            for step in range(2):
                outs = [unet(x[:1]), unet(x[1:])] if split else [unet(x)]
                scheduler(np.concatenate(outs), np.float32(step))
                ak.step()
        return path

    result = ak.compare(record(tmp_path / "ref.h5", False, 0.0), record(tmp_path / "tgt.h5", True, 0.5))
    assert _kinds(result) == {("unet", 0): "", ("scheduler", 0): "", ("unet", 1): "", ("scheduler", 1): "local error"}
    fd = result.first_divergence
    assert (fd.submodel, fd.step, fd.kind) == ("scheduler", 1, "local error")


def _record_sdxl_unet(path, text_embeds, time_ids, timestep):
    def unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        return sample * 2

    rng = np.random.default_rng(0)
    sample, hidden = (
        rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
        rng.standard_normal((2, 7, 32), dtype=np.float32),
    )
    dtype = text_embeds.dtype
    with ak.Recorder(path) as rec:
        rec.watch(unet, "unet")(
            sample.astype(dtype),
            timestep,
            hidden.astype(dtype),
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
        )


def test_small_inputs_are_controls_when_scalars_vectors_or_whole_numbers_not_fractions(tmp_path):
    """A tiny model's pooled text embedding (2×32) is a signal, compared with tolerances as a
    real model's (2×1280) is; SDXL's time_ids (2×6 whole numbers) and the timestep stay exact."""
    text_embeds = np.random.default_rng(1).standard_normal((2, 32), dtype=np.float32)
    time_ids = np.tile(np.float32([1024, 1024, 0, 0, 1024, 1024]), (2, 1))
    _record_sdxl_unet(tmp_path / "ref.h5", text_embeds, time_ids, np.float32(999.5))
    _record_sdxl_unet(
        tmp_path / "fp16.h5", text_embeds.astype(np.float16), time_ids.astype(np.float16), np.float32(999.5)
    )
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "fp16.h5")
    rows = result.table[result.table["io"] == "inputs"].set_index("tensor")
    assert result.verdict == "aligned", result.summary()
    assert rows.loc["added_cond_kwargs.text_embeds", ["exact", "status"]].tolist() == [False, "ok"]
    assert rows.loc["added_cond_kwargs.time_ids", ["exact", "status"]].tolist() == [True, "ok"]
    assert rows.loc["timestep", "exact"]

    crop = time_ids.copy()
    crop[:, 2] = 1  # a crop offset of 1 pixel: far inside any tolerance, and another conditioning
    _record_sdxl_unet(tmp_path / "crop.h5", text_embeds, crop, np.float32(999.0))
    rows = ak.compare(tmp_path / "ref.h5", tmp_path / "crop.h5").table.set_index("tensor")
    assert rows.loc["added_cond_kwargs.time_ids", "rel_l1"] < 1e-3
    assert rows.loc["added_cond_kwargs.time_ids", "status"] == rows.loc["timestep", "status"] == "mismatch"


def test_a_target_computing_in_another_precision_throughout_is_one_warning(tmp_path):
    text_embeds = np.random.default_rng(1).standard_normal((2, 32), dtype=np.float32)
    time_ids = np.tile(np.float32([64, 64, 0, 0, 64, 64]), (2, 1))
    _record_sdxl_unet(tmp_path / "ref.h5", text_embeds, time_ids, np.float32(999))
    _record_sdxl_unet(tmp_path / "tgt.h5", text_embeds.astype(np.float16), time_ids.astype(np.float16), np.int64(999))
    warnings = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5").warnings
    assert (
        "4 tensors are float32 in the reference and float16 in the target, with values that differ (unet): the target "
        "computes in float16" in warnings
    )
    assert (
        "unet input `added_cond_kwargs.time_ids`: reference float32, target float16 (values equal) at 1 step"
        in warnings
    )
    assert "unet input `timestep`: reference float32, target int64 (values equal) at 1 step" in warnings
    assert not any("`sample`" in w for w in warnings)


def test_a_tensor_that_holds_the_last_positions_of_the_other_is_compared_on_them(tmp_path):
    """transformers' generate asks for the last position's logits (logits_to_keep=1); an
    export returns every position."""
    rng = np.random.default_rng(0)
    every = rng.standard_normal((1, 5, 8)).astype(np.float32)
    for path, logits in ((tmp_path / "ref.h5", every[:, -1:]), (tmp_path / "tgt.h5", every)):
        with ak.Recorder(path) as rec:
            rec.watch(lambda input_ids: {"logits": logits}, "decoder")(np.arange(5)[None])
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    assert result.verdict == "aligned", result.first_divergence
    assert (
        "decoder output `logits`: reference shape [1,1,8], target [1,5,8]: compared on the last 1 of the target's 5 "
        "along axis 1 at 1 step (they agree)"
    ) in result.warnings
    every[0, -1] += 1.0  # the part both hold differs: the verdict shows both shapes
    with ak.Recorder(tmp_path / "tgt.h5") as rec:
        rec.watch(lambda input_ids: {"logits": every}, "decoder")(np.arange(5)[None])
    fd = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5").first_divergence
    assert (fd.tensor, fd.kind) == ("logits", "local error") and "rel_l1" in fd.message


def test_tensors_only_one_side_has_are_one_note_per_submodel(tmp_path):
    for path, extra in ((tmp_path / "ref.h5", 0), (tmp_path / "tgt.h5", 5)):
        with ak.Recorder(path) as rec:
            names = {"x": np.ones(2, np.float32), **{f"past.{i}": np.ones(2, np.float32) for i in range(extra)}}
            rec.watch(lambda feed: {"y": feed["x"]}, "decoder")(names)
    notes = [n for n in ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5").notes if "only in" in n]
    assert notes == [
        "decoder inputs: 5 tensors only in the target (`past.0`, `past.1`, `past.2` and 2 more; up to 1 call each); "
        "not compared"
    ]


def test_target_precision_is_checked_when_declared():
    from alignkit.comparison.precision import parse_precisions
    from alignkit.errors import UsageError

    assert parse_precisions(["unet=fp16", "all=bf16"]) == {"unet": "fp16", "all": "bf16"}
    with pytest.raises(UsageError, match="expected one of fp16, bf16, int8, fp8, fp32"):
        parse_precisions({"unet": "half"})
    with pytest.raises(UsageError, match="expected submodel=precision"):
        parse_precisions(["fp16"])


def test_a_flat_list_against_nested_outputs_pairs_by_structure_not_by_a_colliding_name(tmp_path):
    """A ControlNet engine returns its seven outputs as a flat list; diffusers' ControlNet
    returns a tuple of six down-block residuals and the mid-block one."""
    rng = np.random.default_rng(0)
    shapes = [(2, 32, 32, 32)] * 3 + [(2, 64, 16, 16)] * 3 + [(2, 64, 8, 8)]
    values = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    with ak.Recorder(tmp_path / "ref.h5") as rec:
        rec.watch(lambda sample: (tuple(values[:6]), values[6]), "controlnet")(np.ones(2, np.float32))
    with ak.Recorder(tmp_path / "tgt.h5") as rec:
        rec.watch(lambda sample: list(values), "controlnet")(np.ones(2, np.float32))
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    assert result.verdict == "aligned", result.first_divergence
    outputs = result.table[result.table["io"] == "outputs"]
    assert len(outputs) == 7 and (outputs["status"] == "ok").all() and (outputs["matched_by"] == "structure").all()
    assert (
        "controlnet outputs: the target's names would pair tensors of other shapes, so its 7 tensors are paired with "
        "the reference's by structure, in flattened order and shape (target ↔ reference: `output.0` ↔ `output.0.0`, "
        "`output.1` ↔ `output.0.1`, `output.2` ↔ `output.0.2` and 4 more)"
    ) in result.warnings


def test_an_output_all_nan_in_the_target_is_never_read_as_a_match(tmp_path):
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    for path, broken in ((tmp_path / "ref.h5", False), (tmp_path / "tgt.h5", True)):
        with ak.Recorder(path) as rec:
            unet = rec.watch(lambda sample: np.full_like(sample, np.nan) if broken else sample * 2, "unet")
            vae = rec.watch(lambda z: np.full_like(z, np.inf) if broken else z + 1, "vae.decode")
            for _ in range(2):
                unet(x)
                ak.step()
            vae(x)
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    fd = result.first_divergence
    assert (fd.submodel, fd.step, fd.tensor) == ("unet", 0, "output")
    assert "n/a: 100% NaN in the target" in fd.message
    row = result.table[(result.table["submodel"] == "vae.decode") & (result.table["io"] == "outputs")].iloc[0]
    assert row["status"] == "nonfinite" and math.isnan(row["rel_l1"]) and math.isnan(row["cos"])
    growth = growth_text(result.growth)
    assert "matches exactly" not in growth and "NaN/Inf in the target from step 0" in growth, growth


def test_a_target_whose_ported_submodels_carry_other_names_is_incomplete_not_aligned(tmp_path, capsys):
    from alignkit.cli import main

    x = np.ones(4, np.float32)
    for path, names in (
        (tmp_path / "ref.h5", ("unet", "controlnet")),
        (tmp_path / "tgt.h5", ("EngineOV", "EngineOV#2")),
    ):
        with ak.Recorder(path) as rec:
            encoder = rec.watch(lambda ids: ids * 2, "text_encoder")
            unet, controlnet = rec.watch(lambda s: s + 1, names[0]), rec.watch(lambda s: s - 1, names[1])
            encoder(x)
            for _ in range(3):
                controlnet(x)
                unet(x)
                ak.step()
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    assert result.verdict == "incomplete" and result.exit_code == 3 and not result.aligned
    assert result.headline() == (
        "incomplete: aligned on 1 of 3 submodels; controlnet, unet not compared: the target ran submodels of other "
        "names at their steps (compare them with --map EngineOV#2=controlnet --map EngineOV=unet)"  # by call order
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(tmp_path / "ref.h5"), str(tmp_path / "tgt.h5"), "--no-html"])
    assert exit_info.value.code == 3 and "INCOMPLETE" in capsys.readouterr().out
    mapped = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5", name_map=result.suggested_map)
    assert mapped.verdict == "aligned" and mapped.exit_code == 0


def test_a_submodel_the_port_leaves_out_does_not_make_it_incomplete(tmp_path):
    x = np.ones(4, np.float32)
    for path, checker in ((tmp_path / "ref.h5", True), (tmp_path / "tgt.h5", False)):
        with ak.Recorder(path) as rec:
            unet, safety = rec.watch(lambda s: s + 1, "unet"), rec.watch(lambda s: s, "safety_checker")
            unet(x)
            if checker:
                safety(x)
    assert ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5").verdict == "aligned"


class NoisyGenerator(torch.nn.Module):
    """A generator that injects noise in its forward, as StyleGAN-like models do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.act = torch.nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.act(self.conv(x) + 0.1 * torch.randn_like(x))


def test_a_random_op_inside_a_submodel_is_named_as_nondeterminism(tmp_path):
    model, x = NoisyGenerator().eval(), torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    for run in ("a", "b"):  # the same model, in fp32, run twice
        with ak.Recorder(tmp_path / f"{run}.h5", layers=["generator"]) as rec, torch.no_grad():
            rec.watch(model, "generator")(x)
    result = ak.compare(tmp_path / "a.h5", tmp_path / "b.h5")
    fd = result.first_divergence
    assert (fd.submodel, fd.kind) == ("generator", "local error")
    assert "generator is nondeterministic, a random op in its forward" in fd.message and "port" not in fd.message
    assert "keep_fp32" not in result.layers  # both runs compute in fp32: no layer to keep in it


def test_noise_the_size_of_rounding_names_a_lower_precision_before_a_random_op(tmp_path):
    """An engine computing in bf16 behind float32 outputs adds noise as independent as a random
    op's, but the size of bf16 rounding: the verdict names both causes, precision first."""
    conv = NoisyGenerator().conv.eval()
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    for run, cast in (("ref", False), ("tgt", True)):
        with ak.Recorder(tmp_path / f"{run}.h5") as rec, torch.no_grad():
            engine = rec.watch(lambda v, cast=cast: conv(v).bfloat16().float() if cast else conv(v), "encoder")
            engine(x)
    fd = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5").first_divergence
    assert (fd.submodel, fd.kind) == ("encoder", "local error")
    assert "as rounding makes it, where encoder computes in a lower precision than its float32" in fd.message
    assert "--target-precision encoder=bf16" in fd.message and "or a random op in its forward" in fd.message
    assert "encoder is nondeterministic" not in fd.message


def test_perturbed_weights_are_not_taken_for_randomness(demo_dumps):
    fd = ak.compare(*demo_dumps["weights"]).first_divergence
    assert "the port of unet itself is off" in fd.message and "nondeterministic" not in fd.message


def test_a_small_control_input_that_differs_is_told_by_its_values(tmp_path):
    """SDXL's time_ids: original size, crop, target size, for each half of the batch."""
    for path, crop in ((tmp_path / "ref.h5", 0.0), (tmp_path / "tgt.h5", 64.0)):
        with ak.Recorder(path) as rec:
            ids = np.array([[1024, 1024, crop, 0, 1024, 1024]] * 2, np.float32)
            rec.watch(lambda sample, time_ids: sample, "unet")(np.ones((2, 4), np.float32), ids)
    fd = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5").first_divergence
    assert (fd.tensor, fd.kind) == ("time_ids", "input mismatch")
    assert (
        "reference float32 [[1024., 1024., 0., 0., 1024., 1024.], [1024., 1024., 0., 0., 1024., 1024.]]" in fd.message
    )
    assert "target float32 [[1024., 1024., 64., 0., 1024., 1024.]," in fd.message and "cos" not in fd.message


def test_an_input_of_another_kind_of_dtype_after_a_local_error_is_not_called_propagated(tmp_path):
    """A text encoder's unused output differs first; later the UNet gets its timestep as int64:
    drift changes values, never a dtype, so the UNet's is an input mismatch of its own."""
    for path, port in ((tmp_path / "ref.h5", False), (tmp_path / "tgt.h5", True)):
        with ak.Recorder(path) as rec:
            encoder = rec.watch(lambda ids: {"pooled": np.ones(8, np.float32) * (2.0 if port else 1.0)}, "encoder")
            unet = rec.watch(lambda sample, timestep: sample * 0.5, "unet")
            encoder(np.arange(4))
            ak.step()
            ts = np.array(499, np.int64) if port else np.array(499.5, np.float32)
            unet(np.ones((2, 4), np.float32), ts)
    result = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    kinds = dict(zip(result.calls["submodel"], result.calls["kind"]))
    assert kinds == {"encoder": "local error", "unet": "input mismatch"}
    assert result.first_divergence.submodel == "encoder"  # still the earliest


def _record_unread_error(path, port, timestep_int64):
    """The encoder's second output differs in the port, and nothing reads it."""
    with ak.Recorder(path) as rec:
        encoder = rec.watch(
            lambda ids: {"used": np.ones(8, np.float32), "unused": np.full(8, 2.0 if port else 1.0, np.float32)},
            "encoder",
        )
        unet = rec.watch(lambda sample, embeds, timestep: sample * 0.5, "unet")
        embeds = encoder(np.arange(4))["used"]
        ak.step()
        unet(np.ones((2, 4), np.float32), embeds, np.array(10.0, np.float32))
        ak.step()
        unet(
            np.ones((2, 4), np.float32),
            embeds,
            np.array(499, np.int64) if timestep_int64 else np.array(499.5, np.float32),
        )
    return path


def test_a_local_error_nothing_reads_is_not_taken_for_the_first_divergence(tmp_path):
    """The UNet's timestep, fed as int64, is the divergence that matters. The unread error is
    said as a warning."""
    ref = _record_unread_error(tmp_path / "ref.h5", False, False)
    result = ak.compare(ref, _record_unread_error(tmp_path / "tgt.h5", True, True))
    fd = result.first_divergence
    assert (fd.submodel, fd.step, fd.tensor, fd.kind) == ("unet", 2, "timestep", "input mismatch")
    assert any(w.startswith("encoder step 0: output `unused` differs") and "nothing downstream reads it" in w
               for w in result.warnings)  # fmt: skip
    alone = ak.compare(ref, _record_unread_error(tmp_path / "alone.h5", True, False))  # no other divergence
    fd = alone.first_divergence
    assert alone.verdict == "diverged" and (fd.submodel, fd.tensor, fd.kind) == ("encoder", "unused", "local error")


def test_every_local_error_nothing_reads_is_found_past_one_that_diverges_again():
    from alignkit.comparison.diagnosis import unread_errors

    per_call = pd.DataFrame(
        {
            "seq": [0, 1, 2, 3],
            "submodel": ["unet", "text_encoder_2", "unet", "scheduler"],
            "kind": ["local error", "local error", "local error", ""],
            "bad_in": [False] * 4,
            "bad_out": [True, True, True, False],
            "recast": [False] * 4,
        }
    )
    # the UNet's first error is taken as read (the UNet diverges again); its last one is not, nor the encoder's
    assert unread_errors(per_call) == {1, 2}


def test_a_local_error_later_inputs_show_is_still_the_first_divergence(tmp_path):
    for path, port in ((tmp_path / "ref.h5", False), (tmp_path / "tgt.h5", True)):
        with ak.Recorder(path) as rec:
            encoder = rec.watch(lambda ids: np.full(8, 2.0 if port else 1.0, np.float32), "encoder")
            unet = rec.watch(lambda sample, embeds: sample * 0.5, "unet")
            unet(np.ones((2, 4), np.float32), encoder(np.arange(4)))
    fd = ak.compare(tmp_path / "ref.h5", tmp_path / "tgt.h5").first_divergence
    assert (fd.submodel, fd.kind) == ("encoder", "local error")
