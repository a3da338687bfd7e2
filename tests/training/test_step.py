"""minti.training.step: the loss scaler and what a diverged loss says (the step itself runs in
every training test, tests/training/test_trainer.py and test_train_many.py)."""
from minti.training.step import LossDiverged, LossScaler


def test_loss_scaler_backs_off_and_grows():
    s = LossScaler(2.0 ** 16, growth_interval=2)
    s.update(False)
    assert s.scale == 2.0 ** 15
    s.update(True)
    s.update(True)
    assert s.scale == 2.0 ** 16
    off = LossScaler(None)
    off.update(False)
    assert not off.enabled and off.scale is None


def test_a_loss_that_is_never_finite_under_loss_scaling_blames_the_weights_not_the_lr():
    error = LossDiverged(float("nan")).user_error(step=16, resumed_at=0, folder=None, kept=None)
    assert "before any update and still at step 17 with the loss scale down to 1" in str(error)
    assert "check the checkpoint" in str(error) and "resuming" not in str(error)
