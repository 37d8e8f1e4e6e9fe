import pytest
from torch import nn

from mcl.compiling import check_compile_settings, compile_in_place


def test_compile_settings_are_checked_by_name():
    assert check_compile_settings("max-autotune", "inductor") == "max-autotune"
    with pytest.raises(ValueError, match="compile_mode='fastest' is invalid"):
        check_compile_settings("fastest", "inductor")
    with pytest.raises(ValueError, match="compile_backend='nope' is invalid"):
        check_compile_settings("default", "nope")
    with pytest.raises(ValueError, match="compile_mode='reduce-overhead' needs compile_backend=inductor"):
        check_compile_settings("reduce-overhead", "eager")


def test_modules_compile_in_place_once():
    modules = [nn.Linear(2, 2), nn.Linear(2, 3)]
    compile_in_place(modules, "default", "eager")
    calls = [module._compiled_call_impl for module in modules]
    assert all(call is not None for call in calls)
    compile_in_place(modules, "default", "eager")
    assert [module._compiled_call_impl for module in modules] == calls
    assert set(modules[0].state_dict()) == {"weight", "bias"}  # no _orig_mod. prefix
