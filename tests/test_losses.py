"""The ShaSpec objectives (``shaspec_tf.losses``) against NumPy references written from their docstrings, the
official ``loss_Dual.py`` and the paper's Eq. 5, 8 and 9."""
import keras
import numpy as np
import pytest

from shaspec_tf import losses

try:
    from conftest import to_numpy
except ImportError:  # pragma: no cover
    def to_numpy(x):
        return np.asarray(keras.ops.convert_to_numpy(x))


# -- NumPy references ------------------------------------------------------------------------------------------------
def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def np_soft_dice_loss(y_true, logits, smooth=1.0):
    """Official DiceLoss4BraTS: per channel k, 1 - mean_b [2 sum(p t) / (sum p + sum t + smooth)]; mean over k."""
    p = np_sigmoid(logits)
    t = np.asarray(y_true, np.float64)
    per_channel = []
    for k in range(t.shape[-1]):
        pk = p[..., k].reshape(p.shape[0], -1)
        tk = t[..., k].reshape(t.shape[0], -1)
        dice = 2.0 * (pk * tk).sum(axis=1) / (pk.sum(axis=1) + tk.sum(axis=1) + smooth)
        per_channel.append(1.0 - dice.mean())
    return float(np.mean(per_channel))


def np_bce_with_logits(x, t):
    """Element-wise BCE with logits: -t log s(x) - (1 - t) log(1 - s(x)) = log(1 + e^x) - t x (stable form)."""
    x = np.asarray(x, np.float64)
    return np.logaddexp(0.0, x) - np.asarray(t, np.float64) * x


def np_region_bce_loss(y_true, logits):
    """Official BCELoss4BraTS: mean BCEWithLogits per channel (over batch and voxels), summed over channels."""
    per_voxel = np_bce_with_logits(logits, y_true)
    return float(sum(per_voxel[..., k].mean() for k in range(per_voxel.shape[-1])))


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_alignment(shared, mask, pairs, masked=True):
    """Sum over pairs of the batch mean of (mean |r_i - r_j| over feature elements) * m_i * m_j (masked)."""
    shared = np.asarray(shared, np.float64)
    total = 0.0
    for i, j in pairs:
        diff = np.abs(shared[:, i] - shared[:, j]).reshape(shared.shape[0], -1).mean(axis=1)
        weight = mask[:, i] * mask[:, j] if masked else np.ones(shared.shape[0])
        total += float(np.mean(diff * weight))
    return total


def np_domain_ce(domain_logits, mask, masked=True):
    """CE of slot i against target modality i; mean over present slots (masked) or over all slots."""
    logp = np_log_softmax(domain_logits)
    m = logp.shape[-1]
    ce = -np.stack([logp[:, i, i] for i in range(m)], axis=1)  # [B, M]
    if not masked:
        return float(ce.mean())
    return float((ce * mask).sum() / mask.sum())


CYCLIC4 = [(0, 1), (1, 2), (2, 3), (3, 0)]


@pytest.fixture
def rng():
    return np.random.default_rng(15878)


def _scalar(x):
    value = to_numpy(x)
    assert value.shape == ()
    return float(value)


# -- task losses -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 4, 5, 6, 3), (3, 7, 2), (1, 3, 3, 3, 1)])
def test_soft_dice_loss_matches_numpy(rng, shape):
    logits = rng.normal(scale=2.0, size=shape).astype("float32")
    y = (rng.random(shape) < 0.3).astype("float32")
    np.testing.assert_allclose(_scalar(losses.soft_dice_loss(y, logits)), np_soft_dice_loss(y, logits), rtol=1e-5)


def test_soft_dice_loss_uses_the_smooth_term(rng):
    logits = rng.normal(size=(2, 2, 2, 2, 3)).astype("float32")
    y = (rng.random(logits.shape) < 0.5).astype("float32")
    values = []
    for smooth in (1.0, 5.0, 1e-6):
        values.append(_scalar(losses.soft_dice_loss(y, logits, smooth=smooth)))
        np.testing.assert_allclose(values[-1], np_soft_dice_loss(y, logits, smooth), rtol=1e-5)
    assert len({round(v, 4) for v in values}) == 3
    # empty targets: the score is 0 whatever the smooth term, so the loss is exactly 1
    empty = np.zeros_like(y)
    assert _scalar(losses.soft_dice_loss(empty, logits)) == pytest.approx(1.0, abs=1e-7)


