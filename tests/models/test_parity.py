"""Parity with JMP's GemNet-OC on the reference fixtures, using JMP's own graphs and indices.

The end-to-end version, with graphs built by jmp_ext.graphs from the raw inputs, is in
test_graphs.py. Tolerances follow the fixtures' README: f64 relative error ~1e-9 (we require
1e-9), f32 1e-4 relative to the largest magnitude of each output."""

from __future__ import annotations

import pytest
import torch
from jmp_fixtures import CASES, fixture_graphs, load, requires_fixtures

from jmp_ext.models import BackboneConfig, GemNetOCBackbone

pytestmark = requires_fixtures

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
TAG = {torch.float64: "f64", torch.float32: "f32"}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.fixture(scope="module")
def weights():
    return load("weights.pt")


def make_model(weights, dtype):
    backbone = GemNetOCBackbone(BackboneConfig.from_dict(weights["meta"]["config"]))
    backbone.load_state_dict(weights["backbone_state_dict"], strict=True)
    embedding = torch.nn.Embedding(120, backbone.config.emb_size_atom)
    embedding.load_state_dict(weights["embedding_state_dict"])
    return backbone.to(dtype).eval(), embedding.to(dtype)


def test_state_dict_keys_are_jmps_in_jmps_order(weights):
    backbone = GemNetOCBackbone(BackboneConfig.from_dict(weights["meta"]["config"]))
    assert list(backbone.state_dict()) == list(weights["backbone_state_dict"])
    n = sum(p.numel() for p in backbone.parameters()) + 120 * 32
    assert n == 508288  # the fixtures' parameter count (backbone + embedding)
    # Aliases are the same module, shared radial basis buffers the same tensor.
    assert backbone.out_blocks[0].seq_energy_pre is backbone.out_blocks[0].layers
    b = backbone.bases
    assert b.cbf_basis_tint.radial_basis is b.sbf_basis_qint.radial_basis is b.cbf_basis_aeint.radial_basis


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case_name", CASES)
def test_backbone_outputs_match_jmp(weights, case_name, dtype):
    case = load(f"{case_name}.pt")
    backbone, embedding = make_model(weights, dtype)
    seen = {}
    for i, block in enumerate(backbone.out_blocks):
        block.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(f"out_block{i}_xE", out[0]))
    for i, block in enumerate(backbone.int_blocks):
        block.register_forward_hook(lambda mod, args, out, i=i: seen.update({f"int_block{i}_h": out[0],
                                                                              f"int_block{i}_m": out[1]}))
    pos = case["inputs"]["pos"].to(dtype)
    with torch.no_grad():
        out = backbone(embedding(case["inputs"]["atomic_numbers"] - 1), fixture_graphs(case, pos))

    expected = case[f"outputs_{TAG[dtype]}"]
    for key in ("energy", "forces", "V_st", "D_st"):
        assert out[key].dtype == dtype
        assert rel_err(out[key], expected[key]) < TOL[dtype], key
    assert torch.equal(out["idx_s"], expected["idx_s"]) and torch.equal(out["idx_t"], expected["idx_t"])
    for key, value in case[f"intermediates_{TAG[dtype]}"].items():
        if key in seen:
            assert rel_err(seen[key], value) < TOL[dtype], key


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case_name", CASES)
def test_position_gradient_matches_jmp(weights, case_name, dtype):
    """scalar_test: value = sum(energy @ proj), gradient through the geometry of all four graphs."""
    case = load(f"{case_name}.pt")
    backbone, embedding = make_model(weights, dtype)
    pos = case["inputs"]["pos"].to(dtype).requires_grad_(True)
    out = backbone(embedding(case["inputs"]["atomic_numbers"] - 1), fixture_graphs(case, pos))
    e_atom = out["energy"] @ case["scalar_test"]["proj"].to(dtype)
    (grad,) = torch.autograd.grad(e_atom.sum(), pos)
    ref = case["scalar_test"]
    assert rel_err(e_atom, ref[f"e_atom_{TAG[dtype]}"]) < TOL[dtype]
    assert rel_err(grad, ref[f"grad_pos_{TAG[dtype]}"]) < TOL[dtype]
