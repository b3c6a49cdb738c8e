"""What an agent-style request adds to a chat: tools, a forced call, structured output, thinking.

`AgentOptions` is the face-neutral form of OpenAI's `tools`, `tool_choice`,
`parallel_tool_calls`, `response_format`, `reasoning_effort`, `enable_thinking` and
`chat_template_kwargs` (the API maps its request onto it; the Chat tab its thinking switch).
The chat path (ChatService) uses it in three places, all here:

- rendering: `template_vars` are the variables the model's own template reads (`tools`,
  `enable_thinking`, `reasoning_effort`, the request's `chat_template_kwargs`); a template that
  does not render `tools` gets them described in the system message in a generic JSON form and
  the history's calls and results written as text (`polyfill`), as llama.cpp does;
- generating: `constraint` turns a forced call or a response schema into a GBNF grammar (lazy
  for `tool_choice: auto`, and starting after the thinking when the prompt opened it);
- reading the reply: `ReplyFormat` says how modules.chat.tool_calls splits the output into
  reasoning, content and calls.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from modules.chat.tool_calls import (
    ReplyStream,
    ToolFamily,
    call_grammar,
    detect_family,
    generic_tool_prompt,
    template_supports_tools,
)
from modules.chat.types import ASSISTANT, TOOL, USER, Message
from modules.core.errors import InvalidRequestError
from modules.engine.grammars import check_schema, json_object_grammar, json_schema_grammar

AUTO, NONE, REQUIRED = "auto", "none", "required"
GENERIC = "generic"
"""The family of templates with no known call syntax (modules/chat/tool_calls.py)."""
THINK_END_TRIGGER = r"[\s\S]*?</think>\s*([\s\S]*)"
"""Where a grammar starts when the prompt opened a think block: after the block closes."""


@dataclass(frozen=True)
class AgentOptions:
    """Tools, the call it must make, the output's schema and the template's switches."""

    tools: tuple[dict[str, Any], ...] = ()
    """OpenAI function tools: {"type": "function", "function": {"name", "description", "parameters"}}."""
    tool_choice: str = AUTO
    """auto, none or required; a forced function is `forced_name` (with tool_choice required)."""
    forced_name: str | None = None
    parallel_tool_calls: bool = True
    response_schema: Mapping[str, Any] | None = None
    """The JSON schema the reply must match (response_format json_schema)."""
    json_object: bool = False
    """The reply must be a JSON object (response_format json_object)."""
    strict: bool = False
    """OpenAI's strict structured output: every property required, no others (modules/engine/grammars.py)."""
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Extra variables for the template: enable_thinking, reasoning_effort, chat_template_kwargs."""

    @property
    def tools_on(self) -> bool:
        return bool(self.tools) and self.tool_choice != NONE

    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def check(self, param_prefix: str = "") -> None:
        """Refuse what no generation could honour, naming the field (a 400 in the API)."""
        for index, tool in enumerate(self.tools):
            where = f"{param_prefix}tools.{index}.function"
            function = tool.get("function") if isinstance(tool, Mapping) else None
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
                raise InvalidRequestError("every tool needs a function with a name", f"{where}.name")
            parameters = function.get("parameters")
            if parameters is not None:
                if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
                    raise InvalidRequestError(
                        f"the parameters of tool {function['name']!r} must be a JSON schema of type object",
                        f"{where}.parameters")
                check_schema(dict(parameters), f"{where}.parameters")
        names = self.names()
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidRequestError(f"two tools have the same name: {', '.join(duplicates)}", "tools")
        if self.tool_choice not in (AUTO, NONE, REQUIRED):
            raise InvalidRequestError(f"tool_choice must be auto, none, required or a function, got "
                                      f"{self.tool_choice!r}", "tool_choice")
        if self.tool_choice == REQUIRED and not self.tools:
            raise InvalidRequestError("tool_choice asks for a call but no tools were given", "tool_choice")
        if self.forced_name is not None and self.forced_name not in names:
            raise InvalidRequestError(f"tool_choice names the function {self.forced_name!r}, which is not among "
                                      f"the tools ({', '.join(names) or 'none given'})", "tool_choice")
        if self.response_schema is not None:
            if self.tools_on and self.tool_choice == REQUIRED:
                raise InvalidRequestError("response_format json_schema cannot be combined with a required tool "
                                          "call", "response_format")
            check_schema(dict(self.response_schema), "response_format.json_schema.schema", strict=self.strict)


NO_AGENT = AgentOptions()


def tools_for_template(agent: AgentOptions) -> list[dict[str, Any]] | None:
    """The tools as the template sees them (all of them, or the forced one), None when off."""
    if not agent.tools_on:
        return None
    tools = [_with_parameters(t) for t in agent.tools]
    if agent.forced_name is not None:
        tools = [t for t in tools if t["function"]["name"] == agent.forced_name]
    return tools


def _with_parameters(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = dict(tool["function"])
    function.setdefault("parameters", {"type": "object", "properties": {}})
    return {"type": "function", "function": function}


def template_vars(agent: AgentOptions, template: str) -> dict[str, Any]:
    """The variables beyond `messages` the model's template gets for this request."""
    variables: dict[str, Any] = dict(agent.template_kwargs)
    tools = tools_for_template(agent)
    if tools is not None and supports_tools(template):
        variables["tools"] = tools
    return variables


@lru_cache(maxsize=64)
def supports_tools(template: str) -> bool:
    """template_supports_tools, once per template source: it renders the template (a pure
    function of the source, so memoised like the renderer's compiled templates)."""
    return template_supports_tools(template)


