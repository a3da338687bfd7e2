"""Key mapping and the checks of parts against each other on the REAL layouts (shapes only: no
weights, no files). Which family a file is: test_detect.py."""
import re
from pathlib import Path

import pytest
import torch

from minti.loading.checkpoint import Checkpoint, assign_parts
from minti.loading.detect import CheckpointError
from minti.loading.pipeline import from_checkpoint
from layouts import LAYOUTS, read_layout

FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}


def shapes_checkpoint(shapes: dict, name: str = "model.safetensors", ema: bool = False) -> Checkpoint:
    ckpt = Checkpoint(Path(name), "safetensors", dict(shapes), {k: torch.float16 for k in shapes})
    return assign_parts(ckpt, ema=ema)


def parameter_totals() -> dict[tuple[str, str], int]:
    rows = (LAYOUTS / "parameter_totals.tsv").read_text().splitlines()[1:]
    return {(r.split("\t")[0], r.split("\t")[1]): int(r.split("\t")[3]) for r in rows if r.strip()}


@pytest.mark.parametrize("layout", ["sd15", "sd21", "sdxl"])
def test_real_layout_builds_every_part_with_nothing_missing_or_unexpected(layout):
    shapes = read_layout(layout)
    sd = from_checkpoint(shapes_checkpoint(shapes), None, torch.device("meta"))  # strict key matching inside
    assert sd.family == FAMILY[layout]
    # the modules built from the inferred configs hold exactly the file's tensors
    for part, module in [("unet", sd.unet), ("vae", sd.vae)]:
        prefix = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}[part]
        want = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
        got = {k: tuple(t.shape) for k, t in module.state_dict().items()}
        assert got == want
    totals = parameter_totals()
    params = sd.describe()["params"]
    assert params["unet"] == totals[(f"{layout}.tsv", "model.diffusion_model")]
    assert params["vae"] == totals[(f"{layout}.tsv", "first_stage_model")]
    text = sum(v for k, v in params.items() if k.startswith("text"))
    text_total = sum(v for (f, p), v in totals.items() if f == f"{layout}.tsv" and p.startswith(("cond", "conditioner")))
    n_position_ids = 77 * sum(1 for k in shapes if k.endswith("position_ids"))  # a buffer, not a parameter
    assert text == text_total - n_position_ids
    # only the DDPM schedule buffers are left over (SDXL files have none)
    assert all("." not in k for k in sd.ignored_keys)
    assert len(sd.ignored_keys) == (0 if layout == "sdxl" else 12)


def test_real_sd15_full_ema_file_takes_the_unet_from_model_ema():
    shapes = {**read_layout("sd15"), **read_layout("sd15_model_ema_extra")}
    ckpt = shapes_checkpoint(shapes, ema=True)
    assert ckpt.parts["unet"]["input_blocks.0.0.weight"] == "model_ema.diffusion_modelinput_blocks00weight"
    assert all(src.startswith("model_ema.") for src in ckpt.parts["unet"].values())
    sd = from_checkpoint(ckpt, None, torch.device("meta"))
    assert "model.diffusion_model.out.2.weight" in sd.ignored_keys  # the non-EMA copy is never read
    without = shapes_checkpoint(shapes)
    assert all(src.startswith("model.diffusion_model.") for src in without.parts["unet"].values())
    assert "model_ema.decay" in without.ignored


def test_ema_requested_from_a_pruned_file_is_refused_by_name():
    with pytest.raises(CheckpointError, match=r"model\.safetensors: has no EMA UNet weights"):
        shapes_checkpoint(read_layout("sd15"), ema=True)


def test_old_clip_names_without_text_model_prefix_map_to_the_same_modules():
    shapes = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): s
              for k, s in read_layout("sd15").items()}
    sd = from_checkpoint(shapes_checkpoint(shapes), None, torch.device("meta"))
    assert sd.describe()["params"]["text"] == 123060480


