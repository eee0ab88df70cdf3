"""TrainResult keeps a bounded history: memory must not grow with the run length."""

from tti_dist.train.trainer import RESULT_HISTORY, TrainResult


def test_losses_keep_the_most_recent_steps_only():
    result = TrainResult(final_step=0)
    for step in range(1, RESULT_HISTORY + 6):
        result.record(result.losses, step, float(step))
    assert len(result.losses) == RESULT_HISTORY
    assert min(result.losses) == 6 and max(result.losses) == RESULT_HISTORY + 5
    assert result.losses[RESULT_HISTORY + 5] == RESULT_HISTORY + 5.0
    result.record(result.eval_losses, 25, 1.5)
    assert result.eval_losses == {25: 1.5}
