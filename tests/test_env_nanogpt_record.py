"""The nanoGPT baseline is the first modded-nanogpt record: its model (init, attention-output scale,
gain-free RMSNorm, vocabulary), its learning-rate schedule, and the evaluator's float32 validation."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_env_nanogpt import evaluate, load, model_mod  # the baseline's files, imported by name

SMALL = {"vocab_size": 512, "block_size": 32, "n_layer": 3, "n_head": 2, "n_embd": 64}
train_gpt = load("train_gpt")


def test_the_paper_model_has_the_records_124m_parameters_and_vocabulary() -> None:
    with torch.device("meta"):
        model = model_mod.GPT(model_mod.GPTConfig())
    assert model.config.vocab_size == 50257
    # By hand: wte 50257*768 + wpe 1024*768 + 12 blocks of (768*2304 + 768*768 + 2 * 768*3072); the
    # head is the tied wte, and RMSNorm has no gains.
    per_block = 768 * 2304 + 768 * 768 + 2 * 768 * 3072
    assert (
        sum(p.numel() for p in model.parameters()) == 50257 * 768 + 1024 * 768 + 12 * per_block == 124_318_464
    )


def test_linears_keep_pytorchs_default_init_and_only_embeddings_are_normal_002() -> None:
    torch.manual_seed(0)
    model = model_mod.build_model(SMALL)
    names = {name for name, _ in model.named_parameters()}
    assert names == {"wte.weight", "wpe.weight"} | {
        f"blocks.{i}.{layer}.weight"
        for i in range(3)
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }, "no norm gains, no biases"
    assert model.lm_head.weight is model.wte.weight
    for name in ("wte", "wpe"):
        assert getattr(model, name).weight.std().item() == pytest.approx(0.02, rel=0.05)
    # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std = bound / sqrt(3).
    for linear in (model.blocks[0].attn.c_proj, model.blocks[1].mlp.c_fc, model.blocks[2].mlp.c_proj):
        bound = 1 / math.sqrt(linear.in_features)
        weight = linear.weight
        assert weight.abs().max().item() <= bound
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_rmsnorm_has_no_gain() -> None:
    x = torch.tensor([[3.0, 4.0]])
    # mean of squares 12.5: [3, 4] / sqrt(12.5 + 1e-6)
    torch.testing.assert_close(model_mod.rmsnorm(x), torch.tensor([[0.8485281, 1.1313708]]))
    half = model_mod.rmsnorm(x.to(torch.bfloat16))
    assert half.dtype is torch.bfloat16  # computed in float32, handed back in the input's dtype


def test_attention_output_is_scaled_by_one_over_sqrt_two_n_layer_in_forward_and_decode() -> None:
    """One token attends only to itself, so with v = x and c_proj = I the output is x / sqrt(2 * 3)."""
    attn = model_mod.build_model(SMALL).blocks[0].attn
    d = SMALL["n_embd"]
    with torch.no_grad():
        attn.c_attn.weight.zero_()
        attn.c_attn.weight[2 * d :] = torch.eye(d)  # the value projection
        attn.c_proj.weight.copy_(torch.eye(d))
        x = torch.randn(2, 1, d)
        torch.testing.assert_close(attn(x), x / math.sqrt(6))
        k_cache, v_cache = torch.zeros(2, 2, 4, d // 2), torch.zeros(2, 2, 4, d // 2)
        torch.testing.assert_close(attn.decode(x, k_cache, v_cache, 0), x / math.sqrt(6))


@pytest.mark.parametrize(
    ("step", "multiplier"),
    [
        (0, 1 / 256),
        (127, 128 / 256),
        (255, 1.0),  # warmup ends
        (256, 1.0),  # decay starts at the peak
        (256 + 13_312, 0.6 / 1.1),  # halfway through the decay: (0.1 + 0.5) / 1.1
        (26_880, 0.1 / 1.1),  # 0.0909 of the peak at the record's last step
    ],
)
def test_the_paper_schedule_is_the_records(step: int, multiplier: float) -> None:
    hp = train_gpt.PRESETS["paper"]
    assert (hp.lr, hp.warmup_steps, hp.num_steps, hp.betas, hp.weight_decay) == (
        0.0015,
        256,
        26_880,
        (0.9, 0.95),
        0.1,
    )
    assert train_gpt.lr_multiplier(step, hp) == pytest.approx(multiplier, rel=1e-12)


def test_the_evaluator_scores_in_float32_and_agrees_with_a_float64_reference() -> None:
    torch.manual_seed(1)
    model = model_mod.build_model(SMALL).eval()
    x = torch.randint(0, 512, (4, 32))
    y = torch.randint(0, 512, (4, 32))
    dtypes = []
    new_cache = model.new_kv_cache
    model.new_kv_cache = lambda *args: (dtypes.append(args[-1]), new_cache(*args))[1]
    loss_sum, count = evaluate.kv_cache_loss(model, x, y, batch=4, device=torch.device("cpu"))
    assert dtypes == [torch.float32]
    with torch.no_grad():
        reference = model_mod.build_model(SMALL).double()
        reference.load_state_dict(model.state_dict())
        expected = reference(x, y).item()
    assert abs(loss_sum / count - expected) < 1e-4


def test_time_to_target_is_the_workers_measured_training_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCX_TRAIN_SECONDS", "1512.25")
    assert evaluate.measured_train_seconds() == 1512.25
    for unusable in ("", "nan", "-3", "soon"):
        monkeypatch.setenv("HPCX_TRAIN_SECONDS", unusable)
        assert evaluate.measured_train_seconds() is None
    monkeypatch.delenv("HPCX_TRAIN_SECONDS")
    assert evaluate.measured_train_seconds() is None
