"""Audio after the model: 32 → 44.1 kHz stereo, mastering (DC, loudness, true peak, fades), loops, preview picture."""
