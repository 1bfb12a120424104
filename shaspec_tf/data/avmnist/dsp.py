"""The MFCCs of SMIL's AV-MNIST audio (librosa's recipe) with TensorFlow ops only: :func:`mfcc`, :func:`wav_to_mfcc`."""
from __future__ import annotations

# -- MFCC parameters (SMIL's librosa call with librosa's defaults) ----------------------------------------------------
TARGET_RATE = 8000        # FSDD's rate; other rates are resampled to it
DECIMATION = 3            # SMIL keeps every 3rd sample (``wave[::3]``) and still calls librosa with sr=8000
N_FFT = 2048              # librosa.stft defaults: n_fft 2048, hop 512, periodic Hann, centred with reflect padding
HOP_LENGTH = 512
N_MELS = 128              # librosa.feature.melspectrogram default; fmin 0, fmax sr / 2
N_MFCC = 20
N_FRAMES = 20             # SMIL zero-pads (here: pads or truncates) the time axis to 20 frames
TOP_DB = 80.0             # librosa.power_to_db(S, ref=1.0, amin=1e-10, top_db=80)
AMIN = 1e-10


def _reflect_indices(n, pad):
    """Gather indices that pad a length-``n`` signal by ``pad`` on each side like ``np.pad(mode="reflect")``,
    also when ``pad >= n`` (short clips: numpy, and so librosa, keeps reflecting)."""
    import tensorflow as tf

    period = tf.maximum(2 * (n - 1), 1)
    i = tf.math.floormod(tf.range(-pad, n + pad), period)
    return tf.where(i >= n, period - i, i)


def _mfcc_8k(wave):
    """The MFCC graph for a mono float32 waveform at 8 kHz (see :func:`mfcc`)."""
    import tensorflow as tf

    wave = tf.reshape(tf.cast(wave, tf.float32), [-1])
    tf.debugging.assert_positive(tf.size(wave), message="mfcc: empty waveform")
    wave = wave[::DECIMATION]
    n = tf.size(wave)
    padded = tf.gather(wave, _reflect_indices(n, N_FFT // 2))                     # center=True, pad_mode="reflect"
    spec = tf.signal.stft(padded, frame_length=N_FFT, frame_step=HOP_LENGTH, fft_length=N_FFT,
                          window_fn=tf.signal.hann_window, pad_end=False)        # [frames, 1025]
    power = tf.square(tf.abs(spec))
    weights = tf.signal.linear_to_mel_weight_matrix(num_mel_bins=N_MELS, num_spectrogram_bins=N_FFT // 2 + 1,
                                                    sample_rate=TARGET_RATE, lower_edge_hertz=0.0,
                                                    upper_edge_hertz=TARGET_RATE / 2)
    mel = tf.matmul(power, weights)                                              # [frames, 128]
    db = 10.0 * tf.math.log(tf.maximum(mel, AMIN)) / tf.math.log(10.0)           # power_to_db, ref 1.0
    db = tf.maximum(db, tf.reduce_max(db) - TOP_DB)
    coeffs = tf.signal.mfccs_from_log_mel_spectrograms(db)[:, :N_MFCC]           # [frames, 20]
    # TF's DCT-II scaling is sqrt(2 / N) for every coefficient; librosa's is orthonormal (sqrt(1 / N) for c0).
    coeffs = coeffs * tf.constant([0.5 ** 0.5] + [1.0] * (N_MFCC - 1), tf.float32)
    coeffs = tf.transpose(coeffs)[:, :N_FRAMES]                                  # [20 coefficients, <= 20 frames]
    coeffs = tf.pad(coeffs, [[0, 0], [0, tf.maximum(N_FRAMES - tf.shape(coeffs)[1], 0)]])
    return tf.ensure_shape(coeffs, [N_MFCC, N_FRAMES])


_MFCC_GRAPH = None


def _mfcc_graph():
    global _MFCC_GRAPH
    if _MFCC_GRAPH is None:
        import tensorflow as tf

        _MFCC_GRAPH = tf.function(_mfcc_8k, input_signature=[tf.TensorSpec([None], tf.float32)], autograph=False)
    return _MFCC_GRAPH


def _resample(wave, rate_in):
    import tensorflow as tf

    try:
        import tensorflow_io as tfio
    except ImportError as exc:
        raise ImportError(f"resampling audio to {TARGET_RATE} Hz needs tensorflow-io "
                          f"(pip install 'shaspec-tf[pipeline]')") from exc
    return tfio.audio.resample(tf.reshape(wave, [-1, 1]), rate_in=tf.cast(rate_in, tf.int64),
                               rate_out=TARGET_RATE)[:, 0]


def mfcc(waveform, sample_rate=TARGET_RATE):
    """MFCCs of one clip as SMIL computes them, with TensorFlow ops only (usable eagerly, in ``tf.data`` and Beam).

    ``waveform``: float32 ``[samples]`` (or ``[samples, channels]``, averaged to mono) in [-1, 1]; ``sample_rate``:
    Hz, a Python int or a scalar tensor. Returns float32 ``[20, 20]``: **rows are the 20 MFCC coefficients, columns
    the first 20 time frames** (librosa's ``(n_mfcc, t)`` orientation, as SMIL feeds it as a 20x20 image), zero
    columns after the clip ends.

    Steps: resample to 8 kHz with ``tfio.audio.resample`` if ``sample_rate`` differs; keep every 3rd sample
    (SMIL's ``wave[::3]``, still treated as 8 kHz); STFT with n_fft 2048, hop 512, periodic Hann, centred with
    numpy-style reflect padding of 1024; power ``|X|^2``; 128 mel bands 0-4000 Hz; dB ``10 log10(max(S, 1e-10))``
    clipped at 80 dB below the clip's maximum; DCT-II keeping 20 coefficients with librosa's orthonormal scaling;
    pad/truncate to 20 frames. Not numerically librosa's: TF's mel filters are HTK-scale and unnormalised where
    librosa's are Slaney-scale with area normalisation, so values differ while the shape and the recipe match.
    """
    import tensorflow as tf

    wave = tf.convert_to_tensor(waveform, tf.float32)
    if wave.shape.rank == 2:
        wave = tf.reduce_mean(wave, axis=1)
    wave = tf.reshape(wave, [-1])
    if isinstance(sample_rate, tf.Tensor) and not tf.executing_eagerly():
        rate = tf.cast(sample_rate, tf.int64)
        wave = tf.cond(tf.equal(rate, TARGET_RATE), lambda: wave, lambda: _resample(wave, rate))
    else:
        rate = int(sample_rate.numpy()) if isinstance(sample_rate, tf.Tensor) else int(sample_rate)
        if rate <= 0:
            raise ValueError(f"mfcc: sample_rate must be positive, got {rate}")
        if rate != TARGET_RATE:
            wave = _resample(wave, rate)
    return _mfcc_graph()(wave)


def wav_to_mfcc(path):
    """``tf.data``-friendly: a WAV path (string tensor) -> ``[20, 20]`` MFCCs (16-bit PCM WAVs; no Python)."""
    import tensorflow as tf

    audio, rate = tf.audio.decode_wav(tf.io.read_file(path))
    return mfcc(tf.reduce_mean(audio, axis=1), rate)
