"""A Hugging Face base model with a policy version's LoRA adapter, and token log-probs under it.

Shared by the in-process sampler (``TransformersPolicy``) and the update (``run_update``), so both
read a version, and compute a completion's log-probs, the same way. A version directory holds the
adapter as ``peft`` saves it, the AdamW state, and a marker written last (see ``update``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from hpc_executor.errors import HpcExecutorError
from hpc_executor.rl.policy import PolicyVersion

VERSION_MARKER = "COMPLETE"  # the last file an update writes into a version directory


class PolicyUpdateError(HpcExecutorError):
    """A policy step cannot be taken (bad recorded examples, a step out of order)."""


class AdapterError(PolicyUpdateError):
    """A policy version's adapter directory is missing, unfinished or cannot be loaded."""


def load_base(base_model: str) -> PreTrainedModel:
    """The base model in float32, on the GPU where there is one (the update job's node)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise PolicyUpdateError(
            f"the policy's base model {base_model!r} cannot be loaded ({exc}); set policy.model to a "
            "Hugging Face model directory or hub id, or to 'tiny' for the model built in code"
        ) from exc
    model.eval()
    if torch.cuda.is_available():
        torch.nn.Module.to(model, "cuda")  # in place (transformers' own ``to`` is typed for dtypes)
    return model


def with_adapter(
    base: PreTrainedModel, version: PolicyVersion, *, trainable: bool, lora_rank: int
) -> PeftModel:
    """``base`` with ``version``'s adapter; version 0 (no adapter) gets a fresh one whose B matrices
    are zero, so it computes exactly the base model (seed torch first: A is drawn at random)."""
    if version.path is None:
        config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0, target_modules="all-linear")
        return get_peft_model(base, config)
    path = Path(version.path)
    redo = f"delete {path} and rerun the update of step {version.step} (it starts from version {version.step - 1})"
    if not path.is_dir():
        raise AdapterError(f"policy version {version.step}'s adapter directory {path} is missing; {redo}")
    if not (path / VERSION_MARKER).is_file():
        raise AdapterError(
            f"policy version {version.step} at {path} is unfinished (no {VERSION_MARKER}); {redo}"
        )
    try:
        model = PeftModel.from_pretrained(base, str(path), is_trainable=trainable)
    except Exception as exc:  # peft and safetensors raise many kinds for a damaged file
        raise AdapterError(
            f"policy version {version.step}'s adapter at {path} cannot be loaded ({exc}); {redo}"
        ) from exc
    return model


def completion_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    *,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each completion's tokens given its prompt, from ``log_softmax(logits /
    temperature)``, and the mask of real tokens: two (batch, longest completion) tensors,
    right-padded. Gradients flow unless the caller disables them. Padding is token 0: it is masked
    out of attention and of the result, so any valid id will do."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    if not all(prompts):
        raise ValueError("every completion needs a prompt of at least one token (a bos token, say)")
    rows = [p + c for p, c in zip(prompts, completions, strict=True)]
    width = max(len(r) for r in rows)
    longest = max((len(c) for c in completions), default=0)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
    device = next(model.parameters()).device
    ids, attention = ids.to(device), attention.to(device)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    token_logprobs = (
        torch.log_softmax(logits / temperature, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    )
    # Completion token j of row i is predicted at position len(prompt_i) - 1 + j.
    offsets = torch.arange(longest, device=device).unsqueeze(0)
    starts = torch.tensor([len(p) - 1 for p in prompts], device=device).unsqueeze(1)
    lengths = torch.tensor([len(c) for c in completions], device=device).unsqueeze(1)
    mask = offsets < lengths
    positions = (starts + offsets).clamp(max=width - 2)
    picked = token_logprobs.gather(1, positions)
    return picked.masked_fill(~mask, 0.0), mask


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for the block. A tiny model gains nothing from more
    threads and loses much on busy cores (two threads on a shared 2-core machine trained 6x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
