"""minti.loading.families: the table's facts against the real checkpoint layouts (tests/layouts), the
narrow test models (tests/checkpoints.py) and what the sampler and the loader hand out."""
from __future__ import annotations


import pytest
import torch

from checkpoints import MANIFEST, narrow_configs, make_state_dict
from layouts import read_layout
from minti.loading.checkpoint import DDPM_BUFFERS
from minti.loading.detect import detect_family
from minti.loading.families import FAMILIES, family_with_text_widths, family_with_unet
from minti.loading.pipeline import _build, random_model

FAMILY_NAMES = list(FAMILIES)


def part_shapes(layout: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: s for k, s in layout.items() if k.startswith(prefix)}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_presets_under_their_prefixes_hold_exactly_the_real_files_keys_and_shapes(name):
    family = FAMILIES[name]
    ours = {}
    for part, spec in family.parts.items():
        with torch.device("meta"):
            module = _build(part, spec.preset)
        ours.update({spec.prefix + k: tuple(t.shape) for k, t in module.state_dict().items()})
    real = {k: s for k, s in read_layout(MANIFEST[name]).items() if k not in DDPM_BUFFERS}
    assert ours == real


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_part_of_a_real_file_configures_to_its_preset(name):
    layout = read_layout(MANIFEST[name])
    assert detect_family(layout, MANIFEST[name]) == name
    family = FAMILIES[name]
    for part, spec in family.parts.items():
        assert family.config(part, part_shapes(layout, spec.prefix)) == spec.preset, part


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_narrow_test_models_get_one_head_per_preset_head_width(name):
    # tests/checkpoints.py writes its narrow models with the rule spelled out: SD 1.x 8 heads,
    # SD 2.x/XL UNet and every CLIP tower one head of the model's full (32) width
    family, state = FAMILIES[name], make_state_dict(name)
    for part, want in narrow_configs(name).items():
        shapes = part_shapes({k: tuple(t.shape) for k, t in state.items()}, family.parts[part].prefix)
        assert family.config(part, shapes) == want, part


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_only_sd2_ships_its_text_encoder_cut_in_diffusers_folders(name):
    # diffusers' SD 2.x text_encoder lacks OpenCLIP-H's last block: its last state is the penultimate
    family, layout = FAMILIES[name], read_layout(MANIFEST[name])
    for part in family.text_parts:
        shapes = part_shapes(layout, family.parts[part].prefix)
        single, folder = family.config(part, shapes), family.config(part, shapes, "diffusers")
        assert folder.layer == ("last" if name == "sd2" else single.layer)
        assert single.layer == family.parts[part].preset.layer
    assert FAMILIES["sd2"].parts["text"].preset.layer == "penultimate"


@pytest.mark.parametrize("name, prediction, size", [
    ("sd1", "eps", 512), ("sd1", "v", 512),
    ("sd2", "eps", 512), ("sd2", "v", 768),
    ("sdxl", "eps", 1024), ("sdxl", "v", 1024),
])
def test_default_size_is_what_the_family_trained_at_for_that_prediction(name, prediction, size):
    assert FAMILIES[name].default_size(prediction) == size
    sd = random_model(name, torch.float16, "meta", prediction=prediction)
    assert sd.default_size == size


def test_latent_scale_and_fp32_parts_reach_the_loaded_model():
    assert {n: f.vae_scale for n, f in FAMILIES.items()} == {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
    sdxl = FAMILIES["sdxl"]
    assert sdxl.part_dtype("vae", torch.float16) == torch.float32  # SDXL's VAE overflows in fp16
    assert sdxl.part_dtype("vae", torch.bfloat16) == torch.bfloat16
    assert sdxl.part_dtype("unet", torch.float16) == torch.float16
    assert all(FAMILIES[n].part_dtype("vae", torch.float16) == torch.float16 for n in ("sd1", "sd2"))
    assert random_model("sdxl", torch.float16, "meta").vae_scale == 0.13025


def test_random_model_of_each_family_has_the_tables_parts():
    for name, family in FAMILIES.items():
        sd = random_model(name, torch.float16, "meta")
        assert [enc.cfg for enc in sd.text_encoders] == [family.parts[p].preset for p in family.text_parts]
        assert sd.unet.cfg == family.parts["unet"].preset and sd.vae.cfg == family.parts["vae"].preset
        assert (sd.prediction, sd.family) == ("v" if name == "sd2" else "eps", name)


def test_only_sdxl_has_pooled_and_size_conditioning_and_buckets_by_default():
    facts = {n: (f.label, f.pooled_conditioning, f.size_conditioning, f.buckets_by_default) for n, f in FAMILIES.items()}
    assert facts == {"sd1": ("SD 1.x", False, False, False), "sd2": ("SD 2.x", False, False, False),
                     "sdxl": ("SDXL", True, True, True)}


def test_kernel_shapes_are_the_real_unets_first_and_deepest_attention_levels_and_widest_text_tower():
    # by hand from the released models: (heads, head dim, latent downsampling) of the first and the
    # deepest input level with attention, the widest text encoder's (heads, head dim), and the
    # channels at the first attention level
    want = {"sd1": ((8, 40, 1), (8, 160, 4), (12, 64), 320),
            "sd2": ((5, 64, 1), (20, 64, 4), (16, 64), 320),
            "sdxl": ((10, 64, 2), (20, 64, 4), (20, 64), 640)}
    got = {n: (tuple(s.first_attention), tuple(s.deepest_attention), s.text, s.channels)
           for n, s in ((n, f.kernel_shapes) for n, f in FAMILIES.items())}
    assert got == want


def test_largest_size_is_the_largest_resolution_a_familys_releases_trained_at():
    assert {n: f.largest_size for n, f in FAMILIES.items()} == {"sd1": 512, "sd2": 768, "sdxl": 1024}


@pytest.mark.parametrize("dims, name", [([768], "sd1"), ([1024], "sd2"), ([768, 1280], "sdxl"),
                                        ([1280], None), ([1280, 768], None), ([], None)])
def test_family_with_text_widths_finds_the_family_whose_text_encoders_are_that_wide(dims, name):
    family = family_with_text_widths(dims)
    assert (family.name if family else None) == name


@pytest.mark.parametrize("label_emb, linear_proj, name", [
    (False, False, "sd1"), (False, True, "sd2"), (True, True, "sdxl"),
    (True, False, "sdxl"),  # label_emb decides first, as detection always has
])
def test_family_with_unet_reads_label_emb_first_then_proj_in(label_emb, linear_proj, name):
    assert family_with_unet(label_emb, linear_proj).name == name


def test_describe_names_each_text_encoder_as_the_table_does():
    names = {n: list(random_model(n, torch.float16, "meta").parts()) for n in FAMILIES}
    assert names == {"sd1": ["unet", "vae", "text"], "sd2": ["unet", "vae", "text"],
                     "sdxl": ["unet", "vae", "text_clip_l", "text_openclip_bigg"]}
