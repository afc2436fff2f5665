"""The built-in specimens (:func:`make_specimen`): amorphous films, SrTiO3 [001], Si [110], a Au
particle on carbon and a crystal edge under an amorphous film.

Conventions: see :mod:`scherzer.simulators.specimen`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numba
import numpy as np

from scherzer.simulators.specimen.model import (
    AVOGADRO_PER_MOL,
    CARBON_MOLAR_MASS_G,
    Specimen,
)

# --------------------------------------------------------------------------------------------
# Built-in specimens
# --------------------------------------------------------------------------------------------


@numba.njit(cache=True)
def _rsa_place(cand, box, dmin, n_target, out):  # pragma: no cover - numba
    """Random sequential addition: accept candidates ≥ dmin from all accepted atoms.

    Periodic in y and x (box[0], box[1]), open in z. Returns the number placed in ``out``.
    """
    ncell = np.empty(3, dtype=np.int64)
    for d in range(3):
        ncell[d] = max(1, int(box[d] / dmin))
    cap = 32
    cells = -np.ones((ncell[0], ncell[1], ncell[2], cap), dtype=np.int64)
    count = np.zeros((ncell[0], ncell[1], ncell[2]), dtype=np.int64)
    d2min = dmin * dmin
    placed = 0
    for c in range(cand.shape[0]):
        if placed >= n_target:
            break
        p = cand[c]
        ci = np.empty(3, dtype=np.int64)
        for d in range(3):
            ci[d] = min(ncell[d] - 1, int(p[d] / box[d] * ncell[d]))
        ok = True
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                for dzc in range(-1, 2):
                    cz = ci[2] + dzc
                    if cz < 0 or cz >= ncell[2]:
                        continue
                    cy = (ci[0] + dy) % ncell[0]
                    cx = (ci[1] + dx) % ncell[1]
                    for m in range(count[cy, cx, cz]):
                        q = out[cells[cy, cx, cz, m]]
                        ry = p[0] - q[0]
                        ry -= box[0] * np.round(ry / box[0])
                        rx = p[1] - q[1]
                        rx -= box[1] * np.round(rx / box[1])
                        rz = p[2] - q[2]
                        if ry * ry + rx * rx + rz * rz < d2min:
                            ok = False
                            break
                    if not ok:
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok and count[ci[0], ci[1], ci[2]] < cap:
            out[placed] = p
            cells[ci[0], ci[1], ci[2], count[ci[0], ci[1], ci[2]]] = placed
            count[ci[0], ci[1], ci[2]] += 1
            placed += 1
    return placed


def amorphous_film(
    extent_A: tuple[float, float],
    thickness_A: float,
    rng: np.random.Generator,
    *,
    z0_A: float = 0.0,
    density_g_cm3: float = 2.0,
    min_distance_A: float = 1.4,
) -> np.ndarray:
    """Positions (N, 3) (y, x, z in Å) of an amorphous carbon film, laterally periodic.

    N = ρ N_A / M · volume (ρ in g/cm³; 2.0 g/cm³ → 0.1003 atoms/Å³); atoms are placed by random
    sequential addition with a minimum separation ``min_distance_A`` (minimum-image in y, x).
    """
    if thickness_A <= 0 or density_g_cm3 <= 0:
        raise ValueError("amorphous film thickness and density must be positive")
    ly, lx = extent_A
    n_per_A3 = density_g_cm3 / CARBON_MOLAR_MASS_G * AVOGADRO_PER_MOL * 1e-24
    n = round(n_per_A3 * ly * lx * thickness_A)
    box = np.array([ly, lx, thickness_A], dtype=np.float64)
    out = np.zeros((n, 3), dtype=np.float64)
    placed = 0
    for factor in (4, 8, 16):
        cand = rng.random((factor * n + 64, 3)) * box
        placed = int(_rsa_place(cand, box, float(min_distance_A), n, out))
        if placed >= n:
            break
    if placed < n:
        raise ValueError(
            f"could not place {n} atoms at {min_distance_A} Å separation; lower the density "
            "or min_distance_A"
        )
    out[:, 2] += z0_A
    return out


# Approximate room-temperature mean-square displacements ⟨u²⟩ (Å², one axis) per element.
_U2_A2 = {6: 0.0, 8: 0.0085, 14: 0.0059, 22: 0.0055, 38: 0.0075, 79: 0.0079}


def _u2(numbers: np.ndarray) -> np.ndarray:
    return np.array([_U2_A2.get(int(z), 0.006) for z in numbers], dtype=np.float64)


def _tile_cell(
    frac: np.ndarray,
    numbers: list[int],
    cell_A: tuple[float, float, float],
    box_A: tuple[float, float, float],
    origin_A: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Tile a rectangular unit cell (fractional (y, x, z) coordinates) over a box from origin."""
    by, bx, bz = box_A
    iy, ix, iz = (np.arange(math.ceil(b / c)) for b, c in zip(box_A, cell_A, strict=True))
    g = np.stack(np.meshgrid(iy, ix, iz, indexing="ij"), -1).reshape(-1, 1, 3)
    pos = ((g + frac[None]) * np.array(cell_A)).reshape(-1, 3)
    num = np.tile(np.asarray(numbers), len(g))
    keep = (pos[:, 0] < by - 1e-9) & (pos[:, 1] < bx - 1e-9) & (pos[:, 2] < bz - 1e-9)
    return pos[keep] + np.asarray(origin_A), num[keep]


