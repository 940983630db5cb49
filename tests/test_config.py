"""Options from JSON (API, --options files) are type-checked and validated with plain messages."""

from __future__ import annotations

import pytest

from dreamartist_ext.config import ConfigError, TrainConfig


@pytest.mark.parametrize(
    "values, message",
    [
        ({"steps": "3"}, "'steps' must be a whole number"),
        ({"flip": 1}, "'flip' must be true or false"),
        ({"steps": True}, "'steps' must be a whole number"),
        ({"guidance": 3}, "'guidance' must be text"),
        ({"stepz": 3}, "unknown option"),
        ({"preview": {"stepz": 1}}, "unknown preview option"),
        ({"preview": 5}, "'preview' must be an object"),
        ({"adam_betas": 0.9}, "adam_betas"),
        ({"adam_betas": [0.9, 1.5]}, "adam_betas"),
        ({"adam_betas": [0.9]}, "adam_betas"),
        ({"tag_dropout": 2.0}, "tag dropout"),
        ({"latent_sampling": "sometimes"}, "latent sampling"),
        ({"width": 100}, "multiple of 8"),
        ({"name": "bad/name"}, "'/'"),
        ({"adam_betas": ["a", "b"]}, "adam_betas"),
        ({"adam_betas": [True, 0.9]}, "adam_betas"),
        # sizes that would hang or exhaust memory at the first step
        ({"width": 100000, "height": 64}, "each side may be at most 4096"),
        ({"width": 4096, "height": 4096}, "16.8 megapixels; at most 4.2"),
        ({"batch_size": 65, "width": 64, "height": 64}, "batch size must be between 1 and 64"),
        ({"batch_size": 17, "width": 1024, "height": 1024}, "too much for one micro-batch"),
        ({"gradient_accumulation": 5000}, "gradient accumulation must be between 1 and 1024"),
        ({"preview": {"count": 17}}, "preview count must be between 1 and 16"),
        ({"preview": {"width": 100000}}, "preview width and height"),
    ],
)
def test_bad_options_are_refused_with_a_message(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({"name": "cube", **values}).validate()


def test_round_trip_and_int_for_float():
    config = TrainConfig.from_dict({"name": "cube", "reconstruction_weight": 2, "preview": {"steps": 3}})
    assert config.reconstruction_weight == 2.0 and isinstance(config.reconstruction_weight, float)
    again = TrainConfig.from_dict(config.to_dict())
    assert again == config and again.validate() is again


def test_the_largest_accepted_sizes_are_accepted():
    for values in ({"width": 2048, "height": 2048}, {"width": 4096, "height": 1024},
                   {"batch_size": 64, "width": 512, "height": 512}, {"gradient_accumulation": 1024}):
        TrainConfig.from_dict({"name": "cube", **values}).validate()


def test_every_option_has_help_in_its_field():
    """Help lives once, in the field metadata: the CLI help and the WebUI tab read it from there."""
    import dataclasses

    from dreamartist_ext.config import PreviewConfig

    for cls in (TrainConfig, PreviewConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_size_0_means_the_models_native_size():
    config = TrainConfig.from_dict({"name": "cube", "height": 768})
    assert (config.width, config.height) == (0, 768) and config.validate() is config
    sized = config.sized_for(1024)
    assert (sized.width, sized.height) == (1024, 768)
    with pytest.raises(ConfigError, match="too much for one micro-batch"):
        TrainConfig.from_dict({"name": "cube", "batch_size": 17}).sized_for(1024).validate()
