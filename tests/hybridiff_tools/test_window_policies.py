"""The window-policy measurement: PSNR against the first variant and the step counts per phase."""

import pytest

from hybridiff.protocol import Mode, WindowGuidance
from hybridiff_tools.bench.window_policies import Variant, default_variants, format_table, run


@pytest.mark.slow(reason="loads its own in-process pair and runs 2 variants: ~5 s on the shared 2-core VM")
def test_the_measurement_counts_phases_and_measures_against_exact_cfg(model_dirs):
    every_2nd = {"l_slope": 3, "tau_cap": 4, "k": 3, "refresh_every": 2}  # the window 4..7 of 0..7
    variants = [
        Variant("cfg-parallel", Mode.CFG_PARALLEL),
        Variant("every 2nd", Mode.HYBRID, WindowGuidance.REFRESHED_DIFFERENCE, every_2nd),
    ]
    result = run(model_dirs["sdxl"], variants, (11,), 8, log=lambda _: None, prompts=1)
    exact, refreshed = result["variants"]["cfg-parallel"], result["variants"]["every 2nd"]
    assert exact["psnr_min"] == float("inf") and exact["data_parallel"] == 8
    assert (refreshed["pipelined"], refreshed["fills"], refreshed["data_parallel"]) == (2, 2, 4)
    assert 20 < refreshed["psnr_min"] < float("inf") and 0 < refreshed["ssim_min"] < 1
    assert "| every 2nd |" in format_table(result)
    assert default_variants()[0].name == "cfg-parallel"
