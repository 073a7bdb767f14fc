"""Text data for the quality harness: WikiText-2 streams, a word-level tokenizer, and the
needle-in-a-haystack prompts.

The reference model's tokenizer is word level over the (already tokenized) WikiText-2 vocabulary.
It is saved as a Hugging Face `tokenizer.json` (WordLevel model, a normalizer that turns each
newline into " <eos> ", whitespace pre-tokenizer) so PreTrainedTokenizerFast loads it, and
WordTokenizer below reads the same file without the `tokenizers` package. Both turn a raw
WikiText file into the standard word stream: the words of each line followed by <eos>.
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


class WordTokenizer:
    """Whitespace word-level tokenizer; unknown words map to <unk>."""

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
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec.get("model", {})
        if model.get("type") != "WordLevel":
            raise ValueError(f"{path}: not a WordLevel tokenizer")
        vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
        if [i for _, i in vocab] != list(range(len(vocab))):
            raise ValueError(f"{path}: vocabulary ids are not dense")
        return cls([w for w, _ in vocab])

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
        with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(spec, f, ensure_ascii=False)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": UNK,
            "eos_token": EOS,
            "pad_token": PAD,
            "model_max_length": 1000000,
            "clean_up_tokenization_spaces": False,
        }
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
            json.dump({"unk_token": UNK, "eos_token": EOS, "pad_token": PAD}, f, indent=2)


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


def word_pool(words: Sequence[str], size: int = 1000, skip: int = 200) -> List[str]:
    """Answer words: alphabetic, frequency ranks skip .. skip+size of the corpus."""
    counts = Counter(words)
    ranked = [w for w in sorted(counts, key=lambda w: (-counts[w], w))
              if w.isalpha() and w.islower() and w not in (UNK, EOS)]
    return ranked[skip:skip + size]


def needle_text(key: str, answer: Sequence[str]) -> str:
    return f"{key} {' '.join(answer)} ."


def question_text(key: str) -> str:
    subject = key[len("the "):-len(" is")]
    return f"{EOS} what is the {subject} ? {key}"


def random_answer(rng: random.Random, kind: str, pool: Sequence[str]) -> List[str]:
    choices = DIGITS if kind == "digits" else pool
    return [rng.choice(choices) for _ in range(ANSWER_TOKENS)]


class NiahTrial:
    """One needle-in-a-haystack prompt: ids, where the needle sits, and the expected answer."""

    def __init__(self, prompt_ids, answer_ids, answer_text, needle_pos, depth, needle, context):
        self.prompt_ids = prompt_ids
        self.answer_ids = answer_ids
        self.answer_text = answer_text
        self.needle_pos = needle_pos
        self.depth = depth
        self.needle = needle
        self.context = context


def build_trial(encode, haystack_ids: Sequence[int], context: int, depth: float, needle: int,
                answer: Sequence[str], hay_offset: int) -> NiahTrial:
    """A prompt of exactly `context` tokens: haystack from `hay_offset`, the needle at fraction
    `depth` of the haystack, the question at the end. `encode` maps text to ids."""
    key, _ = NEEDLE_KEYS[needle]
    needle_ids = encode(needle_text(key, answer))
    question_ids = encode(question_text(key))
    answer_ids = encode(" ".join(answer))
    hay_len = context - len(needle_ids) - len(question_ids)
    if hay_len <= 0:
        raise ValueError(f"context {context} is too short for the needle and question")
    start = hay_offset % max(1, len(haystack_ids) - hay_len)
    hay = list(haystack_ids[start:start + hay_len])
    pos = int(depth * hay_len)
    prompt = hay[:pos] + needle_ids + hay[pos:] + question_ids
    return NiahTrial(prompt, answer_ids, " ".join(answer), pos, depth, needle, context)


def niah_trials(encode, haystack_ids: Sequence[int], context: int, depths: Sequence[float],
                needles: Sequence[int], pool: Sequence[str], seed: int) -> List[NiahTrial]:
    """One trial per (needle, depth), answers and haystack offsets drawn from `seed`."""
    rng = random.Random(seed)
    trials = []
    for needle in needles:
        for depth in depths:
            answer = random_answer(rng, NEEDLE_KEYS[needle][1], pool)
            offset = rng.randrange(0, 1 << 30)
            trials.append(build_trial(encode, haystack_ids, context, depth, needle, answer,
                                      offset))
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
