"""The GRPO baseline follows the paper's released environment: its data (all 7,500 problems), its
optimizer steps per rollout, loss and clipping, its evaluation cadence and its strict grader."""

from __future__ import annotations

import importlib
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_env_grpo import BASELINE, CONF, CPU_CONF, grader, grpo_modules, load_module, r1  # noqa: F401

# ---- data: the MATH training solutions without a \boxed{} answer ------------------------------------


def test_unboxed_training_solutions_are_kept_with_an_empty_answer_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prepare = load_module("grpo_env_prepare_paper", BASELINE / "prepare_data.py")

    def load_dataset(name: str, subject: str | None = None, split: str = "") -> list[dict]:
        if name == prepare.MATH_TEST:
            return [{"problem": f"t{i}", "solution": f"\\boxed{{{i}}}", "answer": str(i)} for i in range(500)]
        count = 1072 if prepare.MATH_SUBJECTS.index(subject) < 3 else 1071  # 7,500 in all
        rows = [{"problem": f"{subject} {i}", "solution": f"so $\\boxed{{{i}}}$"} for i in range(count)]
        if subject == "number_theory":  # as in MATH: two solutions state the answer without a box
            rows[5]["solution"] = rows[9]["solution"] = "The answer is 12, with no box."
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    prepare.prepare_math(tmp_path)
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(train) == 7500
    empty = [row for row in train if row["answer"] == ""]
    assert [row["problem"] for row in empty] == ["number_theory 5", "number_theory 9"]
    assert "2 of 7500 training solutions have no \\boxed{} answer (number_theory)" in capsys.readouterr().out
    # Nothing equals an empty answer: those problems earn every response reward 0.
    for response in (r1(""), r1("12"), r1("\\boxed{}")):
        for mode in grader.GRADERS:
            assert not grader.is_correct(response, "", mode)


# ---- the grader: the paper's strict rules by default, ours as an option -----------------------------


@pytest.mark.parametrize(
    ("response", "truth", "strict", "lenient"),
    [
        # the format: the literal "</think> <answer>", and the LAST <answer> is graded
        ("x </think><answer> 5 </answer>", "5", False, True),
        ("x </think>\n<answer> 5 </answer>", "5", False, True),
        (r1("3") + " <answer> 5 </answer>", "5", True, False),
        (r1("5") + " <answer> 3 </answer>", "5", False, True),
        (r1("\\boxed{7"), "7", False, False),  # a box that never closes
        # equivalence: unreduced fractions, decimals of fractions, base subscripts, integers
        (r1("\\frac{2}{4}"), "\\frac{1}{2}", False, True),
        (r1("2/4"), "\\frac{1}{2}", False, True),
        (r1("\\frac{10}{2}"), "5", False, True),  # an integer answer must be written as one
        (r1("1011_3"), "1011_2", False, True),
        (r1("1011_{3}"), "1011_2", False, True),
        (r1("\\{2, 1\\}"), "\\{1,2\\}", False, True),
        (r1("0.25"), "\\frac14", True, True),  # an exact decimal is the fraction
        (r1("0.33"), "\\frac{1}{3}", False, False),
        # what both accept
        (r1("0.5"), "\\frac{1}{2}", True, True),
        (r1("\\dfrac12"), "\\frac{1}{2}", True, True),
        (r1("x = 5"), "5", True, True),
        (r1("\\text{odd}"), "odd", True, True),
        (r1("5.0"), "5", True, True),
        (r1("10,000"), "10000", True, True),
        (r1("90^\\circ"), "90", True, True),
        (r1("\\left( 1, -2 \\right)"), "(1,-2)", True, True),
        (r1("2\\sqrt{3}"), "\\sqrt{12}", True, True),
        (r1("1011_{2}"), "1011_2", True, True),
        (r1("[1, 2)"), "(1,2)", False, False),
    ],
)
def test_strict_and_lenient_graders(response: str, truth: str, strict: bool, lenient: bool) -> None:
    assert grader.is_correct(response, truth, "strict") is strict
    assert grader.is_correct(response, truth, "lenient") is lenient


def test_strict_extraction_takes_the_text_after_the_last_answer_tag() -> None:
    assert grader.extract_answer("a </think> <answer> 7 </answer> <answer> 8 </answer>", "strict") == "8"
    assert (
        grader.extract_answer("a </think> <answer> so \\boxed{\\frac{1}{2}}.</answer>", "strict")
        == "\\frac{1}{2}"
    )
    assert (
        grader.extract_answer("a </think> <answer> \\boxed{7 </answer>", "strict") == ""
    )  # formatted, no box
    assert grader.extract_answer("a </think> <answer> 7", "strict") is None  # never closed
    assert grader.extract_answer("a </think>  <answer> 7 </answer>", "strict") is None  # two spaces


