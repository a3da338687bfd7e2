"""minti.training.placeholder: whether --init names a file or words (the token's registration and
initial vectors run in every training test: tests/training/test_trainer.py, test_sdxl.py)."""
from minti.training.data import IMAGE_EXTENSIONS
from minti.training.embedding import EMBEDDING_SUFFIXES
from minti.training.placeholder import looks_like_a_path


def test_init_phrases_with_a_slash_are_words_and_single_slashed_words_or_real_paths_are_files(tmp_path):
    (tmp_path / "my embeddings").mkdir()
    (tmp_path / "my embeddings" / "dog").write_bytes(b"")
    for words in ("a black/white cat", "cat", "red and/or blue"):
        assert not looks_like_a_path(words), words
    for path in ("embeddings/dog", "dog.pt", "C:\\sd\\dog", "my dog.safetensors", str(tmp_path / "my embeddings" / "dog")):
        assert looks_like_a_path(path), path


def test_every_file_an_embedding_or_image_can_be_is_an_init_file_not_words():
    for suffix in (*EMBEDDING_SUFFIXES, *IMAGE_EXTENSIONS, ".sft", ".SAFETENSORS"):
        assert looks_like_a_path(f"dog{suffix}"), suffix
    assert not looks_like_a_path("dog.cat")
