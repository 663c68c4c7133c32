"""An LLM decode loop: transformers' ``generate`` as the reference, and as the target a
hand-written greedy loop over an engine with the names an ONNX export gives a decoder
(``past_key_values.N.key`` in, ``present.N.key`` out)."""

import numpy as np
import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import alignkit as ak

LAYERS, PROMPT, NEW_TOKENS = 2, [[5, 17, 3, 42]], 5


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=LAYERS, n_head=4, vocab_size=100, n_positions=64)).eval()


class ExportedDecoder:
    """What a port runs: one call a token, the KV cache passed in and out as named arrays,
    logits of the last position only."""

    def __init__(self, model: GPT2LMHeadModel):
        self.model = model

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cache = DynamicCache()
        for i in range(LAYERS):
            if f"past_key_values.{i}.key" in feed:
                cache.update(
                    torch.from_numpy(feed[f"past_key_values.{i}.key"]),
                    torch.from_numpy(feed[f"past_key_values.{i}.value"]),
                    i,
                )
        with torch.no_grad():
            out = self.model(
                input_ids=torch.from_numpy(feed["input_ids"]),
                position_ids=torch.from_numpy(feed["position_ids"]),
                past_key_values=cache,
                use_cache=True,
            )
        present = {
            f"present.{i}.{kind}": getattr(layer, f"{kind}s").numpy().copy()
            for i, layer in enumerate(cache.layers)
            for kind in ("key", "value")
        }
        return {"logits": out.logits[:, -1:].numpy(), **present}


def greedy(engine: ExportedDecoder, position_shift: int = 0) -> list[int]:
    ids = np.array(PROMPT, dtype=np.int64)
    feed = {"input_ids": ids, "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
    tokens = []
    for _ in range(NEW_TOKENS):
        out = engine(feed)
        token = int(out["logits"][0, -1].argmax())
        tokens.append(token)
        past = {k.replace("present.", "past_key_values.", 1): v for k, v in out.items() if k.startswith("present.")}
        position = int(feed["position_ids"][0, -1]) + 1 + position_shift
        feed = {
            "input_ids": np.array([[token]], dtype=np.int64),
            "position_ids": np.array([[position]], dtype=np.int64),
            **past,
        }
    return tokens


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("llm") / "ref.h5"
    model = tiny_gpt2()
    with ak.Recorder(path, label="transformers") as rec:
        rec.watch(model, "decoder")
        out = model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return path, out[0, len(PROMPT[0]) :].tolist()


def record_port(path, position_shift: int = 0) -> list[int]:
    with ak.Recorder(path, label="port") as rec:
        engine = rec.watch(ExportedDecoder(tiny_gpt2()), "decoder")
        return greedy(engine, position_shift)


def test_the_kv_cache_is_recorded_per_layer_before_and_after_each_call(reference):
    path, _ = reference
    with ak.open_dump(path) as dump:
        assert dump.steps("decoder") == list(range(NEW_TOKENS))  # prefill, then a call a token
        assert "past_key_values.0.key" not in dump["decoder", 0].inputs  # an empty cache holds no tensors
        for step in range(1, NEW_TOKENS):
            call, previous = dump["decoder", step], dump["decoder", step - 1]
            for name in (f"past_key_values.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")):
                seen = len(PROMPT[0]) + step - 1
                assert call.inputs[name].shape == (1, 4, seen, 8)
                np.testing.assert_array_equal(call.inputs[name], previous.outputs[name])  # copied before the update
                assert call.outputs[name].shape == (1, 4, seen + 1, 8)


def test_a_port_with_exported_names_compares_aligned(reference, tmp_path):
    path, tokens = reference
    assert record_port(tmp_path / "port.h5") == tokens
    result = ak.compare(path, tmp_path / "port.h5")
    assert result.verdict == "aligned"
    rows = result.table[result.table["submodel"] == "decoder"]
    cache_rows = rows[rows["tensor"].str.startswith("past_key_values") & (rows["io"] == "inputs")]
    assert len(cache_rows) == 2 * LAYERS * (NEW_TOKENS - 1) and set(cache_rows["matched_by"]) == {"name"}
    present = rows[rows["tgt_tensor"].str.startswith("present.", na=False)]
    assert len(present) == 2 * LAYERS * NEW_TOKENS and set(present["matched_by"]) == {"position"}
    result.to_html(tmp_path / "report.html")
    assert "output past_key_values" not in (tmp_path / "report.html").read_text()  # a cache is not drawn as an image


