"""The recipe schema: one pydantic model per section, and the helpers that walk it.

The schema is the contract users write against, so every model forbids unknown keys and every
field carries a docstring that becomes help text and a JSON Schema description.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


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
    format: Literal["text", "instruction", "chat", "classification"] = "text"
    """How rows become examples: raw text, instruction/response pairs, conversations (a list of
    messages rendered with the chat template), or labelled text."""
    text_field: str = "text"
    """Field holding the text (text and classification formats)."""
    label_field: str = "label"
    """Field holding the label (classification format)."""
    instruction_fields: InstructionFields = InstructionFields()
    """Instruction format: the names of the instruction, input and output fields."""
    prompt_template: str | None = None
    """Instruction format: template with {instruction} and {input}; loss only on the response."""
    messages_field: str = "messages"
    """Chat format: field holding the conversation, a list of {role, content} (system / user /
    assistant / tool) or ShareGPT {from, value} (system / human / gpt) messages."""
    chat_template: str | None = None
    """Chat format: Jinja template (text, or a file relative to the recipe) used to render
    conversations; default: the tokenizer's own. Export saves it with the tokenizer."""
    system_prompt: str | None = None
    """Chat format: system message put first in conversations that have none."""
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    """Chat format: which tokens take the loss: every assistant turn, only the last one, or the
    whole conversation."""
    max_length: int = Field(default=512, gt=0)
    """Maximum tokens per example; longer text is chunked (text) or truncated."""
    packing: bool = False
    """Causal LM text and chat: pack short examples into full max_length sequences."""
    balance: bool = False
    """Classification: undersample the training split to equal class counts."""
    cache_dir: str | None = None
    """Where prepared (tokenized) splits are cached as Parquet, keyed by a fingerprint of the
    sources, tokenizer and data settings, and reused by later runs (`ftlaunch prepare` fills it
    ahead); default ~/.cache/ftlaunch/prepared on the node that runs the driver."""


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
    use_dora: bool = False
    """DoRA: split each adapted weight into magnitude and direction and train the magnitude too
    (a little slower per step than plain LoRA)."""
    use_rslora: bool = False
    """rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r, which keeps higher ranks
    learning."""


