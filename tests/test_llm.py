"""Packed causal LM and the whole model: packed equals per-sample (values and gradients), samples isolated."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from plait.data.sizing import SizingConfig
from plait.ops.attention import flash_attn_available
from plait.trainer.bench.model import make_batch
from plait.trainer.model.accounting import estimate_flops, parameter_counts
from plait.trainer.model.config import EncoderConfig, LLMConfig, ModelConfig, MoMEConfig, ResamplerConfig
from plait.trainer.model.llm import PackedCausalLM
from plait.trainer.model.mome import MoMELayer, RoutingContext
from plait.trainer.model.multimodal import MultimodalModel

SIZING = SizingConfig(patch_size=4, audio_patch=4)
"""Patch geometry of the small test models: 4x4 vision patches over 2-frame tubelets, 4x4 log-mel patches."""
UNIT_PATCHES = SizingConfig(patch_size=1, temporal_patch=1, audio_patch=1)
"""One value per colour per patch, for hand-counted FLOPs."""

TINY = {
    "llama": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
}
ATTENTION = ["plait_varlen", "sdpa", "eager"]


def _llm(model_type: str, attn: str, device: str = "cpu") -> PackedCausalLM:
    torch.manual_seed(0)
    cfg = LLMConfig(model_type=model_type, model_kwargs=TINY[model_type], attn_implementation=attn, mome_layers=[1])
    return PackedCausalLM(cfg, MoMEConfig(init="fresh", init_std=0.2), embed_dim=8, context=RoutingContext()).to(device)


def _sequences(device: str = "cpu", dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings of 3 packed sequences (7, 1, 12 tokens), their offsets and token modalities."""
    gen = torch.Generator().manual_seed(1)
    embeds = torch.randn(20, 32, generator=gen).to(device, dtype)
    modality = torch.randint(0, 4, (20,), generator=gen).to(device)
    return embeds, torch.tensor([0, 7, 8, 20], device=device), modality


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_packed_llm_equals_per_sequence(model_type, attn):
    llm = _llm(model_type, attn)
    assert llm.model.config.use_cache is False
    embeds, cu, modality = _sequences()
    weight = torch.linspace(-1, 1, 32)
    params = [p for p in llm.parameters() if p.requires_grad]
    packed = llm(embeds, cu, 12, modality)
    packed_grads = torch.autograd.grad((packed * weight).sum(), params, allow_unused=True)
    total = 0
    for s in range(3):
        a, b = int(cu[s]), int(cu[s + 1])
        one = llm(embeds[a:b], torch.tensor([0, b - a]), b - a, modality[a:b])
        torch.testing.assert_close(one, packed[a:b], atol=1e-5, rtol=1e-5)
        total = total + (one * weight).sum()
    for got, want in zip(torch.autograd.grad(total, params, allow_unused=True), packed_grads):
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ATTENTION)
def test_sequences_never_attend_to_each_other(attn):
    llm = _llm("llama", attn)
    embeds, cu, modality = _sequences()
    base = llm(embeds, cu, 12, modality)
    moved = embeds.clone()
    moved[:7] += 1.0
    out = llm(moved, cu, 12, modality)
    # Not bitwise: other sequences change the expert group sizes, and so the BLAS blocking, of these rows.
    assert torch.allclose(out[7:], base[7:], rtol=0, atol=1e-5) and (out[:7] - base[:7]).abs().max() > 1e-2


def test_mome_layer_replaces_the_chosen_mlp_and_routes_by_modality():
    llm = _llm("llama", "plait_varlen")
    layers = llm.model.get_decoder().layers
    assert isinstance(layers[1].mlp, MoMELayer) and not isinstance(layers[0].mlp, MoMELayer)
    embeds, cu, modality = _sequences()
    with llm.context.record() as outputs:
        llm(embeds, cu, 12, modality)
    assert len(outputs) == 1 and torch.equal(outputs[0].modality, modality)


def _model(**llm) -> MultimodalModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        encoder=EncoderConfig(dim=32, depth=2, num_heads=4, ffn_hidden=48, mome_layers=[1]),
        resampler=ResamplerConfig(dim=32, depth=1, num_latents=3, num_heads=4, ffn_hidden=48),
        llm=LLMConfig(model_kwargs=TINY["llama"], mome_layers=[0], **llm),
        mome=MoMEConfig(init="fresh", init_std=0.2, shared_expert=True),
        embed_dim=8,
    )
    return MultimodalModel(cfg, SIZING)


