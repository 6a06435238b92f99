"""One policy step on Hugging Face weights: base + adapter N and its AdamW state -> adapter N+1.

``run_update(spec)`` reads the recorded samples (JSON lines of ``TrainingExample``), recomputes their
tokens' log-probs under version N, takes one importance-sampled policy-gradient step (``loss``) with
AdamW on the LoRA weights only, and writes version N+1 (adapter, optimiser state, the step's stats)
to ``<out_dir>/step_<N+1>``. It is a plain function of a picklable spec, so it runs in-process (the
CPU preset) or as a scheduler job on a GPU node (``Scheduler.submit_call(run_update, (spec,), ...)``).

Crash consistency: the version is written into a temporary directory, the marker last, and renamed
into place, so a version directory either is complete or does not exist. Running the update again
for a step whose version is complete returns it untouched; an update killed half-way leaves only a
temporary directory, which the next try removes. The step is seeded (the fresh adapter's A matrices
are drawn at random), so redoing it on the same examples gives the same version.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel

from hpc_executor.rl.lora import (
    VERSION_MARKER,
    AdapterError,
    PolicyUpdateError,
    completion_logprobs,
    load_base,
    with_adapter,
)
from hpc_executor.rl.loss import policy_loss
from hpc_executor.rl.policy import PolicyVersion, TrainingExample, TrainSettings

OPTIMIZER_FILE = "optimizer.pt"
STATS_FILE = "update.json"
ADAM_BETAS = (0.9, 0.999)


@dataclass(frozen=True)
class UpdateSpec:
    """Everything one update needs, as plain values (it may travel to a scheduler job)."""

    base_model: str  # a Hugging Face model directory or hub id
    previous: PolicyVersion  # the version the step starts from (step 0: the base, no adapter)
    examples_path: str  # JSON lines, one TrainingExample each
    out_dir: str  # where version directories live
    step: int  # the version this update writes: previous.step + 1
    train: TrainSettings


def version_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"step_{step:05d}"


def completed_version(out_dir: str | Path, step: int) -> PolicyVersion | None:
    """The version ``step`` if its update finished, else None."""
    path = version_dir(out_dir, step)
    return PolicyVersion(step, str(path)) if (path / VERSION_MARKER).is_file() else None


def write_examples(path: Path, examples: list[TrainingExample]) -> None:
    """The examples as JSON lines, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(asdict(e)) + "\n" for e in examples))
    os.replace(tmp, path)


def read_examples(path: str | Path) -> list[TrainingExample]:
    path = Path(path)
    if not path.is_file():
        raise PolicyUpdateError(
            f"the update's examples file {path} does not exist; rerun the step's sampling"
        )
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            example = TrainingExample(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as exc:
            raise PolicyUpdateError(
                f"{path}:{number} is not a TrainingExample ({exc}); delete the file and rerun the step"
            ) from exc
        if len(example.tokens) != len(example.logprobs) or not example.prompt_tokens:
            raise PolicyUpdateError(
                f"{path}:{number} has {len(example.tokens)} tokens, {len(example.logprobs)} log-probs and "
                f"{len(example.prompt_tokens)} prompt tokens (needs equal counts and a prompt); rerun the step"
            )
        examples.append(example)
    return examples


def run_update(spec: UpdateSpec) -> PolicyVersion:
    """Take one optimiser step and return the version it wrote (or the one already there)."""
    done = completed_version(spec.out_dir, spec.step)
    if done is not None:
        return done
    if spec.step != spec.previous.step + 1:
        raise PolicyUpdateError(
            f"update to version {spec.step} asked to start from version {spec.previous.step}; "
            f"a step starts from the version before it ({spec.step - 1})"
        )
    examples = read_examples(spec.examples_path)
    if not examples:
        raise PolicyUpdateError(
            f"the update's examples file {spec.examples_path} is empty; a step needs samples"
        )
    out_dir = Path(spec.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir(out_dir, spec.step)
    for stale in out_dir.glob(f".{target.name}-*"):  # a try that was killed before its rename
        shutil.rmtree(stale, ignore_errors=True)

    with torch.random.fork_rng():
        torch.manual_seed(spec.train.seed * 100_003 + spec.step)
        model, optimizer = _load(spec)
        stats = _step(model, optimizer, examples, spec.train)

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=out_dir))
    try:
        model.save_pretrained(str(tmp))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        (tmp / STATS_FILE).write_text(
            json.dumps({"step": spec.step, "examples": len(examples), **stats}) + "\n"
        )
        (tmp / VERSION_MARKER).write_text("")
        if target.exists() and not (target / VERSION_MARKER).is_file():
            shutil.rmtree(target)  # not written by this code (a version is renamed in whole); redo it
        try:
            os.rename(tmp, target)
        except OSError:  # another try of the same step finished first: its version stands
            if completed_version(out_dir, spec.step) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PolicyVersion(spec.step, str(target))


