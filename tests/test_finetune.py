"""Fine-tuning methods: what trains, what stays bit-identical, and what the export reloads as.

Every method is trained for a few plain AdamW steps on one batch of a tiny GPT-2 (causal LM)
and a tiny BERT (classification); the expected set of changed parameters is written down here
by name, independently of the code under test.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from launcher.dev.synthetic import review_rows, story_lines
from launcher.export import export_model
from launcher.export_layout import load_exported_model
from launcher.finetune import (
    FinetuneError,
    apply_finetune,
    count_parameters,
    lora_target_modules,
)
from launcher.models import load_model, load_tokenizer
from launcher.objectives import compute_loss
from launcher.recipe import Recipe, RecipeError, validate_data

METHODS = ["full", "lora", "adapter", "prefix", "prompt", "ia3", "bitfit", "freeze"]
LABELS = ["negative", "positive"]

# Parameters each method trains, by name (peft names included). The classification head is
# added for classification: peft trains a copy under `modules_to_save`, the others the head.
TRAINED = {
    "full": r".*",
    "lora": r".*\.lora_[AB]\.",
    "adapter": r".*\.bottleneck_adapter\.",
    "prefix": r"^prompt_encoder\.",
    "prompt": r"^prompt_encoder\.",
    "ia3": r".*\.ia3_l\.",
    "bitfit": r".*\.bias$",
    "freeze": r".*(transformer\.h\.1\.|transformer\.ln_f\.|encoder\.layer\.1\.|bert\.pooler\.)",
}
HEAD = r"(^|\.)(score|classifier)\.(modules_to_save\.default\.)?(weight|bias)$"
PEFT_HEAD = r"(^|\.)(score|classifier)\.modules_to_save\."
LR = {"full": 1e-3, "adapter": 3e-2, "bitfit": 3e-2, "prefix": 1e-1, "prompt": 2e-1, "ia3": 1e-1}


def make_recipe(model_dir, task: str, method: str, **finetune) -> Recipe:
    data = {
        "name": "ft",
        "model": {"name_or_path": str(model_dir), "task": task},
        "data": {"train": "unused.jsonl"},
        "finetune": {"method": method, **finetune},
    }
    if task == "classification":
        data["model"]["labels"] = LABELS
        data["data"]["format"] = "classification"
    return Recipe.model_validate(data)


def make_batch(tokenizer, task: str) -> dict[str, torch.Tensor]:
    if task == "causal_lm":
        texts = story_lines(8, seed=11)
    else:
        rows = review_rows(8, seed=11)
        texts = [r["text"] for r in rows]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    if task == "causal_lm":
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    else:
        labels = torch.tensor([LABELS.index(r["label"]) for r in rows])
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": labels,
    }


def build(model_dir, task: str, method: str, **finetune):
    recipe = make_recipe(model_dir, task, method, **finetune)
    tokenizer = load_tokenizer(recipe.model)
    torch.manual_seed(0)
    model = load_model(recipe.model, pad_token_id=tokenizer.pad_token_id)
    return recipe, tokenizer, apply_finetune(model, recipe)


def train(model, batch, task: str, lr: float, steps: int = 8) -> list[float]:
    """Plain single-process training: AdamW on the trainable parameters, no weight decay.

    Dropout stays off (eval mode) so that a few steps on one batch fall deterministically.
    Returns the loss before each step and after the last.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.eval()
    losses = []
    for _ in range(steps):
        loss, _ = compute_loss(model, batch, task)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(compute_loss(model, batch, task)[0].item())
    return losses


def expected_trained(name: str, method: str, task: str) -> bool:
    if re.match(TRAINED[method], name):
        return True
    if task != "classification":
        return False
    if method in ("lora", "prefix", "prompt", "ia3"):
        return re.search(PEFT_HEAD, name) is not None
    return re.search(HEAD, name) is not None


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


