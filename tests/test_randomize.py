"""The random weights the tests rely on really perturb every tensor."""

import torch
from torch import nn

from .util import TINY, random_timm_model


def test_every_parameter_is_perturbed():
    model = random_timm_model("deit3_small_patch16_224", seed=0, depth=2)
    layer_norm_params = {
        id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in [m.weight]
    }
    for name, p in model.named_parameters():
        assert torch.count_nonzero(p == 0) == 0, f"{name} has zeros"
        assert torch.count_nonzero(p == 1) == 0, f"{name} has ones"
        assert p.std() > 0, f"{name} is constant"
        if name.endswith("gamma"):
            assert 0.1 <= p.min() and p.max() <= 1.0, name
        if id(p) in layer_norm_params:
            assert (p - 1).abs().mean() < 0.2, f"{name} is not near 1"


def test_randomization_is_seeded():
    a = random_timm_model(TINY, seed=5, depth=1).state_dict()
    b = random_timm_model(TINY, seed=5, depth=1).state_dict()
    c = random_timm_model(TINY, seed=6, depth=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


def test_library_random_init_equals_the_tests_own():
    """`--init random` gives the weights the tests build independently for the same seed."""
    from deit_port.source import create_timm_model

    ours = create_timm_model("deit3_small_patch16_224", init="random", seed=9, depth=2)
    theirs = random_timm_model("deit3_small_patch16_224", seed=9, depth=2)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
