"""Chat data: rows holding a list of messages, rendered with the model's own chat template.

One row becomes `input_ids` + `labels` (-100 where no loss is taken), ready for padding or packing.

- Messages come as `{role, content}` (system / user / assistant / tool) or ShareGPT
  `{from, value}` (system / human / gpt); `MessageLayout` maps other keys and role names.
- The template is the tokenizer's own (`apply_chat_template`) or one given as a Jinja string or
  file (`data.chat_template`).
- The loss mask comes from the template's `{% generation %}` markers where it has them; otherwise
  each assistant turn is located by rendering the conversation up to that turn (with the
  generation prompt) and up to its end, and mapping those character boundaries to tokens. The
  end-of-turn token closing each trained turn is trained, so the model learns to stop.
- Too long: whole leading turns are kept, up to an assistant turn; a row whose first trained turn
  does not fit is dropped and reported with a reason, never cut mid-turn.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from launcher.errors import BadInputError

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "last_assistant", "all")
MASK_METHODS = ("auto", "markers", "prefix")
ROLES = ("system", "user", "assistant", "tool", "function")
"""Roles after mapping. tool / function messages are rendered only if the template supports them."""

DROP_TOO_LONG = "too_long"
"""Drop reason: the first trained assistant turn does not fit in max_length."""

TrainOn = Literal["assistant", "last_assistant", "all"]
MaskMethod = Literal["auto", "markers", "prefix"]

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatDataError(BadInputError):
    """A bad chat row. The caller prefixes the file name; `row` and `field` say where."""

    def __init__(self, row: int, field: str, detail: str):
        self.row, self.field, self.detail = row, field, detail
        super().__init__(f"row {row}: field {field!r}: {detail}")


class ChatTemplateError(BadInputError):
    """The chat template is missing, unreadable, or cannot be used to mask this tokenizer's turns."""


@dataclass(frozen=True)
class MessageLayout:
    """How a message is spelled: which keys hold the role and the text, and role-name mapping
    (source name -> one of ROLES; names already in ROLES map to themselves). A message is read
    with the first layout whose role key it holds."""

    role_key: str
    content_key: str
    roles: Mapping[str, str] = field(default_factory=dict)

    def role_of(self, name: str) -> str | None:
        if name in self.roles:
            return self.roles[name]
        return name if name in ROLES else None


ROLE_CONTENT = MessageLayout("role", "content")
SHAREGPT = MessageLayout(
    "from", "value", {"human": "user", "gpt": "assistant", "observation": "tool"}
)
DEFAULT_LAYOUTS = (ROLE_CONTENT, SHAREGPT)


@dataclass(frozen=True)
class ChatExample:
    """One encoded conversation: labels are IGNORE_INDEX where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    messages_kept: int
    """Messages rendered (a system message added from system_prompt counts)."""
    truncated: bool
    """True when trailing turns were left out to fit max_length."""


@dataclass(frozen=True)
class Dropped:
    """A row left out on purpose; `reason` (e.g. DROP_TOO_LONG) is for the caller to count."""

    reason: str


# -- messages --------------------------------------------------------------------------------


def normalize_messages(
    value: Any,
    *,
    row: int,
    field_name: str = "messages",
    system_prompt: str | None = None,
    layouts: Sequence[MessageLayout] = DEFAULT_LAYOUTS,
) -> list[dict[str, Any]]:
    """The row's messages as `{role, content, ...}` dicts with roles from ROLES.

    Keys besides the layout's (name, tool_calls, tool_call_id...) are kept for the template;
    keys holding None are dropped (Arrow fills keys missing from some messages with None).
    `system_prompt` is put first when the row has no system message.
    """

    def bad(detail: str) -> ChatDataError:
        return ChatDataError(row, field_name, detail)

    if not isinstance(value, list | tuple | str | Mapping) and hasattr(value, "tolist"):
        value = value.tolist()  # a NumPy array of message dicts, as Ray Data's numpy batches give
    if not isinstance(value, list | tuple):
        raise bad(f"must be a list of messages, got {_kind(value)}")
    if not value:
        raise bad("has no messages")
    messages = [_normalize_message(m, i, layouts, bad) for i, m in enumerate(value)]
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _normalize_message(
    message: Any,
    index: int,
    layouts: Sequence[MessageLayout],
    bad: Callable[[str], ChatDataError],
) -> dict[str, Any]:
    where = f"message {index + 1}"
    if not isinstance(message, Mapping):
        raise bad(f"{where}: must be an object with a role and a content, got {_kind(message)}")
    present = {k: v for k, v in message.items() if v is not None}
    layout = next((lay for lay in layouts if lay.role_key in present), None)
    if layout is None:
        spelled = " or ".join(f"{{{lay.role_key}, {lay.content_key}}}" for lay in layouts)
        keys = ", ".join(map(str, present)) or "(none)"
        raise bad(f"{where}: expected keys {spelled}; keys present: {keys}")
    name = present.pop(layout.role_key)
    content = present.pop(layout.content_key, "")
    role = layout.role_of(name) if isinstance(name, str) else None
    if role is None:
        known = sorted(set(ROLES) | set(layout.roles))
        raise bad(f"{where}: unknown role {name!r} (known: {', '.join(known)})")
    if not isinstance(content, str):
        raise bad(f"{where}: content must be text, got {_kind(content)}")
    if not content.strip() and not (role == "assistant" and present.get("tool_calls")):
        raise bad(f"{where}: empty content ({role})")
    for other in layouts:
        present.pop(other.role_key, None)
        present.pop(other.content_key, None)
    return {"role": role, "content": content, **present}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "text"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


# -- the template ----------------------------------------------------------------------------


def load_chat_template(
    tokenizer: Any, chat_template: str | None = None, base_dir: str | Path | None = None
) -> str:
    """The Jinja template to render with: `chat_template` (Jinja text, or a file path relative to
    `base_dir`) when given, else the tokenizer's own."""
    name = getattr(tokenizer, "name_or_path", "") or "the model"
    source = f"the chat template of {name!r} (model.name_or_path)"
    if chat_template is not None:
        text, source = _template_text(chat_template, base_dir), "data.chat_template"
    else:
        try:
            text = tokenizer.get_chat_template()
        except ValueError:
            raise ChatTemplateError(
                f"model.name_or_path: the tokenizer of {name!r} has no chat template; set "
                "data.chat_template to a Jinja template (text or a file)"
            ) from None
    _check_syntax(tokenizer, text, source)
    return text


