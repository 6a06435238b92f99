"""The GRPO environment: an honest grader and evaluator, deterministic synthetic data, the CPU preset
of the real training code through the protocol, and a catalog whose diffs apply as labelled."""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml

from hpc_executor.trial_dir import DIFF_FILE, RESULT_FILE, TRAIN_LOG, TrialSpec
from hpc_executor.types import Result, Status
from hpc_executor.worker import run_trial

REPO = Path(__file__).resolve().parents[1]
ENV_DIR = REPO / "environments" / "grpo"
BASELINE = ENV_DIR / "baseline"
CONF = yaml.safe_load((REPO / "conf" / "env" / "grpo.yaml").read_text())["env"]
CPU_CONF = yaml.safe_load((REPO / "conf" / "env" / "grpo_cpu.yaml").read_text())["env"]

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="transformers is not installed: pip install -e '.[cpu]'",
)


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # keep baseline/ pristine
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = writes_bytecode
    return module


if str(BASELINE) not in sys.path:  # grader.py imports its sibling math_equivalence.py
    sys.path.insert(0, str(BASELINE))
grader = load_module("grpo_env_grader", BASELINE / "grader.py")


def run_script(script: str, cwd: Path, env: dict[str, str], *args: str, timeout: float = 120):
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=cwd,
        env={
            **os.environ,
            "PYTHONDONTWRITEBYTECODE": "1",
            "HPCX_CPUS": "1",
            "HPCX_GPUS": "0",
            "HPCX_SEED": "0",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---- grader --------------------------------------------------------------------------------------


def r1(answer: str) -> str:
    return f"some reasoning </think> <answer> {answer} </answer>"


@pytest.mark.parametrize(
    ("response", "truth"),
    [
        (r1("7"), "7"),
        (r1("\\boxed{7}"), "7"),
        ("x </think>\n<answer>\\boxed{\\dfrac{3}{4}}</answer>", "\\frac{3}{4}"),
        (r1("\\frac12"), "\\frac{1}{2}"),
        (r1("0.5"), "\\frac{1}{2}"),
        (r1("$ 2 \\sqrt{3} $"), "\\sqrt{12}"),
        (r1("x = 5"), "5"),
        (r1("10,000"), "10000"),
        (r1("90^\\circ"), "90"),
        (r1("\\left( 1, -2 \\right)"), "(1,-2)"),
        (r1("1 + 2x"), "2x+1"),
        (r1("\\text{(B)}"), "(B)"),
        (r1("\\frac{\\pi}{2}"), "\\pi/2"),
        # the forms of one half
        (r1("1/2"), "\\frac{1}{2}"),
        (r1("\\boxed{\\frac12}"), "\\frac{1}{2}"),
        (r1("\\dfrac{1}{2}"), "0.5"),
        (r1("The answer is $\\boxed{0.5}$."), "\\frac12"),
        (r1("50\\%"), "50"),  # MATH's percent answers are the number
        (r1("50%"), "50\\%"),
        (r1("\\text{odd}"), "odd"),  # words: compared as words, case aside
        (r1("Monday"), "\\text{Monday}"),
        (r1("\\{2, 1\\}"), "\\{1,2\\}"),
    ],
)
def test_lenient_grader_accepts_equivalent_formatted_answers(response: str, truth: str) -> None:
    assert grader.is_correct(response, truth, "lenient")


@pytest.mark.parametrize(
    ("response", "truth"),
    [
        (r1("8"), "7"),
        ("<answer>7</answer>", "7"),  # no </think>: unformatted
        ("</think> 7", "7"),  # no answer block
        ("</think> <answer>7", "7"),  # answer never closed
        ("\\boxed{7}", "7"),  # a bare box is not the r1-zero format
        (r1(""), "7"),
        (r1("[1, 2)"), "(1,2)"),  # interval brackets differ
        (r1("(1, 2, 3)"), "(1,2)"),
        (r1("8") + " <answer>7</answer>", "7"),  # only the first answer block counts
        ("", "7"),  # empty response
        ("</think> <answer></answer>", "7"),  # empty answer
        ("<think> 7 </think> <answer> 7 <answer>", "7"),  # answer tag never closed
        (r1("\\boxed{7"), "7"),  # box never closed
        (r1("\\frac{1}{3}"), "\\frac{1}{2}"),
        (r1("0.33"), "\\frac{1}{3}"),  # too few digits to be a third
        (r1("sey"), "yes"),  # math-verify alone would read both as the product s*e*y
        (r1("even"), "odd"),
        (r1("1 \\text{ or } 2"), "1"),  # hedges
        (r1("\\boxed{1} or \\boxed{2}"), "1"),
        (r1("\\pm 1"), "1"),
    ],
)
def test_lenient_grader_rejects_wrong_or_unformatted_answers(response: str, truth: str) -> None:
    assert not grader.is_correct(response, truth, "lenient")


@pytest.mark.parametrize(
    "payload",
    [
        '__import__("os").system("true")',
        "(((9^64)^64)^64)^64",
        "9^9^9^9",
        "9^{9^{9^{9}}}",
        "(10^{10})!",
        "7^{12345678} - 7^{12345678}",
        "x" * 5000,
        "1/0",
    ],
)
@pytest.mark.parametrize("mode", ["strict", "lenient"])
def test_grader_never_runs_or_stalls_on_model_output(payload: str, mode: str) -> None:
    start = time.monotonic()
    assert not grader.is_correct(r1(payload), "1", mode)
    assert time.monotonic() - start < 3


def test_lenient_extract_answer_takes_the_first_answer_block_and_its_box() -> None:
    def extract(response: str) -> str | None:
        return grader.extract_answer(response, "lenient")

    assert extract("a </think>  <answer> \\boxed{42} </answer> tail") == "42"
    assert extract("a </think><answer> x = \\boxed{\\frac{1}{2}}.</answer>") == "\\frac{1}{2}"
    assert extract("</think> <answer> 7 </answer> <answer> 8 </answer>") == "7"
    assert extract("<think> no answer") is None
    assert extract("</think> text <answer> 7 </answer>") is None  # text between the tags


@needs_transformers
def test_evaluator_and_training_reward_use_the_same_grader(grpo_modules) -> None:
    evaluate_module = importlib.import_module("evaluate")  # baseline/ is first on sys.path
    reward = sys.modules["reward"]
    assert evaluate_module.is_correct is reward.is_correct is sys.modules["grader"].is_correct
    # The evaluator asks with the prompt the baseline trains with: one definition, in the protected grader.
    assert (
        evaluate_module.R1_ZERO_PROMPT is grpo_modules.R1_ZERO_PROMPT is sys.modules["grader"].R1_ZERO_PROMPT
    )
    assert reward.r1_zero_reward(r1("\\dfrac12"), "0.5") == {"format_reward": 1.0, "reward": 1.0}
    assert reward.r1_zero_reward(r1("0.4"), "0.5") == {"format_reward": 1.0, "reward": 0.0}


# ---- data and the tiny model ----------------------------------------------------------------------


def test_synthetic_data_is_deterministic(tmp_path: Path) -> None:
    for name in ("a", "b"):
        result = run_script(
            "prepare_data.py", BASELINE, {"HPCX_DATA_DIR": str(tmp_path / name)}, "--synthetic"
        )
        assert result.returncode == 0, result.stderr
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    test = [json.loads(line) for line in (tmp_path / "a" / "test.jsonl").read_text().splitlines()]
    train = (tmp_path / "a" / "train.jsonl").read_text().splitlines()
    assert len(test) == 32 and len(train) == 256
    assert all(set(row) == {"problem", "solution", "answer"} for row in test)
    assert any("\\frac" in row["answer"] for row in test)  # the grader's LaTeX path is exercised


def test_math_path_writes_problem_solution_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real MATH path with a stand-in for `datasets` (no network here): 7,500 + 500 problems."""
    prepare = load_module("grpo_env_prepare", BASELINE / "prepare_data.py")
    subjects = prepare.MATH_SUBJECTS

    def load_dataset(name: str, subject: str | None = None, split: str = "") -> list[dict]:
        if name == prepare.MATH_TEST:
            return [{"problem": f"t{i}", "solution": f"\\boxed{{{i}}}", "answer": str(i)} for i in range(500)]
        count = 1072 if subjects.index(subject) < 3 else 1071  # 3 * 1072 + 4 * 1071 = 7500
        solution = "First $\\boxed{{1}}$, then $x = \\boxed{{\\frac{{{i}}}{{2}}}}$."
        return [{"problem": f"{subject} {i}", "solution": solution.format(i=i)} for i in range(count)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    prepare.prepare_math(tmp_path)
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert (len(train), len(test)) == (7500, 500)
    assert train[3] == {"problem": "algebra 3", "solution": "First $\\boxed{1}$, then $x = \\boxed{\\frac{3}{2}}$.",
                        "answer": "\\frac{3}{2}"}  # fmt: skip
    assert test[7] == {"problem": "t7", "solution": "\\boxed{7}", "answer": "7"}
    val = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert len(val) == 500 and all(row in train for row in val), "checkpoint selection: 500 of train"
    assert len({row["problem"].split()[0] for row in val}) == len(subjects), "drawn from every subject"
    monkeypatch.setattr(prepare, "MATH_SUBJECTS", subjects[:-1])  # a subject missing: the counts say so
    with pytest.raises(SystemExit, match="expected 7500 train / 500 test problems, got 6429 / 500"):
        prepare.prepare_math(tmp_path)


@pytest.fixture(scope="module")
def cpu_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed: pip install -e '.[cpu]'")
    out = tmp_path_factory.mktemp("grpo_data")
    args = CPU_CONF["prepare_command"][2:]
    result = run_script("prepare_data.py", BASELINE, {"HPCX_DATA_DIR": str(out)}, *args)
    assert result.returncode == 0, result.stderr
    assert all((out / path).exists() for path in CPU_CONF["requires"])
    return out


@pytest.fixture
def grpo_modules(monkeypatch: pytest.MonkeyPatch):
    """The baseline's training modules imported in-process (they import each other by name)."""
    monkeypatch.syspath_prepend(str(BASELINE))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # keep baseline/ pristine
    names = ("grader", "grpo_loss", "reward", "rollout", "grpo", "evaluate")
    for name in names:  # an `evaluate` package (HF's) must not stand in for baseline/evaluate.py
        sys.modules.pop(name, None)
    yield importlib.import_module("grpo")
    for name in names:
        sys.modules.pop(name, None)


@needs_transformers
def test_tiny_tokenizer_round_trips_the_r1_format(cpu_data: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cpu_data / "tiny_model")
    text = "What is $3 + 4$?\nAssistant: <think> 3+4=7 </think> <answer> \\frac{7}{1} </answer>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


# ---- GRPO building blocks, against numbers worked out by hand ------------------------------------

loss_mod = load_module("grpo_env_loss", BASELINE / "grpo_loss.py")


def assert_values(tensor: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(tensor, torch.tensor(expected))


def exact_match_reward(response: str, ground_truth: str) -> dict[str, float]:
    return {"reward": float(response == ground_truth), "format_reward": float(response != "")}


def test_group_normalized_rewards_use_the_unbiased_group_std() -> None:
    # rewards [1, 0 | 1, 1], group size 2. Group 1: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) =
    # 0.70711, advantages +-0.5 / 0.70711 = +-0.70711. Group 2: mean 1, std 0, advantages 0 / eps = 0.
    responses, truths = ["a", "b", "c", "d"], ["a", "x", "c", "d"]
    adv, raw, stats = loss_mod.group_normalized_rewards(exact_match_reward, responses, truths, 2, 1e-6, True)
    assert raw.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert adv.tolist() == pytest.approx([0.70711, -0.70711, 0.0, 0.0], abs=1e-5)
    # All four rewards: mean 0.75, unbiased std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5.
    assert stats == pytest.approx(
        {
            "reward_mean": 0.75,
            "reward_std": 0.5,
            "reward_max": 1.0,
            "reward_min": 0.0,
            "format_reward_mean": 1.0,
        }
    )
    # Group size 3, rewards [1, 0, 0]: mean 1/3, deviations [2/3, -1/3, -1/3], unbiased variance
    # (4/9 + 1/9 + 1/9) / 2 = 1/3, std 0.57735: advantages [1.15470, -0.57735, -0.57735]
    # (the biased std 0.47140 would give 1.41421 and -0.70711).
    adv, _, _ = loss_mod.group_normalized_rewards(
        exact_match_reward, ["a", "b", "c"], ["a"] * 3, 3, 1e-6, True
    )
    assert adv.tolist() == pytest.approx([1.15470, -0.57735, -0.57735], abs=1e-5)
    # eps is added to the std: group [1, 0] with eps 0.29289 gives 0.5 / (0.70711 + 0.29289) = 0.5.
    adv, _, _ = loss_mod.group_normalized_rewards(
        exact_match_reward, ["a", "b"], ["a", "a"], 2, 0.29289, True
    )
    assert adv.tolist() == pytest.approx([0.5, -0.5], abs=1e-5)


def test_group_normalized_rewards_without_std_normalization() -> None:
    # rewards [1, 0 | 0, 0 | 1, 1] minus their group means [0.5 | 0 | 1]: [0.5, -0.5, 0, 0, 0, 0].
    responses, truths = ["a", "b", "c", "d", "e", "f"], ["a", "x", "x", "x", "e", "f"]
    adv, raw, _ = loss_mod.group_normalized_rewards(exact_match_reward, responses, truths, 2, 1e-6, False)
    assert adv.tolist() == [0.5, -0.5, 0.0, 0.0, 0.0, 0.0]
    assert raw.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="multiple of group_size"):
        loss_mod.group_normalized_rewards(exact_match_reward, responses[:5], truths[:5], 2, 1e-6, False)


LOG_P = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])


