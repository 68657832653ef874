"""GemNet-OC's interaction block and the message-passing layers it is made of.

Shapes: N atoms, E main (symmetrised) edges, E_a a2ee2a edges, T triplets, Q quadruplets.
Every interaction gathers an embedding per input edge, modulates it with a radial basis,
and sums it over triplets / quadruplets through EfficientInteractionBilinear: a ragged sum of
outer products (angular basis ⊗ message) per output edge, then a batched matmul with the radial
basis. JMP zero-pads the triplets of each edge to Kmax instead; the sums are the same.
Rows are gathered with ops.gather, whose gradient is a deterministic scatter sum; the messages of
triplets, quadruplets and a2a edges are picked inside ops.segment_outer (its y_index) instead, so
the gathered [T, F] / [Q, F] rows are never written.
Parameter names are JMP's.
"""

from __future__ import annotations

import math

from torch import nn

from jmp_ext import ops

from jmp_ext.models.gemnet_oc.bases import EdgeEmbedding
from jmp_ext.models.gemnet_oc.config import BackboneConfig
from jmp_ext.models.gemnet_oc.layers import INV_SQRT_2, Dense, ResidualLayer, residual_stack
from jmp_ext.models.gemnet_oc.scaling import ScaleFactor


class EfficientInteractionBilinear(nn.Module):
    """sum over triplets or quadruplets (-> out edge) of rad_W1 · sph · m, then a bilinear Dense.

    forward (triplets): basis = (rad_W1 [O, I, S], sph [T, S], out_ptr [O+1]); m [M, in] and
    m_index [T]: the message of triplet t is m[m_index[t]] (its input edge), the triplets sorted
    by out edge with out_ptr their CSR pointer. With agg2 = (row, col, num_rows,
    num_cols) the per-edge result [O, S, in] is aggregated once more onto atoms (edge-to-atom):
    rad_W1 is then [num_rows, I, K2*S]. Returns [O or num_rows, out].

    quadruplet (QuadrupletInteraction): basis = (rad_W1 [O, I, S], (sph_1 [P, S1], sph_2 [Q, S2],
    ptr_2 [P+1]), out_ptr [O+1]), m [M, in] and m_index [Q]; the basis of quadruplet q is sph_1[p] ⊗ sph_2[q]
    (S = S1 * S2, index s1 * S2 + s2) for the output triplet p it belongs to, the quadruplets
    sorted by p (CSR pointer ptr_2) and the p sorted by out edge (out_ptr). Summing over each p
    first costs S2 * in multiply-adds per quadruplet instead of S1 * S2 * in, and the [Q, S] basis
    is never formed. Returns [O, out].

    Both end in _project: x [O, I, in] = rad_W1 @ sph_m [O, S, in], then the bilinear Dense."""

    def __init__(self, emb_size_in: int, emb_size_interm: int, emb_size_out: int):
        super().__init__()
        self.emb_size_in, self.emb_size_interm = emb_size_in, emb_size_interm
        self.bilinear = Dense(emb_size_in * emb_size_interm, emb_size_out)

    def forward(self, basis, m, m_index, agg2=None):
        """Triplets: basis = (rad_W1, sph [T, S], out_ptr [O+1]), m [M, in], m_index [T] -> [O or num_rows, out]."""
        rad_W1, sph, out_ptr = basis
        sph_m = ops.segment_outer(sph, m, out_ptr, m_index)  # [O, S, in]
        if agg2 is not None:
            row, col, num_rows, num_cols = agg2
            sph_m = ops.ragged_to_padded(sph_m, row, col, num_rows, num_cols).reshape(num_rows, -1, sph_m.shape[-1])  # [N, K2*S, in]
        return self._project(rad_W1, sph_m)

    def quadruplet(self, basis, m, m_index):
        """Quadruplets, basis factored: (rad_W1 [O, I, S1*S2], (sph_1 [P, S1], sph_2 [Q, S2], ptr_2 [P+1]),
        out_ptr [O+1]), m [M, in], m_index [Q] -> [O, out]."""
        rad_W1, (sph_1, sph_2, ptr_2), out_ptr = basis
        inner = ops.segment_outer(sph_2, m, ptr_2, m_index).flatten(1)  # [P, S2 * in]: summed over the quadruplets of each p
        sph_m = ops.segment_outer(sph_1, inner, out_ptr).view(out_ptr.shape[0] - 1, sph_1.shape[1] * sph_2.shape[1], m.shape[1])
        return self._project(rad_W1, sph_m)

    def _project(self, rad_W1, sph_m):
        """rad_W1 [O, I, S] @ sph_m [O, S, in], then the bilinear Dense -> [O, out]."""
        x = rad_W1 @ sph_m  # [O, I, in]; the flat index below is i_interm * in + i_in
        return self.bilinear(x.reshape(-1, self.emb_size_in * self.emb_size_interm))


