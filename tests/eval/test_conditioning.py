"""Pixel conditions -> latent given masks (klingjax/eval/conditioning.py): every mapping on grids small enough to
check by hand, and the pixel-mask downsampling against a brute-force loop."""

import numpy as np
import pytest

from klingjax.eval import conditioning as cond

# 9 frames of 32x32, VAE 4x4x4, patch (1, 2, 2): latents (3, 8, 8), tokens (3, 4, 4) of 8x8 pixels.
GEOM = cond.Geometry(9, 32, 32, temporal_factor=4, spatial_factor=4, patch=(1, 2, 2))


def test_geometry_latent_grid_and_frame_groups():
    assert GEOM.latent == (3, 8, 8)
    assert [GEOM.key_frame(j) for j in range(3)] == [0, 4, 8]
    assert [list(GEOM.frames_of(j)) for j in range(3)] == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert [GEOM.context_pixels(k) for k in (1, 2, 3)] == [1, 5, 9]
    assert cond.Geometry(1, 16, 8, 4, 4, (1, 2, 2)).latent == (1, 4, 2)  # an image


@pytest.mark.parametrize("kwargs, flag", [(dict(num_frames=8), "--num_frames"), (dict(num_frames=0), "--num_frames"),
                                          (dict(height=28), "--size 28x32"), (dict(width=36), "--size 32x36")])
def test_geometry_rejects_grids_the_models_cannot_take(kwargs, flag):
    args = dict(num_frames=9, height=32, width=32, temporal_factor=4, spatial_factor=4, patch=(1, 2, 2)) | kwargs
    with pytest.raises(ValueError, match=flag):
        cond.Geometry(**args)


def test_flag_parsers():
    assert cond.parse_size("32x48") == (32, 48) and cond.parse_size("16X16") == (16, 16)
    assert cond.parse_keyframe("12:dir/a:b.png") == (12, "dir/a:b.png")
    assert cond.parse_borders("8,0,4,2") == (8, 0, 4, 2)
    bad = [(cond.parse_size, "32", "--size"), (cond.parse_size, "axb", "--size"),
           (cond.parse_keyframe, "a.png", "--keyframe"), (cond.parse_keyframe, "x:a.png", "--keyframe"),
           (cond.parse_keyframe, "4:", "--keyframe"), (cond.parse_borders, "1,2,3", "--outpaint"),
           (cond.parse_borders, "1,2,3,-1", "--outpaint")]
    for parse, text, flag in bad:
        with pytest.raises(ValueError, match=flag):
            parse(text)


def test_key_frames_snap_to_the_nearest_ties_later():
    got = {i: cond.snap_key_frame(i, GEOM) for i in range(9)}
    assert got == {0: (0, 0), 1: (0, 0), 2: (1, 4), 3: (1, 4), 4: (1, 4), 5: (1, 4), 6: (2, 8), 7: (2, 8),
                   8: (2, 8)}
    for bad in (-1, 9):
        with pytest.raises(ValueError, match=f"--keyframe {bad} is out of range"):
            cond.snap_key_frame(bad, GEOM)


def test_frames_given_whole_latent_frames():
    m = cond.frames_given(GEOM, [0, -1])
    assert m.shape == (3, 8, 8) and m[0].all() and m[2].all() and not m[1].any()


def test_token_align_ungives_partly_given_patches():
    given = np.ones((3, 8, 8), bool)
    given[1, 3, 4] = False  # one latent position -> its whole (rows 2-3, cols 4-5) patch is generated
    out = cond.token_align(given, (1, 2, 2))
    assert (~out).sum() == 4 and not out[1, 2:4, 4:6].any()
    assert cond.token_align(out, (1, 2, 2)).tolist() == out.tolist()  # idempotent


def _brute_force_given(white: np.ndarray, geom: cond.Geometry) -> np.ndarray:
    """The definition, one latent position at a time: given iff none of its pixels is white; then whole tokens."""
    t, h, w = geom.latent
    s = geom.spatial_factor
    given = np.zeros((t, h, w), bool)
    for j in range(t):
        for y in range(h):
            for x in range(w):
                given[j, y, x] = not white[list(geom.frames_of(j)), y * s:(y + 1) * s, x * s:(x + 1) * s].any()
    pt, ph, pw = geom.patch
    for j in range(0, t, pt):
        for y in range(0, h, ph):
            for x in range(0, w, pw):
                given[j:j + pt, y:y + ph, x:x + pw] = given[j:j + pt, y:y + ph, x:x + pw].all()
    return given