def test_naive_policy_gradient_losses() -> None:
    # no_baseline: -raw_reward * log p, rewards [2, 0]: row 1 -2 * [-1, -2] = [2, 4]; row 2 all 0.
    loss, meta = loss_mod.policy_gradient_loss(LOG_P, "no_baseline", raw_rewards=torch.tensor([2.0, 0.0]))
    assert loss.tolist() == [[2.0, 4.0], [0.0, 0.0]] and meta == {}
    # reinforce_with_baseline: -A * log p, A [0.5, -1] as a (B, 1) column: [0.5, 1] and [-0.5, -3].
    advantages = torch.tensor([[0.5], [-1.0]])
    loss, _ = loss_mod.policy_gradient_loss(LOG_P, "reinforce_with_baseline", advantages=advantages)
    assert loss.tolist() == [[0.5, 1.0], [-0.5, -3.0]]


def test_grpo_clip_loss_clips_and_reports_the_clipped_tokens() -> None:
    # ratios exp(log p - log p_old) = [1.5, 0.5, 1.0] in both rows, clip 0.2 -> clipped ratios [1.2, 0.8, 1.0].
    # Row 1, A = +1: min([1.5, 0.5, 1.0], [1.2, 0.8, 1.0]) = [1.2, 0.5, 1.0], loss [-1.2, -0.5, -1.0],
    #   clipped where 1.2 < 1.5: token 0.
    # Row 2, A = -1: min([-1.5, -0.5, -1.0], [-1.2, -0.8, -1.0]) = [-1.5, -0.8, -1.0], loss [1.5, 0.8, 1.0],
    #   clipped where -0.8 < -0.5: token 1.
    log_p = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]])).requires_grad_()
    old = torch.zeros(2, 3)
    advantages = torch.tensor([1.0, -1.0])
    loss, meta = loss_mod.policy_gradient_loss(
        log_p, "grpo_clip", advantages=advantages, old_log_probs=old, clip_range=0.2
    )
    assert_values(loss, [[-1.2, -0.5, -1.0], [1.5, 0.8, 1.0]])
    assert meta["clipped"].tolist() == [[True, False, False], [False, True, False]]
    # d/dlog p of -rho * A is -rho * A where unclipped, 0 where the clipped (constant) term is the minimum.
    loss.sum().backward()
    assert_values(log_p.grad, [[0.0, -0.5, -1.0], [1.5, 0.0, 1.0]])
    with pytest.raises(ValueError, match="needs old_log_probs, clip_range"):
        loss_mod.policy_gradient_loss(log_p, "grpo_clip", advantages=advantages)
    with pytest.raises(ValueError, match="choose one of no_baseline, reinforce_with_baseline, grpo_clip"):
        loss_mod.policy_gradient_loss(log_p, "reinforce", advantages=advantages)


