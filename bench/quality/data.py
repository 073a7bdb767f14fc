"""Text data for the quality harness: WikiText-2 streams, the reference models' tokenizers, and
the needle-in-a-haystack prompts.

Two tokenizers, each saved as a Hugging Face `tokenizer.json` that PreTrainedTokenizerFast loads
and read back here without the `tokenizers` package (load_tokenizer picks the class):
  * CharTokenizer (the reference model's since the char-level retrain): one token per character
    of the raw WikiText file, newlines and spaces included (WordLevel model over single
    characters behind a Split pre-tokenizer that isolates every character, Fuse decoder). The
    file's own "<unk>" markers are five ordinary characters; characters never seen in valid.txt
    map to <|unk|>.
  * WordTokenizer (the first, word-level reference model): WikiText-2's words (WordLevel model, a
    normalizer that turns each newline into " <eos> ", whitespace pre-tokenizer); a raw WikiText
    file becomes the standard word stream, the words of each line followed by <eos>.
Both expose `level` ("char" or "word"), which the needle builders below use to lay out needles,
questions and answers the way each tokenization needs (at word boundaries, with spaces, for
characters).
"""

import json
import os
import random
from collections import Counter
from typing import List, Optional, Sequence

UNK, EOS, PAD = "<unk>", "<eos>", "<pad>"


def wikitext_words(path: str) -> List[str]:
    """The standard WikiText word stream: every line's words, then <eos> (blank lines too)."""
    words = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words.extend(line.split())
            words.append(EOS)
    return words


def wikitext_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_vocab(path: str) -> List[str]:
    """The tokens of a WordLevel tokenizer.json in id order (ids must be dense)."""
    with open(path, encoding="utf-8") as f:
        model = json.load(f).get("model", {})
    if model.get("type") != "WordLevel":
        raise ValueError(f"{path}: not a WordLevel tokenizer")
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    if [i for _, i in vocab] != list(range(len(vocab))):
        raise ValueError(f"{path}: vocabulary ids are not dense")
    return [t for t, _ in vocab]


def write_fast_tokenizer(directory: str, spec: dict, special: dict):
    """tokenizer.json (`spec`) with the config files that let transformers load it as a
    PreTrainedTokenizerFast; `special` maps unk_token/eos_token/pad_token to their strings."""
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
              "model_max_length": 1000000, "clean_up_tokenization_spaces": False}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)


class WordTokenizer:
    """Whitespace word-level tokenizer; unknown words map to <unk>."""

    level = "word"

    def __init__(self, vocab: Sequence[str]):
        self.itos = list(vocab)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.unk_id = self.stoi[UNK]
        self.eos_id = self.stoi[EOS]
        self.pad_id = self.stoi.get(PAD, self.eos_id)

    @classmethod
    def build(cls, words: Sequence[str], extra: Sequence[str] = ()) -> "WordTokenizer":
        """Vocabulary: specials, then words by descending frequency (ties alphabetical)."""
        counts = Counter(words)
        vocab = [PAD, UNK, EOS]
        seen = set(vocab)
        for w in list(extra) + sorted(counts, key=lambda w: (-counts[w], w)):
            if w not in seen:
                vocab.append(w)
                seen.add(w)
        return cls(vocab)

    @classmethod
    def from_file(cls, path: str) -> "WordTokenizer":
        return cls(read_vocab(path))

    def __len__(self):
        return len(self.itos)

    def encode(self, text: str) -> List[int]:
        return [self.stoi.get(w, self.unk_id) for w in text.replace("\n", f" {EOS} ").split()]

    def encode_words(self, words: Sequence[str]) -> List[int]:
        return [self.stoi.get(w, self.unk_id) for w in words]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.itos[i] for i in ids)

    def save(self, directory: str):
        """tokenizer.json, tokenizer_config.json and special_tokens_map.json for
        transformers' PreTrainedTokenizerFast."""
        os.makedirs(directory, exist_ok=True)
        spec = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {"id": self.stoi[t], "content": t, "single_word": False, "lstrip": False,
                 "rstrip": False, "normalized": False, "special": True}
                for t in (PAD, UNK, EOS)
            ],
            "normalizer": {"type": "Replace", "pattern": {"String": "\n"},
                           "content": f" {EOS} "},
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": None,
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
            "model": {"type": "WordLevel", "vocab": self.stoi, "unk_token": UNK},
        }
        write_fast_tokenizer(directory, spec,
                             {"unk_token": UNK, "eos_token": EOS, "pad_token": PAD})


CHAR_UNK, CHAR_PAD = "<|unk|>", "<|pad|>"
# Splits text into single characters, newlines included (Oniguruma: [\s\S] is any character).
CHAR_SPLIT = {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated",
              "invert": False}


