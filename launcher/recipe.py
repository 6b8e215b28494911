"""The recipe: a typed, validated description of one fine-tuning job.

The schema is the contract users write against, so every model forbids unknown keys and every
field carries a docstring that becomes help text and a JSON Schema description. Loading a recipe
(`load_recipe`) resolves `base:` inheritance and `--set` overrides, validates the result, and
reports every problem at once with the file, line and column it came from.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, floats must be finite."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        allow_inf_nan=False,
        validate_default=True,
    )


# ----------------------------------------------------------------------------------- model


class ModelConfig(Section):
    name_or_path: str = Field(min_length=1)
    """Hugging Face hub id, a local model directory, or pkg:<package>/<dir> for a model shipped
    inside an installed Python package."""
    task: Literal["causal_lm", "classification"] = "causal_lm"
    """What the model learns: next-token prediction or sequence classification."""
    labels: list[str] | None = Field(default=None, min_length=2)
    """Classification: label names, in id order (required for classification)."""
    gguf_file: str | None = None
    """Optional GGUF file inside name_or_path; its weights are dequantized on load."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype on load; auto picks bfloat16 on GPUs that support it, else float32."""
    trust_remote_code: bool = False
    """Allow model code from the model directory or hub repository to run."""


# ------------------------------------------------------------------------------------ data


class DataSource(Section):
    path: str = Field(min_length=1)
    """A file, directory or hf:<dataset>[:<config>]:<split> source."""
    weight: float = Field(default=1.0, gt=0)
    """Relative sampling weight of this source in the mix."""
    name: str | None = None
    """Name used for this source's metrics (default: derived from the path)."""


DataSpec = str | list[DataSource]


class SplitConfig(Section):
    validation: float = Field(default=0.1, ge=0, lt=1)
    """Fraction of train carved out as validation when no validation data is given."""
    test: float = Field(default=0.0, ge=0, lt=1)
    """Fraction of train carved out as test when no test data is given."""
    seed: int = 0
    """Seed of the deterministic split."""


class InstructionFields(Section):
    instruction: str = "instruction"
    """Field holding the instruction."""
    input: str = "input"
    """Field holding the optional input (may be empty or missing per row)."""
    output: str = "output"
    """Field holding the response the model learns to produce."""


class DataConfig(Section):
    train: DataSpec
    """Training data: a local .jsonl/.json/.csv/.tsv/.parquet/.txt file or directory, an
    hf:<dataset>[:<config>]:<split> source, or a list of {path, weight} to mix several."""
    validation: DataSpec | None = None
    """Validation data, same forms; when absent it is carved from train with `split`."""
    test: DataSpec | None = None
    """Test data, same forms; when absent it is carved from train with `split`."""
    split: SplitConfig = SplitConfig()
    """Fractions carved from train for splits that are not given."""
    format: Literal["text", "instruction", "classification"] = "text"
    """How rows become examples: raw text, instruction/response pairs, or labelled text."""
    text_field: str = "text"
    """Field holding the text (text and classification formats)."""
    label_field: str = "label"
    """Field holding the label (classification format)."""
    instruction_fields: InstructionFields = InstructionFields()
    """Instruction format: the names of the instruction, input and output fields."""
    prompt_template: str | None = None
    """Instruction format: template with {instruction} and {input}; loss only on the response."""
    max_length: int = Field(default=512, gt=0)
    """Maximum tokens per example; longer text is chunked (text) or truncated."""
    packing: bool = False
    """Causal LM text: pack short examples into full max_length sequences."""
    balance: bool = False
    """Classification: undersample the training split to equal class counts."""


# -------------------------------------------------------------------------------- finetune


class LoraConfig(Section):
    r: int = Field(default=8, gt=0)
    """Rank of the low-rank update."""
    alpha: float = Field(default=16, gt=0)
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: Literal["auto"] | list[str] = "auto"
    """Module names to adapt; auto picks the attention/MLP projections of the architecture."""


class AdapterConfig(Section):
    reduction_factor: int = Field(default=16, gt=0)
    """Bottleneck width = hidden size / reduction_factor."""
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """Activation between the down- and up-projection."""


class FinetuneConfig(Section):
    method: Literal["full", "lora", "adapter", "prefix", "prompt", "ia3", "bitfit", "freeze"] = (
        "full"
    )
    """Which parameters train."""
    lora: LoraConfig = LoraConfig()
    """method lora: rank, alpha, dropout, target modules."""
    adapter: AdapterConfig = AdapterConfig()
    """method adapter: bottleneck adapters after each block's MLP."""
    num_virtual_tokens: int = Field(default=20, gt=0)
    """method prefix / prompt: number of virtual tokens."""
    trainable_layers: int = Field(default=1, gt=0)
    """method freeze: the last N blocks (plus final norm and head) train."""


# --------------------------------------------------------------------------------- distill


class TeacherConfig(Section):
    name_or_path: str = Field(min_length=1)
    """Teacher model: hub id, local directory, or pkg:<package>/<dir>."""
    gguf_file: str | None = None
    """Optional GGUF file inside name_or_path."""


class DistillConfig(Section):
    teacher: TeacherConfig
    """The frozen model whose outputs the student learns from."""
    temperature: float = Field(default=2.0, gt=0)
    """Softmax temperature applied to both teacher and student logits."""
    alpha: float = Field(default=0.5, ge=0, le=1)
    """loss = alpha * task loss + (1 - alpha) * T^2 * KL(teacher || student)."""
    mode: Literal["online", "offline"] = "online"
    """online: teacher runs beside the student; offline: teacher top-k log-probs are precomputed."""
    top_k: int = Field(default=32, gt=0)
    """offline mode: how many teacher log-probabilities are stored per token. Training takes
    the KL over these k entries, teacher and student both renormalised over them (the teacher's
    mass outside its top-k is left out)."""
    init_student_from_teacher: list[int] | None = None
    """Initialise the student from these teacher layers (e.g. [0, 2, 4]), as DistilBERT was:
    the teacher's config with only these blocks, their weights and every non-block weight
    (embeddings, final norm, head) copied; model.name_or_path then only names the tokenizer."""
    cache_dir: str = "~/.cache/ftlaunch/distill"
    """offline mode / init_student_from_teacher: where teacher outputs and students built from
    teacher layers are kept, keyed by a hash of teacher, data and tokenization settings, and
    reused by later runs. Multi-node clusters need a path every node shares."""