def _srtio3_cell() -> tuple[np.ndarray, list[int], tuple[float, float, float]]:
    a = 3.905
    frac = np.array(
        [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], dtype=float
    )
    return frac, [38, 22, 8, 8, 8], (a, a, a)


def _si110_cell() -> tuple[np.ndarray, list[int], tuple[float, float, float]]:
    """Si (diamond, a = 5.431 Å) with y ∥ [001], x ∥ [1-10], z ∥ [110] (dumbbells along y)."""
    a = 5.431
    frac = np.array([[0, 0, 0], [0.25, 0, 0.5], [0.5, 0.5, 0.5], [0.75, 0.5, 0]], dtype=float)
    return frac, [14, 14, 14, 14], (a, a / math.sqrt(2), a / math.sqrt(2))


_CRYSTALS = {"srtio3_001": _srtio3_cell, "si_110": _si110_cell}


def _field_A(field_nm: tuple[float, float]) -> tuple[float, float]:
    try:
        fy, fx = (float(v) * 10.0 for v in field_nm)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"field_nm must be two numbers (y, x) in nm; got {field_nm!r}") from exc
    if not (fy > 0 and fx > 0 and math.isfinite(fy) and math.isfinite(fx)):
        raise ValueError(f"field_nm must be positive; got {field_nm!r}")
    return fy, fx


def _crystal(
    name: str, field_nm: tuple[float, float], seed: int, thickness_nm: float = 4.0
) -> Specimen:
    ext = _field_A(field_nm)
    frac, nums, cell = _CRYSTALS[name]()
    pos, num = _tile_cell(frac, nums, cell, (*ext, thickness_nm * 10.0))
    return Specimen(
        name=name,
        positions_A=pos,
        numbers=num,
        extent_A=ext,
        thickness_A=thickness_nm * 10.0,
        periodic=True,
        debye_waller_A2=_u2(num),
        description=f"{name} crystal, {thickness_nm} nm thick (seam at the field edge unless "
        "the field is a multiple of the cell)",
        metadata={"cell_A": cell, "seed": seed},
    )


def _srtio3_001(field_nm: tuple[float, float], seed: int = 0, thickness_nm: float = 4.0):
    """SrTiO3 (cubic perovskite, a = 3.905 Å) viewed along [001]."""
    return _crystal("srtio3_001", field_nm, seed, thickness_nm)


def _si_110(field_nm: tuple[float, float], seed: int = 0, thickness_nm: float = 4.0):
    """Si viewed along [110] (y ∥ [001], x ∥ [1-10])."""
    return _crystal("si_110", field_nm, seed, thickness_nm)


def _amorphous_carbon(
    field_nm: tuple[float, float],
    seed: int = 0,
    thickness_nm: float = 2.0,
    density_g_cm3: float = 2.0,
) -> Specimen:
    """A laterally periodic amorphous carbon film (weak-phase object when thin)."""
    ext = _field_A(field_nm)
    rng = np.random.default_rng(seed)
    pos = amorphous_film(ext, thickness_nm * 10.0, rng, density_g_cm3=density_g_cm3)
    return Specimen(
        name="amorphous_carbon",
        positions_A=pos,
        numbers=np.full(len(pos), 6),
        extent_A=ext,
        thickness_A=thickness_nm * 10.0,
        periodic=True,
        description=f"amorphous carbon film {thickness_nm} nm, {density_g_cm3} g/cm³",
        metadata={"seed": seed, "density_g_cm3": density_g_cm3},
    )


