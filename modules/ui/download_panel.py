"""Model tab panel "Download a model": paste a link, see the files and what fits, download.

Wiring only: listing, planning and downloading live in modules/hub/downloader.py and the
estimates in modules/hub/memory_fit.py. A download runs in its own worker thread (never the
generation queue); the handler only polls it to move gr.Progress (bytes, speed, ETA).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import gradio as gr

from modules.core.errors import WorkbenchError
from modules.engine.app import App
from modules.hub import downloader, memory_fit
from modules.hub.files import plan_download

log = logging.getLogger(__name__)
FOLDER_CHOICE = "Folder model: safetensors shards + tokenizer + config"
COLUMNS = ["file", "size", "what it is", "memory estimate", "fits"]


def create_ui(app: App) -> Any:
    """Build the panel; returns the Download event so the Model tab can refresh its list after it."""
    with gr.Row():
        link = gr.Textbox(label="Hugging Face link or org/repo", scale=4,
                          placeholder="https://huggingface.co/TheBloke/Llama-2-7B-GGUF")
        branch = gr.Textbox(label="Branch (optional)", scale=1)
        n_ctx = gr.Number(value=app.settings.ctx_size or 4096, precision=0, label="Context for estimates", scale=1)
        list_button = gr.Button("List files", scale=1)
    summary = gr.Markdown()
    table = gr.Dataframe(headers=COLUMNS, interactive=False, wrap=True)
    with gr.Row():
        choice = gr.Dropdown([], label="What to download", scale=4)
        pickles = gr.Checkbox(False, label="Download pickled .bin/.pt weights (they can run code when loaded)",
                              scale=2)
        start = gr.Button("Download", variant="primary", scale=1)
    status = gr.Markdown()
    listing_state = gr.State(None)

    def on_list(text: str, branch_name: str, ctx: float | None) -> list[Any]:
        try:
            listing = downloader.list_repo(text, branch_name or None, n_ctx=int(ctx or 4096),
                                           cache_type=app.settings.cache_type)
        except WorkbenchError as exc:
            return [None, f"**Cannot list that repo:** {exc}", [], gr.update(choices=[], value=None)]
        return [listing, describe(listing), file_rows(listing), gr.update(**choice_update(listing))]

    def on_download(listing: downloader.RepoListing | None, picked: str | None, allow: bool,
                    progress: gr.Progress = gr.Progress()) -> str:  # noqa: B008 - gradio's injection idiom
        if listing is None:
            return "List the files first."
        try:
            if picked == FOLDER_CHOICE:  # the whole folder model, whatever file the link named
                plan = plan_download(list(listing.files), listing.link.folder_name, allow_pickles=allow)
            else:
                plan = listing.plan(gguf=picked or None, allow_pickles=allow)
            paths = _run_in_worker(listing, plan, app, progress)
        except WorkbenchError as exc:
            return f"**Download failed:** {exc}"
        where = plan.folder or paths[0].name
        return f"Downloaded and verified {len(paths)} file(s) into `{where}`. Pick it in the Model list above."

    list_button.click(on_list, [link, branch, n_ctx], [listing_state, summary, table, choice])
    return start.click(on_download, [listing_state, choice, pickles], status)


def _run_in_worker(listing: downloader.RepoListing, plan: downloader.DownloadPlan, app: App,
                   progress: gr.Progress) -> list[Any]:
    """Download on a worker thread; report bytes, speed and ETA to gr.Progress until it ends."""
    state: dict[str, Any] = {"file": "", "done": 0, "total": plan.size or 1}
    outcome: dict[str, Any] = {}

    def report(path: str, done: int, total: int) -> None:
        state.update(file=path, done=done, total=total or 1)

    def work() -> None:
        try:
            outcome["paths"] = downloader.download(listing, plan, app.models.models_dir, progress=report)
        except BaseException as exc:  # noqa: BLE001 - handed back to the UI thread below
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="model-download", daemon=True)
    started = time.monotonic()
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
        elapsed = max(time.monotonic() - started, 1e-3)
        speed = state["done"] / elapsed
        eta = (state["total"] - state["done"]) / speed if speed > 0 else 0
        progress(state["done"] / state["total"],
                 desc=(f"{state['file']}: {memory_fit.human_bytes(state['done'])} / "
                       f"{memory_fit.human_bytes(state['total'])}, {memory_fit.human_bytes(speed)}/s, ETA {eta:.0f} s"))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["paths"]


def describe(listing: downloader.RepoListing) -> str:
    """The summary above the table: repo, commit, the recommendation and the budget it was made for."""
    free = memory_fit.free_memory()
    lines = [f"**{listing.link.repo_id}** at `{listing.commit[:10]}`: {len(listing.files)} files. "
             f"Free memory: {memory_fit.human_bytes(free.ram)} RAM"
             + (f" + {memory_fit.human_bytes(free.vram)} VRAM" if free.vram else "") + "."]
    if listing.recommended:
        option = next(o for o in listing.options if o.choice.name == listing.recommended)
        verdict = "the largest quant that fits" if option.fits else "nothing fits; this is the smallest"
        lines.append(f"Recommended: **{listing.recommended}** ({verdict}, {option.estimate.describe()}).")
    if listing.folder_estimate:
        lines.append(f"Safetensors model: {listing.folder_estimate.describe()}.")
    return "\n\n".join(lines)


def file_rows(listing: downloader.RepoListing) -> list[list[str]]:
    """One table row per file; GGUF quants carry their estimate and whether they fit."""
    by_first = {o.choice.name: o for o in listing.options}
    rows = []
    for f in listing.files:
        option = by_first.get(f.path)
        est = option.estimate.describe() if option else ""
        fits = ("yes" if option.fits else "no") if option else ""
        rows.append([f.path, memory_fit.human_bytes(f.size), f.label, est, fits])
    return rows


def choice_update(listing: downloader.RepoListing) -> dict[str, Any]:
    """Dropdown choices: each GGUF quant, plus the folder model when the repo has safetensors or pickles."""
    choices = [o.choice.name for o in listing.options]
    if any(f.kind in ("safetensors", "pickle") for f in listing.files):
        choices.append(FOLDER_CHOICE)
    value = listing.link.path if listing.link.path in choices else listing.recommended or (choices[-1] if choices
                                                                                            else None)
    return {"choices": choices, "value": value}


def memory_note(app: App, name: str | None, options: dict[str, Any] | None = None) -> str:
    """The line next to Load: the estimate for the selected model, a swap warning, a GPU-layer hint.

    `options` are the Model tab's current option values (context, cache type, dtype, slots);
    settings fill in what they do not name.
    """
    if not name:
        return ""
    try:
        path = app.models.path_of(name)
    except WorkbenchError:
        return ""
    s = {k: getattr(app.settings, k) for k in ("ctx_size", "cache_type", "dtype", "parallel")}
    s.update({k: v for k, v in (options or {}).items() if k in s and v is not None})
    try:
        estimate = memory_fit.estimate_model(path, n_ctx=int(s["ctx_size"]), cache_type=str(s["cache_type"]),
                                             dtype=str(s["dtype"]), slots=int(s["parallel"]))
    except (TypeError, ValueError):
        return ""
    if estimate is None:
        return ""
    free = memory_fit.free_memory()
    note = f"Memory: {estimate.describe()}."
    warning = memory_fit.swap_warning(estimate, free)
    if warning:
        note += f" **Warning:** {warning}"
    if free.vram and path.suffix == ".gguf":
        note += f" Suggested n_gpu_layers for {memory_fit.human_bytes(free.vram)} free VRAM: " \
                f"{memory_fit.suggest_gpu_layers(estimate, free.vram)}."
    return note