class CharTokenizer:
    """Character-level tokenizer over raw text: one id per character (newline = end of line);
    characters outside the vocabulary map to <|unk|>. Ids 0 and 1 are <|pad|> and <|unk|>."""

    level = "char"

    def __init__(self, vocab: Sequence[str]):
        self.itos = list(vocab)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.unk_id = self.stoi[CHAR_UNK]
        self.pad_id = self.stoi[CHAR_PAD]
        self.eos_id = self.stoi.get("\n", self.pad_id)
        self.space_id = self.stoi.get(" ", self.unk_id)

    @classmethod
    def build(cls, text: str, extra: str = "") -> "CharTokenizer":
        """Vocabulary: the specials, then every character of `text` and `extra` by descending
        frequency (ties by code point)."""
        counts = Counter(text)
        for c in extra:
            counts.setdefault(c, 0)
        return cls([CHAR_PAD, CHAR_UNK] + sorted(counts, key=lambda c: (-counts[c], c)))

    @classmethod
    def from_file(cls, path: str) -> "CharTokenizer":
        return cls(read_vocab(path))

    def __len__(self):
        return len(self.itos)

    def encode(self, text: str) -> List[int]:
        get, unk = self.stoi.get, self.unk_id
        return [get(c, unk) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.itos[i] for i in ids if i != self.pad_id)

    def save(self, directory: str):
        """tokenizer.json (WordLevel over characters, Split pre-tokenizer isolating each one,
        Fuse decoder), tokenizer_config.json and special_tokens_map.json."""
        os.makedirs(directory, exist_ok=True)
        spec = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {"id": self.stoi[t], "content": t, "single_word": False, "lstrip": False,
                 "rstrip": False, "normalized": False, "special": True}
                for t in (CHAR_PAD, CHAR_UNK)
            ],
            "normalizer": None,
            "pre_tokenizer": CHAR_SPLIT,
            "post_processor": None,
            "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "vocab": self.stoi, "unk_token": CHAR_UNK},
        }
        write_fast_tokenizer(directory, spec, {"unk_token": CHAR_UNK, "pad_token": CHAR_PAD})


