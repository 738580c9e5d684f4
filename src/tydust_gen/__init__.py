"""tydust-gen: prompt file → MusicGen → 44.1 kHz stereo → MP3 192k + OGG q6."""

__version__ = "0.1.0"
