"""`k2 serve`'s command line: arguments only, so `k2 --help` does not import torch (the server
and the engine load in `run`)."""

from __future__ import annotations

from typing import Any

API_KEY_ENV = "K2_SERVE_API_KEY"  # the server's key, kept out of `ps` listings


def serve_command(*, options: Any = None) -> Any:
    """Serve a k2 checkpoint over an OpenAI-compatible HTTP API (k2 serve URI)."""
    from k2_core.command import Command

    def add(p: Any) -> None:
        p.add_argument("uri", help="saved model or training checkpoint (any fsspec URI)")
        p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
        p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
        p.add_argument(
            "--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's)"
        )
        p.add_argument("--model-name", default=None, help="name in /v1/models")
        p.add_argument("--max-batch-size", type=int, default=64, help="requests decoded together")
        p.add_argument("--max-tokens", type=int, default=512, help="default completion limit")
        p.add_argument(
            "--max-body-mb",
            type=float,
            default=16.0,
            help="refuse request bodies over this many MiB with 413 (default 16)",
        )
        p.add_argument(
            "--api-key",
            default=None,
            help=f"require this bearer key on every route but /health (default: "
            f"${API_KEY_ENV}, else none)",
        )
        p.add_argument(
            "--max-queue",
            type=int,
            default=256,
            help="requests in flight at most; more get 429 + Retry-After (default 256)",
        )
        p.add_argument(
            "--weights-root",
            action="append",
            default=[],
            metavar="DIR",
            help="allow POST /update_weights_from_disk to load checkpoints under DIR "
            "(repeatable; needs the API key); default: weight updates refused",
        )
        p.add_argument(
            "--push-port",
            type=int,
            default=None,
            metavar="PORT",
            help="also receive new weights by the sharded bucketed push "
            "(k2_core.weight_push) on PORT, authenticated by the API key "
            "(default: no push listener)",
        )
        p.add_argument(
            "--push-host",
            default="127.0.0.1",
            help="address of the push listener (default loopback)",
        )

    def run(args: Any) -> int:
        import os

        from k2_core.errors import ConfigError
        from pydantic import ValidationError

        from .server import ServeOptions, serve

        try:
            opts = ServeOptions(
                uri=args.uri,
                host=args.host,
                port=args.port,
                tokenizer=args.tokenizer,
                model_name=args.model_name,
                max_batch_size=args.max_batch_size,
                max_tokens=args.max_tokens,
                max_body_mb=args.max_body_mb,
                max_queue=args.max_queue,
                weights_roots=tuple(args.weights_root),
                push_port=args.push_port,
                push_host=args.push_host,
                api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
            )
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(f"serve: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        serve(opts)
        return 0

    return Command(serve_command.__doc__ or "", add, run)
