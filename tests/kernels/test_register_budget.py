"""The register budget is data (kernels/register_budget.json): the kernels read it at import,
`bench/compile_targets.py --derive` writes it, and moving it there changed no entry."""
import json
import shutil

import pytest

import minti.kernels.configs as configs

# The table as it stood in kernels/flash_attention.py before it moved to the data file
# (measured on sm_75/86/90/120, five fp32 entries lowered and two added by hand after the sweep).
TABLE_IN_CODE = {
    "sm_75": {
        "half": {
            "fwd": {(64, 32, 4, 2): 48, (16, 32, 4, 1): 160, (16, 16, 8, 1): 160},
            "bwd_dkdv": {(32, 32, 4, 2): 48, (16, 16, 8, 1): 160, (16, 16, 4, 2): 80},
            "bwd_dq": {(32, 32, 4, 2): 48, (16, 16, 8, 1): 160},
        },
        "fp32": {
            "fwd": {(64, 32, 4, 2): 48, (32, 32, 4, 2): 64, (16, 32, 4, 1): 80, (16, 16, 8, 1): 160},
            "bwd_dkdv": {(32, 32, 4, 2): 48, (16, 32, 4, 2): 80, (16, 32, 8, 1): 64, (16, 16, 8, 1): 160},
            "bwd_dq": {(32, 32, 4, 2): 48, (16, 16, 8, 1): 160},
        },
    },
    "sm_8x": {
        "half": {
            "fwd": {(128, 64, 8, 3): 64, (128, 32, 4, 3): 80, (64, 32, 4, 2): 160, (32, 32, 4, 2): 160,
                    (16, 32, 4, 1): 160, (16, 16, 8, 1): 160},
            "bwd_dkdv": {(32, 64, 4, 2): 80, (32, 32, 4, 2): 80, (16, 32, 4, 2): 160, (16, 32, 8, 1): 80,
                         (16, 16, 8, 1): 160, (16, 16, 4, 2): 160},
            "bwd_dq": {(128, 32, 8, 2): 80, (64, 64, 8, 2): 80, (64, 32, 4, 2): 80, (32, 32, 4, 2): 160,
                       (16, 16, 8, 1): 160},
        },
        "fp32": {
            "fwd": {(32, 32, 4, 2): 80, (16, 32, 4, 1): 80, (16, 16, 8, 1): 80, (16, 16, 4, 1): 160},
            "bwd_dkdv": {(16, 32, 4, 2): 80, (16, 16, 8, 1): 160, (16, 16, 4, 2): 160},
            "bwd_dq": {(32, 32, 4, 2): 80, (16, 16, 8, 1): 160},
        },
    },
    "sm_90": {
        "half": {
            "fwd": {(128, 64, 8, 3): 160, (128, 32, 4, 3): 80, (64, 32, 4, 2): 160, (32, 32, 4, 2): 160,
                    (16, 32, 4, 1): 160, (16, 16, 8, 1): 160},
            "bwd_dkdv": {(64, 64, 8, 2): 80, (32, 64, 4, 2): 64, (16, 32, 4, 2): 160, (16, 32, 8, 1): 160,
                         (16, 16, 8, 1): 160, (16, 16, 4, 2): 160},
            "bwd_dq": {(128, 32, 8, 2): 160, (64, 64, 8, 2): 160, (64, 32, 4, 2): 160, (32, 32, 4, 2): 160,
                       (16, 16, 8, 1): 160},
        },
        "fp32": {
            "fwd": {(32, 32, 4, 2): 80, (16, 32, 4, 1): 80, (16, 16, 8, 1): 160},
            "bwd_dkdv": {(16, 32, 4, 2): 80, (16, 32, 8, 1): 64, (16, 16, 8, 1): 80, (16, 16, 4, 2): 160},
            "bwd_dq": {(128, 32, 8, 2): 48, (64, 64, 8, 2): 48, (32, 32, 4, 2): 80, (16, 16, 8, 1): 160},
        },
    },
    "sm_120": {
        "half": {
            "fwd": {(128, 64, 8, 3): 64, (128, 32, 4, 3): 48, (64, 32, 4, 2): 160, (32, 32, 4, 2): 160,
                    (16, 32, 4, 1): 160, (16, 16, 8, 1): 160},
            "bwd_dkdv": {(16, 32, 4, 2): 160, (16, 32, 8, 1): 80, (16, 16, 8, 1): 160, (16, 16, 4, 2): 160},
            "bwd_dq": {(128, 32, 8, 2): 80, (64, 64, 8, 2): 80, (32, 32, 4, 2): 160, (16, 16, 8, 1): 160},
        },
        "fp32": {
            "fwd": {(32, 32, 4, 2): 80, (16, 32, 4, 1): 160, (16, 16, 8, 1): 48, (16, 16, 4, 1): 160},
            "bwd_dkdv": {(32, 32, 4, 2): 64, (16, 32, 4, 2): 64, (16, 32, 8, 1): 160, (16, 16, 8, 1): 48},
            "bwd_dq": {(32, 32, 4, 2): 80, (16, 16, 8, 1): 160},
        },
    },
}


