"""Self-attention as an encoder mixer: full (eager / SDPA / FlashAttention-2) or block-local.

Vaswani et al., "Attention Is All You Need" (2017). Block-local attention follows the local part of
LongT5 (Guo et al., 2022) and BigBird (Zaheer et al., 2020): the sequence is cut into blocks of `attention_window`
tokens and each block attends to itself and its two neighbours, so every token sees at least `attention_window`
tokens on each side (up to 2 * `attention_window` - 1) at O(L * window) cost.

The q/k/v/out projections carry BART's names, so a BART encoder layer's `self_attn` weights load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bart.modeling_bart import eager_attention_forward

from .configuration_scrolls_ssm import ScrollsSSMConfig


class AttentionMixer(nn.Module):
    """Multi-head bidirectional self-attention over the real (unpadded) positions."""

    returns_attentions = True  # the encoder block may call it with `output_attentions=True`

    def __init__(self, config: ScrollsSSMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.embed_dim = config.d_model
        self.num_heads = config.encoder_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.window = config.attention_window
        self.is_causal = False  # read by transformers' attention functions
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, seq, d_model) -> (batch, heads, seq, head_dim)
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, output_attentions: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """The mixer contract's `(batch, seq, d_model)` output; with `output_attentions=True`, also the attention
        probabilities `(batch, heads, seq, seq)` of full attention (None for block-local attention)."""
        batch, seq, _ = hidden_states.shape
        q = self._heads(self.q_proj(hidden_states))
        k = self._heads(self.k_proj(hidden_states))
        v = self._heads(self.v_proj(hidden_states))
        weights = None
        if self.window is not None and self.window < seq:
            out = self._block_local(q, k, v, attention_mask)  # (batch, seq, heads, head_dim)
        else:
            out, weights = self._full(hidden_states, q, k, v, attention_mask, output_attentions)
        out = self.out_proj(out.reshape(batch, seq, self.embed_dim))
        return (out, weights) if output_attentions else out

    def _full(self, hidden_states, q, k, v, attention_mask, output_attentions: bool = False):
        """(batch, seq, heads, head_dim) outputs, and the probabilities when asked (computed eagerly then, whatever
        the attention implementation: SDPA and FlashAttention never materialize them)."""
        implementation = self.config._attn_implementation
        if implementation is None and not output_attentions:
            # Built from a bare config, outside a model: no implementation was chosen, and transformers' mask
            # builder would return no mask at all. Plain SDPA with a key mask keeps padding exact.
            key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
            dropout = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout, scale=self.scaling)
            return out.transpose(1, 2), None
        if output_attentions:
            implementation = "eager"
        mask = _bidirectional_mask(self.config, implementation, hidden_states, attention_mask)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        dropout = self.dropout if self.training else 0.0
        return attend(self, q, k, v, mask, dropout=dropout, scaling=self.scaling)  # (outputs, probabilities)

    def _block_local(self, q, k, v, attention_mask):
        """Each block of `window` queries attends to the keys of its own block and of the blocks either side."""
        batch, heads, seq, dim = q.shape
        w = self.window
        blocks = -(-seq // w)
        pad = blocks * w - seq
        if attention_mask is None:
            attention_mask = q.new_ones(batch, seq)
        key_ok = F.pad(attention_mask.bool(), (0, pad), value=False).view(batch, blocks, w)

        def to_blocks(x):  # (batch, heads, seq, dim) -> (batch, blocks, heads, w, dim)
            return F.pad(x, (0, 0, 0, pad)).view(batch, heads, blocks, w, dim).transpose(1, 2)

        kb = _with_neighbours(to_blocks(k), fill=0.0, window_dim=3)  # (batch, blocks, heads, 3w, dim)
        vb = _with_neighbours(to_blocks(v), fill=0.0, window_dim=3)
        mask = _with_neighbours(key_ok, fill=False, window_dim=2)  # (batch, blocks, 3w)
        # A block of padding far from any token has no key to attend to: let it attend to everything there, which
        # keeps its (unused) output finite. A NaN at a padded position would reach real ones through 0 * NaN.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        # Fold blocks into the batch so SDPA (memory-efficient on CPU and GPU) does the work.
        out = F.scaled_dot_product_attention(
            to_blocks(q).reshape(batch * blocks, heads, w, dim),
            kb.reshape(batch * blocks, heads, 3 * w, dim),
            vb.reshape(batch * blocks, heads, 3 * w, dim),
            attn_mask=mask.view(batch * blocks, 1, 1, 3 * w),
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scaling,
        )
        # (batch * blocks, heads, w, dim) -> (batch, seq, heads, dim)
        out = out.view(batch, blocks, heads, w, dim).transpose(2, 3).reshape(batch, blocks * w, heads, dim)
        return out[:, :seq]


def _bidirectional_mask(config, implementation: str, hidden_states, attention_mask):
    """transformers' mask for `implementation` (an additive float mask for eager, None when nothing is masked)."""
    if implementation == config._attn_implementation:
        return create_bidirectional_mask(config=config, inputs_embeds=hidden_states, attention_mask=attention_mask)
    if attention_mask is None:
        return None
    # (batch, 1, 1, seq) additive mask: 0 where a key is a token, the dtype's minimum where it is padding.
    blocked = ~attention_mask.bool()[:, None, None, :]
    return torch.zeros(blocked.shape, dtype=hidden_states.dtype, device=hidden_states.device).masked_fill(
        blocked, torch.finfo(hidden_states.dtype).min
    )


def _with_neighbours(x: torch.Tensor, fill: float | bool, window_dim: int) -> torch.Tensor:
    """(batch, blocks, ..., w, ...) -> (batch, blocks, ..., 3w, ...): each block joined by the previous and next one.

    Dimension 1 indexes blocks and `window_dim` the positions inside a block; missing neighbours are `fill`.
    """
    edge = torch.full_like(x[:, :1], fill)
    previous = torch.cat([edge, x[:, :-1]], dim=1)
    following = torch.cat([x[:, 1:], edge], dim=1)
    return torch.cat([previous, x, following], dim=window_dim)
