"""Stand-in of upstream's Python API: `WanS2V` of liveavatar/models/wan/causal_s2v_pipeline.py.

Same constructor keywords (causal_s2v_pipeline.py:58-75), `add_lora_to_model` (196), and
`generate` keywords (662-693) returning what upstream returns: `(video, dataset_info)` with
`video` the whole video as one tensor [3, frames, height, width] in [-1, 1] on rank 0
(pipeline:1188, 1203), frames = clips*infer_frames - 3 (clip 0 drops 3: pipeline:1119, 1170),
frame n generated from audio frame n+3 (pipeline:1000-1005). The geometry, audio and frame
drawing are the stand-in script's (minimal_inference/s2v_streaming_interact.py), so both
launch paths render the same synthetic frames. No model, no GPU; written for avatarcli's tests.

Environment (besides the script's LIVEAVATAR_STANDIN_MODE / _OOM_UNTIL / _COUNTER / _DELAY):
| LIVEAVATAR_STANDIN_LOAD_S=S   | the constructor sleeps S seconds ("loading the weights")   |
| LIVEAVATAR_STANDIN_LOADS=FILE | each construction appends its pid to FILE (count the loads) |
| LIVEAVATAR_STANDIN_RENDER_FPS=R | generate sleeps frames/R seconds                         |
| LIVEAVATAR_STANDIN_LEAK_MB=N  | each generate keeps N MiB of host memory for good (a leak)  |
| LIVEAVATAR_STANDIN_RECORD=DIR | each generate writes DIR/generate-<time>-<pid>.json: its     |
|                               | paths, clips, frames, width, height (as the script records)  |
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
from minimal_inference import s2v_streaming_interact as script

_LEAKED: list[bytearray] = []


def _env_float(name: str) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else 0.0


class WanS2V:
    def __init__(self, config: Any, checkpoint_dir: str, device_id: int = 0, rank: int = 0,
                 t5_fsdp: bool = False, dit_fsdp: bool = False, use_sp: bool = False,
                 sp_size: int | None = None, t5_cpu: bool = False, init_on_cpu: bool = True,
                 drop_part_motion_frames: float = 0.3, convert_model_dtype: bool = False,
                 is_training: bool = False, single_gpu: bool = False,
                 offload_kv_cache: bool = False) -> None:
        for name in script.CKPT_OPENED:  # the loaders open these in this order
            path = os.path.join(checkpoint_dir, name)
            if not os.path.exists(path):
                raise FileNotFoundError(f"[Errno 2] No such file or directory: '{path}'")
        self.config, self.rank, self.device_id = config, rank, device_id
        self.single_gpu, self.offload_kv_cache, self.t5_cpu = single_gpu, offload_kv_cache, t5_cpu
        self.init_on_cpu = init_on_cpu and not (t5_fsdp or dit_fsdp or use_sp)  # pipeline:115
        import torch
        from liveavatar.models.wan.causal_model_s2v import CausalWanModel_S2V

        self.device = torch.device("cpu")  # upstream: cuda:{device_id} (pipeline:102)
        # The DiT as the pipeline loads it (pipeline:156-162): straight onto its device.
        self.noise_model: Any = CausalWanModel_S2V.from_pretrained(checkpoint_dir,
                                                                   device_map=self.device)
        self.noise_model.lora = None
        self.kv_cache1: dict[str, Any] = {}
        self.text_encoder = SimpleNamespace(model=torch.nn.Linear(4, 4))  # T5 stand-in
        self.audio_encoder = SimpleNamespace(model=torch.nn.Linear(4, 4))  # wav2vec2 stand-in
        loads = os.environ.get("LIVEAVATAR_STANDIN_LOADS")
        if loads:
            with open(loads, "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()}\n")
        delay = _env_float("LIVEAVATAR_STANDIN_LOAD_S")
        if delay > 0:
            time.sleep(delay)

    def _initialize_kv_cache(self, batch_size: int, dtype: Any, device: Any, gpu_id: int,
                             kv_cache_size: int = 13500) -> None:
        """pipeline:601-630 (tiny shapes): one cache of k/v/cond_k/cond_v per layer."""
        import torch

        self.kv_cache1[str(gpu_id)] = [
            {name: torch.zeros(batch_size, 4, 2, 2) for name in ("k", "v", "cond_k", "cond_v")}
            for _ in range(self.noise_model.num_layers)]

    def _move_kv_cache_to_working_gpu(self, moved_id: int, gpu_id: int = 0) -> None:
        """pipeline:632-648: the cache of step `moved_id` to the working device or back."""

    def add_lora_to_model(self, model: Any, lora_rank: int = 4, lora_alpha: float = 4,
                          lora_target_modules: str = "q,k,v,o,ffn.0,ffn.2",
                          init_lora_weights: str = "kaiming",
                          pretrained_lora_path: str | None = None,
                          state_dict_converter: Any = None, load_only: bool = False,
                          load_lora_weight_only: bool = False) -> Any:
        if pretrained_lora_path is not None:  # torch.load of anything not .safetensors
            if os.path.isdir(pretrained_lora_path):
                raise IsADirectoryError(f"[Errno 21] Is a directory: '{pretrained_lora_path}'")
            if not os.path.exists(pretrained_lora_path):
                raise FileNotFoundError(
                    f"[Errno 2] No such file or directory: '{pretrained_lora_path}'")
        model.lora = {"path": pretrained_lora_path, "rank": lora_rank, "alpha": lora_alpha}
        return model

    def generate(self, input_prompt: str | None = None, ref_image_path: str | None = None,
                 audio_path: str | None = None, enable_tts: bool = False,
                 tts_prompt_audio: str | None = None, tts_prompt_text: str | None = None,
                 tts_text: str | None = None, num_repeat: int = 1, pose_video: str | None = None,
                 generate_size: str | None = None, max_area: int = 720 * 1280,
                 infer_frames: int = 80, shift: float = 5.0, sample_solver: str = "unipc",
                 sampling_steps: int = 40, guide_scale: float = 5.0, n_prompt: str = "",
                 seed: int = -1, offload_model: bool = True, init_first_frame: bool = False,
                 use_dataset: bool = False, dataset_sample_idx: int = 0,
                 drop_motion_noisy: bool = False, num_gpus_dit: int = 1,
                 max_repeat: int = 1000000, enable_vae_parallel: bool = False,
                 mask: Any = None, input_video_for_sam2: str | None = None,
                 enable_online_decode: bool = False) -> tuple[Any, dict[str, Any]]:
        import torch
        from PIL import Image

        assert ref_image_path is not None and audio_path is not None
        record: dict[str, Any] = {}
        mode = script.choose_mode(record)
        # get_gen_size on Image.open(...).convert('RGB'): no EXIF transpose (pipeline:587-599)
        with Image.open(ref_image_path) as im:
            height, width = script.output_size(im.size[1], im.size[0], max_area)
        audios = [script.read_audio(p) for p in script.split_speakers(audio_path)]
        if len(audios) > 1:
            raise NotImplementedError("stand-in: multi-speaker audio needs SAM2 routing")
        audio = audios[0]
        if sample_solver != "euler":
            raise NotImplementedError("Unsupported solver.")
        clips = script.available_clips(audio.samples16k, infer_frames)
        clips = min(clips, num_repeat) if num_repeat is not None else clips
        if mode == "oom":
            raise torch.OutOfMemoryError(script.OOM_MESSAGE.format(gpu=self.device_id))
        if mode == "crash":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if mode == "hang":
            while True:
                time.sleep(1.0)
        if sampling_steps > script.KV_CACHE_STEPS:
            raise KeyError(str(script.KV_CACHE_STEPS + 1))  # only 4 KV caches exist
        frames = clips * infer_frames - script.FIRST_CLIP_DROP
        rate = _env_float("LIVEAVATAR_STANDIN_RENDER_FPS")
        time.sleep(_env_float("LIVEAVATAR_STANDIN_DELAY") + (frames / rate if rate > 0 else 0.0))
        leak = _env_float("LIVEAVATAR_STANDIN_LEAK_MB")
        if leak > 0:
            block = bytearray(int(leak * 2**20))
            block[::4096] = b"\x01" * len(block[::4096])  # touch every page: resident memory
            _LEAKED.append(block)
        reference = script.fit_reference(Image.open(ref_image_path).convert("RGB"), height,
                                         width)
        stack = np.stack(list(script.synthetic_frames(
            reference, frames, infer_frames, audio.rms_per_frame[script.FIRST_CLIP_DROP:])))
        video = torch.from_numpy(stack).permute(3, 0, 1, 2).float() / 127.5 - 1.0
        folder = os.environ.get("LIVEAVATAR_STANDIN_RECORD")
        if folder:
            os.makedirs(folder, exist_ok=True)
            name = os.path.join(folder, f"generate-{int(time.time() * 1e6)}-{os.getpid()}.json")
            with open(name, "w", encoding="utf-8") as f:
                json.dump({"argv": ["--audio", audio_path, "--image", ref_image_path],
                           "clips": clips, "frames_generated": frames, "width": width,
                           "height": height, "resident": True}, f)
        return (video if self.rank == 0 else None), {}
