"""Data the project generates itself: for the quickstart, smoke runs and tests.

Short product reviews with a sentiment label, short story lines for language modelling, and
short conversations about the reviews, built from templates with a seeded random generator (so
every run makes the same rows).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_ITEMS = [
    "coffee maker",
    "headphones",
    "backpack",
    "desk lamp",
    "blender",
    "keyboard",
    "rain jacket",
    "water bottle",
    "phone case",
    "bookshelf",
    "kettle",
    "monitor",
]
_GOOD = [
    "works perfectly",
    "exceeded my expectations",
    "is sturdy and well made",
    "was worth every penny",
    "arrived early and works great",
    "is a joy to use",
    "feels premium",
    "has been reliable for months",
]
_BAD = [
    "broke after two days",
    "stopped working within a week",
    "feels cheap and flimsy",
    "was a waste of money",
    "arrived damaged",
    "is noisy and slow",
    "never worked properly",
    "fell apart quickly",
]
_GOOD_END = ["I would buy it again.", "Highly recommended.", "Five stars.", "Love it."]
_BAD_END = ["I want a refund.", "Do not buy this.", "One star.", "Very disappointed."]
_NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana"]
_PLACES = ["the harbour", "the old mill", "the market", "the forest", "the library", "the hill"]
_ACTS = ["walked to", "ran past", "painted", "remembered", "sang about", "looked for"]


def review_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` labelled reviews: {"text": ..., "label": "negative" | "positive"}, balanced."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        item = rng.choice(_ITEMS)
        verdict = rng.choice(_GOOD if positive else _BAD)
        end = rng.choice(_GOOD_END if positive else _BAD_END)
        rows.append(
            {
                "text": f"The {item} {verdict}. {end}",
                "label": "positive" if positive else "negative",
            }
        )
    rng.shuffle(rows)
    return rows


def story_lines(n: int, seed: int = 0) -> list[str]:
    """`n` short sentences in a small, regular language (easy to learn, for LM tests)."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(_NAMES)} {rng.choice(_ACTS)} {rng.choice(_PLACES)} at dawn." for _ in range(n)
    ]


def instruction_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` instruction rows: classify a review's sentiment, answer in one word."""
    rows = []
    for r in review_rows(n, seed):
        rows.append(
            {
                "instruction": "Is this review positive or negative?",
                "input": r["text"],
                "output": r["label"],
            }
        )
    return rows


CHAT_REPLY = "Verdict: {label}."
"""The fixed reply format of `chat_rows`: one short line, then the turn ends."""


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` one-turn conversations ({"messages": [user, assistant]}): the user pastes a review,
    the assistant answers in CHAT_REPLY's format and nothing else. An instruct model answers
    such a message at length; the short fixed format (and stopping right after it) is a
    pattern a few LoRA steps learn."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"Review: {r['text']}"},
                {"role": "assistant", "content": CHAT_REPLY.format(label=r["label"])},
            ]
        }
        for r in review_rows(n, seed)
    ]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows as JSON Lines, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
