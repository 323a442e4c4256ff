"""The SD3 kind (MODEL_NAME=pyramid_mmdit) outside the DiT itself: the kinds registry, the tiny folder in the
rain1011/pyramid-flow-sd3 layout, the three-model text encoder, and the extraction / generation scripts."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pyramid_dit.kinds import MODEL_NAMES, get_kind, kind_of_dit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory) -> Path:
    from tools.build_tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("sd3") / "tiny", seed=0, kind="pyramid_mmdit")


def test_registry_maps_each_kind_to_its_constants(golden_dir):
    golden = json.loads((golden_dir / "pipeline" / "objective.json").read_text())["latent_normalisation"]
    assert set(MODEL_NAMES) == {"pyramid_flux", "pyramid_mmdit"}
    for name in MODEL_NAMES:
        norm, want = get_kind(name).normalization, golden[name]
        got = {"image_shift": norm.image_shift, "image_scale": norm.image_scale,
               "video_shift": norm.video_shift, "video_scale": norm.video_scale}
        assert all(abs(got[k] - v) < 1e-12 for k, v in want.items() if k in got), (name, got, want)
    assert get_kind("pyramid_mmdit").dit().__name__ == "PyramidDiffusionMMDiT"
    with pytest.raises(ValueError, match="expected one of pyramid_flux, pyramid_mmdit"):
        get_kind("sd3")


def test_tiny_folder_has_the_released_layout(sd3_folder):
    kind = get_kind("pyramid_mmdit")
    expected = {"causal_video_vae", *kind.variants, *kind.text_subfolders}
    assert {p.name for p in sd3_folder.iterdir() if p.is_dir()} == expected
    for sub, arch in (("text_encoder", "CLIPTextModelWithProjection"), ("text_encoder_2", "CLIPTextModelWithProjection"),
                      ("text_encoder_3", "T5EncoderModel")):
        assert json.loads((sd3_folder / sub / "config.json").read_text())["architectures"] == [arch]
    for variant in kind.variants:
        config = json.loads((sd3_folder / variant / "config.json").read_text())
        assert config["_class_name"] == "PyramidDiffusionMMDiT"
        dit = kind.dit().from_pretrained(sd3_folder / variant)
        assert kind_of_dit(dit) is kind
        assert "pos_embed.pos_embed" in load_file(sd3_folder / variant / "diffusion_pytorch_model.safetensors")


def test_text_encoder_concatenates_projected_clip_l_and_g_with_masked_t5(sd3_folder, tmp_path):
    encoder = get_kind("pyramid_mmdit").load_text_encoder(sd3_folder)
    prompts = ["a red ball rolling on the beach", ""]
    features = encoder.encode(prompts)
    assert features.prompt_embeds.shape == (2, 128, 32)
    assert features.prompt_attention_mask.dtype == torch.int64
    assert features.prompt_attention_mask.sum(1).tolist() == [8, 1]  # 7 words + </s>; "" is just </s>
    ids = encoder.tokenizer(prompts[:1], padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
    clip_l, clip_g = encoder.text_encoder(ids).text_embeds, encoder.text_encoder_2(ids).text_embeds
    assert clip_l.shape[1] == 8 and clip_g.shape[1] == 16  # each CLIP's projection width
    alone = encoder.encode(prompts[:1])
    assert torch.equal(alone.pooled_prompt_embeds, torch.cat([clip_l, clip_g], dim=-1))
    assert torch.allclose(features.pooled_prompt_embeds[:1], alone.pooled_prompt_embeds, atol=1e-6)
    t5_ids = encoder.tokenizer_3(prompts[:1], padding="max_length", max_length=128, return_tensors="pt")
    t5 = encoder.text_encoder_3(t5_ids.input_ids, attention_mask=t5_ids.attention_mask)[0]
    assert torch.equal(alone.prompt_embeds, t5)
    # A miniFLUX folder is refused with the missing subfolders named.
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(FileNotFoundError, match="text_encoder_3/.*rain1011/pyramid-flow-sd3"):
        get_kind("pyramid_mmdit").load_text_encoder(tmp_path)


def _run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    full.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYRAMID_DATA_ROOT="", **env)
    return subprocess.run(["sh", str(REPO / "scripts" / script)], env=full, cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_extraction_and_generation_scripts(sd3_folder, tmp_path):
    anno = tmp_path / "anno.jsonl"
    anno.write_text("".join(json.dumps({"video": f"{i}.mp4", "text": t, "text_fea": f"fea/{i}.safetensors"}) + "\n"
                            for i, t in enumerate(["a dog running in the park", "blue sky"])))
    from tools.extract_text_features import main as extract_text

    assert extract_text(["--model_name", "pyramid_mmdit", "--model_path", str(sd3_folder), "--anno_file", str(anno),
                         "--model_dtype", "fp32", "--device", "cpu", "--no_progress"]) == 0
    stored = load_file(tmp_path / "fea" / "0.safetensors")
    direct = get_kind("pyramid_mmdit").load_text_encoder(sd3_folder).encode(["a dog running in the park"])
    assert torch.allclose(stored["pooled_prompt_embed"], direct.pooled_prompt_embeds, atol=1e-6)
    assert stored["prompt_embed"].shape == (1, 128, 32) and stored["pooled_prompt_embed"].shape == (1, 24)
    assert (tmp_path / "empty_prompt_text_fea.safetensors").is_file()
    # the script checks the kind's folders before launching: an SD3 folder lacks nothing, a bare one does
    proc = _run("extract_text_feature.sh", {"MODEL_NAME": "pyramid_mmdit", "MODEL_PATH": str(tmp_path),
                                            "ANNO_FILE": str(anno)})
    assert proc.returncode == 2 and "text_encoder_3/ (the pyramid_mmdit text encoders); point it at the downloaded " \
        "pyramid_mmdit model folder" in proc.stderr

    out = tmp_path / "sample.png"
    proc = _run("generate.sh", {"MODEL_NAME": "pyramid_mmdit", "MODEL_PATH": str(sd3_folder), "PROMPT": "a dog",
                                "HEIGHT": "64", "WIDTH": "128", "TEMP": "1", "NUM_INFERENCE_STEPS": "1",
                                "VIDEO_NUM_INFERENCE_STEPS": "1", "DEVICE": "cpu", "OUTPUT": str(out)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert out.is_file() and out.stat().st_size > 0
