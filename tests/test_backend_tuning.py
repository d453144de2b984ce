"""``compile_tuned`` (the ``tune_decode`` option): parameters frozen into the compiled graph."""

import torch
from torch import nn

from kvc_compile.backend.tuning import compile_tuned


def test_tuned_graph_freezes_the_parameters_and_takes_the_other_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48, bias=False), nn.SiLU(), nn.Linear(48, 16, bias=False)).eval()
    x = torch.randn(2, 32)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend=compile_tuned)
        assert torch.allclose(compiled(x), expected, atol=1e-5)
        assert torch.allclose(compiled(2 * x), model(2 * x), atol=1e-5)  # the input is still an input
        for parameter in model.parameters():
            parameter.zero_()
        # Frozen: the compiled graph multiplies by the weights packed when it was compiled (the eager model
        # sees the zeros; an unfrozen graph would too).
        assert torch.equal(model(x), torch.zeros(2, 16))
        assert torch.allclose(compiled(x), expected, atol=1e-5)
