"""minti.loading.diffusers_keys: diffusers-folder names and shapes map onto the single-file layout of
the real checkpoints (tests/layouts), per component. Shapes only: no weights, no files."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from layouts import read_layout
from minti.loading.diffusers_keys import text_encoder_from_diffusers, to_single_file, unet_from_diffusers, \
    vae_from_diffusers
from minti.loading.families import FAMILIES
from minti.models.clip import CLIP_L_SD1, OPENCLIP_BIGG_SDXL, build_text_encoder


def shapes(sd: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def meta_tensors(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in layout.items()}


# ---- unet ---------------------------------------------------------------------------------------

def test_diffusers_keys_rename_to_single_file_keys_with_same_shapes():
    converted = unet_from_diffusers(read_layout("sd15_diffusers", component="unet"))
    assert converted == read_layout("sd15", "model.diffusion_model.")


def test_diffusers_key_without_a_rule_is_refused():
    sd = dict(read_layout("sd15_diffusers", component="unet"))
    sd["class_embedding.linear_1.weight"] = (1280, 320)
    with pytest.raises(ValueError, match="class_embedding"):
        unet_from_diffusers(sd)


# ---- vae ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("manifest", ["sd15_diffusers", "sd15_diffusers_legacy_names"])
def test_diffusers_vae_names_and_shapes_convert_to_the_single_file_layout(manifest):
    diffusers = read_layout(manifest, component="vae")
    assert any(".attentions.0." in k for k in diffusers)  # the manifest really is diffusers-named
    converted = vae_from_diffusers(meta_tensors(diffusers))
    assert shapes(converted) == read_layout("sd15", "first_stage_model.")


def test_diffusers_decoder_up_blocks_are_reversed_into_ldm_levels():
    t = torch.empty(1, device="meta")
    out = vae_from_diffusers({f"decoder.up_blocks.{i}.resnets.0.conv1.bias": t for i in range(4)}
                             | {"decoder.up_blocks.0.upsamplers.0.conv.bias": t})
    assert set(out) == {f"decoder.up.{i}.block.0.conv1.bias" for i in range(4)} | {"decoder.up.3.upsample.conv.bias"}


def test_mixing_old_and_new_attention_names_for_one_tensor_is_an_error():
    t = torch.empty(4, device="meta")
    with pytest.raises(ValueError, match="attn_1.q.bias"):
        vae_from_diffusers({"encoder.mid_block.attentions.0.to_q.bias": t,
                            "encoder.mid_block.attentions.0.query.bias": t})


# ---- text encoders ------------------------------------------------------------------------------

@pytest.mark.parametrize("manifest", ["sd15_diffusers", "sd15_diffusers_legacy_names"])
def test_diffusers_clip_l_names_map_to_the_single_file_names(manifest):
    diffusers = read_layout(manifest, component="text_encoder")
    mapped = shapes(to_single_file("text_encoder", meta_tensors(diffusers), layout="hf"))
    single = read_layout("sd15", "cond_stage_model.transformer.")
    # new transformers exports drop position_ids; the module's load hook recreates it
    # (its values: test_clip_l_position_ids_missing_or_flat_become_int64_0_to_76)
    if "embeddings.position_ids" not in diffusers and "text_model.embeddings.position_ids" not in diffusers:
        single.pop("text_model.embeddings.position_ids")
    assert mapped == single
    with torch.device("meta"):
        model = build_text_encoder(CLIP_L_SD1)
    model.load_state_dict(meta_tensors(mapped), strict=True, assign=True)
    ids = model.text_model.embeddings.position_ids  # recreated, or the (float meta) one made int64
    assert ids.dtype == torch.int64 and ids.shape == (1, 77)


def openclip_as_transformers(width: int, layers: int, heads: int, projection_dim: int | None) -> CLIPTextConfig:
    """How diffusers folders store an OpenCLIP text tower: a transformers CLIP text config."""
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, hidden_act="gelu",
                          projection_dim=projection_dim, pad_token_id=0, bos_token_id=49406, eos_token_id=49407)


def test_diffusers_sdxl_text_encoder_2_maps_to_the_bigg_manifest():
    # diffusers' SDXL text_encoder_2 is a transformers CLIPTextModelWithProjection
    with torch.device("meta"):
        hf = CLIPTextModelWithProjection(openclip_as_transformers(1280, 32, 20, 1280))
    mapped = shapes(to_single_file("text_encoder_2", hf.state_dict(), layout="openclip"))
    single = read_layout("sdxl", "conditioner.embedders.1.model.")
    single.pop("logit_scale")  # never exported by diffusers; the module fills a default
    assert mapped == single
    assert FAMILIES["sdxl"].config("text_2", mapped, "diffusers") == OPENCLIP_BIGG_SDXL


def test_diffusers_sd2_text_encoder_has_23_blocks_no_projection_and_still_loads():
    # diffusers' SD 2.x text_encoder: a plain CLIPTextModel holding only the 23 blocks SD 2 uses
    with torch.device("meta"):
        hf = CLIPTextModel(openclip_as_transformers(1024, 23, 16, None))
    mapped = shapes(text_encoder_from_diffusers(hf.state_dict(), "openclip"))
    single = read_layout("sd21", "cond_stage_model.model.")
    expected = {k: s for k, s in single.items()
                if not k.startswith("transformer.resblocks.23.") and k not in ("logit_scale", "text_projection")}
    assert mapped == expected
    # its penultimate state is our last: the loader asks for layer="last" with ln_final
    cfg = FAMILIES["sd2"].config("text", mapped, "diffusers")
    assert (cfg.layers, cfg.projection_dim, cfg.width, cfg.heads, cfg.pad_token_id) == (23, None, 1024, 16, 0)
    assert (cfg.layer, cfg.final_norm, cfg.activation) == ("last", True, "gelu")
    with torch.device("meta"):
        model = build_text_encoder(cfg)
    # logit_scale is missing: the module's load hook fills it (its value:
    # test_openclip_without_logit_scale_gets_open_clips_init_in_the_weights_dtype)
    model.load_state_dict(meta_tensors(mapped), strict=True, assign=True)
    assert model.logit_scale.shape == ()


def test_unknown_openclip_diffusers_key_is_an_error():
    with pytest.raises(ValueError, match="unexpected key"):
        text_encoder_from_diffusers({"text_model.something_new.weight": torch.zeros(1)}, "openclip")
