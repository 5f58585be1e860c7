"""Shared test helpers: tiny checkpoints and a reference forward through transformers."""

from __future__ import annotations

import os

import torch

from routereplay.tiny import TINY_CONFIGS, make_tiny_checkpoint

FAMILIES = sorted(TINY_CONFIGS)


def tiny_checkpoint(root: str, model_type: str) -> str:
    return make_tiny_checkpoint(os.path.join(root, model_type), model_type)


def reference_forward(model_dir: str, token_ids: list[int]):
    """transformers' logits [T, V] and, per MoE layer, the expert sets its routers chose [T, L, K].

    The ids are captured with forward hooks on the reference's own router modules.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chosen = []
    hooks = []
    for module in model.modules():
        name = type(module).__name__
        if name.endswith(("TopKRouter", "TopkRouter")):
            hooks.append(module.register_forward_hook(lambda m, i, o: chosen.append(o[2].detach().clone())))
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]
    for h in hooks:
        h.remove()
    return logits, torch.stack(chosen, dim=1)  # [T, L, K]


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
