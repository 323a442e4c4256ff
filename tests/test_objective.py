"""The training objective against the reference's golden vectors, plus AR behaviour checks.

The golden DiT cases (flux_tiny/, mmdit_tiny/) store the DiT inputs and targets the reference pipeline built from
given raw latents right after a given seed; reproducing them shows we compute the same objective with the same
random draws.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pyramid_dit.kinds import get_kind
from pyramid_dit.objective import PyramidFlowObjective, flow_matching_loss
from pyramid_dit.pyramid import history_plan, noise_pyramid, sample_stage_length, spatial_pyramid
from pyramid_dit.scheduler import PyramidFlowMatchEulerDiscreteScheduler
from pyramid_dit.text_features import TextFeatures

MODELS = {"flux_tiny": "pyramid_flux", "mmdit_tiny": "pyramid_mmdit"}


def _load(path: Path) -> dict:
    return {k: v.clone() for k, v in load_file(str(path)).items()}


@pytest.fixture(scope="module")
def objective_json(golden_dir) -> dict:
    return json.loads((golden_dir / "pipeline" / "objective.json").read_text())


def _objective(model_name: str = "pyramid_flux", **kwargs) -> PyramidFlowObjective:
    return PyramidFlowObjective(PyramidFlowMatchEulerDiscreteScheduler(), model_name, **kwargs)


def _tokens(column, text_len: int) -> int:
    """Tokens the DiT sees for a column: text plus one token per 2x2 latent patch of every clip frame."""
    return text_len + sum(c.shape[2] * (c.shape[3] // 2) * (c.shape[4] // 2) for c in column)


def _assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 1e-6) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    bound = rel * expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= bound, f"{what}: max |diff| {err:.3e} > {bound:.3e}"


# ------------------------------------------------------------------------------------ deterministic parts
@pytest.mark.parametrize("model_name", ["pyramid_flux", "pyramid_mmdit"])
def test_normalisation_constants_and_round_trip(objective_json, model_name):
    golden = objective_json["latent_normalisation"][model_name]
    norm = get_kind(model_name).normalization
    assert (norm.image_shift, norm.image_scale, norm.video_shift, norm.video_scale) == (
        golden["image_shift"], golden["image_scale"], golden["video_shift"], golden["video_scale"])

    z = torch.randn(2, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    before = z.clone()
    n = norm.normalize(z)
    assert torch.equal(z, before), "normalize must not modify its input"
    torch.testing.assert_close(n[:, :, 0], (z[:, :, 0] - golden["image_shift"]) * golden["image_scale"])
    torch.testing.assert_close(n[:, :, 1:], (z[:, :, 1:] - golden["video_shift"]) * golden["video_scale"])
    torch.testing.assert_close(norm.denormalize(n), z, rtol=0, atol=1e-6)

    image = z[:, :, :1]
    torch.testing.assert_close(norm.normalize(image), (image - golden["image_shift"]) * golden["image_scale"])
    torch.testing.assert_close(norm.denormalize(norm.normalize(image)), image, rtol=0, atol=1e-6)


def test_spatial_pyramid_matches_golden(golden_dir):
    tensors = _load(golden_dir / "pipeline" / "pyramid_latent.safetensors")
    levels = spatial_pyramid(tensors["latent"], 3)
    for k, level in enumerate(levels):
        torch.testing.assert_close(level, tensors[f"pyramid.{k}"], rtol=0, atol=1e-6)
    assert levels[-1] is tensors["latent"]


def test_pyramid_levels_are_frame_major():
    """torch.randn_like follows storage order; the reference's lower levels are frame-major, and the history
    corruption noise is drawn on views of them, so our levels must keep that layout (see pyramid.py)."""
    levels = spatial_pyramid(torch.randn(2, 3, 4, 8, 8), 3)
    for level in levels[:-1]:
        assert level.transpose(1, 2).is_contiguous()


def test_noise_pyramid_keeps_unit_variance():
    noise = torch.randn(2, 16, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    levels = noise_pyramid(noise, 3)
    assert [tuple(x.shape[-2:]) for x in levels] == [(16, 16), (32, 32), (64, 64)]
    for level in levels:
        assert abs(level.std().item() - 1) < 0.05


def test_sample_stage_length_matches_golden(objective_json):
    for entry in objective_json["sample_stage_length"]:
        for calls, expected in zip(entry["accumulate_steps"], entry["units_low_mid_high"]):
            got = sample_stage_length(
                num_stages=3, step=calls - 1, rank=entry["rank"], max_temporal_length=entry["max_frames"],
                frame_per_unit=1, video_sync_group=entry["video_sync_group"], max_units=entry["max_units"])
            assert got == expected, (entry, calls)


def test_history_plan():
    # Column at the top stage training unit 8: newest condition at full resolution, one unit at mid, 6 at low.
    assert history_plan(2, 9) == [(2, 7, 8), (1, 6, 7), (0, 0, 6)]
    assert history_plan(2, 3) == [(2, 1, 2), (1, 0, 1)]
    assert history_plan(1, 5) == [(1, 3, 4), (0, 0, 3)]
    assert history_plan(0, 5) == [(0, 3, 4), (0, 0, 3)]
    assert history_plan(0, 1) == []


@pytest.mark.parametrize("setting", ["384p_16_latent_frames", "768p_32_latent_frames"])
def test_tokens_per_column_match_golden(objective_json, setting):
    golden = objective_json["tokens_per_column"][setting]
    batch, _, frames, height, width = golden["latent"]
    latents = torch.zeros(batch, 1, frames, height, width)  # one channel: token counts depend on shapes only
    objective = _objective(max_temporal_length=frames, video_sync_group=golden["video_sync_group"])

    full = objective.noise_latents(latents, use_temporal_pyramid=False)
    assert [_tokens(col, golden["text_len"]) for col in full.sample] == golden["non_ar_tokens_per_column"]
    for entry in golden["ar_per_rank_and_call"]:
        ar = objective.noise_latents(latents, use_temporal_pyramid=True, rank=entry["rank"], step=entry["call"] - 1)
        assert [len(col) for col in ar.sample] == entry["clips_per_column"], entry
        assert [_tokens(col, golden["text_len"]) for col in ar.sample] == entry["tokens_per_column"], entry


# ------------------------------------------------------------------------------ golden DiT-case inputs
def _golden_case_batch(case_dir: Path, case: str, model_name: str):
    cases = json.loads((case_dir / "cases.json").read_text())
    assert cases["model_name"] == model_name
    tensors = _load(case_dir / f"{case}.safetensors")
    if case == "case_nonar":
        objective = _objective(model_name, sample_ratios=[1, 1, 1])
        torch.manual_seed(101)
        batch = objective.noise_latents(tensors["raw_latent"], use_temporal_pyramid=False)
    else:
        objective = _objective(model_name, sample_ratios=[1, 2, 1], max_temporal_length=8, frame_per_unit=1,
                               video_sync_group=4)
        raw = torch.randn(8, 16, 8, 16, 24, generator=torch.Generator().manual_seed(200))
        torch.manual_seed(201)
        batch = objective.noise_latents(raw, use_temporal_pyramid=True, rank=1, step=0)
        assert batch.units_per_stage == cases[case]["units_per_stage"]
    return cases[case], tensors, batch, objective


@pytest.mark.parametrize("case", ["case_nonar", "case_ar"])
@pytest.mark.parametrize("folder", sorted(MODELS))
def test_reproduces_golden_dit_inputs(golden_dir, folder, case):
    meta, tensors, batch, _ = _golden_case_batch(golden_dir / folder, case, MODELS[folder])
    assert [[list(c.shape) for c in col] for col in batch.sample] == meta["clip_shapes"]
    assert [_tokens(col, 10) for col in batch.sample] == meta["tokens_per_column"]
    for c, column in enumerate(batch.sample):
        for k, clip in enumerate(column):
            _assert_close_rel(clip, tensors[f"sample.{c}.{k}"], f"sample.{c}.{k}")
        _assert_close_rel(batch.targets[c], tensors[f"target.{c}"], f"target.{c}")
    _assert_close_rel(batch.timestep_ratio, tensors["timestep_ratio"], "timestep_ratio")


@pytest.mark.parametrize("case", ["case_nonar", "case_ar"])
@pytest.mark.parametrize("folder", sorted(MODELS))
def test_loss_matches_golden(golden_dir, folder, case):
    tensors = _load(golden_dir / folder / f"{case}.safetensors")
    columns = sum(1 for k in tensors if k.startswith("out."))
    loss = flow_matching_loss([tensors[f"out.{c}"] for c in range(columns)],
                              [tensors[f"target.{c}"] for c in range(columns)])
    _assert_close_rel(loss.reshape(1), tensors["loss"], "loss")


def test_loss_weights_rows_equally():
    # Column 0: 1 row with error 1 over 4 numbers; column 1: 1 row with error 0 over 100 numbers -> mean 0.5.
    preds = [torch.ones(1, 4), torch.zeros(1, 100)]
    targets = [torch.zeros(1, 4), torch.zeros(1, 100)]
    assert flow_matching_loss(preds, targets).item() == 0.5
    with pytest.raises(ValueError, match="column 0"):
        flow_matching_loss([torch.zeros(1, 3)], [torch.zeros(1, 4)])


# ------------------------------------------------------------------------------------ AR behaviour
def test_ar_ranks_of_a_sync_group_train_every_unit():
    objective = _objective(max_temporal_length=8, video_sync_group=4)
    latents = torch.randn(4, 2, 8, 8, 8)
    trained = {}
    for step in range(2):
        for rank in range(4):
            batch = objective.noise_latents(latents, use_temporal_pyramid=True, rank=rank, step=step)
            low, mid, high = batch.units_per_stage
            assert low == mid == 1 + 8 - high  # lower stages balance the top stage's sequence length
            trained[(step, rank)] = high
            # The loss covers only the trained unit: one frame per column.
            assert all(t.shape[2] == 1 for t in batch.targets)
    assert len({trained[(0, r)] for r in range(4)}) == 4, "ranks of a group must train different units"
    assert sorted(trained.values()) == list(range(1, 9)), "two steps of a group of 4 cover all 8 units"


def test_ar_history_resolution_decreases_with_age():
    objective = _objective(max_temporal_length=8, video_sync_group=4, frame_per_unit=1)
    batch = objective.noise_latents(torch.randn(4, 2, 8, 16, 16), use_temporal_pyramid=True, rank=0, step=0)
    low, mid, high = batch.units_per_stage
    for column, stage, units in zip(batch.sample, [0, 1, 1, 2], [low, mid, mid, high]):
        trained = column[-1]
        assert trained.shape[-1] == 4 * 2**stage and trained.shape[2] == 1
        assert column[-2].shape[-2:] == trained.shape[-2:], "newest condition unit at the column's resolution"
        widths = [clip.shape[-1] for clip in column]
        assert widths == sorted(widths), "older history must not be sharper than newer"
        assert sum(clip.shape[2] for clip in column) == units  # every unit up to the trained one, once


def test_ar_history_corruption_bounded_by_corrupt_ratio():
    # Raw latents equal to the shifts normalise to exactly 0, so each history clip is sigma * N(0, 1).
    norm = get_kind("pyramid_flux").normalization
    raw = torch.full((8, 16, 8, 32, 32), norm.video_shift)
    raw[:, :, 0] = norm.image_shift
    torch.manual_seed(0)
    for corrupt_ratio in (0.0, 0.5):
        objective = _objective(max_temporal_length=8, video_sync_group=4, corrupt_ratio=corrupt_ratio)
        stds = []
        for rank in range(4):
            batch = objective.noise_latents(raw, use_temporal_pyramid=True, rank=rank, step=0)
            for column in batch.sample:
                if len(column) > 1:
                    newest_condition = column[-2]
                    stds += newest_condition.flatten(1).std(dim=1).tolist()
        if corrupt_ratio == 0:
            assert max(stds) == 0.0
        else:
            # >= 1024 numbers per row: each std is within a few % of the row's sigma ~ U[0, corrupt_ratio).
            assert max(stds) < corrupt_ratio * 1.1 and min(stds) < corrupt_ratio / 4
            assert max(stds) > corrupt_ratio * 0.75


def test_image_latents_train_in_both_modes():
    objective = _objective()
    images = torch.randn(4, 16, 1, 8, 8)
    for ar in (False, True):
        batch = objective.noise_latents(images, use_temporal_pyramid=ar, rank=3, step=5)
        assert [len(col) for col in batch.sample] == [1, 1, 1, 1]
        assert [t.shape[2] for t in batch.targets] == [1, 1, 1, 1]


# ------------------------------------------------------------------------------ batch layout and text
def _text(batch: int, seed: int = 0) -> TextFeatures:
    g = torch.Generator().manual_seed(seed)
    return TextFeatures(torch.randn(batch, 5, 8, generator=g), torch.ones(batch, 5, dtype=torch.int64),
                            torch.randn(batch, 6, generator=g))


def _null_text() -> TextFeatures:
    return TextFeatures(torch.zeros(1, 5, 8), torch.tensor([[1, 0, 0, 0, 0]]), torch.zeros(1, 6))


class _Recording(torch.nn.Module):
    """Wraps a DiT and keeps the keyword arguments of each forward."""

    def __init__(self, dit):
        super().__init__()
        self.dit, self.calls = dit, []

    def forward(self, **inputs):
        self.calls.append(inputs)
        return self.dit(**inputs)


def _ctx(sync_rank: int = 0, micro_step: int = 0):
    from trainer_misc.loop.step import StepContext
    return StepContext(step=0, micro_step=micro_step, micro_index=0, rank=sync_rank, world_size=4,
                       sync_rank=sync_rank, sync_group=4, sync_group_index=0, device=torch.device("cpu"),
                       dtype=torch.float32, module=torch.nn.Identity())


def _entry_point_args(*extra: str):
    from train.args import build_parser
    return build_parser().parse_args(["--model_path", "unused", "--anno_file", "unused", "--output_dir", "unused",
                                      *extra])


def test_entry_point_objective_has_the_reference_pipeline_constants(objective_json):
    """The objective the training script builds from its default flags uses the reference's constants."""
    from train.run import build_objective

    golden = objective_json["pipeline_constants"]
    objective = build_objective(_entry_point_args(), null_text=_null_text())
    assert objective.text_drop_rate == golden["cfg_rate"]
    assert objective.corrupt_ratio == golden["corrupt_ratio"]
    assert objective.sample_ratios == golden["training_sample_ratios"]
    assert objective.num_stages == len(golden["stages"])
    assert objective.scheduler.config.num_train_timesteps == 1000


