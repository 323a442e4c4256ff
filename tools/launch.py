"""The extraction and generation scripts' launcher: ``scripts/extract_vae_latent.sh``, ``extract_text_feature.sh``
and ``generate.sh`` set their variables and run ``python3 -m tools.launch latents|text|generate``.

As for training (``train/launch.py``): the variables become the tool's flags (one table per script, below), the
tool's own parser and checks run before any process starts (messages name the variables), then
:func:`trainer_misc.runtime.launcher.launch` starts one process, or torchrun over ``GPUS`` processes, supervised.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from trainer_misc.runtime.arguments import ConfigError
from trainer_misc.runtime.launcher import NodeLayout, launch, node_layout, say

__all__ = ["SCRIPTS", "main", "tool_argv"]

TOOLS = Path(__file__).resolve().parent


def _extra(get: Mapping[str, str]) -> list[str]:
    try:
        return shlex.split(get["EXTRA_ARGS"])
    except ValueError as e:
        raise ConfigError(f"EXTRA_ARGS={get['EXTRA_ARGS']}: cannot split into flags ({e})") from None


def _dtype(get: Mapping[str, str], layout: NodeLayout) -> str:
    return get["MODEL_DTYPE"] or ("bf16" if layout.have_gpu else "fp32")


def _latents(get: Mapping[str, str], env: Mapping[str, str], layout: NodeLayout) -> list[str]:
    vae = get["VAE_MODEL_PATH"]
    if not vae:
        if not get["MODEL_PATH"]:
            raise ConfigError("set MODEL_PATH (the model folder) or VAE_MODEL_PATH (its causal_video_vae folder)")
        vae = str(Path(get["MODEL_PATH"]) / "causal_video_vae")
    argv = ["--model_path", vae, "--anno_file", get["ANNO_FILE"], "--width", get["WIDTH"], "--height", get["HEIGHT"],
            "--num_frames", get["NUM_FRAMES"], "--model_dtype", _dtype(get, layout), "--num_workers",
            get["NUM_WORKERS"]]
    return argv + (["--data_root", get["DATA_ROOT"]] if get["DATA_ROOT"] else []) + _extra(get)


def _text(get: Mapping[str, str], env: Mapping[str, str], layout: NodeLayout) -> list[str]:
    if not get["MODEL_PATH"]:
        raise ConfigError("set MODEL_PATH to the model folder (with its text_encoder*/ and tokenizer*/ folders)")
    argv = ["--model_name", get["MODEL_NAME"], "--model_path", get["MODEL_PATH"], "--anno_file", get["ANNO_FILE"],
            "--kind", get["KIND"], "--batch_size", get["BATCH_SIZE"], "--model_dtype", _dtype(get, layout)]
    for var, flag in (("DATA_ROOT", "--data_root"), ("EMPTY_PROMPT_FEA", "--empty_prompt_fea")):
        if get[var]:
            argv += [flag, get[var]]
    return argv + _extra(get)


def _generate(get: Mapping[str, str], env: Mapping[str, str], layout: NodeLayout) -> list[str]:
    if not get["MODEL_PATH"]:
        raise ConfigError("set MODEL_PATH to the downloaded model folder (e.g. ckpt/pyramid-flow-miniflux)")
    if get["CPU_OFFLOAD"] not in ("0", "1"):
        raise ConfigError(f"CPU_OFFLOAD={get['CPU_OFFLOAD']}: must be 0 or 1")
    argv = ["--model_name", get["MODEL_NAME"], "--model_path", get["MODEL_PATH"], "--guidance_scale",
            get["GUIDANCE_SCALE"], "--video_guidance_scale", get["VIDEO_GUIDANCE_SCALE"], "--seed", get["SEED"],
            "--device", get["DEVICE"], "--dtype", get["DTYPE"], "--fps", get["FPS"], "--lora_scale",
            get["LORA_SCALE"]]
    argv += ["--num_inference_steps", *get["NUM_INFERENCE_STEPS"].split()]
    argv += ["--video_num_inference_steps", *get["VIDEO_NUM_INFERENCE_STEPS"].split()]
    # Unset: tools/generate.py derives them from how the DiT was trained and from the variant.
    for var, flag in (("VARIANT", "--variant"), ("TASK", "--task"), ("MODE", "--mode"), ("TEMP", "--temp"),
                      ("HEIGHT", "--height"), ("WIDTH", "--width"), ("OUTPUT", "--output"), ("PROMPT", "--prompt"),
                      ("PROMPT_FILE", "--prompt_file"), ("IMAGE", "--image"), ("DIT_PATH", "--dit_path"),
                      ("DIT_WEIGHT", "--dit_weight"), ("LORA_PATH", "--lora_path")):
        if get[var]:
            argv += [flag, get[var]]
    if get["CPU_OFFLOAD"] == "1":
        argv.append("--cpu_offload")
    for var, flag in (("NEGATIVE_PROMPT", "--negative_prompt"), ("PROMPT_SUFFIX", "--prompt_suffix")):
        if var in env:  # set, even to "": replaces generate.py's default
            argv += [flag, env[var]]
    return argv + _extra(get)


class Script:
    """One script: its variables, how they become the tool's flags, and which tool checks them."""

    def __init__(self, name: str, tool: str, variables: Sequence[str], flags: Mapping[str, str],
                 argv: Callable[[Mapping[str, str], Mapping[str, str], NodeLayout], list[str]],
                 default_gpus: Optional[int] = None) -> None:
        self.name, self.tool, self.variables, self.flags, self.argv = name, tool, tuple(variables), dict(flags), argv
        self.default_gpus = default_gpus

    def parse_and_check(self, argv: list[str], values: Mapping[str, str], world_size: int):
        from importlib import import_module

        module = import_module(f"tools.{self.tool}")
        if self.tool == "generate":
            return module.parse_and_check(argv, self.flags, dict(values), world_size=world_size)
        return module.parse_and_check(argv, self.flags, dict(values))


