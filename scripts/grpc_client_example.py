#!/usr/bin/env python3
"""A small streaming gRPC client: prints a Generate (or Chat) stream as it arrives.

    python scripts/grpc_client_example.py -p "The capital of France is" -n 32 --temp 0
    python scripts/grpc_client_example.py --chat -p "Tell me a joke" --api-key KEY
    python scripts/grpc_client_example.py --target host:50051 --tls -p "Hello"

Needs only grpcio and the generated gguf_serve.v1 package (pip install gguf-serve).
"""

from __future__ import annotations

import argparse
import sys

import grpc

from gguf_serve.v1 import inference_pb2 as pb
from gguf_serve.v1 import inference_pb2_grpc as pb_grpc
from gguf_serve.v1 import sampling_pb2 as spb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="localhost:50051", help="host:port of the gRPC server")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message (Chat)")
    p.add_argument("-n", "--n-predict", type=int, default=128)
    p.add_argument("--temp", type=float, default=None, help="temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--api-key", default=None, help="sent as 'authorization: Bearer KEY'")
    p.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    args = p.parse_args(argv)

    # Only the fields that are set are sent: the server's defaults apply to the rest.
    params = spb.SamplingParams(n_predict=args.n_predict)
    if args.temp is not None:
        params.temperature = args.temp
    if args.seed is not None:
        params.seed = args.seed
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []

    if args.tls:
        channel = grpc.secure_channel(args.target, grpc.ssl_channel_credentials())
    else:
        channel = grpc.insecure_channel(args.target)
    with channel:
        stub = pb_grpc.InferenceStub(channel)
        if args.chat:
            msg = pb.ChatMessage(role="user", content=args.prompt)
            stream = stub.Chat(
                pb.ChatRequest(messages=[msg], params=params),
                metadata=metadata,
                timeout=args.timeout,
            )
        else:
            stream = stub.Generate(
                pb.GenerateRequest(text=args.prompt, params=params),
                metadata=metadata,
                timeout=args.timeout,
            )
        try:
            last = None
            for delta in stream:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                last = delta
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
        except KeyboardInterrupt:
            stream.cancel()  # the server aborts the request and frees its KV cache
            return 130
    print()
    if last is not None:
        reason = pb.FinishReason.Name(last.finish_reason)
        t = last.timings
        print(
            f"[{reason}; prompt {last.usage.prompt_tokens} tokens, generated "
            f"{last.usage.completion_tokens} at {t.predicted_per_second:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
