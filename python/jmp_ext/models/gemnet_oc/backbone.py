"""GemNetOCBackbone: JMP's GemNet-OC, from atom embeddings and prebuilt graphs to per-atom energy
features and per-edge force features. Read `forward` top to bottom.

The graphs dict (built by jmp_ext.graphs.build_graphs, or taken from JMP's fixtures) holds:
  num_atoms: int (N)
  main:   edge_index [2, E] int64 (row 0 source s, row 1 target t), distance [E] (Å),
          vector [E, 3] (unit vector from the source image to the target, JMP's V_st);
          the main graph is already symmetrised: every edge has its reverse, id_swap [E] maps
          an edge to its reverse.
  a2ee2a, a2a: the same fields, edges grouped by target; a2ee2a also target_neighbor_idx
          [E_a] (rank of the edge among the edges of its target); qint: edge_index, distance, vector.
  trip_e2e, trip_a2e, trip_e2a: {"in", "out", "out_agg"} [T] (see jmp_ext.ops.triplets);
  quad: {"triplet_in": {"in","out"}, "triplet_out": {"in","out"}, "out", "out_agg",
         "trip_in_to_quad", "trip_out_to_quad"}; these indices are int32 from build_graphs
         (int64, as in JMP's fixtures, works too).
  kmax: {"a2ee2a": int}: width of the padded per-atom block of the edge-to-atom interaction
         (computed once with the indices, so the forward never syncs with the host). Triplets /
         quadruplets (sorted by "out") and a2a edges (by target) are summed ragged over CSR
         pointers, which Bases builds.
Distances and vectors carry the autograd graph to the positions (gradient forces, stress).
"""

from __future__ import annotations

import torch
from torch import nn

from jmp_ext.models.gemnet_oc.bases import Bases
from jmp_ext.models.gemnet_oc.config import BackboneConfig
from jmp_ext.models.gemnet_oc.interaction import InteractionBlock
from jmp_ext.models.gemnet_oc.output import FinalMLP, OutputBlock


class GemNetOCBackbone(nn.Module):
    """state_dict keys are exactly JMP's GemNetOCBackbone keys (bases.*, int_blocks.*,
    out_blocks.*, out_mlp_E.*, out_mlp_F.*), so JMP weights load with the identity mapping."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        c = config
        self.bases = Bases(c)
        self.int_blocks = nn.ModuleList([InteractionBlock(c) for _ in range(c.num_blocks)])
        self.out_blocks = nn.ModuleList([
            OutputBlock(c.emb_size_atom, c.emb_size_edge, c.emb_size_rbf, c.num_atom, c.num_output_afteratom,
                        c.has_force_branch, c.dropout)
            for _ in range(c.num_blocks + 1)
        ])
        self.out_mlp_E = FinalMLP(c.emb_size_atom * (c.num_blocks + 1), c.emb_size_atom, c.num_global_out_layers,
                                  c.dropout)
        if c.has_force_branch:
            self.out_mlp_F = FinalMLP(c.emb_size_edge * (c.num_blocks + 1), c.emb_size_edge,
                                      c.num_global_out_layers, c.dropout)

    def forward(self, h: torch.Tensor, graphs: dict) -> dict:
        """h [N, emb_size_atom]: atom embeddings (embedding(Z - 1)).

        Returns energy [N, emb_size_atom] per-atom features, forces [E, emb_size_edge] per-edge
        features (None without the force branch), and the main graph's V_st [E, 3], D_st [E] (Å),
        idx_s, idx_t [E]."""
        main = graphs["main"]
        if main["distance"].dtype != h.dtype:  # (a kernel deep inside would name dtypes of its own)
            raise TypeError(f"the batch is {main['distance'].dtype} but the network is {h.dtype}: collate the "
                            f"structures in the network's dtype (jmp_ext.data.collate(entries, dtype=...)) or "
                            f"convert the network (model.to(dtype))")
        idx_s, idx_t = main["edge_index"]
        # Edge dropout removes a2a edges (and so main edges) while training; the energy sums are
        # boosted by 1/(1-p) so their expectation is unchanged.
        p = self.config.edge_dropout
        boost = 1.0 / (1.0 - p) if (self.training and p) else 1.0

        bases = self.bases(graphs)
        m = self.bases.edge_emb(h, bases["rad_main"], main["edge_index"])

        x_E, x_F = self.out_blocks[0](h, m, bases["rbf_out"], idx_t, boost)
        xs_E, xs_F = [x_E], [x_F]
        for int_block, out_block in zip(self.int_blocks, self.out_blocks[1:]):
            h, m = int_block(h, m, bases, graphs)
            x_E, x_F = out_block(h, m, bases["rbf_out"], idx_t, boost)
            xs_E.append(x_E)
            xs_F.append(x_F)

        energy = self.out_mlp_E(torch.cat(xs_E, dim=-1))
        forces = self.out_mlp_F(torch.cat(xs_F, dim=-1)) if self.config.has_force_branch else None
        return {"energy": energy, "forces": forces, "V_st": main["vector"], "D_st": main["distance"],
                "idx_s": idx_s, "idx_t": idx_t}
