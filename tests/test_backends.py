"""The quantization-backend registry: a new backend is one class plus one registration. A trivial
one (binary weights: the sign times the row's mean magnitude) takes over 1-bit symmetric settings,
and the applier, the size model, the group check and the packed export all follow it."""

import pytest
import torch

from bo_search.backends import AFFINE, GGML, backend_for, backend_names, get_backend, registered
from bo_search.packing import save_packed
from bo_search.quant import fake_quantize
from bo_search.types import PER_CHANNEL, LayerQuant, QuantPlan, UserError

BINARY = LayerQuant(1, PER_CHANNEL, symmetric=True)


class SignBackend:
    """1-bit codes (the weight's sign) and one float32 magnitude per output row."""

    name = "sign"

    def claims(self, lq):
        return lq.bits == 1 and lq.symmetric and not lq.ggml_type

    def check(self, info, lq):
        if lq.group_size != PER_CHANNEL:
            raise UserError(f"layer {info.fqn}: the sign backend stores one magnitude per row (group -1)")

    def fake_quantize(self, w, lq, scheme):
        return (torch.sign(w) * w.abs().mean(dim=1, keepdim=True)).to(w.dtype)

    def layer_bits(self, info, lq, scheme):
        return info.numel + 32 * info.out_features

    def export_error(self, lq, target):
        return f"the sign backend has no {target} export"


def test_builtin_backends_claim_affine_and_ggml_settings():
    assert backend_names()[:2] == [AFFINE, GGML]
    assert backend_for(LayerQuant(4, 64)).name == AFFINE
    assert backend_for(BINARY).name == AFFINE
    assert backend_for(LayerQuant.of_ggml("Q4_K")).name == GGML
    with pytest.raises(UserError, match="did you mean 'ggml'"):
        get_backend("gmml")


def test_a_registered_backend_drives_fake_quant_size_check_and_export(tiny_ctx, tmp_path):
    ctx = tiny_ctx
    li = ctx.layers.linears[0]
    orig = ctx.applier.original(li.fqn).clone()
    affine_bits = ctx.size_model.layer_bits(li, BINARY)
    affine_w = fake_quantize(orig, BINARY)
    with registered(SignBackend()) as sign:
        assert backend_for(BINARY) is sign and backend_for(LayerQuant(1, 32)).name == AFFINE  # asymmetric stays affine
        with pytest.raises(ValueError, match="already registered"):
            from bo_search.backends import register_backend

            register_backend(SignBackend())
        plan = QuantPlan({li.fqn: BINARY})
        try:
            assert ctx.applier.apply(plan) == 1
            weight = dict(ctx.model.named_modules())[li.fqn].weight
            want = torch.sign(orig) * orig.abs().mean(dim=1, keepdim=True)
            assert torch.equal(weight.detach(), want) and not torch.equal(weight.detach(), affine_w)
        finally:
            ctx.applier.restore()
        assert ctx.size_model.layer_bits(li, BINARY) == li.numel + 32 * li.out_features != affine_bits
        with pytest.raises(UserError, match="sign backend stores one magnitude per row"):
            ctx.applier.check(QuantPlan({li.fqn: LayerQuant(1, 32, symmetric=True)}))
        with pytest.raises(UserError, match="the sign backend has no packed export"):
            save_packed(ctx.model, ctx.layers, plan, tmp_path / "packed")
    assert backend_for(BINARY).name == AFFINE  # unregistered on leaving the block
    assert ctx.size_model.layer_bits(li, BINARY) == affine_bits
    assert torch.equal(dict(ctx.model.named_modules())[li.fqn].weight.detach(), orig)
