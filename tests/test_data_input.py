"""tf.data input: crops, augmentation, modality dropout, determinism, and the mask contract."""
import numpy as np
import pytest
import tensorflow as tf

from shaspec_tf.data.input import Augmentation, ModalityDropout, avmnist_dataset, brats_dataset, drop_modalities
from shaspec_tf.data.schema import BratsRecord, avmnist_example, brats_example
from shaspec_tf.data.toy import toy_case

pytestmark = pytest.mark.tensorflow


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tfr")
    rng = np.random.default_rng(0)
    path = folder / "train-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i, mask in enumerate(([1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 0])):
            image, labels = toy_case(rng, (40, 72, 72))
            image = image * np.asarray(mask, np.float32)
            writer.write(brats_example(BratsRecord(f"case{i}", image, np.asarray(mask), labels)).SerializeToString())
    return str(path)


def take(ds, n):
    return [tf.nest.map_structure(lambda t: t.numpy(), item) for item in ds.take(n)]


def test_training_batches_have_crop_shapes_and_valid_masks(records):
    batches = take(brats_dataset(records, batch_size=2, crop_size=(32, 64, 64), seed=1), 4)
    for inputs, regions in batches:
        assert inputs["image"].shape == (2, 32, 64, 64, 4) and regions.shape == (2, 32, 64, 64, 3)
        mask = inputs["modality_mask"]
        assert np.all(mask.sum(1) >= 1)
        for b in range(2):
            for m in range(4):
                if mask[b, m] == 0:
                    assert not np.any(inputs["image"][b, ..., m])
        et, wt, tc = regions[..., 0], regions[..., 1], regions[..., 2]
        assert np.all(et <= tc) and np.all(tc <= wt)


def test_same_seed_same_batches_different_seed_different(records):
    a = take(brats_dataset(records, batch_size=1, crop_size=(32, 64, 64), seed=5), 3)
    b = take(brats_dataset(records, batch_size=1, crop_size=(32, 64, 64), seed=5), 3)
    c = take(brats_dataset(records, batch_size=1, crop_size=(32, 64, 64), seed=6), 3)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa["image"], xb["image"])
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa["image"], xc["image"]) for (xa, _), (xc, _) in zip(a, c))


def test_foreground_crops_contain_tumour(records):
    aug = Augmentation(foreground_prob=1.0, scale_prob=0.0)
    for _, regions in take(brats_dataset(records, batch_size=1, crop_size=(16, 32, 32), seed=2, augmentation=aug), 6):
        assert regions[..., 1].sum() > 0


def test_small_volumes_are_padded_to_the_crop(records):
    inputs, regions = take(brats_dataset(records, batch_size=1, crop_size=(48, 96, 96), seed=3), 1)[0]
    assert inputs["image"].shape == (1, 48, 96, 96, 4) and regions.shape == (1, 48, 96, 96, 3)


def test_evaluation_yields_whole_cases_with_recorded_masks(records):
    cases = take(brats_dataset(records, training=False), 3)
    assert [tuple(x["modality_mask"][0]) for x, _ in cases] == [(1, 1, 1, 1), (1, 0, 1, 1), (0, 0, 1, 0)]
    assert all(x["image"].shape == (1, 40, 72, 72, 4) for x, _ in cases)


def test_dropout_never_adds_or_empties_and_follows_the_law():
    full = tf.ones(4)
    kept = np.array([drop_modalities(full, i, 0, ModalityDropout()).numpy().sum() for i in range(800)])
    counts = np.bincount(kept.astype(int), minlength=5)[1:]
    assert np.all(np.abs(counts - 200) < 60), counts
    partial = tf.constant([1.0, 0.0, 1.0, 0.0])
    for i in range(200):
        m = drop_modalities(partial, i, 1, ModalityDropout()).numpy()
        assert m.sum() >= 1 and m[1] == 0 and m[3] == 0


def test_warmup_ramp_and_dedicated_subset():
    full = tf.ones(4)
    warm = ModalityDropout(warmup_steps=10)
    assert all(drop_modalities(full, i, 0, warm, batch_size=2).numpy().sum() == 4 for i in range(20))
    assert any(drop_modalities(full, i, 0, warm, batch_size=2).numpy().sum() < 4 for i in range(20, 80))
    ramp = ModalityDropout(ramp_steps=1000)
    early = np.mean([drop_modalities(full, i, 0, ramp).numpy().sum() < 4 for i in range(100)])
    late = np.mean([drop_modalities(full, i, 0, ramp).numpy().sum() < 4 for i in range(900, 1000)])
    assert early < 0.15 and late > 0.5
    fixed = ModalityDropout(subset=(0, 1, 0, 1))
    assert drop_modalities(full, 3, 0, fixed).numpy().tolist() == [0, 1, 0, 1]