def _au_particle_on_carbon(
    field_nm: tuple[float, float],
    seed: int = 0,
    particle_diameter_nm: float = 3.0,
    film_thickness_nm: float = 3.0,
) -> Specimen:
    """A spherical Au fcc particle (a = 4.078 Å, [001] along the beam) on an a-C film.

    The particle sits on top of the film (its atoms downstream of the film), centred laterally.
    """
    ext = _field_A(field_nm)
    rng = np.random.default_rng(seed)
    t_film = film_thickness_nm * 10.0
    film = amorphous_film(ext, t_film, rng)
    a, r = 4.078, particle_diameter_nm * 5.0
    fcc = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], dtype=float)
    side = 2 * r + a
    au, _ = _tile_cell(fcc, [79] * 4, (a, a, a), (side, side, side))
    au -= au.mean(axis=0)
    au = au[np.sum(au**2, axis=1) <= r * r]
    au += np.array([ext[0] / 2, ext[1] / 2, t_film + r + 1.0])
    pos = np.concatenate([film, au])
    num = np.concatenate([np.full(len(film), 6), np.full(len(au), 79)])
    return Specimen(
        name="au_particle_on_carbon",
        positions_A=pos,
        numbers=num,
        extent_A=ext,
        thickness_A=t_film + 2 * r + 2.0,
        periodic=True,
        debye_waller_A2=_u2(num),
        description=f"Au particle ⌀{particle_diameter_nm} nm on {film_thickness_nm} nm a-C",
        metadata={"seed": seed, "n_au": len(au)},
    )


def _crystal_edge(
    field_nm: tuple[float, float],
    seed: int = 0,
    crystal: str = "srtio3_001",
    crystal_thickness_nm: float = 3.0,
    film_thickness_nm: float = 2.0,
) -> Specimen:
    """A crystal over the left half of the field (edge ∥ y) under an a-C film over everything.

    The crystal is upstream (z from 0), the film downstream of it.
    """
    if crystal not in _CRYSTALS:
        raise ValueError(f"crystal must be one of {sorted(_CRYSTALS)}; got {crystal!r}")
    ext = _field_A(field_nm)
    rng = np.random.default_rng(seed)
    frac, nums, cell = _CRYSTALS[crystal]()
    t_c = crystal_thickness_nm * 10.0
    xtal, xnum = _tile_cell(frac, nums, cell, (ext[0], ext[1] / 2.0, t_c))
    film = amorphous_film(ext, film_thickness_nm * 10.0, rng, z0_A=t_c)
    pos = np.concatenate([xtal, film])
    num = np.concatenate([xnum, np.full(len(film), 6)])
    return Specimen(
        name="crystal_edge",
        positions_A=pos,
        numbers=num,
        extent_A=ext,
        thickness_A=t_c + film_thickness_nm * 10.0,
        periodic=True,
        debye_waller_A2=_u2(num),
        description=f"{crystal} edge ({crystal_thickness_nm} nm) under {film_thickness_nm} nm a-C",
        metadata={"seed": seed, "crystal": crystal, "edge_x_A": ext[1] / 2.0},
    )


BUILTIN_SPECIMENS: dict[str, Callable[..., Specimen]] = {
    "srtio3_001": _srtio3_001,
    "si_110": _si_110,
    "au_particle_on_carbon": _au_particle_on_carbon,
    "crystal_edge": _crystal_edge,
    "amorphous_carbon": _amorphous_carbon,
}


def make_specimen(name: str, field_nm: tuple[float, float], seed: int = 0, **kw) -> Specimen:
    """Build a built-in specimen over ``field_nm`` (y, x) in nm; ``kw`` are its thickness etc.

    Names: see :data:`BUILTIN_SPECIMENS`. All built-ins are laterally periodic over the field.
    """
    try:
        builder = BUILTIN_SPECIMENS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown specimen {name!r}; built-in specimens are {sorted(BUILTIN_SPECIMENS)}"
        ) from None
    try:
        return builder(field_nm, seed, **kw)
    except TypeError as exc:
        raise ValueError(f"bad parameters for specimen {name!r}: {exc}") from exc
