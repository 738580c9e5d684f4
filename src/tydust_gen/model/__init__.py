"""MusicGen: loading, text conditioning, the window plan past 30 s, decode backends (stock, fast, native CPU kernel), EnCodec decode, and the tiny test model."""
