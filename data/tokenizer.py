"""Caption tokenizer: load a transformers tokenizer, or train a small ByteLevel BPE on the captions.

Every caption ends with the EOS token, so the LLM's last-token hidden state (the text embedding of
the contrastive loss) always sits on the same, well-defined token whatever the caption says.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
"""End-of-caption token of trained tokenizers (also their BOS/UNK)."""
PAD_TOKEN = "<|pad|>"
"""Padding token of trained tokenizers (never inside a packed caption; for batch-padded uses)."""

# The tokenizers library's Rust thread pool and forked DataLoader workers do not mix; captions are
# short, so one thread per worker loses nothing.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory (or a hub name when a hub is reachable); it must have an EOS token."""
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer: {name_or_path} has no EOS token; captions must end with one")
    return tokenizer


def train_tokenizer(captions: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a ByteLevel BPE of `vocab_size` on `captions`, save it to `out_dir` and return it.

    The saved tokenizer appends EOS to every encoded caption itself, so any consumer that loads
    it with `AutoTokenizer` gets the same ids as `encode_captions`.
    """
    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size: must cover the 256 byte symbols and 2 special tokens, got {vocab_size}")
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(captions, trainer=trainer)
    eos_id = bpe.token_to_id(EOS_TOKEN)
    bpe.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
                                      special_tokens=[(EOS_TOKEN, eos_id)]),
    ])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                        unk_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def encode_captions(tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], max_length: int) -> list[torch.Tensor]:
    """int64 token ids of each caption, at most `max_length` long, always ending with EOS.

    One batched call to the (Rust) tokenizer; a caption the tokenizer does not end with EOS
    (most hub tokenizers add only BOS) gets it appended, replacing its last token when too long.
    """
    if max_length < 1:
        raise ValueError(f"max_length: must be >= 1, got {max_length}")
    if not captions:
        return []
    eos = tokenizer.eos_token_id
    encoded = tokenizer(list(captions), truncation=True, max_length=max_length)["input_ids"]
    out = []
    for ids in encoded:  # per caption, but only list bookkeeping; the tokenizing above is batched
        if not ids or ids[-1] != eos:
            ids = ids[: max_length - 1] + [eos]
        out.append(torch.tensor(ids, dtype=torch.long))
    return out