def test_position_ids_off_by_one_in_the_loop_is_the_first_divergence(reference, tmp_path):
    path, _ = reference
    record_port(tmp_path / "port.h5", position_shift=1)
    first = ak.compare(path, tmp_path / "port.h5").first_divergence
    assert (first.submodel, first.step, first.io, first.tensor, first.kind) == (
        "decoder",
        1,
        "inputs",
        "position_ids",
        "input mismatch",
    )


def test_the_port_replayed_on_reference_inputs_is_aligned_at_every_step(reference, tmp_path):
    path, _ = reference
    result = ak.replay(path, submodel="decoder", target=ExportedDecoder(tiny_gpt2()), out=tmp_path / "replay.h5")
    assert result.verdict == "aligned"
    assert sorted(set(result.table["step"])) == list(range(NEW_TOKENS))


def test_a_bf16_model_replayed_gets_the_reference_cache_rebuilt_in_its_dtype(reference, tmp_path):
    path, _ = reference
    result = ak.replay(path, submodel="decoder", target=tiny_gpt2().to(torch.bfloat16), out=tmp_path / "replay.h5")
    casts = [w for w in result.warnings if w.startswith("replay cast")]
    assert (
        "replay cast input `past_key_values.0.key` from float32 (recorded) to bfloat16 (the module's parameters)"
        in casts
    )
    assert not any("position_ids" in w for w in casts)
    outputs = result.table[result.table["io"] == "outputs"]
    cache_out = outputs[outputs["tensor"] == "past_key_values.1.value"]
    assert list(cache_out["tgt_shape"]) == [
        f"[1,4,{len(PROMPT[0]) + step},8]" for step in range(NEW_TOKENS)
    ]  # prefill, then one more a step
    assert outputs["rel_l1"].max() < 0.05


def test_a_decode_loop_is_also_judged_in_tokens(reference, tmp_path):
    ref, tokens = reference
    record_port(tmp_path / "port.h5")
    result = ak.compare(ref, tmp_path / "port.h5")
    t = result.tokens
    assert (t["submodel"], t["steps"], t["identical"], t["first_differs"]) == ("decoder", NEW_TOKENS, NEW_TOKENS, None)
    assert [r["ref_token"] for r in t["per_step"]] == [[token] for token in tokens]  # what generate produced
    assert all(r["top_k"] == 1.0 for r in t["per_step"])
    assert "Tokens: decoder: the greedy token is the reference's at 5 of 5 steps; top-5 agreement 100% on average" in (
        result.summary()
    )
    result.to_html(tmp_path / "r.html")
    assert "the greedy token is the reference&#x27;s at 5 of 5 steps" in (tmp_path / "r.html").read_text()
    assert result.to_dict()["tokens"]["identical"] == NEW_TOKENS

    record_port(tmp_path / "shifted.h5", position_shift=1)  # a port that goes wrong: said in tokens too
    shifted = ak.compare(ref, tmp_path / "shifted.h5").tokens
    assert shifted["identical"] == NEW_TOKENS  # the tiny model still picks the same tokens…
    assert min(r["top_k"] for r in shifted["per_step"]) < 0.5  # …but ranks the candidates otherwise


def test_a_model_driven_by_generate_is_recorded_with_no_code_change(tmp_path):
    """transformers' generate, under alignkit record: the model it drives is the decoder, the
    prefill then a step a token, its cache named as exports name it."""
    from alignkit.recording.cli_run import record_command
    from tests.conftest import ROOT

    (tmp_path / "run.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "import torch\nfrom tests.integration.test_llm_decode import PROMPT, NEW_TOKENS, tiny_gpt2\n"
        "tiny_gpt2().generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)\n"
    )
    assert record_command(tmp_path / "zero.h5", [str(tmp_path / "run.py")]) == 0
    with ak.open_dump(tmp_path / "zero.h5") as dump:
        assert dump.submodels == ["decoder"] and dump.steps("decoder") == list(range(NEW_TOKENS))
        assert "past_key_values.0.key" in dump["decoder", 1].inputs
