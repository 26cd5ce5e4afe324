"""`bts data`: build (or check) the embedded corpus and optionally train the tokenizer."""

from __future__ import annotations

import json

from bts.data.corpus import DOMAINS, ensure_built, manifest
from bts.io import CommandParser


def main(argv: list[str] | None = None) -> int:
    ap = CommandParser(prog="bts data", description=__doc__)
    ap.add_argument("--cache-dir", help="cache directory (default: $BTS_CACHE_DIR or ./.cache/bts)")
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), help="domains to build (default: all four)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cache is valid")
    ap.add_argument("--tokenizer", metavar="DIR", help="also train the BPE tokenizer into DIR")
    ap.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary size (default 2048)")
    ap.add_argument("--show", action="store_true", help="print the manifest summary")
    args = ap.parse_args(argv)
    if args.tokenizer:  # checked before the corpus is built and the tokenizer trained
        from bts.config_check import writable_target

        writable_target(args.tokenizer, "--tokenizer")
    data_dir = ensure_built(args.cache_dir, domains=args.domains, force=args.force)
    print(f"corpus ready: {data_dir}")
    if args.tokenizer:
        from bts.data.tokenizer import train_tokenizer

        train_tokenizer(args.tokenizer, vocab_size=args.vocab_size, cache_dir=args.cache_dir)
        print(f"tokenizer written: {args.tokenizer}")
    if args.show:
        print(json.dumps(manifest(args.cache_dir), indent=2)[:4000])
    return 0
