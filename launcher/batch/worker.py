"""The Ray Data actor and the per-batch model work it does.

Inside an actor the rows of a call are sorted by token length and cut into model batches, so
padding stays small; results return in the row order of the call.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from launcher.batch.inputs import ID_COLUMN, LABEL_ID, ROW_ID_COLUMN, BatchInputError
from launcher.batch.source import ModelSource, load_scoring_model
from launcher.collate import IGNORE_INDEX, pad_sequences


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings (the recipe's `generate:` section plus a seed)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any = None, **overrides: Any) -> GenerationOptions:
        """From a GenerateConfig, a dict or None; `overrides` that are not None win."""
        values: dict[str, Any] = {}
        if cfg is not None:
            raw = cfg if isinstance(cfg, dict) else cfg.model_dump()
            values = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise BatchInputError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        opts = cls(**values)
        if opts.max_new_tokens <= 0 or opts.num_return_sequences <= 0:
            raise BatchInputError("max_new_tokens and num_return_sequences must be positive")
        if opts.temperature <= 0 or not 0 < opts.top_p <= 1:
            raise BatchInputError("temperature must be > 0 and top_p in (0, 1]")
        if opts.num_return_sequences > 1 and not opts.do_sample:
            raise BatchInputError(
                "num_return_sequences > 1 needs do_sample: true (greedy decoding returns one "
                "sequence per prompt)"
            )
        return opts


def check_template(template: str | None) -> None:
    """A prompt template must place the prompt somewhere."""
    if template is not None and "{prompt}" not in template and "{instruction}" not in template:
        raise BatchInputError(
            f"prompt template {template!r} must contain {{prompt}} (or {{instruction}}); "
            "{input} is optional"
        )


def apply_template(template: str | None, row: dict, instruction_format: bool = False) -> str:
    """The prompt text of a row: the template filled with {prompt}/{instruction} and {input}.

    With `instruction_format` the row is rendered exactly as the data stage rendered training
    prompts (its default template when `template` is None), so a fine-tuned instruction model
    sees the layout it learned. Placeholders are replaced literally: other braces stay.
    """
    prompt = str(row["prompt"])
    extra = row.get("input")
    extra = "" if extra is None else str(extra)
    if instruction_format:
        from launcher.tokenize import render_prompt

        return render_prompt(template, prompt, extra)
    if not template:
        return prompt
    check_template(template)
    filled = template.replace("{prompt}", prompt).replace("{instruction}", prompt)
    return filled.replace("{input}", extra)


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Row indices grouped into model batches of similar length (shortest first)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _pad(sequences: Sequence[Sequence[int]], pad_value: int, side: str):
    """(ids, attention mask) tensors of sequences padded on `side`."""
    mask = pad_sequences([[1] * len(seq) for seq in sequences], 0, side)
    return pad_sequences(sequences, pad_value, side), mask


def token_logprobs(model, rows: Sequence[tuple[list[int], list[int]]], pad_id: int, device):
    """Log-probability of every scored token of each (input_ids, labels) row.

    Labels follow the Hugging Face convention: aligned with input_ids, -100 where a token is
    not scored; token t is predicted from tokens before it. Right padding keeps each row's
    positions as in an unpadded forward pass.
    """
    import torch
    import torch.nn.functional as F

    if max(len(r[0]) for r in rows) < 2:  # nothing to predict in any row
        return [np.zeros(0, dtype=np.float64) for _ in rows]
    ids, mask = _pad([r[0] for r in rows], pad_id, "right")
    labels = pad_sequences([r[1] for r in rows], IGNORE_INDEX)
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    # Prompt tuning prepends virtual tokens; their logits come first.
    logits = logits[:, -ids.shape[1] :].float()
    targets = labels[:, 1:].to(device)
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(targets.shape)
    scored = targets != -100
    return [(-nll[i][scored[i]]).cpu().numpy().astype(np.float64) for i in range(len(rows))]


def class_probabilities(model, rows: Sequence[list[int]], pad_id: int, device) -> np.ndarray:
    """Softmax class probabilities, one row per input."""
    import torch

    ids, mask = _pad(rows, pad_id, "right")
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    return torch.softmax(logits.float(), dim=-1).cpu().numpy().astype(np.float64)


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    opts: GenerationOptions,
    device,
    seed: int,
    chat: bool = False,
) -> list[list[str]]:
    """Decode each prompt (left padded); num_return_sequences texts per prompt, EOS stops
    (chat: the model's end-of-turn tokens from its generation config stop too)."""
    import torch

    ids, mask = _pad(prompts, tokenizer.pad_token_id, "left")
    kwargs: dict[str, Any] = {
        "max_new_tokens": opts.max_new_tokens,
        "do_sample": opts.do_sample,
        "num_return_sequences": opts.num_return_sequences,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": _stop_ids(model, tokenizer) if chat else tokenizer.eos_token_id,
    }
    if opts.do_sample:
        kwargs.update(temperature=opts.temperature, top_p=opts.top_p, top_k=0)
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    new_tokens = out[:, ids.shape[1] :].cpu()
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    n = opts.num_return_sequences
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def _stop_ids(model, tokenizer) -> list[int]:
    """EOS and the end-of-turn tokens the exported chat model's generation config names."""
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = config if isinstance(config, list) else [config]
    ids = [tokenizer.eos_token_id, *configured]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def chat_prompt_text(tokenizer, row: dict, system_prompt: str | None) -> str:
    """A row rendered with the model's chat template and a generation prompt: its `messages`
    conversation, or its `prompt` as one user message."""
    from launcher.chat import normalize_messages

    messages = row.get("messages")
    if not isinstance(messages, list | tuple | np.ndarray):  # missing: None, or NaN from pandas
        messages = [{"role": "user", "content": str(row["prompt"])}]
    messages = normalize_messages(messages, row=0, system_prompt=system_prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_scoring_encoder(tokenizer, system_prompt: str | None = None):
    """The ChatEncoder that chat scoring uses: the model's own template, the loss taken on the
    last assistant turn (its text and the end-of-turn token(s) the template writes after it),
    as training with `train_on: last_assistant` takes it. No length limit here: the scorer cuts
    the rendered conversation at the model's limit, as it cuts plain text."""
    from launcher.chat import ChatEncoder

    return ChatEncoder(
        tokenizer, max_length=2**31, train_on="last_assistant", system_prompt=system_prompt
    )


def chat_score_messages(row: dict, prompt_field: str, completion_field: str):
    """The conversation a chat scoring row holds: its `messages`, else its prompt as a user
    message answered by its completion."""
    messages = row.get("messages")
    if messages is not None and not isinstance(messages, float):  # missing: NaN from pandas
        return messages
    return [
        {"role": "user", "content": row[prompt_field]},
        {"role": "assistant", "content": row[completion_field]},
    ]


# ------------------------------------------------------------------------------ the actor


def _pick_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _set_torch_threads() -> None:
    """Use the CPUs Ray assigned to this actor, not every core of the node."""
    import ray
    import torch

    if not ray.is_initialized():  # called directly, outside Ray: leave torch as it is
        return
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except AssertionError:  # Ray answers this only inside workers; the driver keeps its threads
        return
    torch.set_num_threads(max(1, int(cpus)))


class BatchWorker:
    """Ray Data actor: loads the model once, then runs one job kind on each pandas batch."""

    def __init__(self, source: ModelSource, job: dict):
        _set_torch_threads()
        self.device = _pick_device()
        self.model, self.tokenizer = load_scoring_model(source, self.device)
        self.source = source
        self.job = job
        limit = _max_positions(self.model, self.tokenizer)
        self.max_length = min(job.get("max_length") or limit, limit)
        self._chat_encoder = None

    def __call__(self, batch):
        return JOB_KINDS[self.job["kind"]](self, batch)

    # Tokenization helpers shared by the job kinds.
    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(str(text), add_special_tokens=special)["input_ids"]

    def encode_input(self, text: str) -> list[int]:
        """Token ids of a model input; an empty text becomes one BOS/EOS token, never nothing."""
        ids = self.encode(text)
        if ids:
            return ids
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return [start if start is not None else tok.pad_token_id]

    def lm_rows(self, batch) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) per row: the text, or the completion given the prompt, or a
        conversation's last assistant turn given the turns before it (chat)."""
        job = self.job
        rows = []
        if job.get("chat"):
            encoder = self.chat_encoder()
            for i, record in enumerate(batch.to_dict("records")):
                value = chat_score_messages(record, job["prompt_field"], job["completion_field"])
                example = encoder.encode_row(value, row=i + 1)
                rows.append(
                    (example.input_ids[: self.max_length], example.labels[: self.max_length])
                )
        elif job.get("pairs"):
            for prompt, completion in zip(
                batch[job["prompt_field"]], batch[job["completion_field"]], strict=True
            ):
                p_ids = self.encode(prompt)
                c_ids = self.encode(completion, special=False)
                ids = (p_ids + c_ids)[: self.max_length]
                labels = ([-100] * len(p_ids) + c_ids)[: self.max_length]
                rows.append((ids, labels))
        else:
            for text in batch[job["text_field"]]:
                ids = self.encode(text)[: self.max_length]
                rows.append((ids, list(ids)))
        return rows

    def chat_encoder(self):
        """The chat scoring encoder, built once per worker (it checks the template)."""
        if self._chat_encoder is None:
            self._chat_encoder = chat_scoring_encoder(self.tokenizer, self.job.get("system_prompt"))
        return self._chat_encoder

    def run_buckets(self, lengths: Sequence[int], fn: Callable[[np.ndarray], list]) -> list:
        """Call fn on length-sorted model batches; results come back in row order."""
        results: list = [None] * len(lengths)
        for bucket in length_buckets(lengths, self.job["batch_size"]):
            for index, value in zip(bucket, fn(bucket), strict=True):
                results[int(index)] = value
        return results


def _kept_columns(worker: BatchWorker, batch):
    """The input columns an output keeps: all of them, or only those the job carries."""
    if worker.job.get("keep_columns", True):
        return batch
    return batch[list(worker.job.get("carry", []))].copy()


def _lm_job(worker: BatchWorker, batch):
    """Per-row log-likelihood (sum, mean per token, count) and/or a generated output."""
    out = _kept_columns(worker, batch)
    if worker.job.get("nll", True):
        rows = worker.lm_rows(batch)
        pad = worker.tokenizer.pad_token_id
        logps = worker.run_buckets(
            [len(r[0]) for r in rows],
            lambda idx: token_logprobs(worker.model, [rows[i] for i in idx], pad, worker.device),
        )
        sums = [float(lp.sum()) for lp in logps]
        counts = [len(lp) for lp in logps]
        out["log_likelihood"] = sums
        out["num_tokens"] = counts
        out["log_likelihood_per_token"] = [
            s / c if c else None for s, c in zip(sums, counts, strict=True)
        ]
        if worker.job.get("token_logprobs"):
            out["token_logprobs"] = [lp.tolist() for lp in logps]
    if worker.job.get("generate"):
        out["output"] = _generate_first(worker, batch)
    return out


def _generate_first(worker: BatchWorker, batch) -> list[str]:
    """Greedy (or configured) first output per row, for exact-match evaluation."""
    return [texts[0] for texts in _generate_all(worker, batch)]


def _generate_all(worker: BatchWorker, batch) -> list[list[str]]:
    job = worker.job
    opts = GenerationOptions(**job["generate"])
    room = max(1, worker.max_length - opts.max_new_tokens)
    records = batch.to_dict("records")
    chat = bool(job.get("chat"))
    if chat:
        # The template writes its own special tokens (BOS included where it has one).
        prompts = [
            worker.encode(chat_prompt_text(worker.tokenizer, r, job.get("system_prompt")), False)[
                -room:
            ]
            for r in records
        ]
    else:
        prompts = [
            worker.encode_input(
                apply_template(
                    job.get("prompt_template"),
                    {**r, "prompt": r[job["prompt_field"]]},
                    job.get("instruction_format", False),
                )
            )[-room:]
            for r in records
        ]
    ids = [str(r.get(ID_COLUMN, r.get(ROW_ID_COLUMN, ""))) for r in records]

    def run(bucket: np.ndarray) -> list[list[str]]:
        seed = opts.seed + zlib.crc32(",".join(ids[i] for i in bucket).encode())
        return generate_texts(
            worker.model,
            worker.tokenizer,
            [prompts[i] for i in bucket],
            opts,
            worker.device,
            seed,
            chat=chat,
        )

    return worker.run_buckets([len(p) for p in prompts], run)


def _generation_job(worker: BatchWorker, batch):
    """One output row per prompt and return sequence, with every input column kept."""
    import pandas as pd

    texts = _generate_all(worker, batch)
    n = worker.job["generate"]["num_return_sequences"]
    out = batch.loc[batch.index.repeat(n)].reset_index(drop=True)
    out["sequence_index"] = list(range(n)) * len(batch)
    out["output"] = [t for per_row in texts for t in per_row]
    return pd.DataFrame(out)


def _classification_job(worker: BatchWorker, batch):
    """Per-label probabilities, predicted label and, when labels are known, the row loss."""
    job = worker.job
    encoded = [worker.encode_input(t)[: worker.max_length] for t in batch[job["text_field"]]]
    pad = worker.tokenizer.pad_token_id
    probs = np.asarray(
        worker.run_buckets(
            [len(e) for e in encoded],
            lambda idx: list(
                class_probabilities(worker.model, [encoded[i] for i in idx], pad, worker.device)
            ),
        )
    )
    labels = worker.source.labels or ()
    out = _kept_columns(worker, batch)
    if job.get("keep_columns", True):
        for k, name in enumerate(labels):
            out[f"prob_{name}"] = probs[:, k]
    predicted = probs.argmax(axis=1)
    out["predicted_id"] = predicted
    out["predicted_label"] = [labels[p] if p < len(labels) else str(p) for p in predicted]
    if LABEL_ID in batch:
        truth = batch[LABEL_ID].to_numpy().astype(np.int64)
        out["row_loss"] = -np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-45, None))
        out[LABEL_ID] = truth
    return out