class TripletInteraction(nn.Module):
    """Messages b->a (edges, or atoms b for atom-to-edge) onto edges c->a, or onto atoms a.

    Symmetric (edge-to-edge, atom-to-edge): out = (up_ca(x) + up_ac(x)[id_swap]) / sqrt(2), so
    the message of c->a also reaches a->c. Not symmetric (edge-to-atom): out = up_ca(x)."""

    def __init__(self, emb_size_in, emb_size_out, emb_size_trip_in, emb_size_trip_out, emb_size_rbf,
                 emb_size_cbf, symmetric: bool, dropout=None):
        super().__init__()
        self.symmetric = symmetric
        self.dense_ba = Dense(emb_size_in, emb_size_in, activation=True, dropout=dropout)
        self.mlp_rbf = Dense(emb_size_rbf, emb_size_in)
        self.scale_rbf = ScaleFactor()
        self.mlp_cbf = EfficientInteractionBilinear(emb_size_trip_in, emb_size_cbf, emb_size_trip_out)
        self.scale_cbf_sum = ScaleFactor()
        self.down_projection = Dense(emb_size_in, emb_size_trip_in, activation=True, dropout=dropout)
        self.up_projection_ca = Dense(emb_size_trip_out, emb_size_out, activation=True, dropout=dropout)
        if symmetric:
            self.up_projection_ac = Dense(emb_size_trip_out, emb_size_out, activation=True, dropout=dropout)

    def forward(self, x_in, bases, idx, id_swap=None, expand_idx=None, agg2=None):
        """x_in [E or N, in]; bases {"rad" [E_in, rbf], "cir"}; idx {"in", ...} [T];
        expand_idx [E_a]: source atom per a2ee2a edge (atom-to-edge); agg2 see the bilinear.
        Returns the messages [E_out, out] (atoms [N, out] for edge-to-atom, out = emb_size_out)."""
        x_ba = self.dense_ba(x_in)
        if expand_idx is not None:
            x_ba = ops.gather(x_ba, expand_idx)
        x_ba = self.scale_rbf(x_ba * self.mlp_rbf(bases["rad"]), ref=x_ba)
        x_ba = self.down_projection(x_ba)
        x = self.mlp_cbf(bases["cir"], x_ba, idx["in"], agg2)
        x = self.scale_cbf_sum(x, ref=lambda: ops.gather(x_ba, idx["in"]))  # JMP's ref: the messages per triplet
        if not self.symmetric:
            return self.up_projection_ca(x)
        return self.up_projection_ca(x).add_(ops.gather(self.up_projection_ac(x), id_swap)).mul_(INV_SQRT_2)


