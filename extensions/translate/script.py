"""Translate: chat in your language with a model that works best in English.

input_modifier translates what you type into English and output_modifier translates the
reply back; the chat keeps both texts (the English one is what the model reads, yours is
what the UI shows). Two engines behind one small Translator interface:
- google: Google Translate through the `deep-translator` package (online; imported only
  when used; scripts/install.sh --extensions translate installs it); when it is unreachable
  (offline, or the package is missing) the loaded model translates instead, and the log says
  so once per switch (`last_engine()` tells which engine did the last translation);
- model: the loaded model itself, with a translation prompt (offline, slower).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

LANGUAGES = {"English": "en", "French": "fr", "German": "de", "Spanish": "es", "Italian": "it",
             "Portuguese": "pt", "Dutch": "nl", "Polish": "pl", "Russian": "ru", "Ukrainian": "uk",
             "Chinese": "zh-CN", "Japanese": "ja", "Korean": "ko", "Arabic": "ar", "Hindi": "hi", "Turkish": "tr"}
MODEL_LANGUAGE = "en"

params: dict[str, Any] = {
    "display_name": "Translate",
    "is_tab": False,
    "activate": True,
    "language": "fr",
    "engine": "google",
}

_app: Any = None
RETRY_ONLINE_S = 300.0
"""After the online engine failed, the model translates for this long before it is tried again
(an unreachable host can take a network timeout per message)."""


class Translator(Protocol):
    """What an engine does: `text` from language code `source` to `target`."""

    def translate(self, text: str, source: str, target: str) -> str: ...


class GoogleTranslator:
    """Google Translate via deep-translator (network access)."""

    def translate(self, text: str, source: str, target: str) -> str:
        try:
            from deep_translator import GoogleTranslator as Google
        except ImportError:
            raise RuntimeError("the google engine needs deep-translator: scripts/install.sh --extensions translate") from None
        return str(Google(source=source, target=target).translate(text))


class ModelTranslator:
    """The loaded model translates (offline); generation skips the hooks, so no recursion."""

    PROMPT = ("Translate the text below from {source} to {target}. Reply with the translation only.\n\n"
              "Text: {text}\n\nTranslation:")

    def __init__(self, app: Any, max_new_tokens: int = 512) -> None:
        self.app = app
        self.max_new_tokens = max_new_tokens

    def translate(self, text: str, source: str, target: str) -> str:
        from modules.core.sampling import SamplingParams

        names = {code: name for name, code in LANGUAGES.items()}
        prompt = self.PROMPT.format(source=names.get(source, source), target=names.get(target, target), text=text)
        # Half the context at most, so the prompt always has room (like the API's default).
        room = self.app.models.require().info.context_length // 2
        params = SamplingParams(temperature=0, max_new_tokens=max(1, min(self.max_new_tokens, room)),
                                stop=["\n\nText:"])
        return self.app.generator.generate(prompt, params, raw=True).text.strip()


ENGINES: dict[str, Callable[[], Translator]] = {
    "google": GoogleTranslator,
    "model": lambda: ModelTranslator(_app),
}
"""Engine name -> factory; tests add a deterministic one."""


def setup(app: Any = None) -> None:
    global _app
    _app = app


class _Fallback:
    """Which engine translated last, and until when the online one is skipped after a failure."""

    def __init__(self) -> None:
        self.last: str | None = None
        self.online_down_until = 0.0

    def used(self, name: str, why: str = "") -> None:
        if name != self.last:
            log.info("translate: using the %s engine%s", name, why)
        self.last = name


_fallback = _Fallback()


def last_engine() -> str | None:
    """The engine that did the last translation ("google", "model", ...), None before the first."""
    return _fallback.last


def _translate(text: str, source: str, target: str) -> str:
    if not params.get("activate") or source == target or not text.strip():
        return text
    name = str(params.get("engine"))
    engine = ENGINES.get(name)
    if engine is None:
        raise ValueError(f"unknown translation engine {name!r}; use {', '.join(ENGINES)}")
    if name != "google":
        _fallback.used(name)
        return engine().translate(text, source, target)
    if time.monotonic() >= _fallback.online_down_until:
        try:
            result = engine().translate(text, source, target)
        except Exception as exc:  # noqa: BLE001 - offline, blocked, package missing: the model takes over
            _fallback.online_down_until = time.monotonic() + RETRY_ONLINE_S
            reason = f"{type(exc).__name__}: {exc}"
        else:
            _fallback.used(name)
            return result
    else:
        reason = "it failed a moment ago"
    if _app is None or _app.models.current is None:
        raise RuntimeError(f"the google engine is unreachable ({reason}) and no model is loaded to translate "
                           "offline: load one, or install deep-translator and get online")
    _fallback.used("model", f" (offline fallback: google is unreachable: {reason})")
    return ENGINES["model"]().translate(text, source, target)


def input_modifier(text: str, state: dict[str, Any], is_chat: bool = False) -> str:
    """Your text, in English for the model."""
    return _translate(text, str(params["language"]), MODEL_LANGUAGE)


def output_modifier(text: str, state: dict[str, Any], is_chat: bool = False) -> str:
    """The model's reply, in your language (the English one stays in the chat for the next prompt)."""
    return _translate(text, MODEL_LANGUAGE, str(params["language"]))


def ui() -> None:
    """On/off, your language and the engine; changes apply to the next message."""
    import gradio as gr  # only when the web UI is built

    names = {code: name for name, code in LANGUAGES.items()}
    with gr.Row():
        activate = gr.Checkbox(value=bool(params["activate"]), label="Translate")
        language = gr.Dropdown(list(LANGUAGES), value=names.get(str(params["language"]), "French"),
                               label="Your language")
        engine = gr.Radio(["google", "model"], value=str(params["engine"]), label="Engine",
                          info="google: online (the loaded model when offline); model: the loaded model, offline")
    activate.change(lambda v: params.update(activate=bool(v)), activate, None, api_visibility="private")
    language.change(lambda v: params.update(language=LANGUAGES.get(v, "en")), language, None,
                    api_visibility="private")
    engine.change(lambda v: params.update(engine=str(v)), engine, None, api_visibility="private")