def test_soft_dice_loss_is_near_zero_for_confident_correct_predictions(rng):
    y = (rng.random((2, 4, 4, 4, 3)) < 0.5).astype("float32")
    y[..., 0, 0, 0, :] = 1.0  # every channel of every sample has foreground
    logits = np.where(y > 0, 30.0, -30.0).astype("float32")
    loss = _scalar(losses.soft_dice_loss(y, logits))
    assert 0.0 <= loss < 0.05
    assert loss == pytest.approx(np_soft_dice_loss(y, logits), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("shape", [(2, 4, 5, 6, 3), (3, 7, 2)])
def test_region_bce_loss_matches_numpy(rng, shape):
    logits = rng.normal(scale=3.0, size=shape).astype("float32")
    y = (rng.random(shape) < 0.4).astype("float32")
    np.testing.assert_allclose(_scalar(losses.region_bce_loss(y, logits)), np_region_bce_loss(y, logits), rtol=1e-5)


def test_region_bce_loss_is_finite_and_exact_for_large_logits():
    logits = np.array([100.0, -100.0, 100.0, -100.0, 0.0, 50.0], "float32").reshape(1, 6, 1)
    y = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.0], "float32").reshape(1, 6, 1)
    loss = _scalar(losses.region_bce_loss(y, logits))
    assert np.isfinite(loss)
    expected = np_region_bce_loss(y, logits)  # (100 + 100 + 0 + 0 + log 2 + 50) / 6
    np.testing.assert_allclose(expected, (250.0 + np.log(2.0)) / 6.0, rtol=1e-12)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_segmentation_loss_is_dice_plus_bce(rng):
    logits = rng.normal(size=(2, 3, 4, 4, 3)).astype("float32")
    y = (rng.random(logits.shape) < 0.3).astype("float32")
    np.testing.assert_allclose(_scalar(losses.segmentation_loss(y, logits)),
                               np_soft_dice_loss(y, logits) + np_region_bce_loss(y, logits), rtol=1e-5)


@pytest.mark.parametrize("label_shape", [(5,), (5, 1)])
def test_classification_loss_matches_numpy_softmax_cross_entropy(rng, label_shape):
    logits = rng.normal(scale=3.0, size=(5, 10)).astype("float32")
    labels = rng.integers(0, 10, size=5)
    expected = float(-np.mean(np_log_softmax(logits)[np.arange(5), labels]))
    loss = _scalar(losses.classification_loss(labels.reshape(label_shape), logits))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_classification_loss_is_finite_for_large_logits():
    logits = np.array([[1000.0, -1000.0, 0.0], [-500.0, 500.0, 0.0]], "float32")
    labels = np.array([1, 1])
    expected = float(-np.mean(np_log_softmax(logits)[np.arange(2), labels]))  # (2000 + 0) / 2
    np.testing.assert_allclose(_scalar(losses.classification_loss(labels, logits)), expected, rtol=1e-5)


# -- alignment pairs -------------------------------------------------------------------------------------------------
def test_alignment_pairs():
    assert losses.alignment_pairs(4) == CYCLIC4
    assert losses.alignment_pairs(4, "cyclic") == CYCLIC4
    assert losses.alignment_pairs(2) == [(0, 1)]
    for m in (2, 4):  # a typo in the pair kind is an error whatever the modality count
        with pytest.raises(ValueError, match="unknown pair kind"):
            losses.alignment_pairs(m, "bogus")
    assert losses.alignment_pairs(3) == [(0, 1), (1, 2), (2, 0)]
    all4 = losses.alignment_pairs(4, "all")
    assert len(all4) == 6
    assert {frozenset(p) for p in all4} == {frozenset((i, j)) for i in range(4) for j in range(i + 1, 4)}
    assert losses.alignment_pairs(1) == []


def test_alignment_pairs_rejects_unknown_kind():
    with pytest.raises(ValueError):
        losses.alignment_pairs(4, "ring")


# -- distribution alignment ------------------------------------------------------------------------------------------
MASKS = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 0], [0, 1, 1, 0]], "float32")


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("pairs", ["cyclic", "all"])
@pytest.mark.parametrize("feature_shape", [(6,), (2, 2, 2, 3)])
def test_distribution_alignment_loss_matches_numpy(rng, masked, pairs, feature_shape):
    shared = rng.normal(size=(4, 4, *feature_shape)).astype("float32")
    loss = _scalar(losses.distribution_alignment_loss(shared, MASKS, masked=masked, pairs=pairs))
    expected = np_alignment(shared, MASKS, losses.alignment_pairs(4, pairs), masked=masked)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_distribution_alignment_loss_uses_the_official_cyclic_pairs():
    """Modality 1 differs from the others by 1 per element: two cyclic pairs contain it, three of all pairs do."""
    shared = np.zeros((1, 4, 3), "float32")
    shared[0, 1] = 1.0  # cyclic: (0,1) and (1,2) -> 2; all: (0,1), (1,2), (1,3) -> 3
    mask = np.ones((1, 4), "float32")
    assert _scalar(losses.distribution_alignment_loss(shared, mask)) == pytest.approx(2.0)
    assert _scalar(losses.distribution_alignment_loss(shared, mask, pairs="all")) == pytest.approx(3.0)


def test_distribution_alignment_loss_equals_official_l1_sum_when_all_present(rng):
    """With every modality present: sum over the 4 cyclic pairs of nn.L1Loss() (mean over all elements)."""
    shared = rng.normal(size=(3, 4, 2, 2, 2, 5)).astype("float32")
    expected = sum(float(np.abs(shared[:, i].astype(np.float64) - shared[:, j]).mean()) for i, j in CYCLIC4)
    ones = np.ones((3, 4), "float32")
    for masked in (True, False):
        np.testing.assert_allclose(_scalar(losses.distribution_alignment_loss(shared, ones, masked=masked)),
                                   expected, rtol=1e-5)


