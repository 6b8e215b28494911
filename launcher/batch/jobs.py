"""The public batch jobs: generate, score and evaluate a model over a data file, and the
recipe's `evaluate:` / `generate:` sections (and per-source metrics) after training."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from launcher import data as D
from launcher import metrics as M
from launcher import tokenize as T
from launcher.batch.inputs import (
    COMPLETION,
    LABEL_ID,
    PROMPT,
    PROMPT_HINT,
    REFERENCE,
    BatchInputError,
    chain_first,
    first_record,
    iter_records,
    prompt_records,
    require_text,
    stage_rows,
)
from launcher.batch.pool import (
    IN_DRIVER_ROWS,
    OutputWriter,
    PoolOptions,
    dataset_from_refs,
    run_job,
)
from launcher.batch.source import ModelSource, resolve_model, scoring_tokenizer
from launcher.batch.worker import (
    GenerationOptions,
    chat_score_messages,
    chat_scoring_encoder,
    check_template,
)
from launcher.hf_files import loaded_datasets
from launcher.raysession import ensure_ray
from launcher.rundir import metrics_path, read_metrics
from launcher.stream_data import hub_splits, split_rows, stream_plan


def generate(
    model_ref: str | Path,
    prompts_path: str | Path,
    out_path: str | Path,
    gen_cfg: Any = None,
    prompt_template: str | None = None,
    *,
    pool: PoolOptions | None = None,
    max_length: int | None = None,
    task: str | None = None,
    instruction_format: bool = False,
    chat: bool | None = None,
    system_prompt: str | None = None,
    **gen_overrides: Any,
) -> Path:
    """Generate for every prompt; write one row per prompt and return sequence to `out_path`.

    Rows keep every input column (and `id`, or get `row_id`) and add `output` and
    `sequence_index`. `gen_cfg` is a GenerateConfig, dict or None; keyword overrides such as
    max_new_tokens=..., seed=... win over it. `prompt_template` places {prompt} (or
    {instruction}) and the row's {input}; `instruction_format` renders prompts as the data
    stage rendered instruction training rows (its default layout when the template is None).
    `chat` renders each row with the model's chat template and a generation prompt: a row's
    `messages` (a conversation) or its `prompt` as one user message, `system_prompt` first when
    the conversation has no system message; generation stops at the template's end-of-turn
    token. None: chat when the first row has `messages`.

    A run directory's model gets the layout its recipe trained it on unless the call says
    otherwise: chat runs render prompts with the chat template (and its system prompt),
    instruction runs render them as their training prompts were.
    """
    pool = pool or PoolOptions(batch_size=16)
    source = resolve_model(model_ref, task=task)
    if source.task != "causal_lm":
        raise BatchInputError(
            f"generate needs a causal language model, but {model_ref} is a classification "
            f"model (labels: {', '.join(source.labels or ())})"
        )
    opts = GenerationOptions.from_config(gen_cfg, **gen_overrides)
    path = Path(prompts_path)
    # A run directory's model reads prompts best in the layout it was trained on.
    trained = source.trained_format or {}
    if chat is None and trained.get("format") == "chat":
        chat, system_prompt = True, system_prompt or trained.get("system_prompt")
    if chat is None:
        chat = "messages" in next(iter(prompt_records(path)), ("", {}))[1]
    if (
        not (chat or instruction_format or prompt_template)
        and trained.get("format") == "instruction"
    ):
        instruction_format, prompt_template = True, trained.get("prompt_template")
    if not instruction_format and not chat:
        check_template(prompt_template)

    def check(where: str, row: dict) -> dict:
        if chat and row.get("messages") is not None:
            from launcher.chat import ChatDataError, normalize_messages

            try:
                normalize_messages(row["messages"], row=0)
            except ChatDataError as exc:
                raise BatchInputError(f"{where}: field 'messages': {exc.detail}") from None
        else:
            require_text(where, row, "prompt", PROMPT_HINT)
        return row

    writer = OutputWriter(out_path)
    ensure_ray(address=pool.address)
    refs, count = stage_rows(prompt_records(path), check)
    dataset = dataset_from_refs(refs, str(path))
    job = {
        "kind": "generation",
        "generate": asdict(opts),
        "prompt_field": "prompt",
        "prompt_template": prompt_template,
        "instruction_format": instruction_format,
        "chat": chat,
        "system_prompt": system_prompt,
        "max_length": max_length,
    }
    with writer:
        total = count * opts.num_return_sequences
        for block in run_job(source, dataset, job, pool, total, "generate"):
            writer.write(block)
    return writer.path


def score(
    model_ref: str | Path,
    data_path: str | Path,
    out_path: str | Path,
    *,
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    token_logprobs: bool = False,
    pool: PoolOptions | None = None,
    max_length: int | None = None,
    task: str | None = None,
    chat: bool | None = None,
    system_prompt: str | None = None,
) -> Path:
    """Score every row; write the rows with their scores to `out_path` (.jsonl or .parquet).

    Classification: `prob_<label>` per label, `predicted_id`, `predicted_label`.
    Causal LM: `log_likelihood` (sum), `log_likelihood_per_token`, `num_tokens` (and
    `token_logprobs` when asked) of `text_field`, or of `completion_field` given
    `prompt_field` when the first row has both.
    `chat` (None: when the first row has `messages`): each row is a conversation, its
    `messages`, or its prompt as a user message answered by its completion, rendered with the
    model's chat template (`system_prompt` first where it has no system message). The scored
    tokens are the last assistant turn's text and the end-of-turn token(s) the template writes
    after it, given everything rendered before it: what training with `train_on:
    last_assistant` trains. Turns after the last assistant turn are not scored.
    """
    pool = pool or PoolOptions()
    source = resolve_model(model_ref, task=task)
    path = Path(data_path)
    writer = OutputWriter(out_path)
    records = iter_records(path, text_column=text_field)
    first = first_record(records, path)
    if chat is None:
        chat = source.task == "causal_lm" and "messages" in first[1]
    if source.task == "classification":
        if chat:
            raise BatchInputError(f"--chat scores a causal language model; {model_ref} classifies")
        job: dict[str, Any] = {"kind": "classification", "text_field": text_field}
        check = _fields_check([text_field])
    else:
        pairs = prompt_field in first[1] and completion_field in first[1]
        job = {
            "kind": "lm",
            "pairs": pairs,
            "chat": chat,
            "system_prompt": system_prompt,
            "text_field": text_field,
            "prompt_field": prompt_field,
            "completion_field": completion_field,
            "token_logprobs": token_logprobs,
        }
        if chat:
            check = _chat_score_check(source, system_prompt, prompt_field, completion_field)
        else:
            check = _fields_check([prompt_field, completion_field] if pairs else [text_field])
    job["max_length"] = max_length
    ensure_ray(address=pool.address)
    refs, count = stage_rows(chain_first(first, records), check)
    dataset = dataset_from_refs(refs, str(path))
    with writer:
        for block in run_job(source, dataset, job, pool, count, "score"):
            writer.write(block)
    return writer.path


def _fields_check(fields: Sequence[str]) -> Callable[[str, dict], dict]:
    def check(where: str, row: dict) -> dict:
        for name in fields:
            require_text(where, row, name)
        return row

    return check


def _chat_score_check(
    source: ModelSource, system_prompt: str | None, prompt_field: str, completion_field: str
) -> Callable[[str, dict], dict]:
    """Checks each chat row here, where its file and line can be named, exactly as the workers
    will encode it: the layout and roles, an assistant turn to score, the template renders it."""
    from launcher.chat import ChatDataError, ChatTemplateError

    try:
        encoder = chat_scoring_encoder(scoring_tokenizer(source), system_prompt)
    except ChatTemplateError:
        raise BatchInputError(
            f"{source.name_or_path}: the model's tokenizer has no chat template to render chat "
            "rows with (score them as text, or use a model exported from a chat recipe)"
        ) from None

    def check(where: str, row: dict) -> dict:
        has_messages = "messages" in row and row["messages"] is not None
        if not has_messages:
            hint = "; a chat row needs `messages`, or a prompt and a completion"
            for name in (prompt_field, completion_field):
                require_text(where, row, name, hint)
        value = chat_score_messages(row, prompt_field, completion_field)
        try:
            encoder.check_row(value, row=0)
        except ChatDataError as exc:
            field_name = "messages" if has_messages else f"{prompt_field}/{completion_field}"
            detail = exc.detail.replace("no assistant turn to train", "no assistant turn to score")
            raise BatchInputError(f"{where}: field {field_name!r}: {detail}") from None
        return row

    return check


@dataclass
class _EvalTotals:
    """Running sums over streamed result blocks (nothing per row but class ids)."""

    rows: int = 0
    nll: float = 0.0
    tokens: int = 0
    row_loss: float = 0.0
    exact_hits: float = 0.0
    predicted: list = field(default_factory=list)
    truth: list = field(default_factory=list)

    def add(self, block, references: str | None) -> None:
        names = set(block.column_names)
        self.rows += block.num_rows
        if "log_likelihood" in names:
            self.nll -= float(np.sum(block["log_likelihood"].to_numpy()))
            self.tokens += int(np.sum(block["num_tokens"].to_numpy()))
        if "row_loss" in names:
            self.row_loss += float(np.sum(block["row_loss"].to_numpy()))
            self.predicted.append(block["predicted_id"].to_numpy())
            self.truth.append(block[LABEL_ID].to_numpy())
        if references is not None and "output" in names:
            outputs = block["output"].to_pylist()
            refs = block[references].to_pylist()
            self.exact_hits += M.exact_match(outputs, refs) * len(outputs)


def _check_metrics(metrics: Sequence[str], task: str) -> list[str]:
    allowed = M.METRICS_BY_TASK[task]
    chosen = list(dict.fromkeys(metrics))
    wrong = [m for m in chosen if m not in allowed]
    if wrong or not chosen:
        raise BatchInputError(
            f"metric(s) {', '.join(wrong) or '(none)'} not available for a {task} model; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    return chosen


def _label_check(labels: Sequence[str], label_field: str) -> Callable[[str, dict], int]:
    """Map a row's label (a name, or an id) to its class id, or explain what is allowed."""
    index = {name: i for i, name in enumerate(labels)}

    def to_id(where: str, row: dict) -> int:
        if label_field not in row:
            raise BatchInputError(f"{where}: no `{label_field}` field to evaluate against")
        value = row[label_field]
        if isinstance(value, str) and value in index:
            return index[value]
        is_id = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        if is_id and 0 <= value < len(labels):
            return int(value)
        raise BatchInputError(
            f"{where}: label {value!r} is not one of {list(labels)} (or an id 0-{len(labels) - 1})"
        )

    return to_id


