"""Stand-in of liveavatar/models/wan/causal_model_s2v.py: `CausalWanModel_S2V`, the DiT, with
upstream's layout where avatarcli's levers touch it: `blocks` (an nn.ModuleList of 40
transformer blocks, causal_model_s2v.py) and `from_pretrained(checkpoint_dir, device_map=...)`
(diffusers' ModelMixin, called by the pipeline at causal_s2v_pipeline.py:156-162). The blocks
are tiny (width 16): placement, not arithmetic, is what the tests look at."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

LAYERS = 40
WIDTH = 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(WIDTH, WIDTH)
        self.ffn = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.q(x))


class CausalWanModel_S2V(nn.Module):
    num_layers = LAYERS

    def __init__(self) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(WIDTH, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(x)
        for block in self.blocks:
            x = block(x)
        return x

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str, device_map: Any = None,
                        torch_dtype: Any = None) -> CausalWanModel_S2V:
        torch.manual_seed(0)
        model = cls()
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        if device_map is not None:
            model = model.to(device_map)
        return model
