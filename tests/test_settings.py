"""The one declaration of instrument settings and the typed processing-step settings built at the
edge: CLI flags, plan fields and step keys derive from it; bad settings fail with their name."""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest

from scherzer.daemon.plans import PROCESSING_STEPS, FocalSeries, parse_plan
from scherzer.processing.focal import FocalParams
from scherzer.processing.pipeline import STEPS
from scherzer.processing.registration import AlignParams
from scherzer.processing.steps import (
    STEP_NAMES,
    AlignStep,
    FocalRegisterStep,
    RestoreStep,
    StepSettingsError,
    parse_step,
)
from scherzer.settings import (
    INSTRUMENT_SETTINGS,
    OPTICS_SETTINGS,
    add_instrument_arguments,
    instrument_overrides,
)


def test_step_tables_agree():
    assert set(STEP_NAMES) == set(STEPS) == set(PROCESSING_STEPS)


def test_every_declared_setting_becomes_a_flag_with_its_unit():
    p = argparse.ArgumentParser()
    add_instrument_arguments(p)
    text = p.format_help()
    for s in INSTRUMENT_SETTINGS:
        assert s.flag in text
        assert s.unit.split(",")[0] in text
    args = p.parse_args(["--voltage-kv", "200", "--step-nm", "-5"])
    assert args.voltage_kv == 200.0 and args.step_nm == -5.0 and args.cs_mm is None


@pytest.mark.parametrize("command", ["restore"])
def test_cli_help_lists_every_instrument_flag(command):
    out = subprocess.run(
        [sys.executable, "-m", "scherzer", command, "--help"], capture_output=True, text=True
    ).stdout
    for s in INSTRUMENT_SETTINGS:
        assert s.flag in out, s.flag


def test_optics_settings_are_optics_fields():
    from scherzer.optics import Optics

    assert set(OPTICS_SETTINGS) <= set(Optics.model_fields)


def test_instrument_overrides_name_the_bad_setting():
    assert instrument_overrides(voltage_kv=300).given() == {"voltage_kv": 300.0}
    with pytest.raises(ValueError, match="voltage_kv"):
        instrument_overrides(voltage_kv=float("inf"))
    with pytest.raises(ValueError, match="voltage_kv"):
        instrument_overrides(voltage_kv=1e9)
    with pytest.raises(ValueError, match="colour"):
        instrument_overrides(colour=3)


def test_plan_fields_take_description_and_bounds_from_the_declaration():
    f = FocalSeries.model_fields["start_nm"]
    assert "nominal defocus" in (f.description or "")
    with pytest.raises(ValueError, match="start_nm"):
        FocalSeries(start_nm=float("nan"))
    assert FocalSeries(start_nm=-80).start_nm == -80.0


def test_parse_step_builds_typed_settings():
    a = parse_step({"step": "align", "alpha": 0.25, "roi": [0, 0, 32, 32], "signal": "ABF"})
    assert isinstance(a, AlignStep) and isinstance(a.settings, AlignParams)
    assert a.settings.alpha == 0.25 and a.settings.roi == (0, 0, 32, 32) and a.signal == "ABF"
    f = parse_step({"step": "focal_register", "cs_mm": 1.2, "crystal": True, "mtf": [1.0, 0.5]})
    assert isinstance(f, FocalRegisterStep) and isinstance(f.settings, FocalParams)
    assert f.settings.crystal is True and f.instrument.given() == {"cs_mm": 1.2}
    np.testing.assert_array_equal(f.camera.mtf, [1.0, 0.5])
    r = parse_step({"step": "restore", "iterations": 2, "exclude": [3], "area": [0, 0, 64, 64]})
    assert isinstance(r, RestoreStep) and r.settings.exclude == (3,)
    assert r.register.exclude == (3,) and r.register.area == (0, 0, 64, 64)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"step": "align", "alhpa": 0.5}, "alhpa"),
        ({"step": "align", "neighbours": "many"}, "neighbours"),
        ({"step": "focal_register", "cs_mm": "x"}, "cs_mm"),
        ({"step": "restore", "iterations": [1]}, "iterations"),
        ({"step": "restore", "mtf": "/etc/passwd"}, "mtf"),
        ({"step": "nope"}, "nope"),
        (42, "a step is a name"),
    ],
)
def test_bad_step_settings_fail_at_the_edge_with_their_name(spec, message):
    with pytest.raises(StepSettingsError, match=message):
        parse_step(spec)


def test_plan_refuses_bad_processing_settings_and_paths():
    base = {"kind": "focal_series"}
    with pytest.raises(ValueError, match="iterations"):
        parse_plan({**base, "processing": [{"step": "restore", "iterations": "lots"}]})
    with pytest.raises(ValueError, match="calibrations directory"):
        parse_plan({**base, "processing": [{"step": "restore", "mtf": "/etc/shadow"}]})
    ok = parse_plan({**base, "processing": [{"step": "restore", "iterations": 2}]})
    assert ok.processing == [{"step": "restore", "iterations": 2}]


def test_ftsr_parameters_reach_the_instrument():
    from scherzer.processing.focal import instrument_from_stack
    from scherzer.simulators.hrtem import simulate_focal_series

    stack = simulate_focal_series("amorphous_carbon", n=3, size=64, seed=0)
    step = parse_step(
        {"step": "focal_register", "a2_nm": 850, "a2_deg": -100, "vibration_nm": 0.03,
         "defocus_list_nm": [-150, -140, -130]}
    )  # fmt: skip
    optics, _, nominal = instrument_from_stack(stack, **step.instrument.given())
    assert (optics.a2_nm, optics.a2_deg, optics.vibration_nm) == (850.0, -100.0, 0.03)
    np.testing.assert_array_equal(nominal, [-150, -140, -130])
    with pytest.raises(StepSettingsError, match="defocus_list_nm"):
        parse_step({"step": "restore", "defocus_list_nm": [1.0, "x"]})


def test_registration_area_is_separate_from_the_restored_area():
    from scherzer.processing.steps import restore_steps

    register, restore = restore_steps(
        {"area": (0, 0, 128, 128), "register_area": (64, 64, 64, 64), "iterations": 1}
    )
    assert register.settings.area == (64, 64, 64, 64)
    assert restore.settings.area == (0, 0, 128, 128) and restore.settings.iterations == 1
