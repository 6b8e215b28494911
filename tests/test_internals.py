"""One check per entry of launcher.internals: the library internal still exists and still behaves
as ftlaunch relies on. A failure names the entry, its library and the version last checked."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from launcher.internals import INTERNALS, Internal, load_dcp_without_process_group

CHECKS: dict[str, Callable[[], None]] = {}


def check(key: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        CHECKS[key] = fn
        return fn

    return register


def entry(key: str) -> Internal:
    return next(e for e in INTERNALS if e.key == key)


def tiny_gpt2(layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=layers, n_head=2)
    return GPT2LMHeadModel(config)


# ------------------------------------------------------------------------------------ torch


@check("dcp_load_without_process_group")
def _dcp():
    import tempfile

    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "optim": {"m": torch.ones(2)}}
    with tempfile.TemporaryDirectory() as tmp:
        dcp.save(state, checkpoint_id=tmp, no_dist=True)
        loaded = load_dcp_without_process_group(Path(tmp), keys={"model"})
    assert set(loaded) == {"model"}, f"read keys {sorted(loaded)}, wanted only 'model'"
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])


@check("composable_checkpoint")
def _composable_checkpoint():
    from torch.distributed._composable import checkpoint

    layer = nn.Linear(4, 4)
    names = [n for n, _ in layer.named_parameters()]
    checkpoint(layer)
    assert [n for n, _ in layer.named_parameters()] == names, "parameter names changed"
    x = torch.randn(2, 4, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is not None


@check("module_tensor_tables")
def _module_tensor_tables():
    shared = nn.Linear(2, 2)
    outer = nn.Sequential(shared, shared)
    assert isinstance(shared._parameters, dict) and isinstance(shared._buffers, dict)
    new = nn.Parameter(torch.zeros(2, 2))
    shared._parameters["weight"] = new
    assert outer[1].weight is new and outer(torch.ones(1, 2)).abs().sum() >= 0
    shared.register_buffer("b", torch.ones(1))
    assert "b" in shared._buffers


@check("module_forward_hooks")
def _module_forward_hooks():
    layer = nn.Linear(2, 2)

    def double(module, args, output):
        return output * 2

    handle = layer.register_forward_hook(double)
    assert layer._forward_hooks[handle.id] is double
    del layer._forward_hooks[handle.id]
    x = torch.ones(1, 2)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


@check("dynamo_before_zero_init")
def _dynamo():
    importlib.import_module("torch._dynamo")


# ------------------------------------------------------------------------------ transformers


@check("no_split_modules")
def _no_split_modules():
    from transformers import BertModel, GPT2PreTrainedModel, LlamaPreTrainedModel

    assert "GPT2Block" in (GPT2PreTrainedModel._no_split_modules or [])
    assert "LlamaDecoderLayer" in (LlamaPreTrainedModel._no_split_modules or [])
    assert "BertLayer" in (BertModel._no_split_modules or [])


@check("auto_model_mapping")
def _auto_model_mapping():
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    mapping = AutoModelForCausalLM._model_mapping
    assert GPT2Config in mapping and mapping[GPT2Config] is GPT2LMHeadModel


@check("from_config_private")
def _from_config():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    with torch.device("meta"):
        model = GPT2LMHeadModel._from_config(config, dtype=torch.bfloat16)
    weight = model.transformer.wte.weight
    assert weight.is_meta and weight.dtype == torch.bfloat16


@check("hf_deepspeed_weak_ref")
def _hf_deepspeed_weak_ref():
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    assert hf_deepspeed._hf_deepspeed_config_weak_ref is None
    assert not hf_deepspeed.is_deepspeed_zero3_enabled()
    hf_deepspeed._hf_deepspeed_config_weak_ref = saved


@check("is_hf_initialized")
def _is_hf_initialized():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    with torch.device("meta"):  # as launcher.models.load_structure builds it
        model = GPT2LMHeadModel._from_config(config)
    model.to_empty(device="cpu")
    kept, redone = model.transformer.wte.weight, model.transformer.wpe.weight
    with torch.no_grad():
        kept.fill_(7.0)
        redone.fill_(7.0)
    kept._is_hf_initialized = True
    model.initialize_weights()
    assert torch.all(kept == 7.0), "a flagged tensor was initialised again"
    assert not torch.all(redone == 7.0), "initialize_weights no longer initialises anything"


@check("weight_renaming")
def _weight_renaming():
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    model = tiny_gpt2(layers=1)
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    state = model.state_dict()
    target, converted = rename_source_key(
        "h.0.attn.c_attn.weight", renamings, converters, model.base_model_prefix, state
    )
    assert (target, converted) == ("transformer.h.0.attn.c_attn.weight", None)


@check("quantizer_marker")
def _quantizer_marker():
    import tempfile

    model = tiny_gpt2(layers=1)
    model.hf_quantizer = None
    model.is_quantized = False
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)


# --------------------------------------------------------------------------------- deepspeed


@check("engine_universal_flag")
def _engine_universal_flag():
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine

    source = inspect.getsource(DeepSpeedEngine)
    assert "self._config.load_universal_checkpoint" in source
    assert "load_universal_checkpoint" in inspect.getsource(DeepSpeedConfig)


@check("engine_basic_optimizer")
def _engine_basic_optimizer():
    from deepspeed.runtime.engine import DeepSpeedEngine

    source = inspect.getsource(DeepSpeedEngine)
    assert "self.basic_optimizer = " in source, "the engine no longer keeps basic_optimizer"


@check("zero3_fp32_partitions")
def _zero3_fp32_partitions():
    from deepspeed.runtime.zero import stage3

    source = inspect.getsource(stage3.DeepSpeedZeroOptimizer_Stage3)
    assert "self.fp32_partitioned_groups_flat" in source
    assert "self.optimizer.state[fp32_param][optim_state_key]" in source, (
        "safe_set_full_optimizer_state no longer reads the Adam state keyed by the partition"
    )
    state = inspect.getsource(importlib.import_module("torch.optim.adam"))
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert f'state["{key}"]' in state, f"torch's Adam no longer keeps state[{key!r}]"


@check("ds_to_universal_main")
def _ds_to_universal_main():
    from deepspeed.checkpoint import ds_to_universal

    params = list(inspect.signature(ds_to_universal.main).parameters)
    assert params == ["args"], f"main{tuple(params)}"
    source = inspect.getsource(ds_to_universal)
    given = argparse.Namespace(
        input_folder="",
        output_folder="",
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    read = {name for name in vars(given) if f"args.{name}" in source}
    assert read == set(vars(given)), f"options no longer read: {set(vars(given)) - read}"


@check("zero3_param_attributes")
def _zero3_param_attributes():
    from deepspeed.runtime.zero import partition_parameters

    source = inspect.getsource(partition_parameters)
    for name in ("ds_tensor", "ds_numel", "ds_id"):
        assert f"param.{name}" in source, f"zero.Init no longer sets param.{name}"


# -------------------------------------------------------------------------------------- peft


@check("peft_auxiliary_wrapper")
def _peft_auxiliary_wrapper():
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from peft.utils.other import AuxiliaryTrainingWrapper
    from transformers import GPT2Config, GPT2ForSequenceClassification

    params = inspect.signature(AuxiliaryTrainingWrapper.unload_and_optionally_merge_module)
    assert {"merge", "safe_merge", "adapter_names"} <= set(params.parameters)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    config.pad_token_id = 0
    model = get_peft_model(
        GPT2ForSequenceClassification(config),
        PromptTuningConfig(
            task_type=TaskType.SEQ_CLS, num_virtual_tokens=2, modules_to_save=["score"]
        ),
    )
    wrapper = model.get_base_model().score
    assert isinstance(wrapper, AuxiliaryTrainingWrapper)
    plain = wrapper.unload_and_optionally_merge_module(
        merge=False, safe_merge=False, adapter_names=None
    )
    assert type(plain) is nn.Linear


@check("peft_ia3_mappings")
def _peft_ia3_mappings():
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    assert TARGETS and all(isinstance(v, list) for v in TARGETS.values())
    assert set(FEEDFORWARD) <= set(TARGETS)


# ------------------------------------------------------------------------------ bitsandbytes


@check("bnb_cpu_repack_switch")
def _bnb_cpu_repack_switch():
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    def weight_after_evaluation(repack: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32).to("cpu")
        assert hasattr(layer, "support_avx512bf16_for_cpu"), "no switch on Linear4bit"
        layer.support_avx512bf16_for_cpu = repack
        before = layer.weight.data.clone()
        layer.eval()
        with torch.no_grad():
            layer(torch.randn(3, 64))
        return before, layer.weight.data

    before, after = weight_after_evaluation(repack=False)
    assert after.shape == before.shape and torch.equal(after, before), "repacked when switched off"
    if has_avx512bf16():  # where the repack happens, the switch must be what prevents it
        before, after = weight_after_evaluation(repack=True)
        assert after.shape != before.shape or not torch.equal(after, before), "switch ignored"


# --------------------------------------------------------------------------------------- ray


@check("ray_private_loggers")
def _ray_private_loggers():
    from launcher.targets.ray_jobs import RAY_CLIENT_LOGGERS

    for name in (*RAY_CLIENT_LOGGERS, "ray.data._internal.progress"):
        assert importlib.util.find_spec(name) is not None, f"no module {name}"


@check("ray_driver_error_printer")
def _ray_driver_error_printer():
    import ray._private.worker as ray_worker

    source = inspect.getsource(ray_worker.listen_error_messages)
    assert "print_to_stdstream(" in source, "listen_error_messages prints some other way"
    assert '"pid": "raylet"' in source and '"lines": [error_message]' in source, source
    params = list(inspect.signature(ray_worker.print_to_stdstream).parameters)
    assert params == ["data", "ignore_prefix"], params


@check("ray_train_checkpoint_storage")
def _ray_train_checkpoint_storage():
    import inspect

    from ray.train.v2._internal.execution.storage import StorageContext
    from ray.train.v2.api.context import TrainContext

    assert hasattr(TrainContext, "get_storage")
    params = list(inspect.signature(StorageContext.persist_current_checkpoint).parameters)
    assert params == ["self", "checkpoint", "checkpoint_dir_name"], params


# ---------------------------------------------------------------------------------- the tests


def test_every_internal_has_exactly_one_check():
    keys = [e.key for e in INTERNALS]
    assert len(keys) == len(set(keys)), "duplicate keys in launcher.internals"
    assert set(keys) == set(CHECKS), {
        "entries without a check": sorted(set(keys) - set(CHECKS)),
        "checks without an entry": sorted(set(CHECKS) - set(keys)),
    }


@pytest.mark.parametrize("key", [e.key for e in INTERNALS])
def test_internal_still_behaves_as_relied_on(key):
    item = entry(key)
    installed = importlib.metadata.version(item.library)
    try:
        CHECKS[key]()
    except Exception as exc:  # any failure means the internal moved
        pytest.fail(
            f"library internal changed: {item.library} {installed} (checked with "
            f"{item.checked_with}): {item.name}, used in {', '.join(item.used_in)}; ftlaunch "
            f"relies on: {item.relied_on}. Check failed with {type(exc).__name__}: {exc}",
            pytrace=False,
        )