class QloraConfig(Section):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the frozen base weights: nf4 (NormalFloat, made for normally
    distributed weights; QLoRA's choice) or fp4."""
    double_quant: bool = True
    """Quantize the per-block scaling constants too (about 0.4 bits less per weight)."""


class AdapterConfig(Section):
    reduction_factor: int = Field(default=16, gt=0)
    """Bottleneck width = hidden size / reduction_factor."""
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """Activation between the down- and up-projection."""


class FinetuneConfig(Section):
    method: Literal[
        "full", "lora", "qlora", "adapter", "prefix", "prompt", "ia3", "bitfit", "freeze"
    ] = "full"
    """Which parameters train (qlora: LoRA on a base loaded in 4 bits)."""
    lora: LoraConfig = LoraConfig()
    """method lora / qlora: rank, alpha, dropout, target modules, DoRA, rsLoRA."""
    qlora: QloraConfig = QloraConfig()
    """method qlora: how the frozen base is quantized (bitsandbytes 4-bit); the compute dtype
    follows strategy.mixed_precision."""
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
    max_preemptions: int = Field(default=-1, ge=-1)
    """Node preemptions survived (-1: unlimited), counted apart from max_failures: when Ray
    announces that a node will be reclaimed, the workers checkpoint at once and the run
    continues on other nodes from that checkpoint."""


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


def _worker_count(value: Any) -> Any:
    """One message for a value that is neither form (instead of one per union member)."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    pair = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    if whole and value < 1:
        raise ValueError("must be at least 1")
    if not (whole or pair):
        raise ValueError("must be a worker count (e.g. 2) or [min, max] (e.g. [1, 4])")
    return value


# A fixed worker count, or [min, max] for elastic training (the rules check the range).
WorkerCount = Annotated[int | tuple[int, int], BeforeValidator(_worker_count)]


class ScalingConfig(Section):
    num_workers: WorkerCount = 1
    """Training workers (one per GPU when GPUs are used), or [min, max]: elastic training that
    starts with what the cluster can give (at least min) and resizes as nodes come and go."""
    resize_interval_s: float = Field(default=60.0, gt=0)
    """Elastic runs: how often a running job looks for room for more workers (growing restarts
    the workers from the newest checkpoint)."""
    placement: Literal["pack", "spread"] = "pack"
    """Where the workers go (with more than one): pack fills a node before the next, keeping
    gradient traffic inside a node; spread puts one worker per node where possible."""
    use_gpu: Literal["auto"] | bool = "auto"
    """auto: use GPUs when the Ray cluster has them."""
    cpus_per_worker: int = Field(default=1, gt=0)
    """CPUs reserved by each training worker."""

    @property
    def min_workers(self) -> int:
        """The fewest workers the run trains with (the fixed count when not elastic)."""
        n = self.num_workers
        return n if isinstance(n, int) else n[0]

    @property
    def max_workers(self) -> int:
        """The most workers the run trains with (the fixed count when not elastic)."""
        n = self.num_workers
        return n if isinstance(n, int) else n[1]

    @property
    def elastic(self) -> bool:
        """Whether the worker count may change while the run goes ([n, n] is a fixed n)."""
        return self.min_workers != self.max_workers


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
    async_upload: Literal["auto"] | bool = "auto"
    """Upload checkpoints in the background while training goes on (a checkpoint counts only
    once every worker's part is written); auto: when storage_path is a URI (s3://, gs://,
    file://), where the upload is the slow part."""
    export: ExportConfig = ExportConfig()
    """How the final model is exported."""


# ------------------------------------------------------------------------- evaluate / generate

# Every metric some task computes, in the order the reference lists them; which task allows
# which is launcher.metrics.METRICS_BY_TASK, checked by the rules (a test keeps the two in step).
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


# ------------------------------------------------------------------ walking the schema


def field_names(model: type[BaseModel]) -> list[str]:
    """The field names of a section, in schema order."""
    return list(model.model_fields)


def all_paths(model: type[BaseModel] = Recipe, prefix: str = "") -> dict[str, str]:
    """Every dotted field path in the schema, keyed by its last component too."""
    out: dict[str, str] = {}
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        out[dotted] = dotted
        sub = section_type(info.annotation)
        if sub is not None:
            out.update(all_paths(sub, dotted + "."))
    return out


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The Section class inside an annotation like `X | None`, if there is exactly one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = getattr(annotation, "__args__", ())
    found = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    containers = [a for a in args if getattr(a, "__origin__", None) in (list, dict)]
    return found[0] if len(found) == 1 and not containers else None


def model_at(path: Sequence[str]) -> type[BaseModel] | None:
    """The Section class a dotted key path points into, or None if it leaves the schema."""
    model: type[BaseModel] | None = Recipe
    for part in path:
        if model is None or part not in model.model_fields:
            return None
        model = section_type(model.model_fields[part].annotation)
    return model


def field_at(loc: Sequence[Any]) -> Any:
    """The pydantic FieldInfo a data location points at (list positions skipped), or None."""
    model: type[BaseModel] | None = Recipe
    info = None
    for part in loc:
        if isinstance(part, int):
            model = list_item_model(info.annotation) if info is not None else None
            continue
        if model is None or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = section_type(info.annotation)
    return info


def list_item_model(annotation: Any) -> type[BaseModel] | None:
    """The Section class of `list[Section]` inside an annotation, e.g. data.train's sources."""
    for arg in (annotation, *getattr(annotation, "__args__", ())):
        if getattr(arg, "__origin__", None) is list:
            item = arg.__args__[0]
            if isinstance(item, type) and issubclass(item, BaseModel):
                return item
    return None


def json_schema() -> dict[str, Any]:
    """JSON Schema (Draft 2020-12) of recipes, for editor completion and outside checks."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://ftlaunch.dev/schema/recipe.json"
    schema["title"] = "ftlaunch recipe"
    return schema