# ----------------------------------------------------------------------------------- train


class AdversarialConfig(Section):
    method: Literal["fgm"] = "fgm"
    """Fast gradient method on the input embeddings."""
    epsilon: float = Field(default=1.0, gt=0)
    """Size of the perturbation along the normalized embedding gradient."""


StepsOrEpoch = Literal["epoch"] | Annotated[int, Field(gt=0)]


class TrainConfig(Section):
    epochs: int = Field(default=1, gt=0)
    """Passes over the training data."""
    max_steps: int | None = Field(default=None, gt=0)
    """Stop after this many optimizer steps (overrides epochs when reached first)."""
    batch_size: int = Field(default=8, gt=0)
    """Examples per worker per micro-step."""
    grad_accum: int = Field(default=1, gt=0)
    """Micro-steps accumulated per optimizer step."""
    lr: float = Field(default=2.0e-5, gt=0)
    """Peak learning rate of AdamW."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay (never applied to biases and norms)."""
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    """Fraction of the steps spent warming the learning rate up linearly."""
    warmup_steps: int | None = Field(default=None, ge=0)
    """Optimizer steps spent warming the learning rate up linearly (instead of warmup_ratio)."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warmup."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value (null: no clipping)."""
    seed: int = 0
    """Seed for model init, data order and dropout."""
    eval_every: StepsOrEpoch = "epoch"
    """Evaluate on the validation split every epoch or every N optimizer steps."""
    eval_on_start: bool = False
    """Evaluate once before the first step (step 0), to see where training started from."""
    log_every: int = Field(default=10, gt=0)
    """Report training metrics every N optimizer steps."""
    adversarial: AdversarialConfig | None = None
    """Adversarial training on the input embeddings, e.g. {method: fgm, epsilon: 1.0}."""
    max_failures: int = Field(default=0, ge=-1)
    """Worker failures survived by restarting from the last checkpoint (-1: unlimited)."""


# -------------------------------------------------------------------------------- strategy


class StrategyConfig(Section):
    name: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    """How the model is spread across workers."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """deepspeed: ZeRO stage."""
    offload: Literal["none", "optimizer", "all"] = "none"
    """deepspeed / fsdp: move optimizer state (and parameters with all) to CPU memory."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs that support it, fp32 on CPU."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass to save memory."""
    deepspeed_config: dict[str, Any] = {}
    """deepspeed: raw DeepSpeed keys merged over the generated config."""


# --------------------------------------------------------------------------------- scaling


class ScalingConfig(Section):
    num_workers: int = Field(default=1, gt=0)
    """Training workers (one per GPU when GPUs are used)."""
    use_gpu: Literal["auto"] | bool = "auto"
    """auto: use GPUs when the Ray cluster has them."""
    cpus_per_worker: int = Field(default=1, gt=0)
    """CPUs reserved by each training worker."""


# ------------------------------------------------------------------------------ checkpoint


class ExportConfig(Section):
    merge_lora: bool = True
    """PEFT methods that can merge (lora, ia3): also write the merged model to model/."""


class CheckpointConfig(Section):
    storage_path: str = "./runs"
    """Where run directories go: a local path or an s3:// gs:// URI."""
    every: StepsOrEpoch = "epoch"
    """Checkpoint every epoch or every N optimizer steps."""
    keep: int | None = Field(default=2, gt=0)
    """How many checkpoints to keep (null: all)."""
    metric: str | None = "eval_loss"
    """Metric that picks the best checkpoint (null: the last one)."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher `metric` is better."""
    export: ExportConfig = ExportConfig()
    """How the final model is exported."""


# ------------------------------------------------------------------------- evaluate / generate

MetricName = Literal["loss", "perplexity", "accuracy", "f1", "precision", "recall", "exact_match"]


class EvaluateConfig(Section):
    data: str | None = None
    """Data to evaluate on (default: the test split, else validation)."""
    metrics: list[MetricName] = ["loss"]
    """Metrics computed by the batch evaluation."""
    batch_size: int = Field(default=32, gt=0)
    """Rows per batch in the evaluation actors."""


class GenerateConfig(Section):
    prompts: str | None = None
    """File of prompts: .jsonl with a `prompt` field, or .txt with one prompt per line."""
    max_new_tokens: int = Field(default=64, gt=0)
    """Tokens generated per prompt at most (generation also stops at EOS)."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature (do_sample only)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling threshold (do_sample only)."""
    num_return_sequences: int = Field(default=1, gt=0)
    """Outputs per prompt."""


# -------------------------------------------------------------------------------- tracking


class MlflowConfig(Section):
    tracking_uri: str | None = None
    """MLflow tracking URI (default: ./mlruns in the run directory)."""
    experiment: str | None = None
    """Experiment name (default: the recipe name)."""


