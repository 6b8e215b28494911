"""Batch evaluation, generation and scoring through Ray Data, checked against direct model calls."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from launcher import batch
from launcher.cli import main
from launcher.dev.synthetic import write_jsonl

LABELS = ["negative", "positive"]


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def cls_model(tiny_bert, tmp_path_factory):
    """A 2-label sentiment classifier built from the tiny BERT encoder (random head)."""
    out = tmp_path_factory.mktemp("cls") / "bert-cls"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert,
        num_labels=2,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    return model, tokenizer


# ------------------------------------------------------------------------ no Ray needed


def test_read_prompts_jsonl_without_prompt_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hello"}\n{"text": "no prompt here"}\n')
    with pytest.raises(batch.BatchInputError) as info:
        batch.read_prompts(path)
    message = str(info.value)
    assert f"{path}, line 2" in message
    assert "no `prompt` field (fields: text)" in message


def test_read_prompts_txt_and_bad_suffix(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    assert batch.read_prompts(txt) == ["first prompt", "second prompt"]
    with pytest.raises(batch.BatchInputError, match=r"prompts must be a \.jsonl file"):
        batch.read_prompts(tmp_path / "prompts.csv")


def test_resolve_model_kinds(tmp_path, tiny_gpt2, cls_model):
    with pytest.raises(batch.BatchInputError, match="model directory not found"):
        batch.resolve_model(tmp_path / "missing")
    assert batch.resolve_model(tiny_gpt2).task == "causal_lm"
    source = batch.resolve_model(cls_model)
    assert (source.task, source.labels) == ("classification", tuple(LABELS))
    with pytest.raises(batch.BatchInputError, match="cannot tell whether"):
        batch.resolve_model(_bare_bert(tmp_path))
    empty_run = tmp_path / "run"
    (empty_run / "checkpoints").mkdir(parents=True)
    (empty_run / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(batch.BatchInputError, match="neither model/ nor adapter/"):
        batch.resolve_model(empty_run)


def _bare_bert(tmp_path):
    """A model directory whose architectures say neither causal LM nor classifier."""
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    return bare


def test_run_dir_with_adapter_only_loads_base_plus_adapter(tmp_path, tiny_gpt2, gpt2):
    from peft import LoraConfig, get_peft_model

    base, tokenizer = gpt2
    torch.manual_seed(1)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_gpt2),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False),
    )
    run = tmp_path / "run"
    peft_model.save_pretrained(run / "adapter")
    recipe = {"name": "r", "model": {"name_or_path": str(tiny_gpt2), "task": "causal_lm"}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    source = batch.resolve_model(run)
    assert source.adapter == str(run / "adapter") and source.name_or_path == str(tiny_gpt2)
    model, tok = batch.load_scoring_model(source)
    ids = tokenizer("the fox ran home", return_tensors="pt").input_ids
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = peft_model.eval()(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter really is applied
    assert tok.pad_token_id is not None


def test_length_buckets_group_similar_lengths():
    buckets = batch.length_buckets([5, 1, 9, 2, 7, 3], 2)
    assert [b.tolist() for b in buckets] == [[1, 3], [5, 0], [4, 2]]


def test_generation_options_validation():
    opts = batch.GenerationOptions.from_config({"max_new_tokens": 5, "prompts": "x"}, seed=3)
    assert (opts.max_new_tokens, opts.seed, opts.do_sample) == (5, 3, False)
    with pytest.raises(batch.BatchInputError, match="needs do_sample"):
        batch.GenerationOptions.from_config({"num_return_sequences": 2})
    with pytest.raises(batch.BatchInputError, match=r"must contain \{prompt\}"):
        batch.apply_template("{question}", {"prompt": "p"})
    assert batch.apply_template("Q: {instruction}\n{input}\nA:", {"prompt": "p"}) == "Q: p\n\nA:"
    assert batch.apply_template("{prompt} {x}", {"prompt": "p"}) == "p {x}"  # other braces stay


# ------------------------------------------------------------------------ through Ray


def test_perplexity_equals_plain_loop(ray_session, tiny_gpt2, story_data, gpt2, tmp_path):
    model, tokenizer = gpt2
    texts = [row["text"] for row in read_jsonl(story_data["validation"])]
    total_nll = total_tokens = 0.0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            scored = ids.shape[1] - 1
            total_nll += model(input_ids=ids, labels=ids).loss.item() * scored
            total_tokens += scored
    result = batch.evaluate(
        tiny_gpt2,
        story_data["validation"],
        ["loss", "perplexity"],
        pool=batch.PoolOptions(batch_size=4, progress=False),
        out_dir=tmp_path,
    )
    assert result["num_rows"] == len(texts)
    assert result["num_tokens"] == total_tokens
    assert result["loss"] == pytest.approx(total_nll / total_tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
    assert json.loads((tmp_path / "eval.json").read_text()) == result


def test_greedy_generation_equals_model_generate(ray_session, tiny_gpt2, gpt2, tmp_path):
    model, tokenizer = gpt2
    sentence = "the quiet fox walked past the old mill and sang to the river at night"
    prompts = [sentence[: 3 + (i * 17) % 60].strip() for i in range(10)]  # mixed lengths
    rows = [{"prompt": p, "id": f"p{i}", "topic": i % 3} for i, p in enumerate(prompts)]
    src = write_jsonl(rows, tmp_path / "prompts.jsonl")
    out = batch.generate(
        tiny_gpt2,
        src,
        tmp_path / "generations.jsonl",
        {"max_new_tokens": 12, "do_sample": False},
        pool=batch.PoolOptions(batch_size=4, progress=False),
    )
    written = read_jsonl(out)
    assert [row["id"] for row in written] == [row["id"] for row in rows]  # prompt order kept
    got = {row["id"]: row for row in written}
    for row in rows:
        ids = tokenizer(row["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            direct = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        expected = tokenizer.decode(direct[0, ids.shape[1] :], skip_special_tokens=True)
        assert got[row["id"]]["output"] == expected, row["prompt"]
        assert got[row["id"]]["topic"] == row["topic"]  # original columns kept
        assert got[row["id"]]["sequence_index"] == 0


def test_causal_scoring_of_completion_given_prompt(ray_session, tiny_gpt2, gpt2, tmp_path):
    model, tokenizer = gpt2
    rows = [
        {"prompt": "Cleo sang about the", "completion": " river and the mill."},
        {"prompt": "The fox", "completion": " ran home."},
        {"prompt": "A long walk past the hills and the old", "completion": " barn"},
    ]
    src = write_jsonl(rows, tmp_path / "pairs.jsonl")
    out = batch.score(
        tiny_gpt2,
        src,
        tmp_path / "scores.parquet",
        token_logprobs=True,
        pool=batch.PoolOptions(batch_size=2, progress=False),
    )
    table = pq.read_table(out).to_pylist()
    assert sorted(r["row_id"] for r in table) == [0, 1, 2]
    for got in table:
        row = rows[got["row_id"]]
        p_ids = tokenizer(row["prompt"]).input_ids
        c_ids = tokenizer(row["completion"], add_special_tokens=False).input_ids
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
        want = [logp[len(p_ids) - 1 + k, t].item() for k, t in enumerate(c_ids)]
        assert got["prompt"] == row["prompt"] and got["num_tokens"] == len(c_ids)
        assert got["token_logprobs"] == pytest.approx(want, abs=1e-5)
        assert got["log_likelihood"] == pytest.approx(sum(want), abs=1e-4)
        assert got["log_likelihood_per_token"] == pytest.approx(sum(want) / len(want), abs=1e-5)


def test_small_inputs_in_the_driver_match_the_actor_pool(
    ray_session, tiny_gpt2, story_data, tmp_path, monkeypatch
):
    """Under batch.pool.IN_DRIVER_ROWS rows without GPUs the model runs in the driver: the
    same rows, columns, order and scores as on the actor pool."""
    from launcher.batch import pool as batch_pool

    def both(make) -> list:
        monkeypatch.setattr(batch_pool, "BatchWorker", counting)
        made.clear()
        in_driver = make("driver")
        assert made, "a small CPU job did not run in the driver"
        monkeypatch.setenv("FTLAUNCH_IN_PROCESS", "0")
        made.clear()
        on_pool = make("pool")
        assert not made  # the pool's actors use their own copy of the class
        monkeypatch.delenv("FTLAUNCH_IN_PROCESS")
        return [in_driver, on_pool]

    made: list = []

    class counting(batch_pool.BatchWorker):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    options = batch.PoolOptions(batch_size=4, progress=False)
    scored = both(
        lambda where: pq.read_table(
            batch.score(
                tiny_gpt2,
                story_data["validation"],
                tmp_path / f"{where}.parquet",
                token_logprobs=True,
                pool=options,
            )
        )
    )
    assert scored[0].equals(scored[1])
    evaluated = both(
        lambda where: batch.evaluate(
            tiny_gpt2,
            story_data["validation"],
            ["loss", "perplexity"],
            pool=options,
            out_dir=tmp_path / where,
        )
    )
    assert evaluated[0] == evaluated[1]


def test_classification_eval_and_score_match_direct_model(
    ray_session, cls_model, review_data, tmp_path
):
    rows = read_jsonl(review_data["test"])
    tokenizer = AutoTokenizer.from_pretrained(cls_model)
    model = AutoModelForSequenceClassification.from_pretrained(cls_model).eval()
    with torch.no_grad():
        probs = np.stack(
            [
                torch.softmax(model(**tokenizer(r["text"], return_tensors="pt")).logits[0], -1)
                .numpy()
                .astype(np.float64)
                for r in rows
            ]
        )
    truth = np.array([LABELS.index(r["label"]) for r in rows])
    predicted = probs.argmax(axis=1)

    result = batch.evaluate(
        cls_model,
        review_data["test"],
        ["loss", "accuracy", "f1", "precision", "recall"],
        pool=batch.PoolOptions(batch_size=8, progress=False),
        out_dir=tmp_path,
    )
    assert result["num_rows"] == len(rows)
    assert result["accuracy"] == pytest.approx(float(np.mean(predicted == truth)))
    expected_loss = float(np.mean(-np.log(probs[np.arange(len(rows)), truth])))
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-4)
    matrix = np.zeros((2, 2), dtype=int)
    np.add.at(matrix, (truth, predicted), 1)
    assert result["confusion_matrix"] == {"labels": LABELS, "matrix": matrix.tolist()}
    assert set(result["per_label"]) == set(LABELS)
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000

    out = batch.score(
        cls_model,
        review_data["test"],
        tmp_path / "scored.jsonl",
        pool=batch.PoolOptions(batch_size=8, progress=False),
    )
    scored = sorted(read_jsonl(out), key=lambda r: r["row_id"])
    assert [r["text"] for r in scored] == [r["text"] for r in rows]
    got = np.array([[r["prob_negative"], r["prob_positive"]] for r in scored])
    assert got == pytest.approx(probs, abs=1e-5)
    assert [r["predicted_label"] for r in scored] == [LABELS[i] for i in predicted]


def test_unknown_label_in_eval_data_is_bad_input(ray_session, cls_model, tmp_path):
    src = write_jsonl(
        [{"text": "fine", "label": "positive"}, {"text": "meh", "label": "neutral"}],
        tmp_path / "bad.jsonl",
    )
    with pytest.raises(batch.BatchInputError, match=r"bad.jsonl, line 2: label 'neutral'"):
        batch.evaluate(cls_model, src, ["accuracy"], pool=batch.PoolOptions(progress=False))


# ------------------------------------------------------------------------ CLI exit codes


def test_cli_missing_model_dir_exits_2(tmp_path, capsys):
    data = write_jsonl([{"text": "a b c"}], tmp_path / "d.jsonl")
    code = main(["score", str(tmp_path / "no-such-run"), "--data", str(data), "--out", "o.jsonl"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: model directory not found: {tmp_path / 'no-such-run'}" in err
    assert "Traceback" not in err


def test_cli_scores_a_classifier_saved_with_default_labels(ray_session, tiny_bert, tmp_path):
    """transformers 5 leaves the default id2label (LABEL_0, LABEL_1) out of config.json."""
    model_dir = tmp_path / "stock-cls"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).save_pretrained(
        model_dir
    )
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(model_dir)
    data = write_jsonl([{"text": "a fine mug"}, {"text": "it broke"}], tmp_path / "d.jsonl")
    out = tmp_path / "scores.jsonl"
    code = main(["score", str(model_dir), "--data", str(data), "--out", str(out), "-q"])
    assert code == 0
    rows = read_jsonl(out)
    assert len(rows) == 2
    for row in rows:
        probs = [row["prob_LABEL_0"], row["prob_LABEL_1"]]
        assert math.isclose(sum(probs), 1.0, rel_tol=1e-5)
        assert row["predicted_label"] in ("LABEL_0", "LABEL_1")


def test_cli_prompts_without_prompt_field_exits_2(ray_session, tiny_gpt2, tmp_path, capsys):
    prompts = write_jsonl([{"prompt": "ok"}, {"question": "where?"}], tmp_path / "p.jsonl")
    out = tmp_path / "g.jsonl"
    code = main(["generate", str(tiny_gpt2), "--prompts", str(prompts), "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{prompts}, line 2: no `prompt` field (fields: question)" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_cli_generate_with_classifier_exits_2(cls_model, tmp_path, capsys):
    prompts = write_jsonl([{"prompt": "hello"}], tmp_path / "p.jsonl")
    code = main(
        ["generate", str(cls_model), "--prompts", str(prompts), "--out", str(tmp_path / "g.jsonl")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "generate needs a causal language model" in err
    assert "classification model (labels: negative, positive)" in err


def test_cli_eval_metric_not_for_task_exits_2(cls_model, tmp_path, capsys):
    data = write_jsonl([{"text": "fine", "label": "positive"}], tmp_path / "d.jsonl")
    code = main(["eval", str(cls_model), "--data", str(data), "--metrics", "accuracy,perplexity"])
    err = capsys.readouterr().err
    assert code == 2
    assert "perplexity not available for a classification model" in err


# ------------------------------------------------------------------------ after training


def test_exact_match_counts_whitespace_normalised_greedy_outputs(
    ray_session, tiny_gpt2, gpt2, tmp_path
):
    model, tokenizer = gpt2
    prompts = ["the fox", "Cleo sang about", "a quiet mill", "the river at night"]
    rows = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        greedy = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        # Half the references are the greedy output with extra whitespace, half are wrong.
        reference = f"  {greedy} \n" if i % 2 == 0 else greedy + " nope"
        rows.append({"prompt": prompt, "completion": reference})
    src = write_jsonl(rows, tmp_path / "em.jsonl")
    result = batch.evaluate(
        tiny_gpt2,
        src,
        ["exact_match"],
        gen_cfg={"max_new_tokens": 6},
        pool=batch.PoolOptions(batch_size=2, progress=False),
    )
    assert result == {"num_rows": 4, "exact_match": 0.5}
    # instruction rows name their reference `output`, the column the generated text goes to
    named = [{"instruction": r["prompt"], "output": r["completion"]} for r in rows]
    result = batch.evaluate(
        tiny_gpt2,
        write_jsonl(named, tmp_path / "em-instructions.jsonl"),
        ["exact_match"],
        prompt_field="instruction",
        reference_field="output",
        gen_cfg={"max_new_tokens": 6},
        pool=batch.PoolOptions(batch_size=2, progress=False),
    )
    assert result == {"num_rows": 4, "exact_match": 0.5}


def write_recipe(path, **sections):
    path.write_text(yaml.safe_dump({"name": "batch-run", **sections}, sort_keys=False))
    from launcher.recipe import load_recipe

    return load_recipe(path)


@pytest.mark.slow
def test_evaluate_run_and_generate_run_on_an_instruction_run(
    ray_session, tiny_gpt2, gpt2, instruction_data, tmp_path
):
    import shutil

    from launcher import data as D
    from launcher import tokenize as T

    run = tmp_path / "run"
    shutil.copytree(tiny_gpt2, run / "model")
    prompts = write_jsonl(
        [{"prompt": "Is this review positive or negative?", "input": "Great mug."}],
        tmp_path / "prompts.jsonl",
    )
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        model={"name_or_path": str(tiny_gpt2)},
        data={
            "train": str(instruction_data["train"]),
            "validation": str(instruction_data["validation"]),
            "format": "instruction",
        },
        evaluate={"metrics": ["loss", "perplexity", "exact_match"], "batch_size": 8},
        generate={"prompts": str(prompts), "max_new_tokens": 5},
    )
    (run / "recipe.yaml").write_text((tmp_path / "recipe.yaml").read_text())

    result = batch.evaluate_run(recipe, run, progress=False)

    # Reference: the same rows tokenized by the data stage, scored one by one.
    model, tokenizer = gpt2
    tokenizer.pad_token = tokenizer.eos_token
    table = D.load_tables(recipe)["validation"]
    tokenized = T.tokenize_instruction(table, tokenizer, recipe.data.max_length, None)
    nll = tokens = 0.0
    with torch.no_grad():
        for ids, labels in zip(
            tokenized["input_ids"].to_pylist(), tokenized["labels"].to_pylist(), strict=True
        ):
            scored = sum(1 for t in labels[1:] if t != -100)
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            nll += out.loss.item() * scored
            tokens += scored
    assert result["num_tokens"] == tokens
    assert result["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert 0.0 <= result["exact_match"] <= 1.0
    assert json.loads((run / "eval.json").read_text()) == result

    path = batch.generate_run(recipe, run, progress=False)
    assert path == run / "generations.jsonl"
    (row,) = read_jsonl(path)
    assert row["prompt"] == "Is this review positive or negative?"
    rendered = T.render_prompt(None, row["prompt"], "Great mug.")
    ids = tokenizer(rendered, return_tensors="pt").input_ids
    with torch.no_grad():
        direct = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    assert row["output"] == tokenizer.decode(direct[0, ids.shape[1] :], skip_special_tokens=True)
    # `ftlaunch generate RUN` with no template given renders the prompts as the run trained
    out = batch.generate(run, prompts, tmp_path / "cli.jsonl", {"max_new_tokens": 5})
    assert [r["output"] for r in read_jsonl(out)] == [row["output"]]
    # `ftlaunch eval RUN --data` on instruction rows: the tokens the run's evaluation scored
    again = batch.evaluate(run, instruction_data["validation"], ["loss", "perplexity"])
    assert again["num_tokens"] == result["num_tokens"]
    assert again["loss"] == pytest.approx(result["loss"], rel=1e-5)


# ------------------------------------------------------------------------ actor, without Ray


def test_worker_scores_tokenized_rows_like_the_model(cls_model, tiny_gpt2, gpt2):
    import pandas as pd

    tokenizer = AutoTokenizer.from_pretrained(cls_model)
    texts = ["great mug", "the strap broke after a day of use", "fine"]
    ids = [tokenizer(t).input_ids for t in texts]
    worker = batch.BatchWorker(
        batch.resolve_model(cls_model), {"kind": "tokenized_eval", "batch_size": 2}
    )
    out = worker(pd.DataFrame({"input_ids": ids, "labels": [1, 0, 1]}))
    model = AutoModelForSequenceClassification.from_pretrained(cls_model).eval()
    with torch.no_grad():
        probs = [torch.softmax(model(input_ids=torch.tensor([x])).logits[0], -1) for x in ids]
    assert out["predicted_id"].tolist() == [int(p.argmax()) for p in probs]
    want_loss = [-math.log(p[y].item()) for p, y in zip(probs, [1, 0, 1], strict=True)]
    assert out["row_loss"].tolist() == pytest.approx(want_loss, rel=1e-5)

    lm, lm_tok = gpt2
    rows = [lm_tok("the fox ran").input_ids, lm_tok("a quiet mill by the river").input_ids]
    labels = [[-100, -100, *r[2:]] for r in rows]  # the second token is not scored
    worker = batch.BatchWorker(
        batch.resolve_model(tiny_gpt2), {"kind": "tokenized_eval", "batch_size": 2}
    )
    out = worker(pd.DataFrame({"input_ids": rows, "labels": labels}))
    for i, r in enumerate(rows):
        with torch.no_grad():
            loss = lm(input_ids=torch.tensor([r]), labels=torch.tensor([labels[i]])).loss.item()
        scored = len(r) - 2  # the first token predicts nothing; the second is masked
        assert out["num_tokens"][i] == scored
        assert -out["log_likelihood"][i] == pytest.approx(loss * scored, rel=1e-5)


def test_sampling_is_seeded_and_returns_n_sequences(gpt2):
    model, tokenizer = gpt2
    tokenizer.pad_token = tokenizer.eos_token
    prompts = [tokenizer("the fox").input_ids, tokenizer("Cleo sang about the").input_ids]
    opts = batch.GenerationOptions(
        max_new_tokens=6, do_sample=True, temperature=1.5, num_return_sequences=3
    )
    first = batch.generate_texts(model, tokenizer, prompts, opts, torch.device("cpu"), seed=7)
    again = batch.generate_texts(model, tokenizer, prompts, opts, torch.device("cpu"), seed=7)
    other = batch.generate_texts(model, tokenizer, prompts, opts, torch.device("cpu"), seed=8)
    assert [len(t) for t in first] == [3, 3]
    assert first == again
    assert first != other


@pytest.mark.slow
def test_evaluate_run_on_a_classification_run(ray_session, cls_model, review_data, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cls_model, run / "model")
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        model={"name_or_path": str(cls_model), "task": "classification", "labels": LABELS},
        data={
            "train": str(review_data["train"]),
            "test": str(review_data["test"]),
            "format": "classification",
        },
        evaluate={"metrics": ["loss", "accuracy", "f1"], "batch_size": 8},
    )
    result = batch.evaluate_run(recipe, run, progress=False)

    rows = read_jsonl(review_data["test"])
    tokenizer = AutoTokenizer.from_pretrained(cls_model)
    model = AutoModelForSequenceClassification.from_pretrained(cls_model).eval()
    with torch.no_grad():
        predicted = [
            int(model(**tokenizer(r["text"], return_tensors="pt")).logits[0].argmax()) for r in rows
        ]
    truth = [LABELS.index(r["label"]) for r in rows]
    assert result["num_rows"] == len(rows)
    assert result["accuracy"] == pytest.approx(
        sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(rows)
    )
    assert sum(map(sum, result["confusion_matrix"]["matrix"])) == len(rows)
    assert (run / "eval.json").exists() and (run / "confusion_matrix.png").exists()


def test_recipe_refuses_metrics_that_do_not_fit_the_task(tmp_path):
    from launcher.recipe import RecipeError, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(
        "name: r\nmodel: {name_or_path: gpt2}\ndata: {train: a.jsonl}\n"
        "evaluate: {metrics: [loss, accuracy, exact_match]}\n"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = info.value.render()
    assert "evaluate.metrics: accuracy is not a metric of model.task: causal_lm" in text
    assert "exact_match needs data.format: instruction" in text
