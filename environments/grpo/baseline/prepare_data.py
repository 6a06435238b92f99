"""Build the GRPO environment's data directory (protected: ideas never edit this file).

Real data (paper scale, needs network and the `datasets` package):
    HPCX_DATA_DIR=... python prepare_data.py
writes `train.jsonl` (the 7,500 MATH training problems, answer = last \\boxed{} of the solution; the
few solutions without one are kept with an empty answer, as the paper's data does)
and `test.jsonl` (the 500 MATH-500 test problems), one JSON object per line:
{"problem", "solution", "answer"}; and `val.jsonl`, 500 training problems drawn with a fixed seed
(still trained on) on which the training picks the policy it hands over, so that nothing in training
needs the test set (the environment hides `test.jsonl` from training: `eval_only`).

CPU preset (offline, about 15 s on one thread):
    HPCX_DATA_DIR=... python prepare_data.py --synthetic --tiny-model
writes a small deterministic arithmetic data set in the same format (train / val / test) and a
tiny Qwen2 model with a
byte-level tokenizer under `tiny_model/` (random init, then a few seconds of supervised steps that
teach it the answer format), so the same training code runs without downloading anything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

from math_equivalence import last_boxed

MATH_TRAIN = "EleutherAI/hendrycks_math"  # the 7 MATH subjects, 7,500 training problems in all
MATH_SUBJECTS = [
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
]
MATH_TEST = "HuggingFaceH4/MATH-500"  # the 500-problem test subset used by the paper
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 256, 32
# The checkpoint-selection split is as large as the test set (500 in the paper), so selecting on it is
# as noisy as the paper's selection on the test set was.
MATH_VAL, SYNTHETIC_VAL = 500, SYNTHETIC_TEST
VAL_SEED = 0
# Tags are ordinary (not special) tokens so decoding keeps them in the text the grader reads.
TINY_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
WARM_START_STEPS, WARM_START_BATCH = 300, 16


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def validation_split(train: list[dict], size: int) -> list[dict]:
    """`size` training problems drawn with a fixed seed, in the order drawn: the split on which the
    training selects its checkpoint. They stay in train.jsonl, so the training data is unchanged."""
    return random.Random(VAL_SEED).sample(train, size)


def write_splits(out: Path, train: list[dict], test: list[dict], val_size: int) -> None:
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", validation_split(train, val_size))
    write_jsonl(out / "test.jsonl", test)


def math_rows(examples: Iterable[tuple[str, dict]]) -> list[dict]:
    """Training rows of (subject, MATH example) pairs, answer = the solution's last \\boxed{}. All are
    kept, as in the paper: a solution without a box gets an empty answer, which nothing equals
    (reward 0 for every response); how many there are is printed."""
    rows, unboxed = [], []
    for subject, ex in examples:
        answer = last_boxed(ex["solution"])
        if answer is None:
            unboxed.append(subject)
        rows.append({"problem": ex["problem"], "solution": ex["solution"], "answer": answer or ""})
    if unboxed:
        print(
            f"{len(unboxed)} of {len(rows)} training solutions have no \\boxed{{}} answer "
            f"({', '.join(sorted(set(unboxed)))}): kept with an empty answer (reward 0)",
            flush=True,
        )
    return rows


def prepare_math(out: Path) -> None:
    from datasets import load_dataset  # only the real path needs it (and the network)

    train = math_rows(
        (subject, ex) for subject in MATH_SUBJECTS for ex in load_dataset(MATH_TRAIN, subject, split="train")
    )
    test = [
        {"problem": ex["problem"], "solution": ex["solution"], "answer": ex["answer"]}
        for ex in load_dataset(MATH_TEST, split="test")
    ]
    if (len(train), len(test)) != (7500, 500):
        raise SystemExit(f"expected 7500 train / 500 test problems, got {len(train)} / {len(test)}")
    write_splits(out, train, test, MATH_VAL)


def synthetic_problem(rng: random.Random) -> dict:
    """One small problem. Parity and comparison answers can be guessed, so a tiny model earns some
    reward; fractions exercise the grader's LaTeX path."""
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    kind = rng.choice(["parity", "larger", "add", "fraction"])
    if kind == "parity":
        n = rng.randint(1, 99)
        answer = "odd" if n % 2 else "even"
        return _math_row(
            f"Is ${n}$ even or odd?", f"${n}$ leaves remainder ${n % 2}$ when divided by 2", answer
        )
    if kind == "larger":
        return _math_row(
            f"Which is larger, ${a}$ or ${b}$?", f"The larger number is ${max(a, b)}$", str(max(a, b))
        )
    if kind == "add":
        return _math_row(f"What is ${a} + {b}$?", f"${a} + {b} = {a + b}$", str(a + b))
    q = Fraction(a, b)
    answer = str(q.numerator) if q.denominator == 1 else f"\\frac{{{q.numerator}}}{{{q.denominator}}}"
    return _math_row(
        f"Simplify $\\frac{{{a}}}{{{b}}}$.",
        f"Dividing ${a}$ and ${b}$ by their greatest common divisor gives ${answer}$",
        answer,
    )


