"""The CLIP BPE tokenizer, built on the `tokenizers` package, plus textual-inversion placeholders.

One class serves every text encoder: SD 1.x / SDXL CLIP-L pad with EOS (49407), the OpenCLIP
towers (SD 2.x ViT-H, SDXL bigG) pad with 0; the vocabulary is the same 49408 tokens.

Text cleaning follows transformers' CLIPTokenizer (what diffusers and ComfyUI use): NFC,
whitespace runs -> one space, lower case. open_clip.tokenize additionally runs ftfy.fix_text and
html.unescape, so the two differ on mojibake, curly quotes, full-width letters, ligatures and
html entities ("&amp;"); there minti gives transformers' ids.

Placeholders (the words being learned) are matched case-sensitively on the raw text as whole
words (diffusers registers them as added tokens the same way, case-sensitively; A1111 matches
the lower-cased token ids instead). Each occurrence expands to n ids >= vocab_size whose vectors
the text encoder takes from its `extra_embeddings`.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
CONTEXT_LENGTH = 77
# CLIP's pre-tokenizer pattern: specials, English contractions, letter runs, single digits, punctuation runs
_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (the first 256 vocabulary entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def openclip_vocab_path() -> Path:
    """Where the open-clip-torch package keeps bpe_simple_vocab_16e6.txt.gz (found, not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the CLIP BPE vocabulary ships with open-clip-torch: pip install open-clip-torch")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the open-clip-torch install")
    return path


def _vocab_from_openclip_gz(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    # Same construction as CLIP's SimpleTokenizer: 256 byte symbols, the same with the
    # end-of-word marker, one entry per merge, then the two specials (ids 49406, 49407).
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def _vocab_from_folder(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = []
    for line in (folder / "merges.txt").read_text(encoding="utf-8").split("\n"):
        if line.startswith("#version") or not line.strip():
            continue
        merges.append(tuple(line.split()))
    return vocab, merges


class Tokenizer:
    """CLIP tokenizer: encode(texts) -> LongTensor [B, 77] = BOS, <=75 ids, EOS, padding."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token_id: int,
                 source: str, context_length: int = CONTEXT_LENGTH):
        self.source = source  # where the vocabulary came from, for `minti inspect`
        self.pad_token_id = pad_token_id
        self.context_length = context_length
        self._vocab_size = len(vocab)
        tok = _HFTokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                               end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        # "<|endoftext|>" typed in a prompt is the special id, as in both reference tokenizers
        tok.add_special_tokens([AddedToken(BOS, normalized=False), AddedToken(EOS, normalized=False)])
        self._tok = tok
        self.bos_token_id = tok.token_to_id(BOS)
        self.eos_token_id = tok.token_to_id(EOS)
        # placeholder string -> its ids; and the tokenizers-internal id of each placeholder -> its ids
        self.placeholders: dict[str, list[int]] = {}
        self._expand: dict[int, list[int]] = {}

    @classmethod
    def from_openclip_vocab(cls, pad_token_id: int) -> Tokenizer:
        """The vocabulary of single-file checkpoints (they carry none): open-clip-torch's BPE file."""
        path = openclip_vocab_path()
        vocab, merges = _vocab_from_openclip_gz(path)
        return cls(vocab, merges, pad_token_id, source=f"open-clip-torch {path.name}")

    @classmethod
    def from_folder(cls, path: str | Path, pad_token_id: int) -> Tokenizer:
        """A diffusers `tokenizer/` (or `tokenizer_2/`) folder holding vocab.json and merges.txt."""
        folder = Path(path)
        vocab, merges = _vocab_from_folder(folder)
        return cls(vocab, merges, pad_token_id, source=str(folder))

    @property
    def vocab_size(self) -> int:
        """Size of the BPE vocabulary (49408); placeholder ids start at or above it."""
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary entry ("cat</w>", "<|endoftext|>"), or None."""
        i = self._tok.token_to_id(token)
        return i if i is not None and i < self._vocab_size else None

    def tokenize_words(self, text: str) -> list[int]:
        """Ids of `text` without BOS/EOS/padding/truncation, e.g. for an init text."""
        return self._ids(text)

    def add_placeholder(self, token: str, n_vectors: int, first_id: int) -> list[int]:
        """Make `token` expand to ids first_id..first_id+n_vectors-1 in every later encode()."""
        if not token or token != token.strip() or any(c.isspace() for c in token):
            raise ValueError(f"placeholder {token!r} must be one word without whitespace")
        if n_vectors < 1:
            raise ValueError(f"placeholder {token!r} needs at least one vector, got {n_vectors}")
        if first_id < self._vocab_size:
            raise ValueError(f"placeholder ids must be >= vocab_size {self._vocab_size}, got {first_id}")
        if token in self.placeholders:
            raise ValueError(f"placeholder {token!r} is already registered")
        existing = self._ids(token)
        if len(existing) == 1:
            # a word the model already knows: training would silently shadow it in every prompt
            word = self._tok.id_to_token(existing[0])
            raise ValueError(f"placeholder {token!r} is already the vocabulary word {word!r} "
                             f"(id {existing[0]}); pick a string the tokenizer splits, e.g. '<{token}>'")
        ids = list(range(first_id, first_id + n_vectors))
        taken = {i for v in self.placeholders.values() for i in v}
        if taken.intersection(ids):
            raise ValueError(f"placeholder ids {ids} overlap ids already given to {list(self.placeholders)}")
        # single_word: match only where not inside a longer word; normalized=False: case-sensitive
        self._tok.add_tokens([AddedToken(token, single_word=True, normalized=False)])
        self._expand[self._tok.token_to_id(token)] = ids
        self.placeholders[token] = ids
        return ids

    def _ids(self, text: str) -> list[int]:
        out: list[int] = []
        for i in self._tok.encode(text, add_special_tokens=False).ids:
            out.extend(self._expand.get(i, (i,)))
        return out

    def encode(self, texts: list[str]) -> torch.LongTensor:
        """[B, 77]: BOS, the first 75 ids (placeholders expanded, then truncated), EOS, pad."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings")
        n = self.context_length - 2
        out = torch.full((len(texts), self.context_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos_token_id] + self._ids(text)[:n] + [self.eos_token_id]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
