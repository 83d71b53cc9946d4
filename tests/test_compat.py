"""The cache argument is named as the installed transformers release names it."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

from samkv_integrations.models import random_model
from samkv_integrations.models.compat import cache_argument, with_cache


class _OldStyle(torch.nn.Module):
    def forward(self, hidden: torch.Tensor, past_key_values: object = None) -> torch.Tensor:
        return hidden


class _NewStyle(torch.nn.Module):
    def forward(self, hidden: torch.Tensor, cache: object = None) -> torch.Tensor:
        return hidden


class _NoCache(torch.nn.Module):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def test_each_release_style_gets_its_own_name() -> None:
    assert cache_argument(_OldStyle()) == "past_key_values"
    assert cache_argument(_NewStyle()) == "cache"
    assert with_cache(_NewStyle(), 3) == {"cache": 3}


def test_a_module_without_a_cache_parameter_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"_NoCache\.forward takes none of"):
        cache_argument(_NoCache())


def test_installed_models_take_the_name_without_a_deprecation_warning() -> None:
    loaded = random_model("tiny-llama", device="cpu")
    model = loaded.model
    layer = model.get_decoder().layers[0]
    for module in (model, model.get_decoder(), layer):
        name = cache_argument(module)
        assert name in ("cache", "past_key_values")

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model(
            input_ids=torch.tensor([[5, 6, 7]]),
            use_cache=True,
            **with_cache(model, DynamicCache(config=model.config)),
        )