CASES = [(m, "causal_lm") for m in METHODS] + [(m, "classification") for m in METHODS]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, beside other test processes on two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder(tiny_bert, tmp_path_factory):
    """The tiny BERT after some sentiment training, saved without its head.

    A random encoder's sentence vectors barely differ between inputs, so methods that train
    little besides the head could not lower the loss; this stands in for a pretrained one.
    """
    _, tokenizer, model = build(tiny_bert, "classification", "full")
    rows = review_rows(64, seed=21)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(24):
        chunk = rows[(step % 4) * 16 : (step % 4 + 1) * 16]
        enc = tokenizer([r["text"] for r in chunk], padding=True, return_tensors="pt")
        batch = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([LABELS.index(r["label"]) for r in chunk]),
        }
        compute_loss(model, batch, "classification")[0].backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("encoder")
    model.bert.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tiny_gpt2, encoder):
    return {"causal_lm": tiny_gpt2, "classification": encoder}


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(("method", "task"), CASES)
def test_method_trains_exactly_its_parameters_and_exports(models, tmp_path, method, task):
    recipe, tokenizer, model = build(models[task], task, method)
    batch = make_batch(tokenizer, task)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    losses = train(model, batch, task, LR.get(method, 1e-2))
    assert losses[-1] < losses[0] * 0.99, losses

    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    # Parameters only: buffers (e.g. BERT position ids) never change.
    params = [k for k, _ in model.named_parameters(remove_duplicate=False)]
    expected = {k for k in params if expected_trained(k, method, task)}
    assert changed == expected, (sorted(changed ^ expected))[:10]
    counts = count_parameters(model)
    assert 0 < counts["trainable"] <= counts["total"]
    assert counts["percent"] == pytest.approx(100 * counts["trainable"] / counts["total"], 1e-3)

    trained_out = logits(model, batch)
    info = export_model(recipe, model.state_dict(), tmp_path, tokenizer, merge=True)
    reloaded = load_exported_model(tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), trained_out, atol=1e-5, rtol=1e-4)

    meta = json.loads((tmp_path / "model" / "ftlaunch_export.json").read_text())
    assert meta["method"] == method and meta["standalone"] == info["standalone"]
    assert meta["adapter_alone"] == (None if method in ("full", "freeze") else "../adapter")
    assert (tmp_path / "model" / "tokenizer.json").exists()
    # every exported file readable as the umask allows (safetensors writes its own 0600)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o666 & ~current_umask()}, modes
    assert info["standalone"] == (method in ("full", "freeze", "bitfit", "lora", "ia3"))
    if info["standalone"]:
        from launcher.models import model_class

        plain = model_class(task).from_pretrained(tmp_path / "model").eval()
        torch.testing.assert_close(logits(plain, batch), trained_out, atol=1e-5, rtol=1e-4)
    if method in ("full", "freeze"):
        assert info["adapter_dir"] is None and not (tmp_path / "adapter").exists()
    else:
        # The adapter alone is a small fraction of the model.
        assert info["adapter_bytes"] * 4 < info["model_bytes"], info


@pytest.mark.parametrize(("method", "task"), [("lora", "causal_lm"), ("ia3", "classification")])
def test_peft_adapter_on_base_matches_merged_model(models, tmp_path, method, task):
    from peft import PeftModel

    recipe, tokenizer, model = build(models[task], task, method)
    batch = make_batch(tokenizer, task)
    train(model, batch, task, LR.get(method, 1e-2), steps=3)
    export_model(recipe, model.state_dict(), tmp_path, tokenizer, merge=True)
    adapter_files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert adapter_files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    base = load_model(recipe.model, pad_token_id=tokenizer.pad_token_id)
    on_base = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = load_exported_model(tmp_path)
    assert not isinstance(merged, PeftModel)
    torch.testing.assert_close(logits(on_base, batch), logits(merged, batch), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["use_dora", "use_rslora"])
def test_dora_and_rslora_train_only_lora_and_export_matching_adapters(tiny_gpt2, tmp_path, variant):
    from peft import PeftModel

    recipe, tokenizer, model = build(tiny_gpt2, "causal_lm", "lora", lora={variant: True})
    assert getattr(model.peft_config["default"], variant) is True
    batch = make_batch(tokenizer, "causal_lm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train(model, batch, "causal_lm", 1e-2, steps=4)
    assert losses[-1] < losses[0] * 0.99, losses
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    # DoRA trains the LoRA matrices and a magnitude vector per adapted weight; nothing else.
    pattern = (
        r".*\.(lora_[AB]\.|lora_magnitude_vector\.)" if variant == "use_dora" else TRAINED["lora"]
    )
    assert changed and all(re.match(pattern, k) for k in changed), sorted(changed)[:10]
    if variant == "use_dora":
        assert any("lora_magnitude_vector" in k for k in changed)

    trained_out = logits(model, batch)
    export_model(recipe, model.state_dict(), tmp_path, tokenizer, merge=True)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config[variant] is True
    base = load_model(recipe.model, pad_token_id=tokenizer.pad_token_id)
    on_base = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = load_exported_model(tmp_path)
    torch.testing.assert_close(logits(on_base, batch), trained_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(merged, batch), trained_out, atol=1e-5, rtol=1e-4)


def test_lora_without_merge_keeps_base_weights_and_adapter(tiny_gpt2, tmp_path):
    recipe, tokenizer, model = build(tiny_gpt2, "causal_lm", "lora")
    batch = make_batch(tokenizer, "causal_lm")
    train(model, batch, "causal_lm", 1e-2, steps=3)
    info = export_model(recipe, model.state_dict(), tmp_path, tokenizer, merge=False)
    assert not info["merged"] and not info["standalone"]
    assert "merge_lora is false" in info["note"]
    assert (tmp_path / "model" / "adapter" / "adapter_config.json").exists()
    base_sd = load_model(recipe.model).state_dict()
    from launcher.models import model_class

    saved = model_class("causal_lm").from_pretrained(tmp_path / "model").state_dict()
    for key, value in base_sd.items():
        assert torch.equal(saved[key], value), key
    reloaded = load_exported_model(tmp_path / "model")
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), atol=1e-5, rtol=1e-4)