def tokenizer_kind(path: str) -> Optional[str]:
    """"char", "word" or None (not one of ours) for a tokenizer.json."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("model", {}).get("type") != "WordLevel":
        return None
    pre = spec.get("pre_tokenizer") or {}
    return "char" if pre.get("type") == "Split" else "word"


def load_tokenizer(path: str):
    """The CharTokenizer or WordTokenizer saved in tokenizer.json at `path` (a file or a
    checkpoint directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    kind = tokenizer_kind(path)
    if kind == "char":
        return CharTokenizer.from_file(path)
    if kind == "word":
        return WordTokenizer.from_file(path)
    raise ValueError(f"{path}: not a tokenizer this harness reads (WordLevel)")


def encode_file(tok, path: str) -> List[int]:
    """A raw WikiText file as ids: characters for a CharTokenizer, the standard word stream (each
    line's words, then <eos>) for a WordTokenizer."""
    if tok.level == "char":
        return tok.encode(wikitext_text(path))
    return tok.encode_words(wikitext_words(path))


# -- needles ---------------------------------------------------------------------------------------

# The five needles (the paper used five; these use words of the WikiText vocabulary, and each key
# ends in its own noun so keys differ in the words next to the answer). Each needle is
# "<key> a b c d ." and the question, appended at the end of the prompt, repeats the key so the
# answer follows it: "<eos> what is <key without 'the'> ? <key>" -> "a b c d".
NEEDLE_KEYS = (
    ("the secret code is", "words"),
    ("the magic number is", "digits"),
    ("the hidden word is", "words"),
    ("the special key is", "words"),
    ("the reference name is", "digits"),
)
ANSWER_TOKENS = 4
DIGITS = [str(d) for d in range(10)]


def word_pool(words: Sequence[str], size: int = 1000, skip: int = 200,
              max_len: int = 0) -> List[str]:
    """Answer words: alphabetic, frequency ranks skip .. skip+size of the corpus (only words of
    at most `max_len` letters when it is > 0)."""
    counts = Counter(words)
    ranked = [w for w in sorted(counts, key=lambda w: (-counts[w], w))
              if w.isalpha() and w.islower() and w not in (UNK, EOS) and
              (max_len <= 0 or len(w) <= max_len)]
    return ranked[skip:skip + size]


def needle_text(key: str, answer: Sequence[str]) -> str:
    return f"{key} {' '.join(answer)} ."


def question_text(key: str, level: str = "word") -> str:
    """The question that ends a NIAH prompt. Word level: "<eos> what is the <subject> ? <key>";
    char level the same line in raw-text form, starting a new line as WikiText's lines do."""
    subject = key[len("the "):-len(" is")]
    if level == "char":
        return f"\n what is the {subject} ? {key}"
    return f"{EOS} what is the {subject} ? {key}"


def needle_segment(key: str, answer: Sequence[str], level: str = "word") -> str:
    """The text inserted into the haystack. Char level: with a leading space, inserted before a
    space of the haystack, so it sits between words (" ... word the secret code is a b c d .
    word ...")."""
    return (" " if level == "char" else "") + needle_text(key, answer)


def answer_segment(answer: Sequence[str], level: str = "word") -> str:
    """The text that follows the question (char level: after a space)."""
    return (" " if level == "char" else "") + " ".join(answer)


def word_boundary(hay: Sequence[int], pos: int, space_id: Optional[int]) -> int:
    """For character tokens: the nearest position at or before `pos` holding a space (insert
    there to land between words); `pos` itself when there is no space id (word tokens)."""
    if space_id is None:
        return pos
    p = min(pos, len(hay) - 1)
    while p > 0 and hay[p] != space_id:
        p -= 1
    return p if p > 0 or (hay and hay[0] == space_id) else pos


def random_answer(rng: random.Random, kind: str, pool: Sequence[str]) -> List[str]:
    choices = DIGITS if kind == "digits" else pool
    return [rng.choice(choices) for _ in range(ANSWER_TOKENS)]


class NiahTrial:
    """One needle-in-a-haystack prompt: ids, where the needle sits (and its answer tokens), and
    the expected answer."""

    def __init__(self, prompt_ids, answer_ids, answer_text, needle_pos, depth, needle, context,
                 answer_pos=None):
        self.prompt_ids = prompt_ids
        self.answer_ids = answer_ids
        self.answer_text = answer_text
        self.needle_pos = needle_pos
        self.depth = depth
        self.needle = needle
        self.context = context
        self.answer_pos = answer_pos  # first token of the answer inside the needle


def build_trial(encode, haystack_ids: Sequence[int], context: int, depth: float, needle: int,
                answer: Sequence[str], hay_offset: int, level: str = "word") -> NiahTrial:
    """A prompt of exactly `context` tokens: haystack from `hay_offset`, the needle at fraction
    `depth` of the haystack (char level: at the word boundary at or before it), the question at
    the end. `encode` maps text to ids; `level` is the tokenizer's ("word" or "char")."""
    key, _ = NEEDLE_KEYS[needle]
    needle_ids = encode(needle_segment(key, answer, level))
    question_ids = encode(question_text(key, level))
    answer_ids = encode(answer_segment(answer, level))
    key_len = len(needle_ids) - len(encode(" ".join(answer) + " ."))
    hay_len = context - len(needle_ids) - len(question_ids)
    if hay_len <= 0:
        raise ValueError(f"context {context} is too short for the needle and question")
    start = hay_offset % max(1, len(haystack_ids) - hay_len)
    if level == "char":  # end the haystack at the end of a word, before the question's newline
        space = encode(" ")[0]
        while start + hay_len < len(haystack_ids) - 1 and haystack_ids[start + hay_len] != space:
            start += 1
    hay = list(haystack_ids[start:start + hay_len])
    pos = int(depth * hay_len)
    if level == "char":
        pos = word_boundary(hay, pos, space)
    prompt = hay[:pos] + needle_ids + hay[pos:] + question_ids
    return NiahTrial(prompt, answer_ids, " ".join(answer), pos, depth, needle, context,
                     answer_pos=pos + key_len)


def niah_trials(encode, haystack_ids: Sequence[int], context: int, depths: Sequence[float],
                needles: Sequence[int], pool: Sequence[str], seed: int,
                level: str = "word") -> List[NiahTrial]:
    """One trial per (needle, depth), answers and haystack offsets drawn from `seed`. Ordered so
    that any prefix of the list (a run cut by a time limit) spreads over needles and depths:
    trial k has needle k mod N and depth k mod D when N and D are coprime (5 and 19), else the
    (needle, depth) pairs in a strided order."""
    rng = random.Random(seed)
    n, d = len(needles), len(depths)
    pairs = [(k % n, k % d) for k in range(n * d)]
    if len(set(pairs)) != n * d:
        pairs = [(i, j) for j in range(d) for i in range(n)]
    trials = []
    for ni, di in pairs:
        needle, depth = needles[ni], depths[di]
        answer = random_answer(rng, NEEDLE_KEYS[needle][1], pool)
        offset = rng.randrange(0, 1 << 30)
        trials.append(build_trial(encode, haystack_ids, context, depth, needle, answer, offset,
                                  level))
    return trials


def answer_found(generated_text: str, answer_text: str) -> bool:
    """Case-insensitive substring match on whitespace-normalized text (the paper's rule)."""
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    return norm(answer_text) in norm(generated_text)


def default_depths(count: int = 19) -> List[float]:
    return [round(0.05 * (i + 1), 2) for i in range(count)]


def load_word_pool(checkpoint: str) -> Optional[List[str]]:
    path = os.path.join(checkpoint, "niah_pool.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None
