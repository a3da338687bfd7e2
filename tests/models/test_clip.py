"""minti.models.clip: key layouts against the real checkpoint manifests, numerical parity with
transformers' CLIPTextModel and open_clip's TextTransformer, and the placeholder path."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from layouts import read_layout
from open_clip.transformer import TextTransformer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from minti.models import ops
from minti.models.clip import (CLIP_L_SD1, CLIP_L_SDXL, OPENCLIP_BIGG_SDXL, OPENCLIP_H_SD2, TextEncoderConfig,
                        build_text_encoder, eos_positions)
from minti.loading.diffusers_keys import text_encoder_from_diffusers

V = 49408  # real vocabulary size, so placeholder ids are the real ones (table is 49408 x 64: small)
MANIFESTS = {
    "sd15 CLIP-L": (CLIP_L_SD1, "sd15", "cond_stage_model.transformer."),
    "sdxl CLIP-L": (CLIP_L_SDXL, "sdxl", "conditioner.embedders.0.transformer."),
    "sd21 ViT-H": (OPENCLIP_H_SD2, "sd21", "cond_stage_model.model."),
    "sdxl bigG": (OPENCLIP_BIGG_SDXL, "sdxl", "conditioner.embedders.1.model."),
}


# the models on their pure-torch paths (the kernels have their own tests)
pytestmark = pytest.mark.usefixtures("torch_backend")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def shapes(module_or_sd) -> dict[str, tuple[int, ...]]:
    sd = module_or_sd.state_dict() if isinstance(module_or_sd, nn.Module) else module_or_sd
    return {k: tuple(v.shape) for k, v in sd.items()}


def meta_tensors(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in layout.items()}


def prompt_tokens(pad_id: int, lengths=(5, 12), extra_ids=()) -> torch.Tensor:
    """Rows shaped like the tokenizer's: BOS, content (placeholders where given), EOS, padding."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in lengths:
        content = torch.randint(0, 49406, (n,), generator=g)
        for pos, i in extra_ids:
            content[pos] = i
        row = torch.full((77,), pad_id)
        row[0], row[1:n + 1], row[n + 1] = 49406, content, 49407
        rows.append(row)
    return torch.stack(rows)


def perturb_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter off its init (LayerNorm 1/0, zero biases) so parity tests see all of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


# ---- key layouts --------------------------------------------------------------------------

@pytest.mark.parametrize("name", MANIFESTS)
def test_meta_model_keys_and_shapes_equal_the_checkpoint_manifest(name):
    cfg, layout, prefix = MANIFESTS[name]
    with torch.device("meta"):
        model = build_text_encoder(cfg)
    assert shapes(model) == read_layout(layout, prefix)
    if cfg.layout == "hf":
        assert model.state_dict()["text_model.embeddings.position_ids"].dtype == torch.int64


@pytest.mark.parametrize("name", MANIFESTS)
def test_config_inferred_from_manifest_equals_the_preset_in_everything_shapes_determine(name):
    cfg, layout, prefix = MANIFESTS[name]
    # heads, activation, padding, which state conditions the UNet and whether the pooled output is
    # used are conventions: the family table's (tests/loading/test_families.py)
    inferred = TextEncoderConfig.from_state_dict(read_layout(layout, prefix), cfg.layout)
    assert inferred == with_conventions_of(inferred, cfg)


def with_conventions_of(inferred: TextEncoderConfig, preset: TextEncoderConfig) -> TextEncoderConfig:
    conventions = ("heads", "activation", "layer", "final_norm", "pad_token_id", "eos_token_id", "pooled")
    return dataclasses.replace(preset, **{f: getattr(inferred, f) for f in conventions})


OPENCLIP = dict(activation="gelu", pad_token_id=0)  # what an OpenCLIP tower's shapes cannot tell


def config_from(state_dict: dict, layout: str, **conventions) -> TextEncoderConfig:
    """A test tower's config: its shapes, and the conventions given."""
    return dataclasses.replace(TextEncoderConfig.from_state_dict(state_dict, layout), **conventions)


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_loads_strictly_into_the_meta_model(name):
    cfg, layout, prefix = MANIFESTS[name]
    with torch.device("meta"):
        model = build_text_encoder(cfg)
    model.load_state_dict(meta_tensors(read_layout(layout, prefix)), strict=True, assign=True)


