"""The excitation statistics (retrofit.measure.excitation) against a hand computation on a tiny model:
one SE block on the first convolution's output, its input and gate written out here."""

import torch
from torch import nn

import retrofit
from retrofit.measure.excitation import Recorder, replaced
from retrofit.surgery.fold import gates


class Tiny(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.num_classes = classes
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def tiny_se(seed=0):
    torch.manual_seed(seed)
    model = retrofit.add_se(Tiny().double(), input_size=(3, 16, 16), at=["features.0"], r=2).eval()
    block = model.get_submodule(gates(model)[0][0].path)
    with torch.no_grad():
        block.fc1.weight.normal_()  # input-dependent
        block.fc2.weight.mul_(4)
    return model, block


def by_hand(model, block, x):
    """(block input, raw gate) computed from the weights, not by the block."""
    u = model.features[0](x)
    z = u.mean((2, 3))
    h = torch.relu(z @ block.fc1.weight[:, :, 0, 0].T + block.fc1.bias)
    g = torch.sigmoid(h @ block.fc2.weight[:, :, 0, 0].T + block.fc2.bias)
    return u, g


def test_statistics_against_the_hand_computation():
    model, block = tiny_se()
    g_ = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(5, 3, 16, 16, generator=g_, dtype=torch.float64), torch.tensor(t))
        for t in ([0, 1, 2, 0, 1], [2, 2, 0, 1, 0])
    ]
    with torch.no_grad(), Recorder(model, gates(model)[0], classes=3) as rec:
        for x, y in batches:
            rec.targets = y
            model(x)
    (r,) = rec.reports()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        u, g = by_hand(model, block, x)
    mean_c = g.mean(0)
    class_means = torch.stack([g[y == k].mean(0) for k in range(3)])
    e = (u * u).sum((2, 3))
    local = ((g - mean_c) ** 2 * e).sum().sqrt() / ((g**2) * e).sum().sqrt()
    assert abs(r.mean - g.mean().item()) < 1e-12
    assert abs(r.image_spread - g.std(0, unbiased=False).mean().item()) < 1e-12
    assert abs(r.class_spread - class_means.std(0, unbiased=False).mean().item()) < 1e-12
    assert abs(r.local_change - local.item()) < 1e-12
    assert r.saturated == (mean_c >= 0.95).double().mean().item()
    torch.testing.assert_close(torch.tensor(r.channel_means, dtype=torch.float64), mean_c, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.tensor(r.class_means, dtype=torch.float64), class_means, rtol=0, atol=1e-12)
    torch.testing.assert_close(r.scale, mean_c / 0.5, rtol=0, atol=1e-12)  # preserve init: gate origin 0.5
    assert r.local_change > 0.01 and r.class_spread > 0  # the test would not tell zero from a broken sum


def test_a_constant_gate_has_exactly_zero_spread_and_change():
    model, block = tiny_se()
    with torch.no_grad():
        block.fc1.weight.zero_()
    with torch.no_grad(), Recorder(model, gates(model)[0], classes=3) as rec:
        for k in range(3):
            rec.targets = torch.tensor([k, (k + 1) % 3])
            model(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    (r,) = rec.reports()
    assert (r.image_spread, r.class_spread, r.local_change) == (0.0, 0.0, 0.0)


def test_replaced_gives_the_mean_scale_for_every_image():
    model, block = tiny_se()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        u, g = by_hand(model, block, x)
        mean = g.mean(0)
        with replaced(model, gates(model)[0][0].path, mean):
            out = model(x)
        want = model.fc(torch.relu(u * (mean / 0.5).view(1, 8, 1, 1)).mean((2, 3)))
    torch.testing.assert_close(out, want, rtol=1e-13, atol=1e-13)
    with torch.no_grad():
        assert not torch.allclose(model(x), want)  # outside: the live gate again