def _math_row(problem: str, reasoning: str, answer: str) -> dict:
    """A row in MATH's layout: the solution ends with the boxed answer."""
    return {
        "problem": problem,
        "solution": f"{reasoning}, so the answer is $\\boxed{{{answer}}}$.",
        "answer": answer,
    }


def prepare_synthetic(out: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    problems = [synthetic_problem(rng) for _ in range(SYNTHETIC_TRAIN + SYNTHETIC_TEST)]
    write_splits(out, problems[:SYNTHETIC_TRAIN], problems[SYNTHETIC_TRAIN:], SYNTHETIC_VAL)


def build_tiny_model(out: Path, train: list[dict], seed: int = 0) -> None:
    """A 2-layer Qwen2 plus a byte-level tokenizer: real HF classes, no download, warm-started."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(out)
    model = tiny_qwen2(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=seed)
    warm_start(model, tokenizer, train, seed)
    model.save_pretrained(out)


def build_tiny_tokenizer():
    """Byte-level BPE without merges over printable ASCII, plus the r1-zero tags and prompt text."""
    sys.dont_write_bytecode = True  # we run inside baseline/: importing reward.py must not litter it
    from grader import R1_ZERO_PROMPT
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte-to-unicode alphabet: space and newline are chr(256 + byte). Every sampled token
    # decodes to a real character, so the text the trainer re-tokenises gives back exactly the sampled
    # tokens.
    alphabet = [chr(b) for b in range(33, 127)] + [chr(256 + 32), chr(256 + 10)]
    core = Tokenizer(
        models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[], unk_token="<|unk|>")
    )
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", eos_token="<|endoftext|>", unk_token="<|unk|>"
    )
    # The r1-zero prompt's fixed text around the question becomes two tokens (as a BPE merges frequent
    # strings), so the tiny model sees ~40-token prompts and its warm start takes seconds, not minutes.
    tokenizer.add_tokens(TINY_TAGS + R1_ZERO_PROMPT.split("{question}"))
    return tokenizer


def tiny_qwen2(tokenizer, hidden_size: int, num_layers: int, num_heads: int, seed: int = 0):
    """A randomly initialised Qwen2 for `tokenizer`, sized by the arguments (2 KV heads or fewer)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=min(2, num_heads),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    return Qwen2ForCausalLM(config)


def warm_start(model, tokenizer, train: list[dict], seed: int) -> None:
    """A few supervised steps on `<prompt> X </think> <answer> X </answer>`.

    They teach the random model the r1-zero layout and a little of the task: it then writes a formatted
    answer most of the time and a right one about a third of the time, so the CPU preset's GRPO sees
    groups with mixed rewards, as the paper's base model does, instead of all-zero groups.
    """
    import torch
    from grader import R1_ZERO_PROMPT

    torch.set_num_threads(1)  # the same bytes on every machine
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(WARM_START_STEPS):
        seqs, starts = [], []
        for row in rng.sample(train, WARM_START_BATCH):
            prompt = tokenizer(R1_ZERO_PROMPT.format(question=row["problem"]), add_special_tokens=False)
            target = tokenizer(
                f" {row['answer']} </think> <answer> {row['answer']} </answer>",
                add_special_tokens=False,
            )
            seqs.append(prompt["input_ids"] + target["input_ids"] + [tokenizer.eos_token_id])
            starts.append(len(prompt["input_ids"]))
        width = max(len(seq) for seq in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        attention = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)  # loss on the response only
        for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
            ids[i, : len(seq)] = torch.tensor(seq)
            attention[i, : len(seq)] = 1
            labels[i, start : len(seq)] = torch.tensor(seq[start:])
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=os.environ.get("HPCX_DATA_DIR"), help="default: $HPCX_DATA_DIR")
    parser.add_argument("--synthetic", action="store_true", help="small offline arithmetic set (CPU preset)")
    parser.add_argument(
        "--tiny-model",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="also build a tiny random Qwen2 + tokenizer (default DIR: <data-dir>/tiny_model)",
    )
    args = parser.parse_args()
    if not args.data_dir:
        raise SystemExit("give --data-dir or set HPCX_DATA_DIR")
    out = Path(args.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        prepare_synthetic(out)
    else:
        prepare_math(out)
    if args.tiny_model is not None:
        with (out / "train.jsonl").open() as f:
            train = [json.loads(line) for line in f]
        build_tiny_model(Path(args.tiny_model) if args.tiny_model else out / "tiny_model", train)
    print(f"prepared {out}")


if __name__ == "__main__":
    main()