def _hf_openclip_config(width, layers, heads, projection_dim):
    return CLIPTextConfig(vocab_size=V, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, hidden_act="gelu",
                          projection_dim=projection_dim, pad_token_id=0, bos_token_id=49406, eos_token_id=49407)


# ---- CLIP-L parity with transformers ------------------------------------------------------

@pytest.fixture(scope="module")
def hf_clip():
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=V, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    cfg._attn_implementation = "eager"  # the plain reference, independent of SDPA
    return perturb_(CLIPTextModel(cfg)).eval()


def _ours_from_hf(hf, **kw):
    # heads cannot be read from shapes (real towers all have 64-wide heads); these have 16
    cfg = config_from(text_encoder_from_diffusers(hf.state_dict(), "hf"), "hf", heads=4, **kw)
    model = build_text_encoder(cfg)
    model.load_state_dict(text_encoder_from_diffusers(hf.state_dict(), "hf"), strict=True)
    return model.eval()


@pytest.mark.parametrize("layer,final_norm", [("last", True), ("penultimate", False), ("penultimate", True)])
def test_clip_l_hidden_state_matches_transformers(hf_clip, layer, final_norm):
    tokens = prompt_tokens(pad_id=49407)
    ours = _ours_from_hf(hf_clip, layer=layer, final_norm=final_norm)
    assert (ours.cfg.width, ours.cfg.layers, ours.cfg.heads, ours.cfg.activation) == (64, 3, 4, "quick_gelu")
    with torch.no_grad():
        out = hf_clip(tokens, output_hidden_states=True)
        hidden, pooled = ours(tokens)
    ref = out.last_hidden_state if layer == "last" else out.hidden_states[-2]
    if layer != "last" and final_norm:
        ref = hf_clip.final_layer_norm(ref)
    assert pooled is None
    assert hidden.shape == (2, 77, 64)
    assert rel_err(hidden, ref) <= 1e-4


def test_clip_l_ignores_a_float_or_corrupted_position_ids_buffer(hf_clip):
    sd = text_encoder_from_diffusers(hf_clip.state_dict(), "hf")
    reference = _ours_from_hf(hf_clip)
    sd["text_model.embeddings.position_ids"] = torch.arange(77.0)[None] - 1e-4  # as some merges store it
    model = build_text_encoder(reference.cfg)
    model.load_state_dict(sd, strict=True)
    ids = model.text_model.embeddings.position_ids
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(77)[None])
    tokens = prompt_tokens(pad_id=49407)
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], reference(tokens)[0])


@pytest.mark.parametrize("stored", ["missing", "flat"])
def test_clip_l_position_ids_missing_or_flat_become_int64_0_to_76(hf_clip, stored):
    sd = text_encoder_from_diffusers(hf_clip.state_dict(), "hf")
    key = "text_model.embeddings.position_ids"
    if stored == "missing":  # new transformers / diffusers exports (this transformers may not either)
        sd.pop(key, None)
    else:  # stored without its batch dimension
        sd[key] = torch.arange(77)
    cfg = _ours_from_hf(hf_clip).cfg
    with torch.device("meta"):
        model = build_text_encoder(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    ids = model.text_model.embeddings.position_ids
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(77)[None])


# ---- OpenCLIP parity with open_clip and with transformers' export -------------------------

@pytest.fixture(scope="module")
def oc_text():
    torch.manual_seed(1)
    tt = TextTransformer(context_length=77, vocab_size=V, width=64, heads=4, layers=3, output_dim=32,
                         act_layer=nn.GELU)
    return perturb_(tt, seed=1).eval()


def _openclip_penultimate(tt, tokens):
    """open_clip's own blocks run by hand up to the penultimate state (what SD 2 / SDXL read)."""
    x = tt.token_embedding(tokens) + tt.positional_embedding
    for block in tt.transformer.resblocks[:-1]:
        x = block(x, attn_mask=tt.attn_mask)
    return x


def _ours_from_open_clip(tt, **kw):
    sd = tt.state_dict()  # no logit_scale in a bare TextTransformer: the load hook fills it
    model = build_text_encoder(config_from(sd, "openclip", heads=4, **OPENCLIP, **kw))
    model.load_state_dict(sd, strict=True)
    return model.eval()


