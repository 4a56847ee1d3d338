"""Synthetic ModelLayers shaped like real models (no weights needed)."""

from bo_search.model import LinearInfo, ModelLayers

LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def llama_like(n_blocks: int, hidden: int, kv: int, inter: int) -> ModelLayers:
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    lin = [LinearInfo(f"model.layers.{b}.{n}", b, n, *shapes[n]) for b in range(n_blocks) for n in LLAMA_LINEARS]
    return ModelLayers("model.layers", n_blocks, tuple(lin))


def smollm2() -> ModelLayers:
    return llama_like(30, 576, 192, 1536)


def llama3_8b() -> ModelLayers:
    return llama_like(32, 4096, 1024, 14336)
