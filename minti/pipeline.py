"""minti.load and StableDiffusion: one loaded checkpoint, ready to encode, denoise, decode.

CONTRACT (the trainer and the CLI build on exactly these names; implementation pending):

    sd = minti.load(path, dtype=torch.float16, device="cuda", prediction=None, ema=False)
    sd.family            "sd1" | "sd2" | "sdxl"
    sd.prediction        "eps" | "v";  sd.prediction_guessed: bool
    sd.dtype, sd.device
    sd.unet              minti.unet.UNet: sd.unet(z_t, t, context, y=None) -> eps or v
    sd.vae               minti.vae.AutoencoderKL (may be None after sd.offload_vae())
    sd.vae_scale         0.18215 (SD 1/2) or 0.13025 (SDXL)
    sd.text_encoders     list of text-encoder modules (1, or 2 for SDXL: CLIP-L then bigG)
    sd.tokenizers        list of minti.tokenizer.Tokenizer, one per text encoder
    sd.embedding_dims    token-embedding width per encoder: [768] | [1024] | [768, 1280]
    sd.source            Path of the checkpoint file or folder
    sd.add_placeholder(token: str, n_vectors: int) -> None
        registers `token` in every tokenizer; in a prompt it expands to n_vectors new ids
        >= vocab_size whose vectors come from `extra` below.
    sd.tokenize(prompts: list[str]) -> list[LongTensor [B,77]]    one per encoder
    sd.encode_tokens(tokens, extra: list[Tensor [n, dim]] | None = None) -> (context, pooled)
        context [B,77,768|1024|2048]; pooled [B,1280] for sdxl else None.
        Gradients flow into `extra` only.
    sd.encode_text(prompts, extra=None) -> (context, pooled)   = encode_tokens(tokenize(prompts), extra)
    sd.sdxl_vector(pooled, original_size=(H, W), crop=(0, 0), target_size=(H, W)) -> y [B,2816]
    sd.encode_image(pixels [B,3,H,W] in [-1,1], sample=False, generator=None) -> scaled latents
    sd.decode_latents(z) -> pixels in [-1,1]
    sd.offload_vae() / sd.restore_vae(device)  move the VAE off / back onto the device
"""
