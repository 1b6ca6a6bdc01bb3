"""Neuron-group layout and placement plans (pure)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from halo_p2p.errors import ConfigError, PlanError
from halo_p2p.groups import ATTN, MLP, SLICE_AXIS, GroupId, GroupLayout, default_mlp_group_size, tensor_names
from halo_p2p.model.config import ModelConfig
from halo_p2p.plan import PLAN_BODY_VERSION, PlacementPlan, PlanBody, proportional_counts

SMOLLM2 = ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536,
                      vocab_size=49152, rope_base=100000.0, norm_eps=1e-5, max_seq_len=8192,
                      tied_embeddings=True)


def test_layout_of_smollm2() -> None:
    layout = GroupLayout.from_config(SMOLLM2)
    assert (layout.n_attn, layout.n_mlp, layout.mlp_group_size) == (3, 24, 64)
    assert layout.q_rows(1) == (192, 384) and layout.kv_rows(2) == (128, 192)
    assert layout.mlp_rows(23) == (1472, 1536)
    assert len(layout.all_groups()) == 30 * (3 + 24)
    # the groups' parameters add up to the layer's projection parameters
    per_layer = 3 * layout.group_params(ATTN) + 24 * layout.group_params(MLP)
    assert per_layer == 576 * (576 + 192 + 192 + 576) + 3 * 576 * 1536


def test_default_group_size() -> None:
    assert default_mlp_group_size(1536) == 64
    assert default_mlp_group_size(172) == 43
    assert default_mlp_group_size(5632) == 256
    with pytest.raises(ConfigError, match="does not divide"):
        GroupLayout.from_config(SMOLLM2, mlp_group_size=100)


def test_proportional_counts() -> None:
    assert proportional_counts(24, [1, 1, 1, 1]) == [6, 6, 6, 6]
    assert proportional_counts(24, [4, 2, 1, 1]) == [12, 6, 3, 3]
    counts = proportional_counts(3, [1, 1, 1, 1])
    assert sum(counts) == 3 and max(counts) == 1
    # the rotation spreads remainders: over 4 layers each peer gets 3 of 12 attention groups
    totals = [sum(c) for c in zip(*(proportional_counts(3, [1] * 4, offset=o) for o in range(4)), strict=True)]
    assert totals == [3, 3, 3, 3]


def test_split_is_valid_and_uneven() -> None:
    layout = GroupLayout.from_config(SMOLLM2)
    plan = PlacementPlan.split(layout, ["c", "a", "b"], shares=[1, 2, 1])
    assert set(plan.owner) == set(layout.all_groups())
    assert plan.share("a") == pytest.approx(0.5, abs=0.03)
    assert plan.workers() == ["a", "b"]
    again = PlacementPlan.from_dict(plan.to_dict(), layout)
    assert again.owner == plan.owner and again.coordinator == "c"


def test_plan_errors() -> None:
    layout = GroupLayout.from_config(SMOLLM2)
    plan = PlacementPlan.split(layout, ["c", "w"])
    data = plan.to_dict()
    missing = {**data, "assign": {"c": data["assign"]["c"], "w": data["assign"]["w"][1:]}}
    with pytest.raises(PlanError, match="misses group"):
        PlacementPlan.from_dict(missing, layout)
    twice = {**data, "assign": {"c": data["assign"]["c"] + [data["assign"]["w"][0]], "w": data["assign"]["w"]}}
    with pytest.raises(PlanError, match="assigned twice"):
        PlacementPlan.from_dict(twice, layout)
    unknown = {**data, "assign": {**data["assign"], "ghost": []}, "peers": ["c", "w"]}
    unknown["assign"]["ghost"] = [data["assign"]["w"][0]]
    unknown["assign"]["w"] = data["assign"]["w"][1:]
    with pytest.raises(PlanError, match="unknown peer 'ghost'"):
        PlacementPlan.from_dict(unknown, layout)
    out_of_range = {**data, "assign": {"c": [*data["assign"]["c"], [99, 0, 0]], "w": data["assign"]["w"]}}
    with pytest.raises(PlanError, match="does not exist"):
        PlacementPlan.from_dict(out_of_range, layout)
    with pytest.raises(PlanError, match="malformed"):
        PlacementPlan.from_dict({**data, "assign": {"c": [[1, 2]]}}, layout)
    with pytest.raises(PlanError, match="coordinator"):
        PlacementPlan(layout, "x", ("c", "w"), plan.owner)
    assert GroupId(1, MLP, 3) in plan.owner


def test_tensor_shapes_are_the_groups_slices_and_their_parameters() -> None:
    layout = GroupLayout.from_config(SMOLLM2)
    assert layout.tensor_shapes(ATTN) == {"wq": (192, 576), "wk": (64, 576), "wv": (64, 576), "wo": (576, 192)}
    assert layout.tensor_shapes(MLP) == {"w1": (64, 576), "w3": (64, 576), "w2": (576, 64)}
    for part in (ATTN, MLP):
        shapes = layout.tensor_shapes(part)
        assert tuple(shapes) == tensor_names(part)
        assert sum(r * c for r, c in shapes.values()) == layout.group_params(part)


def test_tensor_spans_tile_each_matrix_with_slices_of_the_groups_shapes() -> None:
    layout = GroupLayout.from_config(SMOLLM2)
    full = {"wq": 576, "wk": 192, "wv": 192, "wo": 576, "w1": 1536, "w3": 1536, "w2": 1536}   # along SLICE_AXIS
    assert SLICE_AXIS["wo"] == SLICE_AXIS["w2"] == 1 and SLICE_AXIS["wq"] == SLICE_AXIS["w1"] == 0
    for part in (ATTN, MLP):
        shapes = layout.tensor_shapes(part)
        spans = [layout.tensor_spans(part, i) for i in range(layout.n_groups(part))]
        assert all(tuple(s) == tensor_names(part) for s in spans)
        for name in tensor_names(part):
            assert all(s[name][1] - s[name][0] == shapes[name][SLICE_AXIS[name]] for s in spans)
            assert spans[0][name][0] == 0 and spans[-1][name][1] == full[name]
            assert all(a[name][1] == b[name][0] for a, b in itertools.pairwise(spans))


def test_plan_body_round_trips_and_names_the_bad_field() -> None:
    layout = GroupLayout.from_config(SMOLLM2)
    body = PlanBody(placement=PlacementPlan.split(layout, ["c", "a"]), config=SMOLLM2, max_seq_len=512)
    data = body.to_dict()
    assert PlanBody.from_dict(data) == body and body.layout == layout and body.version == PLAN_BODY_VERSION
    bad = {
        "plan body version 9 is not 1": {**data, "version": 9},
        "plan body has unknown field(s) 'n_parity'": {**data, "n_parity": 1},
        "plan body field 'config.rope_base' must be float, got str": {**data, "config": {**data["config"],
                                                                                         "rope_base": "1"}},
        "plan body field 'config' misses field(s) 'dim'": {**data, "config": {k: v for k, v in data["config"].items()
                                                                             if k != "dim"}},
        "plan body field 'placement': plan version 2 is not 1": {**data, "placement": {**data["placement"],
                                                                                       "version": 2}},
    }
    for problem, d in bad.items():
        with pytest.raises(ConfigError) as info:
            PlanBody.from_dict(d)
        assert info.value.problem.startswith(problem), info.value.problem
    small = GroupLayout.from_config(SMOLLM2, mlp_group_size=128)   # a placement of another layout
    with pytest.raises(ConfigError, match="'placement' is laid out for another model"):
        PlanBody(placement=PlacementPlan.split(dataclasses.replace(small, dim=64), ["c"]), config=SMOLLM2,
                 max_seq_len=8)
    with pytest.raises(ConfigError, match="'max_seq_len' must be an int >= 1"):
        PlanBody(placement=body.placement, config=SMOLLM2, max_seq_len=0)
