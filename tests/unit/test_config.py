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


def test_content_key_fields_are_declared_on_the_dataclasses():
    from finestyle.config import ExportConfig, PrepareConfig, TrainConfig, keyed_fields

    train = keyed_fields(TrainConfig())
    assert {"lr", "rank", "targets", "steps", "seed", "select"} <= set(train)
    assert not {"out", "device", "force", "resume", "dataset", "base", "sample_prompts"} & set(train)
    assert "eval_every" not in keyed_fields(TrainConfig(), skip=("eval_every",))
    export = keyed_fields(ExportConfig())
    assert {"fp16", "lora_scale", "unet_atol"} <= set(export)
    assert not {"out", "adapter", "base", "force", "device"} & set(export)
    prepare = keyed_fields(PrepareConfig())
    assert {"template", "style", "captioner", "base"} <= set(prepare)
    assert not {"images", "out", "force", "device"} & set(prepare)
    # where a run writes never changes what it is
    assert keyed_fields(TrainConfig(out="a", force=True)) == keyed_fields(TrainConfig(out="b"))
    assert keyed_fields(TrainConfig(lr=1e-3)) != keyed_fields(TrainConfig(lr=2e-3))


def test_find_reusable(tmp_path):
    from finestyle.core.errors import UserError
    from finestyle.core.fs import write_json
    from finestyle.core.stage import find_reusable

    logs = []
    out = tmp_path / "run"
    assert find_reusable(out, "report.json", "k1", stage="train", same="inputs", log=logs.append) is None
    out.mkdir()
    write_json(out / "report.json", {"cache_key": "k1", "rows": 3})
    old = find_reusable(out, "report.json", "k1", stage="train", same="inputs", log=logs.append)
    assert old == {"cache_key": "k1", "rows": 3} and "train: reusing" in logs[-1]
    assert find_reusable(out, "report.json", "k2", stage="train", same="x", log=logs.append) is None
    assert find_reusable(out, "report.json", "k1", stage="train", same="x", force=True) is None
    assert find_reusable(out, "report.json", "k1", stage="train", same="x", needs=("adapter/w",)) is None

    def tampered(folder):
        raise UserError("hash mismatch in model.onnx")

    assert (
        find_reusable(out, "report.json", "k1", stage="export", same="x", load=tampered, log=logs.append)
        is None
    )
    assert logs[-1] == f"export: existing {out} is not reusable (hash mismatch in model.onnx); rebuilding"
    (out / "report.json").write_text("{not json")
    assert find_reusable(out, "report.json", "k1", stage="train", same="x") is None


def test_one_request_schema_for_generate_runtime_and_server():
    import dataclasses

    from finestyle.config import GenerateConfig, RequestOptions, ServeConfig, field_docs
    from finestyle.runtime.generate import GenerationRequest
    from finestyle.serve.app import images_model, request_model

    options = [f.name for f in dataclasses.fields(RequestOptions)]
    assert GenerationRequest is RequestOptions
    assert options == [f.name for f in dataclasses.fields(GenerateConfig)][: len(options)]
    body = request_model(ServeConfig(export="x", max_steps=30))
    assert set(body.model_fields) == {*options, "response_format"}
    docs = field_docs(RequestOptions)
    assert body.model_fields["guidance"].description == " ".join(docs["guidance"].split())
    assert body.model_fields["steps"].default == RequestOptions.steps
    images = images_model(ServeConfig(export="x"))
    renamed = {"num_images", "width", "height", "style"}  # OpenAI's n, size and model
    assert set(options) - renamed <= set(images.model_fields)
    assert not renamed & set(images.model_fields)
    # the same bounds from the same limits
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError):
        body(prompt="a", steps=31)
    assert GenerateConfig(exclude_concepts="tree, sun").request("blur").negative_prompt == "blur"
