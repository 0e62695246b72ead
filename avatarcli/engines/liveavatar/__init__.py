"""LiveAvatar (Wan2.2-S2V-14B + LoRA): the engine, its launch, its resident adapter and memory
levers, and its memory model (what fits which GPU). Upstream facts cite Alibaba-Quark/LiveAvatar
at commit 9c2c38d as FILE:LINE."""
