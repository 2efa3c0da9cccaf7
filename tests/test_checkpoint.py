from __future__ import annotations

import pickle

import pytest
import torch

from medsr.checkpoint import build_model, default_weights, export_weights, load_checkpoint, load_model, save_checkpoint
from medsr.config import TrainConfig, load_config
from medsr.errors import CheckpointError


def test_round_trip_keeps_weights_and_config(tmp_path):
    config = load_config(None, ["model.features=8", "model.num_res_blocks=1", "scale=4"])
    model = build_model(config)
    save_checkpoint(tmp_path / "a.pt", model, config, epoch=3, iteration=30)
    loaded, loaded_config = load_model(tmp_path / "a.pt")
    assert loaded_config == config and loaded.scale == 4
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path, writer):
    marker = tmp_path / "code_ran"
    hostile = tmp_path / "hostile.pt"
    payload = {"format": "medsr-checkpoint", "version": 1, "payload": _Exploit(marker)}
    if writer == "torch.save":
        torch.save(payload, hostile)
    else:
        with hostile.open("wb") as handle:
            pickle.dump(payload, handle)
    with pytest.raises(CheckpointError, match="refused to load: .*carries code"):
        load_checkpoint(hostile)
    assert not marker.exists()


def test_other_files_and_other_architectures(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="refused to load|not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a medsr checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="weights file not found"):
        load_checkpoint(tmp_path / "missing.pt")
    small = load_config(None, ["model.features=8", "model.num_res_blocks=1"])
    save_checkpoint(tmp_path / "lying.pt", build_model(small), small, 1, 1)
    payload = torch.load(tmp_path / "lying.pt", weights_only=True)
    payload["config"]["model"]["features"] = 16  # config no longer matches the weights
    torch.save(payload, tmp_path / "lying.pt")
    with pytest.raises(CheckpointError, match="do not fit the SRResNet"):
        load_model(tmp_path / "lying.pt")


@pytest.mark.parametrize("scale", [2, 4])
def test_shipped_default_weights_load_offline_and_name_no_machine(scale):
    model, config = load_model(default_weights(scale))
    assert model.scale == config.scale == scale
    payload = load_checkpoint(default_weights(scale))
    assert set(payload) == {"format", "version", "config", "model", "epoch", "iteration"}
    assert (config.data_root, config.cache_dir) == (TrainConfig().data_root, TrainConfig().cache_dir)
    with pytest.raises(CheckpointError, match=r"no shipped weights for scale 3 \(shipped: \[2, 4\]\)"):
        default_weights(3)


def test_exported_weights_keep_the_model_and_drop_training_state_and_paths(tmp_path):
    config = load_config(None, ["model.features=8", "model.num_res_blocks=1",
                                f"data_root={tmp_path / 'private' / 'scans'}", f"cache_dir={tmp_path / 'cache'}"])
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters())
    save_checkpoint(tmp_path / "last.pt", model, config, 7, 700, optimizer=optimizer.state_dict())
    export_weights(tmp_path / "last.pt", tmp_path / "public.pt")
    exported = load_checkpoint(tmp_path / "public.pt")
    assert "optimizer" not in exported and (exported["epoch"], exported["iteration"]) == (7, 700)
    assert str(tmp_path) not in (tmp_path / "public.pt").read_bytes().decode("latin-1")
    assert exported["config"].model == config.model and exported["config"].data_root == "scans"
    reloaded, _ = load_model(tmp_path / "public.pt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor)