def evaluate(
    model_ref: str | Path,
    data,
    metrics: Sequence[str] = ("loss",),
    *,
    text_field: str = "text",
    label_field: str = "label",
    labels: Sequence[str] | None = None,
    prompt_field: str = "prompt",
    reference_field: str = "completion",
    gen_cfg: Any = None,
    prompt_template: str | None = None,
    pool: PoolOptions | None = None,
    max_length: int | None = None,
    out_dir: str | Path | None = None,
    task: str | None = None,
    instruction_format: bool = False,
) -> dict:
    """Evaluate a model on a data file, an Arrow table or a tokenized Ray dataset.

    Returns eval.json's content.

    Causal LM: loss and perplexity are token-weighted over the whole set (of `text_field`, or
    of `reference_field` given `prompt_field` when the first row has both, or of each
    conversation's last assistant turn, rendered with the model's chat template, when rows
    have `messages`, as `score` scores them); exact_match compares
    the greedy output for `prompt_field` with `reference_field` after whitespace normalisation.
    Classification: loss (mean cross-entropy), accuracy, macro precision/recall/F1, per-label
    scores and the confusion matrix. A tokenized dataset (the data stage's `input_ids` and
    `labels`) gives loss statistics and classification metrics, not exact_match.
    With `out_dir`, eval.json (and confusion_matrix.png for classification) are written there.
    """
    pool = pool or PoolOptions()
    source = resolve_model(model_ref, task=task)
    if labels:
        source = ModelSource(**{**asdict(source), "labels": tuple(labels)})
    chosen = _check_metrics(metrics, source.task)
    ensure_ray(address=pool.address)
    if isinstance(data, (str, Path)) or _is_arrow_table(data):
        records, name = _eval_records(data, text_field)
        dataset, total, job, references = _eval_input_from_records(
            records, name, source, chosen, text_field, label_field, prompt_field, reference_field
        )
    else:
        if "exact_match" in chosen:
            raise BatchInputError("exact_match needs a data file with prompts and references")
        # A materialized dataset knows its size; counting a lazy one would run it twice.
        from ray.data.dataset import MaterializedDataset

        total = data.count() if isinstance(data, MaterializedDataset) else None
        dataset, references = data, None
        job = {"kind": "tokenized_eval"}
    if "exact_match" in chosen:
        opts = GenerationOptions.from_config(gen_cfg)
        job["generate"] = asdict(opts)
        job["prompt_template"] = prompt_template
        job["instruction_format"] = instruction_format
    job.update(keep_columns=False, max_length=max_length)
    totals = _EvalTotals()
    for block in run_job(source, dataset, job, pool, total, "evaluate"):
        totals.add(block, references)
    result = _eval_result(totals, chosen, source)
    if out_dir is not None:
        write_eval(result, Path(out_dir))
    return result


