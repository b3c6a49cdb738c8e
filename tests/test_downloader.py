"""The downloader against a local hub-like server (tests/hub_server.py), never the network.

The real huggingface_hub client talks to the server: in this process through the
`endpoint` argument (HF_ENDPOINT is read once at import, and other tests import the
library first), and in tests/test_download_cli.py through HF_ENDPOINT in a subprocess.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from modules.core.errors import InvalidRequestError, NotFoundError, UnsafePathError
from modules.hub import downloader, memory_fit
from modules.hub.files import classify
from modules.hub.links import HubLink, parse_link
from tests.hub_server import HubServer, kit_repo_files
from tests.kit import TinyKit

REPO = "kit/tiny-llama"
BIG = 2**40


@pytest.fixture(scope="module")
def kit_files(tiny_kit: TinyKit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The kit's repo files plus an F16 and a Q4_0 quant of the same weights (three GGUF sizes)."""
    from gguf import GGUFReader

    files = kit_repo_files(tiny_kit.root)
    out = tmp_path_factory.mktemp("quants")
    from tests.kit.gguf_export import LlamaShape, write_llama_gguf
    from tests.kit.tokenizer import train_tokenizer, vocab_info

    reader = GGUFReader(tiny_kit.gguf_f32)
    tensors = {t.name: t.data.reshape(-1).copy() for t in reader.tensors}
    vocab = vocab_info(train_tokenizer())
    shape = LlamaShape(vocab_size=len(vocab.tokens), hidden=64, layers=2, heads=4, kv_heads=2, ffn=128)
    for quant, name in (("f16", "tiny-llama-F16.gguf"), ("q4_0", "tiny-llama-Q4_0.gguf")):
        path = write_llama_gguf(out / name, shape, vocab, quant, lambda g, h, s: tensors[g].reshape(s),
                                name="tiny-llama")
        files[name] = path.read_bytes()
    return files


@pytest.fixture(scope="module")
def hub(kit_files: dict[str, bytes]) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(REPO, kit_files)
        server.add_repo(REPO, {"tiny-llama-Q8_0.gguf": kit_files["tiny-llama-Q8_0.gguf"],
                               "README.md": b"dev branch\n"}, branch="dev")
        st = kit_files["model.safetensors"]
        server.add_repo("kit/sharded", {
            "model-00001-of-00002.safetensors": st[: len(st) // 2], "model-00002-of-00002.safetensors": st[len(st) // 2:],
            "model.safetensors.index.json": b"{}", "config.json": kit_files["config.json"],
            "tokenizer.json": kit_files["tokenizer.json"], "pytorch_model.bin": b"pickle", "README.md": b"hi"})
        server.add_repo("kit/pickles-only", {"config.json": kit_files["config.json"], "pytorch_model.bin": b"pickle"})
        server.add_repo("kit/evil", {"../evil.gguf": b"GGUF evil", "sub/../../escape.json": b"{}",
                                     "good-Q8_0.gguf": kit_files["tiny-llama-Q8_0.gguf"]})
        yield server


def _list(hub: HubServer, text: str, branch: str | None = None, ram: int = BIG) -> downloader.RepoListing:
    return downloader.list_repo(text, branch, endpoint=hub.url, n_ctx=2048, free=memory_fit.FreeMemory(ram=ram))


# --- links ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("kit/tiny-llama", HubLink("kit/tiny-llama")),
    ("  https://huggingface.co/kit/tiny-llama  ", HubLink("kit/tiny-llama")),
    ("huggingface.co/kit/tiny-llama", HubLink("kit/tiny-llama")),
    ("https://hf.co/kit/tiny-llama/tree/dev", HubLink("kit/tiny-llama", "dev")),
    ("https://huggingface.co/kit/tiny-llama/blob/main/a-Q4_K_M.gguf", HubLink("kit/tiny-llama", "main", "a-Q4_K_M.gguf")),
    ("https://huggingface.co/kit/tiny-llama/resolve/main/q/a.gguf?download=true",
     HubLink("kit/tiny-llama", "main", "q/a.gguf")),
    ("https://huggingface.co/kit/tiny-llama/tree/refs/pr/3", HubLink("kit/tiny-llama", "refs/pr/3")),
])
def test_link_forms_parse(text: str, expected: HubLink) -> None:
    assert parse_link(text) == expected


@pytest.mark.parametrize("text", ["", "justaname", "https://example.com/org/repo", "org/../repo",
                                  "https://huggingface.co/datasets/org/set", "org/repo/blob/main",
                                  "org/repo/commits/main", "ftp://huggingface.co/org/repo"])
