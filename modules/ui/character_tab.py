"""Character sub-tab: create, edit, import (YAML, JSON, TavernAI PNG card), export, delete.

Everything is one call into app.characters (CharacterStore): it checks names, writes
atomically and converts pictures. Exported cards are written to a temporary file for the
browser to download.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from modules.chat.types import Character
from modules.core.errors import WorkbenchError
from modules.engine.app import App

log = logging.getLogger(__name__)


def create_ui(app: App) -> None:
    """The sub-tab's components and handlers; place it inside a gr.Tab."""
    names = app.characters.list()
    with gr.Row():
        picker = gr.Dropdown(names, value=names[0] if names else None, label="Character", scale=4,
                             elem_id="character-picker")
        refresh = gr.Button("Refresh", scale=1)
    with gr.Row():
        with gr.Column(scale=3):
            name = gr.Textbox(label="Name", info="Also the file name in characters/", elem_id="character-name")
            greeting = gr.Textbox(label="Greeting", lines=3)
            context = gr.Textbox(label="Context", lines=8, info="Description, personality, scenario; "
                                 "{{char}} and {{user}} are replaced by the names")
            examples = gr.Textbox(label="Example dialogue", lines=4, info="<START> separates examples")
        with gr.Column(scale=2):
            picture = gr.Image(label="Picture", type="filepath", height=260, sources=["upload"])
            upload = gr.File(label="Import a card (.png, .json, .yaml)", file_types=[".png", ".json", ".yaml", ".yml"],
                             type="filepath", elem_id="character-import")
            download = gr.File(label="Exported card", interactive=False)
    with gr.Row():
        save = gr.Button("Save", variant="primary", elem_id="character-save")
        export = gr.Button("Export PNG card", elem_id="character-export")
        delete = gr.Button("Delete", variant="stop", elem_id="character-delete")
    status = gr.Markdown("", elem_id="character-status")
    fields = [name, greeting, context, examples, picture]

    def on_pick(chosen: str | None) -> list[Any]:
        if not chosen:
            return ["", "", "", "", None, ""]
        try:
            character = app.characters.load(chosen)
        except WorkbenchError as exc:
            return [chosen, "", "", "", None, f"**Could not read {chosen}:** {exc}"]
        picture_path = str(character.picture) if character.picture else None
        return [character.name, character.greeting, character.context, character.example_dialogue, picture_path, ""]

    def on_save(chosen: str | None, new_name: str, greet: str, ctx: str, example: str,
                picture_path: str | None) -> list[Any]:
        character = _edited(app, chosen, new_name.strip(), greet, ctx, example)
        try:
            app.characters.save(character, _new_picture(app, character.name, picture_path))
        except (WorkbenchError, OSError) as exc:
            return [gr.update(), f"**Could not save:** {exc}"]
        return [_choices(app, character.name), f"Saved **{character.name}**."]

    def on_import(path: str | None) -> list[Any]:
        if not path:
            return [gr.update(), ""]
        try:
            character = app.characters.import_file(Path(path).name, Path(path).read_bytes())
        except (WorkbenchError, OSError) as exc:
            return [gr.update(), f"**Could not import {Path(path).name}:** {exc}"]
        return [_choices(app, character.name), f"Imported **{character.name}**."]

    def on_export(chosen: str | None) -> list[Any]:
        if not chosen:
            return [None, "Pick a character first."]
        try:
            data = app.characters.export_png(chosen)
        except WorkbenchError as exc:
            return [None, f"**Could not export:** {exc}"]
        folder = Path(tempfile.mkdtemp(prefix="card-"))
        target = folder / f"{chosen}.png"
        target.write_bytes(data)
        return [str(target), f"Exported **{chosen}** as a PNG card."]

    def on_delete(chosen: str | None) -> list[Any]:
        if not chosen:
            return [gr.update(), "Pick a character first."]
        try:
            app.characters.delete(chosen)
        except WorkbenchError as exc:
            return [gr.update(), f"**Could not delete:** {exc}"]
        names = app.characters.list()
        return [gr.update(choices=names, value=names[0] if names else None), f"Deleted **{chosen}** and its picture."]

    picker.change(on_pick, picker, [*fields, status])
    refresh.click(lambda c: _choices(app, c), picker, picker)
    save.click(on_save, [picker, *fields], [picker, status], api_name="character_save")
    upload.upload(on_import, upload, [picker, status], api_name="character_import")
    export.click(on_export, picker, [download, status], api_name="character_export")
    delete.click(on_delete, picker, [picker, status], api_name="character_delete")


def _choices(app: App, value: str | None) -> Any:
    names = app.characters.list()
    return gr.update(choices=names, value=value if value in names else (names[0] if names else None))


def _edited(app: App, chosen: str | None, new_name: str, greeting: str, context: str, examples: str) -> Character:
    """The character as edited; a card's extra fields are kept when it is saved under its name."""
    base = Character(name=new_name or (chosen or ""))
    if chosen:
        try:
            base = app.characters.load(chosen)
        except WorkbenchError:
            pass
    base.name = new_name or (chosen or "")
    base.greeting, base.context, base.example_dialogue = greeting, context, examples
    return base


def _new_picture(app: App, name: str, picture_path: str | None) -> bytes | None:
    """Bytes of a newly uploaded picture, or None when the picture is the stored one (kept as is)."""
    if not picture_path:
        return None
    path = Path(picture_path)
    try:
        current = app.characters.picture_path(name)
    except WorkbenchError:
        current = None
    if current is not None and current.resolve() == path.resolve():
        return None
    return path.read_bytes()