def _is_arrow_table(data: Any) -> bool:
    import pyarrow as pa

    return isinstance(data, pa.Table)


def _eval_records(data: Any, text_field: str) -> tuple[Iterator[tuple[str, dict]], str]:
    """(location, row) pairs of a data file or an in-memory Arrow table, and its name."""
    if _is_arrow_table(data):
        rows = ((f"row {i + 1}", row) for i, row in enumerate(data.to_pylist()))
        return rows, "evaluation table"
    return iter_records(Path(data), text_column=text_field), str(data)


def _eval_input_from_records(
    records: Iterator[tuple[str, dict]],
    path: str,
    source: ModelSource,
    chosen: list[str],
    text_field: str,
    label_field: str,
    prompt_field: str,
    reference_field: str,
):
    first = first_record(records, path)
    references = None
    if source.task == "classification":
        to_id = _label_check(source.labels or (), label_field)
        job: dict[str, Any] = {"kind": "classification", "text_field": text_field}

        def check(where: str, row: dict) -> dict:
            require_text(where, row, text_field)
            return {**row, LABEL_ID: to_id(where, row)}

    else:
        as_trained = _instruction_rows(source, first[1], prompt_field)
        if as_trained is not None:
            prompt_field, reference_field = PROMPT, COMPLETION
        pairs = as_trained is not None or (prompt_field in first[1] and reference_field in first[1])
        needs_nll = bool({"loss", "perplexity"} & set(chosen))
        # Conversations: the last assistant turn given the turns before it, as `score` does.
        chat = needs_nll and "messages" in first[1] and "exact_match" not in chosen
        fields = []
        if needs_nll and not chat:
            fields += [prompt_field, reference_field] if pairs else [text_field]
        if "exact_match" in chosen:
            fields += [prompt_field, reference_field]
            references = REFERENCE
        system_prompt = (source.trained_format or {}).get("system_prompt")
        job = {
            "kind": "lm",
            "nll": needs_nll,
            "pairs": pairs,
            "chat": chat,
            "system_prompt": system_prompt,
            "text_field": text_field,
            "prompt_field": prompt_field,
            "completion_field": reference_field,
            # Output blocks keep only computed columns; the references ride along.
            "carry": [references] if references else [],
        }
        chat_check = (
            _chat_score_check(source, system_prompt, prompt_field, reference_field)
            if chat
            else None
        )

        def check(where: str, row: dict) -> dict:
            if chat_check is not None:
                return chat_check(where, row)
            if as_trained is not None:
                return as_trained(where, row)
            for name in dict.fromkeys(fields):
                require_text(where, row, name)
            return {**row, REFERENCE: row[reference_field]} if references else row

    refs, count = stage_rows(chain_first(first, records), check)
    return dataset_from_refs(refs, str(path)), count, job, references


