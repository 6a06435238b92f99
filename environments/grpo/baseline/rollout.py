"""Sampling backends (editable): vLLM on a GPU when it is installed, HF `generate` otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

STOP = ["</answer>"]  # the r1-zero answer ends here; nothing after it is graded


@dataclass
class Sampling:
    n: int  # responses per prompt, returned grouped by prompt
    temperature: float
    max_new_tokens: int


def truncate_at_stop(text: str) -> str:
    """Cut after the first stop string (kept, as vLLM's include_stop_str_in_output does)."""
    for stop in STOP:
        end = text.find(stop)
        if end >= 0:
            text = text[: end + len(stop)]
    return text


class HFGenerator:
    """Generates with the policy itself, so it never needs a weight sync."""

    def __init__(self, policy: torch.nn.Module, tokenizer, batch_size: int) -> None:
        self.policy, self.tokenizer, self.batch_size = policy, tokenizer, batch_size

    def generate(self, prompts: list[str], sampling: Sampling) -> list[str]:
        expanded = [p for p in prompts for _ in range(sampling.n)]
        was_training = self.policy.training
        self.policy.eval()
        self.tokenizer.padding_side = "left"  # generation continues from the right end of each prompt
        kwargs = {"do_sample": False}
        if sampling.temperature > 0:  # pure temperature sampling, like vLLM's defaults
            kwargs = {"do_sample": True, "temperature": sampling.temperature, "top_p": 1.0, "top_k": 0}
        texts: list[str] = []
        for start in range(0, len(expanded), self.batch_size):
            enc = self.tokenizer(expanded[start : start + self.batch_size], return_tensors="pt", padding=True)
            enc = enc.to(self.policy.device)
            with torch.no_grad():
                out = self.policy.generate(
                    **enc,
                    max_new_tokens=sampling.max_new_tokens,
                    stop_strings=STOP,
                    tokenizer=self.tokenizer,
                    pad_token_id=self.tokenizer.pad_token_id,
                    use_cache=True,
                    **kwargs,
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            texts += [
                truncate_at_stop(t) for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            ]
        self.policy.train(was_training)
        return texts

    def sync(self, policy: torch.nn.Module) -> None:
        """Nothing to do: generation already uses the live policy."""


class VLLMGenerator:
    """A vLLM engine on the training GPU; the policy's weights are pushed into it after each step."""

    def __init__(
        self, model: str, seed: int, gpu_memory_utilization: float, max_model_len: int, **engine_args: object
    ) -> None:
        # The engine must live in this process for load_weights to reach its model.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.llm = LLM(
            model=model,
            dtype="bfloat16",
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_prefix_caching=True,  # the group's responses share their prompt
            **engine_args,
        )

    def generate(self, prompts: list[str], sampling: Sampling) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=1.0,
            max_tokens=sampling.max_new_tokens,
            stop=STOP,
            include_stop_str_in_output=True,
        )
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [completion.text for out in outputs for completion in out.outputs]

    def sync(self, policy: torch.nn.Module) -> None:
        try:
            engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError as exc:
            raise RuntimeError(
                "cannot reach vLLM's in-process model to push weights; this vLLM version needs another path"
            ) from exc
        engine_model.load_weights(policy.state_dict().items())
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
