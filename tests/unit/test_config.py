from __future__ import annotations

import pytest

from finestyle.config import (
    PipelineConfig,
    PrepareConfig,
    TrainConfig,
    field_docs,
    from_dict,
    load_pipeline_config,
    stage_from_sources,
)
from finestyle.core.errors import UserError


def test_validation_names_field_and_value():
    with pytest.raises(UserError, match=r"train\.rank: invalid value 0"):
        TrainConfig(rank=0)
    with pytest.raises(UserError, match=r"prepare\.concepts: invalid value 'magic'"):
        PrepareConfig(concepts="magic")
    with pytest.raises(UserError, match=r"train\.targets"):
        TrainConfig(targets="([")


def test_every_field_has_a_docstring():
    for cls in (PrepareConfig, TrainConfig, PipelineConfig):
        import dataclasses

        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
        assert not missing, f"{cls.__name__} fields without docstring: {missing}"


def test_yaml_roundtrip_and_cli_overrides(tmp_path):
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text(
        "workdir: runs/x\nprepare:\n  style: watercolor painting\n  images: [a, b]\n"
        "train:\n  steps: 50\n  rank: 4\n"
    )
    cfg = load_pipeline_config(cfg_file, ["train.steps=7", "export.optimize=true"])
    assert isinstance(cfg, PipelineConfig)
    assert cfg.prepare.style == "watercolor painting" and cfg.prepare.images == ["a", "b"]
    assert cfg.train.steps == 7 and cfg.train.rank == 4  # CLI beats file, file beats default
    assert cfg.export.optimize is True
    # a stage config from the same file, CLI value wins, None means "not given"
    t = stage_from_sources(TrainConfig, "train", str(cfg_file), {"rank": 16, "lr": None})
    assert t.rank == 16 and t.steps == 50 and t.lr == 1e-4


def test_unknown_and_mistyped_keys_are_named(tmp_path):
    with pytest.raises(UserError, match=r"train\.stepz: unknown option"):
        from_dict(PipelineConfig, {"train": {"stepz": 3}})
    with pytest.raises(UserError, match=r"train\.steps: invalid value 'many'"):
        from_dict(PipelineConfig, {"train": {"steps": "many"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_pipeline_config(bad)


def test_target_presets():
    import re

    assert re.fullmatch(
        TrainConfig().target_regex, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    )
    assert not re.fullmatch(
        TrainConfig().target_regex, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    )
    assert not re.fullmatch(
        TrainConfig().target_regex, "mid_block.attentions.0.transformer_blocks.0.attn2.to_q"
    )
    assert re.fullmatch(TrainConfig(targets="attn").target_regex, "x.attn1.to_out.0")
