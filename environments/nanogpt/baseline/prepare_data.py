"""Build the nanoGPT data directory: GPT-2 token shards in the llm.c / modded-nanogpt format.

Shard format: a header of 256 int32 (magic 20240520, version 1, token count, then zeros) followed
by the tokens as uint16. Shard 0 is validation (``fineweb_val_000000.bin``), shards 1.. are
training (``fineweb_train_000001.bin``, ...).

Two sources:
- default: FineWeb (HuggingFace ``datasets``) tokenized with tiktoken's GPT-2 encoding, each
  document preceded by <|endoftext|>, in shards of 100M tokens. Needs network and
  ``pip install datasets tiktoken``.
- ``--synthetic``: a small deterministic corpus generated here (no download) for the CPU preset
  and the tests. It uses only ids below 512 (511 separates documents) so that the CPU preset's
  model can have a 512-entry vocabulary: at 50k entries the output layer alone would eat a
  one-thread CPU's whole budget. Documents are random walks over a few hundred token ids whose
  transition table depends on a topic token at the start of each document, so a model gains from
  both the previous token and from attention to the document's start. Its exact per-token entropy
  (the loss of the Bayes-optimal predictor, a floor no honest model can beat) is written to
  ``synthetic_meta.json``.

Output goes to ``--out`` or, when absent, ``$HPCX_DATA_DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
EOT = 50256  # GPT-2's <|endoftext|>


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write one shard atomically (a reader never sees a half-written file)."""
    assert tokens.max(initial=0) < 2**16, "token ids must fit in uint16"
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    tmp.replace(path)


def shard_name(index: int) -> str:
    split = "val" if index == 0 else "train"
    return f"fineweb_{split}_{index:06d}.bin"


# ---------------------------------------------------------------------------------------------
# FineWeb (paper scale)

_encoder = None


def _tokenize(text: str) -> np.ndarray:
    global _encoder
    if _encoder is None:  # one encoder per worker process
        import tiktoken

        _encoder = tiktoken.get_encoding("gpt2")
    return np.array([EOT, *_encoder.encode_ordinary(text)], dtype=np.uint16)


def prepare_fineweb(
    out: Path, train_shards: int, shard_tokens: int, dataset: str, subset: str, workers: int
) -> None:
    import multiprocessing

    from datasets import load_dataset

    docs = (row["text"] for row in load_dataset(dataset, name=subset, split="train", streaming=True))
    buf = np.empty(shard_tokens, dtype=np.uint16)
    filled, index = 0, 0
    # Tokenizing is the slow part: spread it over a process pool (or run inline with one worker).
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        tokenized = pool.imap(_tokenize, docs, chunksize=16) if pool else map(_tokenize, docs)
        for tokens in tokenized:
            while len(tokens):
                take = min(len(tokens), shard_tokens - filled)
                buf[filled : filled + take] = tokens[:take]
                filled, tokens = filled + take, tokens[take:]
                if filled == shard_tokens:
                    write_shard(out / shard_name(index), buf)
                    print(f"wrote {shard_name(index)}", flush=True)
                    filled, index = 0, index + 1
                    if index > train_shards:
                        return
    if filled:  # the dataset ran out: keep the partial last shard
        write_shard(out / shard_name(index), buf[:filled])


# ---------------------------------------------------------------------------------------------
# Synthetic corpus (CPU preset and tests)


