"""Routing on the wire: the response format, readers for peers' formats, and SGLang's layout written exactly."""

from routereplay.routing.codec import decode, encode, from_sglang, from_vllm, routing_dtype, to_sglang

__all__ = ["encode", "decode", "from_sglang", "from_vllm", "routing_dtype", "to_sglang"]
