"""Tokenizers of the tiny models, written offline: CLIP's byte-level BPE, T5's Unigram and
Qwen's byte-level BPE with its chat template, each with the toy world's words as single
tokens."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from loraforge_core.architectures import TINY_VOCAB_WORDS


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte-level alphabet: printable characters for all 256 byte values."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _bpe(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the adjacent pair of lowest rank."""
    while len(word) > 1:
        pairs = [
            (ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(word))
        ]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        word = [*word[:i], word[i] + word[i + 1], *word[i + 2 :]]
    return word


def write_tiny_tokenizer(folder: Path, words: tuple[str, ...] = TINY_VOCAB_WORDS) -> int:
    """Write a CLIP BPE vocabulary (vocab.json, merges.txt) that spells any text; return its size.

    The 256 byte symbols and their end-of-word forms make every text encodable. Each listed
    word becomes one token: BPE applies merges by rank, so for every word we run BPE with the
    merges so far and append a merge for what is left until the word is a single token.
    """
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = _bpe(pieces, ranks)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    )
    return len(vocab)


def t5_tokenizer(words: tuple[str, ...] = TINY_VOCAB_WORDS, max_length: int = 64) -> Any:
    """A T5 tokenizer (SentencePiece-style Unigram) that spells any lowercase text: each word a
    token, then single characters; ``</s>`` closes every sequence, as T5's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    characters = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz0123456789,.-'!?"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in words]
    vocab += [("\u2581" + c, -4.0) for c in characters] + [(c, -5.0) for c in characters]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        extra_ids=0, model_max_length=max_length,
    )  # fmt: skip


# Qwen3's chat template, cut to what ZImagePipeline renders: one user turn, the assistant's
# turn opened, and the empty thinking block Qwen3 writes when thinking is turned off.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking "
    "is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def qwen_tokenizer(words: tuple[str, ...] = TINY_VOCAB_WORDS, max_length: int = 64) -> Any:
    """A Qwen2 tokenizer (GPT-2 byte-level BPE) that spells any text, each word (after a
    space, as byte-level BPE sees it: "\u0120word") a token, with Qwen's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2Tokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    merges: list[tuple[str, str]] = []
    for word in words:  # left to right, each merge making the next prefix a token; then
        pieces = list(word)  # the word after a space ("\u0120" + word) from the whole word
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1], *pieces[2:]]
        merges.append(("\u0120", word))
        vocab.setdefault("\u0120" + word, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = Qwen2Tokenizer(
        tokenizer_object=tokenizer, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", model_max_length=max_length,
    )  # fmt: skip
    fast.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL[1:])})
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast
