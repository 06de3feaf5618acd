"""``lookalike serve``: the HTTP service over one index (:mod:`lookalike.serve`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lookalike.cli.ui import Ui, print_warning


def add_serve_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve",
        parents=[common],
        help="serve search and recognition over HTTP (FastAPI; docs at /docs)",
    )
    p.add_argument("--index", type=Path, required=True, help="index directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--auth",
        choices=("writes", "all"),
        default="writes",
        help="what needs the API key: writes (default) or every request",
    )
    p.add_argument(
        "--api-key-file",
        type=Path,
        help="file whose first line is the API key (default: $LOOKALIKE_API_KEY; never "
        "give a key on the command line, where ps shows it)",
    )
    p.add_argument("--no-auth", action="store_true", help="serve writes without a key")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload (20)")
    p.add_argument(
        "--max-active", type=int, metavar="N", help="requests at work at once (2 per core)"
    )
    p.add_argument(
        "--max-queued", type=int, default=16, metavar="N", help="requests waiting; past: 503 (16)"
    )
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN", help="allow ORIGIN")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.serve import ServeConf, load_api_key, serve

    key = load_api_key(args.api_key_file)
    conf = ServeConf(
        host=args.host,
        port=args.port,
        auth=args.auth,
        api_key=key,
        no_auth=args.no_auth,
        max_upload_mb=args.max_upload_mb,
        **({} if args.max_active is None else {"max_active": args.max_active}),
        max_queued=args.max_queued,
        cors=tuple(args.cors),
    )
    if key is None and not args.no_auth:
        print_warning("no API key configured: searches are served, writes are refused")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print_warning(f"binding to {args.host}: the service is reachable from other machines")
    serve(args.index, conf)
    return 0