def read_stats(version: PolicyVersion) -> dict[str, float]:
    """The loss stats the update that wrote ``version`` recorded (see ``loss.policy_loss``)."""
    if version.path is None:
        return {}
    stats: dict[str, float] = json.loads((Path(version.path) / STATS_FILE).read_text())
    return stats


def _load(spec: UpdateSpec) -> tuple[PeftModel, torch.optim.AdamW]:
    model = with_adapter(
        load_base(spec.base_model), spec.previous, trainable=True, lora_rank=spec.train.lora_rank
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.train.learning_rate, betas=ADAM_BETAS, weight_decay=0.0)
    if spec.previous.path is not None:
        state_file = Path(spec.previous.path) / OPTIMIZER_FILE
        try:
            optimizer.load_state_dict(torch.load(state_file, weights_only=True))
        except Exception as exc:  # missing, truncated, or for other parameters
            raise AdapterError(
                f"policy version {spec.previous.step}'s optimiser state {state_file} cannot be loaded ({exc}); "
                f"delete {spec.previous.path} and rerun the update of step {spec.previous.step}"
            ) from exc
        for group in optimizer.param_groups:  # the configured rate wins over the saved one
            group["lr"] = spec.train.learning_rate
    return model, optimizer


def _step(
    model: PeftModel,
    optimizer: torch.optim.AdamW,
    examples: list[TrainingExample],
    train: TrainSettings,
) -> dict[str, float]:
    """``train.updates_per_step`` passes of loss, backward, AdamW over all the examples; the stats are
    the last pass's (its clip fraction and ``kl_old`` say how far the passes moved off the samples'
    version) plus the first pass's loss. A batch that teaches nothing (every advantage 0 and no KL
    term) leaves the weights and the optimiser state as they were: AdamW's momentum would otherwise
    move the weights along an earlier step's gradient."""
    prompts = [e.prompt_tokens for e in examples]
    completions = [e.tokens for e in examples]
    width = max(len(c) for c in completions)
    old = torch.zeros((len(examples), width))
    for i, e in enumerate(examples):
        old[i, : len(e.logprobs)] = torch.tensor(e.logprobs, dtype=old.dtype)
    ref = None
    if train.kl_coef:
        with torch.no_grad(), model.disable_adapter():
            ref, _ = completion_logprobs(model, prompts, completions, temperature=train.temperature)
    advantages = torch.tensor([e.advantage for e in examples])

    def loss_now() -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of the current weights on the examples (one forward pass, gradients kept)."""
        new, mask = completion_logprobs(model, prompts, completions, temperature=train.temperature)
        return policy_loss(new, old.to(new.device, new.dtype), advantages.to(new.device, new.dtype), mask,
                           loss=train.loss, clip_eps=train.clip_eps, ref_logprobs=ref, kl_coef=train.kl_coef)  # fmt: skip

    if not train.kl_coef and not advantages.any():
        with torch.no_grad():
            _, stats = loss_now()
        return {**stats, "skipped": 1.0, "passes": 0.0}
    passes = []
    for _ in range(train.updates_per_step):
        loss, stats = loss_now()
        passes.append(stats)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {**passes[-1], "first_loss": passes[0]["loss"], "skipped": 0.0, "passes": float(len(passes))}
