"""``benchmarks/fingerprint.py``: a few configurations' training step recomputed bit for bit against the committed
reference, and ``--check`` failing on a difference."""

import importlib
import json

import pytest

# About a second each: FPN with 4 levels at 32 px (1x1 tiles), the interp neck on C4, and the supervised method with
# every pyramid map of every image (preset=official).
CHEAP = ("levels4_32px", "interp_stage4_32px", "supervised_official")


@pytest.fixture(scope="module")
def fingerprint():
    """``benchmarks/fingerprint.py`` as a module, imported in this process."""
    return importlib.import_module("benchmarks.fingerprint")


@pytest.fixture(scope="module")
def reference(fingerprint):
    return json.loads(fingerprint.REFERENCE.read_text())


def test_the_reference_holds_every_configuration(fingerprint, reference):
    assert len(fingerprint.CONFIGURATIONS) >= 10
    assert set(reference["configurations"]) == set(fingerprint.CONFIGURATIONS)
    for name, overrides in fingerprint.CONFIGURATIONS.items():
        assert reference["configurations"][name]["overrides"] == overrides


@pytest.mark.parametrize("name", CHEAP)
def test_a_training_step_is_bit_for_bit_the_reference(fingerprint, reference, name):
    recorded = {key: reference[key] for key in fingerprint.machine()}
    if recorded != fingerprint.machine():
        pytest.skip(f"the reference was recorded with {recorded}, this machine has {fingerprint.machine()}")
    assert fingerprint.fingerprint(fingerprint.CONFIGURATIONS[name]) == reference["configurations"][name]


def test_check_names_the_configuration_and_the_value_that_differ(fingerprint, reference, tmp_path, capsys):
    changed = json.loads(json.dumps(reference))
    changed.update(fingerprint.machine())
    changed["configurations"]["interp_stage4_32px"]["gradients"]["neck"] = "0" * 16
    path = tmp_path / "fingerprint.json"
    path.write_text(json.dumps(changed))
    assert fingerprint.main(["--check", "--only", "interp_stage4_32px", "--reference", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["interp_stage4_32px", "DIFFERS:", "gradients.neck"]
    assert lines[1].startswith("0 of 1 configurations identical")