def test_missing_position_ids_and_logit_scale_are_not_errors():
    shapes = {k: s for k, s in read_layout("sdxl").items() if not k.endswith(("position_ids", "logit_scale"))}
    sd = from_checkpoint(shapes_checkpoint(shapes), None, torch.device("meta"))
    assert sd.family == "sdxl"


def test_a_missing_unet_tensor_is_an_error_naming_it():
    shapes = read_layout("sd15")
    del shapes["model.diffusion_model.out.2.bias"]
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unet weights do not match.*'out\.2\.bias'"):
        from_checkpoint(shapes_checkpoint(shapes), None, torch.device("meta"))


@pytest.mark.parametrize("key, shape, named", [
    ("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", (321,), r"'model\.diffusion_model\.input_blocks"
                                                                         r"\.1\.0\.in_layers\.0\.weight' has shape \[321\]"),
    # a buffer the module's load hook reshapes ([77] -> [1, 77]) but cannot make 77 long
    ("cond_stage_model.transformer.text_model.embeddings.position_ids", (1, 76), r"text weights do not match.*position_ids"),
])
def test_a_tensor_of_another_shape_is_a_one_line_error_naming_it(key, shape, named):
    shapes = {**read_layout("sd15"), key: shape}
    with pytest.raises(CheckpointError, match=named) as e:
        from_checkpoint(shapes_checkpoint(shapes), None, torch.device("meta"))
    assert str(e.value).startswith("model.safetensors: ") and "\n" not in str(e.value)


def test_a_part_missing_a_tensor_its_config_is_read_from_is_a_one_line_error():
    shapes = read_layout("sd15")
    del shapes["model.diffusion_model.out.2.weight"]  # out_channels comes from it
    with pytest.raises(CheckpointError, match=r"model\.safetensors: has no model\.diffusion_model\.out\.2\.weight "
                                              r"tensor, which the sd1 unet is built from"):
        from_checkpoint(shapes_checkpoint(shapes), None, torch.device("meta"))


def test_a_stray_unknown_key_inside_a_part_is_an_error():
    shapes = {**read_layout("sd15"), "first_stage_model.encoder.extra.weight": (4,)}
    with pytest.raises(CheckpointError, match="unexpected"):
        from_checkpoint(shapes_checkpoint(shapes), None, torch.device("meta"))


def _retyped(layout: str, drop: str | None = None, **changes) -> dict:
    shapes = {k: s for k, s in read_layout(layout).items() if k != drop}
    for pattern, new_shape in changes.items():
        for key in [k for k in shapes if pattern.replace("__", ".") in k]:
            shapes[key] = new_shape(shapes[key]) if callable(new_shape) else new_shape
    return shapes


@pytest.mark.parametrize("shapes, named", [
    (_retyped("sd15", **{"token_embedding__weight": (49000, 768)}), "token_embedding.weight has 49000 rows"),
    (_retyped("sd21", **{"positional_embedding": (64, 1024)}), "positional_embedding has 64 positions"),
    (_retyped("sd15", **{"attn2__to_k__weight": lambda s: (s[0], 1024), "attn2__to_v__weight": lambda s: (s[0], 1024)}),
     "cross-attention takes 1024-wide text"),
    (_retyped("sdxl", drop="conditioner.embedders.1.model.text_projection"),
     "has no conditioner.embedders.1.model.text_projection"),
    (_retyped("sdxl", **{"label_emb__0__0__weight": (1280, 2304)}), "label_emb.0.0.weight takes 2304 inputs"),
])
def test_parts_that_do_not_fit_together_are_refused_before_any_weight_is_read(shapes, named):
    # each part builds from its own shapes; what training indexes across them must fit too
    with pytest.raises(CheckpointError, match=re.escape(named)) as e:
        from_checkpoint(shapes_checkpoint(shapes), None, torch.device("meta"))
    assert str(e.value).startswith("model.safetensors: ") and "\n" not in str(e.value)
