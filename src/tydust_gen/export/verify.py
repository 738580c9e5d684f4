"""Reading finished files back: format, rate, channels, bitrate and exact length, and their sha256.

Nothing a user typed (title, prompt, genre in the tags) may change how a file is
verified: lengths come from the audio stream, never from a search of the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tydust_gen.audio.resample import TARGET_CHANNELS, TARGET_SAMPLE_RATE
from tydust_gen.base.digest import sha256_file
from tydust_gen.base.errors import ExportError

MP3_BITRATE_BPS = 192_000

# MPEG audio layer III, as ISO 11172-3 (MPEG-1) and 13818-3 (MPEG-2, and 2.5) lay it out.
MP3_HEADER_BYTES = 4
MP3_BITRATES_KBPS_MPEG1 = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)  # index 1..14
MP3_STANDARD_BITRATES = tuple(k * 1000 for k in MP3_BITRATES_KBPS_MPEG1)  # bit/s
MP3_BITRATES_KBPS_MPEG2 = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)  # MPEG-2 and 2.5
MP3_SAMPLE_RATES_MPEG1 = (44_100, 48_000, 32_000)  # Hz; MPEG-2 halves them, MPEG-2.5 quarters them
MP3_SAMPLES_PER_FRAME_MPEG1 = 1152
MP3_SAMPLES_PER_FRAME_MPEG2 = 576
MP3_SIDE_INFO_BYTES = {(True, False): 32, (True, True): 17, (False, False): 17, (False, True): 9}  # (MPEG-1, mono)
ID3V2_HEADER_BYTES = 10
ID3V2_FOOTER_BYTES = 10
ID3V2_FOOTER_FLAG = 0x10
XING_MAGICS = (b"Xing", b"Info")  # "Info" is what LAME and ffmpeg write for CBR
XING_FLAG_FRAMES, XING_FLAG_BYTES, XING_FLAG_TOC, XING_FLAG_QUALITY = 1, 2, 4, 8
LAME_DELAY_PADDING_OFFSET = 21  # bytes from the 9-byte encoder string to the 24-bit delay/padding field


DURATION_TOLERANCE_S = 0.05  # seconds between requested and read-back length


@dataclass(frozen=True)
class ExportedFile:
    """One finished, verified output file as mutagen reads it back.

    Attributes:
        path: final location.
        format: "mp3" or "ogg".
        size_bytes: file size.
        duration_s: playing time in seconds (MP3: from the gapless header, see
            :func:`mp3_gapless_duration`, else from the decoded samples; OGG:
            mutagen's length, the granule position of the last page).
        bitrate_bps: bitrate (MP3: the CBR rate; OGG: the nominal rate).
        sample_rate: Hz.
        channels: 2.
        sha256: hex digest of the file.
    """

    path: Path
    format: str
    size_bytes: int
    duration_s: float
    bitrate_bps: int
    sample_rate: int
    channels: int
    sha256: str


def _id3v2_end(f: BinaryIO) -> int | None:
    """Offset just past the ID3v2 tag(s) at the start of ``f`` (0 when there is none).

    The size comes from each tag's 10-byte header (syncsafe: 7 bits a byte), plus
    10 when the footer flag is set; stacked tags are skipped one after another.
    Returns None when a header is malformed (a size byte with its top bit set).
    """
    offset = 0
    while True:
        f.seek(offset)
        head = f.read(ID3V2_HEADER_BYTES)
        if len(head) < ID3V2_HEADER_BYTES or head[:3] != b"ID3":
            return offset
        if any(b & 0x80 for b in head[6:10]):
            return None
        size = 0
        for b in head[6:10]:
            size = (size << 7) | b
        footer = ID3V2_FOOTER_BYTES if head[5] & ID3V2_FOOTER_FLAG else 0
        offset += ID3V2_HEADER_BYTES + size + footer


@dataclass(frozen=True)
class _Mp3Frame:
    """What a layer III frame header says (ISO 11172-3 / 13818-3)."""

    mpeg1: bool  # False: MPEG-2 or MPEG-2.5 (half the samples per frame)
    mono: bool
    sample_rate: int  # Hz
    length: int  # bytes, header included

    @property
    def samples(self) -> int:
        return MP3_SAMPLES_PER_FRAME_MPEG1 if self.mpeg1 else MP3_SAMPLES_PER_FRAME_MPEG2

    @property
    def xing_offset(self) -> int:
        """Where a Xing/Info tag starts: after the header and the side information.

        A CRC-protected frame has 2 more bytes after its header, but LAME and
        ffmpeg write the tag frame unprotected, and ffmpeg's and mutagen's
        readers look for the tag here either way.
        """
        side_info = MP3_SIDE_INFO_BYTES[(self.mpeg1, self.mono)]
        return MP3_HEADER_BYTES + side_info


def _mp3_frame(header: bytes) -> _Mp3Frame | None:
    """Parse a 4-byte MPEG audio frame header; None unless it is a valid layer III header."""
    if len(header) < MP3_HEADER_BYTES or header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        return None
    version = (header[1] >> 3) & 0b11  # 0: MPEG-2.5, 1: reserved, 2: MPEG-2, 3: MPEG-1
    layer = (header[1] >> 1) & 0b11  # 1: layer III
    bitrate_index = header[2] >> 4
    rate_index = (header[2] >> 2) & 0b11
    padding = (header[2] >> 1) & 1
    mono = header[3] >> 6 == 0b11
    if version == 1 or layer != 1 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    mpeg1 = version == 3
    kbps = (MP3_BITRATES_KBPS_MPEG1 if mpeg1 else MP3_BITRATES_KBPS_MPEG2)[bitrate_index - 1]
    sample_rate = MP3_SAMPLE_RATES_MPEG1[rate_index] // {3: 1, 2: 2, 0: 4}[version]
    samples = MP3_SAMPLES_PER_FRAME_MPEG1 if mpeg1 else MP3_SAMPLES_PER_FRAME_MPEG2
    length = samples // 8 * kbps * 1000 // sample_rate + padding
    return _Mp3Frame(mpeg1=mpeg1, mono=mono, sample_rate=sample_rate, length=length)


def mp3_gapless_duration(path: Path, sample_rate: int | None = None) -> float | None:
    """Exact playing time of an MP3 from the Xing/Info tag of its first audio frame.

    The tag is read only where the format puts it: past the ID3v2 tag (whose
    size is in its header), in the first frame, right after the header and
    side information. Nothing in the ID3 tag (title, prompt...) is looked at,
    so no text a user typed can be taken for the header.

    Encoder delay and padding come from the LAME extension that follows the
    tag's 9-byte encoder string. mutagen only reads that extension when the
    string starts with "LAME"; ffmpeg writes "Lavc..." there, so mutagen's
    length is 25–50 ms long.

    Args:
        path: the MP3 file.
        sample_rate: the rate the caller read elsewhere (mutagen), Hz; when
            given and the first frame says otherwise, the header is not trusted.

    Returns:
        Seconds, or None when the first frame has no complete Xing/Info tag
        with a frame count.
    """
    with open(path, "rb") as f:
        start = _id3v2_end(f)
        if start is None:
            return None
        f.seek(start)
        frame = _mp3_frame(f.read(MP3_HEADER_BYTES))
        if frame is None or (sample_rate is not None and frame.sample_rate != sample_rate):
            return None
        f.seek(start)
        data = f.read(frame.length)
    i = frame.xing_offset
    if len(data) < frame.length or data[i : i + 4] not in XING_MAGICS:
        return None
    flags = int.from_bytes(data[i + 4 : i + 8], "big")
    if not flags & XING_FLAG_FRAMES:
        return None
    frames = int.from_bytes(data[i + 8 : i + 12], "big")
    j = i + 12
    j += 4 if flags & XING_FLAG_BYTES else 0
    j += 100 if flags & XING_FLAG_TOC else 0
    j += 4 if flags & XING_FLAG_QUALITY else 0
    delay_at = j + LAME_DELAY_PADDING_OFFSET
    if delay_at + 3 > len(data):
        return None
    ext = data[delay_at : delay_at + 3]
    delay = (ext[0] << 4) | (ext[1] >> 4)  # 12 bits
    padding = ((ext[1] & 0x0F) << 8) | ext[2]  # 12 bits
    samples = frames * frame.samples - delay - padding
    return samples / frame.sample_rate if samples > 0 else None


def decoded_duration(path: Path) -> float:
    """Playing time of a file from its samples as ffmpeg decodes them (slower; no header trusted).

    Raises:
        ExportError: ffmpeg could not decode it.
    """
    from tydust_gen.export.loudness import ENCODED_SAMPLE_RATE, decode_audio

    return decode_audio(path).shape[1] / ENCODED_SAMPLE_RATE


def inspect_file(path: Path, fmt: str) -> ExportedFile:
    """Read an encoded file back with mutagen.

    Raises:
        ExportError: mutagen cannot parse it.
    """
    try:
        if fmt == "mp3":
            from mutagen.mp3 import MP3

            info = MP3(path).info
        else:
            from mutagen.oggvorbis import OggVorbis

            info = OggVorbis(path).info
    except Exception as exc:  # noqa: BLE001 - mutagen raises many types for a bad file
        raise ExportError(f"{path.name} is not a readable {fmt.upper()} file: {exc}") from exc
    bitrate = int(getattr(info, "bitrate", 0) or getattr(info, "nominal_bitrate", 0) or 0)
    duration = float(info.length)
    if fmt == "mp3":
        # Without the gapless header, count decoded samples rather than trust
        # mutagen's estimate (frames x 1152, encoder delay and padding included).
        gapless = mp3_gapless_duration(path, int(info.sample_rate))
        duration = gapless if gapless is not None else decoded_duration(path)
        from mutagen.mp3 import BitrateMode

        # mutagen derives the rate from byte and frame counts, which rounds short
        # files to e.g. 191,990; a CBR stream's frames all carry one standard rate.
        if info.bitrate_mode != BitrateMode.CBR:
            raise ExportError(f"{path.name} is not constant-bitrate ({info.bitrate_mode}); this is a bug, please report it")
        bitrate = min(MP3_STANDARD_BITRATES, key=lambda b: abs(b - bitrate))
    return ExportedFile(
        path=path,
        format=fmt,
        size_bytes=path.stat().st_size,
        duration_s=duration,
        bitrate_bps=bitrate,
        sample_rate=int(info.sample_rate),
        channels=int(info.channels),
        sha256=sha256_file(path),
    )


def check_promises(f: ExportedFile, expected_duration_s: float) -> None:
    problems = []
    if f.sample_rate != TARGET_SAMPLE_RATE:
        problems.append(f"sample rate {f.sample_rate} Hz")
    if f.channels != TARGET_CHANNELS:
        problems.append(f"{f.channels} channels")
    if f.format == "mp3" and f.bitrate_bps != MP3_BITRATE_BPS:
        problems.append(f"bitrate {f.bitrate_bps} bit/s")
    if abs(f.duration_s - expected_duration_s) > DURATION_TOLERANCE_S:
        problems.append(f"duration {f.duration_s:.3f} s instead of {expected_duration_s:.3f} s")
    if problems:
        raise ExportError(f"{f.path.name} came out wrong ({', '.join(problems)}); this is a bug, please report it")
