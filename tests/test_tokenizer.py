"""Caption tokenizer: training, saving, loading, EOS at the end of every caption, truncation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from plait.data.tokenizer import EOS_TOKEN, encode_captions, load_tokenizer, train_tokenizer

CAPTIONS = [
    "a red seven on a blue background",
    "the DTMF tone of the digit three",
    "a white four moving left",
    "héllo wörld, 日本語のキャプション",
] * 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedTokenizerFast, Path]:
    out = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer(CAPTIONS, 320, out), out


def test_trained_tokenizer_round_trips_and_respects_vocab_size(trained):
    tokenizer, _ = trained
    assert len(tokenizer) <= 320
    for caption, ids in zip(CAPTIONS[:4], encode_captions(tokenizer, CAPTIONS[:4], 128)):
        assert ids.dtype == torch.long
        assert int(ids[-1]) == tokenizer.eos_token_id
        assert tokenizer.decode(ids[:-1].tolist()) == caption  # byte-level BPE is lossless, unicode included


def test_saved_tokenizer_loads_with_auto_tokenizer_and_gives_the_same_ids(trained):
    tokenizer, out = trained
    loaded = load_tokenizer(out)
    assert loaded.eos_token == EOS_TOKEN
    for caption in CAPTIONS[:4]:
        ids = loaded(caption)["input_ids"]
        assert ids == tokenizer(caption)["input_ids"]
        assert ids[-1] == loaded.eos_token_id  # the saved post-processor appends EOS by itself
    assert [t.tolist() for t in encode_captions(loaded, CAPTIONS[:4], 64)] == \
           [t.tolist() for t in encode_captions(tokenizer, CAPTIONS[:4], 64)]


@pytest.mark.parametrize("max_length", [1, 2, 5])
def test_truncated_captions_still_end_with_eos(trained, max_length):
    tokenizer, _ = trained
    full = encode_captions(tokenizer, CAPTIONS[:4], 128)
    for ids, whole in zip(encode_captions(tokenizer, CAPTIONS[:4], max_length), full):
        assert len(ids) == min(max_length, len(whole))
        assert int(ids[-1]) == tokenizer.eos_token_id
        assert ids[:-1].tolist() == whole[: len(ids) - 1].tolist()  # a prefix of the caption, then EOS


def test_eos_is_appended_for_tokenizers_that_do_not_add_it(tmp_path):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.add_special_tokens(["</s>"])
    bpe.add_tokens(list("abcdefghijklmnopqrstuvwxyz "))
    plain = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    assert plain("abc")["input_ids"][-1] != plain.eos_token_id
    ids = encode_captions(plain, ["abc", "hello world"], 4)
    assert [t.tolist()[-1] for t in ids] == [plain.eos_token_id] * 2
    assert ids[0].tolist() == plain("abc")["input_ids"] + [plain.eos_token_id]
    assert len(ids[1]) == 4


def test_load_rejects_a_tokenizer_without_eos(tmp_path):
    bpe = Tokenizer(models.BPE())
    bpe.add_tokens(["a", "b"])
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="EOS"):
        load_tokenizer(tmp_path)


def test_bad_arguments_are_rejected(trained, tmp_path):
    tokenizer, _ = trained
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CAPTIONS, 100, tmp_path)
    with pytest.raises(ValueError, match="max_length"):
        encode_captions(tokenizer, ["x"], 0)
    assert encode_captions(tokenizer, [], 8) == []
