"""GemNet-OC's bases, computed once per forward and shared by every block.

Radial: Gaussians on d / absolute_cutoff (Å / Å) times a polynomial envelope. Circular: the
radial basis of the output edge times Y_l0(cos φ) of the triplet angle. Spherical
("legendre_outer"): Y_l1(cos φ_cab) * Y_l2(cos θ_cabd) of the quadruplet's angle and dihedral.
The raw bases are projected by shared BasisEmbedding / Dense layers; `Bases` also owns the
initial edge embedding. Parameter and buffer names are JMP's (`bases.*`).
"""

from __future__ import annotations

import torch
from torch import nn

from jmp_ext.models.gemnet_oc.config import BackboneConfig
from jmp_ext.models.gemnet_oc.layers import Dense, he_orthogonal_init, shared_weight
from jmp_ext import ops


class GaussianBasis(nn.Module):
    """exp(-temps * (x - offset)^2) for x in [0, 1]. Buffers `offset`, `temps` (num_radial,).

    The buffers are float32 in every checkpoint; a float64 model uses those float32-rounded
    centres (after .double()), so they are never recomputed in float64."""

    def __init__(self, num_radial: int):
        super().__init__()
        offset = torch.linspace(0.0, 1.0, num_radial, dtype=torch.float32)
        self.register_buffer("offset", offset)
        self.register_buffer("temps", torch.full_like(offset, 0.5 / (1.0 / (num_radial - 1)) ** 2))

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """x [E] -> [E, num_radial], times scale [E] (or not) if given.

        One kernel for scale[:, None] * exp(-temps * (x[:, None] - offset)^2), with values below
        the dtype's smallest normal number set to 0: most of the 128 Gaussians of a long a2a edge
        underflow (exponents down to -8000), a small envelope takes others below it, and
        subnormals make the exp and the matmuls that read them up to ~10x slower
        (bench/README.md, "Subnormals")."""
        # Eager, the kernel is 5-7x faster than the torch expression; under torch.compile,
        # Inductor fuses the expression into a pass 2.5x faster than the kernel.
        basis = ops.gaussian_basis_expression if torch.compiler.is_compiling() else ops.gaussian_basis
        return basis(x, self.offset, self.temps, scale)


class RadialBasis(nn.Module):
    """d [E] (Å) -> envelope(d/c) * gaussians(d/c) [E, num_radial], c = absolute_rbf_cutoff.

    Envelope (polynomial, exponent p): 1 + a x^p + b x^(p+1) + c x^(p+2) for x < 1, else 0, with
    a = -(p+1)(p+2)/2, b = p(p+2), c = -p(p+1)/2 (p = 5: 1 - 21x^5 + 35x^6 - 15x^7)."""

    def __init__(self, num_radial: int, cutoff: float, exponent: int):
        super().__init__()
        self.inv_cutoff = 1.0 / cutoff
        self.p = exponent
        self.rbf = GaussianBasis(num_radial)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        x = d * self.inv_cutoff
        p = self.p
        env = 1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
        env = torch.where(x < 1, env, torch.zeros_like(x))
        return self.rbf(x, scale=env)


def spherical_harmonics_l0(z: torch.Tensor) -> torch.Tensor:
    """Real Y_l0(z), l = 0..6, of z = cos(angle) [T] -> [T, 7].

    The coefficients are JMP's sympy-generated 15-digit literals, not exact values: at the
    1e-15 level in float64 these digits are what parity with JMP depends on."""
    z2 = z * z
    return torch.stack([
        torch.zeros_like(z) + 0.282094791773878,
        0.48860251190292 * z,
        0.94617469575756 * z2 - 0.31539156525252,
        z * (1.86588166295058 * z2 - 1.11952899777035),
        3.70249414203215 * z2**2 - 3.17356640745613 * z2 + 0.317356640745613,
        z * (7.36787031456569 * z2**2 - 8.18652257173965 * z2 + 1.75425483680135),
        14.6844857238222 * z2**3 - 20.024298714303 * z2**2 + 6.67476623810098 * z2 - 0.317846011338142,
    ], dim=1)


class CircularBasisLayer(nn.Module):
    """Y_l0(cos φ) [T, 7]; holds the radial basis it is paired with (`radial_basis`)."""

    def __init__(self, radial_basis: RadialBasis):
        super().__init__()
        self.radial_basis = radial_basis

    def forward(self, cos_phi: torch.Tensor) -> torch.Tensor:
        return spherical_harmonics_l0(cos_phi)