class QuadrupletInteraction(nn.Module):
    """Messages d->b (main edges) through qint edges b->a onto main edges c->a (symmetric)."""

    def __init__(self, emb_size_edge, emb_size_quad_in, emb_size_quad_out, emb_size_rbf, emb_size_cbf,
                 emb_size_sbf, dropout=None):
        super().__init__()
        self.dense_db = Dense(emb_size_edge, emb_size_edge, activation=True, dropout=dropout)
        self.mlp_rbf = Dense(emb_size_rbf, emb_size_edge)
        self.scale_rbf = ScaleFactor()
        self.mlp_cbf = Dense(emb_size_cbf, emb_size_quad_in)
        self.scale_cbf = ScaleFactor()
        self.mlp_sbf = EfficientInteractionBilinear(emb_size_quad_in, emb_size_sbf, emb_size_quad_out)
        self.scale_sbf_sum = ScaleFactor()
        self.down_projection = Dense(emb_size_edge, emb_size_quad_in, activation=True, dropout=dropout)
        self.up_projection_ca = Dense(emb_size_quad_out, emb_size_edge, activation=True, dropout=dropout)
        self.up_projection_ac = Dense(emb_size_quad_out, emb_size_edge, activation=True, dropout=dropout)

    def forward(self, m, bases, quad, id_swap):
        """m [E, edge]; bases {"rad" [E, rbf], "cir" [T_in, cbf], "sph", "edges"}; quad: interaction
        indices. Returns the messages onto every main edge [E, edge] (zero before the up-projections
        where an edge ends no quadruplet)."""
        x_db = self.dense_db(m)
        x_db = self.scale_rbf(x_db * self.mlp_rbf(bases["rad"]), ref=x_db)
        x_db = ops.gather(self.down_projection(x_db), quad["triplet_in"]["in"])  # [T_in, quad_in]
        x_db = self.scale_cbf(x_db * self.mlp_cbf(bases["cir"]), ref=x_db)
        x = self.mlp_sbf.quadruplet(bases["sph"], x_db, quad["trip_in_to_quad"])  # [E_q, quad_out], the edges with quadruplets
        x = m.new_zeros(m.shape[0], x.shape[1]).index_copy(0, bases["edges"], x)
        x = self.scale_sbf_sum(x, ref=lambda: ops.gather(x_db, quad["trip_in_to_quad"]))  # per quadruplet, as JMP
        return self.up_projection_ca(x).add_(ops.gather(self.up_projection_ac(x), id_swap)).mul_(INV_SQRT_2)


class PairInteraction(nn.Module):
    """Atom-to-atom messages over the a2a graph: h_a += up(bilinear(sum_b rbf(d_ab) x_b))."""

    def __init__(self, emb_size_atom, emb_size_pair_in, emb_size_pair_out, emb_size_rbf, dropout=None):
        super().__init__()
        self.bilinear = Dense(emb_size_rbf * emb_size_pair_in, emb_size_pair_out)
        self.scale_rbf_sum = ScaleFactor()
        self.down_projection = Dense(emb_size_atom, emb_size_pair_in, activation=True, dropout=dropout)
        self.up_projection = Dense(emb_size_pair_out, emb_size_atom, activation=True, dropout=dropout)

    def forward(self, h, rad, a2a):
        """h [N, A]; rad = (rad_W1 [E_a2a, rbf], ptr [N+1]: the a2a edges, grouped by target, of each atom)."""
        rad_W1, ptr = rad
        x_b = self.down_projection(h)
        # JMP pads each atom's neighbours to Kmax and batch-multiplies; the ragged sum is the same.
        source = a2a["edge_index"][0]
        x = ops.segment_outer(rad_W1, x_b, ptr, source).flatten(1)  # [N, rbf * pair_in]
        return self.up_projection(self.scale_rbf_sum(self.bilinear(x), ref=lambda: ops.gather(x_b, source)))  # ref per edge, as JMP


class AtomUpdateBlock(nn.Module):
    """h_update [N, A] = MLP(scale(sum over edges c->a of m_ca * W rbf_ca))."""

    def __init__(self, emb_size_atom, emb_size_edge, emb_size_rbf, num_hidden, dropout=None):
        super().__init__()
        self.dense_rbf = Dense(emb_size_rbf, emb_size_edge)
        self.scale_sum = ScaleFactor()
        self.layers = residual_stack(emb_size_edge, emb_size_atom, num_hidden, dropout)

    def aggregate(self, m, rbf, idx_t, num_atoms):
        """[E, edge] -> [N, edge]: the rbf-weighted, scaled sum of the edges onto their targets."""
        x = ops.scatter_sum(m * self.dense_rbf(rbf), idx_t, num_atoms)
        return self.scale_sum(x, ref=m)

    def forward(self, h, m, rbf, idx_t):
        x = self.aggregate(m, rbf, idx_t, h.shape[0])
        for layer in self.layers:
            x = layer(x)
        return x


