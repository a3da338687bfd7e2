"""Which file this is and which family (minti.loading.detect), on the REAL layouts (shapes only),
and the refusals of files that are none of the families."""
import shutil

import pytest

from checkpoints import make_diffusers_folder
from layouts import read_layout
from minti.loading.checkpoint import open_checkpoint
from minti.loading.detect import CheckpointError, detect_family, guess_prediction

FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}
TEXT_PREFIX = {"sd15": "cond_stage_model.transformer.", "sd21": "cond_stage_model.model."}


def _with(layout: str, **changes) -> dict:
    shapes = read_layout(layout)
    shapes.update({k.replace("__", "."): v for k, v in changes.items()})
    return shapes


@pytest.mark.parametrize("shapes, what", [
    (_with("sd15", **{"model__diffusion_model__input_blocks__0__0__weight": (320, 9, 3, 3)}), "inpainting"),
    (_with("sd21", **{"model__diffusion_model__input_blocks__0__0__weight": (320, 5, 3, 3)}), "depth"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
      "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
      "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (768, 1280)}, "SDXL refiner"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}, "SD3"),
    ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "Flux"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "LoRA"),
    ({"diffusion_model.input_blocks.1.1.proj_in.lora_A.weight": (4, 320)}, "LoRA"),
    ({k: s for k, s in read_layout("sd15").items() if k.startswith("first_stage_model.")}, "VAE-only"),
    ({k[len("first_stage_model."):]: s for k, s in read_layout("sd15").items()
      if k.startswith("first_stage_model.")}, "VAE-only"),
    ({k: s for k, s in read_layout("sdxl").items() if k.startswith("conditioner.")}, "text-encoder-only"),
    ({}, "no tensors"),
    ({"foo.bar": (3,)}, "no Stable Diffusion UNet keys"),
])
def test_foreign_files_are_refused_saying_what_they_look_like(shapes, what):
    with pytest.raises(CheckpointError) as e:
        detect_family(shapes, "x.safetensors")
    msg = str(e.value)
    assert msg.startswith("x.safetensors: ") and what in msg and "\n" not in msg


@pytest.mark.parametrize("family, name, keys, want", [
    ("sd2", "v2-1_768-ema-pruned.safetensors", [], "v"),
    ("sd2", "768-v-ema.ckpt", [], "v"),
    ("sd2", "my_model-vpred.safetensors", [], "v"),
    ("sd2", "sd21_v.safetensors", [], "v"),
    ("sd2", "v2-1_512-ema-pruned.safetensors", [], "eps"),
    ("sd2", "anime-vae-merge.safetensors", [], "eps"),  # "v" inside a word is not a marker
    ("sd2", "plain.safetensors", ["v_pred"], "v"),
    ("sd1", "v1-5-pruned-768.safetensors", [], "eps"),
    ("sdxl", "sdxl_base.safetensors", ["v_pred"], "v"),
    ("sdxl", "sd_xl_base_1.0.safetensors", [], "eps"),
])
def test_prediction_type_follows_markers_and_documented_name_patterns(family, name, keys, want):
    assert guess_prediction(family, keys, name) == want


def test_detection_uses_structure_so_narrow_models_are_recognised():
    for layout, family in FAMILY.items():
        assert detect_family(read_layout(layout), "f") == family


@pytest.mark.parametrize("unet_from, text_from, message", [
    ("sd15", "sd21", "mixes an sd1 UNet with an sd2 text encoder"),
    ("sd21", "sd15", "mixes an sd2 UNet with an sd1 text encoder"),
])
def test_a_unet_merged_with_the_other_familys_text_encoder_is_refused(unet_from, text_from, message):
    shapes = {k: s for k, s in read_layout(unet_from).items() if not k.startswith(TEXT_PREFIX[unet_from])}
    shapes.update({k: s for k, s in read_layout(text_from).items() if k.startswith(TEXT_PREFIX[text_from])})
    with pytest.raises(CheckpointError, match=message):
        detect_family(shapes, "x.safetensors")


def test_an_sdxl_diffusers_folder_without_both_text_encoders_is_refused_as_the_refiner_would_be(tmp_path):
    folder = make_diffusers_folder(tmp_path, "sdxl")
    assert open_checkpoint(folder).family == "sdxl"
    shutil.rmtree(folder / "text_encoder")  # the refiner ships text_encoder_2 alone
    with pytest.raises(CheckpointError, match=r"has an SDXL UNet but not both text_encoder/ and text_encoder_2/ "
                                              r"\(the refiner has only one\); use the SDXL base pipeline"):
        open_checkpoint(folder)
