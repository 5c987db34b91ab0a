"""The method table (config.METHODS) is complete: every method builds its configuration, finds its mixture class,
trainer and export, and serves the parameter count an independent computation gives."""

import pytest
from conftest import make_model

from adamix_ds import MixtureConfig, inject_mixtures, merge_experts
from adamix_ds.config import FULL, METHODS
from adamix_ds.export.merged_model import EXPORTS
from adamix_ds.methods.registry import mixture_class
from adamix_ds.training.recipe import TRAINERS


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_a_trainer_mixtures_and_an_export(method):
    config = MixtureConfig(method=method)
    assert config.family in TRAINERS
    if config.family == FULL:
        with pytest.raises(ValueError, match="trains the base itself"):
            mixture_class(config)
        return
    assert config.family in EXPORTS
    mixtures = inject_mixtures(make_model("llama"), config)
    trained = sum(p.numel() for p in mixtures.parameters())
    if config.spec.merges_into is not None:
        assert mixtures.served_parameters() == sum(p.numel() for p in merge_experts(mixtures).parameters())
        assert MixtureConfig(method=config.spec.merges_into).num_experts == 1
    else:
        assert mixtures.served_parameters() == trained


def test_options_of_another_method_are_refused_by_the_table():
    with pytest.raises(Exception, match="--top_k=3 is not allowed: only with topk-lora"):
        MixtureConfig(method="molora", top_k=3)
    with pytest.raises(Exception, match="--adapter_after_attention=True is not allowed: only with adamix-adapter, adapter"):
        MixtureConfig(method="adamix-lora", adapter_after_attention=True)
    assert MixtureConfig(method="hydralora").spec.shared_a and not MixtureConfig(method="molora").spec.shared_a
