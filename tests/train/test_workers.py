"""The weights of a fine-tune do not depend on the number of data-loading processes: each image's
augmentation is drawn from (seed, epoch, index), not from whichever worker loads it."""

import copy
import random

import numpy as np
import torch

import retrofit
from retrofit.train.data import SampleKey, sample_rng
from support import make_folder, se_model


def test_no_workers_and_two_workers_give_bitwise_the_same_weights(tmp_path):
    data = make_folder(tmp_path / "data")
    start = se_model()
    runs = {}
    for workers in (0, 2):
        model = copy.deepcopy(start)
        result = retrofit.finetune(
            model, data, epochs=2, batch_size=8, lr=1e-2, workers=workers, mixup=0.2, restore_best=False
        )  # augmentation on (the default), mixup in the main process
        runs[workers] = [r["train_loss"] for r in result.rows], model.state_dict()
    (losses0, state0), (losses2, state2) = runs[0], runs[2]
    assert losses0 == losses2 and losses0[-1] is not None
    assert state0.keys() == state2.keys()
    different = [k for k in state0 if not torch.equal(state0[k], state2[k])]
    assert different == []
    assert any(not torch.equal(state0[k], start.state_dict()[k]) for k in state0)  # it trained


def test_sample_rng_draws_from_the_key_and_leaves_the_global_generators_as_they_were():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    with sample_rng(SampleKey(7, 0, 1)):
        first = draws()
    with sample_rng(SampleKey(7, 0, 1)):
        again = draws()
    with sample_rng(SampleKey(7, 0, 2)):  # another epoch: other draws
        other = draws()
    assert first == again and first != other
    assert random.getstate() == before[0] and (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])
