"""Every place ftlaunch relies on a library's internals (private names, undocumented behaviour).

Each entry names the library, the internal, where ftlaunch uses it, what it relies on, and the
version it was last checked against (constraints.txt). tests/test_internals.py holds one check
per entry: when an upgrade moves or changes an internal, that test fails and names the entry,
instead of a training run failing somewhere deep inside a worker.

Upgrading a library: run tests/test_internals.py, fix what fails at the listed call sites, then
update `checked_with` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Internal:
    """One library internal ftlaunch relies on."""

    key: str
    """Short id; tests/test_internals.py names its check after it."""
    library: str
    name: str
    used_in: tuple[str, ...]
    relied_on: str
    checked_with: str


INTERNALS: tuple[Internal, ...] = (
    Internal(
        "dcp_load_without_process_group",
        "torch",
        "torch.distributed.checkpoint.state_dict_loader._load_state_dict(no_dist=True) with "
        "default_planner._EmptyStateDictLoadPlanner(keys=...)",
        ("launcher.internals.load_dcp_without_process_group", "launcher.export._consolidate_fsdp"),
        "reads a torch.distributed.checkpoint directory into an empty dict, whole, in a process "
        "without a process group (what torch's dcp_to_torch_save does, for only some keys)",
        "2.13.0",
    ),
    Internal(
        "composable_checkpoint",
        "torch",
        "torch.distributed._composable.checkpoint",
        ("launcher.strategies.enable_activation_checkpointing",),
        "wraps a module in place so its activations are recomputed in backward, key names kept "
        "(fallback for models without gradient_checkpointing_enable)",
        "2.13.0",
    ),
    Internal(
        "module_tensor_tables",
        "torch",
        "nn.Module._parameters / nn.Module._buffers",
        (
            "launcher.models.replace_tensors",
            "launcher.sharded_load.build_partitioned",
        ),
        "the dicts holding a module's own parameters and buffers; assigning an entry replaces "
        "the tensor the module uses (tied modules share the same object)",
        "2.13.0",
    ),
    Internal(
        "module_forward_hooks",
        "torch",
        "nn.Module._forward_hooks",
        ("launcher.adapters.remove_bottleneck_adapters",),
        "hook id -> hook function of register_forward_hook; deleting an entry removes the hook",
        "2.13.0",
    ),
    Internal(
        "dynamo_before_zero_init",
        "torch",
        "import torch._dynamo",
        ("launcher.sharded_load.build_partitioned",),
        "importing torch._dynamo before deepspeed.zero.Init patches tensor constructors keeps "
        "its lazy import from failing inside zero.Init",
        "2.13.0",
    ),
    Internal(
        "no_split_modules",
        "transformers",
        "PreTrainedModel._no_split_modules",
        ("launcher.models.transformer_blocks",),
        "class names of a model's transformer blocks (e.g. GPT2Block, LlamaDecoderLayer)",
        "5.23.0",
    ),
    Internal(
        "auto_model_mapping",
        "transformers",
        "AutoModelFor*._model_mapping",
        ("launcher.models.load_structure",),
        "config class -> model class of an Auto class, without loading weights",
        "5.23.0",
    ),
    Internal(
        "from_config_private",
        "transformers",
        "PreTrainedModel._from_config(config, dtype=...)",
        ("launcher.models.load_structure",),
        "builds a model from its config in a dtype, under a torch.device('meta') context",
        "5.23.0",
    ),
    Internal(
        "hf_deepspeed_weak_ref",
        "transformers",
        "transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref",
        ("launcher.models._unpartitioned_construction",),
        "the registered HfDeepSpeedConfig (unset_hf_deepspeed_config clears it); while set, "
        "models are built inside zero.Init; restoring the saved value registers it again",
        "5.23.0",
    ),
    Internal(
        "is_hf_initialized",
        "transformers",
        "tensor attribute _is_hf_initialized",
        ("launcher.models._initialize_missing", "launcher.models._swap_for_placeholders"),
        "PreTrainedModel.initialize_weights leaves tensors flagged _is_hf_initialized alone",
        "5.23.0",
    ),
    Internal(
        "weight_renaming",
        "transformers",
        "transformers.conversion_mapping.get_model_conversion_mapping, "
        "transformers.core_model_loading.WeightConverter / rename_source_key",
        ("launcher.models._checkpoint_keys",),
        "rename_source_key(key, renamings, converters, base_model_prefix, state) -> (model key, "
        "converter or None): the checkpoint key -> model key mapping from_pretrained applies",
        "5.23.0",
    ),
    Internal(
        "quantizer_marker",
        "transformers",
        "PreTrainedModel.hf_quantizer / is_quantized / config.quantization_config",
        ("launcher.models.forget_gguf_origin",),
        "after a GGUF load these mark the model as quantized; clearing them lets "
        "save_pretrained write the dequantized weights",
        "5.23.0",
    ),
    Internal(
        "engine_universal_flag",
        "deepspeed",
        "DeepSpeedEngine._config.load_universal_checkpoint",
        ("launcher.strategies.DeepSpeedStrategy._load_resharded",),
        "set on the engine's config, load_checkpoint reads a universal checkpoint",
        "0.19.8",
    ),
    Internal(
        "engine_basic_optimizer",
        "deepspeed",
        "DeepSpeedEngine.basic_optimizer",
        (
            "launcher.strategies.DeepSpeedStrategy.local_state_bytes",
            "launcher.sharded_load._gather_trainable_state",
            "launcher.sharded_load._start_adam_state",
        ),
        "the torch optimizer the engine wraps (its param groups are the fp32 partitions and "
        "its state the Adam moments this rank holds)",
        "0.19.8",
    ),
    Internal(
        "zero3_fp32_partitions",
        "deepspeed",
        "DeepSpeedZeroOptimizer_Stage3.fp32_partitioned_groups_flat",
        ("launcher.sharded_load._start_adam_state",),
        "this rank's flat fp32 master partitions, one per sub-group: the tensors the wrapped "
        "Adam keys its state by; an Adam state made for each before the first step is the one "
        "safe_set_full_optimizer_state fills and the next step uses (torch's AdamW keeps step, "
        "exp_avg and exp_avg_sq)",
        "0.19.8",
    ),
    Internal(
        "ds_to_universal_main",
        "deepspeed",
        "deepspeed.checkpoint.ds_to_universal.main(args)",
        ("launcher.strategies.DeepSpeedStrategy._load_resharded",),
        "the conversion script's entry point, called with an argparse.Namespace of its options "
        "(input_folder, output_folder, num_extract_workers, num_merge_workers, "
        "keep_temp_folder, strict, inject_missing_state)",
        "0.19.8",
    ),
    Internal(
        "zero3_param_attributes",
        "deepspeed",
        "ZeRO-3 parameter attributes ds_tensor / ds_numel / ds_id",
        (
            "launcher.strategies.local_state_bytes",
            "launcher.strategies.resident_parameter_bytes",
            "launcher.sharded_load._cast_parameters",
            "launcher.finetune.count_parameters",
        ),
        "a partitioned parameter's local partition, its full size, and that it is partitioned",
        "0.19.8",
    ),
    Internal(
        "peft_auxiliary_wrapper",
        "peft",
        "peft.utils.other.AuxiliaryTrainingWrapper.unload_and_optionally_merge_module"
        "(merge, safe_merge, adapter_names)",
        ("launcher.export._unwrap_peft",),
        "modules_to_save wrappers (trained heads) give back the plain trained module",
        "0.21.2",
    ),
    Internal(
        "peft_ia3_mappings",
        "peft",
        "peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / "
        "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING",
        ("launcher.finetune.ia3_target_modules",),
        "model_type -> IA3 target / feed-forward module names, for architectures ftlaunch "
        "does not list itself",
        "0.21.2",
    ),
    Internal(
        "bnb_cpu_repack_switch",
        "bitsandbytes",
        "bitsandbytes.nn.Linear4bit.support_avx512bf16_for_cpu",
        ("launcher.models.keep_one_four_bit_kernel",),
        "False keeps a Linear4bit from repacking its weight in place (and computing with another "
        "kernel) on a no-grad CPU forward where the CPU has AVX512-BF16",
        "0.50.2",
    ),
    Internal(
        "ray_private_loggers",
        "ray",
        "loggers ray._private.runtime_env.packaging, ray.data._internal.progress and the job "
        "client's ray.dashboard.modules.dashboard_sdk and ray.dashboard.modules.job.sdk",
        ("launcher.targets.ray_jobs", "launcher.batch"),
        "the modules whose log records ftlaunch quiets, by logger name",
        "2.60.0",
    ),
    Internal(
        "ray_driver_error_printer",
        "ray",
        "ray._private.worker.print_to_stdstream, as called by listen_error_messages",
        ("launcher.raysession.restate_cluster_errors",),
        "the driver's error-listener thread prints each error the cluster publishes (a node "
        "marked dead, a worker killed for memory) through this module-level function, as "
        "data with pid 'raylet' and the message in 'lines', whatever log_to_driver says; "
        "replacing the module attribute reroutes them",
        "2.60.0",
    ),
    Internal(
        "ray_train_checkpoint_storage",
        "ray",
        "ray.train.get_context().get_storage().persist_current_checkpoint (DeveloperAPI)",
        ("launcher.checkpointing.CheckpointWriter.store",),
        "copies a local checkpoint to <experiment>/<name> on the run's storage filesystem and "
        "returns the stored Checkpoint: what ray.train.report does without an upload function "
        "(ftlaunch's upload function adds a completion marker after it)",
        "2.60.0",
    ),
)


def load_dcp_without_process_group(directory: Path, keys: set[str]) -> dict[str, Any]:
    """The top-level `keys` of a torch.distributed.checkpoint directory, read whole in this
    process (no process group): torch has no public call for it."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(
        state,
        storage_reader=FileSystemReader(str(directory)),
        planner=_EmptyStateDictLoadPlanner(keys=keys),
        no_dist=True,
    )
    return state
