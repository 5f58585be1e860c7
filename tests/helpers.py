"""Shared test helpers: tiny checkpoints and a reference forward through transformers."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

import torch

from routereplay.tiny import TINY_CONFIGS, make_tiny_checkpoint

FAMILIES = sorted(TINY_CONFIGS)


def tiny_checkpoint(root: str, model_type: str) -> str:
    return make_tiny_checkpoint(os.path.join(root, model_type), model_type)


def reference_forward(model_dir: str, token_ids: list[int], fp8_checkpoint: str | None = None):
    """transformers' logits [T, V] and, per MoE layer, the expert sets its routers chose [T, L, K].

    With ``fp8_checkpoint`` (``model_dir`` then holds its dequantized weights), every GEMM with a weight that
    checkpoint quantizes sees its input rounded per token group as the FP8 GEMMs round activations.
    """
    model = load_reference(model_dir, eager_experts=fp8_checkpoint is not None)
    return routed_forward(model, token_ids, fp8_checkpoint_weights(fp8_checkpoint) if fp8_checkpoint else None)


def load_reference(model_dir: str, eager_experts: bool = False):
    """transformers' fp32 model; ``eager_experts``: experts that call F.linear per expert (the grouped_mm
    default does not, so `fp8_activations` could not round their inputs)."""
    from transformers import AutoModelForCausalLM

    extra = {"experts_implementation": "eager"} if eager_experts else {}
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **extra).eval()


def routed_forward(model, token_ids: list[int], fp8_weights: tuple[set[str], int] | None = None):
    """Logits [T, V] and the expert sets [T, L, K], captured with forward hooks on the model's own routers;
    ``fp8_weights`` as `fp8_activations` takes them."""
    chosen = []
    hooks = []
    for module in model.modules():
        name = type(module).__name__
        if name.endswith(("TopKRouter", "TopkRouter")):
            hooks.append(module.register_forward_hook(lambda m, i, o: chosen.append(o[2].detach().clone())))
    rounding = fp8_activations(model, *fp8_weights) if fp8_weights else contextlib.nullcontext()
    with torch.no_grad(), rounding:
        logits = model(torch.tensor([token_ids])).logits[0]
    for h in hooks:
        h.remove()
    return logits, torch.stack(chosen, dim=1)  # [T, L, K]


def fp8_checkpoint_weights(fp8_checkpoint: str) -> tuple[set[str], int]:
    """transformers' names of the parameters an FP8 checkpoint quantizes (per-expert tensors as the fused ones),
    and its activation group (weight_block_size[1])."""
    import json

    from safetensors import safe_open

    config = json.load(open(os.path.join(fp8_checkpoint, "config.json")))
    with safe_open(os.path.join(fp8_checkpoint, "model.safetensors"), "pt") as f:
        weights = {k.removesuffix("_scale_inv") for k in f.keys() if k.endswith(".weight_scale_inv")}
    fused = {re.sub(r"\.experts\.\d+\.(gate|up)_proj\.weight$", ".experts.gate_up_proj",
                    re.sub(r"\.experts\.\d+\.down_proj\.weight$", ".experts.down_proj", w)) for w in weights}
    return fused, config["quantization_config"]["weight_block_size"][1]


@contextlib.contextmanager
def fp8_activations(model, weights: set[str], group: int) -> Iterator[None]:
    """Within: ``F.linear`` with one of the named parameters as its weight (an nn.Linear's, or a slice of a fused
    expert tensor, as transformers' eager experts call it) first rounds its input through per-token-group e4m3
    (groups of ``group``), as the FP8 GEMMs do; every other F.linear (routers, LM head) is untouched."""
    from routereplay.kernels.fp8 import quantize_per_token_group

    storages = {model.get_parameter(n).untyped_storage().data_ptr() for n in weights}
    plain = torch.nn.functional.linear

    def linear(x, weight, bias=None):
        if weight.untyped_storage().data_ptr() in storages:
            q, s = quantize_per_token_group(x, group)
            x = q.float() * s.repeat_interleave(group, dim=-1)[..., : x.shape[-1]]
        return plain(x, weight, bias)

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = plain


def assert_logprobs_match_full_forward(ref_model, prompts: list[list[int]], outs, atol: float = 1e-4) -> None:
    """Each returned log-prob equals the reference's full-sequence log-softmax at the sampled token."""
    for p, o in zip(prompts, outs, strict=True):
        c = o.outputs[0]
        with torch.no_grad():
            logp = torch.log_softmax(ref_model(torch.tensor([p + c.token_ids])).logits[0].float(), -1)
        expected = logp[len(p) - 1 : -1].gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=atol)


def count_round_trips(store, monkeypatch) -> list:
    """Count the Redis pipelines ``store`` executes (one entry per round trip), through its real client."""
    executes: list = []
    real_pipeline = store.client.pipeline

    def counting_pipeline(*args, **kwargs):
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute
        pipe.execute = lambda *a, **kw: executes.append(1) or real_execute(*a, **kw)
        return pipe

    monkeypatch.setattr(store.client, "pipeline", counting_pipeline)
    return executes


def capture_graph(step):
    """Run ``step()`` once on a side stream (Triton compiles, allocations), then capture it in a CUDA graph:
    returns (graph, the outputs of the captured call)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out
