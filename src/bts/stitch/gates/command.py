"""`bts gates`: the gate analysis of a trained BTS checkpoint (``bts.stitch.gates``) from the command line.

``bts gates --ckpt runs/tiny/bts --tokenizer runs/tiny/tokenizer --out results/tiny [--tensorboard DIR]``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bts.core.io import BTSError, CommandParser
from bts.stitch.gates.analysis import analyze


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="bts gates",
        description="Gate analysis of a trained BTS model (paper §4.3): per-token E2H gate weights on prompts of "
        "each domain and on context-switching prompts; writes <out>/gates.json and <out>/figures/gates_*.png.",
    )
    p.add_argument("--ckpt", "--model", dest="ckpt", required=True,
                   help="trained stitch checkpoint directory (artifact.json kind 'bts', bts.json + stitch.safetensors)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --ckpt, which holds the training tokenizer)")
    p.add_argument("--out", required=True, help="results directory (gates.json, figures/)")
    p.add_argument("--tensorboard", metavar="DIR", help="also write the figures and mean gates to TensorBoard")
    p.add_argument("--n-prompts", type=int, default=8, help="prompts per domain (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="prompt-selection seed (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per domain prompt (default: %(default)s)")
    p.add_argument("--n-switch", type=int, default=4, help="context-switching prompts (default: %(default)s)")
    p.add_argument("--domains", help="comma-separated domains (default: general,code,math,multilingual)")
    p.add_argument("--cache-dir", help="data cache directory (bts.data)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--allow-changed-models", action="store_true",
                   help="use frozen models whose weights differ from the checkpoint manifest")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(argv)
        domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
        result = analyze(args.ckpt, args.tokenizer or args.ckpt, args.out, n_prompts=args.n_prompts, seed=args.seed,
                         cache_dir=args.cache_dir, tb_log_dir=args.tensorboard, max_tokens=args.max_tokens,
                         n_switch=args.n_switch, domains=domains, device=args.device,
                         allow_changed_models=args.allow_changed_models)
    except BTSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(result["markdown"])
    print(f"wrote {Path(args.out) / 'gates.json'} and {len(result['figures'])} figures in "
          f"{Path(args.out) / 'figures'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
