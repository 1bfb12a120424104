"""Where splits live (own layouts and TFX Examples artifacts), GZIP records, and the validation summary features."""
import numpy as np
import pytest
import tensorflow as tf

from shaspec_tf.data.files import check_records, compression_of, input_fingerprint, record_dataset, split_files
from shaspec_tf.data.input import avmnist_dataset, brats_dataset
from shaspec_tf.data.schema import BratsRecord, avmnist_example, brats_example

pytestmark = pytest.mark.tensorflow


def _brats(case_id, mask=(1, 0, 1, 1), labelled=True):
    rng = np.random.default_rng(len(case_id))
    image = rng.normal(size=(16, 32, 32, 4)).astype(np.float32) * np.asarray(mask, np.float32)
    label = np.zeros((16, 32, 32), np.uint8)
    label[4:8, 8:16, 8:16] = 2
    label[5:7, 10:12, 10:12] = 4
    return BratsRecord(case_id, image, np.asarray(mask), label if labelled else None)


def _write(path, examples, gzip=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    options = tf.io.TFRecordOptions(compression_type="GZIP" if gzip else "")
    with tf.io.TFRecordWriter(str(path), options) as writer:
        for example in examples:
            writer.write(example.SerializeToString())
    return str(path)


def test_split_files_finds_each_layout_and_names_the_patterns_when_none(tmp_path):
    own = _write(tmp_path / "own" / "train" / "data-00000-of-00001.tfrecord", [brats_example(_brats("a"))])
    tfx_layout = _write(tmp_path / "tfx" / "Split-eval" / "data-00000-of-00001.gz", [brats_example(_brats("b"))],
                        gzip=True)
    av = _write(tmp_path / "av" / "test-00000-of-00001.tfrecord",
                [avmnist_example("s", np.zeros((28, 28)), np.zeros((20, 20)), [1, 0], 3)])
    assert split_files(str(tmp_path / "own"), "train", "brats") == [own]
    assert split_files(str(tmp_path / "tfx"), "eval", "brats") == [tfx_layout]
    assert split_files(str(tmp_path / "av"), "test", "avmnist") == [av]
    with pytest.raises(FileNotFoundError, match=r"no eval TFRecords at .*own/eval/\*\.tfrecord or .*Split-eval"):
        split_files(str(tmp_path / "own"), "eval", "brats")


def test_gzip_records_read_the_same_as_plain_ones_and_mixing_is_an_error(tmp_path):
    examples = [brats_example(_brats(f"case{i}")) for i in range(2)]
    plain = _write(tmp_path / "plain" / "data.tfrecord", examples)
    packed = _write(tmp_path / "gz" / "data.gz", examples, gzip=True)
    assert compression_of([packed]) == "GZIP" and compression_of([plain]) == ""
    assert [r.numpy() for r in record_dataset([plain])] == [r.numpy() for r in record_dataset([packed])]
    with pytest.raises(ValueError, match="mix GZIP"):
        compression_of([plain, packed])
    # the training input reads an Examples artifact's GZIP shards directly
    (inputs, regions), = brats_dataset([packed], batch_size=1, training=False).take(1)
    assert inputs["image"].shape == (1, 16, 32, 32, 4) and float(tf.reduce_sum(regions[..., 1])) > 0


def test_avmnist_input_reads_gzip(tmp_path):
    examples = [avmnist_example(f"s{i}", np.full((28, 28), 0.5), np.ones((20, 20)), [1, i % 2], i) for i in range(3)]
    packed = _write(tmp_path / "Split-test" / "data.gz", examples, gzip=True)
    inputs, labels = next(iter(avmnist_dataset([packed], batch_size=3, training=False)))
    assert labels.numpy().tolist() == [0, 1, 2]
    assert inputs["modality_mask"].numpy().tolist() == [[1, 0], [1, 1], [1, 0]]


def test_records_carry_the_summary_features_data_validation_checks():
    f = brats_example(_brats("x", mask=(0, 1, 0, 1))).features.feature
    assert [v.decode() for v in f["present_modalities"].bytes_list.value] == ["t1", "t2"]
    assert [v.decode() for v in f["label_values"].bytes_list.value] == ["0", "2", "4"]
    unlabelled = brats_example(_brats("y", labelled=False)).features.feature
    assert list(unlabelled["label_values"].bytes_list.value) == []
    a = avmnist_example("s", np.zeros((28, 28)), np.zeros((20, 20)), [1, 0], 7).features.feature
    assert [v.decode() for v in a["present_modalities"].bytes_list.value] == ["image"]


@pytest.mark.parametrize("gzip", [False, True])
def test_check_records_counts_every_record_and_names_the_first_corrupt_one(tmp_path, gzip):
    examples = [avmnist_example(f"s{i}", np.full((28, 28), i / 10), np.ones((20, 20)), [1, 1], i) for i in range(5)]
    ext = "gz" if gzip else "tfrecord"
    good = _write(tmp_path / f"a.{ext}", examples, gzip)
    empty = _write(tmp_path / f"b.{ext}", [], gzip)
    assert check_records([good, empty, good]) == 10 and check_records([empty]) == 0
    if gzip:  # damage the records inside the compression
        import gzip as gz

        raw = gz.decompress(open(good, "rb").read())
        size = len(raw) // 5
        flipped = raw[:2 * size + size // 2] + bytes([raw[2 * size + size // 2] ^ 1]) + raw[2 * size + size // 2 + 1:]
        (tmp_path / "flipped.gz").write_bytes(gz.compress(flipped))
        (tmp_path / "truncated.gz").write_bytes(gz.compress(raw[:-7]))
    else:
        raw = open(good, "rb").read()
        size = len(raw) // 5
        (tmp_path / "flipped.tfrecord").write_bytes(
            raw[:2 * size + size // 2] + bytes([raw[2 * size + size // 2] ^ 1]) + raw[2 * size + size // 2 + 1:])
        (tmp_path / "truncated.tfrecord").write_bytes(raw[:-7])
    flipped, truncated = str(tmp_path / f"flipped.{ext}"), str(tmp_path / f"truncated.{ext}")
    with pytest.raises(ValueError) as error:
        check_records([good, flipped])
    assert str(error.value).startswith(f"{flipped}: corrupt TFRecord after 2 good records (DataLossError: corrupted")
    assert "\n" not in str(error.value) and "function_node" not in str(error.value)
    with pytest.raises(ValueError, match=r"truncated\.\w+: corrupt TFRecord after 4 good records \(DataLossError"):
        check_records([good, empty, truncated])
    with pytest.raises(FileNotFoundError, match="no such file"):
        check_records([str(tmp_path / f"missing.{ext}")])


def test_input_fingerprint_changes_with_the_files_and_only_with_them(tmp_path):
    import os

    root = tmp_path / "in"
    (root / "Case_1").mkdir(parents=True)
    flair, wav = root / "Case_1" / "Case_1_flair.nii.gz", root / "1_theo_5.wav"
    flair.write_bytes(b"a" * 100)
    wav.write_bytes(b"b" * 50)
    first = input_fingerprint([str(root)])
    assert input_fingerprint([str(root) + "/"]) == first == input_fingerprint([root])
    moved = tmp_path / "elsewhere"
    os.rename(root, moved)
    assert input_fingerprint([str(moved)]) == first, "names relative to the root: moving the data changes nothing"
    os.rename(moved, root)
    stamp = os.stat(wav).st_mtime_ns
    wav.write_bytes(b"c" * 50)                                         # same size, rewritten
    os.utime(wav, ns=(stamp + 10**9, stamp + 10**9))
    rewritten = input_fingerprint([str(root)])
    assert rewritten != first
    (root / "Case_1" / "Case_1_t1.nii.gz").write_bytes(b"d")
    added = input_fingerprint([str(root)])
    assert added != rewritten
    os.remove(root / "Case_1" / "Case_1_t1.nii.gz")
    assert input_fingerprint([str(root)]) == rewritten
    single = input_fingerprint([str(flair)])
    assert single == input_fingerprint([str(flair)]) and single not in (first, rewritten)
    assert input_fingerprint([str(tmp_path / "missing")]) == input_fingerprint([])
