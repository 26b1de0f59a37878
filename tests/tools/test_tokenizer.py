"""The teacher's tokenizer (tools/worldbuild/tokenizer.py): one token per scene word, CLIP files."""
from __future__ import annotations

import pytest

from condistill.world.scenes import SyntheticScenes, vocabulary
from worldbuild.tokenizer import build_tokenizer, clip_bpe_files, tokenize, write_tokenizer_files


def test_every_scene_word_is_one_token():
    tok = build_tokenizer()
    for word in vocabulary():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"{word!r} -> {tok.convert_ids_to_tokens(ids)}"
        assert tok.convert_ids_to_tokens(ids) == [word + "</w>"]
    # a whole caption is one token per word, framed by BOS/EOS and padded to 32 with EOS
    caption = SyntheticScenes("heldout", 1)[0].caption
    ids = tokenize(tok, [caption])[0].tolist()
    n = len(caption.split())
    assert len(ids) == 32 == tok.model_max_length
    assert ids[0] == tok.bos_token_id and ids[n + 1] == tok.eos_token_id
    assert set(ids[n + 1:]) == {tok.eos_token_id}


def test_unknown_words_fall_back_to_characters():
    tok = build_tokenizer()
    pieces = tok.tokenize("Zebra-striped!")
    assert "".join(pieces).replace("</w>", "") == "zebra-striped!"
    assert len(pieces) > 3
    ids = tok("zebra", add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids and len(ids) == 5
    assert tok.decode(tok("a zebra on red").input_ids, skip_special_tokens=True) == "a zebra on red"


def test_tokenizer_files_load_as_clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    write_tokenizer_files(tmp_path)
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and all(len(m.split(" ")) == 2 for m in merges[1:])
    tok = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=32)
    assert tok.tokenize("a small purple diamond") == ["a</w>", "small</w>", "purple</w>", "diamond</w>"]
    assert tok("navy").input_ids == build_tokenizer()("navy").input_ids


def test_tokenizer_rejects_bad_vocabulary():
    with pytest.raises(ValueError, match="single words"):
        clip_bpe_files(["two words"])
    with pytest.raises(ValueError, match="non-empty"):
        clip_bpe_files(["red", ""])
    with pytest.raises(TypeError):
        clip_bpe_files("red")
