"""GPT-2 (124M) in the style of the first modded-nanogpt record.

Learned position embeddings, RMSNorm, GELU MLP, tied input/output embeddings.

Two ways to run the model, which must stay equivalent:
- ``model(idx, targets)``: the whole sequence at once with a causal mask (training);
- ``model.new_kv_cache(...)`` + ``model.decode_step(tokens, cache)``: one token at a time with a
  key/value cache. The frozen evaluator scores the model ONLY through this path, feeding each
  position its own token and never a later one, so any change to attention must also be made here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 128 for faster matmuls
    block_size: int = 1024  # longest sequence (learned position embeddings)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


@dataclass
class KVCache:
    """Keys and values of the positions decoded so far, per layer: (batch, head, max_len, head_dim)."""

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    pos: int = 0  # how many positions are filled


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        return tuple(t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def decode(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int) -> torch.Tensor:
        """x: (B, 1, C), the token at position ``pos``; attends to cached positions 0..pos."""
        B, _, C = x.shape
        q, k, v = self._qkv(x)
        k_cache[:, :, pos : pos + 1] = k
        v_cache[:, :, pos : pos + 1] = v
        # Everything in the cache is in the past (or the present), so no mask is needed.
        y = F.scaled_dot_product_attention(q, k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1])
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, 1, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def decode(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int) -> torch.Tensor:
        x = x + self.attn.decode(self.ln_1(x), k_cache, v_cache, pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections down so the residual stream's variance stays ~constant.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) without targets; the mean cross-entropy with them."""
        T = idx.size(1)
        assert self.config.block_size >= T, f"sequence of {T} > block_size {self.config.block_size}"
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))

    def new_kv_cache(
        self, batch_size: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> KVCache:
        assert max_len <= self.config.block_size, f"max_len {max_len} > block_size {self.config.block_size}"
        head_dim = self.config.n_embd // self.config.n_head
        shape = (batch_size, self.config.n_head, max_len, head_dim)
        return KVCache(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks],
        )

    def decode_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, vocab) for the next token, given ``tokens`` (B,) at position ``cache.pos``."""
        pos = cache.pos
        x = self.wte(tokens)[:, None, :] + self.wpe.weight[pos]
        for i, block in enumerate(self.blocks):
            x = block.decode(x, cache.k[i], cache.v[i], pos)
        cache.pos = pos + 1
        return self.lm_head(self.ln_f(x))[:, 0, :]


def build_model(config: dict) -> GPT:
    """The evaluator's entry point: rebuild the model from the checkpoint's ``model_config``."""
    return GPT(GPTConfig(**config))
