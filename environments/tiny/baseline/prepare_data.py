"""Generate the tiny environment's corpus: text from a fixed-seed stochastic grammar.

No download: a small invented language (random syllable words, topic paragraphs, English-like
sentences with subject-verb agreement across optional prepositional phrases, and two-digit sums)
is sampled with a seeded generator and written as character ids. The grammar is unambiguous (a
parse of the text recovers every random choice), so the summed log-probability of the choices is
exactly -log P(text) under the true generator; divided by the number of characters it is the best
loss any model can reach on that text, which the environment config uses as a lower bound.

Writes into $HPCX_DATA_DIR: train.bin and val.bin (uint8 ids), meta.json (vocab, sizes, entropy).
Byte-identical across runs and Python versions: only ``random.Random.random`` is used to sample.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np

SEED = 1234
TRAIN_CHARS = 1_500_000  # far more than a trial reads: training never repeats a window
VAL_CHARS = 131_072
# Every character the grammar can emit; ids are indices into this string.
VOCAB = "\n #+.=0123456789abcdefghijklmnopqrstuvwxyz"


class Sampler:
    """Seeded sampler that also accumulates the negative log-probability of every choice made."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.nll = 0.0

    def pick(self, weights: list[float]) -> int:
        total = sum(weights)
        u = self.rng.random() * total
        acc = 0.0
        for i, w in enumerate(weights):
            acc += w
            if u < acc:
                self.nll -= math.log(w / total)
                return i
        self.nll -= math.log(weights[-1] / total)
        return len(weights) - 1

    def coin(self, p: float) -> bool:
        return self.pick([1.0 - p, p]) == 1


def zipf(n: int, s: float = 1.1) -> list[float]:
    return [1.0 / (k + 1) ** s for k in range(n)]


def make_lexicon(rng: random.Random) -> dict[str, list[str]]:
    """Invented words; all surface forms (including plural nouns and -s verbs) are distinct."""
    onsets, vowels, codas = "bdfgklmnprtvz", "aeiou", ["", "", "n", "r", "l", "k"]
    sizes = {"noun": 80, "tverb": 30, "iverb": 20, "adj": 30, "adv": 12, "prep": 8, "topic": 6}
    used = {"a", "the", "one", "this", "some", "many", "these", "and"}
    lex: dict[str, list[str]] = {}
    for cat, n in sizes.items():
        words: list[str] = []
        while len(words) < n:
            nsyl = 1 + int(rng.random() * (1 if cat in ("prep", "adv") else 3))
            w = "".join(
                onsets[int(rng.random() * len(onsets))]
                + vowels[int(rng.random() * len(vowels))]
                + codas[int(rng.random() * len(codas))]
                for _ in range(nsyl)
            )
            forms = {w, w + "s"} if cat in ("noun", "tverb", "iverb") else {w}
            # Words never end in "s" themselves, so "+s" forms cannot collide with a base form.
            if forms & used or w.endswith("s") or len(w) < 2:
                continue
            used |= forms
            words.append(w)
        lex[cat] = words
    return lex


DETS = {False: ["the", "a", "one", "this"], True: ["the", "some", "many", "these"]}
DET_W = {False: [5.0, 3.0, 1.0, 1.0], True: [5.0, 2.0, 1.0, 1.0]}


class Grammar:
    def __init__(self, lex: dict[str, list[str]], rng: random.Random) -> None:
        self.lex = lex
        # Each topic prefers its own nouns and verbs: a Zipf law over a topic-specific ordering.
        self.topic_order = {}
        for t in range(len(lex["topic"])):
            order = {cat: list(range(len(lex[cat]))) for cat in ("noun", "tverb", "iverb", "adj")}
            for idx in order.values():
                rng.shuffle(idx)
            self.topic_order[t] = order

    def word(self, s: Sampler, topic: int, cat: str) -> str:
        order = self.topic_order[topic][cat]
        return self.lex[cat][order[s.pick(zipf(len(order)))]]

    def noun_phrase(self, s: Sampler, topic: int) -> tuple[str, bool]:
        plural = s.coin(0.4)
        det = DETS[plural][s.pick(DET_W[plural])]
        adjs = [self.word(s, topic, "adj") for _ in range(s.pick([5.0, 3.0, 2.0]))]
        noun = self.word(s, topic, "noun") + ("s" if plural else "")
        return " ".join([det, *adjs, noun]), plural

    def clause(self, s: Sampler, topic: int) -> str:
        subj, plural = self.noun_phrase(s, topic)
        if s.coin(0.35):  # the verb must agree with the head noun, not the prepositional object
            prep = self.lex["prep"][s.pick(zipf(len(self.lex["prep"])))]
            subj = f"{subj} {prep} {self.noun_phrase(s, topic)[0]}"
        if s.coin(0.6):
            verb = self.word(s, topic, "tverb")
            obj = self.noun_phrase(s, topic)[0]
            pred = f"{verb if plural else verb + 's'} {obj}"
        else:
            verb = self.word(s, topic, "iverb")
            pred = verb if plural else verb + "s"
        if s.coin(0.25):
            pred += " " + self.lex["adv"][s.pick(zipf(len(self.lex["adv"])))]
        return f"{subj} {pred}"

    def sentence(self, s: Sampler, topic: int) -> str:
        if s.coin(0.15):
            a, b = s.pick([1.0] * 100), s.pick([1.0] * 100)
            return f"{a}+{b}={a + b}."
        text = self.clause(s, topic)
        if s.coin(0.2):
            text += " and " + self.clause(s, topic)
        return text + "."

    def paragraph(self, s: Sampler) -> str:
        topic = s.pick([1.0] * len(self.lex["topic"]))
        n = 2 + s.pick([1.0] * 6)
        body = " ".join(self.sentence(s, topic) for _ in range(n))
        return f"# {self.lex['topic'][topic]}\n{body}\n"


def generate(grammar: Grammar, seed: int, n_chars: int) -> tuple[str, float]:
    """Whole paragraphs until at least n_chars; returns (text, -log P(text) under the generator)."""
    s = Sampler(seed)
    parts: list[str] = []
    length = 0
    while length < n_chars:
        parts.append(grammar.paragraph(s))
        length += len(parts[-1])
    return "".join(parts), s.nll


def main() -> None:
    out = Path(os.environ.get("HPCX_DATA_DIR", "data"))
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    grammar = Grammar(make_lexicon(rng), rng)
    table = np.full(256, 255, dtype=np.uint8)
    table[np.frombuffer(VOCAB.encode(), dtype=np.uint8)] = np.arange(len(VOCAB), dtype=np.uint8)
    meta: dict[str, object] = {"vocab": VOCAB, "vocab_size": len(VOCAB), "dtype": "uint8", "seed": SEED}
    for split, seed, n in (("train", SEED + 1, TRAIN_CHARS), ("val", SEED + 2, VAL_CHARS)):
        text, nll = generate(grammar, seed, n)
        ids = table[np.frombuffer(text.encode(), dtype=np.uint8)]
        assert (ids != 255).all(), "grammar emitted a character outside VOCAB"
        ids.tofile(out / f"{split}.bin")
        meta[f"{split}_tokens"] = len(ids)
        meta[f"{split}_entropy_nats_per_token"] = round(nll / len(ids), 6)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out}: {json.dumps(meta)}")


if __name__ == "__main__":
    main()