def test_caption_dropout_trains_on_the_extracted_empty_prompt_features(tmp_path):
    """Divergence: with pre-extracted text features the entry point reads the empty prompt's features from the file
    the text extraction writes (the reference trainer would need its text encoder in memory, or leaves them undefined);
    a dropped caption becomes exactly that file's features."""
    from train.run import build_objective, load_null_text
    from trainer_misc.files import atomic_save_safetensors

    g = torch.Generator().manual_seed(0)
    empty = {"prompt_embed": torch.randn(1, 5, 8, generator=g), "prompt_attention_mask": torch.tensor([[1, 1, 0, 0, 0]]),
             "pooled_prompt_embed": torch.randn(1, 6, generator=g)}
    atomic_save_safetensors(empty, tmp_path / "empty.safetensors")
    args = _entry_point_args("--empty_prompt_fea", str(tmp_path / "empty.safetensors"), "--text_drop_rate", "1.0")
    objective = build_objective(args, null_text=load_null_text(args))
    text = TextFeatures(torch.randn(3, 5, 8, generator=g), torch.ones(3, 5, dtype=torch.long),
                        torch.randn(3, 6, generator=g))
    dropped_text, dropped = objective.drop_text(text)
    assert dropped.all()
    for got, want in zip(dropped_text, (empty["prompt_embed"], empty["prompt_attention_mask"],
                                        empty["pooled_prompt_embed"])):
        assert torch.equal(got, want.expand_as(got).to(got.dtype))
    assert dropped_text.host_lengths == (2, 2, 2)


