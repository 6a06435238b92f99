"""The paper's policy backend: LoRA training and sampling on the Tinker service, through the official
``tinker`` SDK (``pip install -e '.[tinker]'``; imported only when this backend is used).

One step: ``ServiceClient`` -> ``create_lora_training_client(base_model, rank)`` (step 1) or
``create_training_client_from_state_with_optimizer(version N's state)`` (a resumed run), then
``forward_backward(data, loss)`` over the recorded tokens and ``optim_step(AdamParams(lr))``, then
``save_state(name)`` (weights and optimiser state: the version's ``path``, a ``tinker://`` URI) and
``save_weights_for_sampler(name)`` + ``create_sampling_client`` (the SDK's way to a sampler over
persistent weights; ``save_weights_and_get_sampling_client`` saves ephemeral ones, which a resumed
run could not find again). ``sample`` asks the sampling client for ``num_samples`` sequences, whose
token ids and log-probs the SDK returns.

Losses: ``train.loss=reinforce`` is Tinker's ``importance_sampling``; ``grpo_clip`` is its ``ppo``
with the ratio clipped to ``[1 - clip_eps, 1 + clip_eps]``. Neither has a KL term, so
``kl_coef`` must be 0. Each datum is the prompt and completion shifted by one: input
``tokens[:-1]``, ``target_tokens`` ``tokens[1:]``, and the sampling log-probs and the advantage on
the completion's positions (0 on the prompt's).

Crash consistency: ``<work_dir>/tinker/step_NNNNN.json`` records a step's checkpoint names before
they are saved and their URIs after; a step found finished is taken as it is, and one that was cut
short is redone from the version before it under fresh names (Tinker names cannot be saved twice).

``policy_cfg`` keys: ``backend: tinker``, ``model`` (a base model Tinker serves, e.g.
``Qwen/Qwen3-30B-A3B``), ``base_url`` (default: ``TINKER_BASE_URL``, else the service's),
``api_key_env`` (default ``TINKER_API_KEY``; see ``llm.credentials.policy_env_vars``).
"""

from __future__ import annotations

import importlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import DictConfig

from hpc_executor.errors import ConfigError, HpcExecutorError, PreflightError
from hpc_executor.llm.credentials import TINKER_KEY_ENV
from hpc_executor.rl.policy import Policy, PolicyVersion, Sample, TrainingExample, TrainSettings
from hpc_executor.rl.policy_config import read_policy_config
from hpc_executor.rl.state_file import read_state
from hpc_executor.scheduling import Scheduler
from hpc_executor.trial_dir import write_atomic


@dataclass
class TinkerPolicyConfig:
    """The model group's ``policy:`` section for ``backend: tinker``."""

    backend: str = "tinker"
    model: str = ""  # the base model, as Tinker names it
    base_url: str | None = None  # None: TINKER_BASE_URL, else the service's own
    api_key_env: str = TINKER_KEY_ENV


class TinkerError(HpcExecutorError):
    """The Tinker service answered something the RL loop cannot use."""


def tinker_sdk() -> ModuleType:
    """The ``tinker`` package, or a ConfigError saying how to install it."""
    try:
        return importlib.import_module("tinker")
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "model.policy.backend=tinker needs the tinker SDK: pip install -e '.[tinker]'"
        ) from exc


def tinker_loss(train: TrainSettings) -> tuple[str, dict[str, float] | None]:
    """The Tinker loss name and config for ``train``'s loss."""
    if train.kl_coef:
        raise ConfigError(
            f"strategy.kl_coef={train.kl_coef:g}: Tinker's built-in losses have no KL term; set it to 0"
        )
    if train.loss == "reinforce":
        return "importance_sampling", None
    if train.loss == "grpo_clip":
        return "ppo", {
            "clip_low_threshold": 1.0 - train.clip_eps,
            "clip_high_threshold": 1.0 + train.clip_eps,
        }
    raise ConfigError(f"strategy.loss={train.loss!r} is unknown; choose grpo_clip or reinforce")


def to_datum(sdk: ModuleType, example: TrainingExample) -> Any:
    """One example as a ``tinker.Datum``: next-token targets over prompt + completion, with the
    sampling log-probs and the advantage on the completion's positions only."""
    if len(example.tokens) != len(example.logprobs) or not example.tokens or not example.prompt_tokens:
        raise TinkerError(
            f"a training example has {len(example.prompt_tokens)} prompt tokens, {len(example.tokens)} completion "
            f"tokens and {len(example.logprobs)} log-probs; it needs a prompt, a completion and one log-prob per token"
        )
    tokens = [*example.prompt_tokens, *example.tokens]
    on_prompt = len(example.prompt_tokens) - 1  # targets that are prompt tokens: no loss there
    return sdk.Datum(
        model_input=sdk.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": [0.0] * on_prompt + [float(v) for v in example.logprobs],
            "advantages": [0.0] * on_prompt + [float(example.advantage)] * len(example.tokens),
        },
    )


