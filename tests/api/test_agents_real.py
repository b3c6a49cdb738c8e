"""Agents end to end on real loaders: the kit's random-weight Llama with Qwen2.5's tool-capable
template (in the GGUF's metadata and the HF folder's chat_template.jinja), through the API as the
openai SDK and LangChain call it (in-process: the SDKs take the TestClient as their HTTP client).

Random weights write nothing sensible by themselves, so every valid call and every valid JSON
object here is the constrained decoding's doing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from modules.api import create_app
from modules.core.settings import Settings
from modules.engine.app import App
from tests.api.conftest import LOCAL, sse_payloads

pytest.importorskip("llama_cpp")
pytest.importorskip("transformers")
jsonschema_rs = pytest.importorskip("jsonschema_rs")

TEMPLATE = Path(__file__).resolve().parents[1] / "fixtures" / "chat-templates" / "Qwen-Qwen2.5-7B-Instruct.jinja"
GGUF, HF = "tiny-tools.gguf", "tiny-tools-hf"
WEATHER_PARAMS = {
    "type": "object",
    # ASCII patterns: random weights also emit lone UTF-8 bytes, which llama.cpp's grammar
    # counts differently from the U+FFFD they decode to, so maxLength is tested in REPORT.
    "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
                   "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Forecast.",
                                            "parameters": WEATHER_PARAMS}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"]}}}
REPORT = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 16},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                   "minItems": 1, "maxItems": 3},
        "level": {"enum": ["low", "high"]},
        "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                    "ok": {"type": "boolean"}},
                  "required": ["name", "ok"], "additionalProperties": False},
    },
    "required": ["title", "scores", "level", "owner"], "additionalProperties": False,
}
ASK = [{"role": "user", "content": "What is the weather in Paris this week?"}]


@pytest.fixture(scope="module")
def agent_client(tiny_kit, tmp_path_factory):
    models = tmp_path_factory.mktemp("agent-models")
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(tiny_kit.gguf_f32),
                    str(models / GGUF), "--chat-template-file", str(TEMPLATE), "--force"],
                   check=True, capture_output=True)
    shutil.copytree(tiny_kit.hf_dir, models / HF)
    shutil.copy(TEMPLATE, models / HF / "chat_template.jinja")
    config = json.loads((models / HF / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (models / HF / "tokenizer_config.json").write_text(json.dumps(config))
    app = App.create(Settings(models_dir=str(models), threads=1, threads_batch=1, ctx_size=2048, cpu=True), models)
    with TestClient(create_app(app), base_url=LOCAL, raise_server_exceptions=False) as client:
        yield app, client
    app.close()


GPTQ = "tiny-tools-GPTQ"


def _gptq_folder(models: Path) -> str:
    """The tools model as a 4-bit GPTQ folder (quantised on CPU, once per module)."""
    from loaders.gptq import GPTQLoader

    if GPTQLoader.unavailable_reason() is not None:
        pytest.skip(str(GPTQLoader.unavailable_reason()))
    if not (models / GPTQ).exists():
        import torch

        from tests.test_gptq_loader import calibration_texts, quantize_with_gptqmodel

        quantize_with_gptqmodel(models / HF, models / GPTQ, device="cpu", group_size=32,
                                calibration=calibration_texts(64), dtype=torch.float32)
        shutil.copy(TEMPLATE, models / GPTQ / "chat_template.jinja")
    return GPTQ


@pytest.fixture(scope="module", params=[GGUF, HF, GPTQ], ids=["llama.cpp", "transformers", "gptq"])
def loaded(request, agent_client):
    app, client = agent_client
    name = _gptq_folder(app.root) if request.param == GPTQ else request.param
    if name == GPTQ:
        # Eager torch on one thread, as tests/test_gptq_loader.py runs GPTQ (no 50 s inductor build).
        import torch

        previous = torch.get_num_threads(), torch._dynamo.config.disable
        torch.set_num_threads(1)
        torch._dynamo.config.disable = True
        request.addfinalizer(lambda: (torch.set_num_threads(previous[0]),
                                      setattr(torch._dynamo.config, "disable", previous[1])))
    app.models.load(name)
    return client


def _chat(client: TestClient, **body) -> dict:
    resp = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 160, "temperature": 1.0,
                                                      **body})
    assert resp.status_code == 200, resp.text
    return resp.json() if not body.get("stream") else {"events": sse_payloads(resp.text)}


def _check_call(name: str, arguments: str) -> None:
    schema = {"get_weather": WEATHER_PARAMS, "get_time": TIME["function"]["parameters"]}[name]
    jsonschema_rs.validate(schema, json.loads(arguments))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_gives_a_schema_valid_call(loaded, seed):
    body = _chat(loaded, tools=[WEATHER, TIME], tool_choice="required", seed=seed, parallel_tool_calls=False,
                 max_tokens=300)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["tool_calls"]
    for call in choice["message"]["tool_calls"]:
        _check_call(call["function"]["name"], call["function"]["arguments"])


def test_parallel_calls_each_validate(loaded):
    body = _chat(loaded, tools=[WEATHER, TIME], tool_choice="required", seed=21, max_tokens=400)
    calls = body["choices"][0]["message"]["tool_calls"]
    complete = calls if body["choices"][0]["finish_reason"] == "tool_calls" else calls[:-1]
    assert complete
    for call in complete:
        _check_call(call["function"]["name"], call["function"]["arguments"])


def test_a_named_function_is_the_one_called_streamed(loaded):
    named = {"type": "function", "function": {"name": "get_time"}}
    events = _chat(loaded, tools=[WEATHER, TIME], tool_choice=named, stream=True, seed=4,
                   parallel_tool_calls=False)["events"]
    deltas = [e["choices"][0]["delta"] for e in events if e != "[DONE]" and e["choices"]]
    pieces = [p for d in deltas for p in d.get("tool_calls") or []]
    assert {p["index"] for p in pieces} == {0}
    assert pieces[0]["function"]["name"] == "get_time"
    _check_call("get_time", "".join(p["function"].get("arguments") or "" for p in pieces))
    assert not "".join(d.get("content") or "" for d in deltas).strip()
    assert [e for e in events if e != "[DONE]"][-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("seed", [5, 6])
def test_json_schema_output_validates(loaded, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": REPORT, "strict": True}}
    content = _chat(loaded, response_format=fmt, seed=seed, max_tokens=300)["choices"][0]["message"]["content"]
    jsonschema_rs.validate(REPORT, json.loads(content))


def test_json_object_and_completions_json_schema(loaded):
    choice = _chat(loaded, response_format={"type": "json_object"}, seed=7, max_tokens=200)["choices"][0]
    text = choice["message"]["content"]
    # Any object: a random model's strings may run past max_tokens; what it wrote is still JSON.
    assert text.startswith("{")
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    resp = loaded.post("/v1/completions", json={"prompt": "JSON:", "json_schema": REPORT, "max_tokens": 300,
                                                "temperature": 1.0, "seed": 8})
    assert resp.status_code == 200, resp.text
    jsonschema_rs.validate(REPORT, json.loads(resp.json()["choices"][0]["text"]))


def test_none_and_no_tools_answer_text(loaded):
    for body in ({"tools": [WEATHER], "tool_choice": "none"}, {}):
        choice = _chat(loaded, seed=9, max_tokens=12, **body)["choices"][0]
        assert not choice["message"]["tool_calls"]
        assert choice["finish_reason"] in ("stop", "length")


def test_the_openai_sdk_calls_tools_streams_and_parses(loaded):
    openai = pytest.importorskip("openai")
    pydantic = pytest.importorskip("pydantic")
    client = openai.OpenAI(base_url=f"{LOCAL}/v1", api_key="none", http_client=loaded, max_retries=0)
    result = client.chat.completions.create(model="any", messages=ASK, tools=[WEATHER], tool_choice="required",
                                            temperature=1.0, seed=10, max_tokens=300, parallel_tool_calls=False)
    call = result.choices[0].message.tool_calls[0]
    _check_call(call.function.name, call.function.arguments)

    stream = client.chat.completions.create(model="any", messages=ASK, tools=[WEATHER], tool_choice="required",
                                            temperature=1.0, seed=11, max_tokens=300, stream=True,
                                            parallel_tool_calls=False)
    name, arguments = "", ""
    for chunk in stream:
        for piece in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            name += piece.function.name or ""
            arguments += piece.function.arguments or ""
    _check_call(name, arguments)

    class Owner(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=8)
        ok: bool

    parsed = client.chat.completions.parse(model="any", messages=ASK, response_format=Owner, temperature=1.0,
                                           seed=12, max_tokens=120)
    assert isinstance(parsed.choices[0].message.parsed, Owner)


def test_langchain_binds_tools_and_structures_output(loaded):
    chat_models = pytest.importorskip("langchain_openai")
    pydantic = pytest.importorskip("pydantic")
    llm = chat_models.ChatOpenAI(base_url=f"{LOCAL}/v1", api_key="none", model="any", temperature=1.0,
                                 max_tokens=300, seed=13, http_client=loaded, max_retries=0)
    message = llm.bind_tools([WEATHER], tool_choice="required", parallel_tool_calls=False).invoke("Weather?")
    call = message.tool_calls[0]
    assert call["name"] == "get_weather"
    jsonschema_rs.validate(WEATHER_PARAMS, call["args"])

    class Owner(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=8)
        ok: bool

    owner = llm.with_structured_output(Owner, method="json_schema").invoke("Who owns it?")
    assert isinstance(owner, Owner)