@pytest.mark.parametrize("case", ["case_nonar", "case_ar"])
def test_production_loss_path_draws_in_order_and_feeds_the_dit(golden_dir, case):
    """trainer_misc.loop.pyramid_loss.PyramidFlowLoss, the trainer's compute_loss, on the golden tiny DiT: caption
    dropout (one CPU rand(B)) comes first, then exactly the objective's noising (pinned to the reference by
    test_reproduces_golden_dit_inputs); dropped rows carry the empty prompt; the loss is the flow-matching loss
    of the DiT's predictions for those inputs."""
    from pyramid_dit.modeling_pyramid_flux import PyramidFluxTransformer
    from trainer_misc.data.datasets import TrainBatch
    from trainer_misc.loop.pyramid_loss import PyramidFlowLoss

    meta, tensors, _, _ = _golden_case_batch(golden_dir / "flux_tiny", case, "pyramid_flux")
    ar = case == "case_ar"
    null = TextFeatures(torch.zeros(10, 32), torch.tensor([1] + [0] * 9), torch.zeros(24))
    kwargs = (dict(sample_ratios=[1, 2, 1], max_temporal_length=8, frame_per_unit=1, video_sync_group=4) if ar
              else dict(sample_ratios=[1, 1, 1]))
    objective = _objective("pyramid_flux", text_drop_rate=0.5, null_text=null, **kwargs)
    raw = (torch.randn(8, 16, 8, 16, 24, generator=torch.Generator().manual_seed(200)) if ar
           else tensors["raw_latent"])
    rows = raw.shape[0]
    text = TextFeatures(tensors["encoder_hidden_states"], tensors["encoder_attention_mask"],
                            tensors["pooled_projections"])
    batch = TrainBatch(captions=["x"] * rows, paths=[f"clip{i}" for i in range(rows)], latents=raw,
                       text_features=text)
    model = _Recording(PyramidFluxTransformer.from_pretrained(golden_dir / "flux_tiny").eval())

    torch.manual_seed(7)
    with torch.no_grad():
        loss, stats = PyramidFlowLoss(objective, ar)(model, batch, _ctx(sync_rank=1 if ar else 0))
    torch.manual_seed(7)
    dropped = torch.rand(rows) <= 0.5
    expected = objective.noise_latents(raw, use_temporal_pyramid=ar, rank=1, step=0)

    assert 0 < int(dropped.sum()) < rows
    (inputs,) = model.calls
    assert [[c.shape for c in col] for col in inputs["sample"]] == [[c.shape for c in col] for col in expected.sample]
    for got, want in zip(inputs["sample"], expected.sample):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(inputs["timestep_ratio"], expected.timestep_ratio)
    for row in range(rows):
        source = null if dropped[row] else TextFeatures(*(t[row] for t in text))
        assert torch.equal(inputs["encoder_hidden_states"][row], source.prompt_embeds)
        assert torch.equal(inputs["encoder_attention_mask"][row], source.prompt_attention_mask)
        assert torch.equal(inputs["pooled_projections"][row], source.pooled_prompt_embeds)
    # Row r belongs to column r % columns: its timestep comes from that column's stage table.
    stages = objective.column_stages
    for row, t in enumerate(inputs["timestep_ratio"].tolist()):
        table = objective.scheduler.timesteps_per_stage[stages[row % len(stages)]]
        assert table[-1].item() <= t <= table[0].item()
    with torch.no_grad():
        preds = model.dit(**inputs)
    assert torch.equal(loss, flow_matching_loss(preds, expected.targets))
    assert stats["tokens"] == sum(_tokens([c[:1] for c in col], 10) * col[0].shape[0] for col in expected.sample)