def _template_text(chat_template: str, base_dir: str | Path | None) -> str:
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    path = Path(chat_template).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        raise ChatTemplateError(
            f"data.chat_template: {chat_template!r} is neither a Jinja template (no {{{{ or {{%) "
            f"nor a file ({path} not found)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatTemplateError(f"data.chat_template: cannot read {path}: {exc}") from None
    if not text.strip():
        raise ChatTemplateError(f"data.chat_template: {path} is empty")
    return text


def _check_syntax(tokenizer: Any, template: str, source: str) -> None:
    """Fail early on a template Jinja cannot compile; errors raised by the template itself on
    this probe conversation are left for the rows to report."""
    import jinja2

    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:
        tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"{source}: not a valid Jinja template (line {exc.lineno}: {exc.message})"
        ) from None
    except Exception:  # a template may reject the probe itself; the rows report that
        pass


def has_generation_markers(template: str) -> bool:
    """True when the template wraps assistant output in {% generation %} ... {% endgeneration %}."""
    return bool(_GENERATION_TAG.search(template))


# -- encoding --------------------------------------------------------------------------------


class ChatEncoder:
    """Turns chat rows into input_ids + labels for one tokenizer, template and set of options.

    `mask_method`: "auto" uses the template's generation markers when it has them and falls back
    to prefix rendering when they do not mark one block per assistant turn; "markers" / "prefix"
    force one way (tests compare the two).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int,
        chat_template: str | None = None,
        base_dir: str | Path | None = None,
        train_on: TrainOn = "assistant",
        system_prompt: str | None = None,
        field_name: str = "messages",
        layouts: Sequence[MessageLayout] = DEFAULT_LAYOUTS,
        mask_method: MaskMethod = "auto",
    ):
        if train_on not in TRAIN_ON:
            raise BadInputError(f"data.train_on: {train_on!r} is not one of {', '.join(TRAIN_ON)}")
        if mask_method not in MASK_METHODS:
            raise ValueError(f"mask_method {mask_method!r} is not one of {MASK_METHODS}")
        if max_length < 2:
            raise BadInputError(f"data.max_length: {max_length} is too small for chat rows")
        self.tokenizer = tokenizer
        self.template = load_chat_template(tokenizer, chat_template, base_dir)
        if mask_method == "markers" and not has_generation_markers(self.template):
            raise ChatTemplateError("the chat template has no {% generation %} markers")
        self.use_markers = mask_method != "prefix" and has_generation_markers(self.template)
        self.strict_markers = mask_method == "markers"
        self.max_length = max_length
        self.train_on = train_on
        self.system_prompt = system_prompt
        self.field_name = field_name
        self.layouts = tuple(layouts)
        self._special_texts = _special_texts(tokenizer)

    def encode_row(self, value: Any, row: int) -> ChatExample | Dropped:
        """Encode one row's messages field (`value`); `row` is only used in error messages."""
        messages = normalize_messages(
            value,
            row=row,
            field_name=self.field_name,
            system_prompt=self.system_prompt,
            layouts=self.layouts,
        )
        return self.encode_messages(messages, row)

    def check_row(self, value: Any, row: int) -> list[dict[str, Any]]:
        """The row's normalized messages, after checking everything that can make it fail
        (layout, roles, an assistant turn, the template renders it) without tokenizing it:
        the driver runs this over every row before training starts."""
        messages = normalize_messages(
            value, row=row, field_name=self.field_name, layouts=self.layouts
        )
        with_system = normalize_messages(
            messages, row=row, field_name=self.field_name, system_prompt=self.system_prompt
        )
        self._check_renders(with_system, row)
        self._render(with_system, row)
        return messages

    def _check_renders(self, messages: list[dict[str, Any]], row: int) -> list[int]:
        """Indices of the assistant turns, once the conversation is known to render."""
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistants:
            raise ChatDataError(row, self.field_name, "no assistant turn to train")
        self._check_roles_render(messages, row)
        return assistants

    def encode_messages(self, messages: list[dict[str, Any]], row: int) -> ChatExample | Dropped:
        """Encode already normalized messages (see `normalize_messages`)."""
        assistants = self._check_renders(messages, row)
        first_trained = assistants[-1] if self.train_on == "last_assistant" else assistants[0]
        keep = len(messages)
        text = self._render(messages, row)
        ids, offsets = self._tokenize(text)
        if len(ids) > self.max_length:
            keep = self._leading_turns_that_fit(messages, assistants, first_trained, row)
            if keep is None:
                return Dropped(DROP_TOO_LONG)
            text = self._render(messages[:keep], row)
            ids, offsets = self._tokenize(text)
        kept = messages[:keep]
        if self.train_on == "all":
            labels = list(ids)
        else:
            trained = [i for i in assistants if i < keep]
            if self.train_on == "last_assistant":
                trained = trained[-1:]
            labels = [IGNORE_INDEX] * len(ids)
            for start, end in self._assistant_token_spans(kept, trained, text, ids, offsets, row):
                labels[start:end] = ids[start:end]
        return ChatExample(ids, labels, keep, truncated=keep < len(messages))

    # -- length ----------------------------------------------------------------------------

    def _leading_turns_that_fit(
        self, messages: list[dict[str, Any]], assistants: list[int], first_trained: int, row: int
    ) -> int | None:
        """For a conversation over max_length: the most leading messages that end with an
        assistant turn at or after the first trained one and fit; None when none fit."""
        cuts = [i + 1 for i in assistants if first_trained <= i < len(messages) - 1]
        best = None
        lo, hi = 0, len(cuts) - 1
        while lo <= hi:  # token length grows with every turn, so search for the last cut that fits
            mid = (lo + hi) // 2
            if self._length(messages[: cuts[mid]], row) <= self.max_length:
                best, lo = cuts[mid], mid + 1
            else:
                hi = mid - 1
        return best

    def _length(self, messages: list[dict[str, Any]], row: int) -> int:
        return len(self._tokenize(self._render(messages, row))[0])

    # -- rendering and tokens --------------------------------------------------------------

    def _render(self, messages: list[dict[str, Any]], row: int, generation_prompt: bool = False):
        import jinja2

        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        except jinja2.TemplateError as exc:
            raise ChatDataError(row, self.field_name, _rejected(exc, messages)) from None

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        """Token ids of rendered text (the template writes its own special tokens) and, for fast
        tokenizers, each token's character span."""
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
            )
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), None

    def _check_roles_render(self, messages: list[dict[str, Any]], row: int) -> None:
        """A tool / function message the template silently leaves out would train on a
        conversation the data does not hold: refuse it."""
        for i, message in enumerate(messages):
            if message["role"] in ("system", "user", "assistant"):
                continue
            before = self._render(messages[:i], row) if i else ""
            if self._render(messages[: i + 1], row) == before:
                raise ChatDataError(
                    row,
                    self.field_name,
                    f"message {i + 1}: the chat template does not render {message['role']!r} "
                    "messages (it leaves them out)",
                )

    # -- the loss mask ---------------------------------------------------------------------

    def _assistant_token_spans(
        self,
        messages: list[dict[str, Any]],
        trained: list[int],
        text: str,
        ids: list[int],
        offsets: list[tuple[int, int]] | None,
        row: int,
    ) -> list[tuple[int, int]]:
        """[start, end) token ranges of the trained assistant turns (message indices)."""
        if self.use_markers:
            spans = self._spans_from_markers(messages, ids, row)
            if spans is not None:
                order = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
                return [spans[order.index(i)] for i in trained]
        char_spans = [self._assistant_chars(messages, i, text, row) for i in trained]
        return [self._chars_to_tokens(text, span, offsets) for span in char_spans]

    def _spans_from_markers(
        self, messages: list[dict[str, Any]], ids: list[int], row: int
    ) -> list[tuple[int, int]] | None:
        """One token range per assistant turn from the {% generation %} blocks, or None when
        the blocks do not line up one to one with the assistant turns."""
        import jinja2

        try:
            enc = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
        except jinja2.TemplateError as exc:
            raise ChatDataError(row, self.field_name, _rejected(exc, messages)) from None
        if list(enc["input_ids"]) != ids:
            return self._markers_unusable("the marked rendering tokenizes differently")
        runs = _runs(enc["assistant_masks"])
        wanted = sum(m["role"] == "assistant" for m in messages)
        if len(runs) != wanted:
            return self._markers_unusable(
                f"{len(runs)} generation blocks for {wanted} assistant turns"
            )
        return [_with_end_of_turn(run, ids, self.tokenizer.eos_token_id) for run in runs]

    def _markers_unusable(self, why: str) -> None:
        if self.strict_markers:
            raise ChatTemplateError(f"data.chat_template: generation markers unusable: {why}")
        return None

    def _assistant_chars(
        self, messages: list[dict[str, Any]], index: int, text: str, row: int
    ) -> tuple[int, int]:
        """Character span of assistant turn `index` in `text`: from the end of the generation
        prompt to the end of the turn (trailing whitespace after an end-of-turn token excluded)."""
        if index == 0:
            raise ChatDataError(
                row,
                self.field_name,
                "message 1: an assistant turn with nothing before it cannot be masked with "
                "this template (it has no {% generation %} markers)",
            )
        head = self._render(messages[:index], row, generation_prompt=True)
        upto = self._render(messages[: index + 1], row)
        if not (text.startswith(head) and text.startswith(upto) and len(upto) > len(head)):
            raise ChatTemplateError(
                f"row {row}: data.chat_template: the template renders earlier turns differently "
                "once later turns follow, so assistant turns cannot be located by rendering "
                "prefixes; use a template with {% generation %} markers"
            )
        return len(head), _turn_end(upto, len(head), self._special_texts)

    def _chars_to_tokens(
        self, text: str, span: tuple[int, int], offsets: list[tuple[int, int]] | None
    ) -> tuple[int, int]:
        start, end = span
        if offsets is None:  # slow tokenizer: count the tokens of the text before each boundary
            return (len(self._tokenize(text[:start])[0]), len(self._tokenize(text[:end])[0]))
        # A token that overlaps the span belongs to it (as transformers does for markers).
        inside = [t for t, (s, e) in enumerate(offsets) if s < end and e > start]
        return (inside[0], inside[-1] + 1) if inside else (0, 0)


