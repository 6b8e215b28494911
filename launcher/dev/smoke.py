"""Smoke runs: any recipe, shrunk to run end to end on a laptop CPU in about a minute.

`ftlaunch submit RECIPE --smoke` keeps what the recipe is about (task, data format and fields,
labels, fine-tuning method, strategy, distillation, adversarial training, evaluation metrics,
generation, trackers) and swaps out what needs GPUs, the hub or hours:

- the model (and a distillation teacher) becomes a tiny random model of the same family
  (GPT-2, Llama or BERT; launcher.dev.tiny), built once and cached under the smoke directory;
- every data source becomes a small generated file in the recipe's format, with its field names
  and label names (launcher.dev.synthetic), and the prompts file a few generated prompts;
- training stops after a few optimizer steps on 2 CPU workers (1 CPU each), in full precision;
- runs go under the smoke directory, and the job runs here (target local).

The smoke directory is `runs/smoke` (or $FTLAUNCH_SMOKE_DIR): models/ holds the tiny models,
<recipe name>/data the generated data, <recipe name>/runs the run directories.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.dev.synthetic import instruction_rows, review_rows, story_lines, write_jsonl
from launcher.recipe import Recipe, resolved_dict, validate_data

SMOKE_STEPS = 4
SMOKE_WORKERS = 2
SMOKE_MAX_LENGTH = 128  # an instruction row with its prompt template fits
SMOKE_BATCH_SIZE = 4
SMOKE_NEW_TOKENS = 8
SMOKE_MIN_FRACTION = 0.15
SMOKE_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""Chat smoke runs: the tiny tokenizer has no chat template of its own; every turn ends with EOS."""
ROWS = {"train": 96, "validation": 16, "test": 16, "evaluate": 16}
PROMPTS = [
    "Is this review positive or negative?",
    "Write one sentence about the harbour.",
    "Name a kitchen appliance.",
]
FAMILY_BY_MODEL_TYPE = {
    "gpt2": "gpt2",
    "gpt_neo": "gpt2",
    "gptj": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "bert": "bert",
    "distilbert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "electra": "bert",
    "deberta": "bert",
    "deberta-v2": "bert",
    "mpnet": "bert",
}
# Checked in order against the lower-cased model name: the first hint found wins.
FAMILY_BY_NAME = (
    ("llama", "llama"),
    ("smollm", "llama"),
    ("mistral", "llama"),
    ("qwen", "llama"),
    ("gemma", "llama"),
    ("bert", "bert"),
    ("minilm", "bert"),
    ("electra", "bert"),
    ("mpnet", "bert"),
    ("gpt", "gpt2"),
)


def smoke_workdir() -> Path:
    """Where smoke runs keep models, data and runs: $FTLAUNCH_SMOKE_DIR, else ./runs/smoke."""
    return Path(os.environ.get("FTLAUNCH_SMOKE_DIR") or Path("runs") / "smoke").absolute()


# --------------------------------------------------------------------------- model family


def model_family(name_or_path: str, task: str = "causal_lm") -> str:
    """The tiny architecture (gpt2 | llama | bert) standing in for a model.

    A local model directory (or pkg: path) says through its config.json; otherwise the name
    gives it away (gpt2-medium, bert-base-uncased, SmolLM2-135M); failing both, BERT for
    classification and GPT-2 for causal LM.
    """
    from_config = _family_from_config(name_or_path)
    if from_config is not None:
        return from_config
    lowered = name_or_path.lower()
    for hint, family in FAMILY_BY_NAME:
        if hint in lowered:
            return family
    return "bert" if task == "classification" else "gpt2"


def _family_from_config(name_or_path: str) -> str | None:
    try:
        if name_or_path.startswith("pkg:"):
            from launcher.models import package_path

            directory = package_path(name_or_path)
        else:
            directory = Path(os.path.expandvars(os.path.expanduser(name_or_path)))
        config = directory / "config.json"
        if not config.is_file():
            return None
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except Exception:  # not installed, unreadable, not JSON: fall back to the name
        return None
    return FAMILY_BY_MODEL_TYPE.get(model_type)


# ------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class TinyModel:
    """A tiny model to build: where, which family, how many blocks."""

    path: Path
    arch: str
    layers: int


@dataclass(frozen=True)
class DataFile:
    """A generated data file: where, in which format, how many rows."""

    path: Path
    rows: int


@dataclass
class SmokePlan:
    """The shrunk recipe and the files it needs; `materialize` writes them."""

    recipe: Recipe
    original: Recipe
    models: list[TinyModel] = field(default_factory=list)
    data: list[DataFile] = field(default_factory=list)
    prompts: Path | None = None

    def materialize(self) -> Recipe:
        """Build the tiny models (cached) and write the data; returns the smoke recipe."""
        for model in self.models:
            build_model(model)
        student, *teachers = self.models
        for teacher in teachers:
            if teacher.arch == student.arch:
                share_tokenizer(student.path, teacher.path)
        for index, data_file in enumerate(self.data):
            write_jsonl(generate_rows(self.recipe, data_file.rows, seed=index), data_file.path)
        if self.prompts is not None:
            write_jsonl([{"prompt": p} for p in PROMPTS], self.prompts)
        return self.recipe


