"""SweepRow composed of its parts (issue 23, item 5): cost, latency, accuracy and finalist, each None when not
measured; its JSON unchanged key for key. EXPECTED is the JSON of the same rows made by the code before the parts
(the flat 33-field SweepRow of commit 802957e, dumped with json.dumps(row.to_dict())), stored here as it printed."""

import json

import pytest

from retrofit.surgery.recipe import Recipe
from retrofit.sweep.rows import Accuracy, Cost, Finalist, Latency, SweepRow

ROWS = {
    "cost": lambda: SweepRow("post", 16.0, (3, 4), Cost(7, 1234, 0.5, 5678, 0.25, 900, skipped=1)),
    "note": lambda: SweepRow("identity", 4.0, (2,), note="no site"),
    "latency": lambda: SweepRow(
        "standard",
        Recipe(r="2:8,5:32").r,
        None,
        Cost(16, 100, 1.0, 200, 2.0, 300),
        latency=Latency(1.05, 1.01, 1.09, 12.5, 11.9),
    ),
    "accuracy": lambda: SweepRow(
        "standard",
        8.0,
        None,
        Cost(16, 100, 1.0, 200, 2.0, 300),
        seeds=(0, 1),
        accuracy=Accuracy(
            75.0,
            1.5,
            0.7,
            0.05,
            (74.0, 76.0),
            (0.72, 0.68),
            delta_top1=1.25,
            delta_top1_std=0.5,
            delta_top1_ci=(0.1, 2.4),
            control="full",
            pareto=True,
        ),
    ),
    "control": lambda: SweepRow(
        "",
        0.0,
        None,
        arm="head+norms",
        seeds=(0, 1),
        note="original, head",
        latency=Latency(1.0),
        accuracy=Accuracy(70.0, 0.5, 0.9, 0.1, (69.5, 70.5), (0.8, 1.0)),
    ),
    "failed": lambda: SweepRow(
        "pre", 32.0, None, Cost(16, 50, 0.5, 60, 0.6, 70), seeds=(0,), note="fine-tune failed: nan"
    ),
    "finalist": lambda: SweepRow(
        "identity",
        4.0,
        (5,),
        Cost(3, 10, 0.1, 20, 0.2, 30),
        note="trial 3, lr 1.00e-02",
        finalist=Finalist(
            Recipe(position="identity", r=4, stages=(5,), gate="hard_sigmoid"),
            {"lr": 0.01, "phase2_epochs": 1},
            3,
            "lr 1.00e-02",
        ),
        seeds=(0, 1),
        accuracy=Accuracy(80.0, 0.0, 0.5, 0.0, (80.0, 80.0), (0.5, 0.5)),
    ),
}