class WandbConfig(Section):
    project: str
    """Weights & Biases project."""
    entity: str | None = None
    """Team or user."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """offline writes the run locally for a later `wandb sync`."""


class TrackingConfig(Section):
    tensorboard: bool = False
    """Write TensorBoard event files to <run>/tensorboard."""
    mlflow: MlflowConfig | None = None
    """Log to MLflow."""
    wandb: WandbConfig | None = None
    """Log to Weights & Biases."""


# --------------------------------------------------------------------------------- cluster


class ClusterConfig(Section):
    target: Literal["local", "ray", "kuberay"] = "local"
    """Where the driver starts: embedded Ray, an existing Ray cluster, or KubeRay."""
    address: str | None = None
    """ray: the cluster's dashboard address, e.g. http://head:8265."""
    image: str | None = None
    """kuberay: container image of the Ray nodes."""
    namespace: str = "default"
    """kuberay: Kubernetes namespace."""
    gpus_per_worker: int = Field(default=1, ge=0)
    """kuberay: GPUs requested by each worker pod."""
    env: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = []
    """Names of environment variables the job needs besides HF_TOKEN, WANDB_API_KEY and AWS_*.
    Passed by name only: a Ray cluster takes the values from its nodes' environment, KubeRay
    from the Secret `cluster.secret`; values never go into a request or a file."""
    pip: list[str] = []
    """ray / kuberay: extra pip requirements installed into the job's runtime environment."""
    secret: str = Field(default="ftlaunch-secrets", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """kuberay: Secret whose keys (named like the variables) hold the environment values."""
    head_memory: str = Field(default="16Gi", pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
    """kuberay: memory of the head pod, which runs the driver (export needs the full model)."""
    worker_memory: str = Field(default="32Gi", pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
    """kuberay: memory of each worker pod."""
    ttl_seconds_after_finished: int = Field(default=600, ge=0)
    """kuberay: seconds the finished RayJob's cluster is kept before it is deleted."""
    active_deadline_seconds: int | None = Field(default=None, gt=0)
    """kuberay: fail the RayJob when it runs longer than this (null: no limit)."""
    backoff_limit: int = Field(default=0, ge=0)
    """kuberay: how many times a failed RayJob is retried on a new cluster."""


# ---------------------------------------------------------------------------------- recipe


class Recipe(Section):
    """A fine-tuning job: model, data, method, training, strategy, scale, outputs."""

    base: str | None = None
    """Another recipe this one extends (deep merge; path relative to this file)."""
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Run name; the run directory is <checkpoint.storage_path>/<name>-<timestamp>."""
    model: ModelConfig
    """The model to fine-tune."""
    data: DataConfig
    """Where the data comes from and how it becomes examples."""
    finetune: FinetuneConfig = FinetuneConfig()
    """Which parameters train."""
    distill: DistillConfig | None = None
    """Knowledge distillation from a teacher (present = distillation)."""
    train: TrainConfig = TrainConfig()
    """Optimisation loop."""
    strategy: StrategyConfig = StrategyConfig()
    """How the model lives across workers."""
    scaling: ScalingConfig = ScalingConfig()
    """How many workers, with which resources."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Where checkpoints go, how often, which one is exported."""
    evaluate: EvaluateConfig | None = None
    """Batch evaluation after training."""
    generate: GenerateConfig | None = None
    """Batch generation after training (causal LM)."""
    tracking: TrackingConfig = TrackingConfig()
    """Experiment trackers fed from rank 0."""
    cluster: ClusterConfig = ClusterConfig()
    """Where the job runs."""


# ------------------------------------------------------------------------------ rules

METHOD_KEYS = {
    "lora": "lora",
    "adapter": "adapter",
    "num_virtual_tokens": ("prefix", "prompt"),
    "trainable_layers": "freeze",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where it is, which field, what is wrong."""

    path: str
    message: str
    where: str | None = None

    def render(self) -> str:
        prefix = f"{self.where}: " if self.where else ""
        field = f"{self.path}: " if self.path else ""
        return f"{prefix}{field}{self.message}"


class RecipeError(Exception):
    """A recipe that cannot run; carries every problem found."""

    def __init__(self, problems: Sequence[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        head = f"invalid recipe {self.source}" if self.source else "invalid recipe"
        n = len(self.problems)
        lines = [f"{head}: {n} problem{'s' if n != 1 else ''}"]
        lines += [f"  - {p.render()}" for p in self.problems]
        return "\n".join(lines)


def _set(section: BaseModel) -> set[str]:
    return set(section.model_fields_set)


def inapplicable_fields(recipe: Recipe) -> dict[str, str]:
    """Fields that would do nothing for this recipe, each with the reason.

    Setting one of them explicitly is an error; the resolved recipe leaves them out.
    """
    out: dict[str, str] = {}
    s = recipe.strategy
    if s.name != "deepspeed":
        out["strategy.zero_stage"] = f"only applies to strategy.name: deepspeed (got {s.name})"
        out["strategy.deepspeed_config"] = (
            f"only applies to strategy.name: deepspeed (got {s.name})"
        )
    if s.name == "ddp":
        out["strategy.offload"] = "only applies to strategy.name: deepspeed or fsdp (got ddp)"
    method = recipe.finetune.method
    for key, methods in METHOD_KEYS.items():
        allowed = (methods,) if isinstance(methods, str) else methods
        if method not in allowed:
            out[f"finetune.{key}"] = (
                f"only applies to finetune.method: {' or '.join(allowed)} (got {method})"
            )
    task = recipe.model.task
    if task != "classification":
        out["model.labels"] = f"only applies to model.task: classification (got {task})"
        out["data.label_field"] = f"only applies to model.task: classification (got {task})"
        out["data.balance"] = f"only applies to model.task: classification (got {task})"
    fmt = recipe.data.format
    if fmt != "instruction":
        for key in ("instruction_fields", "prompt_template"):
            out[f"data.{key}"] = f"only applies to data.format: instruction (got {fmt})"
    if fmt == "instruction":
        out["data.text_field"] = "does nothing with data.format: instruction"
    if fmt != "text":
        out["data.packing"] = f"only applies to data.format: text (got {fmt})"
    if recipe.train.warmup_steps is not None:
        out["train.warmup_ratio"] = "does nothing when train.warmup_steps is set (steps win)"
    if recipe.distill is not None and recipe.distill.mode != "offline":
        out["distill.top_k"] = "only applies to distill.mode: offline"
    if recipe.distill is not None and not (
        recipe.distill.mode == "offline" or recipe.distill.init_student_from_teacher
    ):
        out["distill.cache_dir"] = (
            "only applies to distill.mode: offline or distill.init_student_from_teacher"
        )
    if recipe.generate is not None and not recipe.generate.do_sample:
        out["generate.temperature"] = "only applies with generate.do_sample: true"
        out["generate.top_p"] = "only applies with generate.do_sample: true"
    if recipe.cluster.target != "ray":
        out["cluster.address"] = (
            f"only applies to cluster.target: ray (got {recipe.cluster.target})"
        )
    if recipe.cluster.target != "kuberay":
        for key in (
            "namespace",
            "gpus_per_worker",
            "secret",
            "head_memory",
            "worker_memory",
            "ttl_seconds_after_finished",
            "active_deadline_seconds",
            "backoff_limit",
        ):
            out[f"cluster.{key}"] = (
                f"only applies to cluster.target: kuberay (got {recipe.cluster.target})"
            )
    return out


def _explicitly_set(recipe: Recipe, dotted: str) -> bool:
    obj: Any = recipe
    parts = dotted.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return parts[-1] in obj.model_fields_set


def reported_metrics(recipe: Recipe) -> set[str]:
    """Metric names the training run reports, for checking `checkpoint.metric`."""
    metrics = {"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"}
    if recipe.distill is not None:
        metrics |= {"task_loss", "distill_loss"}
    if has_validation(recipe):
        metrics |= {"eval_loss"}
        metrics |= (
            {"eval_perplexity"}
            if recipe.model.task == "causal_lm"
            else {"eval_accuracy", "eval_f1"}
        )
    return metrics


def has_validation(recipe: Recipe) -> bool:
    """Whether the run has validation data (given, or carved from train)."""
    return recipe.data.validation is not None or recipe.data.split.validation > 0


def check_rules(recipe: Recipe) -> list[Problem]:
    """Cross-field rules the schema alone cannot express; every violation is reported."""
    problems = [
        Problem(path, f"{reason}; remove it")
        for path, reason in inapplicable_fields(recipe).items()
        if _explicitly_set(recipe, path)
    ]
    m, d, t, s = recipe.model, recipe.data, recipe.train, recipe.strategy
    if m.task == "classification" and not m.labels:
        problems.append(
            Problem(
                "model.labels", "required for model.task: classification (label names in id order)"
            )
        )
    if m.labels and len(set(m.labels)) != len(m.labels):
        problems.append(Problem("model.labels", "label names must be unique"))
    if m.task == "classification" and d.format != "classification":
        problems.append(
            Problem(
                "data.format",
                f"must be classification for model.task: classification (got {d.format})",
            )
        )
    if m.task == "causal_lm" and d.format == "classification":
        problems.append(
            Problem("data.format", "classification data needs model.task: classification")
        )
    if recipe.evaluate is not None:
        # The batch stage checks this too, but only after training; say it before.
        allowed = (
            {"loss", "accuracy", "precision", "recall", "f1"}
            if m.task == "classification"
            else {"loss", "perplexity", "exact_match"}
        )
        for metric in recipe.evaluate.metrics:
            if metric not in allowed:
                problems.append(
                    Problem(
                        "evaluate.metrics",
                        f"{metric} is not a {m.task} metric; allowed: {', '.join(sorted(allowed))}",
                    )
                )
        if "exact_match" in recipe.evaluate.metrics and d.format != "instruction":
            problems.append(
                Problem(
                    "evaluate.metrics",
                    "exact_match needs data.format: instruction (a prompt and a reference "
                    "output per row)",
                )
            )
    if d.split.validation + d.split.test >= 1:
        problems.append(
            Problem(
                "data.split",
                f"validation + test fractions must sum below 1 "
                f"(got {d.split.validation} + {d.split.test})",
            )
        )
    for key in ("eval_every",):
        value = getattr(t, key)
        if isinstance(value, int) and value <= 0:
            problems.append(
                Problem(f"train.{key}", f"must be 'epoch' or a positive integer (got {value})")
            )
    every = recipe.checkpoint.every
    if isinstance(every, int) and every <= 0:
        problems.append(
            Problem("checkpoint.every", f"must be 'epoch' or a positive integer (got {every})")
        )
    metric = recipe.checkpoint.metric
    if metric is not None:
        known = reported_metrics(recipe)
        if metric not in known:
            problems.append(
                Problem(
                    "checkpoint.metric",
                    f"{metric!r} is not reported by this run; choose one of "
                    f"{', '.join(sorted(known))} or null",
                )
            )
    if recipe.generate is not None and m.task != "causal_lm":
        problems.append(Problem("generate", "generation needs model.task: causal_lm"))
    if s.name == "fsdp" and s.offload == "optimizer":
        problems.append(
            Problem(
                "strategy.offload",
                "fsdp offloads parameters and optimizer together: use all or none",
            )
        )
    gpu = recipe.scaling.use_gpu
    if s.mixed_precision in ("fp16", "bf16") and gpu is False and s.mixed_precision == "fp16":
        problems.append(
            Problem(
                "strategy.mixed_precision",
                "fp16 needs GPUs (scaling.use_gpu is false); use no or bf16",
            )
        )
    if m.dtype == "float16" and gpu is False:
        problems.append(
            Problem("model.dtype", "float16 weights need GPUs; use float32 or bfloat16 on CPU")
        )
    if s.offload != "none" and s.name == "deepspeed" and s.zero_stage == 0:
        problems.append(Problem("strategy.offload", "needs zero_stage 1, 2 or 3 (got 0)"))
    if recipe.cluster.target == "ray" and not recipe.cluster.address:
        problems.append(
            Problem("cluster.address", "required for cluster.target: ray (http://head:8265)")
        )
    if recipe.distill is not None:
        dist = recipe.distill
        if dist.init_student_from_teacher is not None:
            layers = dist.init_student_from_teacher
            if not layers or any(i < 0 for i in layers) or len(set(layers)) != len(layers):
                problems.append(
                    Problem(
                        "distill.init_student_from_teacher",
                        "must be a non-empty list of distinct teacher layer indices >= 0",
                    )
                )
    if t.adversarial is not None and s.name != "ddp":
        problems.append(
            Problem(
                "train.adversarial",
                f"FGM perturbs full embedding weights, which {s.name} shards; use strategy.name: ddp",
            )
        )
    if t.adversarial is not None and recipe.finetune.method != "full":
        problems.append(
            Problem(
                "train.adversarial",
                "FGM moves the input embeddings along their gradient, which finetune.method "
                f"{recipe.finetune.method} freezes; use finetune.method: full",
            )
        )
    if s.name == "deepspeed" and s.deepspeed_config:
        from launcher.strategies import check_deepspeed_overrides

        problems += [Problem("", message) for message in check_deepspeed_overrides(recipe)]
    return problems


# ------------------------------------------------------------------------------ loading

ALIASES = {
    "learning_rate": "train.lr",
    "lr": "train.lr",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "warmup_steps": "train.warmup_steps",
    "num_warmup_steps": "train.warmup_steps",
    "lr_scheduler_type": "train.scheduler",
    "model_name_or_path": "model.name_or_path",
    "base_model": "model.name_or_path",
    "sequence_len": "data.max_length",
    "max_seq_length": "data.max_length",
    "output_dir": "checkpoint.storage_path",
    "num_gpus": "scaling.num_workers",
    "zero_stage": "strategy.zero_stage",
    "lora_r": "finetune.lora.r",
    "lora_alpha": "finetune.lora.alpha",
    "lora_dropout": "finetune.lora.dropout",
}


@dataclass
class _Doc:
    """A YAML document as plain data plus where each key came from."""

    data: Any
    marks: dict[tuple, str]


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if value is None:
        return "nothing (null)"
    if isinstance(value, str) and not value.strip():
        return "an empty string"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


class _RecipeLoader(yaml.SafeLoader):
    """The safe loader (plain values only, no Python object tags), plus YAML 1.2 floats.

    PyYAML follows YAML 1.1, where `3e-5` (no dot) is a string; editors and JSON Schema tools
    read it as a number, and so do recipes.
    """


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_YAML_NODES = 100_000  # far above any real recipe; stops alias bombs before they expand


def _mark(source: str, node: yaml.Node) -> str:
    return f"{source}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def _walk_marks(root: yaml.Node, source: str, marks: dict[tuple, str]) -> list[Problem]:
    """Record file:line:col for every key and list item; report duplicate keys.

    Walks the composed node graph (before construction), so `<<:` merge keys are still visible:
    keys pulled in by a merge are not duplicates of the keys written next to them.
    """
    problems: list[Problem] = []
    visited = 0

    def walk(node: yaml.Node, path: tuple, from_merge: bool) -> None:
        nonlocal visited
        visited += 1
        if visited > MAX_YAML_NODES:
            raise RecipeError(
                [
                    Problem(
                        "", f"recipe expands to more than {MAX_YAML_NODES} values (YAML aliases?)"
                    )
                ],
                source,
            )
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                marks.setdefault((*path, i), _mark(source, item))
                walk(item, (*path, i), from_merge)
        elif isinstance(node, yaml.MappingNode):
            walk_mapping(node, path, from_merge)

    def walk_mapping(node: yaml.MappingNode, path: tuple, from_merge: bool) -> None:
        seen: dict[str, str] = {}
        merged: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                merged += (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                walk(value_node, path, from_merge)
                continue
            key, where = key_node.value, _mark(source, key_node)
            if key in seen and not from_merge:
                problems.append(
                    Problem(
                        _dotted((*path, key)),
                        f"duplicate key (first at {seen[key]}); keep one",
                        where,
                    )
                )
            seen[key] = where
            # Explicit keys win over merged ones, in the data and in the marks.
            if from_merge:
                marks.setdefault((*path, key), where)
            else:
                marks[(*path, key)] = where
            walk(value_node, (*path, key), from_merge)
        for source_node in merged:
            if isinstance(source_node, yaml.MappingNode):
                walk_mapping(source_node, path, True)

    marks[()] = _mark(source, root)
    walk(root, (), False)
    return problems


def _dotted(loc: Sequence[Any]) -> str:
    """A location as a dotted path; list positions as [i]: data.train[0].path."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


MAX_RECIPE_BYTES = 4 * 2**20  # recipes are a few kilobytes; data never goes inline


def _read_yaml(path: Path) -> _Doc:
    source = str(path)
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a name too long, or with a NUL byte
        exists = False
    if not exists:
        raise RecipeError(
            [Problem("", "file not found; give the path of a YAML recipe", source)], source
        )
    if path.is_dir():
        raise RecipeError(
            [Problem("", "is a directory; give the path of a YAML recipe file", source)], source
        )
    if not path.is_file():
        raise RecipeError(
            [
                Problem(
                    "", "not a regular file (a device or pipe?); give a YAML recipe file", source
                )
            ],
            source,
        )
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(
                [Problem("", f"larger than {MAX_RECIPE_BYTES // 2**20} MiB; not a recipe", source)],
                source,
            )
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            [Problem("", f"not UTF-8 text (byte {exc.start}); recipes are UTF-8 YAML", source)],
            source,
        ) from None
    except OSError as exc:
        raise RecipeError(
            [Problem("", f"cannot read the file: {exc.strerror or exc}", source)], source
        ) from None
    return parse_yaml(text, source)


def _yaml_error(exc: yaml.YAMLError, source: str) -> Problem:
    """One located problem for a YAML syntax error or a tag the safe loader refuses."""
    if isinstance(exc, yaml.reader.ReaderError):
        return Problem(
            "",
            f"character #x{exc.character:04x} is not allowed in YAML (at character "
            f"{exc.position}); recipes are printable UTF-8 text",
            source,
        )
    if not isinstance(exc, yaml.MarkedYAMLError):
        return Problem("", f"YAML error: {exc}", source)
    mark = exc.problem_mark or exc.context_mark
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
    problem = exc.problem or ""
    if isinstance(exc, yaml.constructor.ConstructorError) and "constructor for the tag" in problem:
        tag = problem.rsplit("tag", 1)[-1].strip(" '")
        kind = "Python object tags are" if "python/" in tag else f"the tag {tag} is"
        return Problem(
            "",
            f"{kind} not allowed: recipes are loaded safely and hold plain mappings, lists, "
            "strings, numbers, booleans and null",
            where,
        )
    context = f" ({exc.context.strip()}" if exc.context else ""
    if context and exc.context_mark and exc.context_mark is not mark:
        context += f" at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1}"
    context += ")" if context else ""
    return Problem("", f"YAML syntax error: {problem}{context}", where)


MAX_FLOW_DEPTH = 200


def _too_deep(text: str, source: str) -> Problem | None:
    """Refuse absurdly nested [ { before parsing: PyYAML's scanner slows down with the square
    of the nesting depth, so a few kilobytes could otherwise stall `validate` for minutes."""
    depth, line, column = 0, 1, 0
    for char in text:
        column += 1
        if char == "\n":
            line, column = line + 1, 0
        elif char in "[{":
            depth += 1
            if depth > MAX_FLOW_DEPTH:
                return Problem(
                    "",
                    f"YAML nested more than {MAX_FLOW_DEPTH} levels deep; "
                    "a recipe is a few levels of sections",
                    f"{source}:{line}:{column}",
                )
        elif char in "]}":
            depth = max(depth - 1, 0)
    return None


def parse_yaml(text: str, source: str) -> _Doc:
    """Parse YAML safely, keeping the position of every key."""
    too_deep = _too_deep(text, source)
    if too_deep is not None:
        raise RecipeError([too_deep], source)
    loader = None
    marks: dict[tuple, str] = {}
    try:
        loader = _RecipeLoader(text)  # checks the characters first: may raise already
        node = loader.get_single_node()
        problems = _walk_marks(node, source, marks) if node is not None else []
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise RecipeError([_yaml_error(exc, source)], source) from None
    except RecursionError:
        raise RecipeError(
            [Problem("", "YAML nested too deeply; a recipe is a few levels of sections")], source
        ) from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise RecipeError(
            [
                Problem(
                    "",
                    "a recipe is a mapping of sections (name:, model:, data:, ...); "
                    f"got {_describe(data)}",
                    _mark(source, node) if node is not None else f"{source}:1:1",
                )
            ],
            source,
        )
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        problems.append(
            Problem("", f"keys must be strings; got {bad[0]!r}", marks.get((bad[0],), source))
        )
    if problems:
        raise RecipeError(sort_problems(problems), source)
    return _Doc(data, marks)


def _deep_merge(base: Any, over: Any) -> Any:
    """Mappings merge key by key; anything else in `over` replaces what `base` had."""
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            merged[key] = _deep_merge(base.get(key), value) if key in base else value
        return merged
    return over


def _load_with_bases(path: Path, chain: tuple[Path, ...] = ()) -> _Doc:
    """Read a recipe and, through `base:`, the recipes it extends (deep-merged, child wins)."""
    doc = _read_yaml(path)
    base_ref = doc.data.get("base")
    if base_ref is None:
        return doc
    where = doc.marks.get(("base",))
    base_path = _base_path(path, base_ref, where)
    chain = (*chain, _resolve(path))
    if _resolve(base_path) in chain:
        cycle = " -> ".join(str(p) for p in (*chain, _resolve(base_path)))
        raise RecipeError(
            [
                Problem(
                    "base", f"recipes extend each other in a cycle: {cycle}; break the cycle", where
                )
            ],
            str(path),
        )
    parent = _load_with_bases(base_path, chain)
    data = _deep_merge(parent.data, {k: v for k, v in doc.data.items() if k != "base"})
    marks = {**parent.marks, **doc.marks}
    marks.pop(("base",), None)
    return _Doc(data, marks)


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # unreadable or looping symlinks: compare as written
        return path.absolute()


def _base_path(path: Path, base_ref: Any, where: str | None) -> Path:
    """The file `base:` points at, relative to the recipe that names it."""
    problem = None
    if not isinstance(base_ref, str) or not base_ref.strip() or "\0" in base_ref:
        problem = f"must be the path of another recipe file, got {_describe(base_ref)}"
    else:
        base_path = path.parent / base_ref
        try:
            if base_path.is_file():
                return base_path
            problem = f"base recipe not found: {base_path} (paths are relative to {path})"
        except OSError as exc:
            problem = f"cannot read base recipe {base_path}: {exc.strerror or exc}"
    raise RecipeError([Problem("base", problem, where)], str(path))


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _all_paths(model: type[BaseModel] = Recipe, prefix: str = "") -> dict[str, str]:
    """Every dotted field path in the schema, keyed by its last component too."""
    out: dict[str, str] = {}
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        out[dotted] = dotted
        sub = _section_type(info.annotation)
        if sub is not None:
            out.update(_all_paths(sub, dotted + "."))
    return out


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The Section class inside an annotation like `X | None`, if there is exactly one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = getattr(annotation, "__args__", ())
    found = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    containers = [a for a in args if getattr(a, "__origin__", None) in (list, dict)]
    return found[0] if len(found) == 1 and not containers else None


def suggest(key: str, siblings: Iterable[str], parent: str = "") -> str | None:
    """A did-you-mean for a misspelt key: a nearby sibling, or a known alias anywhere."""
    siblings = list(siblings)
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if close:
        return f"{parent}{close[0]}"
    normal = key.lower().replace("-", "_")
    alias = difflib.get_close_matches(normal, list(ALIASES), n=1, cutoff=0.75)
    if alias:
        return ALIASES[alias[0]]
    paths = _all_paths()
    leaves: dict[str, str] = {}
    for dotted in paths:
        leaves.setdefault(dotted.rsplit(".", 1)[-1], dotted)
    close = difflib.get_close_matches(normal, list(leaves), n=1, cutoff=0.75)
    if close:
        return leaves[close[0]]
    return None


def _model_at(path: Sequence[str]) -> type[BaseModel] | None:
    """The Section class a dotted key path points into, or None if it leaves the schema."""
    model: type[BaseModel] | None = Recipe
    for part in path:
        if model is None or part not in model.model_fields:
            return None
        model = _section_type(model.model_fields[part].annotation)
    return model


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], value parsed as YAML)."""
    where = f"--set {text}"
    if "=" not in text:
        raise RecipeError([Problem("", "expected KEY.PATH=VALUE, e.g. --set train.lr=3e-5", where)])
    key, raw = text.split("=", 1)
    parts = [part.strip() for part in key.split(".")]
    if not all(parts):
        raise RecipeError(
            [Problem(key, "empty key; expected KEY.PATH=VALUE, e.g. --set train.lr=3e-5", where)]
        )
    too_deep = _too_deep(raw, where)
    if too_deep is not None:
        raise RecipeError([Problem(key, too_deep.message, where)])
    try:
        value = _parse_value(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(
            [
                Problem(
                    key,
                    f"value is not valid YAML ({problem}); quote it for the shell, "
                    "e.g. --set 'data.train=[{path: a.jsonl, weight: 2}]'",
                    where,
                )
            ]
        ) from None
    except RecursionError:
        raise RecipeError([Problem(key, "value nested too deeply", where)]) from None
    return parts, value


def _parse_value(raw: str) -> Any:
    if not raw.strip():
        return None
    loader = _RecipeLoader(raw)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


FREE_FORM = ("strategy.deepspeed_config",)  # mappings whose keys are not part of the schema


def _override_path_problem(parts: list[str], where: str) -> Problem | None:
    """Why `--set` cannot set this path, or None when the schema has it."""
    model: type[BaseModel] | None = Recipe
    for i, part in enumerate(parts):
        here = ".".join(parts[:i])
        if any(here == free or here.startswith(free + ".") for free in FREE_FORM):
            return None
        if model is None:
            return Problem(
                ".".join(parts),
                f"{here} is a value, not a section; set it as a whole: --set {here}=VALUE",
                where,
            )
        if part not in model.model_fields or part == "base":
            names = [n for n in _field_names(model) if n != "base"]
            hint = suggest(part, names, f"{here}." if here else "")
            message = f"unknown field {part!r}"
            if part == "base":
                message = "cannot be overridden; edit the recipe file"
            elif hint:
                message += f"; did you mean {hint}?"
            return Problem(".".join(parts), f"{message} (allowed here: {', '.join(names)})", where)
        model = _section_type(model.model_fields[part].annotation)
    return None


def apply_overrides(doc: _Doc, overrides: Sequence[str]) -> None:
    """Apply `--set a.b.c=value` overrides in order, creating sections as needed.

    Raises RecipeError listing every override that names no field of the schema.
    """
    problems: list[Problem] = []
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except RecipeError as exc:
            problems += exc.problems
            continue
        where = f"--set {text}"
        problem = _override_path_problem(parts, where)
        if problem is not None:
            problems.append(problem)
            continue
        node = doc.data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
        # Marks below the overridden key described the file's old value: drop them.
        for loc in [loc for loc in doc.marks if loc[: len(parts)] == tuple(parts)]:
            del doc.marks[loc]
        doc.marks[tuple(parts)] = where
    if problems:
        raise RecipeError(problems)


def _clean_loc(loc: tuple, data: Any) -> tuple:
    """Drop pydantic's union-member tags from an error location, keeping real keys."""
    out: list = []
    node = data
    for part in loc:
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        ):
            out.append(part)
            node = node[part]
        elif (isinstance(node, dict | list) or node is None) and (
            isinstance(part, str) and not _is_union_tag(part)
        ):
            # A key the data lacks (a missing field): keep real field names.
            out.append(part)
            node = None
        # a scalar: the rest are union tags
    return tuple(out)


