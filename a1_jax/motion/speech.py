"""Speech -> motion track: phoneme timings, visemes with coarticulation, energy, and seeded life beyond the mouth.

1. Phones (CMU ARPAbet) with their times: pocketsphinx's all-phone decoder (free decoding, its en-us acoustic model
   and phone language model, offline), or forced alignment to the words of a transcript; or the synthesiser's own
   timings for text (`motion.tts`).
2. Each phone has an articulatory target: the mouth's opening follows the vowel height of the IPA chart (close 0 …
   open 1 → opening 0.1 … 0.55; jawOpen scores the part beyond a mid vowel's), lip rounding and spreading follow
   the vowel's rounding, consonants their place of articulation (bilabials close and press the lips, labiodentals
   roll the lower lip, postalveolars and /w/ round them, ...).
3. Coarticulation (Cohen & Massaro's dominance model): at time t the mouth is the dominance-weighted mean of every
   phone's target, a phone's dominance being its strength (a bilabial closure must happen; /t/, /k/, /h/ leave the
   lips and jaw to their neighbours) decaying with the distance to its segment, faster after it (carry-over, 40 ms)
   than before it (anticipation, 70 ms: the lips move before the sound).
4. Vocal effort: a louder syllable opens the jaw more, so each spoken segment's opening is scaled by its peak
   speech energy (voiced band 80–1000 Hz, relative to the recording's loud speech, 30 dB range); silence closes the
   mouth, except that before an utterance the speaker breathes in through an open mouth (the last 0.3 s of a pause
   at least that long, or of the silence before the first words).
5. Life, seeded: blinks every 2–6 s (~170 ms), slow head drift whose amplitude grows while speaking, nods and brow
   raises on loud syllables (head and brow motion follow prosodic prominence).

The 100 Hz curves are averaged over each 12-fps frame's interval (what a camera's exposure does).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from a1_jax.errors import UserError
from a1_jax.io.audio import SPEECH_RATE
from a1_jax.io.video import TARGET_FPS
from a1_jax.motion.track import INDEX, NAMES, MotionTrack

HOP = 0.01  # seconds: curves are built at 100 Hz, pocketsphinx's frame rate
ANTICIPATION, CARRY_OVER = 0.07, 0.04  # seconds: dominance decay before and after a phone's segment
LOUDNESS_RANGE_DB = 30.0  # speech energy below the loud-speech level by this much counts as silence
MIN_SPEECH_DB = -45.0  # dBFS: a recording whose loud parts stay below this is silence (no speech to follow)
EFFORT = 0.5  # share of the jaw opening set by the energy (the rest by the phone)
SPEECH_LOUDNESS = 0.1  # a decoded phone that never gets this loud is the decoder's guess in noise: silence
BREATH = 0.3  # seconds: the inhalation before an utterance
JAW_DEAD_ZONE = 0.2  # opening (jaw target units) below which MediaPipe's jawOpen stays near 0
MAX_TRANSCRIPT_WORDS = 2000
_BLOCK = 1000  # rows of 100 Hz curves computed at once
ALIGN_PADDING = 0.25  # seconds of silence added around a recording before forced alignment


@dataclasses.dataclass(frozen=True)
class Phone:
    """One ARPAbet phone (`SIL` for silence) from `start` to `end` seconds."""

    label: str
    start: float
    end: float


def _lips(jaw=0.0, close=0.0, press=0.0, funnel=0.0, pucker=0.0, stretch=0.0, smile=0.0, roll_lower=0.0,
          lower_down=0.0, upper_up=0.0) -> dict[str, float]:
    """A mouth target by articulatory parameters -> blendshape scores (symmetric pairs on both sides)."""
    target = {"jawOpen": jaw, "mouthClose": close, "mouthFunnel": funnel, "mouthPucker": pucker,
              "mouthRollLower": roll_lower}
    for side in ("Left", "Right"):
        target.update({f"mouthPress{side}": press, f"mouthStretch{side}": stretch, f"mouthSmile{side}": smile,
                       f"mouthLowerDown{side}": lower_down, f"mouthUpperUp{side}": upper_up})
    return target


def _vowel(openness: float, rounded: float = 0.0, spread: float = 0.0) -> dict[str, float]:
    """IPA vowel height (0 close … 1 open) sets the jaw; rounding the funnel and pucker; spreading the corners."""
    return _lips(jaw=0.1 + 0.45 * openness, funnel=0.35 * rounded, pucker=0.6 * rounded, stretch=0.3 * spread,
                 smile=0.12 * spread, lower_down=0.25 * openness)


# IPA heights: close 0, near-close 1/6, close-mid 2/6, mid 3/6, open-mid 4/6, near-open 5/6, open 1.
_MONOPHTHONGS = {
    "IY": _vowel(0.0, spread=1.0), "IH": _vowel(1 / 6, spread=0.6), "EH": _vowel(4 / 6, spread=0.5),
    "AE": _vowel(5 / 6, spread=0.6), "AA": _vowel(1.0), "AO": _vowel(4 / 6, rounded=0.6), "AH": _vowel(4 / 6),
    "UH": _vowel(1 / 6, rounded=0.6), "UW": _vowel(0.0, rounded=1.0), "ER": _vowel(3 / 6, rounded=0.4),
}
# Diphthongs glide from one target to another over their segment.
_DIPHTHONGS = {"AY": ("AA", "IH"), "AW": ("AA", "UH"), "EY": ("EH", "IY"), "OW": ("AO", "UH"), "OY": ("AO", "IH")}
_CONSONANTS = {
    "P": _lips(jaw=0.05, close=0.1, press=0.5), "B": _lips(jaw=0.05, close=0.1, press=0.4),
    "M": _lips(jaw=0.05, close=0.1, press=0.3),
    "F": _lips(jaw=0.08, roll_lower=0.5, upper_up=0.15), "V": _lips(jaw=0.08, roll_lower=0.45, upper_up=0.15),
    "TH": _lips(jaw=0.15, lower_down=0.1), "DH": _lips(jaw=0.15, lower_down=0.1),
    "T": _lips(jaw=0.12), "D": _lips(jaw=0.12), "N": _lips(jaw=0.12), "L": _lips(jaw=0.18),
    "S": _lips(jaw=0.05, stretch=0.3, smile=0.1), "Z": _lips(jaw=0.05, stretch=0.3, smile=0.1),
    "SH": _lips(jaw=0.08, funnel=0.5, pucker=0.3, upper_up=0.1), "ZH": _lips(jaw=0.08, funnel=0.5, pucker=0.3),
    "CH": _lips(jaw=0.08, funnel=0.45, pucker=0.3, upper_up=0.1), "JH": _lips(jaw=0.08, funnel=0.45, pucker=0.3),
    "K": _lips(jaw=0.2), "G": _lips(jaw=0.2), "NG": _lips(jaw=0.2),
    "R": _lips(jaw=0.15, funnel=0.25, pucker=0.35), "W": _lips(jaw=0.1, funnel=0.3, pucker=0.8),
    "Y": _lips(jaw=0.1, stretch=0.2, smile=0.1), "HH": _vowel(4 / 6),
    "SIL": _lips(),
    # Before an utterance the speaker breathes in through the mouth: a quick inhalation (~0.3 s) through a mouth
    # open as for an open vowel.
    "BREATH": _vowel(1.0),
}
# How strongly a phone imposes its target on its neighbours' time (vowels 1).
_DOMINANCE = {"P": 3.0, "B": 3.0, "M": 3.0, "F": 2.0, "V": 2.0, "SH": 1.5, "ZH": 1.5, "CH": 1.5, "JH": 1.5,
              "W": 1.5, "S": 1.0, "Z": 1.0, "R": 0.8, "Y": 0.8, "TH": 0.6, "DH": 0.6, "L": 0.5, "T": 0.3,
              "D": 0.3, "N": 0.3, "K": 0.3, "G": 0.3, "NG": 0.3, "HH": 0.1, "SIL": 1.0, "BREATH": 1.0}
_SILENCES = {"SIL", "BREATH", "+NSN+", "+BREATH+", "+NOISE+", "<s>", "</s>", "<sil>"}
MOUTH = sorted({name for target in _CONSONANTS.values() for name in target})
_MOUTH_COLUMNS = np.array([INDEX[name] for name in MOUTH])
_OPENING = [MOUTH.index(name) for name in MOUTH if name.startswith(("jawOpen", "mouthLowerDown", "mouthUpperUp"))]


def _target(label: str) -> np.ndarray:
    scores = _MONOPHTHONGS.get(label) or _CONSONANTS.get(label) or _CONSONANTS["SIL"]
    return np.array([scores.get(name, 0.0) for name in MOUTH])


def _labels(phones: Sequence[Phone], loud: np.ndarray) -> list[Phone]:
    """Phones with plain ARPAbet labels; a "phone" without speech energy (the decoder's guess in noise) is silence,
    and the last `BREATH` seconds of a silence before speech are an inhalation."""
    labelled = []
    for phone in phones:
        label = "SIL" if phone.label in _SILENCES else phone.label.rstrip("012")
        if label == "+SPN+":  # spoken noise: speech the decoder could not name, a neutral mid vowel
            label = "AH"
        rows = loud[int(phone.start / HOP):max(int(phone.end / HOP), int(phone.start / HOP) + 1)]
        if label != "SIL" and (len(rows) == 0 or rows.max() < SPEECH_LOUDNESS):
            label = "SIL"
        labelled.append(Phone(label, phone.start, phone.end))
    out: list[Phone] = []
    for i, phone in enumerate(labelled):
        speech_follows = any(p.label != "SIL" for p in labelled[i + 1:i + 2])
        first = all(p.label == "SIL" for p in labelled[:i])
        # An inhalation takes ~`BREATH` s: a shorter pause holds none, except before the first words, where the
        # breath began before the recording did.
        if phone.label == "SIL" and speech_follows and (first or phone.end - phone.start >= BREATH):
            split = max(phone.start, phone.end - BREATH)
            if split > phone.start:
                out.append(Phone("SIL", phone.start, split))
            out.append(Phone("BREATH", split, phone.end))
        else:
            out.append(phone)
    return out


def _segments(phones: Sequence[Phone], loud: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per articulatory segment: start, end, target `[S, M]`, dominance (diphthongs become two halves). A spoken
    segment's opening is scaled by its vocal effort (its loudest moment); silences and pauses keep their own."""
    starts, ends, targets, dominance = [], [], [], []
    for phone in phones:
        halves = _DIPHTHONGS.get(phone.label)
        parts = ([(half, a, b) for half, (a, b) in zip(halves, ((phone.start, (phone.start + phone.end) / 2),
                                                                 ((phone.start + phone.end) / 2, phone.end)))]
                 if halves else [(phone.label, phone.start, phone.end)])
        for label, start, end in parts:
            target = _target(label)
            if phone.label not in _SILENCES:
                rows = loud[int(start / HOP):max(int(end / HOP), int(start / HOP) + 1)]
                target[_OPENING] *= (1 - EFFORT) + EFFORT * (rows.max() if len(rows) else 0.0)
            starts.append(start), ends.append(end), targets.append(target)
            dominance.append(1.0 if halves else _DOMINANCE.get(label, 1.0))
    return np.array(starts), np.array(ends), np.array(targets).reshape(-1, len(MOUTH)), np.array(dominance)


def mouth_curves(phones: Sequence[Phone], loudness: np.ndarray) -> np.ndarray:
    """`[N, M]` mouth blendshapes (columns `MOUTH`) at 100 Hz for `loudness` `[N]` in [0, 1] (0 = silence)."""
    times = (np.arange(len(loudness)) + 0.5) * HOP
    starts, ends, targets, dominance = _segments(_labels(phones, loudness), loudness)
    # Silence before the first phone and after the last one.
    starts = np.concatenate([[-1e9], starts, [ends[-1] if len(ends) else 0.0]])
    ends = np.concatenate([[starts[1] if len(starts) > 2 else 0.0], ends, [1e9]])
    targets = np.concatenate([_target("SIL")[None], targets, _target("SIL")[None]])
    dominance = np.concatenate([[_DOMINANCE["SIL"]], dominance, [_DOMINANCE["SIL"]]])
    curves = np.zeros((len(times), len(MOUTH)))
    reach = 30 * max(ANTICIPATION, CARRY_OVER)  # beyond this a segment's weight is below e^-30: left out
    for first in range(0, len(times), _BLOCK):  # blocks of time: memory stays flat for hours of speech
        block = times[first:first + _BLOCK]
        near = (starts - reach < block[-1]) & (ends + reach > block[0])
        before = np.maximum(starts[near, None] - block[None], 0.0) / ANTICIPATION
        after = np.maximum(block[None] - ends[near, None], 0.0) / CARRY_OVER
        weights = dominance[near, None] * np.exp(-(before + after))  # [S near, block]
        curves[first:first + _BLOCK] = (weights.T @ targets[near]) / np.maximum(weights.sum(axis=0), 1e-12)[:, None]
    # The jaw channel so far is the mouth's opening. MediaPipe's jawOpen, which the rig was fitted to, scores only
    # openings beyond about a mid vowel's (below, the lips part while it stays near 0: BUILD_NOTES, issue 16);
    # smaller openings are the lips' (mouthLowerDown / mouthUpperUp).
    jaw = MOUTH.index("jawOpen")
    curves[:, jaw] = np.clip(curves[:, jaw] - JAW_DEAD_ZONE, 0.0, None) * (1 + JAW_DEAD_ZONE)
    return curves


def loudness(samples: np.ndarray, rate: int = SPEECH_RATE) -> np.ndarray:
    """Speech energy at 100 Hz in [0, 1]: voiced-band (80–1000 Hz, where vowels carry their energy, not the
    fricatives' hiss) power in dB, 1 at the recording's loud speech (its 95th percentile), 0 at 30 dB below it or
    below `MIN_SPEECH_DB` overall (a silent recording stays silent)."""
    hop, window = int(rate * HOP), int(rate * 0.03)
    count = max(1, int(np.ceil(len(samples) / hop)))
    padded = np.concatenate([np.zeros(window // 2), samples, np.zeros(window)]).astype(np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(padded, window)[::hop][:count]  # a view: no copy
    band = (np.fft.rfftfreq(window, 1 / rate) >= 80) & (np.fft.rfftfreq(window, 1 / rate) <= 1000)
    taper = np.hanning(window).astype(np.float32)
    power = np.concatenate([(np.abs(np.fft.rfft(frames[i:i + _BLOCK] * taper, axis=1)[:, band]) ** 2).sum(axis=1)
                            for i in range(0, count, _BLOCK)])
    # Power of a full-scale sine of the band = 1 (0 dBFS), so the floor below is in dBFS.
    db = 10 * np.log10(power / (taper.sum() ** 2 / 2) + 1e-12)
    loud = max(float(np.percentile(db, 95)), MIN_SPEECH_DB)
    return np.clip((db - (loud - LOUDNESS_RANGE_DB)) / LOUDNESS_RANGE_DB, 0.0, 1.0)


def _frames(curves: np.ndarray, count: int) -> np.ndarray:
    """100 Hz rows -> `count` 12-fps frames, each the mean of the rows within `k/12 ± 1/24` (the nearest row where
    none is: past the end of the recording)."""
    times = (np.arange(len(curves)) + 0.5) * HOP
    centres = np.arange(count) / TARGET_FPS
    low = np.searchsorted(times, centres - 0.5 / TARGET_FPS, side="left")
    high = np.searchsorted(times, centres + 0.5 / TARGET_FPS, side="right")
    sums = np.concatenate([np.zeros((1,) + curves.shape[1:]), np.cumsum(curves, axis=0)])
    nearest = curves[np.clip(np.round(centres / HOP - 0.5).astype(int), 0, len(curves) - 1)]
    rows = (high - low).reshape((-1,) + (1,) * (curves.ndim - 1))
    return np.where(rows > 0, (sums[high] - sums[low]) / np.maximum(rows, 1), nearest)


def _smooth(values: np.ndarray, seconds: float) -> np.ndarray:
    """A Gaussian low-pass of 100 Hz rows (σ = `seconds`), edges held."""
    sigma = seconds / HOP
    radius = int(3 * sigma) + 1
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(values, (radius, radius), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def life(loud: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded blinks, brows and head motion for `count` frames: (blendshapes `[count, 51]`, rotation `[count, 3]`)."""
    rng = np.random.default_rng(seed)
    blendshapes = np.zeros((count, len(NAMES)))
    duration = count / TARGET_FPS
    # Blinks: closing ~60 ms, opening ~110 ms; the centre on a frame so one frame shows the eyes shut.
    t = rng.uniform(0.5, 3.0)
    frame_times = np.arange(count) / TARGET_FPS
    while t < duration:
        centre = round(t * TARGET_FPS) / TARGET_FPS
        offset = frame_times - centre
        shape = np.where(offset < 0, 1 + offset / 0.06, 1 - offset / 0.11)
        closed = np.clip(shape, 0.0, 1.0)
        for name in ("eyeBlinkLeft", "eyeBlinkRight"):
            blendshapes[:, INDEX[name]] = np.maximum(blendshapes[:, INDEX[name]], closed)
        t += rng.uniform(2.0, 6.0)
    # Prominence: energy above its slow trend, on the syllable scale (~100 ms).
    syllables = _smooth(loud, 0.1)
    prominence = np.clip(syllables - _smooth(loud, 0.6), 0.0, None)
    speaking = _smooth((loud > 0.1).astype(float), 0.5)
    brow = _frames(np.clip(2.0 * _smooth(prominence, 0.15), 0, 1)[:, None], count)[:, 0]
    for name, gain in (("browInnerUp", 0.35), ("browOuterUpLeft", 0.25), ("browOuterUpRight", 0.25)):
        blendshapes[:, INDEX[name]] = gain * brow
    # Head: slow drift (sum of sines below 0.5 Hz, random phases), larger while speaking, plus nods on prominence.
    times = (np.arange(len(loud)) + 0.5) * HOP
    rotation = np.zeros((len(loud), 3))
    for axis, amplitude in enumerate((2.5, 1.5, 1.0)):  # degrees: yaw, pitch, roll
        frequencies = rng.uniform(0.08, 0.45, 3)
        phases = rng.uniform(0, 2 * np.pi, 3)
        drift = np.sin(2 * np.pi * frequencies[:, None] * times[None] + phases[:, None]).sum(axis=0) / np.sqrt(3)
        rotation[:, axis] = amplitude * drift * (0.4 + 0.6 * speaking)
    rotation[:, 1] += 4.0 * _smooth(prominence, 0.12)  # a nod: the chin dips on the stressed syllable
    return blendshapes, _frames(rotation, count)


def track_from_phones(phones: Sequence[Phone], samples: np.ndarray, rate: int = SPEECH_RATE, *,
                      seed: int = 0) -> MotionTrack:
    """The 12-fps track of a recording (`samples` mono float) whose phones are known: mouth + life."""
    count = max(1, int(round(len(samples) / rate * TARGET_FPS)))
    loud = loudness(samples, rate)
    mouth = _frames(mouth_curves(phones, loud), count)
    blendshapes, rotation = life(loud, count, seed)
    blendshapes[:, _MOUTH_COLUMNS] = mouth
    return MotionTrack(np.clip(blendshapes, 0, 1).astype(np.float32), rotation.astype(np.float32))


# --- recognition -----------------------------------------------------------------------------------------------------


def _decoder(kind: str):
    """A fresh pocketsphinx decoder (0.2 s): a reused one adapts its cepstral mean to the previous recordings, so
    the same audio would decode differently depending on what came before."""
    from pocketsphinx import Decoder, get_model_path

    if kind == "allphone":
        # Wide beams: pocketsphinx's all-phone search drops most phones at its default beams.
        return Decoder(allphone=get_model_path("en-us/en-us-phone.lm.bin"), lm=None, loglevel="FATAL",
                       backtrace=False, beam=1e-20, pbeam=1e-20, lw=2.0)
    return Decoder(lm=None, loglevel="FATAL")


def _pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def decode_phones(samples: np.ndarray) -> list[Phone]:
    """Free phone decoding of 16 kHz mono speech."""
    decoder = _decoder("allphone")
    decoder.start_utt()
    decoder.process_raw(_pcm16(samples), full_utt=True)
    decoder.end_utt()
    return [Phone(s.word, s.start_frame * HOP, (s.end_frame + 1) * HOP) for s in decoder.seg()]


def transcript_words(transcript: str) -> list[str]:
    """The words of a transcript as the dictionary spells them (lowercase, letters and apostrophes)."""
    import re

    words = re.findall(r"[a-z']+", transcript.lower().replace("’", "'"))
    words = [word.strip("'") for word in words if word.strip("'")]
    if not words:
        raise UserError("--transcript has no words")
    if len(words) > MAX_TRANSCRIPT_WORDS:
        raise UserError(f"--transcript has {len(words)} words; at most {MAX_TRANSCRIPT_WORDS}")
    return words


def align_phones(samples: np.ndarray, words: Sequence[str]) -> tuple[list[Phone], list[str], bool]:
    """Forced alignment of 16 kHz speech to `words`: (phones, words the dictionary does not know, aligned).

    Word boundaries first, then phone boundaries inside them; where pocketsphinx's phone pass fails, each word's
    dictionary phones share its aligned time evenly; unknown words or a failed word pass fall back to free decoding
    (the phones are then not the transcript's). The audio is padded with silence on both sides: the aligner needs
    a silence to start and end in, and speech that starts at the first sample (synthesised speech) has none."""
    decoder = _decoder("align")
    unknown = [word for word in words if decoder.lookup_word(word) is None]
    if unknown:
        return decode_phones(samples), unknown, False
    pad = np.zeros(int(ALIGN_PADDING * SPEECH_RATE), np.float32)
    pcm = _pcm16(np.concatenate([pad, samples, pad]))

    def decode() -> None:
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()

    try:
        decoder.set_align_text(" ".join(words))
        decode()
        segments = decoder.seg()
    except RuntimeError:
        segments = None
    if segments is None:  # the words could not be aligned to this audio
        return decode_phones(samples), [], False
    spans = [(s.word, s.start_frame, s.end_frame + 1) for s in segments]  # frames of the padded audio
    try:
        decoder.set_alignment()
        decode()
        spans = [(phone.name, phone.start, phone.start + phone.duration)
                 for word in decoder.get_alignment() for phone in word]
    except RuntimeError:  # the phone pass failed: split each aligned word's time among its dictionary phones
        spans = [(label, start + (end - start) * j / len(labels), start + (end - start) * (j + 1) / len(labels))
                 for word, start, end in spans if word not in _SILENCES
                 for labels in [(decoder.lookup_word(word) or "AH").split()] for j, label in enumerate(labels)]
    duration = len(samples) / SPEECH_RATE
    phones = [Phone(label, min(max(start * HOP - ALIGN_PADDING, 0.0), duration),
                    min(max(end * HOP - ALIGN_PADDING, 0.0), duration)) for label, start, end in spans]
    return [phone for phone in phones if phone.end > phone.start], [], True


def track_from_speech(samples: np.ndarray, *, transcript: str | None = None, seed: int = 0) -> tuple[MotionTrack, dict]:
    """A 12-fps track from 16 kHz mono speech (free phone decoding, or aligned to `transcript`); with a summary."""
    silent = loudness(samples).max() == 0.0
    words = transcript_words(transcript) if transcript is not None else None
    unknown: list[str] = []
    aligned = False
    if silent:
        phones = []
    elif words is not None:
        phones, unknown, aligned = align_phones(samples, words)
    else:
        phones = decode_phones(samples)
    track = track_from_phones(phones, samples, seed=seed)
    spoken = [p for p in phones if p.label not in _SILENCES]
    summary = {"phones": len(spoken), "silent": bool(silent)}
    if words is not None:  # whether the transcript's words were aligned, or free decoding stood in
        summary.update(aligned=aligned, unknown_words=unknown)
    return track, summary