class InteractionBlock(nn.Module):
    """One GemNet-OC interaction: updates atom embeddings h [N, A] and edge embeddings m [E, edge]."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        c, p = config, config.dropout
        A, Ed = c.emb_size_atom, c.emb_size_edge
        self.dense_ca = Dense(Ed, Ed, activation=True, dropout=p)
        self.trip_interaction = TripletInteraction(Ed, Ed, c.emb_size_trip_in, c.emb_size_trip_out, c.emb_size_rbf,
                                                   c.emb_size_cbf, symmetric=True, dropout=p)
        self.quad_interaction = QuadrupletInteraction(Ed, c.emb_size_quad_in, c.emb_size_quad_out, c.emb_size_rbf,
                                                      c.emb_size_cbf, c.emb_size_sbf, p)
        self.atom_edge_interaction = TripletInteraction(A, Ed, c.emb_size_trip_in, c.emb_size_trip_out,
                                                        c.emb_size_rbf, c.emb_size_cbf, symmetric=True, dropout=p)
        self.edge_atom_interaction = TripletInteraction(Ed, A, c.emb_size_trip_in, c.emb_size_trip_out,
                                                        c.emb_size_rbf, c.emb_size_cbf, symmetric=False, dropout=p)
        self.atom_interaction = PairInteraction(A, c.emb_size_aint_in, c.emb_size_aint_out, c.emb_size_rbf, p)
        self.layers_before_skip = nn.ModuleList([ResidualLayer(Ed, p) for _ in range(c.num_before_skip)])
        self.layers_after_skip = nn.ModuleList([ResidualLayer(Ed, p) for _ in range(c.num_after_skip)])
        self.atom_emb_layers = nn.ModuleList([ResidualLayer(A, p) for _ in range(c.num_atom_emb_layers)])
        self.atom_update = AtomUpdateBlock(A, Ed, c.emb_size_rbf, c.num_atom, p)
        self.concat_layer = EdgeEmbedding(A, Ed, Ed, p)
        self.residual_m = nn.ModuleList([ResidualLayer(Ed, p) for _ in range(c.num_concat)])

    def forward(self, h, m, bases, graphs):
        """h [N, emb_size_atom], m [E, emb_size_edge] (main edges); bases: Bases' dict; graphs:
        jmp_ext.graphs.build_graphs' dict. Returns the updated (h, m), same shapes."""
        num_atoms = h.shape[0]
        main, a2ee2a, id_swap = graphs["main"], graphs["a2ee2a"], graphs["id_swap"]

        # Edge messages: skip + triplets + quadruplets + atom-to-edge, variance kept by 1/sqrt(4).
        x = (self.dense_ca(m)
             + self.trip_interaction(m, bases["e2e"], graphs["trip_e2e"], id_swap)
             + self.quad_interaction(m, bases["qint"], graphs["quad"], id_swap)
             + self.atom_edge_interaction(h, bases["a2e"], graphs["trip_a2e"], id_swap,
                                          expand_idx=a2ee2a["edge_index"][0])) * 0.5
        # Atom messages: skip + edge-to-atom + atom-to-atom, 1/sqrt(3).
        agg2 = (a2ee2a["edge_index"][1], a2ee2a["target_neighbor_idx"], num_atoms, graphs["kmax"]["a2ee2a"])
        h = (h
             + self.edge_atom_interaction(m, bases["e2a"], graphs["trip_e2a"], agg2=agg2)
             + self.atom_interaction(h, bases["a2a_rad"], graphs["a2a"])) * (1 / math.sqrt(3.0))

        for layer in self.layers_before_skip:
            x = layer(x)
        m = (m + x) * INV_SQRT_2
        for layer in self.layers_after_skip:
            m = layer(m)

        for layer in self.atom_emb_layers:
            h = layer(h)
        h = (h + self.atom_update(h, m, bases["rbf_h"], main["edge_index"][1])) * INV_SQRT_2

        m2 = self.concat_layer(h, m, main["edge_index"])
        for layer in self.residual_m:
            m2 = layer(m2)
        m = (m + m2) * INV_SQRT_2
        return h, m