def _is_union_tag(part: str) -> bool:
    return (
        any(ch in part for ch in "[]()")
        or part
        in (
            "str",
            "int",
            "float",
            "bool",
            "list",
            "dict",
        )
        or part.startswith(("literal", "function"))
    )


def _where(marks: dict[tuple, str], loc: tuple) -> str | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in marks:
            return marks[loc[:end]]
    return None


def _field_at(loc: Sequence[Any]) -> Any:
    """The pydantic FieldInfo a data location points at (list positions skipped), or None."""
    model: type[BaseModel] | None = Recipe
    info = None
    for part in loc:
        if isinstance(part, int):
            model = _list_item_model(info.annotation) if info is not None else None
            continue
        if model is None or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = _section_type(info.annotation)
    return info


def _list_item_model(annotation: Any) -> type[BaseModel] | None:
    """The Section class of `list[Section]` inside an annotation, e.g. data.train's sources."""
    for arg in (annotation, *getattr(annotation, "__args__", ())):
        if getattr(arg, "__origin__", None) is list:
            item = arg.__args__[0]
            if isinstance(item, type) and issubclass(item, BaseModel):
                return item
    return None


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _message_for(err: Any, loc: tuple) -> str:
    """What is wrong at one pydantic error, and what is allowed there."""
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = loc[:-1]
        model = _model_at([str(p) for p in parent if isinstance(p, str)])
        if not model and any(isinstance(p, int) for p in parent):
            model = _list_item_model(getattr(_field_at(parent), "annotation", None))
        siblings = _field_names(model) if model else []
        prefix = _dotted(parent)
        hint = suggest(str(loc[-1]), siblings, f"{prefix}." if prefix else "")
        message = "unknown key" + (f"; did you mean {hint}?" if hint else "")
        return message + (f" (allowed here: {', '.join(siblings)})" if siblings else "")
    if kind == "missing":
        info = _field_at(loc)
        help_text = f": {info.description}" if info is not None and info.description else ""
        return f"required field is missing{help_text}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        model = _model_at([str(p) for p in loc if isinstance(p, str)])
        keys = f" with keys among {', '.join(_field_names(model))}" if model else ""
        return f"must be a mapping{keys} (got {_describe(err.get('input'))})"
    message = err["msg"]
    if "input" in err:
        message += f" (got {_shown(err['input'])})"
    return message