def test_adapter_starts_as_identity_and_sits_after_each_feed_forward(tiny_gpt2, tiny_bert):
    for model_dir, task, place in (
        (tiny_gpt2, "causal_lm", "mlp"),
        (tiny_bert, "classification", "output.dense"),
    ):
        recipe = make_recipe(model_dir, task, "adapter", adapter={"reduction_factor": 8})
        tokenizer = load_tokenizer(recipe.model)
        batch = make_batch(tokenizer, task)
        base = load_model(recipe.model, pad_token_id=tokenizer.pad_token_id).eval()
        reference = logits(base, batch)
        adapted = apply_finetune(base, recipe)
        torch.testing.assert_close(logits(adapted, batch), reference, atol=0, rtol=0)
        names = {k.split(".bottleneck_adapter.")[0] for k in adapted.state_dict() if "adapter" in k}
        assert len(names) == 2 and all(n.endswith(f".{place}") for n in names), names
        down = adapted.get_submodule(f"{sorted(names)[0]}.bottleneck_adapter.down")
        assert down.out_features == 64 // 8


def test_lora_target_modules_per_architecture(tiny_gpt2, tiny_llama, tiny_bert):
    from transformers import AutoModel, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama)
    bert = AutoModel.from_pretrained(tiny_bert)
    assert lora_target_modules(gpt2) == ["c_attn", "c_proj", "c_fc"]
    assert lora_target_modules(llama) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert lora_target_modules(bert) == ["query", "key", "value", "dense"]


def test_unknown_architecture_lists_candidate_modules():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    cfg = GPTNeoConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        attention_types=[[["global"], 2]],
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    with pytest.raises(FinetuneError) as err:
        lora_target_modules(GPTNeoForCausalLM(cfg))
    message = str(err.value)
    assert "finetune.lora.target_modules: auto does not know architecture 'gpt_neo'" in message
    assert "modules: k_proj, v_proj, q_proj, out_proj, c_fc, c_proj" in message
    assert "lm_head" not in message


def test_bad_method_settings_are_clear_errors(tiny_gpt2, tiny_llama):
    with pytest.raises(
        FinetuneError, match=r"no module named 'qkv' in GPT2LMHeadModel; candidates"
    ):
        build(tiny_gpt2, "causal_lm", "lora", lora={"target_modules": ["c_attn", "qkv"]})
    with pytest.raises(
        FinetuneError, match="trainable_layers: 5 is more than the model's 2 blocks"
    ):
        build(tiny_gpt2, "causal_lm", "freeze", trainable_layers=5)
    with pytest.raises(
        FinetuneError, match="bitfit trains bias terms, and LlamaForCausalLM has none"
    ):
        build(tiny_llama, "causal_lm", "bitfit")


def test_llama_lora_and_adapter_train(tiny_llama):
    for method in ("lora", "adapter"):
        _, tokenizer, model = build(tiny_llama, "causal_lm", method)
        losses = train(model, make_batch(tokenizer, "causal_lm"), "causal_lm", 1e-2, steps=4)
        assert losses[-1] < losses[0], (method, losses)


def test_key_of_another_method_fails_validation():
    data = {
        "name": "x",
        "model": {"name_or_path": "gpt2"},
        "data": {"train": "t.jsonl"},
        "finetune": {"method": "prefix", "lora": {"r": 4}},
    }
    with pytest.raises(
        RecipeError, match=r"finetune\.lora: only applies to finetune\.method: lora"
    ):
        validate_data(data)


@pytest.mark.parametrize("method", ["prompt", "adapter"])
def test_batch_engine_loads_exports_that_need_their_adapter(tiny_gpt2, tmp_path, method):
    from launcher.batch import load_scoring_model as batch_load
    from launcher.batch import resolve_model

    recipe, tokenizer, model = build(tiny_gpt2, "causal_lm", method)
    batch = make_batch(tokenizer, "causal_lm")
    train(model, batch, "causal_lm", LR[method], steps=3)
    export_model(recipe, model.state_dict(), tmp_path, tokenizer, merge=True)
    loaded, _ = batch_load(resolve_model(tmp_path))
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=1e-4)


