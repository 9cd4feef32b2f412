#!/usr/bin/env python3
"""Download DeepSeek-VL2 weights with huggingface_hub into weights/<name>, where the predictor looks first
(and `cog build` bakes them), or into the shared Hugging Face cache with --cache.

    python scripts/download_weights.py deepseek-ai/deepseek-vl2-tiny      # ~7 GB
    python scripts/download_weights.py deepseek-ai/deepseek-vl2-small     # ~33 GB
    python scripts/download_weights.py deepseek-ai/deepseek-vl2           # ~55 GB (the default model)

Then: DEEPSEEK_VL2_WEIGHTS=deepseek-ai/deepseek-vl2-tiny make predict IMAGE=... PROMPT=...
Only the model's files are fetched (config, tokenizer, safetensors). An interrupted download goes on where it
stopped when run again (the files already complete are kept). The hub's settings apply: HF_ENDPOINT (a
mirror), HF_TOKEN (a gated or private repo), HF_HOME / HF_HUB_CACHE (where --cache goes),
HF_XET_HIGH_PERFORMANCE=1 (faster Xet transfers), HF_HUB_DISABLE_PROGRESS_BARS=1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepseek_vl2.weights import KNOWN_MODELS, WEIGHTS_DIR, WeightsError, download_weights  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo_id", nargs="?", default="deepseek-ai/deepseek-vl2-tiny",
                        help=f"Hugging Face repo id (one of {', '.join(KNOWN_MODELS)})")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--dest", type=Path, default=None, help="target directory (default: weights/<name>)")
    where.add_argument("--cache", action="store_true",
                       help="into the shared Hugging Face cache (HF_HUB_CACHE) instead of a directory")
    parser.add_argument("--revision", default=None, help="a branch, tag or commit of the repo (default: main)")
    args = parser.parse_args(argv)
    if args.repo_id not in KNOWN_MODELS:
        print(f"note: {args.repo_id} is not one of the released DeepSeek-VL2 models; trying anyway", file=sys.stderr)
    dest = None if args.cache else args.dest or WEIGHTS_DIR / args.repo_id.split("/")[-1]
    try:
        path = download_weights(args.repo_id, dest, revision=args.revision,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