def _problems_from_validation(exc: ValidationError, doc: _Doc) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for err in exc.errors(include_url=False):
        loc = _clean_loc(tuple(err["loc"]), doc.data)
        path, message = _dotted(loc), _message_for(err, loc)
        if (path, message) in seen:
            continue
        seen.add((path, message))
        problems.append(Problem(path, message, _where(doc.marks, loc)))
    return _merge_union_problems(_drop_wrong_union_members(problems))


def _drop_wrong_union_members(problems: list[Problem]) -> list[Problem]:
    """`str | list[...]` given a list: the errors inside the list matter, not 'not a string'."""
    return [
        p
        for p in problems
        if not (
            p.message.startswith("Input should be a valid")
            and any(q.path.startswith((p.path + ".", p.path + "[")) for q in problems)
        )
    ]


def _merge_union_problems(problems: list[Problem]) -> list[Problem]:
    """A union (e.g. 'epoch' | int) yields one error per member: join them per field."""
    index: dict[str, int] = {}
    out: list[Problem] = []
    for p in problems:
        if p.path in index and not p.message.startswith(("unknown key", "required")):
            prev = out[index[p.path]]
            out[index[p.path]] = Problem(p.path, f"{prev.message}; or {p.message}", prev.where)
        else:
            index[p.path] = len(out)
            out.append(p)
    return out


