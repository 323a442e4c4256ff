"""The released configurations that ship inside the package (``pyramid_dit/kinds.py``): the planner counts the 2 B
DiTs from them without a download, so they must be the released checkpoints' own values. Checked against the
reference-written key listings in ``tests/golden/keys``: the values of the released ``config.json`` plus what the
reference pipeline passes when it loads the DiT, and the state dict that configuration builds."""
from __future__ import annotations

import json
from importlib import import_module

import pytest
import torch

from pyramid_dit.kinds import KINDS, kind_of_class_name

LISTINGS = {"pyramid_flux": "pyramid_flux_miniflux.json", "pyramid_mmdit": "pyramid_mmdit_sd3.json"}


@pytest.mark.parametrize("name", sorted(LISTINGS))
def test_shipped_dit_config_is_the_released_one(golden_dir, name):
    listing = json.loads((golden_dir / "keys" / LISTINGS[name]).read_text())
    kind = KINDS[name]
    assert kind_of_class_name(listing["class_name"]) is kind
    assert kind.dit_config == {**listing["config_json"], **listing["pipeline_overrides"]}


@pytest.mark.parametrize("name", sorted(LISTINGS))
def test_shipped_dit_config_builds_the_released_state_dict(golden_dir, name):
    listing = json.loads((golden_dir / "keys" / LISTINGS[name]).read_text())
    kind = KINDS[name]
    module, cls = kind.dit_class.split(":")
    with torch.device("meta"):
        model = getattr(import_module(module), cls)(**kind.dit_config)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == listing["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == listing["n_params"]
