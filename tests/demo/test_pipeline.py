import tempfile


def test_the_demo_tokenizer_encodes_a_prompt_and_leaves_no_files_behind(tmp_path, monkeypatch):
    from alignkit.demo.pipeline import tiny_tokenizer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tokenizer = tiny_tokenizer()
    ids = tokenizer("a cat").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) > 2
    assert list(tmp_path.iterdir()) == []