_POSITION = re.compile(r"^(?P<file>.*):(?P<line>\d+):(?P<col>\d+)$")


def _position_key(problem: Problem) -> tuple:
    """File positions first (by file, line, column), then --set overrides, then the rest."""
    where = problem.where or ""
    found = _POSITION.match(where)
    if found:
        return (0, found["file"], int(found["line"]), int(found["col"]))
    if where.startswith("--set"):
        return (1, "", 0, 0)
    return (2, "", 0, 0)


def sort_problems(problems: Iterable[Problem]) -> list[Problem]:
    """Problems in the order a reader meets them in the file (stable for equal positions)."""
    return sorted(problems, key=_position_key)


MAX_REPAIR_ROUNDS = 8


def _repaired_recipe(data: Any, errors: list[Any]) -> Recipe | None:
    """A Recipe built from the data with every schema error taken out, or None.

    Invalid values are removed (their defaults apply) and missing required fields get
    placeholders, so the cross-field rules can still check everything else and all problems
    are reported in one go.
    """
    data = copy.deepcopy(data)
    for _ in range(MAX_REPAIR_ROUNDS):
        if not isinstance(data, dict) or not any(_repair(data, err) for err in errors):
            return None
        try:
            return Recipe.model_validate(data)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
    return None


def _repair(data: dict, err: Any) -> bool:
    """Take one schema error out of `data`; whether anything changed."""
    loc = _clean_loc(tuple(err["loc"]), data)
    if any(isinstance(p, int) for p in loc):
        # Inside a list: drop the whole list-valued field rather than shifting positions.
        loc = loc[: next(i for i, p in enumerate(loc) if isinstance(p, int))]
    if not loc:
        return False
    parent: Any = data
    for part in loc[:-1]:
        parent = parent.get(part) if isinstance(parent, dict) else None
    if not isinstance(parent, dict):
        return False
    key = loc[-1]
    if err["type"] == "missing":
        if key in parent:
            return False
        info = _field_at(loc)
        section = _section_type(info.annotation) if info is not None else None
        parent[key] = {} if section is not None else "placeholder"
        return True
    if key not in parent:
        return False
    del parent[key]
    return True


