"""DiffExp on SD 3.5: the CFG schedule's threshold on a flow model's noise levels."""
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

import explore

# --------------------------------------------------------------------------------------------
# the CFG schedule: t_thres (DDPM timesteps) -> the flow step's sigma of the same signal-to-noise ratio

# SD 3.5's scheduler_config.json (stabilityai/stable-diffusion-3.5-large, scheduler/), written out here
# (no download): the flow-matching Euler scheduler, 1000 training timesteps, shift 3
SD35_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def sd35_scheduler(steps):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD35_SCHEDULER)
    scheduler.set_timesteps(steps)
    return scheduler


def sd15_ddim():
    """SD 1.5's scheduler (scheduler_config.json), whose alphas_cumprod DiffExp's t_thres is stated on."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


# Computed independently of explore.py, in 30-digit arithmetic (mpmath): alpha_bar_t as the product of
# (1 - beta_i), beta_i = (sqrt(0.00085) + (sqrt(0.012) - sqrt(0.00085)) i / 999)^2; the sigma s solving
# ((1 - s) / s)^2 = alpha_bar / (1 - alpha_bar); SD 3.5's 40 sigmas as diffusers makes them,
# r_i = 1 - (1 - 0.003 / 1.002) i / 39 (the shifted sigma of timestep 1 is 3 * 0.001 / (1 + 2 * 0.001)),
# then shifted once more, s_i = 3 r_i / (1 + 2 r_i).
#   t_thres:       900         800         700
#   alpha_bar:     0.0141511   0.0368696   0.0825209
#   sigma_thres:   0.8930092   0.8363614   0.7692869
SIGMA_THRES = {900: 0.8930092, 800: 0.8363614, 700: 0.7692869}
# the 40 steps' sigmas around the thresholds: step 10, 11 (900); 14, 15 (800); 18, 19 (700)
SIGMAS_40 = {10: 0.8972793, 11: 0.8846372, 14: 0.8433152, 15: 0.8282797, 18: 0.7787375, 19: 0.7605586}


@pytest.mark.parametrize("t_thres,n_low", [(900, 11), (800, 15), (700, 19)])
def test_cfg_schedule_on_sd35s_40_flow_steps(t_thres, n_low):
    """At SD 3.5's 40 steps, t_thres = 900, 800, 700 give w_low to the first 11, 15, 19 steps: those
    noisier than DDPM's t_thres (SD 1.5's 50 DDIM steps give it to their first 5, 10, 15)."""
    assert explore.flow_threshold(t_thres) == pytest.approx(SIGMA_THRES[t_thres], abs=1e-6)
    scheduler = sd35_scheduler(40)
    got = explore.cfg_schedule(scheduler, w_high=4.5, w_low=1.0, t_thres=t_thres)
    assert got.shape == (40,) and got.dtype.is_floating_point
    assert got.tolist() == [1.0] * n_low + [4.5] * (40 - n_low)
    # the last low step and the first guided one sit on either side of the threshold
    last, first = scheduler.sigmas[n_low - 1].item(), scheduler.sigmas[n_low].item()
    assert last == pytest.approx(SIGMAS_40[n_low - 1], abs=1e-6) and first == pytest.approx(SIGMAS_40[n_low], abs=1e-6)
    assert last > SIGMA_THRES[t_thres] > first


def test_the_threshold_has_ddpms_signal_to_noise_ratio():
    """The mapping's definition, checked with diffusers' own SD 1.5 alpha_bar (DDIMScheduler's, float32):
    a flow sample x = (1 - s) x_0 + s eps at s = flow_threshold(t) has SNR ((1 - s) / s)^2, DDPM's x_t
    has a_t / (1 - a_t); they agree at every t, and the threshold falls as t does (less noise)."""
    a = sd15_ddim().alphas_cumprod.double()
    torch.testing.assert_close(explore.sd_alphas_cumprod(), a, rtol=1e-5, atol=0)
    s = torch.tensor([explore.flow_threshold(t) for t in range(1000)], dtype=torch.float64)
    torch.testing.assert_close(((1 - s) / s) ** 2, a / (1 - a), rtol=1e-4, atol=0)
    assert (s.diff() > 0).all()
    # beyond the chain: below 0 every step is noisier than t_thres, from 1000 on none is
    assert explore.flow_threshold(-1) == 0.0 and explore.flow_threshold(1000) == 1.0
    scheduler = sd35_scheduler(40)
    assert explore.cfg_schedule(scheduler, 4.5, 1.0, t_thres=-1).tolist() == [1.0] * 40
    assert explore.cfg_schedule(scheduler, 4.5, 1.0, t_thres=1000).tolist() == [4.5] * 40


def test_cfg_schedule_takes_a_ddim_scheduler_or_its_timesteps_and_refuses_a_flow_models_timesteps():
    ddim = sd15_ddim()
    ddim.set_timesteps(50)
    assert torch.equal(explore.cfg_schedule(ddim, 7.5, 1.0, 800), explore.cfg_schedule(ddim.timesteps, 7.5, 1.0, 800))
    assert explore.cfg_schedule(ddim, 7.5, 1.0, 800).tolist() == [1.0] * 10 + [7.5] * 40
    # SD 3.5's timesteps are sigma * 1000: compared with t_thres as DDPM's they would give w_low to the
    # first 17 steps (sigma > 0.8), not 15; they are refused instead
    with pytest.raises(ValueError, match="pass the scheduler itself"):
        explore.cfg_schedule(sd35_scheduler(40).timesteps, 4.5, 1.0, 800)
