"""Command line: ``routereplay serve --model DIR [...]`` (OpenAI-compatible rollout server) and
``routereplay generate --model DIR PROMPT...`` (one offline batch, routing summarised or stored).

``routereplay demo ...`` and ``routereplay inspect ...`` hand their arguments to
``routereplay.demo.main`` and ``routereplay.inspect_store.main``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from routereplay.server.options import ServerOptions

# subcommand -> (module whose main(argv) runs it, help)
_DELEGATED = {
    "demo": ("routereplay.demo", "the whole R3 loop on a small random MoE, with plots"),
    "inspect": ("routereplay.inspect_store", "summarise the routing in a store"),
}


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server that records routing",
                       description="OpenAI-compatible rollout server; routing returned and/or stored.")
    d = " (default: %(default)s)"
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    p.add_argument("--host", default="127.0.0.1", help="bind address" + d)
    p.add_argument("--port", type=int, default=8000, help="port" + d)
    p.add_argument("--served-model-name", default=None, help="model name clients send (default: --model)")
    p.add_argument("--routing-replay", default=None, metavar="JSON",
                   help='routing capture, e.g. \'{"enable": true, "store": "local", "local_store_dir": "./routing"}\'')
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences per batch" + d)
    p.add_argument("--max-model-len", type=int, default=4096, help="prompt + output tokens" + d)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens per step" + d)
    p.add_argument("--block-size", type=int, default=16, help="KV block size in tokens" + d)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size (default: from memory)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16" + d)
    p.add_argument("--seed", type=int, default=0, help="engine seed for unseeded requests" + d)
    p.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cuda | cpu" + d)
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks (GPUs) on this host" + d)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="share of GPU memory to use" + d)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--quantization", default=None, choices=["fp8"],
                   help="fp8: quantize a bf16 checkpoint to block-FP8 (128 x 128) as it loads; an FP8 checkpoint "
                   "(fp8 quantization_config) runs in FP8 without it")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help=d.strip())
    o = ServerOptions()
    p.add_argument("--api-key", default=os.environ.get("ROUTEREPLAY_API_KEY"),
                   help="Bearer token every endpoint but /health requires (default: $ROUTEREPLAY_API_KEY, else open)")
    p.add_argument("--weight-dir", action="append", default=[], metavar="DIR",
                   help="/update_weights_from_disk loads only under DIR (repeatable; default: any directory)")
    p.add_argument("--weight-group-timeout", type=float, default=o.weight_group_timeout_s, metavar="S",
                   help="seconds a weight-sync group may take to form" + d)
    p.add_argument("--max-request-bytes", type=int, default=o.max_request_bytes, help="body size limit" + d)
    p.add_argument("--request-body-timeout", type=float, default=o.request_body_timeout_s, metavar="S",
                   help="seconds a client may take to send its body" + d)
    p.add_argument("--max-prompts-per-request", type=int, default=o.max_prompts_per_request,
                   help="prompts in one batched request" + d)
    p.add_argument("--shutdown-timeout", type=float, default=o.shutdown_timeout_s, metavar="S",
                   help="seconds given to requests in flight and to the store on shutdown" + d)
    p.add_argument("--enable-memory-saver", action="store_true",
                   help="report SGLang's enable_memory_saver in /server_info (slime's offload_rollout checks it); "
                   "/release_memory_occupation works without it")
    p.set_defaults(func=_serve, parser=p)


def _serve(args: argparse.Namespace) -> int:
    from routereplay.config import EngineConfig
    from routereplay.server import serve

    try:
        config = EngineConfig(
            model=args.model, routing_replay=args.routing_replay, max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
            block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, dtype=args.dtype, seed=args.seed,
            enable_prefix_caching=not args.no_prefix_caching, tensor_parallel_size=args.tensor_parallel_size,
            device=args.device,
            gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
            quantization=args.quantization,
        )
        options = ServerOptions(
            api_key=args.api_key, weight_dirs=tuple(args.weight_dir), weight_group_timeout_s=args.weight_group_timeout,
            max_request_bytes=args.max_request_bytes, request_body_timeout_s=args.request_body_timeout,
            max_prompts_per_request=args.max_prompts_per_request, shutdown_timeout_s=args.shutdown_timeout,
            enable_memory_saver=args.enable_memory_saver)
    except (ValueError, TypeError) as e:
        args.parser.error(str(e))
    serve(config, host=args.host, port=args.port, served_model_name=args.served_model_name,
          log_level=args.log_level, options=options)
    return 0


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate for prompts offline and report their routing",
                       description="Generate for each prompt; print the text and the routing's shape.")
    p.add_argument("prompts", nargs="+", help="prompt strings (tokenised with the checkpoint's tokenizer)")
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--routing-replay", default='{"enable": true}', metavar="JSON",
                   help="routing capture config (default: %(default)s)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_generate, parser=p)


def _generate(args: argparse.Namespace) -> int:
    from routereplay import LLM, SamplingParams

    try:
        llm = LLM(args.model, routing_replay=args.routing_replay, dtype=args.dtype)
        sp = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed,
                            stop=args.stop)
        outs = llm.generate(args.prompts, sp, use_tqdm=False)
    except ValueError as e:
        args.parser.error(str(e))
    llm.close()
    for out in outs:
        c = out.outputs[0]
        print(f"prompt: {out.prompt!r}\ncompletion: {c.text!r} ({len(c.token_ids)} tokens, {c.finish_reason})")
        if c.routed_experts is not None:
            r = c.routed_experts
            print(f"routed_experts: {r.dtype}{list(r.shape)} (tokens-1, MoE layers {out.moe_layer_ids}, top-k)"
                  + (f", stored as {c.routing_key!r}" if c.routing_key else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        return importlib.import_module(_DELEGATED[argv[0]][0]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="routereplay", description="Rollout Routing Replay (R3) for MoE RL.")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _generate_parser(sub)
    for name, (_module, help_text) in _DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)  # listed in --help; dispatched above
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
