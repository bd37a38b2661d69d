"""Serve text generation over HTTP (Megatron-LM's PUT /api interface).

Example:
    python tools/run_text_generation_server.py --load checkpoints/gpt2_tiny --port 5000
    curl -X PUT localhost:5000/api -H 'Content-Type: application/json' \
        -d '{"prompts": ["In the beginning"], "tokens_to_generate": 16, "top_k": 1}'

One process on a checkpoint of any TP / PP layout (merged in memory); bound to
127.0.0.1 unless --host says otherwise. Requests run one at a time; up to
--max-queued (64) run or wait, and one more answers 503 with Retry-After: 1.
"""
import argparse
import os
import sys

from megatron.cli import command
from megatron.errors import UserError


@command
def main(argv=None):
    """Parse arguments, load the model and serve until interrupted."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--max-prompts", type=int, default=8, help="prompts per request")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="tokens per prompt")
    p.add_argument("--max-tokens-to-generate", type=int, default=512)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-queued", type=int, default=64,
                   help="requests running or waiting for the model; a request beyond this "
                        "answers 503 with a Retry-After header (default 64)")
    p.add_argument("--backlog", type=int, default=1024,
                   help="listen backlog: connections held until accepted (default 1024; "
                        "the kernel caps it at net.core.somaxconn)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("the server runs as one process (it merges any checkpoint layout itself); "
                        "start it without torchrun")
    from megatron.inference.loader import load_inference_model
    from megatron.inference.server import ServerLimits, make_server
    from megatron.initialize import select_device
    im = load_inference_model(args.load, device=select_device(args.device))
    for flag, value in (("--max-queued", args.max_queued), ("--backlog", args.backlog)):
        if value < 1:
            raise UserError(f"{flag}={value} must be at least 1")
    limits = ServerLimits(args.max_prompts, args.max_prompt_tokens,
                          args.max_tokens_to_generate, args.max_body_bytes,
                          max_queued=args.max_queued, backlog=args.backlog)
    server = make_server(im, args.host, args.port, limits)
    host, port = server.server_address[:2]
    print(f"serving {args.load} (iteration {im.iteration}) on http://{host}:{port}/api", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