def smoke_plan(recipe: Recipe, workdir: Path) -> SmokePlan:
    """What a smoke run of `recipe` needs; nothing is written until `materialize`.

    Raises RecipeError if the shrunk recipe does not validate (a bug: report the recipe).
    """
    workdir = Path(workdir).absolute()
    own = workdir / recipe.name
    data = resolved_dict(recipe)
    plan_models: list[TinyModel] = []
    plan_data: list[DataFile] = []

    student, teacher = _tiny_models(recipe, workdir / "models")
    plan_models.append(student)
    data["model"].update(name_or_path=str(student.path), gguf_file=None, dtype="auto")
    data["model"]["trust_remote_code"] = False
    if teacher is not None:
        plan_models.append(teacher)
        data["distill"]["teacher"] = {"name_or_path": str(teacher.path), "gguf_file": None}

    for split in ("train", "validation", "test"):
        spec = data["data"].get(split)
        if spec is not None:
            data["data"][split] = _replace_sources(spec, own / "data", split, plan_data)
    if data.get("evaluate") is not None:
        evaluate = data["evaluate"]
        if evaluate.get("data"):
            path = own / "data" / "evaluate.jsonl"
            plan_data.append(DataFile(path, ROWS["evaluate"]))
            evaluate["data"] = str(path)
        evaluate["batch_size"] = min(evaluate["batch_size"], 16)
    prompts = None
    if data.get("generate") is not None:
        generate = data["generate"]
        if generate.get("prompts"):
            prompts = own / "data" / "prompts.jsonl"
            generate["prompts"] = str(prompts)
        generate["max_new_tokens"] = SMOKE_NEW_TOKENS
        generate["num_return_sequences"] = min(generate["num_return_sequences"], 2)

    split = data["data"]["split"]
    for part in ("validation", "test"):
        if split[part] > 0:  # a carved split of a few rows would leave a worker with none
            split[part] = max(split[part], SMOKE_MIN_FRACTION)
    data["name"] = f"{recipe.name}-smoke"[:100]
    data["data"]["max_length"] = min(data["data"]["max_length"], SMOKE_MAX_LENGTH)
    if data["data"]["format"] == "chat":
        data["data"]["chat_template"] = SMOKE_CHAT_TEMPLATE
    _shrink_training(data)
    _local_cpu_layout(data, own / "runs")
    return SmokePlan(validate_data(data), recipe, plan_models, plan_data, prompts)


def _tiny_models(recipe: Recipe, models_dir: Path) -> tuple[TinyModel, TinyModel | None]:
    """The student (the recipe's model) and, for distillation, the teacher.

    Blocks: 2, or enough for the recipe's settings to mean something: freeze keeps at least one
    block frozen, and a student initialised from teacher layers gets one block per chosen layer
    from a teacher deep enough to have them.
    """
    arch = model_family(recipe.model.name_or_path, recipe.model.task)
    layers = 2
    if recipe.finetune.method == "freeze":
        layers = max(layers, recipe.finetune.trainable_layers + 1)
    teacher = None
    if recipe.distill is not None:
        chosen = recipe.distill.init_student_from_teacher
        teacher_layers = max(2, max(chosen) + 1) if chosen else 4
        if chosen:
            layers = len(chosen)
        teacher_arch = model_family(recipe.distill.teacher.name_or_path, recipe.model.task)
        teacher = TinyModel(
            models_dir / f"{teacher_arch}-{teacher_layers}l", teacher_arch, teacher_layers
        )
    return TinyModel(models_dir / f"{arch}-{layers}l", arch, layers), teacher