@pytest.mark.parametrize("final_norm", [True, False])  # SD 2.x applies ln_final, SDXL bigG not
def test_openclip_penultimate_and_pooled_match_open_clip(oc_text, final_norm):
    tokens = prompt_tokens(pad_id=0)
    ours = _ours_from_open_clip(oc_text, layer="penultimate", final_norm=final_norm)
    assert (ours.cfg.width, ours.cfg.layers, ours.cfg.heads, ours.cfg.projection_dim) == (64, 3, 4, 32)
    with torch.no_grad():
        ref = _openclip_penultimate(oc_text, tokens)
        if final_norm:
            ref = oc_text.ln_final(ref)
        ref_pooled = oc_text(tokens)  # open_clip's encode_text path: ln_final at argmax, @ projection
        hidden, pooled = ours(tokens)
    assert rel_err(hidden, ref) <= 1e-4
    assert pooled.shape == (2, 32)
    assert rel_err(pooled, ref_pooled) <= 1e-4


def test_openclip_last_layer_matches_open_clip(oc_text):
    tokens = prompt_tokens(pad_id=0)
    ours = _ours_from_open_clip(oc_text, layer="last", final_norm=True)
    with torch.no_grad():
        ref = oc_text.forward_intermediates(tokens, indices=[2], normalize_intermediates=True,
                                            intermediates_only=True, output_fmt="NLC")["text_intermediates"][0]
        assert rel_err(ours(tokens)[0], ref) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_openclip_without_logit_scale_gets_open_clips_init_in_the_weights_dtype(oc_text, dtype):
    sd = {k: v.to(dtype) for k, v in oc_text.state_dict().items()}  # a bare TextTransformer has none
    assert "logit_scale" not in sd
    with torch.device("meta"):
        model = build_text_encoder(config_from(sd, "openclip", heads=4, **OPENCLIP))
    model.load_state_dict(sd, strict=True, assign=True)
    scale = model.logit_scale
    assert scale.dtype == dtype and scale.device.type == "cpu"
    assert scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-2)  # open_clip's init


def test_openclip_from_diffusers_export_matches_transformers():
    """Numerically checks the q/k/v fusing and the text_projection transpose of the mapping."""
    torch.manual_seed(2)
    cfg = _hf_openclip_config(64, 3, 4, 32)
    cfg._attn_implementation = "eager"
    hf = perturb_(CLIPTextModelWithProjection(cfg), seed=2).eval()
    sd = text_encoder_from_diffusers(hf.state_dict(), "openclip")
    ours = build_text_encoder(config_from(sd, "openclip", heads=4, layer="penultimate", final_norm=False,
                                          **OPENCLIP))
    ours.load_state_dict(sd, strict=True)
    tokens = prompt_tokens(pad_id=0)
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
        hidden, pooled = ours.eval()(tokens)
    assert rel_err(hidden, out.hidden_states[-2]) <= 1e-4
    assert rel_err(pooled, out.text_embeds) <= 1e-4


def test_penultimate_without_pooled_never_runs_the_last_block(oc_text, hf_clip):
    calls = []
    clip_l = _ours_from_hf(hf_clip, layer="penultimate", final_norm=False)  # SDXL's CLIP-L
    openclip = _ours_from_open_clip(oc_text, layer="penultimate", final_norm=True)
    openclip_no_proj = build_text_encoder(dataclasses.replace(openclip.cfg, projection_dim=None))
    sd = {k: v for k, v in oc_text.state_dict().items() if k != "text_projection"}
    openclip_no_proj.load_state_dict(sd, strict=True)  # SD 2.x from a diffusers folder
    for model, last, runs in [(clip_l, clip_l.text_model.encoder.layers[-1], 0),
                              (openclip_no_proj, openclip_no_proj.transformer.resblocks[-1], 0),
                              (openclip, openclip.transformer.resblocks[-1], 1)]:  # pooled needs it
        calls.clear()
        handle = last.register_forward_hook(lambda *a: calls.append(1))
        with torch.no_grad():
            model(prompt_tokens(pad_id=0))
        handle.remove()
        assert len(calls) == runs
    with torch.no_grad():
        assert torch.equal(openclip_no_proj(prompt_tokens(pad_id=0))[0], openclip(prompt_tokens(pad_id=0))[0])
        assert openclip_no_proj(prompt_tokens(pad_id=0))[1] is None


# ---- placeholders -------------------------------------------------------------------------