def test_bad_links_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_link(text)
    assert str(err.value)


def test_branch_argument_wins_and_names_the_folder() -> None:
    link = parse_link("https://huggingface.co/org/repo/tree/main", branch="dev")
    assert link.revision == "dev" and link.folder_name == "org_repo_dev"
    assert parse_link("org/repo").folder_name == "org_repo"


def test_classify_names_kinds_quants_and_bits() -> None:
    assert (classify("m.Q4_K_M.gguf", 1).quant, classify("m.Q4_K_M.gguf", 1).bits) == ("Q4_K_M", 4.89)
    assert classify("x/Model-IQ4_XS-00001-of-00002.gguf", 1).quant == "IQ4_XS"
    assert classify("mmproj-f16.gguf", 1).kind == "gguf-mmproj"
    kinds = {p: classify(p, 1).kind for p in ("model-00001-of-00002.safetensors", "tokenizer.model",
                                               "config.json", "pytorch_model.bin", "README.md",
                                               "model.safetensors.index.json", "flax_model.msgpack")}
    assert kinds == {"model-00001-of-00002.safetensors": "safetensors", "tokenizer.model": "tokenizer",
                     "config.json": "config", "pytorch_model.bin": "pickle", "README.md": "other",
                     "model.safetensors.index.json": "config", "flax_model.msgpack": "other-weights"}
    assert classify("../x.gguf", 1).unsafe and classify("a/../../x", 1).unsafe


# --- listing and link forms against the server ----------------------------------------------------
def test_each_link_form_resolves_to_the_right_files(hub: HubServer) -> None:
    listing = _list(hub, REPO)
    assert {f.path for f in listing.files} >= {"model.safetensors", "tiny-llama-F16.gguf", "config.json"}
    folder = listing.plan()
    assert folder.folder == "kit_tiny-llama"
    assert [f.path for f in folder.files][-1] == "config.json"  # config last: the folder is a model once complete
    assert {f.kind for f in folder.files} == {"safetensors", "tokenizer", "config"}

    dev = _list(hub, "https://huggingface.co/kit/tiny-llama/tree/dev")
    assert dev.link.revision == "dev" and {f.path for f in dev.files} == {"tiny-llama-Q8_0.gguf", "README.md"}
    assert dev.plan().files[0].path == "tiny-llama-Q8_0.gguf" and dev.plan().folder is None

    for form in ("blob", "resolve"):
        one = _list(hub, f"https://huggingface.co/kit/tiny-llama/{form}/main/tiny-llama-Q4_0.gguf")
        plan = one.plan()
        assert [f.path for f in plan.files] == ["tiny-llama-Q4_0.gguf"] and plan.folder is None
    assert _list(hub, REPO, branch="dev").commit == dev.commit


def test_missing_repo_and_branch_are_not_found(hub: HubServer) -> None:
    with pytest.raises(NotFoundError, match="kit/nope not found"):
        _list(hub, "kit/nope")
    with pytest.raises(NotFoundError, match="no branch"):
        _list(hub, REPO, branch="no-such-branch")


def test_chooser_recommends_the_largest_quant_that_fits(hub: HubServer) -> None:
    listing = _list(hub, REPO)
    by_quant = {o.choice.quant: o for o in listing.options}
    assert list(by_quant) == ["Q4_0", "Q8_0", "F16", "F32"]  # smallest first
    assert listing.recommended == "tiny-llama-f32.gguf"
    f16, f32 = by_quant["F16"].estimate.total, by_quant["F32"].estimate.total
    assert by_quant["F32"].estimate.kv_cache == 2 * 2 * 2048 * 2 * 16 * 2  # layers, ctx, kv heads, head_dim, f16
    between = int((f16 + f32) / 2 / memory_fit.SWAP_MARGIN)
    assert _list(hub, REPO, ram=between).recommended == "tiny-llama-F16.gguf"
    tight = _list(hub, REPO, ram=1)
    assert tight.recommended == "tiny-llama-Q4_0.gguf" and not any(o.fits for o in tight.options)