def _instruction_rows(
    source: ModelSource, first: dict, prompt_field: str
) -> Callable[[str, dict], dict] | None:
    """For a run trained on instruction rows, given such rows (`instruction`, `output`, no
    prompt field): what turns each into the pair it trained on, its prompt rendered with the
    run's template and its response with the end-of-sequence token. None otherwise."""
    trained = source.trained_format or {}
    if trained.get("format") != "instruction" or prompt_field in first:
        return None
    if "instruction" not in first or "output" not in first:
        return None
    template = trained.get("prompt_template")
    eos = getattr(scoring_tokenizer(source), "eos_token", None) or ""

    def render(where: str, row: dict) -> dict:
        for name in ("instruction", "output"):
            require_text(where, row, name)
        prompt = T.render_prompt(template, row["instruction"], row.get("input") or "")
        return {**row, PROMPT: prompt, COMPLETION: row["output"] + eos, REFERENCE: row["output"]}

    return render


def _eval_result(totals: _EvalTotals, chosen: list[str], source: ModelSource) -> dict:
    result: dict[str, Any] = {"num_rows": totals.rows}
    if source.task == "causal_lm":
        if {"loss", "perplexity"} & set(chosen):
            result["num_tokens"] = totals.tokens
            if "loss" in chosen:
                result["loss"] = M.token_weighted_loss([totals.nll], [totals.tokens])
            if "perplexity" in chosen:
                result["perplexity"] = M.perplexity([totals.nll], [totals.tokens])
        if "exact_match" in chosen:
            result["exact_match"] = totals.exact_hits / max(totals.rows, 1)
        return result
    truth = np.concatenate(totals.truth) if totals.truth else np.zeros(0, dtype=np.int64)
    predicted = np.concatenate(totals.predicted) if totals.predicted else truth
    if "loss" in chosen:
        result["loss"] = totals.row_loss / max(totals.rows, 1)
    report = M.classification_metrics(truth, predicted, list(source.labels or ()))
    for name in M.METRICS_BY_TASK["classification"]:
        if name in chosen and name != "loss":  # the loss is the row mean above
            result[name] = report[name]
    result["per_label"] = report["per_label"]
    result["confusion_matrix"] = report["confusion_matrix"]
    return result


