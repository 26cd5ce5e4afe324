"""`bts data`: build (or check) the embedded corpus and optionally train the tokenizer; compare the corpus with the
reference digests (``--check-digests``) or write this Python version's entry of them (``--write-digests``, after an
intended change of a builder: ``bts.data.digests``)."""

from __future__ import annotations

import json

from bts.core.io import CommandParser, atomic_write_json
from bts.data import digests
from bts.data.corpus import ensure_built, manifest
from bts.data.domains import DOMAINS


def main(argv: list[str] | None = None) -> int:
    ap = CommandParser(prog="bts data", description=__doc__)
    ap.add_argument("--cache-dir", help="cache directory (default: $BTS_CACHE_DIR or ./.cache/bts)")
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), help="domains to build (default: all four)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cache is valid")
    ap.add_argument("--tokenizer", metavar="DIR", help="also train the BPE tokenizer into DIR")
    ap.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary size (default 2048)")
    ap.add_argument("--show", action="store_true", help="print the manifest summary")
    ap.add_argument("--check-digests", action="store_true",
                    help="compare the built corpus with the reference digests (exit 1 when they differ)")
    ap.add_argument("--write-digests", action="store_true",
                    help=f"write this Python minor version's entry of {digests.REFERENCE_FILE.name} from the built "
                         "corpus (the other versions' entries are kept)")
    args = ap.parse_args(argv)
    if args.tokenizer:  # checked before the corpus is built and the tokenizer trained
        from bts.core.io import writable_target

        writable_target(args.tokenizer, "--tokenizer")
    data_dir = ensure_built(args.cache_dir, domains=args.domains, force=args.force)
    print(f"corpus ready: {data_dir}")
    if args.tokenizer:
        from bts.data.tokenizer import train_tokenizer

        train_tokenizer(args.tokenizer, vocab_size=args.vocab_size, cache_dir=args.cache_dir)
        print(f"tokenizer written: {args.tokenizer}")
    if args.show:
        print(json.dumps(manifest(args.cache_dir), indent=2)[:4000])
    if args.write_digests:
        atomic_write_json(digests.REFERENCE_FILE,
                          digests.with_entry(digests.make_reference(args.cache_dir), digests.load_references()))
        digests._load_file.cache_clear()
        print(f"wrote the Python {digests.python_minor()} entry of {digests.REFERENCE_FILE}")
    elif args.check_digests:
        result = digests.compare_to_reference(args.cache_dir)
        if result is None:
            print("nothing to compare (no reference file, or no corpus built)")
            return 0
        line = digests.warning_line(result)
        print(line or f"data: {', '.join(result['checked'])} match the Python {result['reference_python']} "
                      "reference digests")
        return 1 if line else 0
    return 0
