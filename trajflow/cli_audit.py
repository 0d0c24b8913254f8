"""`trajflow audit URL`: verify a corpus and report every defect (wired into trajflow.cli).

Exit status: 0 clean, 1 problems found, 2 the corpus cannot be read at all or bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from trajflow.args import (
    INT_BOUNDS,
    CommandParser,
    bounded_int,
    finite_float,
    harden_parser,
    json_object_arg,
    one_line,
)

DESCRIPTION = """\
Verify a corpus against its dataset card, manifest and commit records, and report every defect
with its kind, the shard and a one-line detail: missing/changed/truncated shards (size, sha256),
duplicate shard ids, sample keys and seeds, index gaps, orphan objects, commit records missing from
the manifest, unsafe tar members; with --deep every sample is decoded and checked against the card;
with --replay N, N random trajectories are re-solved with the recorded teacher and compared.
"""

EPILOG = """\
exit status: 0 clean, 1 problems found, 2 the corpus cannot be read at all (or bad usage)

examples:
  trajflow audit s3://bucket/corpora/latent10
  trajflow audit ./demo_out/corpus --deep --replay 8 --html audit.html
  trajflow audit s3://bucket/big --deep --sample-fraction 0.05 --json > audit.json
"""


def _fraction(text: str) -> float:
    try:
        value = finite_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a finite number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def configure_audit_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("url", metavar="URL", help="corpus root: s3://bucket/prefix, gs://..., /local/dir, memory://...")
    p.add_argument("--deep", action="store_true", help="decode every sample and check it against the card "
                   "(shape, dtype, sigmas, finite values, metadata); gathers trajectory statistics")
    p.add_argument("--replay", type=bounded_int(*INT_BOUNDS["replay"]), default=0, metavar="N",
                   help="re-solve N random trajectories with the recorded teacher and compare with the stored states")
    p.add_argument("--json", action="store_true", help="print the report as JSON (keys: ok, num_shards, num_samples, "
                   "problems [{kind, shard, detail}], stats); no progress bar")
    p.add_argument("--html", metavar="FILE", help="also write an HTML report with the plots embedded")
    p.add_argument("--sample-fraction", type=_fraction, default=1.0, metavar="F",
                   help="with --deep, decode only this fraction of the samples (0 < F <= 1, default 1); hashes and "
                   "tar members are still checked for every shard")
    p.add_argument("--storage-options", type=json_object_arg, default=None, metavar="JSON",
                   help="fsspec storage options as JSON (default: the standard AWS environment for s3://)")
    p.add_argument("--workers", type=bounded_int(*INT_BOUNDS["workers"]), default=8, metavar="N",
                   help="shards checked in parallel, and so at most N shards open at once (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing replayed and sampled samples (default 0)")
    p.add_argument("--replay-teacher", metavar="SPEC", help="replay with this local teacher SPEC (e.g. "
                   "flownet:/local/net.safetensors) instead of the card's; its fingerprint must match the card")
    p.add_argument("--replay-device", metavar="DEVICE", help="torch device for replay (default cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_audit)
    return p


def add_audit_parser(sub) -> argparse.ArgumentParser:
    """Add the `audit` subcommand to an argparse subparsers object; its handler returns the exit status."""
    p = sub.add_parser("audit", help="verify a corpus: every defect, with its kind, shard and detail",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=DESCRIPTION, epilog=EPILOG)
    return configure_audit_parser(p)


def cmd_audit(args: argparse.Namespace) -> int:
    from storage_schemas.audit import audit_corpus, format_text, write_html

    try:
        report = audit_corpus(
            args.url,
            deep=args.deep,
            replay=args.replay,
            sample_fraction=args.sample_fraction,
            storage_options=args.storage_options,
            workers=args.workers,
            progress=not (args.no_progress or args.json),
            seed=args.seed,
            replay_teacher=args.replay_teacher,
            replay_device=args.replay_device,
        )
    except ValueError as e:
        print(f"trajflow audit: error: {one_line(e)}", file=sys.stderr)
        return 2
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:  # member names from a corpus may not fit the terminal's encoding
        reconfigure(errors="backslashreplace")
    if args.json:
        sys.stdout.write(report.to_json())
    else:
        sys.stdout.write(format_text(report))
    sys.stdout.flush()
    if args.html:
        try:
            write_html(report, args.html)
        except OSError as e:
            print(f"trajflow audit: error: cannot write {args.html}: {e}", file=sys.stderr)
            return 2
        if not args.json:
            print(f"HTML report written to {args.html}", file=sys.stderr)
    return report.exit_status


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m trajflow.cli_audit URL ...`` (same flags as `trajflow audit`)."""
    parser = CommandParser(prog="trajflow audit", formatter_class=argparse.RawDescriptionHelpFormatter,
                           description=DESCRIPTION, epilog=EPILOG)
    harden_parser(configure_audit_parser(parser))  # the same checked numbers as `trajflow audit`
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
