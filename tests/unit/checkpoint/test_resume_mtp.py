"""--resume and multi-token prediction: `model.mtp_layers` changes the parameter set, so a resume
that changes it is a structural difference (refused); `model.mtp_loss_weight` is free, as
DeepSeek-V3 lowered it mid-run; a checkpoint from before the keys existed resumes unchanged."""

from __future__ import annotations

from moe_dist.checkpoint.training.resume import config_differences


def _config(**model):
    return {"model": {"n_layers": 2, **model}, "moe": {"num_experts": 4}, "train": {"micro_batch": 1,
                                                                                    "grad_accum": 1}}


def test_mtp_layers_is_structural_and_its_weight_free():
    stored = _config(mtp_layers=1, mtp_loss_weight=0.3)
    assert config_differences(stored, _config(mtp_layers=1, mtp_loss_weight=0.1)) == ([], [])
    structural, _ = config_differences(stored, _config(mtp_layers=0, mtp_loss_weight=0.3))
    assert structural == ["model.mtp_layers: 1 -> 0"]
    assert config_differences(_config(), _config(mtp_layers=0, mtp_loss_weight=0.3)) == ([], [])