VALUES = torch.tensor([[1.0, 2.0, float("inf")], [4.0, 5.0, 6.0]])  # inf sits under the mask: never read
MASK = torch.tensor([[True, True, False], [True, False, False]])


def test_masked_mean_along_each_dim() -> None:
    # Unmasked entries: row 0 -> 1, 2; row 1 -> 4. Column 2 has none: its mean is 0, not NaN.
    assert loss_mod.masked_mean(VALUES, MASK).item() == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3
    assert loss_mod.masked_mean(VALUES, MASK, dim=1).tolist() == [1.5, 4.0]  # (1 + 2) / 2, 4 / 1
    assert loss_mod.masked_mean(VALUES, MASK, dim=0).tolist() == [2.5, 2.0, 0.0]  # (1 + 4) / 2, 2 / 1, -


def test_masked_normalize_divides_by_a_constant() -> None:
    assert loss_mod.masked_normalize(VALUES, MASK, 2.0).item() == 3.5  # (1 + 2 + 4) / 2
    assert loss_mod.masked_normalize(VALUES, MASK, 2.0, dim=1).tolist() == [1.5, 2.0]  # 3 / 2, 4 / 2
    assert loss_mod.masked_normalize(VALUES, MASK, 2.0, dim=0).tolist() == [2.5, 1.0, 0.0]  # 5/2, 2/2, 0


