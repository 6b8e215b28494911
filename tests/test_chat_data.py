"""Chat rows through the data stage: recipe rules, the driver's checks, tokenization, drops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher import data as D
from launcher import tokenize as T
from launcher.chat import IGNORE_INDEX, ChatTemplateError
from launcher.data import DataError
from launcher.dev.synthetic import write_jsonl
from launcher.recipe import RecipeError, validate_data

# Every turn ends with EOS, so the end of a trained turn is a token the model learns to emit.
TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)


def make_recipe(data: dict, **finetune):
    doc = {
        "name": "t",
        "model": {"name_or_path": "tiny"},
        "data": {"format": "chat", "chat_template": TEMPLATE, **data},
        "checkpoint": {"metric": None},
    }
    if finetune:
        doc["finetune"] = finetune
    return validate_data(doc)


def conversation(i: int, turns: int = 1, layout: str = "role") -> list[dict]:
    messages = []
    for t in range(turns):
        q, a = f"what is {i} plus {t}?", f"it is {i + t}."
        if layout == "role":
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        else:
            messages += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return messages


@pytest.fixture(scope="module")
def tok(tiny_gpt2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gpt2)


def test_chat_only_fields_need_format_chat_and_lora_flags_need_lora():
    for key, value in (
        ("messages_field", "conv"),
        ("chat_template", "x.jinja"),
        ("system_prompt", "Be brief."),
        ("train_on", "all"),
    ):
        doc = {"name": "t", "model": {"name_or_path": "m"}, "data": {"train": "x", key: value}}
        with pytest.raises(RecipeError, match=rf"data\.{key}: only applies to data\.format: chat"):
            validate_data(doc)
    recipe = make_recipe({"train": "x", "packing": True, "train_on": "last_assistant"})
    assert recipe.data.packing and recipe.data.train_on == "last_assistant"
    with pytest.raises(
        RecipeError, match=r"finetune\.lora: only applies to finetune\.method: lora"
    ):
        make_recipe({"train": "x"}, method="full", lora={"use_dora": True})
    recipe = make_recipe({"train": "x"}, method="lora", lora={"use_dora": True, "use_rslora": True})
    assert recipe.finetune.lora.use_dora and recipe.finetune.lora.use_rslora


def test_both_layouts_load_as_normalized_json(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": conversation(i, layout="role" if i % 2 else "sharegpt")} for i in range(6)]
    write_jsonl(rows, path)
    recipe = make_recipe({"train": str(path), "split": {"validation": 0.0}})
    table = D.load_tables(recipe, tokenizer=tok)["train"]
    assert set(table.column_names) == {"messages", "row_id"}
    for text in table.column("messages").to_pylist():
        messages = json.loads(text)
        assert [m["role"] for m in messages] == ["user", "assistant"]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"messages": "hello"},
            r"line 1: field 'messages' \(data.messages_field\): must be a list",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"line 1: .*no assistant turn"),
        (
            {"messages": [{"role": "robot", "content": "hi"}]},
            r"line 1: field 'messages' .*unknown role 'robot'",
        ),
        ({"text": "no messages"}, r"line 1: missing field 'messages'"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, tok, row, expected):
    path = tmp_path / "chat.jsonl"
    write_jsonl([row], path)
    with pytest.raises(DataError, match=rf"chat\.jsonl: {expected}"):
        D.load_tables(make_recipe({"train": str(path)}), tokenizer=tok)


def test_missing_template_fails_in_the_load_step(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    write_jsonl([{"messages": conversation(0)}], path)
    doc = {
        "name": "t",
        "model": {"name_or_path": "tiny"},
        "data": {"format": "chat", "train": str(path)},
    }
    with pytest.raises(ChatTemplateError, match=r"has no chat template; set data.chat_template"):
        D.load_tables(validate_data(doc), tokenizer=tok)


def test_chat_batches_train_assistant_turns_and_count_drops(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    long = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    write_jsonl(
        [{"messages": conversation(i, turns=2)} for i in range(5)] + [{"messages": long}], path
    )
    recipe = make_recipe({"train": str(path), "split": {"validation": 0.0}, "max_length": 64})
    table = D.load_tables(recipe, tokenizer=tok)["train"]
    out = T.tokenizer_for_batches(recipe, tok)(table)
    assert out.num_rows == 5
    assert T.dropped_rows(out) == {"too_long": 1}
    eos = tok.eos_token_id
    for ids, labels in zip(
        out.column("input_ids").to_pylist(), out.column("labels").to_pylist(), strict=True
    ):
        assert len(ids) == len(labels) <= 64
        trained = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
        text = tok.decode(trained)
        assert "it is" in text and "what is" not in text
        assert trained.count(eos) == 2  # each assistant turn's end is learned

    data = {"train": str(path), "split": {"validation": 0.0}, "max_length": 256}
    unpacked = T.tokenizer_for_batches(make_recipe(data), tok)(table)
    packed = T.tokenizer_for_batches(make_recipe({**data, "packing": True}), tok)(table)
    assert packed.num_rows < unpacked.num_rows == 5
    lengths = packed.column("num_tokens").to_pylist()
    assert sum(lengths) == sum(unpacked.column("num_tokens").to_pylist())
    assert all(n <= 256 for n in lengths)
    assert T.dropped_rows(packed) == {"too_long": 1}
    positions = packed.column("position_ids").to_pylist()[0]
    assert positions.count(0) > 1  # several whole conversations, positions restarting in each


def test_export_keeps_the_template_and_stops_at_end_of_turn(tiny_gpt2, tmp_path):
    """transformers alone, on the exported model, renders prompts as training did and stops
    generating where a trained turn ends."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.export import export_model
    from launcher.finetune import apply_finetune
    from launcher.models import load_model, load_tokenizer

    recipe = validate_data(
        {
            "name": "t",
            "model": {"name_or_path": str(tiny_gpt2)},
            "data": {"format": "chat", "chat_template": TEMPLATE, "train": "x"},
            "finetune": {"method": "lora"},
        }
    )
    tokenizer = load_tokenizer(recipe.model)
    model = apply_finetune(load_model(recipe.model, pad_token_id=tokenizer.pad_token_id), recipe)
    export_model(recipe, model.state_dict(), tmp_path, tokenizer, merge=True)

    exported = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert exported.chat_template == TEMPLATE
    prompt = exported.apply_chat_template(
        conversation(3)[:1], tokenize=False, add_generation_prompt=True
    )
    assert prompt == f"<user>what is 3 plus 0?{tokenizer.eos_token}<assistant>"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    stops = plain.generation_config.eos_token_id
    assert tokenizer.eos_token_id in (stops if isinstance(stops, list) else [stops])


