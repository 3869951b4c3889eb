"""A MiniMind-style custom-code causal LM for the layout self-check tests (loaded with trust_remote_code).

Its own attention: with ``honour_mask=False`` it uses a plain causal mask plus the 2D
padding mask and positions 0..L-1, ignoring a 4D mask and position_ids (as many
custom models do); with ``honour_mask=True`` it takes a 4D mask and position_ids as given.
"""

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class TinyCustomConfig(PretrainedConfig):
    model_type = "tiny_custom_dpo"

    def __init__(
        self, vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_positions=256, honour_mask=False, **kwargs
    ):
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.num_heads, self.max_positions, self.honour_mask = num_heads, max_positions, honour_mask
        super().__init__(**kwargs)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_heads
        self.norm1, self.norm2 = nn.LayerNorm(config.hidden_size), nn.LayerNorm(config.hidden_size)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size, 2 * config.hidden_size),
            nn.GELU(),
            nn.Linear(2 * config.hidden_size, config.hidden_size),
        )

    def forward(self, x, mask):
        b, n, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(a.transpose(1, 2).reshape(b, n, h))
        return x + self.mlp(self.norm2(x))


class TinyCustomForCausalLM(PreTrainedModel):
    config_class = TinyCustomConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos = nn.Embedding(config.max_positions, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        b, n = input_ids.shape
        causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
        if self.config.honour_mask and attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        elif attention_mask is not None and attention_mask.dim() == 2:
            mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        else:
            mask = causal[None, None]
        if not self.config.honour_mask or position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device)[None].expand(b, n)
        x = self.embed(input_ids) + self.pos(position_ids)
        for block in self.blocks:
            x = block(x, mask)
        return CausalLMOutput(logits=self.lm_head(self.norm(x)))
