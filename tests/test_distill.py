"""Distillation: the loss against an independent float64 reference, the student that learns
from its teacher, students built from teacher layers, and the vocabulary check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from launcher.objectives import distillation_loss, kl_to_teacher, task_loss, topk_kl_to_teacher


def reference_softmax(row: np.ndarray, temperature: float) -> np.ndarray:
    z = row / temperature
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def reference_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True)))


def reference_causal(student, teacher, labels, temperature, alpha) -> tuple[float, float]:
    """Loops in float64: position t is distilled when labels[t + 1] is not -100."""
    s, t, y = (x.numpy().astype(np.float64) for x in (student, teacher, labels))
    kls, nlls = [], []
    for b in range(s.shape[0]):
        for pos in range(s.shape[1] - 1):
            if y[b, pos + 1] == -100:
                continue
            kls.append(
                reference_kl(
                    reference_softmax(t[b, pos], temperature),
                    reference_softmax(s[b, pos], temperature),
                )
            )
            probs = reference_softmax(s[b, pos], 1.0)
            nlls.append(-math.log(probs[int(y[b, pos + 1])]))
    kl, nll = float(np.mean(kls)), float(np.mean(nlls))
    return alpha * nll + (1 - alpha) * temperature**2 * kl, temperature**2 * kl


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.5), (3.5, 0.2)])
def test_causal_loss_matches_float64_reference_with_masking_and_t_squared(temperature, alpha):
    gen = torch.Generator().manual_seed(7)
    student = torch.randn(3, 6, 11, generator=gen) * 3
    teacher = torch.randn(3, 6, 11, generator=gen) * 3
    labels = torch.randint(0, 11, (3, 6), generator=gen)
    labels[0, :3] = -100  # a masked prompt
    labels[2, 4:] = -100  # right padding
    hard = task_loss(student, labels, "causal_lm")
    kl = kl_to_teacher(student, teacher, labels, "causal_lm", temperature)
    loss, distill = distillation_loss(hard, kl, alpha, temperature)
    want_loss, want_distill = reference_causal(student, teacher, labels, temperature, alpha)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    assert float(distill) == pytest.approx(want_distill, rel=1e-5)


def test_masked_positions_do_not_matter():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 5, 7, generator=gen)
    teacher = torch.randn(2, 5, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[:, 3:] = -100
    changed = teacher.clone()
    changed[:, 2:] += 50 * torch.randn(
        2, 3, 7, generator=gen
    )  # positions 2.. predict masked tokens
    a = kl_to_teacher(student, teacher, labels, "causal_lm", 2.0)
    b = kl_to_teacher(student, changed, labels, "causal_lm", 2.0)
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_classification_loss_is_sequence_level():
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(5, 3, generator=gen)
    teacher = torch.randn(5, 3, generator=gen)
    labels = torch.randint(0, 3, (5,), generator=gen)
    kl = kl_to_teacher(student, teacher, labels, "classification", 2.0)
    want = np.mean(
        [
            reference_kl(
                reference_softmax(teacher[i].double().numpy(), 2.0),
                reference_softmax(student[i].double().numpy(), 2.0),
            )
            for i in range(5)
        ]
    )
    assert float(kl) == pytest.approx(want, rel=1e-5)
    loss, _ = distillation_loss(task_loss(student, labels, "classification"), kl, 1.0, 2.0)
    assert float(loss) == pytest.approx(float(task_loss(student, labels, "classification")))


def test_identical_distributions_give_zero_kl_and_gradients_reach_only_the_student():
    logits = torch.randn(2, 4, 9)
    labels = torch.randint(0, 9, (2, 4))
    student = logits.clone().requires_grad_(True)
    teacher = logits.clone().requires_grad_(True)
    kl = kl_to_teacher(student, teacher, labels, "causal_lm", 2.0)
    assert float(kl.detach()) == pytest.approx(0.0, abs=1e-6)
    (kl + (student**2).sum() * 0).backward()
    assert teacher.grad is None


def test_topk_kl_is_the_renormalised_reference_and_full_k_equals_full_kl():
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(2, 5, 10, generator=gen) * 2
    teacher = torch.randn(2, 5, 10, generator=gen) * 2
    labels = torch.randint(0, 10, (2, 5), generator=gen)
    labels[1, :2] = -100
    logprobs = torch.log_softmax(teacher, -1)
    for k in (3, 10):
        top, ids = logprobs.topk(k, dim=-1)
        got = topk_kl_to_teacher(student, top, ids, labels, "causal_lm", 2.0)
        kls = []
        for b in range(2):
            for pos in range(4):
                if labels[b, pos + 1] == -100:
                    continue
                sel = ids[b, pos].numpy()
                p = reference_softmax(teacher[b, pos].double().numpy()[sel], 2.0)
                q = reference_softmax(student[b, pos].double().numpy()[sel], 2.0)
                kls.append(reference_kl(p, q))
        assert float(got) == pytest.approx(float(np.mean(kls)), rel=1e-5)
    full = kl_to_teacher(student, teacher, labels, "causal_lm", 2.0)
    assert float(got) == pytest.approx(float(full), rel=1e-5)  # k = vocabulary: nothing left out


# ------------------------------------------------------------------ learning from a teacher


def lm_batches(model_dir, texts: list[str], batch_size: int = 8, length: int = 24):
    """Texts as padded causal-LM batches (labels -100 on padding)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size],
            truncation=True,
            max_length=length,
            padding="max_length",
            return_tensors="pt",
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append(
            {
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "labels": labels,
            }
        )
    return out