def _replace_sources(spec: Any, data_dir: Path, split: str, plan: list[DataFile]) -> Any:
    """One generated file per source of a split; a mix keeps its weights and names."""
    if isinstance(spec, str):
        path = data_dir / f"{split}.jsonl"
        plan.append(DataFile(path, ROWS[split]))
        return str(path)
    replaced = []
    for index, source in enumerate(spec):
        path = data_dir / f"{split}-{index}.jsonl"
        # Sources of different weights get different sizes, so the mix has something to weigh.
        plan.append(DataFile(path, max(8, ROWS[split] // len(spec))))
        replaced.append({**source, "path": str(path)})
    return replaced


def _shrink_training(data: dict[str, Any]) -> None:
    train = data["train"]
    train["max_steps"] = SMOKE_STEPS
    train["epochs"] = min(train["epochs"], 2)
    train["batch_size"] = min(train["batch_size"], SMOKE_BATCH_SIZE)
    train["grad_accum"] = min(train["grad_accum"], 2)
    train["log_every"] = 1
    train["max_failures"] = 0
    if isinstance(train.get("eval_every"), int):
        train["eval_every"] = min(train["eval_every"], SMOKE_STEPS)
    if train.get("warmup_steps") is not None:
        train["warmup_steps"] = min(train["warmup_steps"], 1)
    checkpoint = data["checkpoint"]
    if isinstance(checkpoint.get("every"), int):
        checkpoint["every"] = min(checkpoint["every"], SMOKE_STEPS)


def _local_cpu_layout(data: dict[str, Any], runs_dir: Path) -> None:
    """2 CPU workers here, full precision, runs and trackers under the smoke directory."""
    data["scaling"] = {"num_workers": SMOKE_WORKERS, "use_gpu": False, "cpus_per_worker": 1}
    strategy = data["strategy"]
    strategy["mixed_precision"] = "no"
    if "deepspeed_config" in strategy:
        # Precision keys written for GPUs would contradict mixed_precision: no.
        for key in ("fp16", "bf16", "amp"):
            strategy["deepspeed_config"].pop(key, None)
    data["checkpoint"]["storage_path"] = str(runs_dir)
    tracking = data.get("tracking") or {}
    if tracking.get("mlflow") is not None:
        tracking["mlflow"]["tracking_uri"] = None  # <run>/mlruns, not a shared server
    if tracking.get("wandb") is not None and tracking["wandb"].get("mode") != "disabled":
        tracking["wandb"]["mode"] = "offline"
    data.pop("cluster", None)


# ---------------------------------------------------------------------------- generation


def build_model(model: TinyModel) -> Path:
    """Build a tiny model unless the directory already holds the same one."""
    from launcher.dev.tiny import build_tiny_model

    marker = model.path / "ftlaunch-tiny.json"
    if marker.is_file():
        built = json.loads(marker.read_text())
        if built.get("arch") == model.arch and built.get("layers") == model.layers:
            return model.path
    return build_tiny_model(model.path, model.arch, layers=model.layers)


def share_tokenizer(student_dir: Path, teacher_dir: Path) -> None:
    """Give the teacher the student's tokenizer, as distillation requires.

    Tokenizers trained on the fly do not come out identical twice (ties in the merge order), so
    the teacher takes the student's, its embedding matrix resized when the sizes differ.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    tokenizer.save_pretrained(teacher_dir)
    if AutoConfig.from_pretrained(teacher_dir).vocab_size != len(tokenizer):
        arch = json.loads((teacher_dir / "ftlaunch-tiny.json").read_text())["arch"]
        factory = AutoModel if arch == "bert" else AutoModelForCausalLM
        model = factory.from_pretrained(teacher_dir)
        model.resize_token_embeddings(len(tokenizer))
        model.save_pretrained(teacher_dir)


def generate_rows(recipe: Recipe, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` rows in the recipe's data format, with its field names (and label names)."""
    d = recipe.data
    if d.format == "instruction":
        names = d.instruction_fields
        return [
            {
                names.instruction: r["instruction"],
                names.input: r["input"],
                names.output: r["output"],
            }
            for r in instruction_rows(n, seed)
        ]
    if d.format == "classification":
        return classification_rows(recipe.model.labels or [], n, d.text_field, d.label_field, seed)
    if d.format == "chat":
        return [{d.messages_field: messages} for messages in conversations(n, seed)]
    return [{d.text_field: line} for line in story_lines(n, seed)]


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """`n` generated conversations (role / content), one or two user-assistant exchanges each."""
    rows = instruction_rows(2 * n, seed)
    out = []
    for i in range(n):
        turns = rows[2 * i : 2 * i + (2 if i % 3 == 0 else 1)]
        messages = []
        for r in turns:
            question = f"{r['instruction']}\n{r['input']}".strip()
            messages += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": r["output"]},
            ]
        out.append(messages)
    return out


def classification_rows(
    labels: list[str], n: int, text_field: str = "text", label_field: str = "label", seed: int = 0
) -> list[dict[str, str]]:
    """`n` labelled rows using the given label names, every label about equally often.

    Two labels follow the sentiment of generated reviews (first label negative, second positive),
    so a smoke run has something learnable; more labels each get their own topic word.
    """
    if len(labels) == 2:
        reviews = review_rows(n, seed)
        by_sentiment = {"negative": labels[0], "positive": labels[1]}
        return [{text_field: r["text"], label_field: by_sentiment[r["label"]]} for r in reviews]
    rng = random.Random(seed)
    lines = story_lines(n, seed)
    rows = [
        {
            text_field: f"About {labels[i % len(labels)]}: {lines[i]}",
            label_field: labels[i % len(labels)],
        }
        for i in range(n)
    ]
    rng.shuffle(rows)
    return rows