class TinkerPolicy(Policy):
    def __init__(
        self,
        policy_cfg: DictConfig,
        train: TrainSettings,
        work_dir: Path,
        scheduler: Scheduler | None = None,  # unused: Tinker runs the steps on its own GPUs
        *,
        service: Any = None,  # a tinker.ServiceClient; made from the config when not given
    ) -> None:
        self.cfg = read_policy_config(policy_cfg, TinkerPolicyConfig, "the base model as Tinker names it")
        self.train = train
        self.loss, self.loss_config = tinker_loss(train)
        self.sdk = tinker_sdk()
        self.model = str(self.cfg.model)
        self.label = f"tinker:{self.model}"
        self.version = PolicyVersion(0, None)
        self._state_dir = Path(work_dir) / "tinker"
        self._state_dir.mkdir(parents=True, exist_ok=True)
        self._service = service
        self._training: Any = None  # a TrainingClient at self.version, once made
        self._sampler: Any = None  # a SamplingClient of self.version, once made
        self._tokenizer: Any = None

    @property
    def service(self) -> Any:
        if self._service is None:
            key = os.environ.get(self.cfg.api_key_env, "").strip()
            if not key:
                raise PreflightError(
                    f"the tinker policy needs an API key: set the environment variable {self.cfg.api_key_env}"
                )
            self._service = self.sdk.ServiceClient(base_url=self.cfg.base_url, api_key=key)
        return self._service

    def _run_id(self) -> str:
        """A name prefix for this run's checkpoints, made once and kept (Tinker names are per account)."""
        path = self._state_dir / "run.json"
        try:
            return str(json.loads(path.read_text())["id"])
        except (OSError, ValueError, KeyError):
            run_id = uuid.uuid4().hex[:12]
            write_atomic(path, json.dumps({"id": run_id}))
            return run_id

    def _training_client(self) -> Any:
        if self._training is None:
            if self.version.path is None:
                future = self.service.create_lora_training_client(
                    base_model=self.model, rank=self.train.lora_rank, seed=self.train.seed
                )
            else:
                future = self.service.create_training_client_from_state_with_optimizer(self.version.path)
            self._training = future.result()
        return self._training

    def _sampling_client(self) -> Any:
        if self._sampler is None:
            sampler_path = read_state(self._record(self.version.step)).get("sampler")
            if self.version.path is None:
                future = self.service.create_sampling_client(base_model=self.model)
            elif sampler_path:
                future = self.service.create_sampling_client(model_path=sampler_path)
            else:  # a version this run did not record (handed in from elsewhere): sample its weights now
                future = self._training_client().save_weights_and_get_sampling_client()
            self._sampler = future.result()
        return self._sampler

    def _record(self, step: int) -> Path:
        return self._state_dir / f"step_{step:05d}.json"

    def sample(self, prompt: str, n: int, *, temperature: float, max_tokens: int, seed: int) -> list[Sample]:
        if temperature <= 0:
            raise ConfigError(f"RL sampling needs a temperature above 0, got {temperature}")
        sampler = self._sampling_client()
        if self._tokenizer is None:
            self._tokenizer = sampler.get_tokenizer()
        prompt_tokens = [int(t) for t in self._tokenizer.encode(prompt)]
        if not prompt_tokens:
            raise ConfigError("the ideation prompt encodes to no tokens; give the policy a non-empty prompt")
        params = self.sdk.SamplingParams(
            max_tokens=max_tokens, seed=seed, temperature=temperature, top_k=-1, top_p=1.0
        )
        response = sampler.sample(
            prompt=self.sdk.ModelInput.from_ints(prompt_tokens), num_samples=n, sampling_params=params
        ).result()
        sequences = list(response.sequences)
        if len(sequences) != n:
            raise TinkerError(
                f"Tinker answered {len(sequences)} samples of {self.model}, not the {n} asked for"
            )
        samples = []
        for sequence in sequences:
            tokens, logprobs = list(sequence.tokens), sequence.logprobs
            if logprobs is None or len(logprobs) != len(tokens):
                raise TinkerError(f"a Tinker sample of {self.model} came without one log-prob per token")
            text = self._tokenizer.decode(tokens, skip_special_tokens=True)
            samples.append(Sample(list(prompt_tokens), tokens, [float(v) for v in logprobs], text))
        return samples

    def train_step(self, examples: list[TrainingExample], *, step: int, out_dir: Path) -> PolicyVersion:
        record = self._record(step)
        done = read_state(record)
        if done.get("state") and done.get("sampler"):
            version = PolicyVersion(step, str(done["state"]))
            self.use(version)
            return version
        if step != self.version.step + 1:
            raise TinkerError(
                f"step {step} starts from version {step - 1}, but the policy is at {self.version.step}"
            )
        attempt = int(done.get("attempt", 0)) + 1
        name = f"{self._run_id()}-step_{step:05d}-try{attempt}"  # a redone step saves under fresh names
        write_atomic(record, json.dumps({"step": step, "attempt": attempt, "name": name}))
        data = [to_datum(self.sdk, e) for e in examples]
        try:
            training = self._training_client()
            for _ in range(self.train.updates_per_step):  # each pass sees the weights the last one wrote
                backward = training.forward_backward(data, self.loss, self.loss_config)
                optimise = training.optim_step(self.sdk.AdamParams(learning_rate=self.train.learning_rate))
                backward.result()
                optimise.result()
            state = training.save_state(name).result().path
            sampler_path = training.save_weights_for_sampler(name).result().path
        except BaseException:
            self._training = None  # it may have stepped: the next try starts again from the version before
            raise
        write_atomic(record, json.dumps({"step": step, "attempt": attempt, "name": name, "state": state,
                                         "sampler": sampler_path}))  # fmt: skip
        self.version, self._sampler = PolicyVersion(step, str(state)), None  # the training client is at it
        return self.version

    def use(self, version: PolicyVersion) -> None:
        if version != self.version:
            self.version, self._training, self._sampler = version, None, None
