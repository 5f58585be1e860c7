"""Model families, keyed by Hugging Face `model_type`."""

from routereplay.models import deepseek_v3, ernie4_5_moe, glm4_moe, gpt_oss, mixtral, qwen2_moe, qwen3_moe
from routereplay.models.family import Family

REGISTRY: dict[str, Family] = {
    m.FAMILY.model_type: m.FAMILY for m in (qwen3_moe, qwen2_moe, mixtral, glm4_moe, ernie4_5_moe, deepseek_v3,
                                        gpt_oss)
}


# Checkpoints whose config names remote code but whose architecture is a supported family.
ALIASES: dict[str, str] = {"kimi_k2": "deepseek_v3"}


def get_family(model_type: str) -> Family:
    try:
        return REGISTRY[ALIASES.get(model_type, model_type)]
    except KeyError:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted({*REGISTRY, *ALIASES}))}"
        ) from None
