"""The one text-feature type: file round trip, row operations, DiT keyword arguments."""
import pytest
import torch

from pyramid_dit.text_features import FILE_KEYS, TextFeatures
from trainer_misc.data.datasets import collate
from trainer_misc.data.features import check_text_features


def _features(rows: int, seed: int = 0) -> TextFeatures:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, 6, dtype=torch.int64)
    mask[:, :3] = 1
    return TextFeatures(torch.randn(rows, 6, 4, generator=g), mask, torch.randn(rows, 5, generator=g))


def test_file_round_trip_keeps_values_and_reference_keys():
    feats = _features(3)
    row = feats.file_row(1)
    assert tuple(row) == FILE_KEYS == ("prompt_embed", "prompt_attention_mask", "pooled_prompt_embed")
    check_text_features(row)  # what load_text_features accepts
    back = TextFeatures.from_file({k: v.half() if v.is_floating_point() else v.int() for k, v in row.items()})
    assert back.prompt_embeds.dtype == torch.float32 and back.prompt_attention_mask.dtype == torch.int64
    assert torch.equal(back.prompt_attention_mask, feats.prompt_attention_mask[1:2])
    assert torch.equal(back.pooled_prompt_embeds, feats.pooled_prompt_embeds[1:2].half().float())


def test_rows_cat_expand_and_collate():
    a, b = _features(2, 0), _features(1, 1)
    both = TextFeatures.cat([a, b])
    assert both.batch_size == 3 and torch.equal(both.rows(slice(2, 3)).prompt_embeds, b.prompt_embeds)
    shared = b.expand_rows(4, "the negative prompt")
    assert shared.batch_size == 4 and torch.equal(shared.pooled_prompt_embeds[3], b.pooled_prompt_embeds[0])
    with pytest.raises(ValueError, match="the negative prompt has 2 rows; expected 1"):
        a.expand_rows(4, "the negative prompt")
    items = [{"text": "x", "path": str(i), "latents": torch.zeros(2), "text_features": f.rows(slice(i, i + 1))}
             for i, f in enumerate([both, both, both])]
    batch = collate(items)
    assert all(torch.equal(x, y) for x, y in zip(batch.text_features, both))


def test_to_casts_embeddings_only_and_dit_kwargs():
    feats = _features(2).to("cpu", torch.bfloat16)
    assert feats.prompt_embeds.dtype == feats.pooled_prompt_embeds.dtype == torch.bfloat16
    assert feats.prompt_attention_mask.dtype == torch.int64
    kwargs = feats.dit_kwargs()
    assert set(kwargs) == {"encoder_hidden_states", "encoder_attention_mask", "pooled_projections"}
    assert kwargs["encoder_attention_mask"] is feats.prompt_attention_mask