# --- downloads ------------------------------------------------------------------------------
def test_download_single_gguf_and_folder_model(hub: HubServer, kit_files: dict[str, bytes], tmp_path: Path) -> None:
    listing = _list(hub, REPO)
    seen: list[int] = []
    [gguf] = downloader.download(listing, listing.plan(gguf="tiny-llama-Q8_0.gguf"), tmp_path, endpoint=hub.url,
                                 progress=lambda f, done, total: seen.append(done))
    assert gguf == tmp_path / "tiny-llama-Q8_0.gguf" and gguf.read_bytes() == kit_files["tiny-llama-Q8_0.gguf"]
    assert seen and seen[-1] == len(kit_files["tiny-llama-Q8_0.gguf"])
    paths = downloader.download(listing, listing.plan(), tmp_path, endpoint=hub.url)
    folder = tmp_path / "kit_tiny-llama"
    assert {p.name for p in paths} == {p.name for p in folder.iterdir()}
    assert (folder / "model.safetensors").read_bytes() == kit_files["model.safetensors"]
    assert not list(tmp_path.rglob("*.partial"))


def test_interrupted_download_resumes_byte_identical(hub: HubServer, kit_files: dict[str, bytes], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    # The client writes whole chunks (10 MB by default); small chunks let a 1.5 MB file resume mid-way.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    name = "tiny-llama-f32.gguf"
    listing = _list(hub, REPO)
    cancel = threading.Event()

    def stop_half_way(_: str, done: int, total: int) -> None:
        if done > total // 2:
            cancel.set()
    with pytest.raises(downloader.DownloadCancelled):
        downloader.download(listing, listing.plan(gguf=name), tmp_path, endpoint=hub.url,
                            progress=stop_half_way, cancel=cancel)
    partial = tmp_path / f"{name}.partial"
    kept = partial.stat().st_size
    assert 0 < kept < len(kit_files[name])
    assert not (tmp_path / name).exists()

    hub.requests.clear()
    hub.cut_once[name] = 300_000  # and the resumed transfer is cut once more: the client retries with Range
    [path] = downloader.download(listing, listing.plan(gguf=name), tmp_path, endpoint=hub.url)
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(kit_files[name]).digest()
    ranges = [r for m, p, r in hub.requests if p.endswith(name)]
    assert len(ranges) == 2 and ranges[0] == f"bytes={kept}-"
    assert ranges[1] is not None and int(ranges[1][6:-1]) > kept
    assert not partial.exists()


def test_corrupted_file_fails_its_checksum_and_is_not_kept(hub: HubServer, tmp_path: Path) -> None:
    listing = _list(hub, REPO)
    hub.corrupt.add("tiny-llama-Q4_0.gguf")
    try:
        with pytest.raises(downloader.ChecksumError, match="tiny-llama-Q4_0.gguf failed its check.*sha256"):
            downloader.download(listing, listing.plan(gguf="tiny-llama-Q4_0.gguf"), tmp_path, endpoint=hub.url)
    finally:
        hub.corrupt.clear()
    assert list(tmp_path.iterdir()) == []


def test_traversal_names_from_the_hub_are_refused(hub: HubServer, tmp_path: Path) -> None:
    listing = _list(hub, "kit/evil")
    refused = {f.path for f in listing.files if f.unsafe}
    assert refused == {"../evil.gguf", "sub/../../escape.json"}
    plan = listing.plan()
    assert [f.path for f in plan.files] == ["good-Q8_0.gguf"]
    assert any(path == "../evil.gguf" and reason.startswith("refused") for path, reason in plan.skipped)
    with pytest.raises(UnsafePathError):
        listing.plan(pattern="../evil.gguf")
    forged = downloader.DownloadPlan(files=tuple(f for f in listing.files if f.unsafe), folder="kit_evil")
    models = tmp_path / "models"
    with pytest.raises(UnsafePathError):
        downloader.download(listing, forged, models, endpoint=hub.url)
    assert not (tmp_path / "evil.gguf").exists() and not (tmp_path / "escape.json").exists()


def test_pickles_skipped_when_safetensors_exist_else_need_confirmation(hub: HubServer, tmp_path: Path) -> None:
    plan = _list(hub, "kit/sharded").plan()
    assert [f.path for f in plan.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                            "tokenizer.json", "model.safetensors.index.json", "config.json"]
    assert ("pytorch_model.bin", "pickled weights skipped: safetensors are available") in plan.skipped

    only = _list(hub, "kit/pickles-only")
    waiting = only.plan()
    assert waiting.needs_confirm == ("pytorch_model.bin",)
    with pytest.raises(InvalidRequestError, match="confirm"):
        downloader.download(only, waiting, tmp_path, endpoint=hub.url)
    paths = downloader.download(only, only.plan(allow_pickles=True), tmp_path, endpoint=hub.url)
    assert {p.name for p in paths} == {"config.json", "pytorch_model.bin"}