def test_eos_position_is_the_first_eos_even_after_larger_placeholder_ids():
    tokens = torch.tensor([[49406, 49409, 320, 49407, 0, 0],
                           [49406, 320, 49407, 49407, 49407, 49407],
                           [49406, 49408, 320, 49410, 5, 6]])  # no EOS at all: fall back to argmax
    assert eos_positions(tokens, 49407).tolist() == [3, 2, 3]


@pytest.mark.parametrize("kind", ["hf", "openclip"])
def test_placeholder_ids_read_extra_embeddings_and_only_they_get_gradients(kind, hf_clip, oc_text):
    model = _ours_from_hf(hf_clip) if kind == "hf" else _ours_from_open_clip(oc_text, layer="penultimate",
                                                                            final_norm=False)
    model.requires_grad_(False)  # the trainer's setting: everything frozen but the new vectors
    table = model.text_model.embeddings.token_embedding if kind == "hf" else model.token_embedding
    extra = torch.randn(3, 64, requires_grad=True)
    tokens = prompt_tokens(model.cfg.pad_token_id, extra_ids=[(1, V), (3, V + 1)])

    # reference: the same network whose table simply has the extra rows appended
    wide = build_text_encoder(dataclasses.replace(model.cfg, vocab_size=V + 3))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    table_key = next(k for k in sd if k.endswith("token_embedding.weight"))
    sd[table_key] = torch.cat([sd[table_key], extra.detach()])
    wide.load_state_dict(sd, strict=True)

    hidden, pooled = model(tokens, extra)
    with torch.no_grad():
        ref_hidden, ref_pooled = wide.eval()(tokens)
    assert rel_err(hidden, ref_hidden) <= 1e-5
    if pooled is not None:
        assert rel_err(pooled, ref_pooled) <= 1e-5
    (hidden.square().sum() + (0 if pooled is None else pooled.sum())).backward()
    assert extra.grad[:2].abs().min() > 0 and torch.all(extra.grad[2] == 0)  # row 2 unused
    assert all(p.grad is None for p in model.parameters())

    # even a table that did require grad gets nothing from placeholder positions (where() routes
    # zero to the clamped row 49407, which these tokens otherwise avoid)
    table.weight.requires_grad_(True)
    tokens[:, 1:] = torch.where(tokens[:, 1:] == 49407, torch.tensor(1), tokens[:, 1:])
    model(tokens, extra)[0].sum().backward()
    assert torch.all(table.weight.grad[49407] == 0)
    assert table.weight.grad[tokens[0, 1]].abs().sum() > 0  # a real word's row does get one


def test_placeholder_without_enough_extra_rows_is_a_clear_error(hf_clip):
    model = _ours_from_hf(hf_clip)
    tokens = prompt_tokens(49407, extra_ids=[(1, V + 2)])
    with pytest.raises(ValueError, match="extra_embeddings"):
        model(tokens)
    with pytest.raises(ValueError, match="extra_embeddings"):
        model(tokens, torch.zeros(2, 64))


def test_sd2_text_encoder_skips_its_last_block_when_pooled_is_unused():
    import dataclasses

    from minti.models.clip import OPENCLIP_H_SD2

    cfg = dataclasses.replace(OPENCLIP_H_SD2, width=32, layers=3, heads=2, mlp_width=64, projection_dim=16)
    model = build_text_encoder(cfg)
    ran = []
    model.transformer.resblocks[-1].register_forward_hook(lambda *a: ran.append(1))
    _, pooled = model(torch.full((1, 77), 49407))
    assert pooled is None and not ran


@pytest.mark.parametrize("cfg", [CLIP_L_SD1, OPENCLIP_H_SD2], ids=["clip-l", "openclip"])
def test_text_encoders_build_on_meta_without_drawing_random_tables(cfg, monkeypatch):
    # The checkpoint fills the tables: nn.Embedding's normal_ init on the meta device cost the
    # first minti.load seconds (it imports torch's Python refs), for values never used.
    def no_init(*args, **kwargs):
        raise AssertionError("a random init ran on a module the checkpoint fills")

    monkeypatch.setattr(nn.init, "normal_", no_init)
    with torch.device("meta"):
        model = build_text_encoder(cfg)
    table = next(m for name, m in model.named_modules() if name.endswith("token_embedding"))
    assert table.weight.shape == (cfg.vocab_size, cfg.width) and table.weight.is_meta