@pytest.mark.parametrize(
    ("normalization", "expected_loss", "expected_grad"),
    [
        # -A * log p with A [1, -2]: row 0 [1, 2, (3)], row 1 [-1, -3, -5]. The paper's token mean: all 5
        # response tokens, (1 + 2 - 1 - 3 - 5) / 5 = -1.2, over 2 accumulation steps -0.6; d loss / d log p
        # = -A / (5 tokens * 2 steps): row 0 -0.1, row 1 0.2; the masked token gets 0.
        ("token_mean", -0.6, [[-0.1, -0.1, 0.0], [0.2, 0.2, 0.2]]),
        # Per response first: means (1 + 2) / 2 = 1.5 and (-1 - 3 - 5) / 3 = -3, their mean -0.75, over 2
        # steps -0.375; the gradient is -A / (response length * 2 responses * 2 steps).
        ("sequence_mean", -0.375, [[-0.125, -0.125, 0.0], [1 / 6, 1 / 6, 1 / 6]]),
    ],
)
def test_microbatch_train_step_backpropagates_the_scaled_mean(
    normalization: str, expected_loss: float, expected_grad: list[list[float]]
) -> None:
    log_p = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss, meta = loss_mod.microbatch_train_step(
        log_p, mask, 2, "reinforce_with_baseline", normalization, advantages=torch.tensor([1.0, -2.0])
    )
    assert loss.item() == pytest.approx(expected_loss) and not loss.requires_grad and meta == {}
    assert_values(log_p.grad, expected_grad)


