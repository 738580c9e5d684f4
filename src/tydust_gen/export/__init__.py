"""Files: ffmpeg, MP3/OGG encoding through pydub, tags, read-back verification, mastering checked on the encoded files, and atomic staging."""
