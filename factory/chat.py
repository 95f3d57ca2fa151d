"""The chat format of a model: one object, built once from its tokenizer and the config.

Everything that depends on how a model writes a conversation comes from here: the template,
the end-of-turn and stop tokens, the pad token, whether the template writes BOS itself, the
instruction and response markers, the training masks, the generation prompt, and the Ollama
template. None of it is looked up in a table keyed by a model or template name: it is read
off the template by rendering probe conversations, so any model whose template renders a
conversation as a prefix-preserving text works, whatever its family.

Plain-text records (one assistant turn and nothing else: the `text` input format) are
language-modelling examples: BOS + the text + EOS, every token trained.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from factory.errors import InputError

log = logging.getLogger("factory.chat")

TEMPLATES_DIR = Path(__file__).parent / "templates"
# Other spellings of the shipped template files' names (the file stem is the canonical name).
TEMPLATE_ALIASES = {"gemma3": "gemma-3", "gemma": "gemma-3", "llama-3": "llama-3.1", "llama3": "llama-3.1",
                    "qwen2.5": "qwen-2.5", "qwen": "qwen-2.5", "phi3": "phi-3"}

# Placeholders for probe conversations: letters only, so no template's trimming or escaping
# changes them, and unlikely to merge with the text around them.
_SYSTEM, _USER1, _ANSWER1, _USER2 = "PROBESYSTEMxq", "PROBEUSERONExq", "PROBEANSWERxq", "PROBEUSERTWOxq"
# A two-turn conversation with a system message, in the factory's record form: what the masks
# and Unsloth's markers are checked on (its first three turns: a single-turn one).
_PROBE_TURNS = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER1},
               {"role": "assistant", "content": _ANSWER1}, {"role": "user", "content": _USER2},
               {"role": "assistant", "content": _ANSWER1}]
_REASONING = "PROBEREASONINGxq"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # a reasoning block that a generation prompt opens (DeepSeek R1)


def named_templates() -> list[str]:
    return sorted([p.stem for p in TEMPLATES_DIR.glob("*.jinja")] + list(TEMPLATE_ALIASES))


def read_named_template(name: str) -> str:
    path = TEMPLATES_DIR / f"{TEMPLATE_ALIASES.get(name, name)}.jinja"
    if not path.is_file():
        raise InputError(f"dataset.chat_template {name!r} is not a template the factory ships; use `auto` "
                         f"(the tokenizer's own) or one of: {', '.join(named_templates())}")
    return path.read_text(encoding="utf-8")


def messages(conversations: list[dict]) -> list[dict]:
    """Canonical turns as chat-template messages.

    Many templates know system/user/assistant only and require user and assistant to
    alternate, so a tool result is passed as a user turn that says it is one.
    """
    return [
        {"role": "user", "content": f"Tool result:\n{t['content']}"} if t["role"] == "tool" else
        {"role": t["role"], "content": t["content"]}
        for t in conversations
    ]


def is_plain_text(record: dict) -> bool:
    """A `text` input record: one assistant turn with nothing before it."""
    turns = record["conversations"]
    return len(turns) == 1 and turns[0]["role"] == "assistant"


def reference(record: dict) -> str:
    """The final answer: what a generation is scored against."""
    return record["conversations"][-1]["content"]


def last_user_text(record: dict) -> str:
    users = [t["content"] for t in record["conversations"] if t["role"] in ("user", "tool")]
    return users[-1] if users else ""


@dataclass
class ChatFormat:
    tokenizer: Any
    template_source: str
    """`auto (the tokenizer's own)` or the name of a shipped template."""

    eot_token: str
    eot_token_id: int
    eot_appended: bool
    """True when the template ends an assistant turn without a special token, so the factory
    appends EOS to every trained answer (otherwise the model would never learn to stop)."""

    stop_token_ids: list[int]
    pad_token_id: int
    bos_token_id: int | None
    """The BOS id to put before every sequence, or None: the template writes it (it is never
    doubled) or the model has none."""

    instruction_part: str
    response_part: str
    probe: dict[str, str]
    """The literal text between the parts of a rendered conversation (see _probe)."""

    system_folded: bool
    """True when the template has no system role (it raises on one, as Gemma 1 and 2's do, or
    leaves it out) or writes it where later turns decide (Mistral v0.3's: into the last user
    message only): a system message is written at the start of the first user message instead,
    as Gemma 3's template does itself, rather than failing, being lost or moving."""

    reasoning_end: str | None
    """What closes a reasoning block before an answer (Qwen 3's `</think>`), read off the template
    by rendering an answer with `reasoning_content`; None when the template writes no reasoning.
    A generated answer is scored on what follows it (answer_text)."""

    training_template: str | None
    """The template that renders conversations for the training masks when it is not the
    model's own: TRL's prefix-preserving training variant of a template that rewrites earlier
    turns (Qwen 3 drops the reasoning block of every answer but the last); None otherwise."""

    multi_turn: bool
    """False when the template renders earlier turns differently once later ones follow and TRL
    has no training variant of it (see _settle_masks): a multi-turn record then trains as one
    sequence per answer (training_examples)."""

    sampling: dict[str, float | int]
    """Sampling settings the model's generation config sets (temperature, top_p, top_k,
    repetition_penalty: transformers' names), for `factory sample` and the Ollama Modelfile;
    unset ones are left to the runtime."""

    markers_match_tokens: bool = True
    """Whether instruction_part and response_part, tokenized alone, occur in a tokenized
    conversation where their text does (see _settle_markers): what Unsloth's
    train_on_responses_only needs."""

    # --- construction ------------------------------------------------------------------

    @classmethod
    def from_tokenizer(cls, tokenizer, template: str = "auto", generation_config=None) -> "ChatFormat":
        if template == "auto":
            if not getattr(tokenizer, "chat_template", None):
                return cls._without_template(tokenizer, generation_config)
            source = "auto (the tokenizer's own)"
        else:
            tokenizer.chat_template = read_named_template(template)
            source = template
        probe, system_folded, reasoning_end = _probe(tokenizer)
        if reasoning_end is None and THINK_OPEN in probe["generation_prompt"]:
            reasoning_end = THINK_CLOSE
        bos = tokenizer.bos_token
        bos_in_template = bool(bos) and probe["head"].startswith(bos)
        adds_bos = bool(bos) and _encoding_adds_bos(tokenizer)
        eot_id, eot_appended = _end_of_turn(tokenizer, probe["assistant_end"])
        # the end of turn, EOS, and whatever else the model's generation config stops at (Llama
        # 3.1 lists <|end_of_text|>, <|eom_id|> and <|eot_id|>)
        configured = getattr(generation_config, "eos_token_id", None)
        configured = configured if isinstance(configured, list) else [configured]
        stops = list(dict.fromkeys(i for i in [eot_id, tokenizer.eos_token_id, *configured]
                                   if i is not None and not _only_bos(tokenizer, i)))
        # The assistant header: what add_generation_prompt adds, or, for templates that write it
        # after every user turn anyway, what follows the user turn's end.
        eot_text = tokenizer.convert_ids_to_tokens(eot_id)
        instruction = _instruction_part(probe, eot_text)
        response = (probe["generation_prompt"].removesuffix(probe["generation_opening"])
                    or _header_after(probe["user_to_assistant"], eot_text))
        if not response.strip():
            raise InputError("the chat template writes no assistant header, so answers cannot be told from prompts; "
                             f"set dataset.chat_template to one of {', '.join(named_templates())}")
        chat = cls(
            tokenizer=tokenizer, template_source=source,
            eot_token=tokenizer.convert_ids_to_tokens(eot_id), eot_token_id=eot_id, eot_appended=eot_appended,
            stop_token_ids=stops, pad_token_id=-1,
            bos_token_id=tokenizer.bos_token_id if adds_bos and not bos_in_template else None,
            instruction_part=instruction, response_part=response, probe=probe, system_folded=system_folded,
            reasoning_end=reasoning_end, training_template=None, multi_turn=True,
            sampling=sampling_settings(generation_config),
        )
        chat.pad_token_id = _choose_pad(tokenizer, chat)
        if tokenizer.pad_token_id != chat.pad_token_id:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(chat.pad_token_id)
        # Masks are checked once here, on a multi-turn probe, so a template that cannot be
        # masked stops the run before any training (exit 2), not in the middle of it.
        chat._settle_masks()
        chat._settle_markers()
        log.info("chat format: template %s, end of turn %r (id %d%s), stops %s, pad %r, BOS %s%s%s",
                 chat.template_source, chat.eot_token, eot_id, ", appended to answers" if eot_appended else "", stops,
                 tokenizer.pad_token, "from the template" if bos_in_template else
                 ("added by the factory" if chat.bos_token_id is not None else "none"),
                 ", system messages folded into the first user message" if chat.system_folded else "",
                 f", answers scored after {reasoning_end!r}" if reasoning_end else "")
        return chat

    def _settle_masks(self) -> None:
        """Check once, on probe conversations, that answers can be masked, and choose how: with
        the template itself or TRL's training variant of it (that first where the template
        writes reasoning); else with the system
        message in the first user turn (a template that writes it where later turns decide,
        as Mistral v0.3's writes it into the last user message only); else answer by answer
        (training_examples). A template that masks not even a single-turn conversation stops
        the run here (exit 2), before any training."""
        multi_turn = {"conversations": _PROBE_TURNS}
        single_turn = {"conversations": _PROBE_TURNS[:3]}
        unfolded, folded = (self.system_folded, self.probe), (True, _folded_system(self.probe))
        training_template = _trl_training_template(self.tokenizer)
        own, trl = (None, unfolded, multi_turn, ""), (training_template, unfolded, multi_turn,
                                                     ", masks from TRL's training variant")
        # where the template writes reasoning, TRL's variant first: it keeps the reasoning of the
        # answers that the model's own drops (DeepSeek R1's drops it from every answer)
        preferred = ([trl, own] if self.reasoning_end else [own, trl]) if training_template else [own]
        choices = [*preferred,
                   (None, folded, multi_turn, ""),
                   (None, unfolded, single_turn, ", each answer in a sequence of its own"),
                   (None, folded, single_turn, ", each answer in a sequence of its own")]
        error = None
        for self.training_template, (self.system_folded, self.probe), probe, note in choices:
            try:
                self._masked(probe, every_answer=True)
            except InputError as e:
                error = error or e
                continue
            self.multi_turn = probe is multi_turn
            self.template_source += note
            if self.system_folded and not unfolded[0]:
                log.warning(FOLDED_SYSTEM)
            if not self.multi_turn:
                log.warning("the chat template (%s) renders earlier turns differently once later ones follow, and TRL "
                            "has no training variant of it: a multi-turn record trains as one sequence per answer, "
                            "each in the conversation before it as the template renders it then", self.template_source)
            return
        raise error

    def _settle_markers(self) -> None:
        """Make instruction_part and response_part match token ids, not only text: Unsloth's
        train_on_responses_only tokenizes each marker alone and looks for those ids in every
        tokenized conversation. Llama 2's SentencePiece vocabulary tokenizes `[/INST] ` alone as
        `[`, `/`, `INST`, `]`, `▁` but a Mistral conversation as `▁[`, ..., `]`, `▁Hello`: the
        marker was never found, every label was masked and Unsloth stopped the run (seen on a
        GPU). Each marker borrows the fewest characters that precede it in the rendered probe
        conversation, and drops its trailing whitespace if need be, until its ids occur there as
        often as its text (Mistral: ` [INST]`, ` [/INST]`); when none does,
        `markers_match_tokens` is False and the unsloth backend stops before training."""
        text = self.training_text(_PROBE_TURNS if self.multi_turn else _PROBE_TURNS[:3])
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        parts = [_marker_in_context(self.tokenizer, text, ids, part) for part in (self.instruction_part, self.response_part)]
        self.markers_match_tokens = None not in parts
        if self.markers_match_tokens:
            self.instruction_part, self.response_part = parts

    @classmethod
    def _without_template(cls, tokenizer, generation_config) -> "ChatFormat":
        """A base model with no chat template: plain-text records train as language modelling;
        a conversation is an error that names the fix when it is met."""
        if tokenizer.eos_token_id is None:
            raise InputError("the model's tokenizer has neither a chat template nor an EOS token; "
                             f"set dataset.chat_template to one of {', '.join(named_templates())}")
        chat = cls(tokenizer=tokenizer, template_source="none", eot_token=tokenizer.eos_token,
                   eot_token_id=tokenizer.eos_token_id, eot_appended=True, stop_token_ids=[tokenizer.eos_token_id],
                   pad_token_id=-1,
                   bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token and _encoding_adds_bos(tokenizer) else None,
                   instruction_part="", response_part="", probe={}, system_folded=False, reasoning_end=None,
                   training_template=None, multi_turn=True, sampling=sampling_settings(generation_config))
        chat.pad_token_id = _choose_pad(tokenizer, chat)
        if tokenizer.pad_token_id != chat.pad_token_id:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(chat.pad_token_id)
        return chat

    @property
    def has_template(self) -> bool:
        return bool(self.probe)

    def _require_template(self) -> None:
        if not self.has_template:
            raise InputError("the model's tokenizer has no chat template, and the data has conversations; set "
                             f"dataset.chat_template to the one the model was trained with ({', '.join(named_templates())}), "
                             "or give plain text (input format `text`) to train it as a language model")

    @property
    def stop_tokens(self) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(self.stop_token_ids)

    @property
    def answer_end_text(self) -> str | None:
        """What the template writes after an answer when that is text, not a special token
        (ChatML's `<|im_end|>` on a base model's vocabulary, which has no such token): trained
        before the appended EOS, it is not part of the answer (answer_text) and is a stop string
        for runtimes that take one (the Ollama Modelfile). None otherwise."""
        end = self.probe.get("assistant_end", "").strip() if self.eot_appended else ""
        return end or None

    # --- rendering and tokenizing ------------------------------------------------------

    def render(self, turns: list[dict], *, generation_prompt: bool, training: bool = False) -> str:
        """The conversation as text; `training`: as the training masks see it (training_template)."""
        self._require_template()
        template = self.training_template if training else None
        return self.tokenizer.apply_chat_template(self._with_system(turns), tokenize=False,
                                                  add_generation_prompt=generation_prompt, chat_template=template)

    def training_text(self, conversations: list[dict]) -> str:
        """A record's conversation as seed 004's training text for the unsloth backend: rendered
        as the training masks see it, without a leading BOS where the tokenizer adds it."""
        return self.render(messages(conversations), generation_prompt=False, training=True).removeprefix(_added_bos(self.tokenizer))

    def _with_system(self, turns: list[dict]) -> list[dict]:
        """`turns` with a system message moved into the first user message where the template
        has no system role."""
        if not (self.system_folded and turns and turns[0]["role"] == "system"):
            return turns
        system, rest = turns[0]["content"], turns[1:]
        if rest and rest[0]["role"] == "user":
            return [{**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
        return [{"role": "user", "content": system}, *rest]

    def answer_text(self, generated: str) -> str:
        """The answer in a generation: after its reasoning block when the template writes one,
        before the template's end of answer when that is text (answer_end_text)."""
        if self.reasoning_end and self.reasoning_end in generated:
            generated = generated.rsplit(self.reasoning_end, 1)[1]
        if self.answer_end_text:
            generated = generated.split(self.answer_end_text, 1)[0]
        return generated.strip()

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.bos_token_id, *ids] if self.bos_token_id is not None else list(ids)

    def prompt_messages(self, record: dict) -> list[dict]:
        """The conversation up to the last answer, as template messages (what a chat endpoint
        with the model's own template is sent)."""
        return self._with_system(messages(record["conversations"][:-1]))

    def prompt_ids(self, record: dict) -> list[int]:
        """Token ids of the conversation up to the last answer, with the generation prompt."""
        return self.encode(self.render(self.prompt_messages(record), generation_prompt=True))

    def training_examples(self, record: dict) -> list[dict[str, list[int]]]:
        """What a record trains on: one sequence, every answer trained (training_example); or,
        where earlier turns render differently once later ones follow (multi_turn False), one
        sequence per answer: the conversation before it, as the template renders it when the
        model writes that answer, and the answer trained."""
        turns = record["conversations"]
        if self.multi_turn or is_plain_text(record):
            return [self.training_example(record)]
        return [self._masked({"conversations": turns[: i + 1]}, every_answer=False)
                for i, turn in enumerate(turns) if turn["role"] == "assistant"]

    def reasoning_left_out(self, record: dict) -> int:
        """How many of a record's answers hold reasoning (what precedes `</think>`, or the
        template's own reasoning end, in the answer's text) that the training text leaves out:
        DeepSeek R1's template keeps only what follows `</think>` in every answer, so a model
        trained through it learns the answers without their reasoning."""
        close = self.reasoning_end or THINK_CLOSE
        turns = record["conversations"]
        reasoning = [] if is_plain_text(record) else [
            (i, t["content"].split(close, 1)[0].replace(THINK_OPEN, "").strip())
            for i, t in enumerate(turns) if t["role"] == "assistant" and close in t["content"]]
        if not reasoning:
            return 0
        def rendered(shown: list[dict]) -> str:
            return self.render(messages(shown), generation_prompt=False, training=True)

        # the text each answer trains in: the whole conversation (rendered once), or the conversation up to it
        whole = rendered(turns) if self.multi_turn else None
        return sum(text not in (whole if whole is not None else rendered(turns[: i + 1])) for i, text in reasoning)

    def training_example(self, record: dict) -> dict[str, list[int]]:
        """input_ids and labels: every assistant turn trained (with its end-of-turn token),
        everything else -100."""
        return self._masked(record, every_answer=True)

    def answer_example(self, record: dict) -> tuple[list[int], list[int]]:
        """input_ids and labels with only the final answer trained: the answer loss."""
        example = self._masked(record, every_answer=False)
        return example["input_ids"], example["labels"]

    def _masked(self, record: dict, *, every_answer: bool) -> dict[str, list[int]]:
        if is_plain_text(record):
            ids = self.encode(record["conversations"][0]["content"])
            if self.tokenizer.eos_token_id is not None:
                ids.append(self.tokenizer.eos_token_id)
            return {"input_ids": ids, "labels": list(ids)}
        turns = messages(record["conversations"])
        answers = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
        if not every_answer:
            answers = answers[-1:]
        text = self.render(turns, generation_prompt=False, training=True)
        spans = []  # character spans of the trained answers (with what the template writes after each)
        for index in answers:
            prompt = self.render(turns[:index], generation_prompt=True, training=True)
            through = self.render(turns[: index + 1], generation_prompt=False, training=True)
            opening = self.probe["generation_opening"]
            if opening and prompt.endswith(opening) and not through.startswith(prompt) \
                    and through.startswith(prompt[: -len(opening)]):
                # the generation prompt opens a block (DeepSeek R1's `<think>\n`) or writes an
                # empty one (Gemma 4's thought channel) that this answer does not begin with:
                # it is trained from the assistant header on
                prompt = prompt[: -len(opening)]
            # A template may close a conversation differently from a turn that others follow
            # (Phi-3 ends with EOS): the answer's span ends where the two renderings part.
            end = len(through) if text.startswith(through) else len(os.path.commonprefix([text, through]))
            if not (text.startswith(prompt) and through.startswith(prompt)) or end <= len(prompt) \
                    or spans and len(prompt) < spans[-1][1]:
                raise InputError(
                    f"the chat template ({self.template_source}) is not prefix-preserving: the conversation up to "
                    f"assistant turn {index} renders differently inside the longer conversation, so the answer "
                    "tokens cannot be located for the training mask. Use a template that renders each turn the "
                    f"same way whatever follows (dataset.chat_template: one of {', '.join(named_templates())})")
            spans.append((len(prompt), end))
        ids, offsets = self._tokens_with_offsets(text)
        labels = [-100] * len(ids)
        ends = []  # index of each span's last token
        for begin, end in spans:
            inside = [i for i, (start, stop) in enumerate(offsets) if begin <= start and stop <= end]
            for i in inside:
                labels[i] = ids[i]
            ends.append(inside[-1] if inside else None)
        if self.eot_appended:  # after each answer, the EOS the template does not write
            for i in sorted((e for e in ends if e is not None), reverse=True):
                ids.insert(i + 1, self.eot_token_id)
                labels.insert(i + 1, self.eot_token_id)
        return {"input_ids": ids, "labels": labels}

    def _tokens_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and the characters each spans ((-1, -1) for an added BOS).

        Tokenizing the whole text once and locating answers by character keeps the training
        tokens exactly those of the conversation, even where a tokenizer merges the end of a
        header with the start of an answer."""
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        offsets = [tuple(span) for span in encoded["offset_mapping"]]
        if self.bos_token_id is not None:
            return [self.bos_token_id, *ids], [(-1, -1), *offsets]
        return ids, offsets

    # --- handoff ----------------------------------------------------------------------

    @cached_property
    def ollama_template(self) -> str:
        """The template in Ollama's Go syntax, built from the probe's literal text pieces.

        BOS is left out where the tokenizer adds it (the GGUF's add_bos_token flag, from which
        llama.cpp and Ollama add it). Where it does not, a BOS the template writes is a turn's
        own token (SmolLM2's BOS is `<|im_start|>`) and stays. The last user message is followed
        by the template's own generation prompt where it differs from the header earlier answers
        follow (DeepSeek R1's opens `<think>\n`, GLM 4.7's history answers begin `</think>`).
        """
        self._require_template()
        p = {k: v.removeprefix(_added_bos(self.tokenizer)) for k, v in self.probe.items()}
        to_answer, to_generation = _go(p["user_to_assistant"]), _go(p["user_to_generation"])
        after_user = to_answer if to_answer == to_generation else \
            "{{ if $last }}" + to_generation + "{{ else }}" + to_answer + "{{ end }}"
        return (
            "{{- range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            '{{ if eq .Role "system" }}' + _go(p["system_head"]) + "{{ .Content }}" + _go(p["system_to_user"])
            + '{{ else if eq .Role "user" }}{{ if eq $i 0 }}' + _go(p["head"]) + "{{ end }}{{ .Content }}"
            + after_user
            + '{{ else if eq .Role "assistant" }}{{ .Content }}{{ if not $last }}' + _go(p["assistant_to_user"])
            + "{{ end }}{{ end }}{{ end }}"
        )


def sampling_settings(generation_config) -> dict[str, float | int]:
    """The sampling settings the model's generation config sets (none: the runtime's defaults)."""
    return {key: value for key in ("temperature", "top_p", "top_k", "repetition_penalty")
            if (value := getattr(generation_config, key, None)) is not None}


def _go(text: str) -> str:
    """A literal for a Go template (only `{{` would be read as an action)."""
    return text.replace("{{", '{{ "{{" }}')


def _probe(tokenizer) -> tuple[dict[str, str], bool, str | None]:
    """The literal text a template puts between the parts of a conversation; whether it lacks
    a system role (see ChatFormat.system_folded); what closes its reasoning block, if any.

    head:               before the first user message (BOS, a default system prompt, the user header)
    user_to_assistant:  after a user message, up to the answer (user end + assistant header)
    user_to_generation: after the last user message, with the generation prompt
    assistant_to_user:  after an answer that another user message follows
    assistant_end:      after the last answer of a conversation
    generation_prompt:  what add_generation_prompt adds (the assistant header)
    generation_opening: the end of the generation prompt that a rendered answer does not begin
                        with: a reasoning block it opens (DeepSeek R1's `<think>\n`, GLM 4.7's
                        `<think>`) or writes empty (Gemma 4's `<|channel>thought\n<channel|>`,
                        Cohere 2's `<|START_THINKING|>`); "" for most templates
    system_head, system_to_user: around a system message (which some templates fold into the
                        first user turn; for a template without a system role, the factory does)
    """
    def render(turns, generation_prompt):
        try:
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # a template that raises (e.g. on a system role) is the user's to fix
            raise InputError(f"the chat template failed to render a probe conversation: {type(e).__name__}: {e}") from None

    user = [{"role": "user", "content": _USER1}]
    one = render(user, False)
    prompted = render(user, True)
    answered = render(user + [{"role": "assistant", "content": _ANSWER1}], False)
    two = render(user + [{"role": "assistant", "content": _ANSWER1}, {"role": "user", "content": _USER2}], True)
    try:
        system = render([{"role": "system", "content": _SYSTEM}] + user, True)
    except InputError:
        system = ""
    with_reasoning = render(user + [{"role": "assistant", "content": _ANSWER1, "reasoning_content": _REASONING}], False)
    reasoning_end = None
    if _REASONING in with_reasoning and _ANSWER1 in with_reasoning.split(_REASONING, 1)[1]:
        reasoning_end = _between(with_reasoning, _REASONING, _ANSWER1).strip() or None
    parts = {
        "head": _between(one, None, _USER1),
        "user_to_assistant": _between(two, _USER1, _ANSWER1),
        "user_to_generation": _between(prompted, _USER1, None),
        "assistant_to_user": _between(two, _ANSWER1, _USER2),
        "assistant_end": _between(answered, _ANSWER1, None),
        # empty when a template ends a conversation differently without the prompt (Phi-3
        # writes EOS there): the assistant header is then read off user_to_assistant
        "generation_prompt": prompted[len(one):] if prompted.startswith(one) else "",
        "generation_opening": _generation_opening(tokenizer, one, prompted, answered),
    }
    if _SYSTEM in system:
        parts["system_head"] = _between(system, None, _SYSTEM)
        parts["system_to_user"] = _between(system, _SYSTEM, _USER1)
        return parts, False, reasoning_end
    log.warning(FOLDED_SYSTEM)
    return _folded_system(parts), True, reasoning_end


def _generation_opening(tokenizer, unprompted: str, prompted: str, answered: str) -> str:
    """The tokens at the end of the generation prompt (`prompted` after `unprompted`) that the
    answered conversation does not have where the answer begins (see _probe)."""
    if answered.startswith(prompted) or not prompted.startswith(unprompted):
        return ""
    shared = len(os.path.commonprefix([prompted, answered]))
    # back to a token boundary: `<think>` and `</think>` share their first character
    offsets = tokenizer(prompted, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cut = max((stop for _, stop in offsets if stop <= shared), default=0)
    return prompted[cut:] if cut > len(unprompted) else ""


FOLDED_SYSTEM = ("the chat template has no system role that renders the same whatever follows; a system message is "
                 "written at the start of the first user message instead")


def _folded_system(parts: dict[str, str]) -> dict[str, str]:
    """The probe's parts for a template whose system messages the factory folds into the first
    user message (ChatFormat._with_system)."""
    return {**parts, "system_head": parts["head"], "system_to_user": "\n\n"}


def _trl_training_template(tokenizer) -> str | None:
    """TRL's prefix-preserving training variant of the tokenizer's template (matched byte for
    byte: Qwen 3, DeepSeek R1, Nemotron 3, ...), or None when TRL has none."""
    try:
        from trl.chat_template_utils import get_training_chat_template
        return get_training_chat_template(tokenizer)
    except (ImportError, ValueError):
        return None


def _between(text: str, start: str | None, end: str | None) -> str:
    begin = text.index(start) + len(start) if start else 0
    if start and start not in text or end and end not in text[begin:]:
        raise InputError("the chat template does not render message contents verbatim; it cannot be used for training")
    return text[begin : text.index(end, begin) if end else len(text)]


def _encoding_adds_bos(tokenizer) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _added_bos(tokenizer) -> str:
    """The BOS text the tokenizer puts before every encoded text, or "\0" (nothing to strip)
    when it adds none: a template's own leading BOS is then a turn token (SmolLM2's)."""
    return tokenizer.bos_token if tokenizer.bos_token and _encoding_adds_bos(tokenizer) else "\0"


def _only_bos(tokenizer, token_id: int) -> bool:
    """Whether `token_id` is BOS and not also EOS (GPT-2's, Pythia's and OPT's one token is
    both, and generation must stop at it)."""
    return token_id == tokenizer.bos_token_id and token_id != tokenizer.eos_token_id


def _end_of_turn(tokenizer, assistant_end: str) -> tuple[int, bool]:
    """The first special token the template writes after an answer; else EOS, appended."""
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    for token_id in tokenizer(assistant_end, add_special_tokens=False)["input_ids"]:
        if token_id in special and not _only_bos(tokenizer, token_id):
            return token_id, False
    if tokenizer.eos_token_id is None:
        raise InputError("the chat template ends an answer with no special token and the tokenizer has no EOS token, "
                         "so generation could never stop; use a template with an end-of-turn token "
                         f"(dataset.chat_template: one of {', '.join(named_templates())})")
    log.warning("the chat template ends an answer with %r (no special token); EOS %r is appended to every trained "
                "answer so that the model learns to stop", assistant_end, tokenizer.eos_token)
    return tokenizer.eos_token_id, True


def _header_after(text: str, eot_text: str) -> str:
    """What follows the end-of-turn token in `text` (e.g. `<|end|>\n<|assistant|>\n` ->
    `<|assistant|>\n`): the next turn's header."""
    return text.rsplit(eot_text, 1)[-1].lstrip() if eot_text in text else text.lstrip()


def _instruction_part(probe: dict[str, str], eot_text: str) -> str:
    """The user header: what follows an answer's ending when another user turn comes."""
    between, ending = probe["assistant_to_user"], probe["assistant_end"]
    if ending and between.startswith(ending):
        return between[len(ending):].lstrip() or between.lstrip()
    return _header_after(between, eot_text)


MARKER_BORROW = 4  # characters of context a marker may take from before it (a SentencePiece space: 1)


def _marker_in_context(tokenizer, text: str, ids: list[int], marker: str) -> str | None:
    """`marker`, with the fewest characters that precede it in `text` (the same at each of its
    occurrences) and, if need be, without its trailing whitespace (which a SentencePiece or BPE
    vocabulary merges with the answer's first word), whose token ids occur in `ids` (the
    tokenized `text`) as often as its text occurs in `text`; None when there is none."""
    starts = [i for i in range(len(text)) if text.startswith(marker, i)]
    for borrow in range(MARKER_BORROW + 1):
        if not starts or any(start < borrow for start in starts) or len({text[s - borrow : s] for s in starts}) > 1:
            return None
        context = text[starts[0] - borrow : starts[0]]
        for candidate in dict.fromkeys([context + marker, context + marker.rstrip()]):
            core = tokenizer(candidate, add_special_tokens=False)["input_ids"]
            found = sum(ids[i : i + len(core)] == core for i in range(len(ids) - len(core) + 1)) if core else 0
            if found and found == text.count(candidate):
                return candidate
    return None


def _choose_pad(tokenizer, chat: ChatFormat) -> int:
    """A pad id that never occurs inside a conversation (padding is masked by length, but a
    collator or a loss that masks by `id != pad` would otherwise drop real tokens)."""
    # EOS counts as in use only where the factory writes it into sequences; elsewhere it is a
    # stop token that never occurs inside a conversation (Qwen pads with its EOS this way).
    in_use = {chat.eot_token_id, tokenizer.bos_token_id}
    rendered = "".join(chat.probe.values())
    in_use.update(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    current = tokenizer.pad_token_id
    if current is not None and current not in in_use:
        return current
    special = getattr(tokenizer, "added_tokens_decoder", {})
    named_pad = [i for i in special if "pad" in str(special[i]).lower()]
    candidates = [*named_pad, tokenizer.unk_token_id, *sorted(special)]
    for token_id in candidates:
        if token_id not in in_use and token_id is not None:
            return token_id
    # Nothing unused: EOS. Safe here (attention masks and labels come from lengths, never from
    # `id != pad`), and said in the log.
    log.warning("the tokenizer has no unused token to pad with; padding with EOS %r", tokenizer.eos_token)
    return tokenizer.eos_token_id