def test_masked_alignment_ignores_absent_modalities_features(rng):
    shared = rng.normal(size=(4, 4, 2, 3)).astype("float32")
    changed = shared.copy()
    changed[MASKS == 0] = rng.normal(scale=50.0, size=changed[MASKS == 0].shape)
    a = _scalar(losses.distribution_alignment_loss(shared, MASKS, masked=True))
    b = _scalar(losses.distribution_alignment_loss(changed, MASKS, masked=True))
    assert a == pytest.approx(b, rel=1e-6)
    c = _scalar(losses.distribution_alignment_loss(shared, MASKS, masked=False))
    d = _scalar(losses.distribution_alignment_loss(changed, MASKS, masked=False))
    assert abs(c - d) > 1.0


# -- domain classification -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [True, False])
def test_domain_classification_loss_matches_numpy(rng, masked):
    logits = rng.normal(scale=2.0, size=(4, 4, 4)).astype("float32")
    loss = _scalar(losses.domain_classification_loss(logits, MASKS, masked=masked))
    np.testing.assert_allclose(loss, np_domain_ce(logits, MASKS, masked=masked), rtol=1e-5)


def test_domain_classification_loss_masked_mean_runs_over_present_slots_only(rng):
    logits = rng.normal(size=(4, 4, 4)).astype("float32")
    logp = np_log_softmax(logits)
    present = [(b, i) for b in range(4) for i in range(4) if MASKS[b, i]]
    expected = -np.mean([logp[b, i, i] for b, i in present])
    np.testing.assert_allclose(_scalar(losses.domain_classification_loss(logits, MASKS)), expected, rtol=1e-5)


def test_domain_classification_loss_ignores_absent_slots_logits(rng):
    logits = rng.normal(size=(4, 4, 4)).astype("float32")
    changed = logits.copy()
    changed[MASKS == 0] = rng.normal(scale=20.0, size=changed[MASKS == 0].shape)
    a = _scalar(losses.domain_classification_loss(logits, MASKS))
    b = _scalar(losses.domain_classification_loss(changed, MASKS))
    assert a == pytest.approx(b, rel=1e-6)
    c = _scalar(losses.domain_classification_loss(logits, MASKS, masked=False))
    d = _scalar(losses.domain_classification_loss(changed, MASKS, masked=False))
    assert c != pytest.approx(d, rel=1e-3)


def test_domain_classification_loss_is_small_for_correct_confident_logits():
    logits = np.tile(np.eye(3, dtype="float32") * 40.0, (2, 1, 1))  # slot i predicts modality i
    mask = np.ones((2, 3), "float32")
    assert _scalar(losses.domain_classification_loss(logits, mask)) < 1e-6
    wrong = np.roll(logits, 1, axis=-1)
    assert _scalar(losses.domain_classification_loss(wrong, mask)) == pytest.approx(40.0, rel=1e-4)


# -- total objective -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [True, False])
def test_shaspec_loss_total_uses_paper_weights(rng, masked):
    shared = rng.normal(size=(4, 4, 5)).astype("float32")
    logits = rng.normal(size=(4, 4, 4)).astype("float32")
    task = np.float32(0.7)
    terms = losses.shaspec_loss(task, shared, logits, MASKS, masked=masked)
    assert set(terms) == {"total", "task", "alignment", "domain"}
    alignment = np_alignment(shared, MASKS, CYCLIC4, masked=masked)
    domain = np_domain_ce(logits, MASKS, masked=masked)
    np.testing.assert_allclose(_scalar(terms["alignment"]), alignment, rtol=1e-5)
    np.testing.assert_allclose(_scalar(terms["domain"]), domain, rtol=1e-5)
    np.testing.assert_allclose(float(to_numpy(terms["task"])), 0.7, rtol=1e-6)
    # paper section 4.2: alpha = 0.1 (alignment, shared), beta = 0.02 (domain, specific)
    np.testing.assert_allclose(_scalar(terms["total"]), 0.7 + 0.1 * alignment + 0.02 * domain, rtol=1e-5)


def test_shaspec_loss_custom_weights_and_pairs(rng):
    shared = rng.normal(size=(2, 4, 3)).astype("float32")
    logits = rng.normal(size=(2, 4, 4)).astype("float32")
    mask = np.ones((2, 4), "float32")
    terms = losses.shaspec_loss(1.5, shared, logits, mask, alpha=2.0, beta=3.0, pairs="all")
    all_pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    expected = 1.5 + 2.0 * np_alignment(shared, mask, all_pairs) + 3.0 * np_domain_ce(logits, mask)
    np.testing.assert_allclose(_scalar(terms["total"]), expected, rtol=1e-5)