def train_plain(model, batches, steps: int, lr: float, loss_of) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def held_out_kl(student, teacher, batches) -> float:
    student.eval()
    with torch.no_grad():
        values = [
            float(
                kl_to_teacher(
                    student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                    teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                    b["labels"],
                    "causal_lm",
                    1.0,
                )
            )
            for b in batches
        ]
    return float(np.mean(values))


@pytest.mark.slow
def test_student_with_distillation_ends_closer_to_the_teacher(tiny_gpt2, tmp_path):
    """The teacher learned reviews, the students see stories: only distillation carries the
    teacher's behaviour over, so only the distilled student ends up near it on held-out stories."""
    from transformers import AutoModelForCausalLM

    from launcher.dev.synthetic import review_rows, story_lines
    from launcher.dev.tiny import build_tiny_model

    student_dir = build_tiny_model(tmp_path / "student", "gpt2", layers=1, width=32, seed=2)
    reviews = lm_batches(tiny_gpt2, [r["text"] for r in review_rows(96, seed=1)])
    stories = lm_batches(tiny_gpt2, story_lines(96, seed=2))
    held_out = lm_batches(tiny_gpt2, story_lines(32, seed=3))

    def lm_loss(model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return task_loss(out.logits, batch["labels"], "causal_lm")

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    train_plain(teacher, reviews, 20, 3e-3, lm_loss)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def distilled_loss(model, batch):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        student = model(**inputs).logits
        with torch.no_grad():
            soft = teacher(**inputs).logits
        hard = task_loss(student, batch["labels"], "causal_lm")
        kl = kl_to_teacher(student, soft, batch["labels"], "causal_lm", 2.0)
        return distillation_loss(hard, kl, 0.5, 2.0)[0]

    results = {}
    for name, loss_of in (("plain", lm_loss), ("distilled", distilled_loss)):
        torch.manual_seed(0)
        student = AutoModelForCausalLM.from_pretrained(student_dir)
        train_plain(student, stories, 20, 3e-3, loss_of)
        results[name] = held_out_kl(student, teacher, held_out)
    assert results["distilled"] < results["plain"] * 0.7, results


# --------------------------------------------------------------- students from teacher layers


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_student_from_teacher_layers_copies_chosen_blocks_and_the_rest(arch):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from launcher.dev.tiny import model_config
    from launcher.distill import block_list, student_from_teacher

    torch.manual_seed(0)
    cfg = model_config(arch, 80, width=32, layers=5)
    if arch == "bert":
        cfg.num_labels = 2
        teacher = AutoModelForSequenceClassification.from_config(cfg).eval()
    else:
        teacher = AutoModelForCausalLM.from_config(cfg).eval()
    student = student_from_teacher(teacher, [0, 2, 4]).eval()
    path, blocks = block_list(student)
    assert len(blocks) == 3 and student.config.num_hidden_layers == 3
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for key, value in student_state.items():
        if key.startswith(path + "."):
            index, _, rest = key[len(path) + 1 :].partition(".")
            source = f"{path}.{[0, 2, 4][int(index)]}.{rest}"
        else:
            source = key  # embeddings, final norm, head
        assert torch.equal(value, teacher_state[source]), key
    ids = torch.randint(0, 80, (2, 7))
    assert student(input_ids=ids).logits.shape[-1] == teacher(input_ids=ids).logits.shape[-1]


def test_student_from_teacher_refuses_missing_layers():
    from transformers import AutoModelForCausalLM

    from launcher.dev.tiny import model_config
    from launcher.distill import DistillError, student_from_teacher

    teacher = AutoModelForCausalLM.from_config(model_config("gpt2", 80, width=32, layers=2))
    with pytest.raises(DistillError, match=r"layer\(s\) \[4\] do not exist; the teacher has 2"):
        student_from_teacher(teacher, [0, 4])


# ------------------------------------------------------------------------ vocabulary check


class FakeTokenizer:
    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def test_vocabulary_mismatch_names_where_they_differ():
    from launcher.distill import VocabularyMismatch, check_vocabularies

    same = {"a": 0, "b": 1, "c": 2}
    check_vocabularies(FakeTokenizer(same), FakeTokenizer(dict(same)), "s", "t")
    with pytest.raises(VocabularyMismatch) as info:
        check_vocabularies(
            FakeTokenizer(same), FakeTokenizer({"a": 0, "x": 1, "c": 2, "d": 3}), "stu", "tea"
        )
    message = str(info.value)
    assert "distill.teacher: tea" in message and "stu" in message
    assert "(4 vs 3 tokens)" in message
    assert "id 1: student 'b' / teacher 'x'" in message
    assert "id 3: only in the teacher ('d')" in message
    assert isinstance(info.value, ValueError)


def test_cli_maps_distillation_errors_to_exit_2():
    from launcher.cli import EXIT_BAD_INPUT, exit_code_for
    from launcher.distill import DistillError, VocabularyMismatch

    assert exit_code_for(VocabularyMismatch("x")) == EXIT_BAD_INPUT
    assert exit_code_for(DistillError("x")) == EXIT_BAD_INPUT


# ------------------------------------------------------------------ offline columns, cache key


def test_collate_teacher_pads_top_k_per_token():
    from launcher.data import collate

    k = 3
    rows = [[5, 6, 7, 8], [9, 10]]
    batch = {
        "input_ids": np.array([np.array(r) for r in rows], dtype=object),
        "attention_mask": np.array([np.ones(len(r)) for r in rows], dtype=object),
        "labels": np.array([np.array(r) for r in rows], dtype=object),
        "teacher_logprobs": np.array(
            [np.arange(len(r) * k, dtype=np.float32) * -0.1 for r in rows], dtype=object
        ),
        "teacher_ids": np.array([np.arange(len(r) * k) for r in rows], dtype=object),
    }
    out = collate(batch, pad_token_id=0)
    assert out["teacher_ids"].shape == out["teacher_logprobs"].shape == (2, 4, k)
    assert out["teacher_logprobs"].dtype == torch.float32
    assert out["teacher_ids"][1, 1].tolist() == [3, 4, 5]
    assert out["teacher_logprobs"][1, 2:].abs().sum() == 0  # padding
    # classification: one top-k per row
    cls = {
        "input_ids": batch["input_ids"],
        "labels": np.array([0, 1]),
        "teacher_logprobs": np.array([[-0.1, -2.0], [-0.5, -0.9]], dtype=np.float32),
        "teacher_ids": np.array([[1, 0], [0, 1]]),
    }
    assert collate(cls, pad_token_id=0)["teacher_ids"].shape == (2, 2)


def test_offline_cache_key_follows_teacher_data_and_tokenization(tiny_gpt2, tmp_path):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from launcher.distill import _digest, offline_settings
    from launcher.recipe import validate_data

    data_file = tmp_path / "train.jsonl"
    data_file.write_text('{"text": "a b c"}\n')
    body = {
        "name": "k",
        "model": {"name_or_path": str(tiny_gpt2)},
        "data": {"train": str(data_file), "max_length": 32},
        "distill": {"teacher": {"name_or_path": str(tiny_gpt2)}, "mode": "offline", "top_k": 8},
    }
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    prepared = SimpleNamespace(num_rows={"train": 1})

    def key(change: dict | None = None, section: str = "data") -> str:
        data = {**body, section: {**body[section], **(change or {})}}
        return _digest(offline_settings(validate_data(data), tokenizer, prepared))

    base = key()
    assert key() == base
    assert key({"max_length": 64}) != base  # tokenization
    assert key({"top_k": 4}, "distill") != base  # what is stored
    data_file.write_text('{"text": "a b c d"}\n')
    assert key() != base  # the data file changed
    assert key({"temperature": 3.0}, "distill") == key()  # applied at training time only


def test_teacher_pass_stores_top_k_log_probs_per_real_token(tiny_gpt2):
    import pyarrow as pa
    from transformers import AutoModelForCausalLM

    from launcher.distill import TeacherTopK
    from launcher.recipe import validate_data

    recipe = validate_data(
        {
            "name": "t",
            "model": {"name_or_path": str(tiny_gpt2)},
            "data": {"train": "x.jsonl"},
            "distill": {"teacher": {"name_or_path": str(tiny_gpt2)}, "mode": "offline", "top_k": 4},
        }
    )
    rows = [[5, 6, 7, 8, 9], [10, 11]]
    table = pa.table(
        {
            "input_ids": pa.array(rows, pa.list_(pa.int32())),
            "attention_mask": pa.array([[1] * len(r) for r in rows], pa.list_(pa.int8())),
            "labels": pa.array(rows, pa.list_(pa.int32())),
        }
    )
    out = TeacherTopK(recipe.model_dump(mode="json"), pad_token_id=0)(table)
    assert out.column_names[:3] == table.column_names  # the tokens stay, columns are added
    second = out.slice(1, 1).to_pylist()[0]
    assert len(second["teacher_ids"]) == len(second["teacher_logprobs"]) == 2 * 4
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    with torch.no_grad():
        want = torch.log_softmax(model(input_ids=torch.tensor([rows[1]])).logits[0], -1)
    top, ids = want.topk(4, dim=-1)
    assert second["teacher_ids"] == ids.reshape(-1).tolist()
    np.testing.assert_allclose(
        second["teacher_logprobs"], top.reshape(-1).numpy(), rtol=1e-4, atol=1e-5
    )


def test_classification_teacher_must_predict_the_recipe_labels(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from launcher.distill import DistillError, check_teacher_head
    from launcher.recipe import validate_data

    three = tmp_path / "three"
    AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3).save_pretrained(
        three
    )

    def recipe(teacher):
        return validate_data(
            {
                "name": "c",
                "model": {
                    "name_or_path": str(tiny_bert),
                    "task": "classification",
                    "labels": ["negative", "positive"],
                },
                "data": {"train": "x.jsonl", "format": "classification"},
                "distill": {"teacher": {"name_or_path": str(teacher)}},
            }
        )

    with pytest.raises(DistillError, match="predicts 3 labels"):
        check_teacher_head(recipe(three))
    assert "has no sequence classification head" in check_teacher_head(recipe(tiny_bert))