@dataclass(frozen=True)
class SyntheticGrammar:
    seed: int = 1234
    vocab: int = 512  # ids used: content and topic tokens below vocab - 1, separator vocab - 1
    n_states: int = 256  # distinct content tokens
    n_topics: int = 4  # each topic has its own transition table
    successors: int = 4  # likely next tokens per (topic, token)
    noise: float = 0.05  # probability of jumping to a uniformly random token instead
    p_end: float = 1 / 96  # per-token probability that the document ends

    def tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(content ids, topic ids, transition probabilities [topic, state, next state])."""
        rng = np.random.default_rng(self.seed)
        ids = rng.choice(self.vocab - 1, size=self.n_states + self.n_topics, replace=False)
        weights = np.array([0.6, 0.25, 0.1, 0.05])[: self.successors]
        weights = weights / weights.sum()
        nxt = rng.integers(self.n_states, size=(self.n_topics, self.n_states, self.successors))
        probs = np.full((self.n_topics, self.n_states, self.n_states), self.noise / self.n_states)
        t_idx, s_idx = np.indices((self.n_topics, self.n_states))
        for j in range(self.successors):  # add.at: two successors may coincide
            np.add.at(probs, (t_idx, s_idx, nxt[..., j]), (1 - self.noise) * weights[j])
        return ids[: self.n_states], ids[self.n_states :], probs


def _documents(grammar: SyntheticGrammar, stream_seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless documents as (tokens, negative log-likelihood of each token given its past)."""
    content_ids, topic_ids, probs = grammar.tables()
    cdf = np.cumsum(probs, axis=-1)
    rng = np.random.default_rng([grammar.seed, stream_seed])
    log_cont = np.log1p(-grammar.p_end)
    while True:
        topic = int(rng.integers(grammar.n_topics))
        length = int(rng.geometric(grammar.p_end))
        states = np.empty(length, dtype=np.int64)
        states[0] = rng.integers(grammar.n_states)
        uniforms = rng.random(length)
        for i in range(1, length):
            row = cdf[topic, states[i - 1]]
            nxt = int(np.searchsorted(row, uniforms[i] * row[-1], side="right"))
            states[i] = min(nxt, grammar.n_states - 1)  # guards against float round-off at the end
        nll = np.empty(length + 2)
        nll[0] = -np.log(grammar.p_end)  # the separator closes the previous document
        nll[1] = np.log(grammar.n_topics)  # topic token: uniform
        nll[2] = np.log(grammar.n_states)  # first content token: uniform
        nll[3:] = -np.log(probs[topic, states[:-1], states[1:]]) - log_cont
        tokens = np.concatenate([[grammar.vocab - 1, topic_ids[topic]], content_ids[states]])
        yield tokens, nll


def synthetic_stream(grammar: SyntheticGrammar, stream_seed: int, n_tokens: int) -> tuple[np.ndarray, float]:
    """``n_tokens`` tokens of one stream and the mean entropy (nats) of tokens 1.. given their past."""
    parts, nlls, total = [], [], 0
    for tokens, nll in _documents(grammar, stream_seed):
        parts.append(tokens)
        nlls.append(nll)
        total += len(tokens)
        if total >= n_tokens:
            break
    tokens = np.concatenate(parts)[:n_tokens]
    # The stream's first token has no past, so it is never a target.
    nll = np.concatenate(nlls)[1:n_tokens]
    return tokens.astype(np.uint16), float(nll.mean())


def prepare_synthetic(out: Path, train_shards: int, shard_tokens: int, val_tokens: int, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    grammar = SyntheticGrammar(seed=seed)
    val, entropy = synthetic_stream(grammar, 0, val_tokens)
    write_shard(out / shard_name(0), val)
    for index in range(1, train_shards + 1):
        tokens, _ = synthetic_stream(grammar, index, shard_tokens)
        write_shard(out / shard_name(index), tokens)
    meta = {"grammar": asdict(grammar), "val_entropy_nats": entropy, "val_tokens": val_tokens}
    (out / "synthetic_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {train_shards} synthetic train shards and a val shard to {out}; val entropy {entropy:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: $HPCX_DATA_DIR)")
    parser.add_argument("--synthetic", action="store_true", help="generate a small corpus instead of FineWeb")
    parser.add_argument("--train-shards", type=int, default=None, help="default: 80 (FineWeb), 2 (synthetic)")
    parser.add_argument(
        "--shard-tokens", type=int, default=None, help="default: 100M (FineWeb), 262144 (synthetic)"
    )
    parser.add_argument("--val-tokens", type=int, default=65_536, help="synthetic only")
    parser.add_argument("--seed", type=int, default=1234, help="synthetic only")
    parser.add_argument("--dataset", default="HuggingFaceFW/fineweb")
    parser.add_argument("--subset", default="sample-10BT")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = parser.parse_args()

    out = args.out or Path(os.environ["HPCX_DATA_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        prepare_synthetic(
            out, args.train_shards or 2, args.shard_tokens or 262_144, args.val_tokens, args.seed
        )
    else:
        shard_tokens = args.shard_tokens or 100_000_000
        prepare_fineweb(out, args.train_shards or 80, shard_tokens, args.dataset, args.subset, args.workers)


if __name__ == "__main__":
    main()