_LAYOUT = ("GPUS", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
SCRIPTS = {
    "latents": Script(
        "extract_vae_latent.sh", "extract_video_vae_latents",
        ("MODEL_PATH", "VAE_MODEL_PATH", "ANNO_FILE", "DATA_ROOT", "WIDTH", "HEIGHT", "NUM_FRAMES", "MODEL_DTYPE",
         "NUM_WORKERS", "EXTRA_ARGS") + _LAYOUT,
        {"--model_path": "VAE_MODEL_PATH", "--anno_file": "ANNO_FILE", "--data_root": "DATA_ROOT", "--width": "WIDTH",
         "--height": "HEIGHT", "--num_frames": "NUM_FRAMES", "--model_dtype": "MODEL_DTYPE",
         "--num_workers": "NUM_WORKERS"}, _latents),
    "text": Script(
        "extract_text_feature.sh", "extract_text_features",
        ("MODEL_NAME", "MODEL_PATH", "ANNO_FILE", "KIND", "DATA_ROOT", "EMPTY_PROMPT_FEA", "BATCH_SIZE",
         "MODEL_DTYPE", "EXTRA_ARGS") + _LAYOUT,
        {"--model_name": "MODEL_NAME", "--model_path": "MODEL_PATH", "--anno_file": "ANNO_FILE", "--kind": "KIND",
         "--data_root": "DATA_ROOT", "--empty_prompt_fea": "EMPTY_PROMPT_FEA", "--batch_size": "BATCH_SIZE",
         "--model_dtype": "MODEL_DTYPE"}, _text),
    "generate": Script(
        "generate.sh", "generate",
        ("GPUS", "MODEL_NAME", "MODEL_PATH", "VARIANT", "DIT_PATH", "DIT_WEIGHT", "LORA_PATH", "LORA_SCALE", "PROMPT",
         "PROMPT_FILE", "IMAGE", "TASK", "MODE", "TEMP", "HEIGHT", "WIDTH", "NUM_INFERENCE_STEPS",
         "VIDEO_NUM_INFERENCE_STEPS", "GUIDANCE_SCALE", "VIDEO_GUIDANCE_SCALE", "SEED", "DEVICE", "DTYPE",
         "CPU_OFFLOAD", "OUTPUT", "FPS", "EXTRA_ARGS"),
        {"--model_name": "MODEL_NAME", "--model_path": "MODEL_PATH", "--variant": "VARIANT", "--dit_path": "DIT_PATH",
         "--dit_weight": "DIT_WEIGHT", "--lora_path": "LORA_PATH", "--lora_scale": "LORA_SCALE", "--prompt": "PROMPT",
         "--prompt_file": "PROMPT_FILE", "--image": "IMAGE", "--task": "TASK", "--mode": "MODE", "--temp": "TEMP",
         "--height": "HEIGHT", "--width": "WIDTH", "--num_inference_steps": "NUM_INFERENCE_STEPS",
         "--video_num_inference_steps": "VIDEO_NUM_INFERENCE_STEPS", "--guidance_scale": "GUIDANCE_SCALE",
         "--video_guidance_scale": "VIDEO_GUIDANCE_SCALE", "--seed": "SEED", "--device": "DEVICE",
         "--dtype": "DTYPE", "--cpu_offload": "CPU_OFFLOAD", "--output": "OUTPUT", "--fps": "FPS",
         "--negative_prompt": "NEGATIVE_PROMPT", "--prompt_suffix": "PROMPT_SUFFIX"}, _generate, default_gpus=1),
}


def tool_argv(script: Script, env: Mapping[str, str], layout: NodeLayout) -> list[str]:
    """The tool's flags for the script's variables (checked afterwards by the tool's own parser)."""
    return script.argv({name: env.get(name, "").strip() for name in script.variables}, env, layout)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] not in SCRIPTS:
        raise SystemExit(f"usage: python3 -m tools.launch {{{','.join(SCRIPTS)}}} (the scripts in scripts/ run it)")
    script = SCRIPTS[argv[0]]
    env = dict(os.environ)
    if script.name == "generate.sh":
        env["NNODES"] = "1"  # the processes split each video's sequence: one node
    try:
        layout = node_layout(env, default_gpus=script.default_gpus)
        flags = tool_argv(script, env, layout)
        values = {name: env.get(name, "").strip() for name in set(script.flags.values())}
        script.parse_and_check(flags, values, layout.world_size)
    except ConfigError as e:
        say(script.name, str(e))
        return 2
    where = "this node" if layout.nnodes == 1 else f"node {layout.node_rank} of {layout.nnodes}"
    say(script.name, f"{layout.gpus} process(es) on {where} ({layout.world_size} in all), "
                     f"{'GPU' if layout.have_gpu else 'CPU'}; starting (each process imports torch and loads its "
                     "model first)")
    launch([str(TOOLS / f"{script.tool}.py"), *flags], layout, prog=script.name, env=env)


if __name__ == "__main__":
    sys.exit(main())