class SphericalBasisLayer(nn.Module):
    """legendre_outer: Y_l1(cos φ) * Y_l2(cos θ), index l1 * 7 + l2; holds `radial_basis`.

    Returned as its two factors, Y(cos φ) [T_out, 7] per output triplet and Y(cos θ) [Q, 7] per
    quadruplet: the [Q, 49] product is never formed (see EfficientInteractionBilinear)."""

    def __init__(self, radial_basis: RadialBasis):
        super().__init__()
        self.radial_basis = radial_basis

    def forward(self, cos_phi: torch.Tensor, cos_theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return spherical_harmonics_l0(cos_phi), spherical_harmonics_l0(cos_theta)


class BasisEmbedding(nn.Module):
    """Projects a raw radial basis [E, R] with `weight`.

    3-D weight (R, S, I): returns [E, I, S]. JMP computes rad @ weight.reshape(R, S*I) and then
    reshapes to (E, I, S), so the effective tensor is weight.reshape(R, I, S), *not*
    weight.permute(0, 2, 1): a legacy quirk of GemNet-OC kept for checkpoint compatibility.
    2-D weight (I, R) (num_spherical=None): returns rad @ weight.T [E, I].
    users: how many blocks share this projection (its gradient is divided: shared_weight)."""

    def __init__(self, num_radial: int, emb_size_interm: int, num_spherical: int | None = None):
        super().__init__()
        shape = (emb_size_interm, num_radial) if num_spherical is None else (num_radial, num_spherical, emb_size_interm)
        self.weight = nn.Parameter(he_orthogonal_init(torch.empty(shape)))
        self.num_spherical = num_spherical
        self.users = 1

    def forward(self, rad: torch.Tensor) -> torch.Tensor:
        weight = shared_weight(self.weight, self.users)
        if self.num_spherical is None:
            return rad @ weight.T
        out = rad @ weight.reshape(weight.shape[0], -1)
        return out.reshape(rad.shape[0], weight.shape[2], self.num_spherical)


class EdgeEmbedding(nn.Module):
    """m_st = act(W [h_s, h_t, m]) : h [N, A], m [E, F], edge_index [2, E] -> [E, out]."""

    def __init__(self, atom_features: int, edge_features: int, out_features: int, dropout: float | None = None):
        super().__init__()
        self.dense = Dense(2 * atom_features + edge_features, out_features, activation=True, dropout=dropout)

    def forward(self, h: torch.Tensor, m: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.dense(torch.cat([ops.gather(h, edge_index[0]), ops.gather(h, edge_index[1]), m], dim=-1))


def cos_angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Clamped dot product of unit vectors [T, 3] -> [T] in [-1, 1]."""
    return torch.clamp((a * b).sum(dim=-1), -1.0, 1.0)


def triplet_cos(V_out: torch.Tensor, V_in: torch.Tensor, trip: dict) -> torch.Tensor:
    """cos of the angle between each triplet's out edge and in edge: V [E, 3] unit vectors -> [T]."""
    return cos_angle(ops.gather(V_out, trip["out"]), ops.gather(V_in, trip["in"]))


def cos_angle_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos of the angle between vectors [T, 3] of any length -> [T].

    GemNet-OC takes the angle as atan2(y, x), y = |a x b| clamped at 1e-9 (so the gradient stays
    finite for (anti)parallel vectors), x = a.b, and then its cos. cos(atan2(y, x)) is
    x / sqrt(x^2 + y^2) for y > 0: the same function and gradient, without atan2 and cos, which
    are scalar libm calls per quadruplet under torch.compile."""
    y = torch.linalg.cross(a, b).norm(dim=-1).clamp(min=1e-9)
    x = (a * b).sum(dim=-1)
    return x * torch.rsqrt(x * x + y * y)


class Bases(nn.Module):
    """Raw bases of the four graphs and their shared projections (computed once per forward).

    forward(graphs) returns a dict (E = main edges, N = atoms):
      rad_main [E, num_radial] raw main-graph RBF (input of the initial edge embedding)
      rbf_h, rbf_out [E, emb_size_rbf] for the atom update and output blocks
      e2e, a2e: {"rad" [E or E_a2ee2a, emb_size_rbf], "cir": (rad_W1 [E, cbf, 7], sph [T, 7], out_ptr [E+1])}
      qint: {"rad" [E, rbf], "cir" [T_in, cbf],
             "sph": (rad_W1 [E_q, sbf, 49], (Y(cos φ) [T_out, 7], Y(cos θ) [Q, 7], quad_ptr [T_out+1]),
                     out_ptr [E_q+1] over the output triplets), "edges" [E_q]: graphs["quad_edges"], the
             main edges with a quadruplet message}
      e2a: {"rad" [E, rbf], "cir": (rad_W1 [N, cbf, Kmax_a*7], sph [T, 7], out_ptr [E_a2ee2a+1])}
      a2a_rad: (rad_W1 [E_a2a, rbf], ptr [N+1] of the a2a edges over their target)
    """

    def __init__(self, config: BackboneConfig):
        super().__init__()
        R, p, c = config.num_radial, config.envelope.get("exponent", 5), config.absolute_rbf_cutoff
        S = config.num_spherical
        rbf, cbf, sbf = config.emb_size_rbf, config.emb_size_cbf, config.emb_size_sbf
        # Module order and sharing follow JMP, so state_dict keys (and their order) match.
        # `radial_basis_spherical` is one module shared by sbf_qint, cbf_aeint and cbf_tint.
        self.radial_basis = RadialBasis(R, c, p)
        radial_basis_spherical = RadialBasis(R, c, p)
        self.cbf_basis_qint = CircularBasisLayer(RadialBasis(R, c, p))
        self.sbf_basis_qint = SphericalBasisLayer(radial_basis_spherical)
        self.radial_basis_aeaint = RadialBasis(R, c, p)
        self.cbf_basis_aeint = CircularBasisLayer(radial_basis_spherical)
        self.cbf_basis_eaint = CircularBasisLayer(RadialBasis(R, c, p))
        self.radial_basis_aint = RadialBasis(R, c, p)
        self.cbf_basis_tint = CircularBasisLayer(radial_basis_spherical)

        self.mlp_rbf_qint = Dense(R, rbf)
        self.mlp_cbf_qint = BasisEmbedding(R, cbf, S)
        self.mlp_sbf_qint = BasisEmbedding(R, sbf, S**2)
        self.mlp_rbf_aeint = Dense(R, rbf)
        self.mlp_cbf_aeint = BasisEmbedding(R, cbf, S)
        self.mlp_rbf_eaint = Dense(R, rbf)
        self.mlp_cbf_eaint = BasisEmbedding(R, cbf, S)
        self.mlp_rbf_aint = BasisEmbedding(R, rbf)
        self.mlp_rbf_tint = Dense(R, rbf)
        self.mlp_cbf_tint = BasisEmbedding(R, cbf, S)
        self.mlp_rbf_h = Dense(R, rbf)
        self.mlp_rbf_out = Dense(R, rbf)
        self.edge_emb = EdgeEmbedding(config.emb_size_atom, R, config.emb_size_edge, config.dropout)

        # These projections are used by every block (mlp_rbf_out by every output block), so
        # their gradients are divided by the number of users, as JMP does after backward.
        nb = config.num_blocks
        for layer, users in [(self.mlp_rbf_tint, nb), (self.mlp_cbf_tint, nb), (self.mlp_rbf_h, nb),
                             (self.mlp_rbf_out, nb + 1), (self.mlp_rbf_qint, nb),
                             (self.mlp_cbf_qint, nb), (self.mlp_sbf_qint, nb), (self.mlp_rbf_aeint, nb),
                             (self.mlp_cbf_aeint, nb), (self.mlp_rbf_eaint, nb),
                             (self.mlp_cbf_eaint, nb), (self.mlp_rbf_aint, nb)]:
            layer.users = users

    def forward(self, graphs: dict) -> dict:
        main, a2ee2a, a2a, qint = graphs["main"], graphs["a2ee2a"], graphs["a2a"], graphs["qint"]
        trip_e2e, trip_a2e, trip_e2a, quad = graphs["trip_e2e"], graphs["trip_a2e"], graphs["trip_e2a"], graphs["quad"]
        V_main, V_a2ee2a, V_qint = main["vector"], a2ee2a["vector"], qint["vector"]
        num_atoms, kmax, quad_edges = graphs["num_atoms"], graphs["kmax"], graphs["quad_edges"]
        num_main, num_a2ee2a, num_qint = V_main.shape[0], V_a2ee2a.shape[0], V_qint.shape[0]

        rad_main = self.radial_basis(main["distance"])
        # One module, one input: the shared spherical radial basis is evaluated once.
        rad_spherical_main = self.cbf_basis_tint.radial_basis(main["distance"])

        # Triplet angles (cos of the angle between the out edge c->a and the in edge b->a).
        cir_e2e = self.cbf_basis_tint(triplet_cos(V_main, V_main, trip_e2e))
        cir_a2e = self.cbf_basis_aeint(triplet_cos(V_main, V_a2ee2a, trip_a2e))
        cir_e2a = self.cbf_basis_eaint(triplet_cos(V_a2ee2a, V_main, trip_e2a))

        # Quadruplet d->b->a<-c: angle a-b-d, angle c-a-b and the dihedral between the planes.
        t_in, t_out = quad["triplet_in"], quad["triplet_out"]
        V_ba_in, V_db = ops.gather(V_qint, t_in["out"]), ops.gather(V_main, t_in["in"])
        V_ca, V_ba_out = ops.gather(V_main, t_out["out"]), ops.gather(V_qint, t_out["in"])
        cos_abd = cos_angle(V_ba_in, V_db)
        cos_cab = cos_angle(V_ca, V_ba_out)
        cos_dihedral = cos_angle_between(ops.gather(torch.linalg.cross(V_ca, V_ba_out), quad["trip_out_to_quad"]),
                                         ops.gather(torch.linalg.cross(V_db, V_ba_in), quad["trip_in_to_quad"]))
        cir_qint = self.cbf_basis_qint(cos_abd)
        sph_cab, sph_dihedral = self.sbf_basis_qint(cos_cab, cos_dihedral)  # [T_out, 7], [Q, 7]
        # Quadruplets are ordered by (output triplet, input triplet), output triplets by out edge.
        sph_qint = (sph_cab, sph_dihedral, _csr_ptr(quad["trip_out_to_quad"], t_out["out"].shape[0]))

        rad_qint_cir = self.mlp_cbf_qint(self.cbf_basis_qint.radial_basis(qint["distance"]))  # [E_q, cbf, 7]
        rad_e2a_cir = self.mlp_cbf_eaint(self.cbf_basis_eaint.radial_basis(a2ee2a["distance"]))  # [E_a, cbf, 7]
        return {
            "rad_main": rad_main,
            "rbf_h": self.mlp_rbf_h(rad_main),
            "rbf_out": self.mlp_rbf_out(rad_main),
            "e2e": {
                "rad": self.mlp_rbf_tint(rad_main),
                "cir": (self.mlp_cbf_tint(rad_spherical_main), cir_e2e, _csr_ptr(trip_e2e["out"], num_main)),
            },
            "qint": {
                "rad": self.mlp_rbf_qint(rad_main),
                # Per input triplet: rad_W1 of its qint edge b->a contracted with Y_l0(cos_abd).
                "cir": ops.segment_contract(rad_qint_cir, cir_qint, _csr_ptr(t_in["out"], num_qint)),
                "sph": (self.mlp_sbf_qint(ops.gather(rad_spherical_main, quad_edges)), sph_qint,
                        _csr_ptr(t_out["out"], num_main)[torch.cat([quad_edges, quad_edges.new_full((1,), num_main)])]),
                "edges": quad_edges,
            },
            "a2e": {
                "rad": self.mlp_rbf_aeint(self.radial_basis_aeaint(a2ee2a["distance"])),
                "cir": (self.mlp_cbf_aeint(rad_spherical_main), cir_a2e, _csr_ptr(trip_a2e["out"], num_main)),
            },
            "e2a": {
                "rad": self.mlp_rbf_eaint(rad_main),
                "cir": (_padded_rad(rad_e2a_cir, a2ee2a, num_atoms, kmax["a2ee2a"]),
                        cir_e2a, _csr_ptr(trip_e2a["out"], num_a2ee2a)),
            },
            "a2a_rad": (self.mlp_rbf_aint(self.radial_basis_aint(a2a["distance"])),
                        _csr_ptr(a2a["edge_index"][1], num_atoms)),
        }


def _csr_ptr(index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """CSR pointer [num_segments + 1] of an ascending segment index [T] (triplets / quadruplets
    over their out edge or output triplet, as jmp_ext.ops orders them; a2a edges over their target).
    int64 whatever the index's dtype; the boundaries in its dtype, so that an int32 index is not
    copied to int64 first (a third of the time for a million quadruplets)."""
    return torch.searchsorted(index, torch.arange(num_segments + 1, device=index.device, dtype=index.dtype))


def _padded_rad(rad_W1: torch.Tensor, graph: dict, num_atoms: int, kmax: int) -> torch.Tensor:
    """[E, I(, S)] per-edge projections -> [N, I, Kmax(*S)] per target atom (col = neighbour rank)."""
    padded = ops.ragged_to_padded(rad_W1, graph["edge_index"][1], graph["target_neighbor_idx"], num_atoms, kmax)
    return padded.transpose(1, 2).reshape(num_atoms, rad_W1.shape[1], -1)
