"""The CPU policy: a Hugging Face causal LM sampled with ``transformers``, trained with a ``peft`` LoRA
adapter in-process (the CPU preset; a GPU backend serves the same versions with vLLM).

``policy_cfg`` keys (the model group's ``policy:`` section):

- ``model``: a Hugging Face model directory or hub id, or ``tiny``: the model built in code
  (``tiny_model``) under ``<work_dir>/base``, warm-started on the ``texts`` passed to the
  constructor, or else on ``catalog`` (the environment's idea catalog, rendered as the offline
  stand-in writes ideas), each as a completion of ``warm_prompt`` (default: none; the RL loop's
  ideation prompt, for the tiny model to answer it like its warm-up texts).
- ``catalog``, ``warm_prompt``: as above, for ``tiny`` only.
- ``threads``: torch threads for sampling and the update (default 1: a small model on shared
  cores runs fastest on one; raise it for a larger model on a machine of its own).

Sampling is plain temperature sampling (no top-k / top-p), so each sample's ``logprobs`` are
exactly ``log_softmax(logits / temperature)`` of the token drawn, the distribution it was drawn from;
the update recomputes them at ``train.temperature``, which must therefore equal the sampling
temperature (``sample`` refuses otherwise). Completions end with the eos token, which is part of
``tokens`` (its log-prob is what teaches the model to stop), and not of ``text``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hpc_executor.errors import ConfigError
from hpc_executor.rl.lora import completion_logprobs, load_base, torch_threads, with_adapter
from hpc_executor.rl.policy import Policy, PolicyVersion, Sample, TrainingExample, TrainSettings
from hpc_executor.rl.tiny_model import build_tiny_model, catalog_texts
from hpc_executor.rl.update import UpdateSpec, run_update, write_examples
from hpc_executor.scheduling import Scheduler

TINY = "tiny"


class TransformersPolicy(Policy):
    def __init__(
        self,
        policy_cfg: DictConfig,
        train: TrainSettings,
        work_dir: Path,
        scheduler: Scheduler | None = None,  # unused: the CPU update runs in-process
        *,
        texts: list[str] | None = None,
    ) -> None:
        model = str(policy_cfg.get("model") or "")
        if not model:
            raise ConfigError(
                "policy.model is not set; give a Hugging Face model directory or hub id, or 'tiny'"
            )
        self.train = train
        self.work_dir = Path(work_dir)
        self.threads = int(policy_cfg.get("threads") or 1)
        if model == TINY:
            if texts is None:
                catalog = policy_cfg.get("catalog")
                if not catalog:
                    raise ConfigError(
                        "policy.model=tiny warms up on the environment's idea catalog: set policy.catalog "
                        "(e.g. policy.catalog=${env.catalog}), or pass texts"
                    )
                texts = catalog_texts(str(catalog))
            warm_prompt = str(policy_cfg.get("warm_prompt") or "")
            self.base_model = str(
                build_tiny_model(self.work_dir / "base", texts, train.seed, prompt=warm_prompt)
            )
        else:
            self.base_model = model
        self.label = f"transformers:{model}"
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(self.base_model)
        self.version = PolicyVersion(0, None)
        self.model: PreTrainedModel | PeftModel = load_base(self.base_model)

    def prompt_tokens(self, prompt: str) -> list[int]:
        ids: list[int] = self.tokenizer(prompt)["input_ids"]
        if not ids:  # a tokenizer that adds no bos, on an empty prompt: there is nothing to condition on
            raise ConfigError("the ideation prompt encodes to no tokens; give the policy a non-empty prompt")
        return ids

    def sample(self, prompt: str, n: int, *, temperature: float, max_tokens: int, seed: int) -> list[Sample]:
        if temperature <= 0:
            raise ConfigError(f"RL sampling needs a temperature above 0, got {temperature}")
        if temperature != self.train.temperature:
            raise ConfigError(
                f"sampling at temperature {temperature} but the update computes log-probs at "
                f"{self.train.temperature}: set the train settings' temperature to the sampling one"
            )
        prompt_ids = self.prompt_tokens(prompt)
        eos = self.tokenizer.eos_token_id
        with torch_threads(self.threads), torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(seed)
            out = self.model.generate(  # type: ignore[operator]
                input_ids=torch.tensor([prompt_ids], device=self.model.device),
                attention_mask=torch.ones((1, len(prompt_ids)), dtype=torch.long, device=self.model.device),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_tokens,
                num_return_sequences=n,
                output_scores=True,
                return_dict_in_generate=True,
                eos_token_id=eos,
                pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos,
            )
        drawn = out.sequences[:, len(prompt_ids) :]
        logprobs = torch.log_softmax(torch.stack(out.scores, dim=1).float(), dim=-1)
        logprobs = logprobs.gather(-1, drawn.unsqueeze(-1)).squeeze(-1)
        samples = []
        for row in range(n):
            tokens = drawn[row].tolist()
            if eos in tokens:  # what follows the eos is padding
                tokens = tokens[: tokens.index(eos) + 1]
            samples.append(
                Sample(
                    prompt_tokens=list(prompt_ids),
                    tokens=tokens,
                    logprobs=logprobs[row, : len(tokens)].tolist(),
                    text=str(self.tokenizer.decode(tokens, skip_special_tokens=True)),
                )
            )
        return samples

    def token_logprobs(self, prompt_tokens: list[int], tokens: list[int]) -> list[float]:
        """The current version's log-probs of ``tokens`` after ``prompt_tokens``, at the train
        temperature (what the update's importance ratio divides by the sampler's)."""
        with torch_threads(self.threads), torch.no_grad():
            values, _ = completion_logprobs(
                self.model, [prompt_tokens], [tokens], temperature=self.train.temperature
            )
        result: list[float] = values[0, : len(tokens)].tolist()
        return result

    def train_step(self, examples: list[TrainingExample], *, step: int, out_dir: Path) -> PolicyVersion:
        examples_path = Path(out_dir) / f"examples_{step:05d}.jsonl"
        write_examples(examples_path, examples)
        spec = UpdateSpec(
            base_model=self.base_model,
            previous=self.version,
            examples_path=str(examples_path),
            out_dir=str(out_dir),
            step=step,
            train=self.train,
        )
        with torch_threads(self.threads):
            version = run_update(spec)
        self.use(version)
        return version

    def use(self, version: PolicyVersion) -> None:
        base = load_base(self.base_model)
        if version.path is None:
            self.model = base
        else:
            self.model = with_adapter(base, version, trainable=False, lora_rank=self.train.lora_rank)
            self.model.eval()
        self.version = version