# the old rows' JSON, as the code before the parts wrote it (key order included)
EXPECTED = json.loads(r"""{
 "cost": {
  "position": "post",
  "r": 16.0,
  "stages": "3+4",
  "blocks": 7,
  "params": 1234,
  "params_percent": 0.5,
  "macs": 5678,
  "macs_percent": 0.25,
  "pool_scale_ops": 900,
  "skipped": 1,
  "latency": null,
  "latency_low": null,
  "latency_high": null,
  "latency_ms": null,
  "base_latency_ms": null,
  "note": "",
  "arm": "se",
  "seeds": [],
  "top1": null,
  "top1_std": null,
  "val_loss": null,
  "val_loss_std": null,
  "top1_per_seed": [],
  "val_loss_per_seed": [],
  "delta_top1": null,
  "delta_top1_std": null,
  "delta_top1_ci": null,
  "control": null,
  "pareto": false,
  "recipe": null,
  "train": null,
  "trial": null,
  "label": "",
  "r_label": "16"
 },
 "note": {
  "position": "identity",
  "r": 4.0,
  "stages": "2",
  "blocks": 0,
  "params": 0,
  "params_percent": 0.0,
  "macs": 0,
  "macs_percent": 0.0,
  "pool_scale_ops": 0,
  "skipped": 0,
  "latency": null,
  "latency_low": null,
  "latency_high": null,
  "latency_ms": null,
  "base_latency_ms": null,
  "note": "no site",
  "arm": "se",
  "seeds": [],
  "top1": null,
  "top1_std": null,
  "val_loss": null,
  "val_loss_std": null,
  "top1_per_seed": [],
  "val_loss_per_seed": [],
  "delta_top1": null,
  "delta_top1_std": null,
  "delta_top1_ci": null,
  "control": null,
  "pareto": false,
  "recipe": null,
  "train": null,
  "trial": null,
  "label": "",
  "r_label": "4"
 },
 "latency": {
  "position": "standard",
  "r": {
   "default": 16,
   "2": 8,
   "5": 32
  },
  "stages": "all",
  "blocks": 16,
  "params": 100,
  "params_percent": 1.0,
  "macs": 200,
  "macs_percent": 2.0,
  "pool_scale_ops": 300,
  "skipped": 0,
  "latency": 1.05,
  "latency_low": 1.01,
  "latency_high": 1.09,
  "latency_ms": 12.5,
  "base_latency_ms": 11.9,
  "note": "",
  "arm": "se",
  "seeds": [],
  "top1": null,
  "top1_std": null,
  "val_loss": null,
  "val_loss_std": null,
  "top1_per_seed": [],
  "val_loss_per_seed": [],
  "delta_top1": null,
  "delta_top1_std": null,
  "delta_top1_ci": null,
  "control": null,
  "pareto": false,
  "recipe": null,
  "train": null,
  "trial": null,
  "label": "",
  "r_label": "2:8,5:32"
 },
 "accuracy": {
  "position": "standard",
  "r": 8.0,
  "stages": "all",
  "blocks": 16,
  "params": 100,
  "params_percent": 1.0,
  "macs": 200,
  "macs_percent": 2.0,
  "pool_scale_ops": 300,
  "skipped": 0,
  "latency": null,
  "latency_low": null,
  "latency_high": null,
  "latency_ms": null,
  "base_latency_ms": null,
  "note": "",
  "arm": "se",
  "seeds": [
   0,
   1
  ],
  "top1": 75.0,
  "top1_std": 1.5,
  "val_loss": 0.7,
  "val_loss_std": 0.05,
  "top1_per_seed": [
   74.0,
   76.0
  ],
  "val_loss_per_seed": [
   0.72,
   0.68
  ],
  "delta_top1": 1.25,
  "delta_top1_std": 0.5,
  "delta_top1_ci": [
   0.1,
   2.4
  ],
  "control": "full",
  "pareto": true,
  "recipe": null,
  "train": null,
  "trial": null,
  "label": "",
  "r_label": "8"
 },
 "control": {
  "position": "",
  "r": 0.0,
  "stages": null,
  "blocks": 0,
  "params": 0,
  "params_percent": 0.0,
  "macs": 0,
  "macs_percent": 0.0,
  "pool_scale_ops": 0,
  "skipped": 0,
  "latency": 1.0,
  "latency_low": null,
  "latency_high": null,
  "latency_ms": null,
  "base_latency_ms": null,
  "note": "original, head",
  "arm": "head+norms",
  "seeds": [
   0,
   1
  ],
  "top1": 70.0,
  "top1_std": 0.5,
  "val_loss": 0.9,
  "val_loss_std": 0.1,
  "top1_per_seed": [
   69.5,
   70.5
  ],
  "val_loss_per_seed": [
   0.8,
   1.0
  ],
  "delta_top1": null,
  "delta_top1_std": null,
  "delta_top1_ci": null,
  "control": null,
  "pareto": false,
  "recipe": null,
  "train": null,
  "trial": null,
  "label": "",
  "r_label": "0"
 },
 "failed": {
  "position": "pre",
  "r": 32.0,
  "stages": "all",
  "blocks": 16,
  "params": 50,
  "params_percent": 0.5,
  "macs": 60,
  "macs_percent": 0.6,
  "pool_scale_ops": 70,
  "skipped": 0,
  "latency": null,
  "latency_low": null,
  "latency_high": null,
  "latency_ms": null,
  "base_latency_ms": null,
  "note": "fine-tune failed: nan",
  "arm": "se",
  "seeds": [
   0
  ],
  "top1": null,
  "top1_std": null,
  "val_loss": null,
  "val_loss_std": null,
  "top1_per_seed": [],
  "val_loss_per_seed": [],
  "delta_top1": null,
  "delta_top1_std": null,
  "delta_top1_ci": null,
  "control": null,
  "pareto": false,
  "recipe": null,
  "train": null,
  "trial": null,
  "label": "",
  "r_label": "32"
 },
 "finalist": {
  "position": "identity",
  "r": 4.0,
  "stages": "5",
  "blocks": 3,
  "params": 10,
  "params_percent": 0.1,
  "macs": 20,
  "macs_percent": 0.2,
  "pool_scale_ops": 30,
  "skipped": 0,
  "latency": null,
  "latency_low": null,
  "latency_high": null,
  "latency_ms": null,
  "base_latency_ms": null,
  "note": "trial 3, lr 1.00e-02",
  "arm": "se",
  "seeds": [
   0,
   1
  ],
  "top1": 80.0,
  "top1_std": 0.0,
  "val_loss": 0.5,
  "val_loss_std": 0.0,
  "top1_per_seed": [
   80.0,
   80.0
  ],
  "val_loss_per_seed": [
   0.5,
   0.5
  ],
  "delta_top1": null,
  "delta_top1_std": null,
  "delta_top1_ci": null,
  "control": null,
  "pareto": false,
  "recipe": {
   "position": "identity",
   "r": 4,
   "squeeze": "avg",
   "gate": "hard_sigmoid",
   "stages": [
    5
   ],
   "divisor": 1,
   "min_width": 1,
   "bias": true,
   "init": "preserve",
   "module": "se",
   "kinds": null,
   "only": null,
   "skip": null
  },
  "train": {
   "lr": 0.01,
   "phase2_epochs": 1
  },
  "trial": 3,
  "label": "lr 1.00e-02",
  "r_label": "4"
 }
}""")


@pytest.mark.parametrize("kind", sorted(ROWS))
def test_the_json_of_a_row_is_as_before_the_parts(kind):
    row = ROWS[kind]()
    assert json.dumps(row.to_dict()) == json.dumps(EXPECTED[kind])  # values and key order


def test_a_part_not_measured_is_none_and_its_flat_names_read_empty():
    row = ROWS["cost"]()
    assert (row.latency, row.accuracy, row.finalist) == (None, None, None)
    assert (row.top1, row.top1_per_seed, row.pareto, row.trial, row.label, row.latency_low) == (
        None,
        (),
        False,
        None,
        "",
        None,
    )
    assert row.params == row.cost.params == 1234
    control = ROWS["control"]()
    assert control.cost is None and control.params == 0 and control.latency.ratio == 1.0
    assert ROWS["finalist"]().recipe.gate == "hard_sigmoid"


def test_a_flat_name_cannot_be_set_or_given():
    row = ROWS["cost"]()
    with pytest.raises(AttributeError):
        row.params = 1
    with pytest.raises(TypeError):
        SweepRow("post", 16.0, None, params=5)