def _turn_end(rendered: str, start: int, special_texts: Sequence[str]) -> int:
    """End of an assistant turn's trained text: the rendering up to the turn's end, less the
    whitespace the template writes after an end-of-turn special token (as in ChatML's
    "<|im_end|>\\n"). Without such a token the whitespace is the only stop signal: keep it."""
    stripped = rendered.rstrip()
    if len(stripped) > start and any(stripped.endswith(s) for s in special_texts):
        return len(stripped)
    return len(rendered)


def _special_texts(tokenizer: Any) -> tuple[str, ...]:
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            texts.add(str(token.content))
    return tuple(t for t in texts if t and not t.isspace())


def _with_end_of_turn(run: tuple[int, int], ids: list[int], eos: int | None) -> tuple[int, int]:
    """A generation block that closes just before the end-of-turn (EOS) token would never teach
    the model to stop: take that token into the block."""
    start, end = run
    if eos is not None and end < len(ids) and ids[end] == eos and ids[end - 1] != eos:
        return start, end + 1
    return run


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive 1s."""
    runs, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _rejected(exc: Exception, messages: list[dict[str, Any]]) -> str:
    detail = f"the chat template rejects this conversation: {exc}"
    others = sorted({m["role"] for m in messages} - {"system", "user", "assistant"})
    if others:
        detail += f" (it has {', '.join(others)} messages; the template may not support them)"
    return detail


def end_of_turn_ids(tokenizer: Any, template: str) -> list[int]:
    """Token ids that end an assistant turn under this template: the special token the template
    writes right after the assistant's text (ChatML's <|im_end|>), and EOS. Generation stops at
    any of them."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    marker = "FTLAUNCH_END_OF_TURN_PROBE"
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        rendered = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    except Exception:  # a template that rejects the probe: EOS is all we know
        return ids
    after = rendered[rendered.find(marker) + len(marker) :].lstrip()
    for text in sorted(_special_texts(tokenizer), key=len, reverse=True):
        if after.startswith(text):
            token = tokenizer.convert_tokens_to_ids(text)
            if isinstance(token, int) and token not in ids:
                ids.append(token)
            break
    return ids