@lru_cache(maxsize=64)
def family_of(template: str) -> ToolFamily:
    """detect_family, once per template source."""
    return detect_family(template or None)


def polyfill(messages: Sequence[Message], agent: AgentOptions, template: str, instruct: bool
             ) -> tuple[list[Message], str]:
    """What a prompt that cannot show tools needs: the system text describing them (for a
    template that does not render `tools`, as llama.cpp does), and, outside instruct mode (a
    transcript, no template), past calls and results written as text turns. In instruct mode
    the template's own family shapes the history (tool_calls.template_messages). Returns the
    messages unchanged and "" when nothing is needed.
    """
    has_tool_turns = any(m.tool_calls or m.role == TOOL for m in messages)
    if not (agent.tools_on or has_tool_turns) or (instruct and supports_tools(template)):
        return list(messages), ""
    tools = tools_for_template(agent)
    prompt = generic_tool_prompt(tools, agent.tool_choice) if tools else ""
    if instruct:
        return list(messages), prompt
    out: list[Message] = []
    for message in messages:
        if message.role == ASSISTANT and message.tool_calls:
            calls = [{"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}
                     for c in message.tool_calls]
            text = json.dumps({"tool_calls": calls} if len(calls) > 1 else {"tool_call": calls[0]},
                              ensure_ascii=False)
            out.append(Message(ASSISTANT, f"{message.content}\n{text}".strip()))
        elif message.role == TOOL:
            result = {"tool_response": {"tool": message.name, "content": message.content}}
            out.append(Message(USER, json.dumps(result, ensure_ascii=False)))
        else:
            out.append(message)
    return out, prompt


def _arguments(arguments: object) -> object:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def check_tool_turns(messages: Sequence[Message], positions: Sequence[int] | None = None) -> None:
    """Every tool result answers a call made before it (a 400 naming the message otherwise);
    `positions` are the messages' indexes as the client numbered them (default: 0, 1, 2...)."""
    called: set[str] = set()
    for number, message in enumerate(messages):
        index = positions[number] if positions is not None else number
        if message.role == ASSISTANT:
            called.update(str(c.get("id") or "") for c in message.tool_calls)
        elif message.role == TOOL:
            if not message.tool_call_id:
                raise InvalidRequestError("a tool message needs the tool_call_id of the call it answers",
                                          f"messages.{index}.tool_call_id")
            if message.tool_call_id not in called:
                raise InvalidRequestError(f"tool message {index} answers call {message.tool_call_id!r}, which no "
                                          "earlier assistant message made", f"messages.{index}.tool_call_id")


@dataclass(frozen=True)
class ReplyFormat:
    """How a reply is read: the family's call syntax, whether calls are parsed at all, and
    whether it starts inside a think block. `plain` replies skip the parser entirely."""

    family: ToolFamily
    tools: bool
    thinking: bool
    names: tuple[str, ...] = ()

    def stream(self) -> ReplyStream:
        return ReplyStream(self.family, tools=self.tools, thinking=self.thinking)

    def stream_text(self) -> TextReader:
        """A reader of the reply's text only (the Chat tab: thinking apart, calls not read)."""
        return TextReader(ReplyStream(self.family, tools=False, thinking=self.thinking))


class TextReader:
    """The content and reasoning so far of a streamed reply (markup held back until decided)."""

    def __init__(self, stream: ReplyStream) -> None:
        self._stream = stream
        self.content = ""
        self.reasoning = ""

    def feed(self, delta: str) -> None:
        self._add(self._stream.feed(delta))

    def finish(self) -> None:
        self._add(self._stream.finish())

    def _add(self, pieces: Sequence[Any]) -> None:
        for piece in pieces:
            if piece.kind == "reasoning":
                self.reasoning += piece.text
            elif piece.kind == "content":
                self.content += piece.text


def reply_format(agent: AgentOptions, template: str, prompt: str) -> ReplyFormat:
    from modules.chat.tool_calls import thinking_opened

    return ReplyFormat(family_of(template), agent.tools_on, thinking_opened(prompt), tuple(agent.names()))


@dataclass(frozen=True)
class Constraint:
    grammar: str = ""
    triggers: tuple[str, ...] = ()
    optional: bool = False
    """Only a help (tool_choice auto's lazy call grammar): a loader without grammars goes without."""


def constraint(agent: AgentOptions, reply: ReplyFormat) -> Constraint:
    """The grammar a generation follows for `agent`: a forced call, a schema, or (lazy) any call."""
    after_thinking = (THINK_END_TRIGGER,) if reply.thinking else ()
    if agent.response_schema is not None:
        schema = dict(agent.response_schema)
        return Constraint(json_schema_grammar(schema, "response_format", strict=agent.strict), after_thinking)
    if agent.json_object:
        return Constraint(json_object_grammar(), after_thinking)
    if not agent.tools_on:
        return Constraint()
    tools = tools_for_template(agent) or []
    calls = call_grammar(reply.family, tools, name=agent.forced_name, parallel=agent.parallel_tool_calls)
    if agent.tool_choice == REQUIRED:
        return Constraint(calls.gbnf, after_thinking)
    return Constraint(calls.gbnf, tuple(calls.triggers), optional=True)


def system_with(system: str, addition: str) -> str:
    return "\n\n".join(p for p in (system.strip(), addition.strip()) if p)


__all__ = [
    "AUTO", "GENERIC", "NONE", "NO_AGENT", "REQUIRED", "AgentOptions", "Constraint", "ReplyFormat",
    "check_tool_turns", "constraint", "polyfill", "reply_format", "system_with", "template_vars",
    "tools_for_template",
]
