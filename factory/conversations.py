"""Full conversations with simulated users (seed 002's evaluation protocol).

1. Personas, new for the evaluation: generated from seeds persona_seed, persona_seed + 1, ...
   (a range disjoint from training's), each with a name, a communication style (its group
   in the report's breakdown) and, per conversation, a goal made of held-out test prompts
   (the test split is leak-free by the splits-ready gate) with their reference answers; or
   read from a file of the user's own.
2. A user simulator, the same for every model: an LLM with a fixed system prompt (stay in the
   persona, one message at a time, invent nothing, write the stop token when the goal is
   met), or a function; the default, `scripted_user`, sends the goal's requests one per turn
   and then the stop token.
3. Each model has `per_persona` conversations with each persona, up to `max_turns` user
   messages, with the same seeds and sampling for every model; every transcript is kept in
   full and later judged as a whole.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import orjson
import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from factory.errors import InputError
from factory.workspace import Workspace

NAMES = ["Amara", "Bruno", "Chen", "Dalia", "Emeka", "Freya", "Gustavo", "Hana", "Ivan", "Jamila", "Kenji", "Lena",
         "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Samir", "Tamsin", "Umar", "Vera", "Wen", "Yusuf", "Zoe"]
# style: how the persona writes (its group in the category breakdown)
STYLES = {
    "brief": "writes short, direct messages and expects short answers",
    "polite": "is courteous and thanks the assistant, and asks clearly",
    "impatient": "is in a hurry and pushes for a straight answer",
    "detailed": "explains the context of each request and reads answers carefully",
    "unsure": "is new to the topic, unsure how to phrase things, and double-checks answers",
}
SIMULATOR_PROMPT = """\
You are role-playing a user who talks to an AI assistant. Stay in character as this person for \
the whole conversation:
Name: {name}
Who they are: {description}
Goal of this conversation: {goal}

Rules:
- Write only the user's next message: one message at a time, never the assistant's part.
- Ask for what the goal needs, in the persona's own style; do not invent facts, numbers or \
requests that are not in the goal.
- When the goal is met, or the assistant clearly cannot help, reply with exactly {stop_token} and nothing else."""
FIRST_TURN = "(The conversation starts. Write your first message to the assistant.)"


# --- personas --------------------------------------------------------------------------------------


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    reference: str | None = None


class Conversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    goal: str
    requests: list[Request] = Field(default_factory=list)


class Persona(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    name: str = ""
    description: str
    group: str = "all"
    seed: int | None = None
    system: str | None = None
    """The system turn the models get in this persona's conversations (from the test records)."""

    goal: str | None = None
    """One goal for every conversation (a personas file), or:"""

    conversations: list[Conversation] = Field(default_factory=list)


def load_personas(cfg, ws: Workspace) -> tuple[list[Persona], dict[str, Any]]:
    """The evaluation's personas and where they came from (for the metrics)."""
    settings = cfg.evaluation.conversations
    if settings.personas_file:
        path = ws.path(settings.personas_file)
        personas = read_personas_file(path, ws)
        return personas, {"source": ws.rel(path), "count": len(personas)}
    from factory.evaluation import read_split

    records = read_split(ws.split_file("test"), ws)
    personas = generate_personas(records, count=settings.personas, per_persona=settings.per_persona,
                                 requests=settings.requests_per_conversation, first_seed=settings.persona_seed)
    return personas, {"source": "generated", "count": len(personas), "test_split": ws.rel(ws.split_file("test")),
                      "seeds": [settings.persona_seed, settings.persona_seed + settings.personas - 1]}