def write_eval(result: dict, out_dir: Path) -> Path:
    """Write eval.json (and confusion_matrix.png when there is a matrix); return eval.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "eval.json"
    target.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    if "confusion_matrix" in result:
        plot_confusion(result, out_dir / "confusion_matrix.png")
    return target


def plot_confusion(result: dict, png_path: str | Path) -> Path:
    """Draw the confusion matrix of an evaluation result as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["confusion_matrix"]["labels"]
    matrix = np.asarray(result["confusion_matrix"]["matrix"])
    size = max(3.0, 0.8 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    limit = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(
            j, i, str(count), ha="center", va="center", color="white" if count > limit else "black"
        )
    accuracy = result.get("accuracy")
    ax.set_title(
        "confusion matrix" + (f" (accuracy {accuracy:.3f})" if accuracy is not None else "")
    )
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


# ------------------------------------------------------------------- after training (driver)


def _evaluation_table(recipe: Any, base_dir: Path | None = None):
    """Canonical rows to evaluate on: evaluate.data, else the test split, else validation."""
    import pyarrow as pa

    if recipe.evaluate.data:
        table = D.read_source(recipe.evaluate.data, D.fields_for(recipe), base_dir).table
        return table.append_column("row_id", pa.array(np.arange(table.num_rows)))
    hub = hub_splits(recipe)
    plan = stream_plan(recipe, base_dir, hub)  # large data: the split the streamed tasks carved
    tables = (
        {} if plan is not None else D.load_tables(recipe, base_dir, loaded=loaded_datasets(hub))
    )
    for split in ("test", "validation"):
        table = tables.get(split) if plan is None else split_rows(plan, recipe, split)
        if table is not None:
            return table
    raise BatchInputError(
        "evaluate: nothing to evaluate on; set evaluate.data, give data.test or "
        "data.validation, or carve one with data.split"
    )


def evaluate_run(
    recipe: Any, run_dir: str | Path, *, base_dir: Path | None = None, progress: bool = True
) -> dict:
    """The recipe's `evaluate:` section over run_dir's model; writes run_dir/eval.json.

    Loss and perplexity (and the classification metrics) run on rows tokenized exactly as in
    training (the data stage's tokenizer function, so instruction prompts are masked the same
    way); exact_match generates greedily from each instruction prompt and compares with its
    `output`. Classification also writes run_dir/confusion_matrix.png.
    """
    import ray.data

    run_dir = Path(run_dir)
    cfg = recipe.evaluate
    pool = PoolOptions(batch_size=cfg.batch_size, progress=progress)
    ensure_ray(address=pool.address)
    table = _evaluation_table(recipe, base_dir)
    chosen = list(dict.fromkeys(cfg.metrics))
    result: dict[str, Any] = {}
    statistics = [m for m in chosen if m != "exact_match"]
    if statistics:
        source = resolve_model(run_dir)
        tokenizer = scoring_tokenizer(source)
        tokenize = T.tokenizer_for_batches(recipe, tokenizer)
        if table.num_rows <= IN_DRIVER_ROWS:
            # A small split is tokenized here: the dataset is then materialized, knows its size,
            # and the scoring runs in this process instead of starting a pool actor.
            tokenized = ray.data.from_blocks([tokenize(table)])
        else:
            tokenized = ray.data.from_arrow(table).map_batches(
                tokenize, batch_format="pyarrow", batch_size=T.TOKENIZE_BATCH_ROWS
            )
        result.update(evaluate(run_dir, tokenized, statistics, pool=pool))
    if "exact_match" in chosen:
        if recipe.data.format != "instruction":
            raise BatchInputError(
                "evaluate.metrics: exact_match needs data.format: instruction (a prompt and a "
                f"reference output per row); this recipe's format is {recipe.data.format}"
            )
        pairs = table.select(["instruction", "input", "output"]).rename_columns(
            ["prompt", "input", "reference"]
        )
        matched = evaluate(
            run_dir,
            pairs,
            ["exact_match"],
            prompt_field="prompt",
            reference_field="reference",
            gen_cfg=recipe.generate,
            prompt_template=recipe.data.prompt_template,
            instruction_format=True,
            pool=pool,
        )
        result.setdefault("num_rows", matched["num_rows"])
        result["exact_match"] = matched["exact_match"]
    write_eval(result, run_dir)
    return result


def generate_run(
    recipe: Any, run_dir: str | Path, *, base_dir: Path | None = None, progress: bool = True
) -> Path:
    """The recipe's `generate:` section over run_dir's model; writes run_dir/generations.jsonl.

    Instruction recipes render each prompt (with the row's `input`, if any) exactly as the
    training prompts were rendered, so the model sees the layout it learned.
    """
    run_dir = Path(run_dir)
    cfg = recipe.generate
    prompts = Path(cfg.prompts)
    if base_dir is not None and not prompts.is_absolute():
        prompts = base_dir / prompts
    instruction = recipe.data.format == "instruction"
    chat = recipe.data.format == "chat"
    return generate(
        run_dir,
        prompts,
        run_dir / "generations.jsonl",
        cfg,
        recipe.data.prompt_template if instruction else None,
        instruction_format=instruction,
        chat=chat or None,
        system_prompt=recipe.data.system_prompt if chat else None,
        pool=PoolOptions(batch_size=16, progress=progress),
        seed=recipe.train.seed,
    )


# ------------------------------------------------------- multi-task runs: metrics per source


def metric_slug(name: str) -> str:
    """A source name as a metric-name part: eval_<slug>_loss."""
    slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
    return slug or "source"


def source_metrics(recipe: Any, data: Any, run_dir: Path, view: Any = None) -> dict[str, Any]:
    """Multi-task runs: the exported model's eval metrics on each source of the validation
    split (eval_<source>_loss, and perplexity or accuracy/f1), with Ray Data over the split's
    tokenized rows. Appended to metrics.jsonl as a row at the last step (so summary.json's
    final metrics show them) and returned as {"source_metrics": {...}}; {} without sources."""
    validation = data.datasets.get("validation")
    if validation is None or len(data.sources) < 2 or "source_id" not in validation.columns():
        return {}
    wanted = (
        ["loss", "perplexity"] if recipe.model.task == "causal_lm" else ["loss", "accuracy", "f1"]
    )
    pool = PoolOptions(
        batch_size=recipe.evaluate.batch_size if recipe.evaluate else 32, progress=False
    )
    from ray.data.expressions import col

    found: dict[str, float] = {}
    for source_id, name in enumerate(data.sources):
        rows = validation.filter(expr=col("source_id") == source_id).materialize()
        if rows.count() == 0:
            continue
        result = evaluate(run_dir, rows, wanted, pool=pool)
        for metric in wanted:
            if isinstance(result.get(metric), int | float):
                found[f"eval_{metric_slug(name)}_{metric}"] = float(result[metric])
    if not found:
        return {}
    steps = [r["step"] for r in read_metrics(Path(run_dir)) if "step" in r and "event" not in r]
    with metrics_path(Path(run_dir)).open("a", encoding="utf-8") as out:
        out.write(json.dumps({"step": max(steps, default=0), **found}) + "\n")
    if view is not None:
        view.note("per-source evaluation: " + ", ".join(f"{k}={v:.4g}" for k, v in found.items()))
    return {"source_metrics": found}
