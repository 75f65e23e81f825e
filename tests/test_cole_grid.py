"""sweeps/cole_grid.yaml: Cole et al.'s learning-rate x batch-size grid (ALGORITHMS.md 2c) as a ``vlpl sweep`` file,
and the recipes of the remaining Cole baselines (configs/methods/{iun,iu,pr}.yaml)."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlpl.sweep import _train_config, load_sweep

REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "sweeps" / "cole_grid.yaml"


@pytest.mark.parametrize("method, dataset, loss", [("an", "coco2014", "an"), ("role", "voc2012", "role"),
                                                    ("pr", "cub", "pr"), ("iun", "nuswide", "iun")])
def test_cole_grid_is_the_papers_eight_runs(tmp_path, method, dataset, loss):
    sweep = load_sweep(GRID, [f"store={tmp_path / 'store'}", f"method={method}", f"dataset={dataset}",
                              f"work={tmp_path / 'w'}"])
    cfgs = [_train_config(v) for v in sweep.variants]
    grid = sorted((c.optim.lr, c.batch_size) for c in cfgs)
    assert grid == sorted((lr, bs) for lr in (1e-2, 1e-3, 1e-4, 1e-5) for bs in (8, 16))
    for c in cfgs:  # the recipe's row, one lr for every parameter (Cole's Adam), 10 end-to-end epochs
        assert (c.method, c.dataset, c.loss.name, c.optim.name, c.optim.head_lr) == (method, dataset, loss, "adam", None)
        assert c.epochs == 10 and c.phases.linear_init_epochs == 0 and not c.phases.freeze_backbone
        assert c.phases.linear_init_lr is None
    assert len({v.out for v in sweep.variants}) == 8 and all(v.out.parent == tmp_path / "w" for v in sweep.variants)


def test_cole_grid_linear_init_and_fixed_features_modes(tmp_path):
    common = [f"store={tmp_path / 'store'}", "method=an_ls", "dataset=voc2012", f"work={tmp_path}"]
    li = [_train_config(v) for v in load_sweep(GRID, [*common, "linear_init=25", "linear_init_lr=1e-4",
                                                      "epochs=35"]).variants]
    assert all(c.epochs == 35 and c.phases.linear_init_epochs == 25 and not c.phases.freeze_backbone for c in li)
    assert all(c.phases.linear_init_lr == 1e-4 and c.phases.reset_optimizer for c in li)
    assert sorted(c.optim.lr for c in li) == sorted([1e-2, 1e-3, 1e-4, 1e-5] * 2)  # the grid tunes phase 2
    fixed = [_train_config(v) for v in load_sweep(GRID, [*common, "freeze=true", "epochs=25"]).variants]
    assert all(c.epochs == 25 and c.phases.freeze_backbone for c in fixed)