def test_the_grader_is_chosen_by_grpo_grader_strict_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    unreduced = r1("\\frac{2}{4}")
    monkeypatch.delenv("GRPO_GRADER", raising=False)
    assert grader.grader_mode() == "strict" and not grader.is_correct(unreduced, "\\frac12")
    monkeypatch.setenv("GRPO_GRADER", "lenient")
    assert grader.is_correct(unreduced, "\\frac12")
    monkeypatch.setenv("GRPO_GRADER", "generous")
    with pytest.raises(ValueError, match="strict, lenient"):
        grader.is_correct(unreduced, "\\frac12")
    for conf in (CONF, CPU_CONF):
        assert conf["extra_env"]["GRPO_GRADER"] == "strict"
        assert "math_equivalence.py" in conf["protected"]


def test_training_reward_and_evaluator_follow_grpo_grader(
    grpo_modules,  # noqa: F811  (the fixture, imported)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    evaluate = importlib.import_module("evaluate")
    reward = sys.modules["reward"]
    for mode, expected in (("strict", 0.0), ("lenient", 1.0)):
        monkeypatch.setenv("GRPO_GRADER", mode)
        assert reward.r1_zero_reward(r1("\\frac{2}{4}"), "\\frac12")["reward"] == expected
        assert float(evaluate.is_correct(r1("\\frac{2}{4}"), "\\frac12")) == expected


# ---- the optimizer steps: 16 in-order steps of 64 per rollout, token-mean loss, no clipping -----------


class ConstantPolicy(torch.nn.Module):
    """Logits that do not depend on the input: one learnable vector, so a backward pass is cheap."""

    def __init__(self, vocab: int = 8, scale: float = 100.0) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(vocab))
        self.scale = scale  # large, so that the gradient norm is far above 1

    def forward(self, input_ids: torch.Tensor) -> types.SimpleNamespace:
        B, T = input_ids.shape
        return types.SimpleNamespace(logits=self.scale * self.logits.expand(B, T, -1))


def test_a_rollout_batch_of_128_by_8_is_16_in_order_steps_of_16_micro_batches_of_4(
    grpo_modules,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    grpo = grpo_modules
    cfg = grpo.Config(loss_type="reinforce_with_baseline")
    assert (cfg.prompts_per_step, cfg.group_size, cfg.train_batch_size, cfg.micro_batch_size) == (
        128,
        8,
        64,
        4,
    )
    assert (cfg.shuffle_rollouts, cfg.max_grad_norm, cfg.loss_normalization) == (
        False,
        math.inf,
        "token_mean",
    )
    assert (cfg.eval_cadence, cfg.eval_every, cfg.n_steps, cfg.lr) == ("before", 2, 20, 1e-5)
    n = cfg.prompts_per_step * cfg.group_size
    batch = {
        "input_ids": torch.zeros(n, 3, dtype=torch.long),
        "labels": torch.randint(0, 8, (n, 3)),
        "response_mask": torch.ones(n, 3, dtype=torch.bool),
    }
    seen, real_micro_batch = [], grpo.micro_batch
    monkeypatch.setattr(
        grpo, "micro_batch", lambda b, idx, d: (seen.append(idx.tolist()), real_micro_batch(b, idx, d))[1]
    )
    policy = ConstantPolicy()
    steps = []
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    real_step = optimizer.step
    monkeypatch.setattr(
        optimizer, "step", lambda: (steps.append(policy.logits.grad.norm().item()), real_step())[1]
    )
    advantages = torch.randn(n)
    stats = grpo.train_on_rollouts(
        policy, optimizer, batch, torch.zeros(n), advantages, cfg, torch.device("cpu")
    )
    assert len(steps) == 16 and len(seen) == 256
    assert seen == [list(range(i, i + 4)) for i in range(0, n, 4)], "micro-batches of 4, in order"
    assert stats["grad_norm"] == pytest.approx(max(steps)) and max(steps) > 10, "not clipped to 1"


def test_the_paper_cadence_evaluates_before_steps_0_2_and_so_on(
    grpo_modules,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """n_steps 20, eval_every 2: evaluations of the policies after 0, 2, ..., 18 updates, as the paper's loop."""
    grpo = grpo_modules
    events = []
    monkeypatch.setattr(
        grpo,
        "evaluate_and_keep",
        lambda policy, gen, val, cfg, step, best: events.append(("eval", step)) or 1.0,
    )
    monkeypatch.setattr(grpo, "grpo_step", lambda *args: events.append(("step",)) or {"seconds": 1.0})
    monkeypatch.setattr(grpo, "save_policy", lambda *args: None)
    monkeypatch.setattr(grpo, "load_models", lambda cfg, seed, device: (None, torch.nn.Linear(1, 1), None))
    monkeypatch.setattr(grpo, "read_jsonl", lambda path: [{"problem": "p", "answer": "1"}] * 200)
    monkeypatch.setattr(grpo, "load_config", lambda data_dir: grpo.Config())
    monkeypatch.setenv("HPCX_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("HPCX_DATA_DIR", str(tmp_path))
    grpo.main()
    evals = [e[1] for e in events if e[0] == "eval"]
    assert evals == list(range(0, 20, 2))
    assert sum(e[0] == "step" for e in events) == 18, "no step is trained that no evaluation sees"
    events.clear()
    monkeypatch.setattr(grpo, "load_config", lambda data_dir: grpo.Config(eval_cadence="after"))
    grpo.main()
    assert [e[1] for e in events if e[0] == "eval"] == list(range(2, 21, 2))