def read_personas_file(path: Path, ws: Workspace) -> list[Persona]:
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"evaluation.conversations.personas_file: {ws.rel(path)} does not exist") from None
    except orjson.JSONDecodeError as e:
        raise InputError(f"{ws.rel(path)}: not valid JSON ({e})") from None
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{ws.rel(path)}: must be a non-empty JSON list of personas")
    personas, problems = [], []
    for index, entry in enumerate(raw):
        try:
            persona = Persona.model_validate(entry)
        except ValidationError as e:
            problems += [f"  - [{index}].{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
            continue
        if not persona.goal and not persona.conversations:
            problems.append(f"  - [{index}]: give a `goal` (or `conversations`: [{{goal, requests}}])")
        personas.append(persona)
    ids = [p.id for p in personas]
    problems += [f"  - persona id {i!r} appears more than once" for i in sorted({i for i in ids if ids.count(i) > 1})]
    if problems:
        raise InputError(f"{ws.rel(path)}: invalid personas:\n" + "\n".join(problems))
    return personas


def generate_personas(records: list[dict], *, count: int, per_persona: int, requests: int,
                      first_seed: int) -> list[Persona]:
    """`count` personas from seeds first_seed.. ; each conversation's goal is `requests`
    test prompts (with their reference answers), drawn without repeats inside a persona."""
    from factory.chat import messages, reference

    if not records:
        raise InputError("no test records to make personas' goals from")
    personas = []
    for i in range(count):
        seed = first_seed + i
        rng = random.Random(seed)
        name = rng.choice(NAMES)
        style = rng.choice(sorted(STYLES))
        needed = per_persona * requests
        chosen = rng.sample(records, needed) if needed <= len(records) else [rng.choice(records) for _ in range(needed)]
        system = None
        conversations = []
        for k in range(per_persona):
            asks = []
            for record in chosen[k * requests:(k + 1) * requests]:
                prompt = messages(record["conversations"][:-1])
                system = system or next((m["content"] for m in prompt if m["role"] == "system"), None)
                asks.append(Request(text=prompt[-1]["content"], reference=reference(record)))
            goal = "Get a correct answer to each of these requests, one at a time: " + \
                   " ".join(f"({n}) {r.text}" for n, r in enumerate(asks, 1))
            conversations.append(Conversation(goal=goal, requests=asks))
        personas.append(Persona(id=f"persona-{seed}", name=name, description=f"{name} {STYLES[style]}.", group=style,
                                seed=seed, system=system, conversations=conversations))
    return personas


def conversation_plan(persona: Persona, index: int) -> Conversation:
    if persona.conversations:
        return persona.conversations[index % len(persona.conversations)]
    return Conversation(goal=persona.goal or "")


# --- the user simulator ------------------------------------------------------------------------------


def scripted_user(persona: dict, conversation: dict, transcript: list[dict], stop_token: str) -> str:
    """The default simulator: the goal's requests in order, one per turn, then the stop token."""
    asked = sum(1 for m in transcript if m["role"] == "user")
    requests = conversation["requests"]
    return requests[asked]["text"] if asked < len(requests) else stop_token


class Simulator:
    """Plays the user: a function, or an LLM given SIMULATOR_PROMPT and the conversation with
    the roles turned around (the assistant's messages are what it reads)."""

    def __init__(self, *, model=None, function: Callable | None = None, spec: str = "", stop_token: str,
                 max_tokens: int, temperature: float):
        self.model, self.function, self.spec = model, function, spec
        self.stop_token, self.max_tokens, self.temperature = stop_token, max_tokens, temperature

    def describe(self) -> dict[str, Any]:
        return {"function": self.spec} if self.function is not None else {**self.model.describe(),
                                                                           "system_prompt": SIMULATOR_PROMPT}

    def next_message(self, persona: Persona, plan: Conversation, transcript: list[dict], seed: int) -> str:
        if self.function is not None:
            return str(self.function(persona.model_dump(), plan.model_dump(), transcript, self.stop_token)).strip()
        system = SIMULATOR_PROMPT.format(name=persona.name or persona.id, description=persona.description,
                                         goal=plan.goal, stop_token=self.stop_token)
        turned = [{"role": "user", "content": FIRST_TURN}]
        for message in transcript:
            turned.append({"role": "assistant" if message["role"] == "user" else "user", "content": message["content"]})
        return self.model.chat([{"role": "system", "content": system}, *turned], max_tokens=self.max_tokens,
                               temperature=self.temperature, seed=seed)


def make_simulator(cfg, model=None) -> Simulator:
    """The user simulator of evaluation.conversations: its function, or the LLM `model` (a
    ChatModel opened from conversations.simulator by factory.endpoints)."""
    from factory.endpoints import load_function

    conv, compare = cfg.evaluation.conversations, cfg.evaluation.compare
    common = dict(stop_token=conv.stop_token, max_tokens=compare.max_tokens, temperature=compare.temperature)
    if conv.simulator.function:
        return Simulator(function=load_function(conv.simulator.function, what="user simulator"),
                         spec=conv.simulator.function, **common)
    return Simulator(model=model, **common)


# --- conversations -----------------------------------------------------------------------------------


def conversation_seed(base: int, persona: Persona, index: int) -> int:
    """The same for every model: the only thing that differs between their conversations is them."""
    return xxhash.xxh32_intdigest(f"{base}/{persona.id}/{index}".encode()) & 0x7FFFFFFF


def converse(model, simulator: Simulator, persona: Persona, index: int, *, system: str | None, max_turns: int,
             max_tokens: int, temperature: float, seed: int) -> dict[str, Any]:
    """One conversation between the simulated user and `model`: the transcript and how it ended.

    A user message containing the stop token ends the conversation (it is not sent); so does
    an empty one, or the turn limit.
    """
    plan = conversation_plan(persona, index)
    transcript: list[dict] = []
    stopped_by = "turn_limit"
    for turn in range(max_turns):
        message = simulator.next_message(persona, plan, transcript, seed + 2 * turn)
        if simulator.stop_token in message:
            stopped_by = "stop_token"
            break
        if not message:
            stopped_by = "empty_user_message"
            break
        transcript.append({"role": "user", "content": message})
        prompt = ([{"role": "system", "content": system}] if system else []) + transcript
        reply = model.chat(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed + 2 * turn + 1)
        transcript.append({"role": "assistant", "content": reply})
    return {
        "persona": persona.id,
        "group": persona.group,
        "conversation": index,
        "seed": seed,
        "system": system,
        "goal": plan.goal,
        "requests": [r.model_dump() for r in plan.requests],
        "messages": transcript,
        "user_turns": sum(1 for m in transcript if m["role"] == "user"),
        "stopped_by": stopped_by,
    }
