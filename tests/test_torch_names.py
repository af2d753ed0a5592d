"""No torch / triton name creeps in unchecked against torch 2.11 (tools/torch_names.py).

pyproject promises torch>=2.11 and the GPU node runs 2.11; CI runs 2.13, where a 2.13-only name
passes every other test.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import torch_names  # noqa: E402


def test_every_torch_name_the_code_uses_was_checked_against_torch_2_11():
    new = torch_names.unchecked(torch_names.used_names())
    assert not new, (f"not checked against torch 2.11: {new}; run `python tools/torch_names.py "
                     "--write` with torch 2.11 (its docstring says how)")


def test_a_new_name_is_caught_and_imports_aliases_and_chains_are_seen():
    source = "\n".join([
        "import torch", "import torch.nn.functional as F",
        "from torch.library import wrap_triton as wt", "import triton.language as tl",
        "x = F.scaled_dot_product_attention(q)", "y = torch.cuda.graph(g).capture",
        "z = tl.float32", "w = torch.only_in_2_13(1)",
    ])
    names = torch_names.names_in(source)
    assert names == {
        "torch", "torch.nn.functional", "torch.nn.functional.scaled_dot_product_attention",
        "torch.library.wrap_triton", "triton.language", "triton.language.float32", "torch.cuda",
        "torch.cuda.graph", "torch.only_in_2_13",
    }
    assert torch_names.unchecked({n: "x.py" for n in names}) == ["torch.only_in_2_13 (x.py)"]
    assert not torch_names.resolves("torch.only_in_2_13")
    assert torch_names.resolves("torch.cuda.graph")


@pytest.mark.skipif(not torch.__version__.startswith("2.11."), reason="needs torch 2.11")
def test_checked_names_are_in_this_torch():
    assert [n for n in torch_names.checked_names() if not torch_names.resolves(n)] == []
