"""Download a model from the Hugging Face Hub into models/ (a thin CLI over modules/hub/downloader.py).

    python download-model.py TheBloke/Llama-2-7B-GGUF --file '*Q4_K_M*'
    python download-model.py https://huggingface.co/org/repo/blob/main/model.Q5_K_M.gguf
    python download-model.py org/repo --list          # files, kinds, sizes, estimates
    python download-model.py org/repo --output /data/models   # elsewhere (alias of --models-dir)

Honours HF_TOKEN (gated and private repos) and HF_ENDPOINT (mirrors). Run it again after
an interruption: it resumes. Exit status 0 on success, 1 on any error (message on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modules.core.errors import WorkbenchError
from modules.hub import downloader, memory_fit

ROOT = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Download a model from the Hugging Face Hub into models/.")
    p.add_argument("link", help="org/repo or a huggingface.co link (/tree/BRANCH, /blob/BRANCH/FILE, /resolve/...)")
    p.add_argument("--branch", help="branch or revision (overrides one in the link)")
    p.add_argument("--file", help="file name or glob to download, e.g. '*Q4_K_M*.gguf'")
    p.add_argument("--models-dir", "--output", dest="models_dir", type=Path, default=ROOT / "models",
                   help="destination folder (default: models/); --output is the same (text-generation-webui's name)")
    p.add_argument("--list", action="store_true", help="only list the files and the GGUF recommendation")
    p.add_argument("--ctx-size", type=int, default=4096, help="context the memory estimates are for")
    p.add_argument("--allow-pickles", action="store_true",
                   help="download pickled .bin/.pt weights when the repo has no safetensors (they can run code)")
    p.add_argument("--token", help="Hugging Face token (default: HF_TOKEN)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        listing = downloader.list_repo(args.link, args.branch, token=args.token, n_ctx=args.ctx_size)
        print(describe_listing(listing))
        if args.list:
            return 0
        gguf = None
        if not args.file and not listing.link.path and listing.options and not _has_safetensors(listing):
            gguf = listing.recommended
            print(f"Choosing the recommended quant: {gguf} (use --file to pick another)")
        plan = listing.plan(gguf=gguf, pattern=args.file, allow_pickles=args.allow_pickles)
        for path, reason in plan.skipped:
            print(f"  skip {path}: {reason}")
        from tqdm import tqdm

        paths = downloader.download(listing, plan, args.models_dir, token=args.token, tqdm_class=tqdm)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    where = paths[0].parent if plan.folder else paths[0]
    print(f"Done: {len(paths)} file(s), {memory_fit.human_bytes(plan.size)}, verified, in {where}")
    return 0


def describe_listing(listing: downloader.RepoListing) -> str:
    """The file table the CLI prints: path, size, kind, and the GGUF estimates."""
    lines = [f"{listing.link.repo_id} at {listing.commit[:10]} ({listing.link.revision or 'default branch'}):"]
    for f in listing.files:
        lines.append(f"  {f.path:<50} {memory_fit.human_bytes(f.size):>10}  {f.label}")
    for option in listing.options:
        mark = "*" if option.choice.name == listing.recommended else " "
        fit = "fits" if option.fits else "does not fit"
        lines.append(f" {mark} {option.choice.name}: {option.estimate.describe()} - {fit}")
    if listing.folder_estimate:
        lines.append(f"  safetensors model: {listing.folder_estimate.describe()}")
    return "\n".join(lines)


def _has_safetensors(listing: downloader.RepoListing) -> bool:
    return any(f.kind == "safetensors" for f in listing.files)


if __name__ == "__main__":
    sys.exit(main())
