"""AV-MNIST as ShaSpec used it: the SMIL protocol (github.com/mengmenm/SMIL), rebuilt from real MNIST digits and Free
Spoken Digit Dataset (FSDD) recordings, written as sharded TFRecords in the ``schema.avmnist_example`` contract.

The SMIL protocol (paper digest, section 6):

* every FSDD recording of the chosen speakers (SMIL: jackson, nicolas, theo) is one sample; its label is the spoken
  digit, and it is paired with an MNIST image of the same digit (pairing by label only);
* the split is by recording index: SMIL tests on takes 0-14 and trains on 15-49. Takes 0-4 are held back in this
  workspace, so the defaults are test 5-14 (300 samples) and train 15-49 (1050 samples, as SMIL);
* audio: ``librosa.load(sr=None)`` -> ``wave[::3]`` -> ``librosa.feature.mfcc(sr=8000, n_mfcc=20)`` -> zero-pad the
  time axis to 20 frames (:func:`mfcc` does this with TensorFlow ops);
* missing audio (ShaSpec Table 3): all training images are kept, audio only for a fraction ``audio_rate`` of the
  training samples of each class; evaluation samples keep both modalities.

Differences from SMIL, on purpose or forced: MNIST images come from one npz (``images`` uint8 ``[N, 28, 28]``,
``labels``), drawn by a seeded shuffle per digit (SMIL takes the first/last rows of its class folders); the image is
stored in [0, 1] (SMIL's ``Normalize(0.5, 0.5)`` is left to the input pipeline); MFCCs follow librosa's recipe but
not its numbers (see :func:`mfcc`).

Output of :func:`build_avmnist` (``out_dir``)::

    train-00000-of-0000N.tfrecord ...   # schema.avmnist_example records; train order shuffled by the seed
    test-00000-of-0000N.tfrecord ...    # test in sorted order (digit, speaker, index)
    manifest.json                       # counts, audio availability, parameters, sources, and mnist_rows:
                                        # {sample_id: row of the MNIST npz paired with that recording}
    .shaspec-output.json                # ownership marker (shaspec_tf.fileio): kind "avmnist-records", files

Sample ids are ``"{split}/{digit}_{speaker}_{index}"``, e.g. ``"train/3_theo_17"`` (the WAV's stem).

Only :func:`mfcc`'s resampling path (a WAV not at 8 kHz) needs ``tensorflow-io`` (the ``pipeline`` extra).
Command line: ``python -m shaspec_tf.data.avmnist OUT_DIR [--audio-rate 0.1] [--seed 0] ...``.

Modules:

* :mod:`~shaspec_tf.data.avmnist.sources`: the data folder (``SHASPEC_DATA``), FSDD WAVs and the MNIST npz.
* :mod:`~shaspec_tf.data.avmnist.dsp`: the MFCCs (:func:`mfcc`), with TensorFlow ops.
* :mod:`~shaspec_tf.data.avmnist.plan`: the SMIL plan (:func:`plan_avmnist`) and one sample -> record.
* :mod:`~shaspec_tf.data.avmnist.build`: :func:`build_avmnist` and its output folder's checks.
* :mod:`~shaspec_tf.data.avmnist.read`: readers of a build and of the published ``.npy`` layout.
* :mod:`~shaspec_tf.data.avmnist.cli`: the command line (``__main__`` runs it).
"""
from shaspec_tf.data.avmnist.build import KIND, MANIFEST, build_avmnist, legacy_output
from shaspec_tf.data.avmnist.cli import main, parse_indices, sources_and_speakers
from shaspec_tf.data.avmnist.dsp import (AMIN, DECIMATION, HOP_LENGTH, N_FFT, N_FRAMES, N_MELS, N_MFCC, TARGET_RATE,
                                         TOP_DB, mfcc, wav_to_mfcc)
from shaspec_tf.data.avmnist.plan import AvMnistJob, avmnist_job_example, plan_avmnist
from shaspec_tf.data.avmnist.read import PUBLISHED_LAYOUT, read_published_avmnist, tfrecord_files
from shaspec_tf.data.avmnist.sources import (DATA_HELP, DEFAULT_SPEAKERS, WAV_PATTERN, Recording, default_data_dir,
                                             default_sources, find_recordings, load_mnist, load_wav, require_data_dir)

__all__ = [
    # sources
    "DATA_HELP", "DEFAULT_SPEAKERS", "WAV_PATTERN", "Recording", "default_data_dir", "default_sources",
    "find_recordings", "load_mnist", "load_wav", "require_data_dir",
    # dsp
    "AMIN", "DECIMATION", "HOP_LENGTH", "N_FFT", "N_FRAMES", "N_MELS", "N_MFCC", "TARGET_RATE", "TOP_DB", "mfcc",
    "wav_to_mfcc",
    # plan
    "AvMnistJob", "avmnist_job_example", "plan_avmnist",
    # build
    "KIND", "MANIFEST", "build_avmnist", "legacy_output",
    # read
    "PUBLISHED_LAYOUT", "read_published_avmnist", "tfrecord_files",
    # cli
    "main", "parse_indices", "sources_and_speakers",
]
