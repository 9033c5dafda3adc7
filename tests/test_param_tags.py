"""Parameter tags: defaults for an untagged tensor, partial updates, unknown names refused."""

import pytest
import torch

from engine.param_tags import ParamTags, param_tags, tag
from layers.params import new_param


def test_untagged_reads_defaults_and_tag_merges():
    p = torch.nn.Parameter(torch.zeros(2))
    assert param_tags(p) == ParamTags()
    tag(p, tp_split_dim=0)
    assert tag(p, pp_duplicate=True) == ParamTags(tp_split_dim=0, pp_duplicate=True)
    assert param_tags(p) == ParamTags(tp_split_dim=0, pp_duplicate=True)
    with pytest.raises(TypeError):
        tag(p, no_such_tag=1)


def test_new_param_is_tagged():
    p = new_param(4, 2, tp_split_dim=1, init="zeros", vocab_parallel=True)
    assert param_tags(p) == ParamTags(tp_split_dim=1, vocab_parallel=True)
