"""GPT-2 (124M) as in the first modded-nanogpt record (the paper's nanoGPT baseline).

Learned position embeddings, RMSNorm without learnable gains, GELU MLP, tied input/output
embeddings, the attention output scaled by 1/sqrt(2 * n_layer), PyTorch's default initialisation
for the linear layers and N(0, 0.02) for the embeddings.

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
    vocab_size: int = 50257  # GPT-2's tokenizer, unpadded as in the record
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


def rmsnorm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / rms(x), computed in float32 and cast back; no learnable gain (the record has none)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # The record divides the attention output by sqrt(2 * n_layer) in the forward pass (instead of
        # GPT-2's scaled init of c_proj): the residual stream's variance stays ~constant with depth.
        self.out_scale = 1.0 / math.sqrt(2 * config.n_layer)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        return tuple(t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)) * self.out_scale

    def decode(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int) -> torch.Tensor:
        """x: (B, 1, C), the token at position ``pos``; attends to cached positions 0..pos."""
        B, _, C = x.shape
        q, k, v = self._qkv(x)
        k_cache[:, :, pos : pos + 1] = k
        v_cache[:, :, pos : pos + 1] = v
        # Everything in the cache is in the past (or the present), so no mask is needed.
        y = F.scaled_dot_product_attention(q, k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1])
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, 1, C)) * self.out_scale


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(rmsnorm(x))
        return x + self.mlp(rmsnorm(x))

    def decode(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int) -> torch.Tensor:
        x = x + self.attn.decode(rmsnorm(x), k_cache, v_cache, pos)
        return x + self.mlp(rmsnorm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        # Linear layers keep PyTorch's default init; only the embeddings (the tied head with them)
        # are drawn from N(0, 0.02), as in the record.
        for embedding in (self.wte, self.wpe):
            nn.init.normal_(embedding.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) without targets; the mean cross-entropy with them."""
        T = idx.size(1)
        assert self.config.block_size >= T, f"sequence of {T} > block_size {self.config.block_size}"
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(rmsnorm(x))
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
        return self.lm_head(rmsnorm(x))[:, 0, :]


def build_model(config: dict) -> GPT:
    """The evaluator's entry point: rebuild the model from the checkpoint's ``model_config``."""
    return GPT(GPTConfig(**config))
