"""The FLUX.2 noise schedule: empirical mu and the exponentially shifted sigmas (spec section 9).

Both references agree (BFL `get_schedule`; diffusers `compute_empirical_mu` with
`FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")`).
The schedule depends only on two static integers, so it is computed here on the host in numpy,
reproducing diffusers' float32 arithmetic step by step, and handed to the compiled sampler as an
array: a custom schedule does not recompile anything.
"""

from __future__ import annotations

import math

import numpy as np

# Linear fits of mu in the image token count, at 10 steps (a1, b1) and at 200 steps (a2, b2).
_A1, _B1 = 8.73809524e-05, 1.89833333
_A2, _B2 = 0.00016927, 0.45666666
_LONG_SEQUENCE = 4300  # above this many image tokens mu no longer depends on the step count

NUM_TRAIN_TIMESTEPS = 1000  # the pipelines feed the model sigma * 1000 / 1000 (see `model_timestep`)


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """mu of the time shift for `image_seq_len` noisy-image tokens (references not counted).

    Up to 4300 tokens, mu interpolates linearly in the step count between the 10-step and the
    200-step fits (and extrapolates below 10 steps); above, it is the 200-step fit alone.
    Python floats, as in diffusers' `compute_empirical_mu`.
    """
    if image_seq_len <= 0 or num_steps <= 0:
        raise ValueError(f"need a positive token count and step count, got {image_seq_len} and {num_steps}")
    m_200 = _A2 * image_seq_len + _B2
    if image_seq_len > _LONG_SEQUENCE:
        return float(m_200)
    m_10 = _A1 * image_seq_len + _B1
    slope = (m_200 - m_10) / 190.0
    return float(slope * num_steps + (m_200 - 200.0 * slope))


def time_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    """t = e^mu / (e^mu + (1/sigma - 1)): float32 sigmas with Python-float e^mu stay float32 in numpy,
    exactly as in `FlowMatchEulerDiscreteScheduler._time_shift_exponential` (exponent 1.0)."""
    sigmas = np.asarray(sigmas, np.float32)
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)


def flux2_sigmas(image_seq_len: int, num_steps: int) -> np.ndarray:
    """float32 [num_steps + 1]: the shifted sigmas from 1 down to the appended terminal 0.

    diffusers: the pipeline passes sigmas = linspace(1, 1/N, N) (float64, cast to float32 by the
    scheduler), the scheduler shifts them with mu and appends 0. Step i integrates from
    sigmas[i] to sigmas[i + 1].
    """
    base = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    shifted = time_shift(compute_empirical_mu(image_seq_len, num_steps), base).astype(np.float32)
    return np.concatenate([shifted, np.zeros(1, np.float32)])
