"""The one PSNR definition (klingjax/measures.py): known dB per frame, numpy and jit agree, the cap, the protocol name,
and eval's uint8 form equals training's [-1, 1] form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klingjax import measures
from klingjax.eval import image_metrics as im


def test_one_psnr_per_frame_numpy_and_jit_agree_and_cap():
    """Videos in [-1, 1] (data_range 2) whose frames have known constant errors: known dB per frame."""
    errors = np.array([[0.5, 0.25, 0.0], [0.125, 0.5, 0.25]])  # (N=2, T=3): |a - b| of each frame
    a = np.zeros((2, 3, 8, 8, 3), np.float32)
    b = a + errors[:, :, None, None, None].astype(np.float32)
    with np.errstate(divide="ignore"):
        want = 10 * np.log10(4.0 / errors**2)  # inf where the frame is identical
    got = measures.psnr(a, b, data_range=2.0)
    assert isinstance(got, np.ndarray) and got.shape == (2, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, want)  # [12.04, 18.06, inf], [24.08, 12.04, 18.06]
    capped = measures.psnr(a, b, data_range=2.0, cap=measures.PSNR_CAP)
    assert capped[0, 2] == measures.PSNR_CAP and np.isfinite(capped.mean())
    np.testing.assert_allclose(capped, np.minimum(want, measures.PSNR_CAP))
    jitted = jax.jit(lambda x, y: measures.psnr(x, y, data_range=2.0, cap=measures.PSNR_CAP))(jnp.asarray(a),
                                                                                                jnp.asarray(b))
    assert isinstance(jitted, jax.Array) and jitted.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(jitted), capped, rtol=1e-6)
    assert np.isinf(np.asarray(measures.psnr(jnp.asarray(a), jnp.asarray(b), data_range=2.0))[0, 2])
    # uint8 frames (eval, data_range 255) and the same frames in [-1, 1] (training, data_range 2): the same dB.
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (2, 2, 3, 8, 8, 3), dtype=np.uint8)
    to_unit = lambda v: jnp.asarray(v, jnp.float32) / 127.5 - 1.0
    np.testing.assert_allclose(np.asarray(measures.psnr(to_unit(x), to_unit(y), data_range=2.0)), im.psnr(x, y),
                               rtol=1e-5)
    assert measures.psnr_protocol(4, 9) == "psnr_per_frame_cap100dB_mean_4clips_9f"
    assert measures.psnr_protocol(4, 9, cap=None) == "psnr_per_frame_uncapped_mean_4clips_9f"
    with pytest.raises(ValueError, match="one shape"):
        measures.psnr(a, b[:, :2], data_range=2.0)