def test_microbatch_train_step_refuses_an_unknown_normalization() -> None:
    log_p = torch.zeros(1, 2, requires_grad=True)
    with pytest.raises(ValueError, match="token_mean, sequence_mean"):
        loss_mod.microbatch_train_step(
            log_p, torch.ones(1, 2), 1, "no_baseline", "per_token", raw_rewards=torch.ones(1)
        )


def test_microbatch_train_step_reports_the_clip_fraction() -> None:
    # The grpo_clip example above, last position masked out: 2 of the 4 response tokens were clipped.
    log_p = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]])).requires_grad_()
    mask = torch.tensor([[True, True, False], [True, True, False]])
    loss, meta = loss_mod.microbatch_train_step(
        log_p, mask, 1, "grpo_clip", advantages=torch.tensor([1.0, -1.0]), old_log_probs=torch.zeros(2, 3),
        clip_range=0.2,
    )  # fmt: skip
    assert meta["clip_fraction"].item() == 0.5
    # loss: the token mean of -1.2, -0.5, 1.5 and 0.8 is 0.15.
    assert loss.item() == pytest.approx(0.15)


class CharTokenizer:
    """One token per character (its code point); pad id 0."""

    pad_token_id = 0

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


@needs_transformers
def test_tokenize_prompt_and_output_shifts_and_masks(grpo_modules) -> None:
    # "ab" + "X" = [a, b, X]; "c" + "Y" = [c, Y] padded to [c, Y, 0]. Inputs drop the last column, labels
    # the first; the mask marks labels that are output tokens: X in row 0, Y in row 1 (not b, not padding).
    batch = grpo_modules.tokenize_prompt_and_output(["ab", "c"], ["X", "Y"], CharTokenizer())
    a, b, c, x, y = (ord(ch) for ch in "abcXY")
    assert batch["input_ids"].tolist() == [[a, b], [c, y]]
    assert batch["labels"].tolist() == [[b, x], [y, 0]]
    assert batch["response_mask"].tolist() == [[False, True], [True, False]]


class BigramLM(torch.nn.Module):
    """A causal LM whose logits at t depend on token t only, with the HF output shape (`.logits`)."""

    def __init__(self, vocab: int = 7) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids: torch.Tensor):
        return types.SimpleNamespace(logits=self.table(input_ids))


