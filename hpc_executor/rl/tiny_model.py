"""A tiny causal LM and its tokenizer, built in code (no download) for the CPU preset and the tests.

The tokenizer is a byte-level BPE trained on ``texts`` (phrases become tokens) (so it can encode any string, and decodes
back to exactly the text); the model is a two-layer Llama (rotary positions: no learned position
table, so a prompt longer than the warm-up texts costs nothing) warm-started for a few seconds on
``texts``, so that sampling from it produces text like them: for the RL loop, ideas in the project's
``<idea><title>..</title><description>..</description></idea>`` format, one per sample, the catalog's
ideas with their ``(recipe: ..)`` so the offline implementer can map them back. Everything is
seeded: the same texts and seed give the same files, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hpc_executor.errors import ConfigError
from hpc_executor.llm.offline import OfflineLLM, Step, load_catalog
from hpc_executor.rl.lora import torch_threads

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# Merges cross word boundaries (no pre-splitting at spaces), so with this many tokens a catalog idea
# is ~20 tokens of whole phrases: short enough to learn in seconds, long enough to recombine.
VOCAB_SIZE = 1600
HIDDEN, LAYERS, HEADS = 64, 2, 4
MAX_POSITIONS = 2048
# Enough for about 70% of samples to be catalog ideas with a valid recipe, some recombined;
# a few seconds on one idle core.
WARMUP_STEPS = 120
WARMUP_LR = 2e-2  # decayed linearly to 0
WARMUP_BATCH = 32  # texts per warm-up step (all of them when there are fewer)
DESCRIPTION_WORDS = 16  # a catalog description's first sentence, at most this many words
COMPLETE = "BUILT"  # written last: a directory without it is a build that did not finish


def build_tiny_model(out_dir: Path, texts: list[str], seed: int, *, prompt: str = "") -> Path:
    """A Hugging Face model directory at ``out_dir`` (config, weights, tokenizer), loadable with
    ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``, warm-started on ``texts``: each is
    one completion of ``prompt`` (bos + prompt + text + eos, prompt and text tokenised apart, as the
    policy tokenises a prompt and samples after it). A finished build of the same texts, prompt and
    seed at ``out_dir`` is reused (a resumed run's adapters were trained on it), one of others is
    refused; the build is written to a temporary directory and renamed, so a killed build leaves
    nothing half-made."""
    out_dir = Path(out_dir)
    texts = [t for t in texts if t.strip()]
    recipe = {
        "seed": seed,
        "prompt": prompt,
        "texts_sha256": hashlib.sha256(json.dumps(texts).encode()).hexdigest(),
    }
    if (out_dir / COMPLETE).is_file():
        if json.loads((out_dir / COMPLETE).read_text()) != recipe:
            raise ConfigError(
                f"the tiny model at {out_dir} was built from other texts, prompt or seed, and the run's "
                "policy versions were trained on it: use a new run directory, or delete it to rebuild"
            )
        return out_dir
    if not texts:
        raise ConfigError(
            "the tiny model needs some texts to warm up on (the environment's idea catalog, say)"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        tokenizer = _train_tokenizer([prompt, *texts])
        # One thread: the same bytes on every machine (threads split sums in other orders).
        with torch_threads(1), torch.random.fork_rng():
            torch.manual_seed(seed)
            model = _new_model(tokenizer)
            _warm_up(model, tokenizer, prompt, texts)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE).write_text(json.dumps(recipe) + "\n")
        if out_dir.exists():  # an unfinished earlier build (no marker)
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def catalog_texts(catalog_path: str) -> list[str]:
    """The environment's catalog as ideas in the project's format, one per entry with its default
    parameters, as the offline stand-in writes them (the recipe included, so the offline implementer
    can map a sampled idea back onto its diff), each description cut to its first sentence (a tiny
    model learns short texts in seconds)."""
    catalog = {
        k: {**e, "description": _first_sentence(str(e["description"]))}
        for k, e in load_catalog(catalog_path).items()
    }
    recipes = [
        [Step(k, tuple((name, str(values[0])) for name, values in (e.get("params") or {}).items()))]
        for k, e in catalog.items()
    ]
    return [OfflineLLM.idea_text(recipe, catalog) for recipe in recipes]


def _first_sentence(text: str) -> str:
    words = text.split()
    for i, word in enumerate(words[:DESCRIPTION_WORDS]):
        if word.endswith("."):
            return " ".join(words[: i + 1])
    return " ".join(words[:DESCRIPTION_WORDS])


def _train_tokenizer(texts: Sequence[str]) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, whatever the prompt
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, bpe.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def _new_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def _warm_up(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt: str, texts: Sequence[str]
) -> None:
    """Next-token training on the texts (bos + prompt + text + eos, padding masked out of the loss)."""
    head = tokenizer(prompt)["input_ids"]
    docs = [
        head + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts
    ]
    width = max(len(d) for d in docs)
    ids = torch.full((len(docs), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(docs), width), dtype=torch.long)
    for row, doc in enumerate(docs):
        ids[row, : len(doc)] = torch.tensor(doc)
        attention[row, : len(doc)] = 1
    labels = ids.masked_fill(attention == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=WARMUP_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / WARMUP_STEPS)
    model.train()
    for _ in range(WARMUP_STEPS):
        batch = torch.randperm(len(docs))[:WARMUP_BATCH]
        out = model(input_ids=ids[batch], attention_mask=attention[batch], labels=labels[batch])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
