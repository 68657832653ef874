"""BackboneConfig: GemNet-OC hyperparameters under JMP's field names.

A config stored in a JMP checkpoint (or the fixtures' meta.json) builds the same model through
`BackboneConfig.from_dict`. Every field of JMP's `BackboneConfig` is accepted so that such dicts
load unchanged; fields that select a variant JMP never uses (other bases, activations, learnable
RBFs, partial models) accept only the value JMP uses, and say so when given another one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


# Fields that select a GemNet-OC variant JMP never uses, and num_spherical (JMP's literal Y_l0
# stop at l=6): only their defaults are implemented.
_FIXED = ("rbf", "rbf_spherical", "cbf", "sbf", "activation", "quad_interaction", "atom_edge_interaction",
          "edge_atom_interaction", "atom_interaction", "scale_basis", "learnable_rbf", "learnable_rbf_stds",
          "unique_basis_per_layer", "forces_coupled", "scale_backprop_forces", "num_spherical")


@dataclass(kw_only=True)
class BackboneConfig:
    """GemNet-OC sizes and switches. Defaults are JMP-S (`BackboneConfig.base()` in JMP)."""

    # --- sizes ---
    num_blocks: int = 4
    """Interaction blocks (there are num_blocks + 1 output blocks)."""
    emb_size_atom: int = 256
    emb_size_edge: int = 512
    emb_size_trip_in: int = 64
    emb_size_trip_out: int = 64
    emb_size_quad_in: int = 32
    emb_size_quad_out: int = 32
    emb_size_aint_in: int = 64
    emb_size_aint_out: int = 64
    emb_size_rbf: int = 16
    emb_size_cbf: int = 16
    emb_size_sbf: int = 32
    num_spherical: int = 7
    """Order of the circular / spherical bases (l < num_spherical); JMP's literal Y_l0 stop at l=6."""
    num_radial: int = 128
    """Gaussians of the radial basis, centred on [0, 1] in units of absolute_rbf_cutoff."""
    # --- depths ---
    num_before_skip: int = 2
    num_after_skip: int = 2
    num_concat: int = 1
    num_atom: int = 3
    num_output_afteratom: int = 3
    num_atom_emb_layers: int = 2
    num_global_out_layers: int = 2
    num_elements: int = 120
    """Rows of the atom embedding (atomic numbers 1..num_elements)."""
    # --- behaviour ---
    regress_forces: bool = True
    direct_forces: bool = True
    """With both True the backbone has the direct-force branch (seq_forces, dense_rbf_F, out_mlp_F)."""
    absolute_rbf_cutoff: float = 12.0
    """Å. Every radial basis is evaluated on d / absolute_rbf_cutoff, whatever the graph cutoff."""
    envelope: dict = field(default_factory=lambda: {"name": "polynomial", "exponent": 5})
    qint_tags: list = field(default_factory=lambda: [1, 2])
    """JMP's field, kept so its configs load; the graphs read GraphConfig.qint_tags."""
    dropout: float | None = None
    """Dropout after the backbone's Dense layers that take it (None in every JMP config; JMP's
    mp_is_metal dropout is the head's, HeadConfig.dropout)."""
    edge_dropout: float | None = None
    """Probability of dropping a2a edges while training (JMP pretraining: 0.1)."""
    # --- accepted for compatibility; only JMP's value is supported ---
    rbf: dict = field(default_factory=lambda: {"name": "gaussian"})
    rbf_spherical: dict | None = None
    cbf: dict = field(default_factory=lambda: {"name": "spherical_harmonics"})
    sbf: dict = field(default_factory=lambda: {"name": "legendre_outer"})
    activation: str = "scaled_silu"
    quad_interaction: bool = True
    atom_edge_interaction: bool = True
    edge_atom_interaction: bool = True
    atom_interaction: bool = True
    scale_basis: bool = False
    learnable_rbf: bool = False
    learnable_rbf_stds: bool = False
    unique_basis_per_layer: bool = False
    forces_coupled: bool = False
    scale_backprop_forces: bool = False
    # --- inert in JMP's backbone (read elsewhere or not at all); any value is accepted ---
    num_targets: int = 1
    regress_energy: bool = True
    use_pbc: bool = True
    extensive: bool = True
    otf_graph: bool = False
    scale_file: str | None = None

    def __post_init__(self) -> None:
        fixed = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                 for f in dataclasses.fields(self) if f.name in _FIXED}
        for name, value in fixed.items():
            if getattr(self, name) != value:
                raise ValueError(
                    f"BackboneConfig.{name}={getattr(self, name)!r} is not supported: JMP's GemNet-OC "
                    f"uses {name}={value!r} and only that variant is implemented"
                )
        if self.envelope.get("name") != "polynomial" or set(self.envelope) - {"name", "exponent"}:
            raise ValueError(f"BackboneConfig.envelope must be {{'name': 'polynomial', 'exponent': p}}, got {self.envelope}")
        for name in ("num_blocks", "emb_size_atom", "emb_size_edge", "emb_size_trip_in", "emb_size_trip_out",
                     "emb_size_quad_in", "emb_size_quad_out", "emb_size_aint_in", "emb_size_aint_out",
                     "emb_size_rbf", "emb_size_cbf", "emb_size_sbf", "num_radial", "num_elements"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"BackboneConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_output_afteratom < 1:
            raise ValueError("BackboneConfig.num_output_afteratom must be >= 1 (JMP's output blocks always "
                             f"add the atom embedding back), got {self.num_output_afteratom}")
        for name in ("dropout", "edge_dropout"):
            p = getattr(self, name)
            if p is not None and not 0.0 <= p < 1.0:
                raise ValueError(f"BackboneConfig.{name} must be None or in [0, 1), got {p}")
        if self.absolute_rbf_cutoff <= 0:
            raise ValueError(f"BackboneConfig.absolute_rbf_cutoff must be > 0 Å, got {self.absolute_rbf_cutoff}")

    @property
    def has_force_branch(self) -> bool:
        return self.regress_forces and self.direct_forces

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BackboneConfig":
        """Builds a config from JMP field names; unknown names raise a ValueError that lists them
        (a bare `cls(**values)` would raise a TypeError that names only the first)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown BackboneConfig field(s): {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def jmp_s(cls, **overrides) -> "BackboneConfig":
        """JMP-S (JMP's `BackboneConfig.base()`): 4 blocks, atom 256, edge 512."""
        return cls.from_dict(overrides)

    @classmethod
    def jmp_l(cls, **overrides) -> "BackboneConfig":
        """JMP-L (JMP's `BackboneConfig.large()`): 6 blocks, atom 256, edge 1024, 4 concat layers."""
        sizes = dict(num_blocks=6, emb_size_atom=256, emb_size_edge=1024, emb_size_trip_in=64,
                     emb_size_trip_out=128, emb_size_quad_in=64, emb_size_quad_out=32,
                     emb_size_aint_in=64, emb_size_aint_out=64, emb_size_rbf=32, emb_size_cbf=16,
                     emb_size_sbf=64, num_concat=4)
        return cls.from_dict({**sizes, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "BackboneConfig":
        """The reference fixtures' configuration (2 blocks, atom 32, edge 64): tests and demos."""
        sizes = dict(num_blocks=2, emb_size_atom=32, emb_size_edge=64, emb_size_trip_in=16,
                     emb_size_trip_out=16, emb_size_quad_in=8, emb_size_quad_out=8,
                     emb_size_aint_in=16, emb_size_aint_out=16, emb_size_rbf=8, emb_size_cbf=8,
                     emb_size_sbf=16)
        return cls.from_dict({**sizes, **overrides})