def test_the_loaded_budget_is_the_table_that_was_in_the_code_entry_for_entry():
    assert configs.WIDEST_CLEAN == TABLE_IN_CODE
    assert configs.load_register_budget().table() == TABLE_IN_CODE


def test_the_hand_edits_after_the_sweep_are_overrides_with_their_reason():
    budget = configs.load_register_budget()
    assert len(budget.overrides) == 7 and all(o["reason"] for o in budget.overrides)
    lowered = {(o["class"], o["kind"], o["config"]): o["widest"] for o in budget.overrides if "spill" in o["reason"]}
    assert lowered == {("sm_8x", "fwd", "16x32 w4 s1"): 80, ("sm_90", "fwd", "16x32 w4 s1"): 80,
                       ("sm_8x", "fwd", "64x32 w4 s2"): 0, ("sm_90", "bwd_dkdv", "64x64 w8 s2"): 0,
                       ("sm_90", "bwd_dkdv", "32x64 w4 s2"): 0}
    assert all(o["operand"] == "fp32" for o in budget.overrides)


def test_the_budget_file_is_what_its_writer_writes_back():
    text = configs.REGISTER_BUDGET_FILE.read_text()
    assert configs.load_register_budget().dumps() == text
    assert json.loads(text)["overrides"]  # plain JSON, overrides included


def test_a_new_measurement_replaces_its_rows_and_keeps_the_others_and_the_overrides(tmp_path):
    path = tmp_path / "budget.json"
    shutil.copy(configs.REGISTER_BUDGET_FILE, path)
    old = configs.load_register_budget(path)
    # a re-measured sm_8x fp32 where everything compiled clean at 160, one config nowhere
    rows = {"sm_8x": {"fp32": {kind: {c: 160 for c in candidates} for kind, candidates in configs.ATTENTION_CONFIGS.items()}}}
    rows["sm_8x"]["fp32"]["fwd"][(128, 64, 8, 3)] = 0
    path.write_text(old.with_measured(rows).dumps())
    new = configs.load_register_budget(path)
    assert new.overrides == old.overrides and new.about == old.about
    table = new.table()
    assert table["sm_75"] == TABLE_IN_CODE["sm_75"] and table["sm_8x"]["half"] == TABLE_IN_CODE["sm_8x"]["half"]
    fwd = table["sm_8x"]["fp32"]["fwd"]
    assert (128, 64, 8, 3) not in fwd and (128, 64, 8, 3) not in new.measured["sm_8x"]["fp32"]["fwd"]
    assert fwd[(16, 32, 4, 1)] == 80 and (64, 32, 4, 2) not in fwd  # the overrides still apply
    assert fwd[(32, 32, 4, 2)] == 160 and new.measured["sm_8x"]["fp32"]["fwd"][(16, 32, 4, 1)] == 160


@pytest.mark.parametrize("name,config", [("128x64 w8 s3", (128, 64, 8, 3)), ("16x16 w4 s1", (16, 16, 4, 1))])
def test_config_names_read_back_to_the_same_config(name, config):
    assert configs.config_name(config) == name and configs.parse_config(name) == config
    with pytest.raises(ValueError, match="not a config name"):
        configs.parse_config("128x64 8 3")
