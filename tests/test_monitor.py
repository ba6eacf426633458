"""What a run shows: the collapse watch."""
import numpy as np

from dinokit.train.monitor import CollapseWatch


def test_collapse_watch_names_each_collapse():
    k = 1000
    watch = CollapseWatch(k, patience=3)
    uniform_m = dict(kl=1e-5, teacher_entropy=0.99 * np.log(k), batch_entropy=np.log(k))
    assert [watch.update(uniform_m) for _ in range(2)] == [None, None]
    assert "uniform" in watch.update(uniform_m)
    one = dict(kl=1e-5, teacher_entropy=0.01, batch_entropy=0.01)
    watch = CollapseWatch(k, patience=3)
    msgs = [watch.update(one) for _ in range(3)]
    assert msgs[-1] and "same prototype" in msgs[-1]
    healthy = dict(kl=0.5, teacher_entropy=2.0, batch_entropy=6.0)
    watch = CollapseWatch(k, patience=3)
    assert all(watch.update(healthy) is None for _ in range(10))