def test_per_modality_drop_probabilities_are_independent_and_never_empty():
    full = tf.ones(2)
    probs = ModalityDropout(probs=(0.1, 0.6))
    masks = np.array([drop_modalities(full, i, 0, probs).numpy() for i in range(2000)])
    assert np.all(masks.sum(1) >= 1)
    # image absent only when drawn (0.1) and audio kept (0.4); audio absent when drawn (0.6): P(both drawn) = 0.06,
    # when one of the two is kept at random
    image_gone, audio_gone = 1 - masks.mean(0)
    assert abs(image_gone - (0.1 * 0.4 + 0.06 / 2)) < 0.03 and abs(audio_gone - (0.6 * 0.9 + 0.06 / 2)) < 0.04
    # a modality the sample lacks stays absent; with it, the survivor is the one present
    partial = tf.constant([0.0, 1.0])
    assert all(drop_modalities(partial, i, 0, ModalityDropout(probs=(0.0, 1.0))).numpy().tolist() == [0, 1]
               for i in range(50))
    # the warm-up holds every modality, as for the official law
    warm = ModalityDropout(probs=(1.0, 1.0), warmup_steps=5)
    assert all(drop_modalities(full, i, 0, warm).numpy().sum() == 2 for i in range(5))
    assert all(drop_modalities(full, i, 0, warm).numpy().sum() == 1 for i in range(5, 30))
    with pytest.raises(ValueError, match="one per modality"):
        drop_modalities(full, 0, 0, ModalityDropout(probs=(0.5,)))


def _avmnist_records(path, count, rng):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(count):
            writer.write(avmnist_example(f"s{i}", rng.random((28, 28)), rng.normal(size=(20, 20)),
                                         [1, 1], i % 10, "theo").SerializeToString())


def test_avmnist_training_stream_counts_steps_across_passes(tmp_path):
    """The dropout schedule runs over the whole training: with 8 samples in batches of 4, a warm-up of 3 steps
    (12 samples) ends inside the second pass over the records, and the passes draw different masks (the stream
    used to restart its step counter, and its draws, at every pass)."""
    path = tmp_path / "train-00000-of-00001.tfrecord"
    _avmnist_records(path, 8, np.random.default_rng(5))
    stream = avmnist_dataset(str(path), batch_size=4, seed=1, dropout=ModalityDropout(rate=1.0, warmup_steps=3),
                             repeat=True)
    masks = [x["modality_mask"] for x, _ in take(stream, 8)]
    assert all(m.sum() == 8 for m in masks[:3])             # steps 0-2: every modality (pass 1 and half of pass 2)
    assert all(m.sum() < 8 for m in masks[3:])              # from step 3 on, dropout
    later = np.concatenate(masks[4:8])
    assert not np.array_equal(np.concatenate(masks[4:6]), np.concatenate(masks[6:8])), later
    again = [x["modality_mask"] for x, _ in take(avmnist_dataset(str(path), batch_size=4, seed=1, repeat=True,
                                                                 dropout=ModalityDropout(rate=1.0, warmup_steps=3)), 8)]
    assert all(np.array_equal(a, b) for a, b in zip(masks, again))   # the same seed: the same stream


def test_avmnist_dataset_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "test-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(5):
            writer.write(avmnist_example(f"s{i}", rng.random((28, 28)), rng.normal(size=(20, 20)),
                                         [1, i % 2], i, "theo").SerializeToString())
    (inputs, labels), = take(avmnist_dataset(str(path), batch_size=5, training=False), 1)
    assert inputs["image"].shape == (5, 28, 28, 1) and inputs["audio"].shape == (5, 20, 20, 1)
    assert labels.tolist() == [0, 1, 2, 3, 4]
    assert not np.any(inputs["audio"][0]) and np.any(inputs["audio"][1])


def test_missing_files_are_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TFRecords"):
        brats_dataset(str(tmp_path / "*.tfrecord"))
