"""The placeholder token a run trains: registered on the model, and its first vectors, from the
--init words (their rows of each text encoder's token table) or from an embedding file.

    offset = register_token(sd, "<my-cat>", n)         # its rows in the `extra` tensors start here
    vectors = initial_vectors(sd, "cat", n)             # fp32 CPU [n, dim] per text encoder

looks_like_a_path is the one rule for whether an --init names a file or words.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from minti.errors import UserError, missing_path
from minti.training.data import IMAGE_EXTENSIONS
from minti.training.embedding import EMBEDDING_SUFFIXES, Embedding, load_embedding, mismatch

log = logging.getLogger("minti")

# What --init treats as a file rather than words: an embedding's suffixes, an image's and a model's
# (and the usual typo of .safetensors), besides anything with a path separator.
INIT_FILE_SUFFIXES = tuple(dict.fromkeys((*EMBEDDING_SUFFIXES, ".safetensor", ".sft", *IMAGE_EXTENSIONS)))
EMBEDDING_MAX_BYTES = 64 * 2**20  # far above any embedding (kilobytes), far below any model (gigabytes)


def token_table(encoder: torch.nn.Module) -> torch.Tensor:
    """The frozen [vocab, dim] token-embedding weight of a text encoder (either CLIP layout)."""
    for name, module in encoder.named_modules():
        if name.endswith("token_embedding") and isinstance(module, torch.nn.Embedding):
            return module.weight
    raise RuntimeError(f"{type(encoder).__name__} has no token_embedding table")


def spread(rows: torch.Tensor, n: int) -> torch.Tensor:
    """N vectors from init rows, as A1111 does: row i*len//n, i.e. repeated when there are fewer
    rows than vectors and evenly thinned when there are more."""
    return torch.stack([rows[i * rows.shape[0] // n] for i in range(n)])


def looks_like_a_path(init: str) -> bool:
    """Whether --init names a file rather than words: a file suffix, or a path separator in one
    word ("embeddings/dog") or in a path that exists. A bare word is words even when a folder of
    that name happens to exist here, and a phrase ("a black/white cat") is words."""
    text = init.strip()
    if Path(text).suffix.lower() in INIT_FILE_SUFFIXES:
        return True
    if "/" not in text and "\\" not in text:
        return False
    return not any(c.isspace() for c in text) or Path(text).expanduser().exists()


def init_embedding(init: str) -> Embedding | None:
    """The embedding --init names, None for words. Anything that looks like a path and is not a
    readable embedding is an error, never quietly prompt words."""
    if not looks_like_a_path(init):
        return None
    path = Path(init.strip()).expanduser()
    if not path.exists():
        reason = missing_path(path)
        raise UserError(f"--init {init} {reason}" + (": pass an embedding file (.pt/.safetensors) or words, "
                                                     "e.g. --init cat" if reason == "does not exist" else ""))
    if path.is_file() and path.stat().st_size > EMBEDDING_MAX_BYTES:
        raise UserError(f"--init {init} is {path.stat().st_size / 2**30:.1f} GiB: a model checkpoint, not an "
                        "embedding; pass an embedding file (.pt/.safetensors) or words, e.g. --init cat")
    try:
        return load_embedding(path)
    except ValueError as e:
        raise UserError(f"--init {init}: {e}") from None


def initial_vectors(sd, init: str, n: int | None) -> list[torch.Tensor]:
    """fp32 CPU [n, dim] per encoder, from init words or an embedding file (init_embedding)."""
    emb = init_embedding(init)
    if emb is not None:
        if emb.dims != list(sd.embedding_dims):
            raise UserError(f"--init {mismatch(init, emb, sd)}, or init from words")
        n = n or emb.n_vectors
        if n < emb.n_vectors:
            log.warning("--init %s holds %d vectors but --vectors is %d: only %d of them start the embedding "
                        "(evenly picked, as A1111 does)", init, emb.n_vectors, n, n)
        return [spread(v, n) for v in emb.vectors]
    n = n or 1
    out = []
    for tokenizer, encoder in zip(sd.tokenizers, sd.text_encoders):
        ids = [i for i in tokenizer.tokenize_words(init) if i < tokenizer.vocab_size]
        if not ids:
            raise UserError(f"--init {init!r} tokenizes to nothing: give one or more words that describe the "
                            "concept's kind, e.g. --init cat")
        if len(ids) > n and not out:  # once, for the first text encoder
            log.warning("--init %r is %d tokens but the embedding has %d vector%s: only %d of them start it "
                        "(evenly picked, as A1111 does); pass --vectors %d to start from every one", init, len(ids),
                        n, "s" if n > 1 else "", n, len(ids))
        rows = token_table(encoder)[torch.tensor(ids, device=token_table(encoder).device)]
        out.append(spread(rows.detach().float().cpu().clone(), n))
    return out


def register_token(sd, token: str, n: int) -> int:
    """Register the placeholder (or reuse an earlier registration with the same count) and return
    the row offset of its first vector in the `extra` tensors."""
    tokenizer = sd.tokenizers[0]
    ids = tokenizer.placeholders.get(token) if hasattr(tokenizer, "placeholders") else None
    if ids is None:
        try:
            sd.add_placeholder(token, n)
        except ValueError as e:
            raise UserError(f"--token {token!r}: {e}") from None
        ids = tokenizer.placeholders[token]
    elif len(ids) != n:
        raise UserError(f"token {token!r} is already registered on this model with {len(ids)} vectors, not {n}: "
                        "use another token name or load the model again")
    return ids[0] - tokenizer.vocab_size