def _tokenized_eval_job(worker: BatchWorker, batch):
    """Rows already tokenized by the data stage (input_ids, labels): loss statistics only."""
    import pandas as pd

    pad = worker.tokenizer.pad_token_id
    ids = [list(map(int, x)) for x in batch["input_ids"]]
    if worker.source.task == "classification":
        probs = np.asarray(
            worker.run_buckets(
                [len(x) for x in ids],
                lambda idx: list(
                    class_probabilities(worker.model, [ids[i] for i in idx], pad, worker.device)
                ),
            )
        )
        truth = batch["labels"].to_numpy().astype(np.int64)
        return pd.DataFrame(
            {
                "predicted_id": probs.argmax(axis=1),
                LABEL_ID: truth,
                "row_loss": -np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-45, None)),
            }
        )
    rows = [(x, list(map(int, y))) for x, y in zip(ids, batch["labels"], strict=True)]
    logps = worker.run_buckets(
        [len(x) for x in ids],
        lambda idx: token_logprobs(worker.model, [rows[i] for i in idx], pad, worker.device),
    )
    return pd.DataFrame(
        {
            "log_likelihood": [float(lp.sum()) for lp in logps],
            "num_tokens": [len(lp) for lp in logps],
        }
    )


JOB_KINDS: dict[str, Callable] = {
    "lm": _lm_job,
    "generation": _generation_job,
    "classification": _classification_job,
    "tokenized_eval": _tokenized_eval_job,
}


def _max_positions(model, tokenizer) -> int:
    config = getattr(model, "config", None)
    limits = [getattr(config, name, None) for name in ("n_positions", "max_position_embeddings")]
    limits = [int(v) for v in limits if isinstance(v, int) and v > 0]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 10**9:
        limits.append(model_max)
    return min(limits) if limits else 2048