def test_end_of_turn_token_of_a_chatml_template():
    from launcher.chat import end_of_turn_ids
    from launcher.dev.synthetic import story_lines
    from launcher.dev.tiny import train_tokenizer

    tokenizer = train_tokenizer("gpt2", story_lines(50, seed=3), 300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chatml = (
        "{% for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
    )
    stops = end_of_turn_ids(tokenizer, chatml)
    assert stops == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


@pytest.fixture(scope="module")
def chat_model(tiny_gpt2, tmp_path_factory) -> Path:
    """The tiny GPT-2 exported from a chat recipe: model/ keeps TEMPLATE; the directory above
    it is a run directory (its recipe.yaml beside model/)."""
    from launcher.export import export_model
    from launcher.finetune import apply_finetune
    from launcher.models import load_model, load_tokenizer
    from launcher.recipe import dump_recipe

    recipe = validate_data(
        {
            "name": "t",
            "model": {"name_or_path": str(tiny_gpt2)},
            "data": {"format": "chat", "chat_template": TEMPLATE, "train": "x"},
            "finetune": {"method": "full"},
        }
    )
    tokenizer = load_tokenizer(recipe.model)
    model = apply_finetune(load_model(recipe.model, pad_token_id=tokenizer.pad_token_id), recipe)
    out = tmp_path_factory.mktemp("chat-model")
    export_model(recipe, model.state_dict(), out, tokenizer, merge=True)
    (out / "recipe.yaml").write_text(dump_recipe(recipe))
    return out / "model"


def test_generate_renders_messages_rows_with_the_exported_template(
    ray_session, chat_model, tmp_path
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher import batch

    rows = [{"id": f"c{i}", "messages": conversation(i)[:1]} for i in range(3)]
    src = write_jsonl(rows, tmp_path / "chats.jsonl")
    out = batch.generate(
        chat_model,
        src,
        tmp_path / "generations.jsonl",
        {"max_new_tokens": 8, "do_sample": False},
        pool=batch.PoolOptions(batch_size=2, progress=False),
    )
    lines = Path(out).read_text(encoding="utf-8").splitlines()
    got = {row["id"]: row["output"] for row in map(json.loads, lines)}
    exported = AutoTokenizer.from_pretrained(chat_model)
    plain = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    for row in rows:
        ids = exported.apply_chat_template(
            row["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            direct = plain.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
            )
        expected = exported.decode(direct[0, ids.shape[1] :], skip_special_tokens=True)
        assert got[row["id"]] == expected


def test_generate_from_a_chat_run_renders_plain_prompts_as_it_was_trained(
    ray_session, chat_model, tmp_path
):
    """A .txt of prompts and a chat run's directory, no --chat: each prompt is a user message in
    the run's chat template, as when the rows are conversations, not raw text."""
    from launcher import batch

    prompts = ["a quiet mill", "the river at night"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    conversations = [
        {"id": str(i), "messages": [{"role": "user", "content": p}]} for i, p in enumerate(prompts)
    ]
    settings = {"max_new_tokens": 8, "do_sample": False}
    pool = batch.PoolOptions(batch_size=2, progress=False)

    def outputs(model, source, **flags) -> list[str]:
        out = batch.generate(
            model,
            source,
            tmp_path / f"out-{len(flags)}-{source.name}.jsonl",
            settings,
            pool=pool,
            **flags,
        )
        return [json.loads(line)["output"] for line in Path(out).read_text().splitlines()]

    from_run = outputs(chat_model.parent, tmp_path / "prompts.txt")
    as_chats = outputs(chat_model, write_jsonl(conversations, tmp_path / "chats.jsonl"))
    raw = outputs(chat_model.parent, tmp_path / "prompts.txt", chat=False)
    assert from_run == as_chats != raw


def direct_turn_logprobs(model, tokenizer, messages: list[dict]) -> list[float]:
    """Log-probs of the last assistant turn (its text and EOS) given the rendered turns before
    it, computed with transformers alone."""
    import torch

    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    head = tokenizer.apply_chat_template(
        messages[:last], tokenize=False, add_generation_prompt=True
    )
    turn = messages[last]["content"] + tokenizer.eos_token
    head_ids = tokenizer(head, add_special_tokens=False).input_ids
    ids = tokenizer(head + turn, add_special_tokens=False).input_ids
    assert ids[: len(head_ids)] == head_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    return [logp[t - 1, ids[t]].item() for t in range(len(head_ids), len(ids))]


def test_score_takes_the_last_assistant_turn_given_the_rendered_conversation(
    ray_session, chat_model, tmp_path
):
    """Chat rows are detected from `messages`; the score is the last assistant turn with its
    end-of-turn token; a prompt/completion row with --chat is the same one-turn conversation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher import batch

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    two_turns = conversation(4, turns=2)
    one_turn = conversation(7, layout="sharegpt")
    rows = [
        {"id": "two", "messages": two_turns},
        {"id": "trailing-user", "messages": [*two_turns, {"role": "user", "content": "thanks"}]},
        {"id": "one", "messages": one_turn},
    ]
    options = batch.PoolOptions(batch_size=2, progress=False)
    out = batch.score(
        chat_model,
        write_jsonl(rows, tmp_path / "chats.jsonl"),
        tmp_path / "scores.jsonl",
        token_logprobs=True,
        pool=options,
    )
    got = {row["id"]: row for row in map(json.loads, Path(out).read_text().splitlines())}
    want = direct_turn_logprobs(model, tokenizer, two_turns)
    for key in ("two", "trailing-user"):
        assert got[key]["num_tokens"] == len(want)
        assert got[key]["token_logprobs"] == pytest.approx(want, abs=1e-5)
        assert got[key]["log_likelihood"] == pytest.approx(sum(want), abs=1e-4)
    # Input columns kept (Arrow gives every message the keys of both layouts in this file).
    kept = [{"role": m["role"], "content": m["content"]} for m in got["two"]["messages"]]
    assert kept == two_turns

    pair = {"prompt": one_turn[0]["value"], "completion": one_turn[1]["value"]}
    out = batch.score(
        chat_model,
        write_jsonl([pair], tmp_path / "pairs.jsonl"),
        tmp_path / "pair-scores.jsonl",
        chat=True,
        pool=options,
    )
    (as_chat,) = map(json.loads, Path(out).read_text().splitlines())
    assert as_chat["log_likelihood"] == pytest.approx(got["one"]["log_likelihood"], abs=1e-5)
    assert as_chat["num_tokens"] == got["one"]["num_tokens"]

    # `ftlaunch eval` on the same conversations: loss over those same scored tokens
    result = batch.evaluate(
        chat_model, tmp_path / "chats.jsonl", ["loss", "perplexity"], pool=options
    )
    tokens = sum(got[key]["num_tokens"] for key in got)
    assert result["num_rows"] == 3 and result["num_tokens"] == tokens
    nll = -sum(got[key]["log_likelihood"] for key in got)
    assert result["loss"] == pytest.approx(nll / tokens, rel=1e-5)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"messages": "hello"}, "line 2: field 'messages': must be a list of messages"),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "line 2: field 'messages': no assistant turn to score",
        ),
        (
            {"messages": [{"role": "robot", "content": "hi"}]},
            "line 2: field 'messages': message 1: unknown role 'robot'",
        ),
        ({"prompt": "hi"}, "line 2: no `completion` field"),
        (
            {"prompt": "hi", "completion": " "},
            "line 2: field 'prompt/completion': message 2: empty content (assistant)",
        ),
    ],
)
def test_score_bad_chat_rows_exit_2_naming_file_line_and_field(
    ray_session, chat_model, tmp_path, capsys, row, expected
):
    from launcher.cli import main

    good = {"messages": conversation(1)}
    src = write_jsonl([good, row], tmp_path / "chats.jsonl")
    out = tmp_path / "scores.jsonl"
    code = main(["score", str(chat_model), "--data", str(src), "--out", str(out), "--chat", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{src}, {expected}" in err
    assert not out.exists() and not list(tmp_path.glob("scores.jsonl*"))


def test_score_chat_rows_need_a_chat_template(tiny_gpt2, tmp_path, capsys):
    from launcher.cli import main

    src = write_jsonl([{"messages": conversation(1)}], tmp_path / "chats.jsonl")
    code = main(["score", str(tiny_gpt2), "--data", str(src), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "has no chat template" in err