ZERO3_INIT_CHECK = """
import os, sys, socket
import torch, torch._dynamo, torch.distributed as dist
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
import deepspeed
from transformers.integrations import HfDeepSpeedConfig
from launcher.finetune import apply_finetune, count_parameters
from launcher.models import load_model
from launcher.recipe import Recipe
from launcher.sharded_load import build_partitioned
config = {"train_batch_size": 1, "zero_optimization": {"stage": 3}}
recipes = {method: Recipe.model_validate({"name": "z", "model": {"name_or_path": sys.argv[1]},
    "data": {"train": "t.jsonl"}, "finetune": {"method": method}}) for method in ("lora", "adapter")}
# Counted before ZeRO-3 is configured: from_pretrained partitions by itself once it is.
plain = {m: count_parameters(apply_finetune(load_model(r.model), r)) for m, r in recipes.items()}
keep = HfDeepSpeedConfig(config)
for method, pattern in (("lora", "lora_B"), ("adapter", "bottleneck_adapter.up")):
    recipe = recipes[method]
    model = build_partitioned(lambda: apply_finetune(load_model(recipe.model), recipe), config)
    params = [p for n, p in model.named_parameters() if pattern in n]
    assert params and all(hasattr(p, "ds_id") for p in params)  # partitioned
    with deepspeed.zero.GatheredParameters(params):
        sizes = [p.numel() for p in params]
        nonzero = sum(int(p.detach().abs().sum() > 0) for p in params)
    assert count_parameters(model) == plain[method], (count_parameters(model), plain[method])
    print(method, len(params), min(sizes), nonzero)
# With bf16 on, ZeRO-3 keeps the weights in bf16, as zero.Init's constructors would have made them.
half = build_partitioned(lambda: apply_finetune(load_model(recipe.model), recipe),
    {**config, "bf16": {"enabled": True}})
print("dtypes", sorted({str(p.ds_tensor.dtype) for p in half.parameters()}))
"""


@pytest.mark.slow
def test_zero3_partitioned_lora_and_adapters_start_as_identity(tiny_gpt2):
    """Built for ZeRO-3 (placeholders, then partitioned module by module), LoRA B and adapter
    up-projections start at zero, and partitioned parameters are counted at their full size."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0"}
    env.update(WORLD_SIZE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", ZERO3_INIT_CHECK, str(tiny_gpt2)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [
        line.split() for line in done.stdout.splitlines() if line.startswith(("lora", "adapter"))
    ]
    assert [(m, int(zero)) for m, _, _, zero in lines] == [("lora", 0), ("adapter", 0)], done.stdout
    assert all(int(size) > 0 for _, _, size, _ in lines)
    assert "dtypes ['torch.bfloat16']" in done.stdout, done.stdout


TRAINABLE_PREFIXES = {
    # Llama ties its LM head to the embeddings: the head stays frozen with them.
    ("llama", "causal_lm", "freeze"): {"model.layers.1.", "model.norm."},
    ("gpt2", "classification", "freeze"): {"transformer.h.1.", "transformer.ln_f.", "score."},
    ("gpt2", "classification", "lora"): {
        "base_model.model.transformer.h.",
        "base_model.model.score.",
    },
    ("llama", "classification", "prefix"): {"prompt_encoder.", "base_model.score.modules_to_save."},
}


@pytest.mark.parametrize(("arch", "task", "method"), list(TRAINABLE_PREFIXES))
def test_other_architectures_train_the_right_parts(tiny_gpt2, tiny_llama, arch, task, method):
    _, _, model = build({"gpt2": tiny_gpt2, "llama": tiny_llama}[arch], task, method)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    prefixes = TRAINABLE_PREFIXES[(arch, task, method)]
    for prefix in prefixes:
        assert any(n.startswith(prefix) for n in trainable), (prefix, trainable)
    assert all(n.startswith(tuple(prefixes)) for n in trainable), trainable
    if method == "lora":
        assert all(".lora_" in n or ".score." in n for n in trainable)


def test_export_accepts_one_of_tied_twins_and_refuses_foreign_keys(tiny_gpt2, tmp_path):
    recipe, tokenizer, model = build(tiny_gpt2, "causal_lm", "lora")
    state = model.state_dict()
    # Consolidation may keep only one name of the tied embedding / LM head pair.
    state.pop("base_model.model.lm_head.weight")
    info = export_model(recipe, state, tmp_path / "a", tokenizer, merge=True)
    assert info["merged"]
    state["transformer.h.0.attn.c_attn.weight"] = torch.zeros(1)
    with pytest.raises(FinetuneError, match=r"state dict does not match finetune\.method lora"):
        export_model(recipe, state, tmp_path / "b", tokenizer, merge=True)
    full_state = build(tiny_gpt2, "causal_lm", "full")[2].state_dict()
    with pytest.raises(FinetuneError, match="missing"):
        export_model(recipe, full_state, tmp_path / "c", tokenizer, merge=True)
