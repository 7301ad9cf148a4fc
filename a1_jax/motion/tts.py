"""Text -> speech with its phone timings, offline: eSpeak NG from the `espeakng-loader` wheel (the `tts` extra).

The wheel carries libespeak-ng and its voice data; we call the library through ctypes in synchronous mode, with
phoneme events on: every phoneme arrives with the sample it starts at, so the timings are the synthesiser's own (no
recognition). eSpeak's IPA phoneme names are mapped to the ARPAbet labels `motion.speech` knows.
"""

from __future__ import annotations

import ctypes
import functools
import os
import unicodedata

import numpy as np

from a1_jax.errors import UserError
from a1_jax.io.audio import Audio
from a1_jax.motion.speech import Phone

MAX_TEXT_CHARACTERS = 5000  # about five minutes of speech
DEFAULT_VOICE = "en-us"

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS, _INITIALIZE_PHONEME_IPA, _INITIALIZE_DONT_EXIT = 0x0001, 0x0002, 0x8000
_EVENT_END_OF_LIST, _EVENT_PHONEME = 0, 7
_POS_CHARACTER, _CHARS_UTF8 = 1, 1

_IPA_TO_ARPABET = {
    "i": "IY", "ɪ": "IH", "ᵻ": "IH", "e": "EY", "eɪ": "EY", "ɛ": "EH", "æ": "AE", "a": "AA", "ɑ": "AA", "ɒ": "AA",
    "ɔ": "AO", "o": "OW", "oʊ": "OW", "əʊ": "OW", "ʊ": "UH", "u": "UW", "ʌ": "AH", "ə": "AH", "ɐ": "AH",
    "ɚ": "ER", "ɝ": "ER", "ɜ": "ER", "aɪ": "AY", "aʊ": "AW", "ɔɪ": "OY", "ɪə": "IH", "eə": "EH", "ʊə": "UH",
    "p": "P", "b": "B", "t": "T", "d": "D", "k": "K", "g": "G", "ɡ": "G", "m": "M", "n": "N", "ŋ": "NG", "f": "F",
    "v": "V", "θ": "TH", "ð": "DH", "s": "S", "z": "Z", "ʃ": "SH", "ʒ": "ZH", "h": "HH", "l": "L", "ɫ": "L",
    "ɹ": "R", "r": "R", "w": "W", "j": "Y", "tʃ": "CH", "dʒ": "JH", "ɾ": "D", "ʔ": "T", "ç": "HH", "x": "HH",
}


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


def arpabet(ipa: str) -> list[str]:
    """One eSpeak IPA phoneme -> ARPAbet labels (an r-coloured vowel gives two: the vowel, then R); '' is a pause."""
    symbol = "".join(c for c in unicodedata.normalize("NFD", ipa)
                     if c not in "ˈˌːˑ" and not unicodedata.combining(c))
    if not symbol:
        return ["SIL"]
    if symbol in _IPA_TO_ARPABET:
        return [_IPA_TO_ARPABET[symbol]]
    if symbol.endswith(("ɹ", "r")) and symbol[:-1] in _IPA_TO_ARPABET:
        return [_IPA_TO_ARPABET[symbol[:-1]], "R"]
    return ["AH"]  # a phoneme of another language's inventory: a neutral vowel


@functools.lru_cache(maxsize=1)
def _library():
    try:
        import espeakng_loader
    except ImportError:
        raise UserError("--text needs the offline speech synthesiser: pip install 'a1_jax[tts]' "
                        "(eSpeak NG from the espeakng-loader wheel)") from None
    library = ctypes.CDLL(espeakng_loader.get_library_path())
    library.espeak_Initialize.restype = ctypes.c_int
    library.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    library.espeak_SetSynthCallback.argtypes = [_Callback]
    library.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    library.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    data = espeakng_loader.get_data_path()  # .../espeak-ng-data; the library wants the folder that holds it
    rate = library.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, os.path.dirname(str(data)).encode(),
                                     _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_PHONEME_IPA | _INITIALIZE_DONT_EXIT)
    if rate <= 0:
        raise RuntimeError(f"eSpeak NG did not initialise (returned {rate})")
    return library, rate


def check_text(text: str) -> str:
    """The text to speak, stripped; UserError if empty or longer than `MAX_TEXT_CHARACTERS`."""
    text = text.strip()
    if not text:
        raise UserError("--text is empty")
    if len(text) > MAX_TEXT_CHARACTERS:
        raise UserError(f"--text has {len(text)} characters; at most {MAX_TEXT_CHARACTERS} (about five minutes of "
                        f"speech): split it, or record it and pass --audio")
    return text


def synthesise(text: str, voice: str = DEFAULT_VOICE) -> tuple[Audio, list[Phone]]:
    """Speech for `text` (mono float32 at eSpeak's rate, 22.05 kHz) and its phones with the synthesiser's times."""
    text = check_text(text)
    library, rate = _library()
    chunks: list[np.ndarray] = []
    starts: list[tuple[int, list[str]]] = []  # (sample, labels) per phoneme event

    def on_audio(wave, count, events):
        if count > 0:
            chunks.append(np.ctypeslib.as_array(wave, (count,)).copy())
        i = 0
        while events[i].type != _EVENT_END_OF_LIST:
            if events[i].type == _EVENT_PHONEME:
                name = bytes(events[i].id).split(b"\0")[0].decode("utf-8", "replace")
                starts.append((events[i].sample, arpabet(name)))
            i += 1
        return 0

    callback = _Callback(on_audio)  # kept alive until synthesis ends
    library.espeak_SetSynthCallback(callback)
    if library.espeak_SetVoiceByName(voice.encode()) != 0:
        raise UserError(f"unknown eSpeak voice {voice!r}")
    encoded = text.encode("utf-8")
    status = library.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    library.espeak_Synchronize()
    if status != 0:
        raise RuntimeError(f"eSpeak NG could not synthesise the text (error {status})")
    samples = (np.concatenate(chunks) if chunks else np.zeros(0, np.int16)).astype(np.float32) / 32768.0
    phones: list[Phone] = []
    ends = [sample for sample, _ in starts[1:]] + [len(samples)]
    for (start, labels), end in zip(starts, ends):
        step = (end - start) / len(labels)
        for j, label in enumerate(labels):
            phones.append(Phone(label, (start + j * step) / rate, (start + (j + 1) * step) / rate))
    return Audio(samples=samples[:, None], rate=rate), phones
