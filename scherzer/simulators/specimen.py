"""Specimens: atoms, projected potentials and exit waves.

Conventions: lengths in Å inside this module; positions are (y, x, z) with z along the beam
(increasing downstream); the lateral field is ``extent_A = (ly, lx)``. Specimens are periodic
laterally when ``periodic`` is true (crystals tiled over the field); otherwise atoms outside the
field are simply absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Specimen"]


@dataclass
class Specimen:
    """An atomic model over a lateral field.

    ``positions_A``: (N, 3) float64 as (y, x, z) in Å. ``numbers``: (N,) atomic numbers.
    ``extent_A``: (ly, lx) of the field in Å. ``thickness_A``: extent along z.
    ``debye_waller_A2``: optional (N,) mean-square displacements ⟨u²⟩ in Å² (thermal smearing).
    """

    name: str
    positions_A: np.ndarray
    numbers: np.ndarray
    extent_A: tuple[float, float]
    thickness_A: float
    periodic: bool = False
    debye_waller_A2: np.ndarray | None = None
    description: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.positions_A = np.asarray(self.positions_A, dtype=np.float64).reshape(-1, 3)
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        if len(self.numbers) != len(self.positions_A):
            raise ValueError(
                f"{len(self.numbers)} atomic numbers for {len(self.positions_A)} positions"
            )
        if np.any(self.numbers < 1) or np.any(self.numbers > 103):
            raise ValueError("atomic numbers must be 1..103")
        if self.debye_waller_A2 is not None:
            self.debye_waller_A2 = np.asarray(self.debye_waller_A2, dtype=np.float64).reshape(-1)
