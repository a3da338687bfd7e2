"""`python -m minti inspect`: header-only description, one-line errors for bad inputs."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import make_single_file
from minti.cli import main

FAMILIES = ["sd1", "sd2", "sdxl"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minti", "inspect", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    return {f: make_single_file(root, f, dtype=torch.float16) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_json_reports_family_prediction_dtype_and_params(files, family, capsys):
    assert main(["inspect", str(files[family]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == family and info["dtype"] == "float16"
    assert info["prediction"] == "eps" and info["prediction_guessed"] == (family == "sd2")
    parts = {"unet", "vae", "text"} if family != "sdxl" else {"unet", "vae", "text_clip_l", "text_openclip_bigg"}
    assert set(info["params"]) == parts and all(n > 0 for n in info["params"].values())
    assert info["ignored"] == ([] if family == "sdxl" else ["DDPM schedule buffers (12 keys)"])


def test_inspect_text_output_in_a_subprocess(files):
    out = run_cli(str(files["sd2"]))
    assert out.returncode == 0, out.stderr
    for line in ("family      sd2", "prediction  eps (guessed", "dtype       float16", "params      unet 5.46M",
                 "tokenizers  open-clip-torch", "ignored     DDPM schedule buffers (12 keys)"):
        assert line in out.stdout


def test_inspect_reads_no_weights(files, monkeypatch):
    # every tensor read goes through _SafetensorsReader.tensor: inspect must never call it
    from minti.loading import checkpoint

    def boom(self, key):
        raise AssertionError(f"inspect read {key}")

    monkeypatch.setattr(checkpoint._SafetensorsReader, "tensor", boom)
    assert main(["inspect", str(files["sdxl"]), "--json"]) == 0


def one_line_error(result: subprocess.CompletedProcess, path) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0]
    return lines[0]


def test_missing_truncated_and_pickle_exploit_fail_in_one_line_in_a_subprocess(files, tmp_path):
    missing = tmp_path / "nope.safetensors"
    assert "no such file" in one_line_error(run_cli(str(missing)), missing)

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(files["sd1"].read_bytes()[:1_000_000])
    assert "truncated" in one_line_error(run_cli(str(cut)), cut)

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    # the pickle calls os.system("touch marker") when unpickled
    payload = subprocess.run([sys.executable, "-c", (
        "import os, sys, torch\n"
        "class E:\n"
        "    def __reduce__(self): return (os.system, ('touch ' + sys.argv[2],))\n"
        "torch.save({'state_dict': {'x': torch.zeros(1)}, 'e': E()}, sys.argv[1])\n"), str(evil), str(marker)])
    assert payload.returncode == 0 and not marker.exists()
    msg = one_line_error(run_cli(str(evil)), evil)
    assert "would run code" in msg and "safetensors" in msg
    assert not marker.exists()


def _tiny(tmp_path, name, tensors):
    path = tmp_path / name
    save_file({k: torch.zeros(s) for k, s in tensors.items()}, str(path))
    return path


BAD = {
    "inpaint.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3)}, "inpainting"),
    "refiner.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
                             "model.diffusion_model.label_emb.0.0.weight": (8, 2560)}, "SDXL refiner"),
    "sd3.safetensors": ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (6, 2)}, "SD3"),
    "flux.safetensors": ({"double_blocks.0.img_attn.qkv.weight": (6, 2)}, "Flux"),
    "cascade.safetensors": ({"down_blocks.0.0.channelwise.0.weight": (4, 4), "effnet_mapper.0.weight": (4, 4)},
                            "Stable Cascade"),
    "lora.safetensors": ({"lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": (4, 4)}, "LoRA"),
    "vae.safetensors": ({"encoder.conv_in.weight": (4, 3, 3, 3), "decoder.conv_in.weight": (4, 4, 3, 3)}, "VAE-only"),
    "te.safetensors": ({"text_model.embeddings.token_embedding.weight": (10, 4)}, "text-encoder-only"),
    "empty.safetensors": ({}, "no tensors"),
    "other.safetensors": ({"foo.weight": (3,)}, "no Stable Diffusion UNet keys"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_foreign_files_fail_with_one_line_naming_the_file_and_what_it_looks_like(tmp_path, capsys, name):
    tensors, what = BAD[name]
    path = _tiny(tmp_path, name, tensors)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and what in err[0]


def test_directory_that_is_not_a_model_names_the_file_inside(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a diffusers model" in err and "model.safetensors" in err


def test_unexpected_key_shape_is_one_line(files, tmp_path, capsys):
    from safetensors import safe_open

    with safe_open(str(files["sd1"]), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["first_stage_model.decoder.conv_out.bias"] = torch.zeros(5)
    path = tmp_path / "bad-shape.safetensors"
    save_file(state, str(path))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "decoder.conv_out.bias" in err and "shape" in err and os.linesep not in err.strip()
