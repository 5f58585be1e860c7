"""Routing on the wire: the response format and readers for peers' formats."""

from routereplay.routing.codec import decode, encode, from_sglang, from_vllm, routing_dtype

__all__ = ["encode", "decode", "from_sglang", "from_vllm", "routing_dtype"]