def test_rejects_bad_input():
    objective = _objective()
    with pytest.raises(ValueError, match="multiple of sum\\(sample_ratios\\)"):
        objective.noise_latents(torch.randn(6, 2, 1, 8, 8), use_temporal_pyramid=False)
    with pytest.raises(ValueError, match="not divisible by 4"):
        objective.noise_latents(torch.randn(4, 2, 1, 6, 8), use_temporal_pyramid=False)
    with pytest.raises(ValueError, match="needs null_text"):
        _objective(text_drop_rate=0.1).drop_text(_text(4))
    with pytest.raises(ValueError, match="video_sync_group"):
        _objective(max_temporal_length=4, video_sync_group=8).noise_latents(
            torch.randn(4, 2, 4, 8, 8), use_temporal_pyramid=True)
    with pytest.raises(ValueError, match="model_name"):
        _objective("sd3")
    with pytest.raises(ValueError, match="frame_per_unit"):
        _objective(max_temporal_length=16, frame_per_unit=2)


def test_text_drop_rate_extremes():
    text = _text(4)
    always = _objective(null_text=_null_text(), text_drop_rate=1.0)
    dropped_text, dropped = always.drop_text(text)
    assert dropped.all()
    for got, empty in zip(dropped_text, _null_text()):
        assert torch.equal(got, empty.expand_as(got))

    never = _objective(text_drop_rate=0.0)
    torch.manual_seed(3)
    same_text, dropped = never.drop_text(text)
    after = torch.rand(1)
    torch.manual_seed(3)
    torch.rand(4)
    assert same_text is text and not dropped.any()
    assert torch.equal(after, torch.rand(1)), "drop_text must draw rand(B) even at rate 0"

    with pytest.raises(ValueError, match="null_text.prompt_embeds"):
        _objective(null_text=TextFeatures(torch.zeros(7, 8), torch.ones(5), torch.zeros(6))).drop_text(text)