SPECS = [(0, (1, 3, 5), 4), (1, (1, 4, 6), 3), (2, (2, 2, 3), 5), (0, (1, 1, 1), 1)]


def _objective(out) -> torch.Tensor:
    ce = torch.nn.functional.cross_entropy(out.caption_logits, out.caption_targets, reduction="sum")
    return ce + (out.media_embeds * out.text_embeds).sum()


def _single(batch, i: int, cfg: ModelConfig):
    """Sample i of `batch` alone, with the same patches and caption."""
    one = make_batch([SPECS[i]], cfg, SIZING, seed=0)
    stream = "audio" if SPECS[i][0] == 1 else "vision"
    source = batch.streams[stream]
    one.streams[stream].patches = source.patches[source.seg == i]
    a, b = batch.caption_cu_seqlens[i : i + 2].tolist()
    one.caption_ids = batch.caption_ids[a:b]
    return one


@pytest.mark.parametrize("attn", ["plait_varlen", "sdpa"])
def test_packed_model_equals_per_sample_model(attn):
    # float64: the packed and per-sample sums differ only by rounding, far below any real mixing of samples.
    model = _model(attn_implementation=attn).double()
    batch = make_batch(SPECS, model.cfg, SIZING, seed=0)
    for stream in batch.streams.values():
        stream.patches = stream.patches.double()
    params = list(model.parameters())
    packed = model(batch)
    assert packed.caption_logits.shape == (13, 64) and torch.equal(packed.caption_targets, batch.caption_ids)
    assert len(packed.router_outputs) == 2
    packed_grads = torch.autograd.grad(_objective(packed), params)
    total, offset = 0, 0
    for i in range(len(SPECS)):
        one = model(_single(batch, i, model.cfg))
        n = one.caption_targets.numel()
        torch.testing.assert_close(one.media_embeds[0], packed.media_embeds[i], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(one.text_embeds[0], packed.text_embeds[i], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(one.caption_logits, packed.caption_logits[offset : offset + n],
                                   atol=1e-10, rtol=1e-10)
        offset += n
        total = total + _objective(one)
    for got, want in zip(torch.autograd.grad(total, params), packed_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_caption_logits_and_text_embedding_positions():
    model = _model()
    batch = make_batch(SPECS[:1], model.cfg, SIZING, seed=0)
    out = model(batch)
    encoded = model.encoder(batch)
    latents = model.resampler(encoded.tokens, encoded.seg, 1, encoded.tokens.shape[0]).latents[0]
    captions = model.llm.embed(batch.caption_ids)
    codes = torch.tensor([1, 1, 1, 0, 0, 0, 0])
    hidden = model.llm(torch.cat([latents, captions]), torch.tensor([0, 7]), 7, codes)
    # Caption token j is predicted from the row before it: the last latent predicts the first token.
    torch.testing.assert_close(out.caption_logits, model.llm.logits(hidden[2:6]))
    text = model.llm(captions, torch.tensor([0, 4]), 4, codes[3:])
    torch.testing.assert_close(out.text_embeds[0], model.llm.text_projection(text[-1]))


def test_without_captioning_only_text_sequences_run_and_embeddings_are_unchanged():
    model = _model()
    batch = make_batch(SPECS, model.cfg, SIZING, seed=0)
    full = model(batch)
    text_only = model(batch, captioning=False)
    torch.testing.assert_close(text_only.media_embeds, full.media_embeds)
    torch.testing.assert_close(text_only.text_embeds, full.text_embeds, atol=1e-5, rtol=1e-5)
    assert text_only.caption_logits.shape == (0, 64) and text_only.caption_targets.numel() == 0
    # Only the 13 caption tokens of the text-only sequences enter the LLM, all routed as text.
    assert text_only.counters["llm_tokens"] == 13
    assert text_only.router_outputs[1].modality.tolist() == [0] * 13
    # Every parameter still gets a gradient (zero for the captioning-only ones), as ZeRO-3 needs.
    _objective(text_only).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.resampler.out_proj.weight.grad.abs().max() == 0


def test_llm_tokens_routed_with_media_and_text_codes():
    model = _model()
    batch = make_batch(SPECS, model.cfg, SIZING, seed=0)
    out = model(batch)
    llm_routing = out.router_outputs[1]
    codes = llm_routing.modality.tolist()
    # 4 samples x 3 latents with their media codes (image 1, audio 2, video 3) + 2 x 13 caption tokens.
    assert sorted(set(codes)) == [0, 1, 2, 3]
    assert codes.count(0) == 26 and codes.count(1) == 6 and codes.count(2) == 3 and codes.count(3) == 3
    assert out.counters["llm_tokens"] == 38 and out.counters["encoder_tokens"] == 52


def test_empty_micro_batch_runs_every_module_with_gradients():
    model = _model()
    out = model(make_batch([], model.cfg, SIZING, seed=0))
    assert out.media_embeds.shape == (0, 8) and out.caption_logits.shape == (0, 64)
    _objective(out).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_default_config_is_tiny():
    model = MultimodalModel(ModelConfig(), SizingConfig())
    total = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= total <= 3_000_000
    names = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert names == {"encoder", "resampler", "llm"}
    assert any("router" in name for name, _ in model.named_parameters())


@pytest.mark.skipif(not (torch.cuda.is_available() and flash_attn_available()), reason="needs CUDA + flash-attn")
@pytest.mark.parametrize("attn", ["flash_attention_2", "plait_varlen"])
def test_flash_attention_isolates_sequences(attn):
    llm = _llm("llama", attn, "cuda").bfloat16()
    embeds, cu, modality = _sequences("cuda", torch.bfloat16)
    packed = llm(embeds, cu, 12, modality)
    for s in range(3):
        a, b = int(cu[s]), int(cu[s + 1])
        one = llm(embeds[a:b], torch.tensor([0, b - a], device="cuda"), b - a, modality[a:b])
        torch.testing.assert_close(one, packed[a:b], atol=2e-2, rtol=2e-2)


def _hand_count_model() -> MultimodalModel:
    """Encoder d8/1 block/no MoME, resampler d8/K2, Llama d8/1 layer (kv 1 head) with MoME E2 k1, vocab 16."""
    torch.manual_seed(0)
    llama = {"vocab_size": 16, "hidden_size": 8, "intermediate_size": 4, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1}
    return MultimodalModel(ModelConfig(
        encoder=EncoderConfig(dim=8, depth=1, num_heads=2, ffn_hidden=4, mome_layers=[]),
        resampler=ResamplerConfig(dim=8, depth=1, num_latents=2, num_heads=2, ffn_hidden=4),
        llm=LLMConfig(model_kwargs=llama, mome_layers=[0]),
        mome=MoMEConfig(num_experts=2, top_k=1),
        embed_dim=4,
    ), UNIT_PATCHES)


def test_flops_estimate_matches_a_hand_count():
    model = _hand_count_model()
    batch = make_batch([(0, (1, 1, 3), 2)], model.cfg, UNIT_PATCHES, seed=0)
    flops = estimate_flops(model, batch)
    # encoder: patch 2*3*3*8; blocks 2*3*(qkv 192 + proj 64 + ffn 64 + 32); attention 4*8*3^2
    assert flops.encoder == 144 + 2112 + 288
    # resampler: input 2*3*64; latents 2*2*(q 64 + out 64 + ffn 96); kv 2*(3+2)*128; attn 4*8*2*(3+2);
    # out_proj 2*2*64; media head 2*1*32
    assert flops.resampler == 384 + 896 + 1280 + 320 + 256 + 64
    # llm rows [2 latents + 2 caption] and [2 caption]: 2*6*(q 64 + k 32 + v 32 + o 64 + router 64 + 1 expert 96);
    # causal attention 4*2*4*(4*5/2 + 2*3/2); lm_head 2*2*128; text projection 2*1*32
    assert flops.llm == 4224 + 416 + 512 + 64
    assert flops.attention == 288 + 320 + 416 and flops.train == 3 * 10960


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's flop counter has no formula for the MoE grouped GEMM: 2 * rows * K * N over all groups."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


@pytest.mark.parametrize("captioning", [True, False])
def test_flops_matmul_part_matches_torch_flop_counter(captioning):
    model = _model()
    batch = make_batch(SPECS, model.cfg, SIZING, seed=0)
    flops = estimate_flops(model, batch, captioning)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops}) as counter:
        model(batch, captioning=captioning)
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for op, v in counts.items() if str(op) in ("aten.mm", "aten.addmm", "aten.bmm", "aten._grouped_mm"))
    assert matmuls == flops.forward - flops.attention


def test_parameter_counts():
    model = _hand_count_model()
    counts = parameter_counts(model)
    total = sum(p.numel() for p in model.parameters())
    assert counts.total == counts.trainable == total
    assert counts.active_per_token == total - 96  # one of two experts (w_in 8x8 + w_out 8x4) idle per token
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    assert parameter_counts(model).trainable == total - sum(p.numel() for p in model.encoder.parameters())
