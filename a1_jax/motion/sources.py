"""The motion source of a run, exactly one: a driving video, speech audio, text, or a blendshape curve file.

`load_source` checks the inputs (one line, exit 2, before any model runs) and returns what the Animator and
`a1-jax landmarks` take as the driver (a video path, or a `MotionTrack`) with the audio the output should play: the
driving video's own sound, the speech, or the synthesised voice (None for curve files, a silent video, `--no-audio`).
"""

from __future__ import annotations

import dataclasses

from a1_jax.errors import UserError
from a1_jax.io.audio import MUX_RATE, Audio, read_audio
from a1_jax.io.video import probe_video
from a1_jax.motion import speech
from a1_jax.motion.track import MotionTrack, read_track

SOURCE_OPTIONS = ("--driving", "--audio", "--text", "--blendshapes")


@dataclasses.dataclass(frozen=True)
class MotionSource:
    driving: str | MotionTrack  # a driving video's path, or the track of any other source (12 fps)
    audio: Audio | None  # what the output plays, from time 0 of the source
    summary: dict  # what the source gave: kind, and for speech the phones found, silence, unknown words


def _check_length(what: str, seconds: float, max_seconds: float | None) -> None:
    if max_seconds is not None and seconds > max_seconds:
        raise UserError(f"{what} lasts {seconds:.1f} s; this server animates at most {max_seconds:g} s of motion")


def load_source(*, driving: str | None = None, audio: str | None = None, transcript: str | None = None,
                text: str | None = None, blendshapes: str | None = None, seed: int = 0,
                with_audio: bool = True, max_seconds: float | None = None) -> MotionSource:
    """The one motion source given (UserError for none or several, and for any unusable input). `max_seconds`: the
    longest source accepted (a server's limit), checked as soon as the length is known, before the source's work."""
    given = [name for name, value in zip(SOURCE_OPTIONS, (driving, audio, text, blendshapes)) if value is not None]
    if len(given) != 1:
        raise UserError(f"give exactly one motion source ({', '.join(SOURCE_OPTIONS)}); got "
                        f"{' and '.join(given) if given else 'none'}")
    if transcript is not None and audio is None:
        raise UserError("--transcript goes with --audio (the words spoken in that recording)")
    if driving is not None:
        info = probe_video(driving)  # a missing or undecodable video is named as a video, before its sound is read
        _check_length(driving, info.num_frames / info.fps, max_seconds)
        sound = read_audio(driving, rate=MUX_RATE, mono=False, required=False) if with_audio else None
        return MotionSource(driving, sound, {"source": "video", "audio": sound is not None})
    if blendshapes is not None:
        track = read_track(blendshapes)
        _check_length(blendshapes, track.duration, max_seconds)
        return MotionSource(track, None, {"source": "blendshapes", "audio": False})
    if text is not None:
        from a1_jax.motion import tts

        sound, phones = tts.synthesise(text)
        _check_length("the spoken text", sound.duration, max_seconds)
        track = speech.track_from_phones(phones, sound.mono, sound.rate, seed=seed)
        return MotionSource(track, sound if with_audio else None,
                            {"source": "text", "audio": with_audio, "phones": len(phones),
                             "speech_seconds": round(sound.duration, 3)})
    samples = read_audio(audio)
    if samples.duration == 0:
        raise UserError(f"{audio} holds no audio samples")
    _check_length(audio, samples.duration, max_seconds)
    track, found = speech.track_from_speech(samples.mono, transcript=transcript, seed=seed)
    sound = read_audio(audio, rate=MUX_RATE, mono=False) if with_audio else None
    return MotionSource(track, sound, {"source": "audio", "audio": with_audio,
                                       "speech_seconds": round(samples.duration, 3), **found})
