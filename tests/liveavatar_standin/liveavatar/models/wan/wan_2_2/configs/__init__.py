"""Stand-in of liveavatar/models/wan/wan_2_2/configs/__init__.py: the names the script and
avatarcli's resident adapter import (WAN_CONFIGS, MAX_AREA_CONFIGS), with the s2v-14B values
inference reads (wan_s2v_14B_modified.py; shared_config.py sample_fps = 25)."""

from types import SimpleNamespace

_S2V = SimpleNamespace(
    t5_checkpoint="models_t5_umt5-xxl-enc-bf16.pth", t5_tokenizer="google/umt5-xxl",
    vae_checkpoint="Wan2.1_VAE.pth", wav2vec="wav2vec2-large-xlsr-53-english",
    num_layers=40, dim=5120, sample_fps=25, sample_shift=3, sample_steps=40,
    sample_guide_scale=4.5, motion_frames=73, num_frames_per_block=3, param_dtype="bfloat16")

WAN_CONFIGS = {"s2v-14B": _S2V}
_KEYS = ("720*1280", "1280*720", "480*832", "832*480", "704*1280", "1280*704", "1024*704",
         "704*1024", "720*400", "704*384", "688*368", "384*256")
MAX_AREA_CONFIGS = {k: int(k.split("*")[0]) * int(k.split("*")[1]) for k in _KEYS}