_FIELD_MENTION = re.compile(r"\b[a-z_]+(?:\.[a-z_]+)+\b")


def _follows_from(rule: Problem, schema_paths: set[str]) -> bool:
    """Whether a rule problem may only be a consequence of a field the schema rejected."""
    mentioned = {rule.path, *_FIELD_MENTION.findall(rule.message)}
    return any(
        m == s or m.startswith(s + ".") or s.startswith(m + ".")
        for m in mentioned
        for s in schema_paths
    )


def validate_data(
    data: Mapping[str, Any], doc: _Doc | None = None, source: str | None = None
) -> Recipe:
    """Validate plain recipe data (after bases and overrides) into a Recipe.

    Raises RecipeError with every problem, schema and cross-field rules alike, in file order.
    """
    doc = doc or _Doc(dict(data) if isinstance(data, Mapping) else data, {})
    try:
        try:
            recipe = Recipe.model_validate(doc.data)
            problems: list[Problem] = []
        except ValidationError as exc:
            problems = _problems_from_validation(exc, doc)
            recipe = _repaired_recipe(doc.data, exc.errors(include_url=False))
        rules = check_rules(recipe) if recipe is not None else []
    except RecursionError:
        raise RecipeError([Problem("", "recipe nested too deeply")], source) from None
    schema_paths = {re.sub(r"\[\d+\].*", "", p.path) for p in problems}
    problems += [
        Problem(p.path, p.message, p.where or _where(doc.marks, tuple(p.path.split("."))))
        for p in rules
        if not _follows_from(p, schema_paths)
    ]
    if problems:
        raise RecipeError(sort_problems(problems), source)
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe file, resolve `base:` and `--set` overrides, and validate it.

    Raises RecipeError listing every problem, each with file:line:col and field path.
    """
    path = Path(path)
    doc = _load_with_bases(path)
    doc.data.pop("base", None)
    try:
        apply_overrides(doc, overrides)
    except RecipeError as exc:
        raise RecipeError(exc.problems, str(path)) from None
    return validate_data(doc.data, doc, str(path))


def resolved_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data: defaults filled in, fields that do nothing left out."""
    data = recipe.model_dump(mode="json", exclude={"base"})
    for dotted in inapplicable_fields(recipe):
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return data


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML: exactly what runs."""
    return yaml.safe_dump(resolved_dict(recipe), sort_keys=False, allow_unicode=True, width=100)


def json_schema() -> dict[str, Any]:
    """JSON Schema (Draft 2020-12) of recipes, for editor completion and outside checks."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://ftlaunch.dev/schema/recipe.json"
    schema["title"] = "ftlaunch recipe"
    return schema