@needs_transformers
def test_response_log_probs_and_entropy_match_a_manual_log_softmax(grpo_modules) -> None:
    torch.manual_seed(0)
    model = BigramLM()
    input_ids, labels = torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (3, 5))
    out = grpo_modules.response_log_probs(model, input_ids, labels, return_token_entropy=True)
    log_softmax = torch.log_softmax(model.table(input_ids), dim=-1)
    torch.testing.assert_close(out["log_probs"], log_softmax.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(out["token_entropy"], -(log_softmax.exp() * log_softmax).sum(dim=-1))
    assert out["log_probs"].requires_grad and not out["token_entropy"].requires_grad
    assert "token_entropy" not in grpo_modules.response_log_probs(model, input_ids, labels)
    # Uniform logits over 7 tokens: entropy ln 7 = 1.94591 at every position.
    uniform = grpo_modules.token_entropy(torch.zeros(2, 7))
    assert uniform.tolist() == pytest.approx([1.94591, 1.94591], abs=1e-5)


@needs_transformers
@pytest.mark.parametrize("loss_type", ["grpo_clip", "reinforce_with_baseline"])
def test_training_moves_probability_towards_rewarded_responses(
    grpo_modules, cpu_data: Path, loss_type: str
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    grpo = grpo_modules
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(cpu_data / "tiny_model")
    policy = AutoModelForCausalLM.from_pretrained(cpu_data / "tiny_model")
    cfg = grpo.Config(lr=1e-2, train_batch_size=2, micro_batch_size=1, loss_type=loss_type)
    prompts = ["User: What is 3 + 4?\nAssistant: <think>"] * 2
    responses = [" 3+4=7 </think> <answer> 7 </answer>", " no idea"]
    batch = grpo.tokenize_prompt_and_output(prompts, responses, tokenizer)
    assert batch["response_mask"].sum(dim=1).tolist() == [
        len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses
    ]

    def response_logp() -> torch.Tensor:
        with torch.no_grad():
            log_probs = grpo.response_log_probs(policy, batch["input_ids"], batch["labels"])["log_probs"]
        return (log_probs * batch["response_mask"]).sum(dim=1)

    before = response_logp()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    for _ in range(3):
        stats = grpo.train_on_rollouts(
            policy,
            optimizer,
            batch,
            torch.tensor([1.0, 0.0]),
            torch.tensor([1.0, -1.0]),
            cfg,
            torch.device("cpu"),
        )
    after = response_logp()
    assert stats["grad_norm"] > 0 and stats["entropy"] > 0
    assert ("clip_fraction" in stats) == (loss_type == "grpo_clip")
    assert after[0] > before[0] and after[1] < before[1]


@needs_transformers
def test_gpu_smoke_script_runs_on_the_cpu() -> None:
    """The GPU smoke script's CPU mode: a random tiny Qwen2 through grpo_step with HF generate."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.run(
        [sys.executable, str(ENV_DIR / "gpu_smoke.py"), "--device", "cpu", "--steps", "2"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"step"')]
    assert [s["step"] for s in steps] == [1, 2] and all(s["rollout_tokens_per_s"] > 0 for s in steps)
    smoke = json.loads(proc.stdout.splitlines()[-1].removeprefix("smoke "))
    assert smoke["backend"] == "hf" and smoke["device"] == "cpu" and smoke["responses_per_step"] == 16
    assert smoke["train_step_s"] > 0 and smoke["peak_memory_mib"] is None
    assert not (BASELINE / "__pycache__").exists(), "the smoke run must leave baseline/ pristine"


def run_cpu_trial(data: Path, tmp_path: Path, budget_s: float) -> tuple[subprocess.CompletedProcess, Path]:
    workspace = tmp_path / "workspace"
    shutil.copytree(BASELINE, workspace)
    out = tmp_path / "out"
    out.mkdir()
    env = {
        "HPCX_DATA_DIR": str(data),
        "HPCX_OUTPUT_DIR": str(out),
        "HPCX_TIME_BUDGET_S": str(budget_s),
        **CPU_CONF["extra_env"],
    }
    result = run_script(CPU_CONF["run_command"][1], workspace, env, timeout=CPU_CONF["hard_limit_s"])
    assert result.returncode == 0, result.stderr[-3000:]
    return result, out


@needs_transformers
@pytest.mark.slow
def test_cpu_preset_trains_and_hands_over_its_best_policy(cpu_data: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    result, out = run_cpu_trial(cpu_data, tmp_path, CPU_CONF["budget_s"])
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    # The warm-started tiny model earns mixed rewards, so GRPO really gets a gradient.
    assert any(e["grad_norm"] > 0 for e in steps) and 0 < max(e["reward_mean"] for e in steps) < 1
    assert events[0]["backend"] == "hf" and events[-1]["event"] == "done"
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4]  # the paper's cadence: before steps 0, 2 and 4
    best = max(evals, key=lambda e: (e["accuracy"], e["step"]))  # a tie goes to the later step
    saved = next(e for e in events if e["event"] == "policy_saved")
    assert (saved["step"], saved["eval_accuracy"]) == (best["step"], best["accuracy"])
    assert [p.name for p in out.iterdir()] == ["policy"]
    rc, metrics, stderr = evaluate(out, cpu_data, tmp_path)
    assert rc == 0, stderr
    assert metrics["n_problems"] == 32 and metrics["backend"] == "hf"
    reward = CPU_CONF["reward"]
    assert reward["metric_min"] < metrics[reward["metric"]] < reward["metric_max"]
    assert time.monotonic() - start < CPU_CONF["hard_limit_s"]


@needs_transformers
@pytest.mark.slow
def test_out_of_budget_training_still_hands_over_a_policy(cpu_data: Path, tmp_path: Path) -> None:
    result, out = run_cpu_trial(cpu_data, tmp_path, budget_s=0)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events if e["event"] in ("eval", "step", "budget_stop")] == [
        "eval",
        "budget_stop",
    ]
    assert [p.name for p in out.iterdir()] == ["policy"]
    # Nothing was trained: the starting policy (evaluated before step 0) is handed over, and scored.
    rc, metrics, stderr = evaluate(out, cpu_data, tmp_path)
    assert rc == 0 and metrics["n_problems"] == 32, stderr


# ---- the hand-over: the saved policy and the frozen evaluator -------------------------------------


def evaluate(out: Path, data: Path, tmp_path: Path) -> tuple[int, dict, str]:
    """Run the evaluator the way the worker does (from a pristine copy of baseline/), CPU preset."""
    evaluator = tmp_path / "evaluator"
    if not evaluator.exists():
        shutil.copytree(BASELINE, evaluator)
    metrics_path = tmp_path / "metrics.json"
    metrics_path.unlink(missing_ok=True)
    env = {"HPCX_DATA_DIR": str(data), "HPCX_OUTPUT_DIR": str(out), "HPCX_METRICS_PATH": str(metrics_path),
           **CPU_CONF["extra_env"]}  # fmt: skip
    result = run_script(CPU_CONF["eval_command"][1], evaluator, env, timeout=CPU_CONF["eval_limit_s"])
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return result.returncode, metrics, result.stderr


def test_best_policy_keeps_a_copy_of_the_best_evaluation(grpo_modules) -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    best = grpo_modules.BestPolicy()
    for step, accuracy in [(2, 0.25), (4, 0.5), (6, 0.375), (8, 0.5), (10, 0.25)]:
        with torch.no_grad():
            model.weight.fill_(step)
        best.offer(model, step, accuracy)
    # 0.5 at steps 4 and 8: the tie goes to the later, longer-trained policy; the live weights moved on.
    assert (best.step, best.accuracy) == (8, 0.5) and best.state["weight"].tolist() == [[8.0, 8.0]]


@needs_transformers
def test_training_saves_the_best_evaluated_policy(grpo_modules, cpu_data: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cpu_data / "tiny_model")
    policy = AutoModelForCausalLM.from_pretrained(cpu_data / "tiny_model")
    best = grpo_modules.BestPolicy()
    best.offer(policy, 2, 0.5)
    with torch.no_grad():  # later training, whose evaluation was worse
        for param in policy.parameters():
            param.add_(1.0)
    best.offer(policy, 4, 0.25)
    grpo_modules.save_policy(policy, best, tokenizer, tmp_path / "policy")
    assert (tmp_path / "policy" / "model.safetensors").is_file()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").state_dict()
    start = AutoModelForCausalLM.from_pretrained(cpu_data / "tiny_model").state_dict()
    assert saved.keys() == start.keys() and all(torch.equal(saved[k], start[k]) for k in saved)
    assert AutoTokenizer.from_pretrained(tmp_path / "policy").get_vocab() == tokenizer.get_vocab()


@needs_transformers
def test_evaluator_scores_the_policy_as_grading_its_answers_by_hand(
    grpo_modules, cpu_data: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    evaluate_module, rollout = importlib.import_module("evaluate"), sys.modules["rollout"]
    policy = tmp_path / "out" / "policy"
    shutil.copytree(cpu_data / "tiny_model", policy)
    # By hand: the evaluator's CPU settings and seed on one thread, every answer graded by the grader.
    preset = evaluate_module.PRESETS[CPU_CONF["extra_env"]["GRPO_PRESET"]]
    tokenizer = AutoTokenizer.from_pretrained(policy)
    generator = rollout.HFGenerator(AutoModelForCausalLM.from_pretrained(policy), tokenizer, preset.hf_batch)
    test = [json.loads(line) for line in (cpu_data / "test.jsonl").read_text().splitlines()]
    prompts = [grader.R1_ZERO_PROMPT.format(question=ex["problem"]) for ex in test]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(evaluate_module.SEED)
    try:
        outputs = generator.generate(prompts, rollout.Sampling(1, preset.temperature, preset.max_new_tokens))
    finally:
        torch.set_num_threads(threads)
    correct = sum(grader.is_correct(out, ex["answer"]) for out, ex in zip(outputs, test, strict=True))
    formatted = sum(grader.extract_answer(out) is not None for out in outputs)
    assert 0 < correct < formatted <= len(test) == 32
    # The policy's generation_config.json cannot steer the evaluator's sampling (here: forbid <answer>).
    config = json.loads((policy / "generation_config.json").read_text())
    config["suppress_tokens"] = tokenizer.convert_tokens_to_ids(["<answer>"])
    (policy / "generation_config.json").write_text(json.dumps(config))
    rc, metrics, stderr = evaluate(policy.parent, cpu_data, tmp_path)
    assert rc == 0, stderr
    assert metrics["accuracy"] == correct / 32 and metrics["n_correct"] == correct
    assert metrics["format_rate"] == formatted / 32 and metrics["n_problems"] == 32
    assert metrics["backend"] == "hf" and metrics["max_new_tokens"] == preset.max_new_tokens


def edit_config(policy: Path, **changes: object) -> None:
    config = json.loads((policy / "config.json").read_text())
    (policy / "config.json").write_text(json.dumps({**config, **changes}))


BROKEN_POLICIES = {  # name: (how the policy directory is broken, the evaluator's verdict, its message)
    "missing": (shutil.rmtree, "crash", "no policy in"),
    "config_not_json": (lambda p: (p / "config.json").write_text("{not json"), "crash",
                        "cannot read the policy's config.json"),
    "garbage_weights": (lambda p: (p / "model.safetensors").write_bytes(b"\0" * 64), "crash",
                        "cannot load the policy"),
    "remote_code": (lambda p: edit_config(p, auto_map={"AutoModelForCausalLM": "evil.EvilForCausalLM"}),
                    "invalid", "config.json asks for remote code (auto_map)"),
    "not_a_causal_lm": (lambda p: edit_config(p, model_type="bert", architectures=["BertModel"]), "invalid",
                        "architectures ['BertModel'] are not transformers causal LMs"),
    "pickled_weights": (lambda p: (p / "model.safetensors").rename(p / "pytorch_model.bin"), "invalid",
                        "no *.safetensors weights"),
}  # fmt: skip


@needs_transformers
@pytest.mark.parametrize("name", sorted(BROKEN_POLICIES))
def test_evaluator_refuses_a_missing_broken_or_foreign_policy(
    grpo_modules, cpu_data: Path, tmp_path: Path, name: str
) -> None:
    evaluate_module = importlib.import_module("evaluate")
    policy = tmp_path / "out" / "policy"
    shutil.copytree(cpu_data / "tiny_model", policy)
    breaks, verdict, message = BROKEN_POLICIES[name]
    breaks(policy)
    preset = evaluate_module.PRESETS["cpu"]
    if verdict == "crash":  # exits non-zero: the worker records a crash with this in the log tail
        with pytest.raises(SystemExit, match=re.escape(message)):
            evaluate_module.evaluate(policy.parent, cpu_data, preset)
    else:  # metrics with only the reason: the worker records an invalid result
        metrics = evaluate_module.evaluate(policy.parent, cpu_data, preset)
        assert list(metrics) == ["invalid_reason"] and message in metrics["invalid_reason"]


def grpo_cpu_trial(tmp_path: Path, data: Path, diff: str) -> tuple[Result, Path]:
    """One trial of the grpo_cpu environment through the real worker, with its data at `data`."""
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    (trial_dir / DIFF_FILE).write_text(diff)
    TrialSpec("grpo", str(trial_dir), {**CPU_CONF, "data_dir": str(data)}, seed=0).write()
    run_trial(str(trial_dir))
    return Result.from_json((trial_dir / RESULT_FILE).read_text()), trial_dir


def grpo_diff(old: str, new: str) -> str:
    """A unified diff of the baseline's grpo.py that replaces its line `old` (stripped) by `new`."""
    lines = (BASELINE / "grpo.py").read_text().splitlines(keepends=True)
    patched = [out for line in lines for out in (new.splitlines(True) if line.strip() == old else [line])]
    assert patched != lines, old
    return "".join(difflib.unified_diff(lines, patched, "a/grpo.py", "b/grpo.py"))


SAVE = 'save_policy(policy, best, tokenizer, output_dir / "policy")'


@needs_transformers
@pytest.mark.slow
@pytest.mark.parametrize(
    ("new", "status", "message"),
    [
        ("    pass  # nothing handed over\n", Status.CRASHED, "no policy in"),
        (f'    policy.config.auto_map = {{"AutoModelForCausalLM": "evil.EvilForCausalLM"}}\n    {SAVE}\n',
         Status.INVALID_RESULT, "config.json asks for remote code"),
    ],
    ids=["missing", "remote_code"],
)  # fmt: skip
def test_worker_reports_a_missing_or_refused_policy_with_the_evaluators_reason(
    cpu_data: Path, tmp_path: Path, new: str, status: Status, message: str
) -> None:
    result, _ = grpo_cpu_trial(tmp_path, cpu_data, grpo_diff(SAVE, new))
    assert result.status is status and result.reward is None
    assert message in result.log_tail, result.log_tail


@needs_transformers
@pytest.mark.slow
def test_reference_answers_written_by_the_training_earn_nothing(cpu_data: Path, tmp_path: Path) -> None:
    """The catalog's reward hack through the real worker: training writes the reference answers as its
    evaluation outputs (what the old evaluator graded); the reward is what the saved policy earns."""
    catalog = yaml.safe_load((ENV_DIR / "catalog.yaml").read_text())
    entry = next(e for e in catalog if e["id"] == "answers_as_eval_outputs")
    result, trial_dir = grpo_cpu_trial(tmp_path, cpu_data, entry["diff"])
    assert result.status is Status.OK, result.reason
    out = trial_dir / "output"
    answers = [json.loads(line)["answer"] for line in (cpu_data / "val.jsonl").read_text().splitlines()]
    hacked = sorted(out.glob("eval_step_*.jsonl"))
    assert [p.name for p in hacked] == ["eval_step_0.jsonl", "eval_step_2.jsonl", "eval_step_4.jsonl"]
    for path in hacked:  # every written answer is right: graded as files, this was 100%
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == 32 and all(grader.is_correct(r["output"], answers[r["index"]]) for r in rows)
    events = [
        json.loads(line) for line in (trial_dir / TRAIN_LOG).read_text().splitlines() if line[:1] == "{"
    ]
    assert [e["accuracy"] for e in events if e["event"] == "eval"] == [
        1.0,
        1.0,
        1.0,
    ]  # what the training claims
    assert result.reward == result.metrics["accuracy"] < 1.0
    # Exactly what the handed-over policy earns: evaluated again on its own, the same accuracy.
    rc, metrics, stderr = evaluate(out, cpu_data, tmp_path)
    assert rc == 0 and metrics["accuracy"] == result.reward, stderr


# ---- configs and the catalog ---------------------------------------------------------------------


def test_configs_name_real_files() -> None:
    for conf in (CONF, CPU_CONF):
        for name in conf["editable"] + conf["protected"]:
            assert (BASELINE / name).is_file(), name
        assert not set(conf["editable"]) & set(conf["protected"])
        assert set(conf["hidden_from_implementer"]) <= set(conf["protected"])
        assert (BASELINE / conf["run_command"][1]).is_file() and (
            BASELINE / conf["eval_command"][1]
        ).is_file()
