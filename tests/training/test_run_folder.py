"""minti.training.run_folder: the file names a run writes come from the one table of embedding
formats (minti.training.embedding.FORMATS). The run's other behaviour (saves, resume, refusing
foreign files) is tested through train() in test_trainer.py and test_report.py."""
import re

import torch

from minti.training.embedding import Embedding
from minti.training.run_folder import RunFolder, run_files


def test_a_run_names_its_embedding_files_as_a_folder_save_does_and_claims_them_as_its_own(tmp_path):
    for emb in (Embedding("<my-cat>", [torch.zeros(2, 32)]), Embedding("<xl>", [torch.zeros(2, 32), torch.zeros(2, 48)])):
        written = sorted(p.name for p in emb.save(tmp_path / emb.name))
        assert sorted(p.name for p in RunFolder(tmp_path / "run").embedding_files(emb)) == written
        patterns = [re.compile(p) for p in run_files(emb.name)]
        assert all(any(p.fullmatch(name) for p in patterns) for name in written), written
