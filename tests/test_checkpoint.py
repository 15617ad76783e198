"""model.py checkpoints (issue 10): atomic writes, clear errors for truncated or foreign files, RNG states.

Run:  pytest -q tests/test_checkpoint.py
"""
import os
import pickle
import random

import numpy as np
import pytest
import torch

import engine
import model as M

CFG = M.GMAEConfig(img_size=16, patch_size=4, enc_dim=32, enc_depth=1, enc_heads=2, dec_dim=32, dec_depth=1,
                   dec_heads=2, num_gaussians=8)


def _write(path):
    torch.manual_seed(0)
    net = M.GMAE(CFG)
    opt = torch.optim.AdamW(net.parameters())
    engine.save_checkpoint(str(path), net, opt, CFG, epoch=2, step=30, extra={"epoch_step": 5})
    return net


def test_round_trip_keeps_weights_and_extra_entries(tmp_path):
    net = _write(tmp_path / "c.pt")
    loaded, ckpt = engine.load_checkpoint(str(tmp_path / "c.pt"))
    assert ckpt["config"] == CFG and (ckpt["epoch"], ckpt["step"], ckpt["epoch_step"]) == (2, 30, 5)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    assert os.listdir(tmp_path) == ["c.pt"]  # no .tmp left behind


@pytest.mark.parametrize("cut", [0, 100, 0.5, -10])
def test_truncated_checkpoint_is_a_clear_error(tmp_path, cut):
    _write(tmp_path / "c.pt")
    raw = (tmp_path / "c.pt").read_bytes()
    n = int(len(raw) * cut) if isinstance(cut, float) else cut % len(raw)
    (tmp_path / "cut.pt").write_bytes(raw[:n])
    with pytest.raises(engine.CheckpointError, match="cannot be read as a checkpoint: a cut or damaged torch file") as err:
        engine.read_checkpoint(str(tmp_path / "cut.pt"))
    assert str(tmp_path / "cut.pt") in str(err.value) and "\n" not in str(err.value)


def test_foreign_files_are_clear_errors(tmp_path):
    (tmp_path / "text.pt").write_text("hello")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    torch.save({"model": {}, "config": {"img_size": 18}}, tmp_path / "badcfg.pt")
    with pytest.raises(engine.CheckpointError, match="it is not a file written by torch.save; pass the checkpoint.pt"):
        engine.read_checkpoint(str(tmp_path / "text.pt"))
    with pytest.raises(engine.CheckpointError, match="not a checkpoint written by train.py"):
        engine.read_checkpoint(str(tmp_path / "other.pt"))
    with pytest.raises(engine.CheckpointError, match="invalid config: image size 18 is not divisible"):
        engine.read_checkpoint(str(tmp_path / "badcfg.pt"))


class _Payload:
    """A pickle that would create a file when loaded (what a malicious checkpoint could do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": _Payload(str(marker)), "config": {}}, f, protocol=2)
    with pytest.raises(engine.CheckpointError):
        engine.read_checkpoint(str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _write(tmp_path / "c.pt")
    before = (tmp_path / "c.pt").read_bytes()

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(M.torch, "save", dies_half_way)
    with pytest.raises(engine.OutputError, match=r"could not write .*c.pt: No space left on device; nothing there was"):
        _write(tmp_path / "c.pt")
    assert (tmp_path / "c.pt").read_bytes() == before and not (tmp_path / "c.pt.tmp").exists()  # no junk left
    monkeypatch.undo()
    assert engine.read_checkpoint(str(tmp_path / "c.pt"))["step"] == 30


def test_rng_states_survive_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    net = M.GMAE(CFG)
    engine.save_checkpoint(str(tmp_path / "c.pt"), net, torch.optim.SGD(net.parameters(), lr=0.1), CFG, 0, 0,
                      extra={"rng": engine.rng_states()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    engine.set_rng_states(engine.read_checkpoint(str(tmp_path / "c.pt"))["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