def test_pixel_mask_to_given_by_hand():
    white = np.zeros((9, 32, 32), bool)
    white[0, 5, 9] = True  # latent (0, 1, 2) -> token (0, 0, 1): latent rows 0-1, cols 2-3 of frame 0
    white[4, 31, 0] = True  # pixel frame 4 belongs to latent frame 1 (frames 1..4)
    white[5, 0, 31] = True  # pixel frame 5 to latent frame 2
    given = cond.pixel_mask_to_given(white, GEOM)
    assert given.shape == (3, 8, 8)
    assert not given[0, 0:2, 2:4].any() and given[0].sum() == 64 - 4
    assert not given[1, 6:8, 0:2].any() and given[1].sum() == 64 - 4
    assert not given[2, 0:2, 6:8].any() and given[2].sum() == 64 - 4
    assert cond.pixel_mask_to_given(np.zeros((32, 32), bool), GEOM).all()  # all black: everything given
    assert not cond.pixel_mask_to_given(np.ones((32, 32), bool), GEOM).any()  # all white: nothing given


def test_pixel_mask_to_given_matches_brute_force():
    rng = np.random.default_rng(0)
    geom = cond.Geometry(9, 32, 48, temporal_factor=4, spatial_factor=4, patch=(1, 2, 2))
    for p in (0.0005, 0.002, 0.01):
        white = rng.random((9, 32, 48)) < p
        np.testing.assert_array_equal(cond.pixel_mask_to_given(white, geom), _brute_force_given(white, geom))
        still = white[3]  # a 2D mask applies to every frame
        np.testing.assert_array_equal(cond.pixel_mask_to_given(still, geom),
                                      _brute_force_given(np.broadcast_to(still, white.shape), geom))


@pytest.mark.parametrize("shape", [(32, 16), (5, 32, 32), (9, 16, 32)])
def test_pixel_mask_of_the_wrong_shape_names_the_flag(shape):
    with pytest.raises(ValueError, match="--mask"):
        cond.pixel_mask_to_given(np.zeros(shape, bool), GEOM)


def test_outpaint_box_and_token_aligned_given():
    box = cond.outpaint_box(GEOM, (8, 0, 8, 0))  # L, T, R, B
    assert box == (0, 32, 8, 24)
    given = cond.box_given(GEOM, box)
    assert given[:, :, 2:6].all() and not given[:, :, :2].any() and not given[:, :, 6:].any()
    # Borders of 4 px: latent columns 1-6 are inside, but only the whole tokens (columns 2-5) are given.
    given = cond.box_given(GEOM, cond.outpaint_box(GEOM, (4, 4, 4, 4)))
    assert given[:, 2:6, 2:6].all() and given.sum() == 3 * 16
    with pytest.raises(ValueError, match="--outpaint 16,0,16,0 leaves no inner box"):
        cond.outpaint_box(GEOM, (16, 0, 16, 0))
    with pytest.raises(ValueError, match="--outpaint: the inner box .* holds no whole token"):
        cond.box_given(GEOM, cond.outpaint_box(GEOM, (10, 0, 10, 0)))  # 12 px wide: no 8 px token fits whole


def test_place_in_box_repeats_edges():
    content = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3)
    out = cond.place_in_box(content, (1, 3, 2, 5), 4, 6)
    assert out.shape == (2, 4, 6, 3)
    np.testing.assert_array_equal(out[:, 1:3, 2:5], content)
    np.testing.assert_array_equal(out[:, 0, 2:5], content[:, 0])  # top border = the first content row
    np.testing.assert_array_equal(out[:, 1:3, 0], content[:, :, 0])  # left border = the first column
    with pytest.raises(ValueError, match="does not fit"):
        cond.place_in_box(content, (0, 3, 0, 3), 4, 6)


def test_plan_chunks():
    # 9-frame chunks (3 latent frames); 1 given latent frame = 1 pixel frame of context, 8 new frames per chunk.
    assert cond.plan_chunks(GEOM, 1, 1.5, 8, available=12) == [8, 4]
    assert cond.plan_chunks(GEOM, 1, 2.0, 8, available=1) == [8, 8]
    assert cond.plan_chunks(GEOM, 2, 1.0, 8, available=5) == [4, 4]  # 2 latent frames = 5 pixel frames given
    assert cond.plan_chunks(GEOM, 1, 0.01, 8, available=1) == [1]  # at least one frame
    for args, match in [((3, 1.0, 8, 20), "--context_frames 3"), ((0, 1.0, 8, 20), "--context_frames 0"),
                        ((2, 1.0, 8, 4), "--video has 4 frames, fewer than the 5"), ((1, 0.0, 8, 20), "--extend 0.0")]:
        with pytest.raises(ValueError, match=match):
            cond.plan_chunks(GEOM, *args)
    with pytest.raises(ValueError, match="--prepend -1"):
        cond.plan_chunks(GEOM, 1, -1, 8, 20, flag="--prepend")
